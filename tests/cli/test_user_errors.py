"""User mistakes and machine faults end in one line and a non-zero exit, never a traceback."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import _tiny_backbone  # noqa: F401
import pytest
from _cohort import tiny_cohort
from cli_run import run_medfeat


def _one_line(err: str) -> bool:
    return "Traceback" not in err and len([line for line in err.strip().splitlines() if line]) == 1


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return tiny_cohort(tmp_path_factory)


def _extract(capsys, manifest, store, *args: str) -> tuple[int, str, str]:
    return run_medfeat(capsys, "extract", "--manifest", str(manifest), "--store", str(store), "--scheduler-kind",
                    "sync", "--quiet", *args)


def _checkpoint(path: Path, model: str | None, config: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    meta = {"medfeat_config": json.dumps(config), **({"medfeat_model": model} if model else {})}
    save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny3d_test", "--taps", "conv1"], "no weights given"),
    (["--model", "tiny3d_test", "--taps", "conv1", "--random-init", "--device", "cuda"], "no CUDA GPU"),
    (["--model", "tiny3d_test", "--taps", "conv1", "--random-init", "--device", "tpu"], "not a device name"),
    (["--model", "tiny3d_test", "--taps", "conv1", "--random-init", "--memory-limit", "lots"], "memory limit 'lots'"),
    (["--model", "tiny3d_test", "--taps", "conv1", "--random-init", "--pooling", "median"], "pooling 'median'"),
    (["--model", "tiny3d_test", "--taps", "conv1", "--random-init", "--scheduler", "tcp://127.0.0.1:9"],
     "cannot reach the Dask scheduler"),
])
def test_mistakes_are_one_line_and_leave_no_store(manifest, tmp_path, capsys, args, message):
    code, _, err = _extract(capsys, manifest, tmp_path / "s", *args)
    assert code == 2 and message in err and _one_line(err), err
    assert not (tmp_path / "s").exists()


def test_a_checkpoint_of_another_model_is_refused_in_one_line(manifest, tmp_path, capsys):
    unet = _checkpoint(tmp_path / "unet.safetensors", "unet3d", {"in_channels": 1, "channels": [4, 8]})
    code, _, err = _extract(capsys, manifest, tmp_path / "s", "--model", "unigradicon", "--taps", "A.enc.0",
                            "--weights", str(unet))
    assert code == 2 and "made for model 'unet3d', not 'unigradicon'" in err and _one_line(err)
    anonymous = _checkpoint(tmp_path / "old.safetensors", None, {"in_channels": 1, "channels": [4, 8]})
    code, _, err = _extract(capsys, manifest, tmp_path / "s", "--model", "swin_unetr_encoder", "--taps", "0",
                            "--weights", str(anonymous))
    assert code == 2 and "does not fit model 'swin_unetr_encoder'" in err and _one_line(err)


def test_rerun_with_items_still_failed_exits_3_and_says_so(manifest, tmp_path, capsys):
    bad = manifest.parent / "manifest_with_a_missing_scan.csv"  # beside the scans: relative paths hold
    bad.write_text(manifest.read_text() + "X,baseline,nowhere.nii.gz" + "," * 8 + "\n")
    args = ("--model", "tiny3d_test", "--taps", "conv1", "--random-init")
    code, out, _ = _extract(capsys, bad, tmp_path / "s", *args)
    assert code == 3
    code, out, _ = _extract(capsys, bad, tmp_path / "s", *args)
    assert code == 3 and "1 item(s) failed in an earlier run and remain failed" in out


def test_store_info_marks_random_weights_and_sizes(manifest, tmp_path, capsys):
    _extract(capsys, manifest, tmp_path / "s", "--model", "tiny3d_test", "--taps", "conv1", "--random-init")
    code, out, _ = run_medfeat(capsys, "store", "info", str(tmp_path / "s"))
    assert code == 0 and "RANDOM WEIGHTS" in out and "KiB" in out and "0 failed items" in out


@contextlib.contextmanager
def _tmpfs(where: Path, size: str):
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_is_one_line(manifest, tmp_path, capsys):
    with _tmpfs(tmp_path / "small", "96k") as mnt:
        code, _, err = _extract(capsys, manifest, mnt / "s", "--model", "tiny3d_test", "--taps", "conv1,conv2",
                                "--random-init", "--chunk-items", "1")
        assert code == 2 and "no space left on the device" in err and _one_line(err), err


def test_a_read_only_store_reads_and_refuses_writes_in_one_line(manifest, tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "32m") as mnt:
        store = mnt / "s"
        code, _, err = _extract(capsys, manifest, store, "--model", "tiny3d_test", "--taps", "conv1", "--random-init")
        assert code == 0, err
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)]).returncode == 0
        code, out, err = run_medfeat(capsys, "store", "info", str(store))
        assert code == 0 and "done" in out, err
        code, out, err = run_medfeat(capsys, "store", "verify", str(store))
        assert code == 0 and out.strip().endswith("ok"), out + err
        labels = tmp_path / "labels.csv"
        labels.write_text(manifest.read_text())
        code, out, err = run_medfeat(capsys, "probe", "train", "--store", str(store), "--labels", str(manifest),
                                  "--target", "label", "--features", "tiny3d_test:conv1", "--folds", "2",
                                  "--seeds", "1", "--n-boot", "10")
        assert "Traceback" not in err and "read-only" not in err
        code, _, err = _extract(capsys, manifest, store, "--model", "tiny3d_test", "--taps", "conv2",
                                "--random-init")
        assert code == 2 and "read-only file system" in err and _one_line(err), err

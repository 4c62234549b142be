"""CLI: medfeat extract and medfeat store info / verify / export, errors as one line."""
from __future__ import annotations

import subprocess
import sys

import _tiny_backbone  # noqa: E402,F401
import pytest
from _cohort import tiny_cohort  # noqa: E402
from cli_run import run_medfeat


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return tiny_cohort(tmp_path_factory)


def test_extract_then_store_commands(manifest, tmp_path, capsys):
    store = str(tmp_path / "s.zarr")
    code, out, err = run_medfeat(capsys, "extract", "--random-init", "--manifest", str(manifest), "--store", store,
                              "--model", "tiny3d_test", "--taps", "conv1,conv2", "--scheduler-kind", "sync",
                              "--variant", "oracle", "--roi", "crop", "--quiet")
    assert code == 0, err
    assert "--variant is deprecated" in err  # the old name of --align still works, and says so
    assert "6 done now" in out and "infer" in out and "write" in out
    code, out, _ = run_medfeat(capsys, "store", "info", store)
    assert code == 0 and "tiny3d_test:conv2:oracle-crop" in out and "done      6" in out
    # the crop around labels 3,4 only is another preprocessing: the store refuses to mix them
    code, out, err = run_medfeat(capsys, "extract", "--random-init", "--manifest", str(manifest), "--store", store,
                              "--model", "tiny3d_test", "--taps", "conv1", "--scheduler-kind", "sync",
                              "--align", "oracle", "--roi", "crop", "--roi-labels", "3,4", "--quiet")
    assert code == 2 and "provenance differs" in err and "'roi_labels': [3, 4]" in err, err
    code, out, _ = run_medfeat(capsys, "store", "verify", store)
    assert code == 0 and out.strip().endswith("ok")
    code, out, _ = run_medfeat(capsys, "store", "export", store, "--format", "parquet", "--out", str(tmp_path / "pq"))
    assert code == 0 and len(list((tmp_path / "pq").glob("*.parquet"))) == 2


def test_failed_items_exit_code(manifest, tmp_path, capsys):
    bad = tmp_path / "m.csv"
    bad.write_text(manifest.read_text().splitlines()[0] + "\nX,baseline,nowhere.nii.gz" + "," * 8 + "\n")
    code, out, err = run_medfeat(capsys, "extract", "--random-init", "--manifest", str(bad), "--store", str(tmp_path / "s"),
                              "--model", "tiny3d_test", "--taps", "conv1", "--scheduler-kind", "sync", "--quiet")
    assert code == 3 and "X/baseline" in out and "file not found" in out


@pytest.mark.parametrize("args, message", [
    (["--model", "nope", "--taps", "a"], "unknown model 'nope'"),
    (["--model", "tiny3d_test", "--taps", "conv9"], "unknown tap 'conv9'"),
    (["--model", "tiny3d_test", "--taps", "conv1", "--roi", "crop", "--roi-labels", "3,x"], "--roi-labels '3,x'"),
])
def test_user_errors_are_one_line(manifest, tmp_path, capsys, args, message):
    code, out, err = run_medfeat(capsys, "extract", "--random-init", "--manifest", str(manifest), "--store", str(tmp_path / "s"),
                              "--scheduler-kind", "sync", *args)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_manifest_one_line_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from medfeat.cli import main; main()", "extract", "--random-init", "--manifest", str(tmp_path / "no.csv"),
                        "--store", str(tmp_path / "s"), "--model", "x", "--taps", "a"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "manifest not found" in r.stderr and "Traceback" not in r.stderr


def test_cohort_ingest_cli(manifest, tmp_path, capsys):
    out = tmp_path / "cohort.zarr"
    code, stdout, err = run_medfeat(capsys, "cohort", "ingest", str(manifest), "--out", str(out), "--codec", "blosc")
    assert code == 0, err
    assert (out / "manifest.csv").is_file() and (out / "scans" / "S0000" / "baseline" / "0" / "zarr.json").is_file()


def test_verify_finds_a_flipped_bit_and_repair_plus_rerun_restore_the_store(manifest, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    args = ("extract", "--random-init", "--manifest", str(manifest), "--store", str(store), "--model",
            "tiny3d_test", "--taps", "conv1", "--scheduler-kind", "sync", "--chunk-items", "2", "--quiet")
    assert run_medfeat(capsys, *args)[0] == 0
    chunk = store / "features" / "tiny3d_test" / "conv1" / "none-whole" / "data" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(bytes(raw))
    code, out, _ = run_medfeat(capsys, "store", "verify", str(store))
    assert code == 1 and "chunk 1 (items 2..3): unreadable" in out
    code, _, err = run_medfeat(capsys, "probe", "train", "--store", str(store), "--labels", str(manifest), "--target",
                            "label", "--features", "tiny3d_test:conv1")
    assert code == 2 and "unreadable chunk" in err and "store verify" in err and "Traceback" not in err
    code, out, _ = run_medfeat(capsys, "store", "repair", str(store))
    assert code == 0 and "2 item(s) with damaged features un-marked" in out
    code, out, _ = run_medfeat(capsys, *args)
    assert code == 0 and "2 done now" in out
    code, out, _ = run_medfeat(capsys, "store", "verify", str(store))
    assert code == 0 and out.strip().endswith("ok")

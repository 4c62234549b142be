"""Stores survive any interruption of their creation, and damage is found, not read as numbers."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medfeat.engine.store import feature_store as fsmod
from medfeat.engine.store.feature_store import ArrayKey, FeatureStore
from medfeat.engine.store.verify import repair_store, verify_store
from medfeat.errors import StoreError

KEY = ArrayKey("m", "t", "none-whole")
PROV = {"model": "m", "tap": "t", "dim": 3, "preprocessing": {"variant": "none-whole"}}
STORE_STEPS = ["group", *[f"items/{c}" for c in fsmod.ITEM_COLUMNS], "publish items", "publish"]
ARRAY_STEPS = ["array group", "array data", "array done", "publish array"]


class Interrupt(Exception):
    pass


def _fail_at(step: str, error: BaseException):
    def hook(name: str) -> None:
        if name == step:
            raise error
    return hook


def _items(s: FeatureStore, n: int = 4) -> None:
    s.add_items({"item_id": f"S{i}"} for i in range(n))


@pytest.fixture(autouse=True)
def _no_hook(monkeypatch):
    monkeypatch.setattr(fsmod, "fault_hook", None)


@pytest.mark.parametrize("step", STORE_STEPS)
@pytest.mark.parametrize("error", [Interrupt("killed"), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["interrupt", "disk-full"])
def test_store_creation_interrupted_at_any_step_leaves_nothing_or_a_whole_store(tmp_path, monkeypatch, step, error):
    path = tmp_path / "s.zarr"
    monkeypatch.setattr(fsmod, "fault_hook", _fail_at(step, error))
    with pytest.raises((Interrupt, StoreError)) as info:
        FeatureStore.create(path)
    if isinstance(error, OSError):
        assert "no space left on the device" in str(info.value)
    monkeypatch.setattr(fsmod, "fault_hook", None)
    if step == "publish":  # the hook ran after the rename: the store exists, whole
        s = FeatureStore.open(path, mode="a")
    else:
        with pytest.raises(StoreError, match="not a feature store"):
            FeatureStore.open(path)  # nothing published
        s = FeatureStore.create(path)  # the next run recovers
    _items(s)
    s.ensure_array(KEY, 3, PROV)
    s.write(KEY, [0, 1], np.ones((2, 3), np.float32))
    assert verify_store(s).ok and FeatureStore.open(path).read(KEY)[0] == ["S0", "S1"]
    assert not list(path.glob(f"{fsmod.STAGING_PREFIX}*"))


@pytest.mark.parametrize("step", ARRAY_STEPS)
@pytest.mark.parametrize("error", [Interrupt("killed"), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["interrupt", "disk-full"])
def test_array_creation_interrupted_at_any_step_leaves_no_half_array(tmp_path, monkeypatch, step, error):
    s = FeatureStore.create(tmp_path / "s.zarr")
    _items(s)
    monkeypatch.setattr(fsmod, "fault_hook", _fail_at(step, error))
    with pytest.raises((Interrupt, StoreError)):
        s.ensure_array(KEY, 3, PROV)
    monkeypatch.setattr(fsmod, "fault_hook", None)
    reopened = FeatureStore.open(s.path, mode="a")
    assert reopened.arrays() == ([KEY] if step == "publish array" else [])
    reopened.ensure_array(KEY, 3, PROV)  # same provenance: accepted, whatever happened before
    reopened.write(KEY, [2], np.ones((1, 3), np.float32))
    assert verify_store(reopened).ok


def test_a_half_made_array_of_an_older_version_is_recovered(tmp_path):
    s = FeatureStore.create(tmp_path / "s.zarr")
    _items(s)
    s.group.require_group(KEY.path)  # a group without data, done or provenance
    assert any("half-made" in p for p in verify_store(s).problems)
    assert repair_store(s) == [f"{KEY}: removed a half-made array"]
    s.ensure_array(KEY, 3, PROV)
    assert verify_store(s).ok


def test_store_killed_for_real_while_being_created_recovers(tmp_path):
    """SIGKILL from inside the creation (not an exception): the next create starts clean."""
    path = tmp_path / "s.zarr"
    code = (f"import os, signal\nfrom medfeat.engine.store import feature_store as f\n"
            f"f.fault_hook = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == 'publish items' else None\n"
            f"f.FeatureStore.create({str(path)!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert (path / "items").is_dir() and not (path / "zarr.json").exists()
    s = FeatureStore.create(path)
    _items(s, 2)
    assert s.items()["item_id"].tolist() == ["S0", "S1"]


def test_interrupted_item_registration_is_evened_out(tmp_path):
    s = FeatureStore.create(tmp_path / "s.zarr")
    _items(s, 3)
    s.group["items/item_id"].resize((5,))  # as if killed after growing one column
    assert len(s.items()) == 3
    idx = s.add_items([{"item_id": "S9"}])
    assert idx.tolist() == [3] and s.items()["item_id"].tolist() == ["S0", "S1", "S2", "S9"]


def _flip_a_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_a_chunk_is_caught_by_verify_and_by_reads(tmp_path):
    s = FeatureStore.create(tmp_path / "s.zarr", chunk_items=2)
    _items(s, 4)
    s.ensure_array(KEY, 3, PROV)
    s.write(KEY, [0, 1, 2, 3], np.arange(12, dtype=np.float32).reshape(4, 3) + 1)
    _flip_a_bit(s.path / KEY.path / "data" / "c" / "1" / "0")
    report = verify_store(s)
    assert len(report.problems) == 1 and "chunk 1 (items 2..3): unreadable" in report.problems[0]
    with pytest.raises(StoreError, match="unreadable chunk.*store verify"):
        FeatureStore.open(s.path).read(KEY)
    assert "2 item(s) with damaged features un-marked" in repair_store(s)[0]
    ids, x = s.read(KEY)
    assert ids == ["S0", "S1"] and verify_store(s).ok


def test_a_missing_or_truncated_chunk_gives_one_line(tmp_path):
    s = FeatureStore.create(tmp_path / "s.zarr", chunk_items=2)
    _items(s, 4)
    s.ensure_array(KEY, 3, PROV)
    s.write(KEY, [0, 1, 2, 3], np.ones((4, 3), np.float32))
    chunk = s.path / KEY.path / "data" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:7])
    with pytest.raises(StoreError, match="unreadable chunk"):
        s.read(KEY)
    chunk.unlink()
    assert any("chunk file missing" in p for p in verify_store(s).problems)
    with pytest.raises(StoreError, match="no finite features"):
        s.read(KEY)


def test_failed_items_are_counted_once_whatever_the_arrays(tmp_path):
    s = FeatureStore.create(tmp_path / "s.zarr")
    _items(s)
    s.record_failures([{"array": a, "item_id": "S1", "reason": "x"} for a in ("m:a:v", "m:b:v")])
    assert s.info()["failed_items"] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_disk_leaves_a_usable_store(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        s = FeatureStore.create(mnt / "s.zarr", chunk_items=512)
        s.add_items({"item_id": f"S{i}"} for i in range(512))
        with pytest.raises(StoreError, match="no space left on the device"):
            for j in range(100):  # arrays until the disk is full
                s.ensure_array(ArrayKey("m", f"t{j}", "none-whole"), 256, {**PROV, "tap": f"t{j}", "dim": 256})
                s.write(ArrayKey("m", f"t{j}", "none-whole"), range(512), np.random.default_rng(j).normal(size=(512, 256)))
        again = FeatureStore.open(s.path)  # whatever write failed, the store reads and verifies
        assert verify_store(again, check_sources=False).ok
        for key in again.arrays():
            again.read(key)
    finally:
        subprocess.run(["umount", str(mnt)])

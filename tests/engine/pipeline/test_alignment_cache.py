"""Estimated alignments are remembered per process: each follow-up is registered once for all
models of an experiment, and again when its file changes."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from _cohort import tiny_cohort

from medfeat.engine.pipeline import inputs
from medfeat.engine.pipeline.config import Variant
from medfeat.engine.pipeline.items import Atlas, plan_items
from medfeat.io.manifest import read_manifest


@pytest.fixture()
def counted(monkeypatch):
    calls: list[int] = []
    real = inputs.align

    def counting(moving, *args, **kwargs):
        calls.append(len(moving))
        return real(moving, *args, **kwargs)

    monkeypatch.setattr(inputs, "align", counting)
    inputs.ALIGNMENTS.clear()
    yield calls
    inputs.ALIGNMENTS.clear()


def _rigid_items(manifest, kind: str):
    items, bad = plan_items(read_manifest(manifest), kind, Variant("rigid", "whole"), Atlas())
    assert not bad
    return items


def test_each_followup_is_registered_once_for_every_model(tmp_path_factory, counted):
    manifest = tiny_cohort(tmp_path_factory)
    scans = _rigid_items(manifest, "volume3d")  # per-scan model: follow-ups to their baselines
    pairs = _rigid_items(manifest, "pair3d")  # pair model: the same follow-ups, as moving channels
    first, failed = inputs.align_batch(scans, inputs.ScanCache())
    assert not failed and counted == [3] and len(first) == 3
    again, _ = inputs.align_batch(pairs, inputs.ScanCache())
    assert counted == [3]  # nothing registered again
    by_path = {it.channels[0].path: m for it in scans for (iid, _), m in first.items() if iid == it.item_id}
    for it in pairs:
        np.testing.assert_array_equal(again[(it.item_id, 0)], by_path[it.channels[0].path])


def test_a_changed_file_is_registered_again(tmp_path_factory, tmp_path, counted):
    shared = tiny_cohort(tmp_path_factory).parent
    manifest = shutil.copytree(shared, tmp_path / "cohort") / "manifest.csv"  # a copy to touch
    items = _rigid_items(manifest, "pair3d")
    inputs.align_batch(items, inputs.ScanCache())
    moving = items[0].channels[0].path
    stat = os.stat(moving)
    os.utime(moving, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    inputs.align_batch(items, inputs.ScanCache())
    assert counted == [3, 1]

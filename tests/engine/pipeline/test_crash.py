"""Crash safety: SIGKILL an extraction part-way, rerun, and get the uninterrupted store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import zarr
from _cohort import tiny_cohort  # noqa: E402

HERE = Path(__file__).parents[2] / "helpers"

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    import _tiny_backbone
    from medfeat.engine.pipeline.config import ExtractConfig
    from medfeat.engine.pipeline.extract import extract
    extract(ExtractConfig.from_settings({manifest!r}, {store!r}, "tinyslow_test", ("conv1", "conv2"), random_init=True,
                          scheduler_kind="sync", batch_size=2, chunk_items=2, progress=False))
""")


def _run(manifest: Path, store: Path) -> subprocess.Popen:
    code = SCRIPT.format(here=str(HERE), manifest=str(manifest), store=str(store))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _done(store: Path) -> int:
    try:
        return int(np.asarray(zarr.open_array(str(store / "features/tinyslow_test/conv2/none-whole/done"), mode="r")[:]).sum())
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def test_sigkill_then_resume_equals_uninterrupted(tmp_path_factory, tmp_path):
    manifest = tiny_cohort(tmp_path_factory)
    killed, clean = tmp_path / "killed.zarr", tmp_path / "clean.zarr"
    proc = _run(manifest, killed)
    deadline = time.time() + 120
    while _done(killed) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < _done(killed) < 6  # killed part-way
    # resume and the reference run in this process (same code; saves two interpreter starts)
    import _tiny_backbone  # noqa: F401

    from medfeat.engine.pipeline.config import ExtractConfig
    from medfeat.engine.pipeline.extract import extract

    for store in (killed, clean):
        extract(ExtractConfig.from_settings(str(manifest), str(store), "tinyslow_test", ("conv1", "conv2"), random_init=True,
                              scheduler_kind="sync", batch_size=2, chunk_items=2, progress=False))
    a, b = zarr.open_group(str(killed), mode="r"), zarr.open_group(str(clean), mode="r")
    for col in ("item_id", "subject", "source"):
        np.testing.assert_array_equal(a[f"items/{col}"][:], b[f"items/{col}"][:])
    ids = a["items/item_id"][:]
    assert len(set(ids.tolist())) == len(ids) == 6  # nothing doubled, nothing missing
    for tap in ("conv1", "conv2"):
        for name in ("data", "done"):
            x = a[f"features/tinyslow_test/{tap}/none-whole/{name}"][:]
            y = b[f"features/tinyslow_test/{tap}/none-whole/{name}"][:]
            assert np.array_equal(x, y)  # bit for bit on the CPU
        assert a[f"features/tinyslow_test/{tap}/none-whole/done"][:].all()

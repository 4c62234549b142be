"""The Dask LocalCluster path: same features as the in-process run, one model per worker."""
from __future__ import annotations

import _tiny_backbone  # noqa: E402,F401
import numpy as np
import pytest
from _cohort import tiny_cohort  # noqa: E402

from medfeat.engine.pipeline.config import ClusterConfig, ExtractConfig  # noqa: E402
from medfeat.engine.pipeline.executors import SyncExecutor, make_executor  # noqa: E402
from medfeat.engine.pipeline.extract import extract  # noqa: E402
from medfeat.engine.pipeline.worker import model_builds  # noqa: E402
from medfeat.engine.store.feature_store import FeatureStore  # noqa: E402


def _cfg(manifest, store, **kw):
    base = dict(batch_size=2, chunk_items=2, progress=False, modules=("_tiny_backbone",), random_init=True)
    return ExtractConfig.from_settings(str(manifest), str(store), "tiny3d_test", ("conv2",), **{**base, **kw})


@pytest.mark.timeout(300)
def test_local_cluster_matches_sync_and_builds_once_per_worker(tmp_path_factory, tmp_path):
    manifest = tiny_cohort(tmp_path_factory)
    # One worker process: starting each costs seconds (spawn, import torch) on a shared CI box.
    ex = make_executor(ClusterConfig("local", workers=1, threads_per_worker=2, memory_limit="3GB"))
    try:
        r = extract(_cfg(manifest, tmp_path / "dask", scheduler_kind="local", workers=1), executor=ex)
        # a second run joins the same cluster by address (--scheduler tcp://...)
        r2 = extract(_cfg(manifest, tmp_path / "joined", scheduler=ex.client.scheduler.address))
        builds = ex.client.run(model_builds)
    finally:
        ex.close()
    assert r.items.done == 6 and r.scheduler.startswith("dask")
    assert r2.items.done == 6 and r2.scheduler.startswith("dask")
    assert list(builds.values()) == [1]  # 6 batches, 2 runs, 1 model: built once per worker
    extract(_cfg(manifest, tmp_path / "sync", scheduler_kind="sync"), executor=SyncExecutor())
    ia, xa = FeatureStore.open(tmp_path / "dask").read("tiny3d_test:conv2:none-whole")
    ib, xb = FeatureStore.open(tmp_path / "sync").read("tiny3d_test:conv2:none-whole")
    assert ia == ib
    np.testing.assert_allclose(xa, xb, rtol=1e-5, atol=1e-6)


def test_window_bounds_in_flight_batches(tmp_path_factory, tmp_path):
    """The driver never has more than ``window`` batches submitted and unfinished."""
    manifest = tiny_cohort(tmp_path_factory)

    class Counting(SyncExecutor):
        slots = 1
        live = peak = 0

        def submit(self, fn, *args):
            Counting.live += 1
            Counting.peak = max(Counting.peak, Counting.live)
            return super().submit(fn, *args)

        def wait_first(self, futures):
            done, pending = super().wait_first(futures)
            Counting.live -= len(done)
            return done, pending

    extract(_cfg(manifest, tmp_path / "w", window=2, batch_size=1), executor=Counting())
    assert Counting.peak == 2


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_cuda_workers_match_cpu(tmp_path_factory, tmp_path):
    """``--device cuda`` on the default scheduler: dask-cuda's LocalCUDACluster (one worker per
    GPU) when installed, else a plain LocalCluster; features equal the CPU run's (fp32)."""
    pytest.importorskip("dask_cuda")
    manifest = tiny_cohort(tmp_path_factory)
    ex = make_executor(ClusterConfig("local", threads_per_worker=2), device="cuda")
    try:
        assert type(ex.cluster).__name__ == "LocalCUDACluster"
        r = extract(_cfg(manifest, tmp_path / "cuda", scheduler_kind="local", device="cuda"), executor=ex)
    finally:
        ex.close()
    assert r.items.done == 6
    extract(_cfg(manifest, tmp_path / "cpu", scheduler_kind="sync"), executor=SyncExecutor())
    ia, xa = FeatureStore.open(tmp_path / "cuda").read("tiny3d_test:conv2:none-whole")
    ib, xb = FeatureStore.open(tmp_path / "cpu").read("tiny3d_test:conv2:none-whole")
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(xa, xb, rtol=1e-4, atol=1e-5)  # cuDNN vs CPU convolutions, fp32

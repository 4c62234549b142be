"""--runtime auto: measured choice, cached timings, export cost counted against the cohort."""
from __future__ import annotations

import pytest

from medfeat.export.backbones.registry import create_backbone
from medfeat.export.runtimes import auto


@pytest.fixture()
def backbone():
    return create_backbone("unet3d", ["bottom"], tiny=True)


def test_a_small_cohort_does_not_pay_for_an_export(backbone, tmp_path):
    choice = auto.choose_runtime(backbone, device="cpu", precision="fp32", input_size=(16, 16, 16),
                                 batch_size=2, n_items=4, cache_dir=tmp_path)
    assert choice.name == "eager" and set(choice.seconds_per_item) == {"eager"}
    assert "onnxruntime not exported" in choice.reason
    assert not list(tmp_path.rglob("*.onnx"))


def test_a_large_cohort_measures_both_and_caches_the_timings(backbone, tmp_path, monkeypatch):
    choice = auto.choose_runtime(backbone, device="cpu", precision="fp32", input_size=(16, 16, 16),
                                 batch_size=2, n_items=10**9, cache_dir=tmp_path)
    assert set(choice.seconds_per_item) == {"eager", "onnxruntime"}
    fastest = min(choice.seconds_per_item, key=choice.seconds_per_item.get)
    assert choice.name == fastest and choice.runtime is not None and choice.name in choice.reason
    calls = []
    monkeypatch.setattr(auto, "_measure", lambda *a: calls.append(a) or 1.0)
    again = auto.choose_runtime(backbone, device="cpu", precision="fp32", input_size=(16, 16, 16),
                                batch_size=2, n_items=10**9, cache_dir=tmp_path)
    assert calls == [] and again.seconds_per_item == choice.seconds_per_item  # read from the cache
    other_batch = auto.choose_runtime(backbone, device="cpu", precision="fp32", input_size=(16, 16, 16),
                                      batch_size=3, n_items=10**9, cache_dir=tmp_path)
    assert len(calls) == 4 and other_batch.seconds_per_item == {"eager": 1.0, "onnxruntime": 1.0}
    assert sorted(c[-1] for c in calls) == [1, 1, 3, 3]  # each runtime at 1 and at 3 items per call


def test_one_item_per_call_is_kept_when_it_is_faster_per_item(backbone, tmp_path, monkeypatch):
    """A 3D model whose batches outgrow the caches: auto measures one item per call too."""
    monkeypatch.setattr(auto, "_measure", lambda runtime, bb, size, batch: 1.0 if batch == 1 else 2.0)
    choice = auto.choose_runtime(backbone, device="cpu", precision="fp32", input_size=(16, 16, 16),
                                 batch_size=4, n_items=4, cache_dir=tmp_path)
    assert choice.name == "eager" and choice.micro_batch == 1 and "1 item(s) per call" in choice.reason
    cached = auto.choose_runtime(backbone, device="cpu", precision="fp32", input_size=(16, 16, 16),
                                 batch_size=4, n_items=4, cache_dir=tmp_path)
    assert cached.micro_batch == 1  # from the cached record


def test_micro_batched_runtime_splits_batches_and_joins_outputs():
    import numpy as np
    import torch

    from medfeat.export.runtimes.factory import MicroBatched

    sizes = []

    class Doubling:
        name = "eager"

        def __call__(self, x):
            sizes.append(len(x))
            return {"t": x.numpy().reshape(len(x), -1) * 2}

    x = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    out = MicroBatched(Doubling(), 2)(x)
    assert sizes == [2, 2, 1] and out["t"].shape == (5, 6)
    np.testing.assert_array_equal(out["t"], x.numpy() * 2)


def test_extract_resolves_auto_and_says_why(tmp_path, monkeypatch):
    import _tiny_backbone  # noqa: F401
    from _cohort import tiny_cohort  # noqa: F401

    from medfeat.cohorts.synth import synth_cohort
    from medfeat.engine.pipeline.config import ExtractConfig
    from medfeat.engine.pipeline.extract import extract
    from medfeat.engine.store.feature_store import FeatureStore

    monkeypatch.setenv("MEDFEAT_CACHE", str(tmp_path / "cache"))
    manifest = synth_cohort(tmp_path / "c", subjects=2, seed=0, shape=(16, 16, 16))
    r = extract(ExtractConfig.from_settings(str(manifest), str(tmp_path / "s"), "tiny3d_test", ["conv2"],
                                            random_init=True, scheduler_kind="sync", progress=False))
    assert r.config["model"]["runtime"] == "eager" and r.notes[-1].startswith("runtime auto: eager")
    store = FeatureStore.open(tmp_path / "s")
    assert store.provenance(store.arrays()[0])["runtime"] == "eager"

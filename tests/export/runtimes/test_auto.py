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
    assert len(calls) == 2 and other_batch.seconds_per_item == {"eager": 1.0, "onnxruntime": 1.0}


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

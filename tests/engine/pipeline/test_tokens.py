"""Token arrays through the extraction pipeline: unpooled taps, augmented views, normed
multi-layer features, each against the backbone (or timm) run directly on the same input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medfeat.cohorts.synth_where import synth_where_cohort
from medfeat.engine.pipeline.config import ExtractConfig
from medfeat.engine.pipeline.extract import extract
from medfeat.engine.store.feature_store import ArrayKey, FeatureStore
from medfeat.engine.store.verify import verify_store
from medfeat.errors import InputError
from medfeat.export.backbones.registry import create_backbone, get_spec
from medfeat.io.readers import read_image
from medfeat.kernels.augment2d import eval_view, rule_mean_std, study_view, view_rng
from medfeat.probes.features import load_features, multi_layer_spec

MODEL, SIZE = "deit_b16", 48  # tiny DeiT: width 32, patch 16 -> a 3 x 3 grid + CLS


def _cfg(manifest, store, **kw) -> ExtractConfig:
    return ExtractConfig.from_settings(str(manifest), str(store), kw.pop("model", MODEL), kw.pop("taps", ("norm",)),
                                       tiny=True, scheduler_kind="sync", batch_size=8, progress=False, random_init=True,
                                       **kw)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return synth_where_cohort(tmp_path_factory.mktemp("where"), images=10, size=SIZE, cells=3)


@pytest.fixture(scope="module")
def store(cohort, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "s.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and does not fight busy cores
    try:
        extract(_cfg(cohort, path, input_size=(SIZE, SIZE), pooling="tokens"))
        extract(_cfg(cohort, path, input_size=(SIZE, SIZE), pooling="tokens", views=2, augment="study"))
    finally:
        torch.set_num_threads(threads)
    return path


def _inputs(cohort, views=()):
    """Model inputs of every image: the eval view, or the given augmented views."""
    df = pd.read_csv(cohort)
    mean, std = rule_mean_std(get_spec(MODEL).preprocess)
    out = []
    for item, rel in zip(df["item_id"], df["path"]):
        img = read_image(cohort.parent / rel)
        if not views:
            out.append(eval_view(img, SIZE, mean, std))
        else:
            out.append(np.stack([study_view(img, view_rng(0, item, v), SIZE, mean, std) for v in views]))
    return torch.from_numpy(np.stack(out)), list(df["item_id"])


def test_token_array_equals_the_backbone_tokens(store, cohort):
    fs = FeatureStore.open(store)
    key = ArrayKey(MODEL, "norm@tokens", "none-whole")
    ids, tokens = fs.read(key)
    assert tokens.shape == (10, 10, 32) and tokens.dtype == np.float16
    prov = fs.provenance(key)
    assert prov["tokens"]["grid"] == [3, 3] and prov["tokens"]["prefix_tokens"] == 1
    assert prov["tap"] == "norm" and prov["pooling"] == "tokens" and prov["dtype"] == "float16"
    x, order = _inputs(cohort)
    with torch.inference_mode():
        ref = create_backbone(MODEL, ["norm"], tiny=True, pooling="tokens")(x)["norm"].numpy()
    ref = ref[[order.index(i) for i in ids]]
    np.testing.assert_allclose(tokens.astype(np.float32), ref, rtol=2e-3, atol=2e-3)  # float16 rounding
    np.testing.assert_array_equal(tokens, ref.astype(np.float16))  # exactly the rounded values
    # the CLS token of the token array is the pooled feature
    pooled = create_backbone(MODEL, ["norm"], tiny=True)(x)["norm"].detach().numpy()
    np.testing.assert_allclose(tokens[:, 0].astype(np.float32), pooled[[order.index(i) for i in ids]], atol=2e-3)
    assert verify_store(fs).problems == []
    assert fs.info()["arrays"][0]["bytes"] > 0


def test_views_are_the_eval_view_then_seeded_augmentations(store, cohort):
    fs = FeatureStore.open(store)
    ids, views = fs.read(ArrayKey(MODEL, "norm@tokens-study2", "none-whole"))
    _, plain = fs.read(ArrayKey(MODEL, "norm@tokens", "none-whole"))
    assert views.shape == (10, 3, 10, 32)
    np.testing.assert_array_equal(views[:, 0], plain)  # view 0: the eval transform
    assert not np.allclose(views[:, 1], views[:, 0], atol=1e-2) and not np.allclose(views[:, 1], views[:, 2], atol=1e-2)
    x, order = _inputs(cohort, views=(1, 2))
    with torch.inference_mode():
        ref = create_backbone(MODEL, ["norm"], tiny=True, pooling="tokens")(x.flatten(0, 1))["norm"]
    ref = ref.reshape(10, 2, 10, 32).numpy()[[order.index(i) for i in ids]]
    np.testing.assert_allclose(views[:, 1:].astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    prov = fs.provenance(ArrayKey(MODEL, "norm@tokens-study2", "none-whole"))
    assert prov["views"]["count"] == 3 and prov["views"]["augment"] == "study"


@pytest.mark.parametrize("kw, message", [
    ({"views": 2, "augment": "study"}, "token arrays only"),                 # pooled tap with views
    ({"pooling": "tokens", "augment": "study"}, "go together"),              # augmentation without views
    ({"pooling": "tokens", "views": 2}, "go together"),                      # views without augmentation
    ({"pooling": "median"}, "unknown pooling 'median'"),
])
def test_view_and_pooling_mistakes_are_refused_before_work(cohort, tmp_path, kw, message):
    with pytest.raises((InputError, KeyError), match=message):
        extract(_cfg(cohort, tmp_path / "s.zarr", input_size=(SIZE, SIZE), **kw))
    assert not (tmp_path / "s.zarr" / "features").exists()


def test_multi_layer_feature_is_dinov2s_linear_input(cohort, tmp_path):
    """DINOv2's eval feature (normed CLS of the last blocks + mean of the last normed patch
    tokens) from the store equals timm's forward_intermediates(norm=True) on the same input."""
    spec, pooling = multi_layer_spec("dinov2_vitb14", depth=2, blocks=2)
    assert spec == "dinov2_vitb14:blocks.0@norm-cls+norm" and pooling == "blocks.0=norm-cls,norm=cls+mean"
    path = tmp_path / "m.zarr"
    extract(_cfg(cohort, path, model="dinov2_vitb14", taps=("blocks.0", "norm"), pooling=pooling,
                 input_size=(28, 28)))
    fs = load_features(path, spec, cohort, "label")
    assert fs.X.shape == (10, 3 * 32)
    df = pd.read_csv(cohort)
    mean, std = rule_mean_std(get_spec("dinov2_vitb14").preprocess)
    x = torch.from_numpy(np.stack([eval_view(read_image(cohort.parent / p), 28, mean, std) for p in df["path"]]))
    torch.manual_seed(0)  # the unpruned model with extraction's seeded weights
    full = get_spec("dinov2_vitb14").build(**get_spec("dinov2_vitb14").tiny_config)
    with torch.inference_mode():
        inter = full.forward_intermediates(x, indices=2, norm=True, return_prefix_tokens=True, output_fmt="NLC",
                                           intermediates_only=True)
    cls = [prefix[:, 0] for _, prefix in inter]
    ref = torch.cat(cls + [inter[-1][0].mean(1)], dim=1).numpy()
    ref = ref[[list(df["item_id"]).index(i) for i in fs.item_ids]]
    np.testing.assert_allclose(fs.X, ref, rtol=1e-5, atol=1e-5)


def test_extract_cli_views_in_bfloat16(cohort, tmp_path, capsys):
    from medfeat.cli import main

    store = tmp_path / "b.zarr"
    main(["extract", "--random-init", "--manifest", str(cohort), "--store", str(store), "--model", MODEL, "--taps", "norm",
          "--tiny", "--input-size", f"{SIZE},{SIZE}", "--pooling", "tokens", "--views", "1", "--augment", "study",
          "--token-dtype", "bfloat16", "--scheduler-kind", "sync", "--quiet"])
    capsys.readouterr()
    main(["store", "info", str(store)])
    out = capsys.readouterr().out
    assert "deit_b16:norm@tokens-study1:none-whole" in out and "2x10x32" in out and "bfloat16" in out
    _, views = FeatureStore.open(store).read(ArrayKey(MODEL, "norm@tokens-study1", "none-whole"))
    assert views.dtype == np.float32 and np.isfinite(views).all()

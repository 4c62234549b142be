"""Trained heads on stored features: the DeiT head against timm's blocks, the estimator
contract, and the position task where token heads beat the linear probe."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from timm.models.vision_transformer import VisionTransformer

from medfeat.cli import main
from medfeat.cohorts.synth_where import synth_where_cohort
from medfeat.engine.pipeline.config import ExtractConfig
from medfeat.engine.pipeline.extract import extract
from medfeat.errors import InputError, WeightsError
from medfeat.export.backbones.models.vit2d import resample_pos_embed
from medfeat.probes.evaluate import cross_validate_probe, holdout_probe
from medfeat.probes.features import column_for_items, load_features
from medfeat.probes.headfit import HeadProbe
from medfeat.probes.heads import TransformerHead, load_deit

FAST = dict(epochs=30, batch_size=16, warmup_iters=10, lr=2e-3, device="cpu")


def _deit(tmp_path):
    torch.manual_seed(3)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    path = tmp_path / "deit.pth"
    torch.save(vit.state_dict(), path)  # timm's layout, with patch_embed and head the head ignores
    return vit.eval(), path


def test_transformer_head_loads_deit_and_runs_its_blocks(tmp_path):
    vit, path = _deit(tmp_path)
    head = load_deit(TransformerHead(16, 2, (3, 3), width=32, depth=1, heads=2, base_grid=(2, 2)), str(path)).eval()
    assert torch.equal(head.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert head.weights_sha256 is not None
    x = torch.randn(4, 9, 16)
    with torch.no_grad():
        t = torch.cat([vit.cls_token.expand(4, -1, -1), head.proj(x)], 1)
        t = t + resample_pos_embed(vit.pos_embed, (3, 3), (2, 2), 1)
        ref = head.fc(vit.norm(vit.blocks[0](t))[:, 0])
        np.testing.assert_allclose(head(x).numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(WeightsError, match="shape"):
        load_deit(TransformerHead(16, 2, (3, 3), width=32, depth=1, heads=2, base_grid=(3, 3)), str(path))
    with pytest.raises(WeightsError, match="missing"):
        load_deit(TransformerHead(16, 2, (3, 3), width=32, depth=3, heads=2, base_grid=(2, 2)), str(path))


def test_head_probe_contract():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 5, 8)).astype(np.float16), np.arange(40) % 2
    probe = HeadProbe(head="attention", epochs=2, **{k: v for k, v in FAST.items() if k != "epochs"})
    with pytest.raises(NotFittedError):
        probe.predict_proba(X)
    with pytest.raises(InputError, match="tokens"):
        HeadProbe(head="attention").fit(X[:, 0], y)
    with pytest.raises(InputError, match="square grid"):
        HeadProbe(head="transformer", width=8, depth=1, heads=2, epochs=1).fit(X[:, :3], y)
    p = probe.fit(X, y).predict_proba(X)
    assert p.shape == (40, 2) and np.allclose(p.sum(1), 1) and probe.best_epoch_ in (0, 1)
    with pytest.raises(InputError, match="shape"):
        probe.predict_proba(X[:, :, :4])
    Xv = rng.normal(size=(300, 2)).astype(np.float32)
    yv = (Xv[:, 0] > 0).astype(int)
    mlp = HeadProbe(head="mlp", hidden=16, **FAST).fit(Xv[:200], yv[:200])
    assert (mlp.predict(Xv[200:]) == yv[200:]).mean() > 0.9


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    """The position task: tokens of a random tiny DeiT (3 x 3 grid + CLS) for 160 images."""
    root = tmp_path_factory.mktemp("where")
    manifest = synth_where_cohort(root / "c", images=160, size=48, cells=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(ExtractConfig.from_settings(str(manifest), str(root / "s.zarr"), "deit_b16", ("norm",), tiny=True,
                                            input_size=(48, 48), pooling="tokens", scheduler_kind="sync",
                                            batch_size=32, progress=False, random_init=True))
    finally:
        torch.set_num_threads(threads)
    return manifest, root / "s.zarr"


def test_token_heads_beat_the_linear_probe_where_position_matters(where):
    """The label is where a pattern lies; pooled features (the CLS token) barely carry it,
    the token map does: both token heads beat the linear probe, 95% CIs apart."""
    manifest, store = where
    fs = load_features(store, "deit_b16:norm@tokens", manifest, "label")
    cv = dict(n_splits=4, seeds=(0,), n_boot=300)
    linear = cross_validate_probe(fs.X[:, 0].astype(np.float32), fs.y, fs.groups, **cv)  # the pooled CLS
    lin = linear.metrics["auc"]
    assert lin["value"] < 0.7
    for head, extra in (("attention", {}), ("transformer", dict(width=32, depth=1, heads=2))):
        res = cross_validate_probe(fs.X, fs.y, fs.groups, probe=head, probe_params={**FAST, "prefix_tokens": 1,
                                                                                    **extra}, **cv)
        auc = res.metrics["auc"]
        assert auc["value"] > 0.8, (head, auc)
        assert auc["ci_low"] > lin["ci_high"], (head, auc, lin)


def test_fixed_split_heads_fit_on_train_and_select_on_val(where):
    manifest, store = where
    fs = load_features(store, "deit_b16:norm@tokens", manifest, "label")
    split = column_for_items(manifest, fs.item_ids, "split")
    res = holdout_probe(fs.X, fs.y, fs.groups, split, probe="attention",
                        probe_params={**FAST, "epochs": 5, "prefix_tokens": 1}, n_boot=50)
    fold = res.folds[0]
    assert fold["n_train"] == int((split == "train").sum()) and 0 <= fold["best_epoch"] < 5
    assert len(res.y) == int((split == "test").sum())


def test_probe_train_cli_with_heads(where, capsys):
    manifest, store = where
    args = ["probe", "train", "--store", str(store), "--labels", str(manifest), "--target", "label",
            "--split-column", "split", "--n-boot", "50", "--epochs", "3", "--batch-size", "16", "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        main(args + ["--features", "deit_b16:norm@tokens", "--head", "linear"])
    assert exc.value.code == 2 and "holds tokens" in capsys.readouterr().err
    main(args + ["--features", "deit_b16:norm@tokens", "--head", "attention"])
    out = capsys.readouterr().out
    assert "binary probe (attention)" in out and "auc" in out
    main(["store", "info", str(store)])
    assert "10x32" in capsys.readouterr().out

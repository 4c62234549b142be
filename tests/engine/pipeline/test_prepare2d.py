"""2D inputs through the kernels' fused ``prepare_images``, checked on the extraction path.

Reference (independent of the kernels): torch ``F.interpolate`` (bilinear, half-pixel,
no antialias) to torchvision's ``Resize(round(s * 256 / 224))`` size, centre crop with
torchvision's rounding, per-channel mean/std. Tolerance 1e-5 on normalised values (|x| < 3):
float32 sampling against a float64 reference.
"""
from __future__ import annotations

from pathlib import Path

import _tiny_backbone  # noqa: E402,F401 - registers tiny2d_test
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medfeat.engine.pipeline import preprocess as pp  # noqa: E402
from medfeat.engine.pipeline import worker as pl  # noqa: E402
from medfeat.engine.pipeline.config import ExtractConfig  # noqa: E402
from medfeat.engine.pipeline.extract import extract  # noqa: E402
from medfeat.engine.pipeline.items import Channel, Item  # noqa: E402
from medfeat.engine.store.feature_store import FeatureStore  # noqa: E402
from medfeat.errors import InputError, UnknownNameError  # noqa: E402
from medfeat.export.backbones.registry import _REGISTRY, register_backbone  # noqa: E402
from medfeat.export.backbones.spec import BackboneSpec, Preprocess  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # tiny2d_test's rule

if "tiny2d_first_test" not in _REGISTRY:  # the same net, built with gray="first_channel"
    register_backbone(BackboneSpec("tiny2d_first_test", "image2d", (32, 32), 3,
                                   Preprocess("mean_std", {"mean": MEAN, "std": STD}), _tiny_backbone.TAPS,
                                   build=lambda **cfg: _tiny_backbone.TinyConvNet(3, 2),
                                   tiny_config={"gray": "first_channel"}))


def reference(img: np.ndarray, s: int, mean=MEAN, std=STD, gray: str = "repeat", square: bool = False) -> np.ndarray:
    """(3, s, s) float64 model input by torch ops, from an (H, W[, C]) image."""
    x = np.asarray(img, np.float64)
    if img.dtype == np.uint8:
        x = x / 255.0
    elif img.dtype == np.uint16:
        x = x / 65535.0
    else:
        x = (x - x.min()) / (x.max() - x.min())
    x = x[:, :, None] if x.ndim == 2 else x[:, :, :3]
    t = torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
    h, w = x.shape[:2]
    r = round(s * 256 / 224)
    size = (r, int(r * w / h)) if h <= w else (int(r * h / w), r)  # torchvision Resize(int)
    if square:  # torchvision Resize((r, r)), the transfer study's
        size = (r, r)
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    top, left = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
    t = t[:, top:top + s, left:left + s].numpy()
    out = np.repeat(t, 3, axis=0) if t.shape[0] == 1 else t
    mean, std = np.resize(np.asarray(mean, float), 3), np.resize(np.asarray(std, float), 3)
    out = (out - mean[:, None, None]) / std[:, None, None]
    if gray == "first_channel" and t.shape[0] == 1:
        out[1:] = 0.0
    return out


def _images(folder: Path) -> dict[str, np.ndarray]:
    """Grey 8-bit, RGB 8-bit, grey 16-bit and float images of assorted sizes, on disk."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:1:50j, 0:1:70j]
    imgs = {
        "grey8.png": (rng.integers(0, 256, size=(40, 60))).astype(np.uint8),
        "rgb8.png": (rng.integers(0, 256, size=(70, 50, 3))).astype(np.uint8),
        "grey16.png": (65535 * (0.5 + 0.5 * np.sin(9 * xx) * np.cos(7 * yy))).astype(np.uint16),
        "float.tif": (rng.normal(size=(45, 45)) * 30 + 100).astype(np.float32),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in imgs.items():
        Image.fromarray(img).save(folder / name)
    return imgs


def _captured_inputs(model: str, items: list[Item], **settings) -> np.ndarray:
    """The batch tensor the extraction path (``run_batch``) hands to the model."""
    cfg = pl.ModelConfig(model, ("conv2",), tiny=True, **settings)
    loaded = pl.get_model(cfg)
    seen: list[np.ndarray] = []
    runtime = loaded.runtime
    loaded.runtime = lambda x: (seen.append(x.numpy().copy()), runtime(x))[1]
    try:
        res = pl.run_batch(cfg, items)
    finally:
        loaded.runtime = runtime
    assert res.failures == [] and len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("model,gray", [("tiny2d_test", "repeat"), ("tiny2d_first_test", "first_channel")])
def test_extract_path_2d_input_equals_torch_reference(tmp_path, model, gray):
    imgs = _images(tmp_path)
    items = [Item(n, n, "", "image", (Channel(str(tmp_path / n)),)) for n in imgs]
    x = _captured_inputs(model, items)
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    for row, (name, img) in zip(x, imgs.items()):
        np.testing.assert_allclose(row, reference(img, 32, gray=gray), atol=1e-5, rtol=0, err_msg=name)
    if gray == "first_channel":  # grey: channel 0 only; RGB keeps all three
        assert not x[0, 1:].any() and x[1, 1:].std() > 0.1


def test_first_channel_input_is_the_models_first_channel_mode():
    """[x, 0, 0] through the model's stem equals its ``first_channel`` convolution of x."""
    from torch import nn

    from medfeat.export.backbones.models.vit2d import enable_gray

    torch.manual_seed(0)
    holder = nn.Module()
    holder.conv = nn.Conv2d(3, 4, 3, padding=1)
    enable_gray(holder, "conv", "first_channel")
    g = torch.randn(2, 1, 8, 8)
    padded = torch.cat([g, torch.zeros(2, 2, 8, 8)], 1)
    torch.testing.assert_close(holder.conv(padded), holder.conv(g), atol=1e-6, rtol=0)


def test_prepare_image_rules_and_errors():
    img = (np.arange(30 * 40) % 256).astype(np.uint8).reshape(30, 40)
    clip = Preprocess("mean_std", {"mean": [0.48145466, 0.4578275, 0.40821073],
                                   "std": [0.26862954, 0.26130258, 0.27577711]})
    np.testing.assert_allclose(pp.prepare_image(img, (16, 16), clip),
                               reference(img, 16, clip.params["mean"], clip.params["std"]), atol=1e-5)
    np.testing.assert_allclose(pp.prepare_image(img, (16, 16), Preprocess("none")),
                               reference(img, 16, (0, 0, 0), (1, 1, 1)), atol=1e-6)
    one = pp.prepare_image(np.stack([img] * 3, -1), (16, 16), clip, 1)  # one-channel model: RGB mean
    np.testing.assert_allclose(one[0], reference(img, 16, clip.params["mean"], clip.params["std"])[0], atol=1e-5)
    with pytest.raises(InputError, match="square"):
        pp.prepare_image(img, (16, 24), clip)
    with pytest.raises(UnknownNameError, match="gray mode"):
        pp.prepare_image(img, (16, 16), clip, gray="average")
    with pytest.raises(UnknownNameError, match="zscore"):
        pp.prepare_image(img, (16, 16), Preprocess("zscore"))
    with pytest.raises(InputError, match="2D image"):
        pp.prepare_image(np.zeros((4, 4, 2), np.uint8), (16, 16), clip)


def test_resnet50_tiny_on_synthetic_2d_set(tmp_path):
    from medfeat.cohorts.synth2d import synth2d_cohort

    manifest = synth2d_cohort(tmp_path / "c2d", images=6, size=64)
    cfg = ExtractConfig.from_settings(str(manifest), str(tmp_path / "s"), "resnet50", ("layer1",), tiny=True,
                        input_size=(32, 32), scheduler_kind="sync", batch_size=4, progress=False,
                                      random_init=True)
    rec = extract(cfg)
    assert rec.items.done == 6 and rec.items.failed == 0
    ids, feats = FeatureStore.open(tmp_path / "s").read("resnet50:layer1:none-whole")
    assert feats.shape == (6, 32) and np.isfinite(feats).all()
    # the same features from the torch-reference inputs through the same model
    import pandas as pd

    df = pd.read_csv(manifest)
    paths = {str(r.item_id): Path(manifest).parent / r.path for r in df.itertuples()}
    ref = np.stack([reference(np.asarray(Image.open(paths[i])), 32) for i in ids]).astype(np.float32)
    model = pl.get_model(cfg.model)
    np.testing.assert_allclose(feats, model.runtime(torch.from_numpy(ref))["layer1"], atol=1e-4, rtol=1e-4)


def test_transfer_study_input_dataset_mean_std_square_resize_first_channel(tmp_path):
    """The transfer study's eval input: Resize((256, 256)) then CenterCrop(224) (here 32 of
    round(32 * 256 / 224)), ToTensor, Normalize with the dataset's own statistics (CheXpert's
    0.503 / 0.292 for grey images, APTOS2019's per channel for colour), grey through the first
    channel's weights only: the dataset's statistics replace the model's rule."""
    imgs = _images(tmp_path)
    items = [Item(n, n, "", "image", (Channel(str(tmp_path / n)),)) for n in imgs]
    for mean, std in (((0.503,), (0.292,)), ((0.415, 0.221, 0.073), (0.275, 0.150, 0.081))):
        x = _captured_inputs("tiny2d_test", items, gray="first_channel", resize="square", mean_std=(mean, std))
        for row, (name, img) in zip(x, imgs.items()):
            expected = reference(img, 32, mean, std, gray="first_channel", square=True)
            np.testing.assert_allclose(row, expected, atol=1e-5, rtol=0, err_msg=name)
            assert not np.allclose(row, reference(img, 32, gray="first_channel", square=True), atol=1e-3)
    assert not x[0, 1:].any()  # grey: channel 0 only


def test_dataset_mean_std_is_recorded_in_the_provenance(tmp_path):
    from medfeat.cohorts.synth2d import synth2d_cohort

    manifest = synth2d_cohort(tmp_path / "c2d", images=4, size=40)
    settings = dict(tiny=True, input_size=(32, 32), scheduler_kind="sync", batch_size=4, progress=False,
                    random_init=True)
    cfg = ExtractConfig.from_settings(str(manifest), str(tmp_path / "s"), "resnet50", ("layer1",),
                                      mean_std="0.415,0.221,0.073/0.275,0.150,0.081", resize="square",
                                      gray="first_channel", **settings)
    assert cfg.model.mean_std == ((0.415, 0.221, 0.073), (0.275, 0.150, 0.081))
    extract(cfg)
    store = FeatureStore.open(tmp_path / "s")
    prov = store.provenance(next(k for k in store.arrays() if k.tap == "layer1"))
    assert prov["preprocessing"]["intensity"] == {"rule": "mean_std", "source": "dataset", "params": {
        "mean": [0.415, 0.221, 0.073], "std": [0.275, 0.150, 0.081]}}
    assert "both sides" in prov["preprocessing"]["interpolation"]
    assert prov["config"]["gray"] == "first_channel"
    # the model's own rule stays as it was recorded before (no "source" key): old stores resume
    default = ExtractConfig.from_settings(str(manifest), str(tmp_path / "d"), "resnet50", ("layer1",), **settings)
    extract(default)
    store = FeatureStore.open(tmp_path / "d")
    prov = store.provenance(next(k for k in store.arrays() if k.tap == "layer1"))
    assert prov["preprocessing"]["intensity"] == {"rule": "mean_std", "params": {
        "mean": list(MEAN), "std": list(STD)}}
    with pytest.raises(InputError, match="MEAN/STD"):
        ExtractConfig.from_settings(str(manifest), "s", "resnet50", ("layer1",), mean_std="0.5")
    with pytest.raises(InputError, match="positive"):
        ExtractConfig.from_settings(str(manifest), "s", "resnet50", ("layer1",), mean_std="0.5/0")
    with pytest.raises(UnknownNameError, match="resize"):
        ExtractConfig.from_settings(str(manifest), "s", "resnet50", ("layer1",), resize="crop")


def test_2d_settings_refused_for_3d_models():
    with pytest.raises(InputError, match="2D models only"):
        pl.build_model(pl.ModelConfig("unet3d", ("down.0",), tiny=True, mean_std=((0.5,), (0.2,))))

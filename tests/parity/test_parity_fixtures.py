"""Parity of the families whose upstream code installs from no package index, against
reference outputs made once by running that code (``tests/parity/make_fixtures.py``; the
fixture records the upstream repository and commit).

For each fixture the upstream module's state dict is written in the released checkpoint's
layout, loaded through ``create_backbone``, run on the fixture's inputs and compared with
upstream's outputs at every tap (relative error <= 1e-5):

* BLIP ViT (salesforce/BLIP ``models/vit.py``) from ``model_base.pth``'s layout: the whole
  BLIP under ``model``, the visual encoder as ``visual_encoder.*`` beside its momentum copy
  ``visual_encoder_m.*`` and the text encoder (both ignored); the study's feature (token 1
  after the final norm) too;
* SEEM's FocalNet (``modeling/vision/backbone/focal_dw.py``) from ``seem_focalt_v0.pt``'s
  layout (``backbone.*`` beside the pixel decoder and heads), at 64 x 64 and 70 x 90;
* DINOv2's original ``DinoVisionTransformer`` (facebookresearch/dinov2) from
  ``dinov2_vit*14_pretrain.pth``'s layout (``mask_token``; ViT-g's SwiGLU ``w12``/``w3`` and
  chunked ``blocks.C.N``), at the native grid and a resampled one (the 0.1 offset);
* DINO's ``VisionTransformer`` (facebookresearch/dino) from ``dino_vitbase16_pretrain.pth``'s
  layout, at the native grid and a resampled one.
"""
from __future__ import annotations

import pytest
import torch
from parity_common import check_taps, load_trunk, read_fixture, save_checkpoint

from medfeat.export.backbones.registry import create_backbone


def _run(trunk: torch.nn.Module, fixture, family: str) -> None:
    for key, x in fixture.inputs.items():
        with torch.no_grad():
            ours = trunk.forward_taps(x, trunk.tap_names())
        assert sorted(fixture.refs[key]) == sorted(trunk.tap_names())
        check_taps(family, ours, fixture.refs[key])


def test_blip_every_tap_equals_upstream_vit(tmp_path):
    fixture = read_fixture("blip_vitb16")
    assert fixture.meta["upstream"] == "github.com/salesforce/BLIP" and len(fixture.meta["commit"]) == 40
    build = fixture.meta["build"]
    config = {k: build[k] for k in ("img_size", "embed_dim", "depth", "num_heads")}
    gen = torch.Generator().manual_seed(0)
    momentum = {f"visual_encoder_m.{k}": v + torch.randn(v.shape, generator=gen) for k, v in fixture.state.items()}
    others = {"text_encoder.embeddings.word_embeddings.weight": torch.randn(8, 4, generator=gen),
              "itm_head.weight": torch.randn(2, 4, generator=gen)} | momentum
    state = {f"visual_encoder.{k}": v for k, v in fixture.state.items()} | others
    path = save_checkpoint(tmp_path / "model_base.pth", state, wrap="model", extra={"epoch": 19})
    _run(load_trunk("blip_vitb16", path, config=config), fixture, "blip_vitb16")
    # The study's linear-probe feature: token index 1 after the final norm (models/vit.py there
    # returns ``x[:, 1, :]``).
    backbone = create_backbone("blip_vitb16", ["norm"], weights=path, tiny=True, config=config, pooling="token1")
    x, ref = fixture.inputs["x32"], fixture.refs["x32"]["norm"]
    with torch.no_grad():
        check_taps("blip_vitb16", {"token1": backbone(x)["norm"]}, {"token1": ref[:, 1]})


def test_seem_focalnet_every_tap_equals_upstream_focal_dw(tmp_path):
    fixture = read_fixture("seem_focalt")
    build = fixture.meta["build"]
    assert build["use_postln"] and build["scaling_modulator"] and build["use_layerscale"] and build["use_conv_embed"]
    config = {"embed_dim": build["embed_dim"], "depths": tuple(build["depths"]),
              "focal_levels": tuple(build["focal_levels"]), "focal_windows": tuple(build["focal_windows"])}
    gen = torch.Generator().manual_seed(1)
    others = {"sem_seg_head.pixel_decoder.adapter_1.weight": torch.randn(4, 4, generator=gen),
              "sem_seg_head.predictor.query_feat.weight": torch.randn(2, 4, generator=gen)}
    state = {f"backbone.{k}": v for k, v in fixture.state.items()} | others
    path = save_checkpoint(tmp_path / "seem_focalt_v0.pt", state)
    trunk = load_trunk("seem_focalt", path, config=config)
    assert set(fixture.inputs) == {"x64", "x70x90"}  # a multiple of 32, and one padded at every stage
    _run(trunk, fixture, "seem_focalt")


@pytest.mark.parametrize("name,fixture_name", [("dinov2_vits14", "dinov2_hub_vits14"),
                                               ("dinov2_vitb14", "dinov2_hub_vits14"),
                                               ("dinov2_vitl14", "dinov2_hub_vits14"),
                                               ("dinov2_vitg14", "dinov2_hub_vitg14")])
def test_dinov2_every_tap_equals_original_code(tmp_path, name, fixture_name):
    fixture = read_fixture(fixture_name)
    build = fixture.meta["build"]
    assert build["interpolate_offset"] == 0.1 and not build["interpolate_antialias"]
    config = {k: build[k] for k in ("img_size", "embed_dim", "depth", "num_heads")}
    state = dict(fixture.state)
    if build["block_chunks"]:  # the chunked layout of ViT-g's training checkpoints
        assert any(k.startswith("blocks.0.0.") for k in state) and "blocks.1.1.ls1.gamma" in state
    assert "mask_token" in state  # in the released files, unused by a feature extractor
    path = save_checkpoint(tmp_path / f"{name}_pretrain.pth", state)
    trunk = load_trunk(name, path, config=config)  # the default offset is the original's 0.1
    _run(trunk, fixture, name)


def test_dino_every_tap_equals_original_code(tmp_path):
    fixture = read_fixture("dino_vitb16")
    build = fixture.meta["build"]
    config = {"img_size": build["img_size"][0], "embed_dim": build["embed_dim"], "depth": build["depth"],
              "num_heads": build["num_heads"]}
    path = save_checkpoint(tmp_path / "dino_vitbase16_pretrain.pth", fixture.state)
    _run(load_trunk("dino_vitb16", path, config=config), fixture, "dino_vitb16")

"""BLIP ViT-B/16 visual encoder (Li et al. 2022), on timm's ViT.

Checkpoint format ``blip``: the original ``model_base.pth`` (salesforce/BLIP), whose
``model`` dict holds the whole BLIP model. Only ``visual_encoder.*`` keys are kept (not
the momentum copy ``visual_encoder_m.*`` nor the text encoder). BLIP's ``models/vit.py``
is timm's ViT layout, so the keys map one to one: ``visual_encoder.cls_token``,
``visual_encoder.pos_embed`` (1, 197, 768), ``visual_encoder.patch_embed.proj.*``,
``visual_encoder.blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`` (qkv with
bias), ``visual_encoder.norm.*``; LayerNorm eps 1e-6 as in BLIP. Format ``visual_encoder``:
the same keys without the prefix (a visual encoder saved on its own).

Taps: ``blocks.0`` .. ``blocks.11`` (raw tokens) and ``norm`` (final LayerNorm). Default
pooling ``cls`` (the normed CLS token). The study's code took token index 1 after the
final norm (the first patch token, probably unintended); ``pooling="token1"`` on the
``norm`` tap reproduces it.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from medfeat.export.backbones.models.vit2d import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TappedViT,
    build_vit,
    strip_keys,
    vit_taps,
)
from medfeat.export.backbones.registry import converter_for, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TapSpec

VIT_B16: dict[str, Any] = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2)


def build_blip(*, gray: str = "repeat", **arch: Any) -> TappedViT:
    """BLIP's ViT-B/16 (qkv bias, LayerNorm eps 1e-6), random init."""
    cfg = {**VIT_B16, **arch}
    return build_vit("blip_vitb16", gray, cfg.pop("img_size"), qkv_bias=True,
                     norm_layer=partial(nn.LayerNorm, eps=1e-6), **cfg)


def blip_taps(**config: Any) -> tuple[TapSpec, ...]:
    cfg = {**VIT_B16, **config}
    return vit_taps(cfg["depth"], cfg["embed_dim"], cfg["patch_size"], prefix=1, block_pooling="cls",
                    norm_pooling="cls")


def from_blip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """BLIP ``visual_encoder.*`` keys -> timm keys (one to one); None if absent."""
    return strip_keys(state, ("visual_encoder.",))


def from_visual_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A bare visual-encoder state dict (``visual_encoder.`` already stripped); None if not one."""
    return dict(state) if "cls_token" in state and "blocks.0.attn.qkv.weight" in state else None


register_backbone(BackboneSpec(
    name="blip_vitb16",
    input_kind="image2d",
    input_size=(224, 224),
    in_channels=3,
    preprocess=Preprocess("mean_std", {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}),
    taps=blip_taps(),
    build=build_blip,
    weight_formats=("blip", "visual_encoder"),
    convert_checkpoint=converter_for({"blip": from_blip, "visual_encoder": from_visual_encoder}, "blip_vitb16"),
    tiny_config=dict(TINY),
    licence="BSD-3-Clause (salesforce/BLIP code and weights)",
    taps_for=blip_taps,
    description="BLIP ViT-B/16 visual encoder (model_base.pth); taps blocks.0-11 and norm; cls default, "
                "token1 = the study's choice (first patch token after the final norm)",
))

"""DINOv2 ViT-S/14, ViT-B/14, ViT-L/14, ViT-g/14 (Oquab et al. 2023) on timm's ViT.

Checkpoint formats:

* ``original``: the released ``dinov2_vit*14_pretrain.pth`` (facebookresearch/dinov2):
  ``cls_token``, ``pos_embed`` (1, 1 + 37*37, C), ``patch_embed.proj.*``,
  ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``,
  ``norm.*``, ``mask_token`` (dropped: used only by masked-image training). ViT-g's
  SwiGLU FFN ``mlp.w12`` (packed [x1; x2], out = w3(silu(x1) * x2)) and ``mlp.w3`` map to
  timm's packed ``mlp.fc1`` / ``mlp.fc2``; chunked blocks ``blocks.C.N.`` map to ``blocks.N.``.
* ``hf``: a Hugging Face ``Dinov2Model`` state dict, either the hub layout
  (``embeddings.*``, ``encoder.layer.N.attention.attention.{query,key,value}``,
  ``attention.output.dense``, ``layer_scale1.lambda1``, ``mlp.weights_in/weights_out``,
  ``layernorm``) or the transformers 5 layout (``attention.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``); q, k, v are concatenated into timm's ``attn.qkv``.

Taps: ``blocks.0`` .. ``blocks.{depth-1}`` (raw tokens, default pooling ``cls``) and
``norm`` (final LayerNorm on the last block; ``cls`` = the normed CLS token, the study's
linear-probe feature; ``mean`` and ``cls+mean`` also offered).
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
from timm.layers import SwiGLUPacked
from torch import nn

from medfeat.export.backbones.models.vit2d import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TappedViT,
    build_vit,
    strip_keys,
    vit_taps,
)
from medfeat.export.backbones.registry import converter_for, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TapSpec

PATCH = 14
NATIVE_IMG = 518  # released checkpoints carry a 37 x 37 position-embedding grid
# facebookresearch/dinov2's hub models resample position embeddings with this "historical
# kludge" (a scale factor of (new + 0.1) / 37); at 224 px (16 x 16 patches) it moves the
# sampled positions by up to 0.1 patch against a plain resize to 16 x 16.
INTERPOLATE_OFFSET = 0.1

VARIANTS: dict[str, dict[str, Any]] = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16),
    "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, swiglu=True),
}
TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=28)
TINY_G = dict(embed_dim=48, depth=2, num_heads=2, img_size=28)


def build_dinov2(variant: str, *, gray: str = "repeat", img_size: int = NATIVE_IMG, embed_dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None,
                 interpolate_offset: float = INTERPOLATE_OFFSET) -> TappedViT:
    """DINOv2 ``variant`` with random init; ``img_size`` sets the position-embedding grid.

    ``interpolate_offset`` 0.1 resamples the position embeddings as the original code (and
    its torch.hub models) do; 0 as Hugging Face's ``Dinov2Model`` does (see
    :func:`~medfeat.export.backbones.models.vit2d.resample_pos_embed`).
    """
    arch = dict(VARIANTS[variant])
    swiglu = arch.pop("swiglu", False)
    arch.update({k: v for k, v in dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads).items() if v is not None})
    if swiglu:
        # SwiGLU hidden width 2/3 * 4C rounded to 8 (4096 for C=1536); timm packs both halves in fc1
        arch.update(mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return build_vit(f"dinov2_{variant}", gray, img_size, interpolate_offset, patch_size=PATCH, init_values=1e-5,
                     norm_layer=partial(nn.LayerNorm, eps=1e-6), **arch)


def dinov2_taps(variant: str, **config: Any) -> tuple[TapSpec, ...]:
    arch = {**VARIANTS[variant], **{k: v for k, v in config.items() if k in ("embed_dim", "depth")}}
    return vit_taps(arch["depth"], arch["embed_dim"], PATCH, prefix=1, block_pooling="cls", norm_pooling="cls")


def from_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """facebookresearch/dinov2 keys -> timm keys; None if not that layout."""
    if "cls_token" not in state or "pos_embed" not in state:
        return None
    out = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    return out


_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_LAYER = {
    "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2", "mlp.down_proj": "mlp.fc2",
}
_HF_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
           "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_HF_GLU = {"mlp.gate_proj": 0, "mlp.up_proj": 1}


def from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Hugging Face ``Dinov2Model`` keys (hub or transformers 5 layout) -> timm keys."""
    state = strip_keys(state, ("dinov2.",)) or state
    if "embeddings.cls_token" not in state:
        return None
    out: dict[str, torch.Tensor] = {}
    packs: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.mask_token":
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        match = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", key)
        if match is None:
            out[key] = value  # left for the strict loader to report
            continue
        layer, module, param = match.groups()
        prefix = f"blocks.{layer}."
        if module in ("layer_scale1", "layer_scale2"):
            out[f"{prefix}ls{module[-1]}.gamma"] = value
        elif module in _HF_LAYER:
            out[f"{prefix}{_HF_LAYER[module]}.{param}"] = value
        elif module in _HF_QKV:
            packs.setdefault(f"{prefix}attn.qkv.{param}", {})[_HF_QKV[module]] = value
        elif module in _HF_GLU:
            packs.setdefault(f"{prefix}mlp.fc1.{param}", {})[_HF_GLU[module]] = value
        else:
            out[key] = value
    for key, parts in packs.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out


for _variant, _arch in VARIANTS.items():
    _name = f"dinov2_{_variant}"
    register_backbone(BackboneSpec(
        name=_name,
        input_kind="image2d",
        input_size=(224, 224),
        in_channels=3,
        preprocess=Preprocess("mean_std", {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}),
        taps=dinov2_taps(_variant),
        build=partial(build_dinov2, _variant),
        weight_formats=("original", "hf"),
        convert_checkpoint=converter_for({"original": from_original, "hf": from_hf}, _name),
        tiny_config=dict(TINY_G if _arch.get("swiglu") else TINY),
        licence="Apache-2.0 (facebookresearch/dinov2 code and weights)",
        taps_for=partial(dinov2_taps, _variant),
        description=f"DINOv2 {_variant[:4].upper()}/14; taps blocks.0-{_arch['depth'] - 1} and norm "
                    "(norm + cls = normed CLS, the study's feature; mean, cls+mean offered); "
                    "config gray=repeat|first_channel, img_size=pos-embed grid",
    ))

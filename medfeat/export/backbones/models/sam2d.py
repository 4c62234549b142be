"""SAM ViT-B / ViT-L / ViT-H image encoders without the neck (Kirillov et al. 2023), on timm.

Checkpoint format ``sam``: the released ``sam_vit_{b,l,h}_*.pth`` (facebookresearch/
segment-anything), a state dict of the whole ``Sam`` model. Only ``image_encoder.*``
keys are kept; ``image_encoder.neck.*`` is dropped (the study used the encoder without
its neck) as are the prompt encoder and mask decoder. ``mlp.lin1/lin2`` become timm's
``mlp.fc1/fc2``; every other key (``pos_embed`` (1, 64, 64, C), ``patch_embed.proj``,
``blocks.N.{norm1,attn.qkv,attn.proj,attn.rel_pos_h,attn.rel_pos_w,norm2}``) is unchanged.

Checkpoint format ``timm``: timm's ``samvit_{base,large,huge}_patch16.sa1b`` weights (the same
tensors under timm's names, with a neck): ``neck.*`` and ``head.*`` are dropped.

Inputs below (or above) 1024 px: the absolute position embedding is resampled to the
input's patch grid (timm's ``resample_abs_pos_embed_nhwc``: bicubic with antialiasing),
and the decomposed relative position tables of the global-attention blocks are linearly
interpolated to 2 * grid - 1 entries (as segment-anything's own ``get_rel_pos`` does).
Windowed blocks keep their 14 x 14 windows (padded at the border).

Taps: ``blocks.0`` .. ``blocks.{depth-1}``, each a (B, C, H/16, W/16) map; default pooling
``avg`` = the mean of the patch grid, the study's feature (SAM has no CLS token).
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import nn

from medfeat.export.backbones.models.vit2d import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_patch_multiple,
    enable_gray,
    strip_keys,
    tap_positions,
)
from medfeat.export.backbones.registry import converter_for, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec

if TYPE_CHECKING:
    from timm.layers import PatchEmbed

PATCH = 16
VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
TINY = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=2, global_attn_indexes=(1,))


class TappedSAM(VisionTransformerSAM, TappedModel):
    """timm's SAM ViT with medfeat taps; built with no neck and no head.

    ``forward(x)`` is timm's ``forward_features`` (its neck replaced by identity): the last
    block's (B, C, H/16, W/16) map, equal to the raw last tap.
    """

    medfeat_name: str = "sam"
    if TYPE_CHECKING:  # timm builds it through an untyped ``embed_layer`` callable
        patch_embed: PatchEmbed

    def tap_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_patch_multiple(self.medfeat_name, x, self.patch_embed.patch_size)
        return self.forward_features(x)

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        """Raw taps: (B, C, H/16, W/16) maps."""
        check_patch_multiple(self.medfeat_name, x, self.patch_embed.patch_size)
        names = self.tap_names()
        wanted = set(tap_positions(self.medfeat_name, names, taps))
        x = self.patch_embed(x)  # (B, h, w, C)
        x = x + resample_abs_pos_embed_nhwc(self.pos_embed, x.shape[1:3])
        x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if i > max(wanted):
                break
            x = block(x)
            if i in wanted:
                out[names[i]] = x.permute(0, 3, 1, 2)
        return out

    def prune_after(self, tap: str) -> None:
        position = tap_positions(self.medfeat_name, self.tap_names(), [tap])[0]
        self.prune_intermediate_layers([position], prune_norm=True, prune_head=True)


def build_sam(variant: str, *, gray: str = "repeat", img_size: int = 1024, window_size: int = 14,
              embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
              global_attn_indexes: tuple[int, ...] | None = None) -> TappedSAM:
    """SAM image encoder ``variant`` (random init); ``img_size`` sets the pos-embed grid."""
    arch = dict(VARIANTS[variant])
    overrides = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, global_attn_indexes=global_attn_indexes)
    arch.update({k: v for k, v in overrides.items() if v is not None})
    model = TappedSAM(img_size=img_size, patch_size=PATCH, window_size=window_size, use_rel_pos=True,
                      num_classes=0, neck_chans=0,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6),  # type: ignore[arg-type]  # timm takes any layer factory
                      **arch)
    model.neck = nn.Identity()  # type: ignore[assignment]  # timm infers Sequential
    # (timm puts a LayerNorm2d here when there is no conv neck; SAM has none)
    model.medfeat_name = f"sam_{variant}"
    enable_gray(model.patch_embed, "proj", gray)
    return model


def sam_taps(variant: str, **config: Any) -> tuple[TapSpec, ...]:
    arch = {**VARIANTS[variant], **{k: v for k, v in config.items() if k in ("embed_dim", "depth")}}
    return tuple(TapSpec(f"blocks.{i}", arch["embed_dim"], PATCH, "map", "avg") for i in range(arch["depth"]))


def from_sam(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """segment-anything ``image_encoder.*`` keys -> timm keys, neck dropped; None if absent."""
    encoder = strip_keys(state, ("image_encoder.",))
    if encoder is None:
        return None
    return {k.replace(".mlp.lin", ".mlp.fc"): v for k, v in encoder.items() if not k.startswith("neck.")}


def from_timm_sam(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """timm's ``samvit_*.sa1b`` weights (already timm keys): neck and head dropped."""
    if "pos_embed" not in state or "blocks.0.attn.rel_pos_h" not in state:
        return None
    return {k: v for k, v in state.items() if not k.startswith(("neck.", "head."))}


for _variant, _arch in VARIANTS.items():
    _name = f"sam_{_variant}"
    register_backbone(BackboneSpec(
        name=_name,
        input_kind="image2d",
        input_size=(224, 224),
        in_channels=3,
        # SAM's pixel_mean/std (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375) on 0-255
        preprocess=Preprocess("mean_std", {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}),
        taps=sam_taps(_variant),
        build=partial(build_sam, _variant),
        weight_formats=("sam", "timm"),
        convert_checkpoint=converter_for({"sam": from_sam, "timm": from_timm_sam}, _name),
        tiny_config=dict(TINY),
        licence="Apache-2.0 (facebookresearch/segment-anything code and weights)",
        taps_for=partial(sam_taps, _variant),
        description=f"SAM {_variant.replace('_', ' ').upper()} image encoder without neck; taps "
                    f"blocks.0-{_arch['depth'] - 1} (maps, avg = mean patch grid, the study's feature); "
                    "pos-embed and rel-pos interpolated below 1024 px; config gray, img_size",
    ))

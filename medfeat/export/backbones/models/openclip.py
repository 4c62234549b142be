"""OpenCLIP ViT-B/16 visual tower (Cherti et al. 2023; ``laion2b_s34b_b88k``), on open_clip.

Checkpoint format ``open_clip``: an open_clip model file (``open_clip_pytorch_model.bin``
or ``.safetensors``, or a training checkpoint's ``state_dict`` with ``module.`` keys);
only the ``visual.*`` keys are kept: ``visual.conv1.weight``, ``visual.class_embedding``,
``visual.positional_embedding`` (1 + 14*14, 768), ``visual.ln_pre``,
``visual.transformer.resblocks.N.{ln_1,attn.in_proj_weight,attn.in_proj_bias,
attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}``, ``visual.ln_post``, ``visual.proj`` (768, 512).
A bare visual state dict (no prefix) loads too.

Taps: ``blocks.0`` .. ``blocks.{layers-1}`` (raw resblock tokens, default ``cls``) and
``proj``: the projected image embedding (ln_post on the CLS token, times ``proj``), the
study's linear-probe feature. Other input sizes resample the position embeddings
(bicubic, no antialias).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from open_clip.transformer import LayerNorm, VisionTransformer
from torch import nn

from medfeat.export.backbones.models.vit2d import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    check_patch_multiple,
    enable_gray,
    resample_pos_embed,
    strip_keys,
    tap_positions,
)
from medfeat.export.backbones.registry import converter_for, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec

if TYPE_CHECKING:
    from open_clip.transformer import Transformer

VIT_B16: dict[str, Any] = dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512)
TINY = dict(image_size=32, width=32, layers=2, heads=2, output_dim=16)


class TappedOpenCLIP(VisionTransformer, TappedModel):
    """open_clip ``VisionTransformer`` with medfeat taps.

    ``forward(x)`` is open_clip's own forward: the (B, output_dim) projected embedding,
    equal to the raw ``proj`` tap. ``_embeds`` is overridden only to resample the
    position embedding when the input's patch grid differs from the checkpoint's.
    """

    medfeat_name: str = "openclip"

    if TYPE_CHECKING:  # set by open_clip's VisionTransformer, which has no type information
        patch_size: tuple[int, int]
        grid_size: tuple[int, int]
        conv1: nn.Module
        class_embedding: nn.Parameter
        positional_embedding: nn.Parameter
        patch_dropout: nn.Module
        ln_pre: nn.Module
        transformer: Transformer
        attn_pool: nn.Module | None
        proj: nn.Parameter | None

        def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

        def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                      prune_head: bool = True) -> list[int]: ...

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        check_patch_multiple(self.medfeat_name, x, self.patch_size)
        x = self.conv1(x)  # (B, C, h, w)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = resample_pos_embed(self.positional_embedding[None], grid, self.grid_size, prefix=1)[0]
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return self.ln_pre(self.patch_dropout(x))

    def tap_names(self) -> list[str]:
        names = [f"blocks.{i}" for i in range(len(self.transformer.resblocks))]
        return names + (["proj"] if self.proj is not None else [])

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        """Raw taps: (B, 1 + h*w, C) tokens for blocks, (B, output_dim) for ``proj``."""
        names = self.tap_names()
        blocks = self.transformer.resblocks
        wanted = set(tap_positions(self.medfeat_name, names, taps))
        batch_first = getattr(self.transformer, "batch_first", True)
        x = self._embeds(x)
        if not batch_first:
            x = x.transpose(0, 1)
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(blocks):
            if i > max(wanted):
                break
            x = block(x)
            if i in wanted:
                out[names[i]] = x if batch_first else x.transpose(0, 1)
        if len(blocks) in wanted:
            pooled, _ = self._pool(x if batch_first else x.transpose(0, 1))
            out["proj"] = pooled @ cast(nn.Parameter, self.proj)  # a tap only while proj exists
        return out

    def prune_after(self, tap: str) -> None:
        position = tap_positions(self.medfeat_name, self.tap_names(), [tap])[0]
        if position < len(self.transformer.resblocks):
            self.prune_intermediate_layers([position], prune_norm=True, prune_head=True)
            self.attn_pool = None


def build_openclip(*, gray: str = "repeat", **arch: Any) -> TappedOpenCLIP:
    """open_clip ViT-B/16 visual tower, random init (architecture overridable for tests)."""
    cfg = {**VIT_B16, **arch}
    model = TappedOpenCLIP(mlp_ratio=4.0, act_layer=nn.GELU, norm_layer=LayerNorm, **cfg)
    enable_gray(model, "conv1", gray)
    model.medfeat_name = "openclip_vitb16"
    return model


def openclip_taps(**config: Any) -> tuple[TapSpec, ...]:
    cfg = {**VIT_B16, **config}
    blocks = tuple(TapSpec(f"blocks.{i}", cfg["width"], cfg["patch_size"], "tokens", "cls", 1)
                   for i in range(cfg["layers"]))
    return blocks + (TapSpec("proj", cfg["output_dim"], 1, "vector", "none"),)


def from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """open_clip ``visual.*`` keys -> the visual tower's keys; None if not that layout."""
    visual = strip_keys(state, ("visual.", "module.visual."))
    if visual is not None:
        return visual
    return dict(state) if "conv1.weight" in state and "class_embedding" in state else None


register_backbone(BackboneSpec(
    name="openclip_vitb16",
    input_kind="image2d",
    input_size=(224, 224),
    in_channels=3,
    preprocess=Preprocess("mean_std", {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}),
    taps=openclip_taps(),
    build=build_openclip,
    weight_formats=("open_clip",),
    convert_checkpoint=converter_for({"open_clip": from_open_clip}, "openclip_vitb16"),
    tiny_config=dict(TINY),
    licence="MIT (mlfoundations/open_clip code; LAION-2B ViT-B-16 weights MIT)",
    taps_for=openclip_taps,
    description="OpenCLIP ViT-B/16 visual tower (laion2b_s34b_b88k); taps blocks.0-11 (cls) and proj "
                "(projected embedding, the study's feature); config gray=repeat|first_channel",
))

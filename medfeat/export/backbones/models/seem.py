"""SEEM's FocalNet-T backbone (Zou et al. 2023; Yang et al. 2022), ``seem_focalt_v0.pt``.

SEEM's ``focalt_unicl_lang_v0.yaml`` builds ``focal_dw``, X-Decoder's FocalNet variant:
depths (2, 2, 6, 2), width 96, focal levels 3 and windows 3 at every stage, overlapping
conv patch embeddings (7x7 stride 4 stem, 3x3 stride 2 downsampling, each + LayerNorm),
post-LayerNorm blocks with layer scale, a modulator scaled by 1 / (levels + 1), and, unlike
the FocalNet of the paper and timm's ``focalnet_tiny_lrf``, a 3x3 depthwise convolution
with residual before the modulation (``dw1``) and before the MLP (``dw2``); ``f`` and
``proj`` are Linear layers. No installable package carries it, so it is written here,
with SEEM's module names so that its keys load unchanged:

``backbone.patch_embed.{proj,norm}``, ``backbone.layers.S.blocks.B.{dw1,norm1,
modulation.f,modulation.h,modulation.proj,modulation.focal_layers.L.0,dw2,norm2,mlp.fc1,
mlp.fc2,gamma_1,gamma_2}``, ``backbone.layers.S.downsample.{proj,norm}`` (S < 3),
``backbone.norm0`` .. ``backbone.norm3`` (the per-output LayerNorms).

Format ``seem``: the SEEM checkpoint (whole model); ``backbone.*`` (also under ``model.``
or ``module.``) is kept, the pixel decoder and heads are not.

Taps ``res2`` .. ``res5``: stage S's output after ``normS`` (before downsampling), maps of
96, 192, 384, 768 channels at strides 4, 8, 16, 32; default ``avg`` (mean of res5 is the
study's feature). Input sizes that are not multiples of the stride are padded on the
right/bottom as SEEM does.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from medfeat.export.backbones.models.vit2d import IMAGENET_MEAN, IMAGENET_STD, enable_gray, strip_keys, tap_positions
from medfeat.export.backbones.registry import converter_for, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec

FOCALT: dict[str, Any] = dict(embed_dim=96, depths=(2, 2, 6, 2), focal_levels=(3, 3, 3, 3), focal_windows=(3, 3, 3, 3))
TINY = dict(embed_dim=8, depths=(1, 1, 1, 1))
LAYERSCALE_INIT = 1e-4


class PatchEmbed(nn.Module):
    """Overlapping conv embedding + LayerNorm: (B, Cin, H, W) -> (B, H/s, W/s, C) channels-last."""

    def __init__(self, in_chans: int, dim: int, stem: bool) -> None:
        super().__init__()
        self.stride = 4 if stem else 2
        kernel = 7 if stem else 3
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=self.stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = (-x.shape[2]) % self.stride, (-x.shape[3]) % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class FocalModulation(nn.Module):
    """Focal modulation on (B, H, W, C): gated sum of depthwise-conv contexts times a query."""

    def __init__(self, dim: int, levels: int, window: int) -> None:
        super().__init__()
        self.levels = levels
        self.f = nn.Linear(dim, 2 * dim + levels + 1)
        self.h = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, window + 2 * k, padding=(window + 2 * k) // 2, groups=dim, bias=False),
                          nn.GELU())
            for k in range(levels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        q, ctx, gates = self.f(x).permute(0, 3, 1, 2).split((dim, dim, self.levels + 1), dim=1)
        ctx_all = torch.zeros_like(q)
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_all = ctx_all + F.gelu(ctx.mean((2, 3), keepdim=True)) * gates[:, self.levels:]
        modulator = self.h(ctx_all / (self.levels + 1))  # SEEM's scaling_modulator
        return self.proj((q * modulator).permute(0, 2, 3, 1))


class FocalBlock(nn.Module):
    """Post-norm focal-modulation block with depthwise-conv residuals, on (B, H, W, C)."""

    def __init__(self, dim: int, levels: int, window: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.dw1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, levels, window)
        self.dw2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, int(dim * mlp_ratio)))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(int(dim * mlp_ratio), dim))
        self.gamma_1 = nn.Parameter(torch.full((dim,), LAYERSCALE_INIT))
        self.gamma_2 = nn.Parameter(torch.full((dim,), LAYERSCALE_INIT))

    @staticmethod
    def _depthwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._depthwise(self.dw1, x)
        x = self.norm1(x + self.gamma_1 * self.modulation(x))
        x = x + self._depthwise(self.dw2, x)
        return self.norm2(x + self.gamma_2 * self.mlp(x))


class FocalStage(nn.Module):
    """Blocks at one resolution, then (except in the last stage) a stride-2 embedding."""

    def __init__(self, dim: int, depth: int, levels: int, window: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(FocalBlock(dim, levels, window) for _ in range(depth))
        self.downsample: PatchEmbed | None = PatchEmbed(dim, 2 * dim, stem=False) if downsample else None


class SeemFocalNet(TappedModel):
    """SEEM's FocalNet-DW backbone with taps ``res2`` .. ``res5``.

    ``forward(x)`` returns the (B, 8C, H/32, W/32) ``res5`` map.
    """

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 focal_levels: Sequence[int] = (3, 3, 3, 3), focal_windows: Sequence[int] = (3, 3, 3, 3)) -> None:
        super().__init__()
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(3, embed_dim, stem=True)
        self.layers = nn.ModuleList(
            FocalStage(dims[i], depths[i], focal_levels[i], focal_windows[i], downsample=i < len(depths) - 1)
            for i in range(len(depths))
        )
        for i, dim in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))

    def tap_names(self) -> list[str]:
        return [f"res{i + 2}" for i in range(len(self.layers))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self.tap_names()[-1]
        return self.forward_taps(x, [last])[last]

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        """Raw taps: (B, C_s, H/s, W/s) maps after the per-stage LayerNorm."""
        names = self.tap_names()
        wanted = set(tap_positions("seem_focalt", names, taps))
        x = self.patch_embed(x)
        out: dict[str, torch.Tensor] = {}
        for i, stage in enumerate(self._stages()):
            for block in stage.blocks:
                x = block(x)
            if i in wanted:
                out[names[i]] = getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2)
            if i == max(wanted) or stage.downsample is None:  # only the last stage has none
                break
            x = stage.downsample(x.permute(0, 3, 1, 2))
        return out

    def prune_after(self, tap: str) -> None:
        position = tap_positions("seem_focalt", self.tap_names(), [tap])[0]
        for i in range(position + 1, len(self.layers)):
            delattr(self, f"norm{i}")
        self.layers = self.layers[:position + 1]
        self._stages()[position].downsample = None

    def _stages(self) -> list[FocalStage]:
        return [cast(FocalStage, stage) for stage in self.layers]  # layers holds FocalStages only


def build_seem(*, gray: str = "repeat", **arch: Any) -> SeemFocalNet:
    """SEEM FocalNet-T backbone, random init (weights as nn defaults, layer scale 1e-4)."""
    model = SeemFocalNet(**{**FOCALT, **arch})
    enable_gray(model.patch_embed, "proj", gray)
    return model


def seem_taps(**config: Any) -> tuple[TapSpec, ...]:
    cfg = {**FOCALT, **config}
    return tuple(TapSpec(f"res{i + 2}", cfg["embed_dim"] * 2 ** i, 4 * 2 ** i, "map", "avg")
                 for i in range(len(cfg["depths"])))


def from_seem(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """SEEM ``backbone.*`` keys -> this module's keys (identical names); None if absent."""
    backbone = strip_keys(state, ("backbone.", "model.backbone.", "module.backbone.", "module.model.backbone."))
    if backbone is not None:
        return backbone
    return dict(state) if "patch_embed.proj.weight" in state and "norm0.weight" in state else None


register_backbone(BackboneSpec(
    name="seem_focalt",
    input_kind="image2d",
    input_size=(224, 224),
    in_channels=3,
    # SEEM's PIXEL_MEAN/STD (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375) on 0-255
    preprocess=Preprocess("mean_std", {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}),
    taps=seem_taps(),
    build=build_seem,
    weight_formats=("seem",),
    convert_checkpoint=converter_for({"seem": from_seem}, "seem_focalt"),
    tiny_config=dict(TINY),
    licence="Apache-2.0 (UX-Decoder/SEEM code and weights; FocalNet MIT)",
    taps_for=seem_taps,
    description="SEEM FocalNet-T (focal_dw) backbone; taps res2-res5 (maps, avg; mean of res5 is the "
                "study's feature); config gray=repeat|first_channel",
))

"""Tiny test backbones (3D volume, 3D pair, 2D image), registered on import.

Kept in an importable module so spawned Dask worker processes can register them too
(``ExtractConfig(modules=("_tiny_backbone",))``).
"""
from __future__ import annotations

import torch
from torch import nn

from medfeat.export.backbones.registry import _REGISTRY, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec


class TinyConvNet(TappedModel):
    """Two strided convs; taps ``conv1`` (8 ch) and ``conv2`` (16 ch)."""

    def __init__(self, in_channels: int = 1, ndim: int = 3) -> None:
        super().__init__()
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.layers = nn.ModuleDict({
            "conv1": nn.Sequential(conv(in_channels, 8, 3, stride=2, padding=1), nn.ReLU()),
            "conv2": nn.Sequential(conv(8, 16, 3, stride=2, padding=1), nn.ReLU()),
        })

    def tap_names(self) -> list[str]:
        return list(self.layers)

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers.items():
            x = layer(x)
            if name in taps:
                out[name] = x
            if all(t in out for t in taps):
                break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_taps(x, ["conv2"])["conv2"]

    def prune_after(self, tap: str) -> None:
        names = list(self.layers)
        for name in names[names.index(tap) + 1:]:
            del self.layers[name]


TAPS = (TapSpec("conv1", 8, 2), TapSpec("conv2", 16, 4))


def _register(spec: BackboneSpec) -> None:
    if spec.name not in _REGISTRY:
        register_backbone(spec)


_register(BackboneSpec("tiny3d_test", "volume3d", (16, 16, 16), 1,
                       Preprocess("percentile_clamp", {"upper": 99.0}), TAPS,
                       build=lambda **cfg: TinyConvNet(1, 3)))
_register(BackboneSpec("tinypair_test", "pair3d", (16, 16, 16), 2,
                       Preprocess("percentile_clamp", {"upper": 99.0}), TAPS,
                       build=lambda **cfg: TinyConvNet(2, 3)))
_register(BackboneSpec("tiny2d_test", "image2d", (32, 32), 3,
                       Preprocess("mean_std", {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}),
                       TAPS, build=lambda **cfg: TinyConvNet(3, 2)))


class SlowConvNet(TinyConvNet):
    """TinyConvNet that sleeps in every forward, so a test can kill a run part-way."""

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        import time

        time.sleep(0.4)
        return super().forward_taps(x, taps)


_register(BackboneSpec("tinyslow_test", "volume3d", (16, 16, 16), 1,
                       Preprocess("percentile_clamp", {"upper": 99.0}), TAPS,
                       build=lambda **cfg: SlowConvNet(1, 3)))


class NaNConvNet(TinyConvNet):
    """TinyConvNet whose outputs are NaN: a model that blows up on its input."""

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        return {k: v * float("nan") for k, v in super().forward_taps(x, taps).items()}


# Not registered on import (the registry's own tests check every backbone is finite): tests
# that need it register it for their duration.
NAN_SPEC = BackboneSpec("tinynan_test", "volume3d", (16, 16, 16), 1, Preprocess("percentile_clamp", {"upper": 99.0}),
                        TAPS, build=lambda **cfg: NaNConvNet(1, 3))

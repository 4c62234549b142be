"""Task-specific 3D UNet: MONAI's ``monai.networks.nets.UNet`` with taps down its encoder and up its decoder.

The network is built from :mod:`.monai_blocks` (plain torch with MONAI's layout; no MONAI
import, see there why), in MONAI's order, so a seed gives MONAI's random weights, MONAI's
state dicts load strictly, and the outputs equal MONAI's exactly (``tests/parity``).

MONAI builds the UNet as nested containers: the top ``model`` is
``Sequential(down_0, SkipConnection(Sequential(down_1, SkipConnection(...), up_1)), up_0)`` and the
innermost ``SkipConnection`` wraps the bottom block; each ``SkipConnection`` concatenates its
input with its submodule's output along channels. We keep MONAI's module names (so a MONAI UNet state dict, e.g. the one ``medfeat models train-unet`` writes, loads
strictly) and walk that structure explicitly: ``down.i`` (i = 0..L-1), ``bottom``, then
``up.L-1`` .. ``up.0``. ``up.0`` is the network's output (the segmentation logits), so the
last tap equals the plain forward. Pruning replaces every module past the last tap by an empty
placeholder that holds no parameters and refuses to run.

Default config: 1 input channel, 6 classes (background, femur, tibia, femoral cartilage,
tibial cartilage, other tissue: the synthetic knee cohort's labels), channels
(8, 16, 32, 64, 128), strides 2, two residual units per block, instance norm, 64^3 input. The
widths are half MONAI's usual (16, ..., 256): a quarter of the compute, so training on a
cohort fits the CPU demo; other widths load with ``config={"channels": ...}``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medfeat.errors import InputError, UnknownNameError
from medfeat.export.backbones.models.monai_blocks import Convolution, ResidualUnit, SkipConnection
from medfeat.export.backbones.registry import converter_for, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec

DEFAULT_CONFIG: dict[str, Any] = dict(
    input_size=(64, 64, 64), in_channels=1, out_channels=6, channels=(8, 16, 32, 64, 128),
    strides=(2, 2, 2, 2), num_res_units=2,
)
TINY_CONFIG: dict[str, Any] = dict(input_size=(16, 16, 16), channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


class Pruned(nn.Module):
    """Stands where a module past the last tap was: no parameters, and running it is an error."""

    def forward(self, *args: Any) -> torch.Tensor:
        raise RuntimeError("this layer was pruned (it is past the last requested tap)")


def monai_unet(in_channels: int, out_channels: int, channels: Sequence[int], strides: Sequence[int],
               num_res_units: int) -> nn.Sequential:
    """MONAI's 3D UNet (kernel 3, PReLU, instance norm, no dropout) as its nested ``model``.

    Each level is ``Sequential(down, SkipConnection(next level or the bottom block), up)``;
    the levels are made innermost first, as MONAI makes them (so a seed draws the same weights).
    Down blocks are residual units of ``num_res_units`` convolutions (stride 2 in the first);
    up blocks a stride-2 transposed convolution then a one-convolution residual unit whose
    last convolution is bare at the top (the logits). With ``num_res_units=0`` single
    convolutions replace the residual units.
    """
    res = num_res_units

    def down(cin: int, cout: int, stride: int) -> nn.Module:
        if res > 0:
            return ResidualUnit(cin, cout, stride=stride, subunits=res)
        return Convolution(cin, cout, stride=stride)

    def up(cin: int, cout: int, stride: int, top: bool) -> nn.Module:
        conv = Convolution(cin, cout, stride=stride, transposed=True, conv_only=top and res == 0)
        return conv if res == 0 else nn.Sequential(conv, ResidualUnit(cout, cout, subunits=1, last_conv_only=top))

    def level(cin: int, cout: int, chans: Sequence[int], steps: Sequence[int], top: bool) -> nn.Sequential:
        c = chans[0]
        inner: nn.Module
        if len(chans) > 2:
            inner, up_in = level(c, c, chans[1:], steps[1:], False), 2 * c
        else:
            inner, up_in = down(c, chans[1], 1), c + chans[1]  # the bottom block
        return nn.Sequential(down(cin, c, steps[0]), SkipConnection(inner), up(up_in, cout, steps[0], top))

    return level(in_channels, out_channels, list(channels), list(strides), True)


def _paths(levels: int) -> dict[str, str]:
    """Module path of each tap's block in MONAI's nested UNet with ``levels`` down blocks."""
    paths: dict[str, str] = {}
    seq = "model"
    for i in range(levels):
        paths[f"down.{i}"] = f"{seq}.0"
        paths[f"up.{i}"] = f"{seq}.2"
        seq = f"{seq}.1.submodule"
    paths["bottom"] = seq  # the innermost SkipConnection's submodule
    return paths


class UNet3DTaps(TappedModel):
    """MONAI 3D UNet with taps; ``forward``: (B, C, D, H, W) -> (B, out_channels, D, H, W) logits."""

    def __init__(self, input_size: Sequence[int] | int = 64, in_channels: int = 1, out_channels: int = 6,
                 channels: Sequence[int] = (8, 16, 32, 64, 128), strides: Sequence[int] = (2, 2, 2, 2),
                 num_res_units: int = 2) -> None:
        super().__init__()
        if len(channels) != len(strides) + 1:
            raise InputError(f"unet3d: {len(channels)} channels need {len(channels) - 1} strides, got {len(strides)}")
        self.input_size = (input_size,) * 3 if isinstance(input_size, int) else tuple(input_size)
        self.levels = len(strides)
        self.multiple = math.prod(strides)
        if len(channels) < 2:
            raise InputError(f"unet3d: needs at least 2 channel widths, got {tuple(channels)}")
        self.model = monai_unet(in_channels, out_channels, channels, strides, num_res_units)
        self._paths = _paths(self.levels)
        self._order = ([f"down.{i}" for i in range(self.levels)] + ["bottom"]
                       + [f"up.{i}" for i in reversed(range(self.levels))])

    def tap_names(self) -> list[str]:
        return list(self._order)

    def _block(self, tap: str) -> nn.Module:
        return self.get_submodule(self._paths[tap])

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        """Raw taps as (B, C, D', H', W') maps, running no block after the last one requested."""
        if x.ndim != 5 or any(s % self.multiple for s in x.shape[2:]):
            raise InputError(f"unet3d: input of shape {tuple(x.shape)} is not (B, C, D, H, W) "
                             f"with D, H, W divisible by {self.multiple}")
        unknown = [t for t in taps if t not in self._order]
        if unknown:
            raise UnknownNameError(f"unet3d: unknown or pruned tap {unknown[0]!r}; taps are: {', '.join(self._order)}")
        remaining = set(taps)
        out: dict[str, torch.Tensor] = {}

        def record(name: str, value: torch.Tensor) -> bool:
            if name in remaining:
                out[name] = value
                remaining.discard(name)
            return not remaining

        h, skips = x, []
        for i in range(self.levels):
            h = self._block(f"down.{i}")(h)
            skips.append(h)
            if record(f"down.{i}", h):
                return out
        h = self._block("bottom")(h)
        if record("bottom", h):
            return out
        h = torch.cat([skips[-1], h], dim=1)  # MONAI's SkipConnection: cat(input, submodule(input))
        for i in reversed(range(self.levels)):
            h = self._block(f"up.{i}")(h)
            if record(f"up.{i}", h):
                return out
            h = torch.cat([skips[i - 1], h], dim=1) if i > 0 else h
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_taps(x, ["up.0"])["up.0"]

    def prune_after(self, tap: str) -> None:
        if tap not in self._order:
            raise UnknownNameError(f"unet3d: unknown tap {tap!r}; taps are: {', '.join(self._order)}")
        cut = self._order.index(tap) + 1
        for name in self._order[cut:]:
            parent, _, child = self._paths[name].rpartition(".")
            setattr(self.get_submodule(parent), child, Pruned())
        self._order = self._order[:cut]


def _taps(**config: Any) -> tuple[TapSpec, ...]:
    cfg = {**DEFAULT_CONFIG, **config}
    ch, st = list(cfg["channels"]), list(cfg["strides"])
    levels = len(st)
    downs = [TapSpec(f"down.{i}", ch[i], math.prod(st[: i + 1])) for i in range(levels)]
    bottom = [TapSpec("bottom", ch[-1], math.prod(st))]
    ups = [TapSpec(f"up.{i}", ch[i - 1] if i > 0 else cfg["out_channels"], math.prod(st[:i]))
           for i in reversed(range(levels))]
    return tuple(downs + bottom + ups)


def _build(**config: Any) -> UNet3DTaps:
    return UNet3DTaps(**{**DEFAULT_CONFIG, **config})


def _from_monai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A MONAI UNet state dict (keys ``model.*``; a DDP ``module.`` prefix is accepted)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state if any(k.startswith("model.0.") for k in state) else None


SPEC = register_backbone(BackboneSpec(
    name="unet3d",
    input_kind="volume3d",
    input_size=DEFAULT_CONFIG["input_size"],
    in_channels=1,
    preprocess=Preprocess("percentile_clamp", {"upper": 99.0}),
    taps=_taps(),
    taps_for=_taps,
    build=_build,
    weight_formats=("monai_unet",),
    convert_checkpoint=converter_for({"monai_unet": _from_monai}, "unet3d"),
    tiny_config=TINY_CONFIG,
    licence="Apache-2.0 (MONAI UNet); weights are the user's (medfeat models train-unet)",
    description="Task-specific MONAI 3D UNet (6 knee classes), trained with `medfeat models train-unet`",
))

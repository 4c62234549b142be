"""Backbone specs: what a registry entry declares.

A spec says what a backbone eats (input kind, size, channels, intensity rule),
which taps it offers (name, channels, spatial reduction, default pooling), which
checkpoint formats it loads, and how to build it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from medfeat.errors import UnknownNameError

InputKind = Literal["image2d", "volume3d", "pair3d"]
TapKind = Literal["map", "tokens", "vector"]


@dataclass(frozen=True)
class TapSpec:
    """One tap: a named intermediate output.

    Attributes
    ----------
    name : e.g. ``"blocks.6"``, ``"stage_A.down.2"``.
    channels : channels of the raw output (the pooled dim for ``avg``/``max``/``cls``/``mean``).
    reduction : spatial stride of the output relative to the input (1 for vectors).
    kind : ``"map"`` (B, C, *spatial), ``"tokens"`` (B, N, C) or ``"vector"`` (B, C).
    pooling : default pooling (see :mod:`medfeat.export.backbones.pooling`).
    prefix_tokens : for ``tokens`` taps, how many leading tokens are not patches (CLS, registers).
    """

    name: str
    channels: int
    reduction: int = 1
    kind: TapKind = "map"
    pooling: str = "avg"
    prefix_tokens: int = 0


@dataclass(frozen=True)
class Preprocess:
    """Intensity rule applied before the model (by the kernels, never by the user).

    ``rule`` is one of ``"percentile_clamp"`` (clamp to [min, p-th percentile], scale to
    [0, 1]; ``params={"upper": 99.0}``), ``"zscore"``, ``"ct_window"`` (``lo``, ``hi``),
    ``"minmax"``, or ``"mean_std"`` for 2D models (``mean``, ``std`` per channel on [0, 1]
    images).
    """

    rule: str
    params: dict[str, Any] = field(default_factory=dict)


class TappedModel(nn.Module):
    """Base class of every backbone the registry builds.

    A subclass runs the untruncated model in ``forward`` (its plain output), and offers:

    * ``tap_names()``: every tap in forward order;
    * ``forward_taps(x, taps)``: the raw tap outputs ``{tap: tensor}``, running no layer
      after the last requested tap;
    * ``prune_after(tap)``: delete (not skip) every layer the taps up to ``tap`` do not need
      (a family with a final token norm keeps it when ``keep_final_norm`` is set: ``norm-``
      poolings apply it to earlier taps);
    * ``final_norm(tokens)``: that norm, for families that have one.
    """

    keep_final_norm: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain forward; by default the raw output of the last tap (families whose model
        has another plain output, such as segmentation logits, override it)."""
        last = self.tap_names()[-1]
        return self.forward_taps(x, [last])[last]

    def tap_names(self) -> list[str]:
        raise NotImplementedError

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prune_after(self, tap: str) -> None:
        raise NotImplementedError

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's final norm applied to (B, N, C) tokens (``norm-`` poolings); families
        with such a norm override this."""
        raise UnknownNameError(f"{type(self).__name__} has no final token norm for a norm- pooling")


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry.

    Attributes
    ----------
    name : registry key, e.g. ``"unigradicon"``, ``"dinov2_vitb14"``.
    input_kind : ``"image2d"``, ``"volume3d"`` or ``"pair3d"``. Pair inputs are one tensor
        (B, 2, D, H, W): channel 0 the moving image, channel 1 the fixed one.
    input_size : spatial size the model expects, (H, W) or (D, H, W).
    in_channels : channels of the input tensor the model takes.
    preprocess : the intensity rule.
    taps : the tap table, in forward order.
    weight_formats : names of the checkpoint formats ``convert_checkpoint`` understands.
    build : ``build(**config) -> TappedModel`` builds the untruncated model (random init).
    convert_checkpoint : maps a checkpoint's state dict in an original key layout to the
        model's own keys; raises :class:`~medfeat.errors.WeightsError` if it recognises none.
    tiny_config : config overrides for a small, fast variant (tests only).
    licence : licence note of the architecture and the published weights.
    taps_for : optional ``taps_for(**config) -> tuple[TapSpec, ...]`` when the tap table depends
        on the config (depth, widths); defaults to ``taps``.
    description : one line for ``medfeat models list``.
    array_name : the model's name in a feature store's array keys (``MODEL:TAP:VARIANT``),
        when ``name`` cannot be one (generic models: ``timm:resnet50`` -> ``timm-resnet50``).
    identity : what identifies a generic model beyond its name (its file's sha256, the
        factory, the package version); recorded in provenance and artefact keys.
    """

    name: str
    input_kind: InputKind
    input_size: tuple[int, ...]
    in_channels: int
    preprocess: Preprocess
    taps: tuple[TapSpec, ...]
    build: Callable[..., TappedModel]
    weight_formats: tuple[str, ...] = ()
    convert_checkpoint: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    tiny_config: dict[str, Any] = field(default_factory=dict)
    licence: str = ""
    taps_for: Callable[..., tuple[TapSpec, ...]] | None = None
    description: str = ""
    array_name: str = ""
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def store_key(self) -> str:
        """The model's name in feature store keys: ``array_name``, else ``name``."""
        return self.array_name or self.name

    def tap_table(self, **config: Any) -> tuple[TapSpec, ...]:
        """The tap table for a given build config."""
        return self.taps_for(**config) if self.taps_for is not None else self.taps

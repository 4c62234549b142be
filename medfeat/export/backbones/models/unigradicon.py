"""Registry entry for uniGradICON (Tian et al. 2024), the registration foundation model.

The pair network (``regis_net``) is in :mod:`medfeat.export.backbones.models.unigradicon_net`. Input
is one (B, 2, 175, 175, 175) tensor, moving and fixed (order set by ``order``), each clamped
to [min, 99th percentile] and scaled to [0, 1] (upstream's MRI rule; the kernels apply it).

Checkpoint formats:

* ``regis_net``: the published ``Step_2_final.trch``, ``regis_net.state_dict()`` with the
  cascade's nested keys (``netPhi.netPhi.net.netPhi.net.net.downConvs.0.weight`` is stage A);
* ``gradicon``: the whole ``GradientICONSparse`` module's state dict (``regis_net.`` prefix);
* ``medfeat``: this module's own keys (``stages.A.downConvs.0.weight``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from medfeat.export.backbones.models.unigradicon_net import (
    DOWN_CHANNELS,
    STAGE_POOLINGS,
    STAGES,
    UP_CHANNELS,
    UniGradICONNet,
    stage_feature_names,
    stage_tap_names,
)
from medfeat.export.backbones.registry import converter_for, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TapSpec

INPUT_SIZE = (175, 175, 175)


def upstream_prefixes() -> dict[str, str]:
    """Key prefix of each stage's UNet in ``regis_net.state_dict()``.

    Follows ``unigradicon.make_network(include_last_step=True)``: start from ``FFVF(U_A)``;
    twice wrap ``TwoStep(Downsample(inner), FFVF(U_new))``; then ``TwoStep(inner, FFVF(U_D))``.
    ``TwoStepRegistration`` names its parts ``netPhi``/``netPsi``; ``DownsampleRegistration``
    and ``FunctionFromVectorField`` name theirs ``net``.
    """
    prefixes = {"A": "net."}
    for stage in ("B", "C"):
        prefixes = {s: "netPhi.net." + p for s, p in prefixes.items()}
        prefixes[stage] = "netPsi.net."
    prefixes = {s: "netPhi." + p for s, p in prefixes.items()}
    prefixes["D"] = "netPsi.net."
    return prefixes


def _rename(state: dict[str, torch.Tensor], outer: str) -> dict[str, torch.Tensor] | None:
    """Map upstream keys under ``outer`` to ``stages.<S>.``; keys that fit no stage are kept,
    so strict loading names them as unexpected."""
    inner = {k[len(outer):]: v for k, v in state.items() if k.startswith(outer)}
    prefixes = upstream_prefixes()
    if not any(k.startswith(p) for k in inner for p in prefixes.values()):
        return None
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        rest = key[len(outer):] if key.startswith(outer) else None
        stage = next((s for s, p in prefixes.items() if rest is not None and rest.startswith(p)), None)
        if stage is not None and rest is not None:  # a stage is found only in a rest
            out[f"stages.{stage}.{rest[len(prefixes[stage]):]}"] = value
        elif not key.endswith("identity_map"):
            # identity maps are derived from the input size (icon_registration < 1.0 saved them).
            out[key] = value
    return out


def _from_regis_net(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    if any(k.startswith("regis_net.") for k in state):
        return None
    return _rename(state, "")


def _from_gradicon(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    return _rename(state, "regis_net.") if any(k.startswith("regis_net.") for k in state) else None


def _from_medfeat(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    return state if any(k.startswith("stages.") for k in state) else None


def to_regis_net_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the ``regis_net`` conversion: own keys -> upstream's nested keys."""
    prefixes = upstream_prefixes()
    out = {}
    for key, value in state.items():
        _, stage, rest = key.split(".", 2)
        out[prefixes[stage] + rest] = value
    return out


def unigradicon_taps(*, input_size: Sequence[int] = INPUT_SIZE, down_channels: Sequence[int] = DOWN_CHANNELS,
                     up_channels: Sequence[int] = UP_CHANNELS, order: str = "moving_fixed") -> tuple[TapSpec, ...]:
    """The tap table for a config (see :class:`UniGradICONNet`); reductions relative to the input."""
    del input_size, order  # the table does not depend on them
    depth = len(up_channels)
    taps = []
    for stage in STAGES:
        base = 2 ** STAGE_POOLINGS[stage]
        for name in stage_tap_names(stage, depth) + stage_feature_names(stage):
            level = name.split(".", 1)[1]
            kind, _, index = level.partition(".")
            pooling = "avg"
            if kind == "enc":
                channels, reduction = down_channels[int(index)], base * 2 ** (int(index) + 1)
            elif kind == "dec":
                channels, reduction = up_channels[int(index)], base * 2 ** int(index)
            elif level == "phi.logjac":
                # tensor-based morphometry: mean and percentiles over the ROI (add the 2x2x2 cells
                # with pooling stats+grid2; the ONNX exporter cannot pool grid2 cells of these maps)
                channels, reduction, pooling = 1, 1, "stats"
            else:  # phi, phi.disp
                channels, reduction = 3, 1
            taps.append(TapSpec(name, channels=channels, reduction=reduction, kind="map", pooling=pooling))
    return tuple(taps)


def build_unigradicon(*, input_size: Sequence[int] = INPUT_SIZE, order: str = "moving_fixed",
                      down_channels: Sequence[int] = DOWN_CHANNELS,
                      up_channels: Sequence[int] = UP_CHANNELS) -> UniGradICONNet:
    """The untruncated network (random init; the last conv of each stage is zero, as upstream).

    ``input_size`` only documents the grid the model was trained on; the network runs at any
    size >= 65 per axis
    (17 for the three-level tiny config).
    """
    del input_size
    return UniGradICONNet(order=order, down_channels=tuple(down_channels), up_channels=tuple(up_channels))


_FORMATS: dict[str, Any] = {"regis_net": _from_regis_net, "gradicon": _from_gradicon, "medfeat": _from_medfeat}

SPEC = register_backbone(BackboneSpec(
    name="unigradicon",
    input_kind="pair3d",
    input_size=INPUT_SIZE,
    in_channels=2,
    preprocess=Preprocess("percentile_clamp", {"upper": 99.0}),
    taps=unigradicon_taps(),
    build=build_unigradicon,
    weight_formats=tuple(_FORMATS),
    convert_checkpoint=converter_for(_FORMATS, "unigradicon"),
    # Same cascade and key layout, three levels deep and narrow, so 18-25 voxels suffice
    # (five levels need >= 65); odd, anisotropic sizes exercise the ceil-mode pooling, the
    # decoder crops and the axis order of the warps.
    tiny_config={"input_size": (18, 21, 25), "down_channels": (4, 8, 16), "up_channels": (4, 8, 8)},
    licence="Apache-2.0 (uniGradICON and icon_registration code, uncbiag); weights: uniGradICON "
            "GitHub release 'unigradicon_weights', trained on public datasets (check their terms)",
    taps_for=unigradicon_taps,
    description="uniGradICON registration cascade (4 UNets, pair input, 175^3), taps per stage; "
                "map features S.phi.disp, S.phi.logjac",
))

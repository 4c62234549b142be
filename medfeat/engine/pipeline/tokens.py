"""Which array each tap of a run fills: its store name, per-item layout and extra provenance.

A tap pooled the usual way fills ``MODEL:TAP:VARIANT`` with one float32 vector per item.
A tap kept unpooled (pooling ``tokens``, or ``norm-tokens``: the final norm first) fills
``MODEL:TAP@tokens:VARIANT`` with (tokens, dim) per item in float16 (or bfloat16); with
``views`` augmented views, ``MODEL:TAP@tokens-study4:VARIANT`` holds (1 + views, tokens, dim):
view 0 is the eval transform, views 1..K the study's augmentation. Other new poolings
(``norm-cls``, ...) also name their array ``TAP@POOLING``, so they sit beside the tap's
default pooling in one store. Token order: prefix tokens (CLS, registers) first, then the
patch grid row-major; maps flattened row-major. The grid goes into provenance.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from medfeat.engine.pipeline.config import ModelConfig
from medfeat.engine.store.layout import TOKEN_DTYPES, ArrayLayout
from medfeat.errors import InputError, UnknownNameError
from medfeat.export.backbones.pooling import KEEP_TOKENS, MAP_POOLINGS, TOKEN_POOLINGS, split_normed
from medfeat.export.backbones.registry import Backbone
from medfeat.kernels.augment2d import AUGMENTS, STUDY

__all__ = ["ArrayPlan", "array_tap", "plan_arrays"]

# Poolings to one vector per item keep the tap's own name (stores made before token arrays
# stay valid; the pooling is in the array's provenance); token-keeping and normed ones are
# named in the array's tap.
_PLAIN_POOLINGS = {*MAP_POOLINGS, *TOKEN_POOLINGS, "none"}


@dataclass(frozen=True)
class ArrayPlan:
    """The array a tap fills: tap name in the store, per-item layout, provenance to add."""

    name: str
    layout: ArrayLayout
    provenance: dict[str, Any] = field(default_factory=dict)


def keeps_tokens(pooling: str) -> bool:
    """Whether ``pooling`` keeps every token (``tokens``, ``norm-tokens``)."""
    return split_normed(pooling)[1] == KEEP_TOKENS


def array_tap(tap: str, pooling: str, views: int = 0, augment: str = "none") -> str:
    """The store's tap name for ``tap`` pooled by ``pooling``: ``blocks.8``, ``norm@tokens``,
    ``norm@tokens-study4``, ``blocks.8@norm-cls``."""
    if pooling in _PLAIN_POOLINGS:
        return tap
    suffix = f"-{augment}{views}" if views else ""
    return f"{tap}@{pooling}{suffix}"


def check_views(cfg: ModelConfig, poolings: dict[str, str], input_kind: str) -> None:
    """Refuse view settings that cannot be honoured, before any work."""
    if cfg.augment not in AUGMENTS:
        raise UnknownNameError(f"unknown augmentation {cfg.augment!r}; augmentations: {', '.join(AUGMENTS)}")
    if cfg.token_dtype not in TOKEN_DTYPES:
        raise UnknownNameError(f"token dtype {cfg.token_dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
    if cfg.views < 0:
        raise InputError(f"--views {cfg.views}: give 0 or more augmented views")
    if (cfg.views > 0) != (cfg.augment != "none"):
        raise InputError("--views K and --augment study go together: K augmented views need an augmentation, "
                         "and an augmentation needs K >= 1 views")
    if cfg.views and input_kind != "image2d":
        raise InputError(f"augmented views are made for 2D images; this model takes {input_kind}")
    pooled = [t for t, p in poolings.items() if not keeps_tokens(p)]
    if cfg.views and pooled:
        raise InputError(f"augmented views are stored for token arrays only; tap {pooled[0]} is pooled "
                         f"({poolings[pooled[0]]}): give --pooling tokens")


def plan_arrays(cfg: ModelConfig, backbone: Backbone, size: tuple[int, ...]) -> dict[str, ArrayPlan]:
    """Tap -> the array it fills (names, layouts, token grid and view provenance).

    Token shapes come from one forward pass of a zero image through the truncated model
    (cheap next to a run, and exact for every family).
    """
    check_views(cfg, backbone.poolings, backbone.spec.input_kind)
    dims = backbone.output_dims()
    token_taps = [t for t in backbone.taps if keeps_tokens(backbone.poolings[t.name])]
    shapes = _raw_shapes(backbone, [t.name for t in token_taps], size) if token_taps else {}
    plans = {}
    for t in backbone.taps:
        pooling = backbone.poolings[t.name]
        name = array_tap(t.name, pooling, cfg.views, cfg.augment)
        if t.name not in shapes:
            plans[t.name] = ArrayPlan(name, ArrayLayout.pooled(dims[t.name]))
            continue
        n_tokens, grid, prefix = _token_grid(t.kind, shapes[t.name], t.prefix_tokens, t.reduction, size)
        item = (n_tokens, dims[t.name]) if not cfg.views else (1 + cfg.views, n_tokens, dims[t.name])
        prov: dict[str, Any] = {"tokens": {"count": n_tokens, "grid": list(grid), "prefix_tokens": prefix,
                                           "order": "prefix tokens, then the grid row-major"},
                                "dtype": cfg.token_dtype}
        if cfg.views:
            prov["views"] = {"count": 1 + cfg.views, "view0": "eval transform", "augment": cfg.augment,
                             "params": asdict(STUDY), "seed": cfg.seed,
                             "rng": "numpy default_rng([seed, sha256(item_id)[:8], view, 0])"}
        plans[t.name] = ArrayPlan(name, ArrayLayout(item, cfg.token_dtype), prov)
    return plans


def _raw_shapes(backbone: Backbone, taps: list[str], size: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    # on the backbone's own device: a GPU runtime has moved the driver's copy there
    device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    x = torch.zeros((1, backbone.spec.in_channels, *size), device=device)
    with torch.inference_mode():
        raw = backbone.trunk.forward_taps(x, backbone.tap_names)
    return {t: tuple(raw[t].shape[1:]) for t in taps}


def _token_grid(kind: str, shape: tuple[int, ...], prefix: int, reduction: int,
                size: tuple[int, ...]) -> tuple[int, tuple[int, ...], int]:
    """(tokens, grid, prefix tokens) of one raw tap output shape (batch axis dropped)."""
    if kind == "map":
        grid = tuple(int(s) for s in shape[1:])
        return int(torch.Size(grid).numel()), grid, 0
    n = int(shape[0])
    patches = n - prefix
    guess = tuple(int(s) // max(reduction, 1) for s in size)
    grid = guess if int(torch.Size(guess).numel()) == patches else (patches,)
    return n, grid, prefix

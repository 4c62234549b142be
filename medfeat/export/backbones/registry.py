"""The backbone registry: name -> spec, and ``create_backbone`` that truncates and pools.

Model families register themselves in their own modules (``medfeat/export/backbones/models/``).
They are imported on first use, and only as many as needed: :func:`get_spec` looks the
name up in the static index :data:`medfeat.export.backbones.models.BACKBONE_MODULES` and imports
that one family (so building ``dinov2_vitb14`` does not import open_clip or monai);
:func:`list_backbones` imports them all. Backbones registered at run time with
:func:`register_backbone` (plugins, tests) are found without the index.
"""
from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from medfeat.errors import UnknownNameError, WeightsError
from medfeat.export.backbones.models import BACKBONE_MODULES
from medfeat.export.backbones.pooling import check_pooling, parse_pooling, pool, pooled_dim
from medfeat.export.backbones.spec import BackboneSpec, TappedModel, TapSpec
from medfeat.export.backbones.weights import checkpoint_config, load_strict, read_checkpoint, sha256_file

_FAMILY_PACKAGE = "medfeat.export.backbones.models"
_REGISTRY: dict[str, BackboneSpec] = {}
_UNAVAILABLE: dict[str, str] = {}  # family module -> why it could not be imported
_LOADED = False  # every family module imported (or recorded in _UNAVAILABLE)
_LOAD_LOCK = threading.RLock()  # Dask worker threads may list backbones at once


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry (a name may be registered once)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _import_family(module: str) -> None:
    """Import the family ``module`` (which registers its backbones); a missing architecture
    package is recorded in ``_UNAVAILABLE`` instead of raised."""
    if module in _UNAVAILABLE:
        return
    try:
        importlib.import_module(f"{_FAMILY_PACKAGE}.{module}")
    except ModuleNotFoundError as exc:
        # A family whose architecture package is missing must not take the others down.
        if exc.name and exc.name.startswith("medfeat"):
            raise
        _UNAVAILABLE[module] = f"needs the package {exc.name!r} (pip install it)"


def _load_families() -> None:
    """Import every family module, so the registry holds everything available."""
    global _LOADED
    if _LOADED:
        return
    with _LOAD_LOCK:
        if _LOADED:
            return
        package = importlib.import_module(_FAMILY_PACKAGE)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                _import_family(info.name)
        _LOADED = True  # only now: another thread must not see a half-filled registry


def list_backbones() -> list[str]:
    """Registered backbone names, sorted (imports every family)."""
    _load_families()
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The spec of ``name``, importing only its family when the index knows it.

    An unknown name imports every family and lists the known ones; a name whose family's
    package is missing says which package to install.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    module = BACKBONE_MODULES.get(name)
    if module is not None:
        _import_family(module)
        if name in _REGISTRY:
            return _REGISTRY[name]
        if module in _UNAVAILABLE:
            raise UnknownNameError(f"model {name!r} is unavailable: family {module} {_UNAVAILABLE[module]}")
    _load_families()  # not indexed (a typo, or a family the index misses): look everywhere
    if name not in _REGISTRY:
        missing = "".join(f"; family {f} unavailable: {why}" for f, why in sorted(_UNAVAILABLE.items()))
        raise UnknownNameError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}{missing}")
    return _REGISTRY[name]


def resolve_taps(spec: BackboneSpec, taps: Sequence[str | int], table: Sequence[TapSpec]) -> list[TapSpec]:
    """Tap specs for names or indices (negative indices count from the end), in forward order."""
    by_name = {t.name: t for t in table}
    chosen: list[TapSpec] = []
    for tap in taps:
        if isinstance(tap, int) or (isinstance(tap, str) and tap.lstrip("-").isdigit()):
            index = int(tap)
            if not -len(table) <= index < len(table):
                raise UnknownNameError(f"{spec.name}: tap index {index} out of range (0..{len(table) - 1})")
            chosen.append(table[index])
        elif tap in by_name:
            chosen.append(by_name[tap])
        else:
            names = ", ".join(t.name for t in table)
            raise UnknownNameError(f"{spec.name}: unknown tap {tap!r}; taps are: {names}")
    order = {t.name: i for i, t in enumerate(table)}
    unique = {t.name: t for t in chosen}
    return sorted(unique.values(), key=lambda t: order[t.name])


class Backbone(nn.Module):
    """A truncated backbone: ``forward(x) -> {tap: (B, D) pooled features}``.

    Attributes
    ----------
    spec : the registry entry.
    taps : the tap specs served, in forward order.
    poolings : pooling per tap.
    trunk : the underlying :class:`TappedModel`, pruned after the last tap.
    provenance : model, config, weights path and sha256, taps, poolings.
    """

    def __init__(self, spec: BackboneSpec, trunk: TappedModel, taps: list[TapSpec],
                 poolings: dict[str, str], provenance: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.taps = taps
        self.poolings = poolings
        self.provenance = provenance

    @property
    def tap_names(self) -> list[str]:
        return [t.name for t in self.taps]

    def output_dims(self) -> dict[str, int]:
        """Pooled length per tap."""
        ndim = 2 if self.spec.input_kind == "image2d" else 3
        return {t.name: pooled_dim(t.channels, self.poolings[t.name], ndim) for t in self.taps}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = self.trunk.forward_taps(x, self.tap_names)
        return {t.name: pool(raw[t.name], t.kind, self.poolings[t.name], t.prefix_tokens) for t in self.taps}


def create_backbone(
    name: str,
    taps: Sequence[str | int],
    weights: str | None = None,
    *,
    pooling: str | dict[str, str] | None = None,
    seed: int = 0,
    tiny: bool = False,
    config: dict[str, Any] | None = None,
) -> Backbone:
    """Build ``name`` truncated after the last of ``taps``, with pooling per tap.

    Parameters
    ----------
    name : registry name.
    taps : tap names or indices into the tap table.
    weights : a local checkpoint file in one of the spec's formats; seeded random init if None.
        A safetensors file written by medfeat may carry its build config in its metadata
        (:func:`~medfeat.export.backbones.weights.checkpoint_config`); ``config`` overrides it.
    pooling : one pooling for all taps, a per-tap dict, or None for each tap's default.
    seed : seed of the random init.
    tiny : use the spec's tiny config (tests).
    config : further build overrides.
    """
    spec = get_spec(name)
    stored = checkpoint_config(weights) if weights is not None else {}
    cfg = {**(spec.tiny_config if tiny else {}), **stored, **(config or {})}
    table = spec.tap_table(**cfg)
    chosen = resolve_taps(spec, taps, table)
    if not chosen:
        raise UnknownNameError(f"{name}: no taps given")
    torch.manual_seed(seed)
    trunk = spec.build(**cfg)
    provenance: dict[str, Any] = {"model": name, "config": cfg, "seed": seed, "weights": None, "weights_sha256": None}
    if weights is not None:
        state = read_checkpoint(weights)
        if spec.convert_checkpoint is not None:
            state = spec.convert_checkpoint(state)
        load_strict(trunk, state, name, source=str(weights))
        provenance.update(weights=str(weights), weights_sha256=sha256_file(weights))
    trunk.prune_after(chosen[-1].name)
    trunk.eval()
    poolings = _poolings(chosen, pooling)
    provenance.update(taps=[t.name for t in chosen], poolings=poolings)
    return Backbone(spec, trunk, chosen, poolings, provenance)


def _poolings(taps: list[TapSpec], pooling: str | dict[str, str] | None) -> dict[str, str]:
    """Pooling per tap: each tap's own, one for all, per tap (a dict, or ``POOL,TAP=POOL``
    text, see :func:`~medfeat.export.backbones.pooling.parse_pooling`), checked against the tap kinds."""
    default, per_tap = (None, {}) if pooling is None else (
        parse_pooling(pooling) if isinstance(pooling, str) else (None, dict(pooling)))
    unknown = sorted(set(per_tap) - {t.name for t in taps})
    if unknown:
        raise UnknownNameError(f"pooling names tap(s) {', '.join(unknown)} that are not extracted "
                               f"(taps: {', '.join(t.name for t in taps)})")
    out = {t.name: per_tap.get(t.name, default or t.pooling) for t in taps}
    for t in taps:
        check_pooling(t.kind, out[t.name], t.name)
    return out


def converter_for(formats: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]],
                  model: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A ``convert_checkpoint`` that tries each named format's detector/converter in turn.

    Each format function returns the converted state dict, or None when the checkpoint is
    not in its layout.
    """

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for converter in formats.values():
            out = converter(state)
            if out is not None:
                return out
        sample = ", ".join(list(state)[:5])
        raise WeightsError(
            f"checkpoint is in none of the formats {model} loads ({', '.join(formats)}); first keys: {sample}"
        )

    return convert

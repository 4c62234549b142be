"""The backbone registry: name -> spec, and ``create_backbone`` that truncates and pools.

Model families register themselves in their own modules (``medfeat/export/backbones/models/``).
They are imported on first use, and only as many as needed: :func:`get_spec` looks the
name up in the static index :data:`medfeat.export.backbones.models.BACKBONE_MODULES` and imports
that one family (so building ``dinov2_vitb14`` does not import open_clip or monai);
:func:`list_backbones` imports them all. Backbones registered at run time with
:func:`register_backbone` (plugins, tests) are found without the index; installed plugins
(entry-point group ``medfeat.backbones``, :mod:`~medfeat.export.backbones.plugins`) load
with the families. Generic names (``timm:``, ``hf:``, ``onnx:``, ``torchscript:``,
``module:``) resolve through :mod:`~medfeat.export.backbones.generic`.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from medfeat.errors import InputError, UnknownNameError, WeightsError, one_line
from medfeat.export.backbones.generic import ModelInputs, generic_spec, is_generic
from medfeat.export.backbones.models import BACKBONE_MODULES
from medfeat.export.backbones.plugins import load_entry_points
from medfeat.export.backbones.pooling import check_pooling, parse_pooling, pool, pooled_dim, split_normed
from medfeat.export.backbones.spec import BackboneSpec, TappedModel, TapSpec
from medfeat.export.backbones.weights import (
    checkpoint_config,
    checkpoint_model,
    fill_norm_counters,
    load_strict,
    read_checkpoint,
    sha256_file,
)

_FAMILY_PACKAGE = "medfeat.export.backbones.models"
_REGISTRY: dict[str, BackboneSpec] = {}
_UNAVAILABLE: dict[str, str] = {}  # family module -> why it could not be imported
_LOADED = False  # every family module imported (or recorded in _UNAVAILABLE)
_LOAD_LOCK = threading.RLock()  # Dask worker threads may list backbones at once


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry (a name may be registered once; the same module
    registering it again, as a plugin imported a second time, replaces it)."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old is not spec and _module_of(old) != _module_of(spec):
        raise ValueError(f"backbone {spec.name!r} is registered twice ({_module_of(old)}, {_module_of(spec)})")
    _REGISTRY[spec.name] = spec
    return spec


def _module_of(spec: BackboneSpec) -> str:
    return str(getattr(spec.build, "__module__", ""))


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
        for entry, why in load_entry_points().items():  # installed plugins (medfeat.backbones)
            if why:
                _UNAVAILABLE[f"plugin {entry}"] = f"failed to load ({why})"
        _LOADED = True  # only now: another thread must not see a half-filled registry


def list_backbones() -> list[str]:
    """Registered backbone names, sorted (imports every family)."""
    _load_families()
    return sorted(_REGISTRY)


def get_spec(name: str, inputs: ModelInputs | None = None, config: dict[str, Any] | None = None) -> BackboneSpec:
    """The spec of ``name``, importing only its family when the index knows it.

    Generic names (``timm:...``, ``hf:...``, ``onnx:...``, ``torchscript:...``,
    ``module:...``; see :mod:`medfeat.export.backbones.generic`) are resolved with
    ``inputs`` and the build ``config``. Registered models declare their own input kind
    and intensity rule: ``inputs`` giving either is refused. An unknown name imports every
    family and lists the known ones; a name whose family's package is missing says which
    package to install.
    """
    if is_generic(name):
        return generic_spec(name, inputs, config)
    if inputs is not None and inputs.given:
        raise InputError(f"model {name!r} declares its own input kind and intensity rule; "
                         "--input-kind and --intensity are for generic models (onnx:, torchscript:, module:, ...)")
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
        out = {}
        for t in self.taps:
            normed, method = split_normed(self.poolings[t.name])
            value = self.trunk.final_norm(raw[t.name]) if normed else raw[t.name]
            out[t.name] = pool(value, t.kind, method, t.prefix_tokens)
        return out


def create_backbone(
    name: str,
    taps: Sequence[str | int],
    weights: str | None = None,
    *,
    pooling: str | dict[str, str] | None = None,
    seed: int = 0,
    tiny: bool = False,
    config: dict[str, Any] | None = None,
    inputs: ModelInputs | None = None,
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
    config : further build overrides (a generic model's build arguments).
    inputs : input kind, size and intensity of a generic model (see :func:`get_spec`).
    """
    spec = get_spec(name, inputs, config)
    stored = checkpoint_config(weights) if weights is not None else {}
    if weights is not None:
        _check_checkpoint_config(name, spec, weights, stored)
    cfg = {**(spec.tiny_config if tiny else {}), **stored, **(config or {})}
    table = spec.tap_table(**cfg)
    chosen = resolve_taps(spec, taps, table)
    if not chosen:
        raise UnknownNameError(f"{name}: no taps given")
    torch.manual_seed(seed)
    try:
        trunk = spec.build(**cfg)
    except TypeError as exc:  # a build that takes **kwargs finds a foreign checkpoint config here
        if not stored:
            raise
        raise WeightsError(f"{weights}: checkpoint's build config ({', '.join(sorted(stored))}) does not fit "
                           f"model {name!r}: it was made for another architecture ({one_line(exc, 80)})") from exc
    provenance: dict[str, Any] = {"model": name, "config": cfg, "seed": seed, "weights": None, "weights_sha256": None}
    if spec.identity:  # a generic model: its file's sha256, factory, package version
        provenance["source"] = spec.identity
    if weights is not None:
        state = read_checkpoint(weights)
        if spec.convert_checkpoint is not None:
            state = spec.convert_checkpoint(state)
        filled = fill_norm_counters(trunk, state)
        load_strict(trunk, state, name, source=str(weights))
        provenance.update(weights=str(weights), weights_sha256=sha256_file(weights))
        if filled:  # an old (PyTorch < 0.4.1) checkpoint: say what was added to it
            provenance["weights_filled"] = f"{len(filled)} num_batches_tracked counter(s) absent, set to 0"
    poolings = _poolings(chosen, pooling)
    # a norm- pooling needs the final norm, which truncation would otherwise delete
    trunk.keep_final_norm = any(split_normed(p)[0] for p in poolings.values())
    trunk.prune_after(chosen[-1].name)
    trunk.eval()
    provenance.update(taps=[t.name for t in chosen], poolings=poolings)
    return Backbone(spec, trunk, chosen, poolings, provenance)


def _poolings(taps: list[TapSpec], pooling: str | dict[str, str] | None) -> dict[str, str]:
    """Pooling per tap, checked against each tap's kind.

    ``pooling``: None (each tap's own), one name for all, a dict (``"*"``: every other tap), or
    ``POOL,TAP=POOL,...`` text (see :func:`~medfeat.export.backbones.pooling.parse_pooling`).
    """
    per_tap: dict[str, str]
    if pooling is None:
        default, per_tap = None, {}
    elif isinstance(pooling, str):
        default, per_tap = parse_pooling(pooling)
    else:
        per_tap = dict(pooling)
        default = per_tap.pop("*", None)
    unknown = sorted(set(per_tap) - {t.name for t in taps})
    if unknown:
        raise UnknownNameError(f"pooling names tap(s) {', '.join(unknown)} that are not extracted "
                               f"(taps: {', '.join(t.name for t in taps)})")
    out = {t.name: per_tap.get(t.name, default or t.pooling) for t in taps}
    for t in taps:
        check_pooling(t.name, t.kind, out[t.name])
    return out


def _check_checkpoint_config(name: str, spec: BackboneSpec, weights: str, stored: dict[str, Any]) -> None:
    """Refuse a checkpoint whose stored build config was written for another model: its keys
    must be parameters of this model's build (a unet3d checkpoint names in_channels and
    channels, which uniGradICON's build does not take)."""
    made_for = checkpoint_model(weights)
    if made_for and made_for != name:
        raise WeightsError(f"{weights}: checkpoint was made for model {made_for!r}, not {name!r}")
    params = inspect.signature(spec.build).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    foreign = sorted(set(stored) - set(params))
    if foreign:
        raise WeightsError(f"{weights}: checkpoint's build config ({', '.join(foreign)}) does not fit model "
                           f"{name!r}: it was made for another architecture")


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

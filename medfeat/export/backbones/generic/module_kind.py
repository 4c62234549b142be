"""``module:<package.module:factory>``: any ``nn.Module`` a factory returns, tapped by module path.

The factory is called with the build arguments (``--model-arg``); the taps are every
submodule with a tensor output (``encoder.layer3``), in the order they finish, found by
tracing one forward on the meta device at the declared input size. Weights: a state dict
of the factory's module (strict). Nothing past the last tap runs (see
:mod:`medfeat.export.backbones.generic.hooks`).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfeat.errors import InputError
from medfeat.export.backbones.generic import ModelInputs, array_name, need_inputs
from medfeat.export.backbones.generic.hooks import HookedModel, module_taps, trace_calls
from medfeat.export.backbones.spec import BackboneSpec


def load_factory(target: str) -> Callable[..., object]:
    """``package.module:factory`` -> the factory (a function or an ``nn.Module`` class; what
    it returns is checked by :func:`build_module`)."""
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise InputError(f"module:{target}: expected module:PACKAGE.MODULE:FACTORY")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InputError(f"module:{target}: cannot import {mod_name} ({exc})") from exc
    factory: object = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise InputError(f"module:{target}: {mod_name} has no {attr}")
    if not callable(factory):
        raise InputError(f"module:{target}: {attr} is not callable")
    return factory


def build_module(target: str, config: dict[str, Any], device: str | None = None) -> nn.Module:
    """Call the factory (on ``device``: ``"meta"`` builds without memory or init)."""
    factory = load_factory(target)
    try:
        if device is None:
            net = factory(**config)
        else:
            with torch.device(device):
                net = factory(**config)
    except TypeError as exc:
        raise InputError(f"module:{target}: the factory refused its arguments {config} ({exc})") from exc
    if not isinstance(net, nn.Module):
        raise InputError(f"module:{target}: the factory returned {type(net).__name__}, not an nn.Module")
    return net


def in_channels_of(net: nn.Module, kind: str, config: dict[str, Any]) -> int:
    """Input channels: ``in_channels`` given, 2 for pairs, 1 for volumes; for images the
    first layer's ``in_channels`` (1 or 3), else 3."""
    if "in_channels" in config:
        return int(config["in_channels"])
    if kind == "pair3d":
        return 2
    if kind == "volume3d":
        return 1
    first = next((m for m in net.modules() if hasattr(m, "in_channels")), None)
    return int(getattr(first, "in_channels", 3)) if first is not None else 3


def make_spec(name: str, target: str, inputs: ModelInputs, config: dict[str, Any]) -> BackboneSpec:
    kind, size, rule = need_inputs(name, inputs)
    try:
        meta_net = build_module(target, config, "meta")
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - a factory that cannot build on meta: build it for real
        meta_net = build_module(target, config)
    channels = in_channels_of(meta_net, kind, config)
    shape = (1, channels, *size)
    taps = module_taps(trace_calls(meta_net.eval(), shape), kind, size)
    if not taps:
        raise InputError(f"{name}: no submodule returns a tensor at input shape {shape}")
    factory_args = {k: v for k, v in config.items() if k != "in_channels"}

    def build(**cfg: Any) -> HookedModel:
        net = build_module(target, {k: v for k, v in cfg.items() if k != "in_channels"})
        return HookedModel(net, {t.name: t.name for t in taps}, shape, order=[t.name for t in taps])

    source = inspect.getsourcefile(load_factory(target))
    identity = {"factory": target, "args": factory_args, "input_size": list(size),
                "source_sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else None}
    return BackboneSpec(
        name=name, input_kind=kind, input_size=size, in_channels=channels, preprocess=rule, taps=taps,
        build=build, weight_formats=("state dict of the factory's module",),
        convert_checkpoint=lambda state: {f"net.{k}": v for k, v in state.items()},
        description=f"{target}() tapped by module path", array_name=array_name("module", target),
        identity=identity)

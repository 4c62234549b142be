"""Options shared by every command that builds a model: plugins, and what a generic model
(``timm:``, ``hf:``, ``onnx:``, ``torchscript:``, ``module:``) does not declare.

Light at import (click only): the CLI imports this at start-up.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from medfeat.export.backbones.generic import ModelInputs

INPUT_KINDS = ("image2d", "volume3d", "pair3d")  # as medfeat.export.backbones.spec.InputKind


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--plugin``, ``--input-kind``, ``--intensity`` and ``--model-arg`` to a command."""
    opts = [
        click.option("--plugin", "plugins", multiple=True,
                     help="A .py file or module that registers backbones (repeatable); shipped to Dask workers."),
        click.option("--input-kind", type=click.Choice(INPUT_KINDS), default=None,
                     help="Generic models (onnx:, torchscript:, module:): what the model takes."),
        click.option("--intensity", default=None,
                     help="Generic models: intensity rule, e.g. zscore, percentile_clamp:upper=99, "
                          "ct_window:lo=-1000,hi=1000, minmax, mean_std:imagenet."),
        click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                     help="Build argument (repeatable): timm/factory keyword arguments, or a registry "
                          "model's build config; VALUE is read as YAML (8, 0.5, [1,2], true)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def parse_model_args(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("depth=2", "img_size=[32,32]")`` -> ``{"depth": 2, "img_size": [32, 32]}``."""
    import yaml

    from medfeat.errors import InputError

    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = str(pair).partition("=")
        if not eq or not key.strip():
            raise InputError(f"--model-arg {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise InputError(f"--model-arg {pair!r}: VALUE is not a YAML scalar or list") from None
    return out


def parse_size(text: str | None, flag: str = "--input-size",
               lengths: tuple[int, ...] = (1, 2, 3)) -> tuple[int, ...] | None:
    """``"64,64,64"`` / ``"224x224"`` -> a tuple of one of ``lengths``; None when not given."""
    from medfeat.errors import InputError

    if not text:
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        size = ()
    if len(size) not in lengths or min(size) < 1:
        raise InputError(f"{flag} {text!r}: expected D,H,W or H,W (e.g. 96,96,96)")
    return size


def load_plugins(plugins: tuple[str, ...] | list[str]) -> None:
    """Import plugins into this process (commands that build models here)."""
    if plugins:
        from medfeat.export.backbones.plugins import load_plugins as load

        load(list(plugins))


def model_inputs(input_kind: str | None, input_size: tuple[int, ...] | None, intensity: str | None) -> ModelInputs:
    """The :class:`~medfeat.export.backbones.generic.ModelInputs` of the options."""
    from medfeat.export.backbones.generic import ModelInputs

    return ModelInputs(input_kind, input_size, intensity)

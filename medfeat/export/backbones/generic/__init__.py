"""Generic backbones: any model by a name prefix, with no code and no registry entry.

=============================  =================================================================
``timm:<name>``                any timm model; taps from its ``feature_info`` (and block indices)
``hf:<local dir>``             a Hugging Face vision encoder saved locally (config.json + weights)
``torchscript:<file>``         a scripted module whose named outputs are the taps
``onnx:<file>``                an ONNX graph whose named outputs are the taps
``module:<pkg.mod:factory>``   any ``nn.Module`` a factory returns, tapped by module path
=============================  =================================================================

:func:`generic_spec` turns such a name (plus :class:`ModelInputs` for what the file does
not declare: input kind, size, intensity rule; and build arguments) into a
:class:`~medfeat.export.backbones.spec.BackboneSpec` that the registry's ``create_backbone``
builds like any other. Each kind lives in its own module, imported on first use.
"""
from __future__ import annotations

import importlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfeat.errors import InputError, UnknownNameError
from medfeat.export.backbones.spec import BackboneSpec, InputKind, Preprocess

GENERIC_KINDS = {"timm": "timm_kind", "hf": "hf_kind", "torchscript": "script_kind", "onnx": "onnx_kind",
                 "module": "module_kind"}
INPUT_KINDS: tuple[InputKind, ...] = ("image2d", "volume3d", "pair3d")
INTENSITY_RULES = ("percentile_clamp", "zscore", "ct_window", "minmax", "none", "mean_std")
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_SPECS: dict[tuple[str, ModelInputs, str], BackboneSpec] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelInputs:
    """What a generic model's file may not declare (the CLI's ``--input-kind``,
    ``--input-size``, ``--intensity``); ``None`` means "as the model declares, else required".

    size : spatial size, (H, W) or (D, H, W), voxels / pixels.
    intensity : a rule as :func:`parse_intensity` reads it, e.g. ``zscore``,
        ``percentile_clamp:upper=99.5``, ``ct_window:lo=-1000,hi=1000``, ``mean_std:imagenet``.
    """

    kind: str | None = None
    size: tuple[int, ...] | None = None
    intensity: str | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in INPUT_KINDS:
            raise UnknownNameError(f"unknown input kind {self.kind!r}; kinds: {', '.join(INPUT_KINDS)}")
        if self.intensity is not None:
            parse_intensity(self.intensity)  # fail at the command line, not in a worker

    @property
    def given(self) -> bool:
        return self.kind is not None or self.intensity is not None


def is_generic(name: str) -> bool:
    """True for names with a generic prefix (``timm:``, ``hf:``, ...)."""
    prefix, sep, _ = name.partition(":")
    return bool(sep) and prefix in GENERIC_KINDS


def generic_spec(name: str, inputs: ModelInputs | None = None, config: dict[str, Any] | None = None) -> BackboneSpec:
    """The spec of generic model ``name`` (cached per name, inputs and build arguments).

    Raises UnknownNameError for an unknown prefix, InputError for a missing file or a
    missing input declaration.
    """
    prefix, _, target = name.partition(":")
    if prefix not in GENERIC_KINDS or not target:
        raise UnknownNameError(f"model {name!r}: generic models are {', '.join(f'{k}:...' for k in GENERIC_KINDS)}")
    inputs = inputs or ModelInputs()
    key = (name, inputs, json.dumps(config or {}, sort_keys=True, default=str) + _file_stamp(target))
    with _LOCK:
        if key not in _SPECS:
            module = importlib.import_module(f"{__name__}.{GENERIC_KINDS[prefix]}")
            _SPECS[key] = module.make_spec(name, target, inputs, dict(config or {}))
        return _SPECS[key]


def _file_stamp(target: str) -> str:
    """Size and mtime of a file target, so an edited model file is read again."""
    p = Path(target)
    try:
        st = p.stat()
    except OSError:
        return ""
    return f"|{st.st_size}|{st.st_mtime_ns}"


def array_name(prefix: str, target: str) -> str:
    """The store-safe model name of a generic model: ``timm-resnet50``, ``onnx-<file stem>``,
    ``hf-<dir name>``, ``module-pkg.mod.factory`` (no ``:`` or ``/``)."""
    if prefix in ("onnx", "torchscript"):
        base = Path(target).stem
    elif prefix == "hf":
        base = Path(target).resolve().name
    else:
        base = target
    return f"{prefix}-" + re.sub(r"[^0-9A-Za-z_.+-]", ".", base).strip(".")


def tap_name(raw: str) -> str:
    """A store-safe tap name for a graph output name: ``/enc/layer3/Relu_output_0`` ->
    ``enc.layer3.Relu_output_0`` (no ``/`` or ``:``, which separate store keys)."""
    return re.sub(r"[/:\s]+", ".", raw).strip(".") or "output"


def parse_intensity(text: str) -> Preprocess:
    """``RULE[:k=v,...]`` -> a :class:`Preprocess`.

    Rules: ``percentile_clamp`` (``upper``, default 99), ``zscore``, ``ct_window`` (``lo``,
    ``hi``, scanner units), ``minmax``, ``none``; 2D: ``mean_std`` (``mean``, ``std``: one
    value or three separated by ``/``; ``mean_std:imagenet`` for ImageNet's).
    """
    rule, _, rest = str(text).strip().partition(":")
    if rule not in INTENSITY_RULES:
        raise UnknownNameError(f"--intensity {text!r}: unknown rule {rule!r}; rules: {', '.join(INTENSITY_RULES)}")
    params: dict[str, Any] = {}
    if rule == "mean_std" and rest.strip() in ("", "imagenet"):
        return Preprocess("mean_std", dict(IMAGENET))
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise InputError(f"--intensity {text!r}: expected key=value, got {part!r}")
        try:
            nums = tuple(float(v) for v in value.split("/"))
        except ValueError:
            raise InputError(f"--intensity {text!r}: {key} is not a number") from None
        params[key.strip()] = nums if len(nums) > 1 or rule == "mean_std" else nums[0]
    allowed = {"percentile_clamp": {"upper"}, "ct_window": {"lo", "hi"}, "mean_std": {"mean", "std"}}.get(rule, set())
    unknown = set(params) - allowed
    if unknown:
        raise InputError(f"--intensity {text!r}: {rule} takes {', '.join(sorted(allowed)) or 'no parameters'}")
    if rule == "ct_window" and not {"lo", "hi"} <= set(params):
        raise InputError(f"--intensity {text!r}: ct_window needs lo and hi, e.g. ct_window:lo=-1000,hi=1000")
    if rule == "percentile_clamp":
        params.setdefault("upper", 99.0)
    return Preprocess(rule, params)


def need_inputs(name: str, inputs: ModelInputs, *, kind: str | None = None,
                size: tuple[int, ...] | None = None) -> tuple[InputKind, tuple[int, ...], Preprocess]:
    """Input kind, size and intensity rule of a model that declares at most ``kind`` and
    ``size``: the user's, else the declared ones; a missing one is an InputError naming the flag."""
    k = inputs.kind or kind
    s = inputs.size or size
    if k is None:
        raise InputError(f"{name}: give the input kind with --input-kind ({', '.join(INPUT_KINDS)})")
    if s is None:
        raise InputError(f"{name}: give the input size with --input-size (e.g. 224,224 or 64,64,64)")
    if len(s) != (2 if k == "image2d" else 3):
        raise InputError(f"{name}: input size {s} does not fit input kind {k}")
    if inputs.intensity is None:
        raise InputError(f"{name}: give the intensity rule with --intensity ({', '.join(INTENSITY_RULES)})")
    return k, tuple(int(v) for v in s), parse_intensity(inputs.intensity)  # type: ignore[return-value]

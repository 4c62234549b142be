"""ONNX export of a truncated backbone: one input, a dynamic batch axis, one output per tap.

The exported graph is the :class:`~medfeat.export.backbones.registry.Backbone` itself (trunk pruned
after the last tap, pooling included), so every runtime returns the same pooled
``(B, D)`` vectors eager PyTorch returns. Tap names become ONNX output names after
sanitising (``blocks.6`` -> ``blocks_6``); the mapping is kept in the artefact metadata.

We use the TorchScript exporter (``dynamo=False``) with ``dynamic_axes``: it handles every
registry family at opset 20 (the first opset whose ``GridSample`` takes 5-D inputs, which
uniGradICON's warping stages need) on torch 2.11 through 2.14, while the dynamo exporter
still specialises some models' batch dimension.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfeat.errors import InputError, RuntimeUnavailableError
from medfeat.export.backbones.registry import Backbone

DEFAULT_OPSET = 20
INPUT_NAME = "input"
EXPORT_BATCH = 2  # traced batch; parity runs at other batch sizes to prove the axis is dynamic
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sanitise_names(taps: Sequence[str]) -> dict[str, str]:
    """ONNX-safe output names per tap: ``[A-Za-z0-9_]``, not starting with a digit, unique."""
    names: dict[str, str] = {}
    used: set[str] = {INPUT_NAME}
    for tap in taps:
        base = re.sub(r"[^0-9A-Za-z_]", "_", tap) or "tap"
        if base[0].isdigit():
            base = f"t_{base}"
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        names[tap] = name
    return names


_SIZE_KEYS = ("input_size", "img_size", "image_size")  # how families name it in their build config


def model_input_size(backbone: Backbone) -> tuple[int, ...]:
    """The spatial size the built model expects: its build config's size override (tiny
    configs shrink it) or else the spec's."""
    ndim = len(backbone.spec.input_size)
    config = backbone.provenance.get("config") or {}
    for key in _SIZE_KEYS:
        if key in config and config[key] is not None:
            value = config[key]
            size = (int(value),) * ndim if isinstance(value, int) else tuple(int(v) for v in value)
            if len(size) == ndim:
                return size
    return tuple(int(s) for s in backbone.spec.input_size)


def resolve_input_size(backbone: Backbone, input_size: Sequence[int] | int | None) -> tuple[int, ...]:
    """The spatial size to export at: the model's (:func:`model_input_size`), or
    ``input_size`` (an int is repeated)."""
    ndim = len(backbone.spec.input_size)
    if input_size is None:
        return model_input_size(backbone)
    size = (int(input_size),) * ndim if isinstance(input_size, int) else tuple(int(s) for s in input_size)
    if len(size) == 1:
        size = size * ndim
    if len(size) != ndim or min(size) < 1:
        raise InputError(f"{backbone.spec.name}: input size {size} must have {ndim} positive entries")
    return size


def input_shape(backbone: Backbone, batch: int, input_size: Sequence[int] | int | None = None) -> tuple[int, ...]:
    """(B, C, *spatial) of the model input."""
    return (batch, backbone.spec.in_channels, *resolve_input_size(backbone, input_size))


def random_input(backbone: Backbone, batch: int, input_size: Sequence[int] | int | None = None,
                 seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """A float32 batch shaped like preprocessed input: N(0, 1) for 2D images (mean/std
    normalised), U[0, 1) for volumes (percentile-scaled); deterministic per ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    shape = input_shape(backbone, batch, input_size)
    if backbone.spec.input_kind == "image2d":
        x = torch.randn(shape, generator=gen)
    else:
        x = torch.rand(shape, generator=gen)
    return x.to(device)


class TapOutputs(nn.Module):
    """Export wrapper: float32 input ``(B, C, *spatial)`` -> tuple of float32 ``(B, D)``, one
    per tap in forward order. The cast to ``dtype`` happens inside, so reduced-precision
    graphs keep a float32 interface."""

    def __init__(self, backbone: Backbone, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.backbone = backbone
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backbone(x.to(self.dtype))
        return tuple(out[t].float() for t in self.backbone.tap_names)


def export_onnx(backbone: Backbone, path: str | Path, *, input_size: Sequence[int] | int | None = None,
                opset: int = DEFAULT_OPSET, precision: str = "fp32") -> dict[str, Any]:
    """Export ``backbone`` to ``path`` and check the file with the ONNX checker.

    Parameters
    ----------
    backbone : the truncated, pooled model (not modified: a copy is cast and moved as needed).
    path : the ``.onnx`` file to write.
    input_size : spatial size (voxels / pixels); the spec's by default. Fixed in the graph.
    opset : ONNX opset (>= 20 for 3D grid sampling).
    precision : ``fp32``, ``fp16`` or ``bf16``: the dtype of the graph's weights and
        arithmetic; input and outputs stay float32.

    Returns
    -------
    The metadata: input name and shape (batch as ``"batch"``), output names per tap,
    output dims, opset, precision, exporter and library versions.
    """
    import onnx

    if precision not in DTYPES:
        raise InputError(f"precision {precision!r} is not one of {', '.join(DTYPES)}")
    path = Path(path)
    outputs = sanitise_names(backbone.tap_names)
    if hasattr(backbone.trunk, "raw_onnx"):  # a model that is a graph already (onnx:, torchscript:)
        compose_onnx(backbone, path, outputs, input_size=input_size, opset=opset, precision=precision)
        return _meta(backbone, outputs, input_size, opset, precision, "composed")
    # reduced precision traces on the GPU when there is one: the CPU lacks half kernels for
    # some ops (avg_pool3d, ...); the graph itself does not depend on the tracing device
    device = "cuda" if precision != "fp32" and torch.cuda.is_available() else "cpu"
    wrapper = TapOutputs(_copy_in(backbone, DTYPES[precision], device), DTYPES[precision]).eval()
    example = random_input(backbone, EXPORT_BATCH, input_size, seed=1234, device=device)
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs.values()}}
    try:
        with warnings.catch_warnings(), torch.no_grad(), _mha_fastpath_off(), _native_output_quiet():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter
            torch.onnx.export(wrapper, (example,), str(path), input_names=[INPUT_NAME],
                              output_names=list(outputs.values()), dynamic_axes=axes,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    except Exception as exc:  # the exporter raises many types; name the op when it says one
        hint = ""
        if device == "cpu" and precision != "fp32" and "not implemented for" in str(exc):
            hint = ("; tracing at reduced precision needs kernels the CPU lacks: export on a GPU machine, "
                    "or export fp32 and use --format tensorrt for fp16/bf16")
        raise RuntimeUnavailableError(f"{backbone.spec.name}: ONNX export failed at opset {opset} ({precision}): "
                                      f"{_first_line(exc)}{hint}") from exc
    onnx.checker.check_model(str(path), full_check=False)
    return _meta(backbone, outputs, input_size, opset, precision, "torchscript")


@contextlib.contextmanager
def _native_output_quiet() -> Iterator[None]:
    """Silence file descriptors 1 and 2 while the TorchScript exporter runs: on a failure it
    prints the whole traced graph from C++ (thousands of lines) before raising; the error it
    raises is reported instead, in one line."""
    import os
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def _meta(backbone: Backbone, outputs: dict[str, str], input_size: Sequence[int] | int | None, opset: int,
          precision: str, exporter: str) -> dict[str, Any]:
    import onnx

    return {
        "model": backbone.spec.name,
        "input": {"name": INPUT_NAME, "shape": ["batch", *input_shape(backbone, 1, input_size)[1:]],
                  "dtype": "float32"},
        "outputs": outputs,
        "output_dims": backbone.output_dims(),
        "opset": opset,
        "precision": precision,
        "exporter": exporter,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
        "provenance": _jsonable(backbone.provenance),
    }


class _PoolTaps(nn.Module):
    """The pooling of every tap as a module of the raw tap tensors (exported on its own)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.taps = list(backbone.taps)
        self.poolings = dict(backbone.poolings)

    def forward(self, *raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from medfeat.export.backbones.pooling import pool

        return tuple(pool(r, t.kind, self.poolings[t.name], t.prefix_tokens).float() for r, t in zip(raw, self.taps))


def compose_onnx(backbone: Backbone, path: Path, outputs: dict[str, str], *,
                 input_size: Sequence[int] | int | None, opset: int, precision: str) -> None:
    """Write the model's own graph (``trunk.raw_onnx``: raw tap outputs) followed by the
    pooling graph, merged into one ONNX file with medfeat's input and output names."""
    import io

    import onnx
    from onnx import compose

    if precision != "fp32":
        raise RuntimeUnavailableError(f"{backbone.spec.name}: a model that is already a graph exports at fp32 only")
    example = random_input(backbone, EXPORT_BATCH, input_size, seed=1234)
    trunk: Any = backbone.trunk
    raw, raw_input, names = trunk.raw_onnx(example, opset)
    dims = raw.graph.input[0].type.tensor_type.shape.dim if raw.graph.input else []
    if dims and dims[0].HasField("dim_value"):
        raise RuntimeUnavailableError(f"{backbone.spec.name}: its graph fixes the batch at {dims[0].dim_value}; "
                                      "export needs a dynamic batch axis")
    version = max(13, next((o.version for o in raw.opset_import if o.domain in ("", "ai.onnx")), opset))
    raw = onnx.version_converter.convert_version(raw, version) if version != _opset_of(raw) else raw
    with torch.no_grad():
        tensors = trunk.forward_taps(example, backbone.tap_names)
    pool_in = [f"pool_in_{i}" for i in range(len(outputs))]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_PoolTaps(backbone).eval(), tuple(tensors[t] for t in backbone.tap_names), buf,  # type: ignore[arg-type]
                          input_names=pool_in, output_names=list(outputs.values()), opset_version=version,
                          dynamic_axes={n: {0: "batch"} for n in [*pool_in, *outputs.values()]}, dynamo=False)
    pooling = onnx.load_from_string(buf.getvalue())
    raw = compose.add_prefix(raw, "raw/")
    raw.ir_version = pooling.ir_version = max(raw.ir_version, pooling.ir_version)
    io_map = [(f"raw/{names[t]}", p) for t, p in zip(backbone.tap_names, pool_in)]
    merged = compose.merge_models(raw, pooling, io_map=io_map)
    for node in merged.graph.node:  # medfeat's input name, as every exported model has
        node.input[:] = [INPUT_NAME if i == f"raw/{raw_input}" else i for i in node.input]
    merged.graph.input[0].name = INPUT_NAME
    onnx.checker.check_model(merged, full_check=False)
    onnx.save(merged, str(path))


def _opset_of(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """Trace ``nn.MultiheadAttention`` through its plain ops: its no-grad fast path is one
    fused ``aten::_native_multi_head_attention`` the ONNX exporter has no symbolic for."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def onnx_ops(path: str | Path) -> list[str]:
    """Distinct operator types in an ONNX file (with domain when not the default)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({(f"{n.domain}::" if n.domain else "") + n.op_type for n in model.graph.node})


def _copy_in(backbone: Backbone, dtype: torch.dtype, device: str = "cpu") -> Backbone:
    """The backbone in ``dtype`` on ``device``; a deep copy unless nothing changes."""
    first = next(iter(backbone.parameters()), None)
    if first is not None and first.dtype == dtype and first.device.type == device:
        return backbone.eval()
    import copy

    return copy.deepcopy(backbone).to(device, dtype).eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)

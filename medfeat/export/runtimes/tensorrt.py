"""Native TensorRT: build a serialised engine from an exported ONNX file, and run it.

The engine is built with one optimisation profile over batch sizes (min / opt / max) for
the fixed spatial size of the export, with FP16 or BF16 builder flags for reduced
precision (TensorRT keeps float32 where a layer has no faster kernel). The runner executes
on torch's current CUDA stream, reading and writing torch tensors' device memory directly.

``tensorrt`` is optional: every entry point imports it inside and raises
:class:`~medfeat.errors.RuntimeUnavailableError` saying how to install it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfeat.errors import InputError, RuntimeUnavailableError

ENGINE_FILE = "model.engine"
DEFAULT_PROFILE = (1, 8, 32)  # min, opt, max batch


def require_tensorrt() -> Any:
    """Import tensorrt, or raise saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise RuntimeUnavailableError(
            "TensorRT is not installed; pip install tensorrt (needs an NVIDIA GPU and driver), "
            "or pick --runtime onnxruntime / compiled") from None
    return tensorrt


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None (does not import the package)."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def gpu_identity(device: int = 0) -> dict[str, Any]:
    """What an engine is specific to: GPU name and compute capability (engine cache key)."""
    if not torch.cuda.is_available():
        raise RuntimeUnavailableError("TensorRT needs a CUDA GPU; torch sees none on this machine")
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda, "tensorrt": tensorrt_version()}


def _logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.ERROR)


def _parse(trt: Any, builder: Any, onnx_path: Path) -> Any:
    """Network from the ONNX file; a parse failure names the operator and node."""
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10 needs it
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, _logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        op = getattr(first, "node_operator", lambda: "?")() if first is not None else "?"
        node = getattr(first, "node_name", lambda: "?")() if first is not None else "?"
        desc = first.desc() if first is not None else "unknown parser error"
        raise RuntimeUnavailableError(
            f"TensorRT cannot build operator {op} (node '{node}'): {desc}; "
            "pick another runtime or allow fallback (--allow-fallback)")
    return network


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, input_name: str,
                 input_shape: Sequence[int], precision: str = "fp16",
                 profile: Sequence[int] = DEFAULT_PROFILE, workspace_gib: float = 4.0) -> dict[str, Any]:
    """Build and serialise an engine from ``onnx_path``.

    Parameters
    ----------
    input_shape : (C, *spatial) of the input, fixed; only the batch axis is profiled.
    precision : ``fp32``, ``fp16`` (BuilderFlag.FP16) or ``bf16`` (BuilderFlag.BF16, TensorRT >= 9).
    profile : (min, opt, max) batch sizes of the optimisation profile.

    Returns the build metadata (profile, precision, TensorRT version).
    """
    trt = require_tensorrt()
    lo, opt, hi = (int(b) for b in profile)
    if not 1 <= lo <= opt <= hi:
        raise InputError(f"batch profile {tuple(profile)} must satisfy 1 <= min <= opt <= max")
    builder = trt.Builder(_logger(trt))
    network = _parse(trt, builder, Path(onnx_path))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise RuntimeUnavailableError(f"TensorRT {trt.__version__} has no BF16 builder flag; use fp16 or TensorRT >= 9")
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision != "fp32":
        raise InputError(f"precision {precision!r} is not one of fp32, fp16, bf16")
    tail = tuple(int(s) for s in input_shape)
    shape_profile = builder.create_optimization_profile()
    shape_profile.set_shape(input_name, (lo, *tail), (opt, *tail), (hi, *tail))
    config.add_optimization_profile(shape_profile)
    serialised = builder.build_serialized_network(network, config)
    if serialised is None:
        raise RuntimeUnavailableError(f"TensorRT could not build an engine from {onnx_path} at {precision}")
    Path(engine_path).write_bytes(bytes(serialised))
    return {"profile": [lo, opt, hi], "precision": precision, "tensorrt": trt.__version__}


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32}


class TensorRTRunner:
    """Run a serialised engine: ``runner(x) -> {tap: (B, D) float32 ndarray}``.

    ``outputs`` maps tap -> engine output name (the ONNX output names).
    """

    def __init__(self, engine_path: str | Path, outputs: dict[str, str], *, input_name: str = "input",
                 profile: Sequence[int] = DEFAULT_PROFILE, device: int = 0) -> None:
        trt = require_tensorrt()
        self.device = torch.device("cuda", device)
        runtime = trt.Runtime(_logger(trt))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeUnavailableError(f"{engine_path}: TensorRT could not deserialise the engine "
                                          "(built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.outputs = dict(outputs)
        self.input_name = input_name
        self.profile = tuple(profile)
        self._runtime = runtime  # the engine must not outlive its runtime

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        lo, _, hi = self.profile
        if not lo <= x.shape[0] <= hi:
            raise InputError(f"batch {x.shape[0]} is outside the engine's profile [{lo}, {hi}]")
        x = x.detach().to(self.device, torch.float32).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        outs = {}
        for tap, name in self.outputs.items():
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _TORCH_DTYPES.get(self.engine.get_tensor_dtype(name).name, torch.float32)
            out = torch.empty(shape, device=self.device, dtype=dtype)
            self.context.set_tensor_address(name, out.data_ptr())
            outs[tap] = out
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeUnavailableError("TensorRT execution failed")
        stream.synchronize()
        return {tap: out.float().cpu().numpy() for tap, out in outs.items()}


def engine_artefact(onnx_entry: Any, *, precision: str, profile: Sequence[int] = DEFAULT_PROFILE,
                    cache_dir: str | Path | None = None, device: int = 0) -> Any:
    """The cached engine built from an ONNX cache entry (keyed also by GPU and TensorRT)."""
    from medfeat.export.runtimes.artefacts import META, ONNX_FILE, ArtefactCache

    require_tensorrt()
    meta = onnx_entry.meta()
    fields = {"kind": "tensorrt", "onnx_key": onnx_entry.key, "precision": precision,
              "profile": [int(b) for b in profile], **gpu_identity(device)}

    def build(tmp: Path) -> None:
        info = build_engine(onnx_entry.path / ONNX_FILE, tmp / ENGINE_FILE, input_name=meta["input"]["name"],
                            input_shape=meta["input"]["shape"][1:], precision=precision, profile=profile)
        (tmp / META).write_text(json.dumps({**meta, "engine": info, "precision": precision}, indent=2) + "\n")

    return ArtefactCache(cache_dir).get_or_build(fields, build)

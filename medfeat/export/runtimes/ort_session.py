"""ONNX Runtime sessions for exported backbones: provider choice, clear operator errors,
and a runner that returns ``{tap: (B, D) float32 ndarray}``.

On CUDA the runner binds the input and outputs to torch tensors' device memory (IO
binding), so a batch preprocessed on the GPU never goes through the host before the model.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfeat.errors import InputError, RuntimeUnavailableError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_OP_ERROR = re.compile(r"implementation for (?P<op>\w+)\((?P<ver>\d+)\) node with name '(?P<node>[^']*)'")
_TYPE_ERROR = re.compile(r"Type '(?P<type>tensor\(\w+\))' of input parameter \([^)]*\) of operator "
                         r"\((?P<op>\w+)\) in node \((?P<node>[^)]*)\) is invalid")


def require_onnxruntime() -> Any:
    """Import onnxruntime or raise a RuntimeUnavailableError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailableError("onnxruntime is not installed; pip install onnxruntime "
                                      "(or onnxruntime-gpu for the CUDA / TensorRT providers)") from None
    return onnxruntime


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (empty without onnxruntime)."""
    try:
        return list(require_onnxruntime().get_available_providers())
    except RuntimeUnavailableError:
        return []


def providers_for(ep: str, device_id: int = 0, cache_dir: str | None = None) -> list[Any]:
    """The provider list for ``ep`` (``cpu``, ``cuda``, ``tensorrt``), the CPU provider last
    as ORT's own per-node fallback. Raises if ``ep`` is not in this build."""
    if ep not in PROVIDERS:
        raise InputError(f"execution provider {ep!r} is not one of {', '.join(PROVIDERS)}")
    have = available_providers()
    wanted = PROVIDERS[ep]
    if wanted not in have:
        hint = "pip install onnxruntime-gpu (and a CUDA driver)" if ep != "cpu" else "pip install onnxruntime"
        raise RuntimeUnavailableError(f"ONNX Runtime provider {wanted} is not available "
                                      f"(this build has {', '.join(have) or 'none'}); {hint}")
    if ep == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if ep == "cuda":
        return [cuda, "CPUExecutionProvider"]
    trt_opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": False}
    if cache_dir:
        trt_opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache_dir)
    return [("TensorrtExecutionProvider", trt_opts), cuda, "CPUExecutionProvider"]


def operator_error(exc: BaseException, runtime: str) -> RuntimeUnavailableError:
    """A one-line error naming the operator ORT could not run, and the runtime."""
    text = str(exc)
    match = _OP_ERROR.search(text)
    if match:
        return RuntimeUnavailableError(
            f"{runtime} cannot run operator {match['op']} (opset {match['ver']}, node '{match['node']}'); "
            "pick another runtime or allow fallback (--allow-fallback)")
    match = _TYPE_ERROR.search(text)
    if match:  # e.g. bf16 Conv: the ONNX standard itself has no such type for the op
        return RuntimeUnavailableError(
            f"{runtime} cannot run operator {match['op']} on {match['type']} (node '{match['node']}'); "
            "export at fp32/fp16, or use --format tensorrt for bf16")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return RuntimeUnavailableError(f"{runtime} failed: {first}")


def bound_cpu_memory(options: Any) -> None:
    """Session options that keep ONNX Runtime's CPU memory near eager PyTorch's.

    By default ORT keeps an arena that grows to the largest batch and never shrinks, and
    plans one buffer for all of a run's intermediates (memory patterns): on a 3D encoder
    that doubled the peak against eager PyTorch (SwinUNETR 96^3: 11.5 against 5.9 GB).
    Without both, intermediates are freed as soon as their last consumer ran, as in
    PyTorch. One inter-op thread, and no spinning between ops: the pipeline's reading and
    preprocessing run beside the model and need the cores it would spin on.
    """
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")


def create_session(path: str | Path, ep: str = "cpu", *, device_id: int = 0, threads: int | None = None,
                   trt_cache_dir: str | None = None) -> Any:
    """An ``InferenceSession`` on ``ep`` with full graph optimisation."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about every CPU-placed shape op
    if threads:
        options.intra_op_num_threads = threads
    if ep == "cpu":
        bound_cpu_memory(options)
    providers = providers_for(ep, device_id, trt_cache_dir)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail / NotImplemented types
        raise operator_error(exc, f"ONNX Runtime ({PROVIDERS[ep]})") from exc


class OrtRunner:
    """Run an exported backbone: ``runner(x) -> {tap: (B, D) float32 ndarray}``.

    Parameters
    ----------
    path : the ``.onnx`` file.
    outputs : tap -> ONNX output name (from the export metadata).
    ep : ``cpu``, ``cuda`` or ``tensorrt``.
    input_shape : (C, *spatial) the graph was exported for; checked per call.
    """

    def __init__(self, path: str | Path, outputs: dict[str, str], *, ep: str = "cpu",
                 input_shape: Sequence[int] | None = None, device_id: int = 0,
                 threads: int | None = None, trt_cache_dir: str | None = None) -> None:
        self.session = create_session(path, ep, device_id=device_id, threads=threads, trt_cache_dir=trt_cache_dir)
        self.outputs = dict(outputs)
        self.ep = ep
        self.device_id = device_id
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.label = f"ONNX Runtime ({PROVIDERS[ep]})"

    def _check(self, x: torch.Tensor) -> None:
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"input of shape {tuple(x.shape)} does not match the exported "
                             f"(batch, {', '.join(map(str, self.input_shape))})")

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        self._check(x)
        if x.is_cuda and self.ep != "cpu":
            return self._run_bound(x)
        feed = {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        names = list(self.outputs.values())
        try:
            result = self.session.run(names, feed)
        except Exception as exc:
            raise operator_error(exc, self.label) from exc
        return {tap: np.asarray(arr, dtype=np.float32) for tap, arr in zip(self.outputs, result)}

    def _run_bound(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """IO binding: ORT reads ``x`` and writes the outputs in device memory."""
        x = x.detach().float().contiguous()
        device = x.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(name=self.input_name, device_type="cuda", device_id=device,
                           element_type=np.float32, shape=tuple(x.shape), buffer_ptr=x.data_ptr())
        dims = {o.name: o.shape[1] for o in self.session.get_outputs()}
        outs = {}
        for tap, name in self.outputs.items():
            out = torch.empty((x.shape[0], int(dims[name])), device=x.device, dtype=torch.float32)
            binding.bind_output(name=name, device_type="cuda", device_id=device, element_type=np.float32,
                                shape=tuple(out.shape), buffer_ptr=out.data_ptr())
            outs[tap] = out
        torch.cuda.current_stream(x.device).synchronize()  # ORT runs on its own stream
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise operator_error(exc, self.label) from exc
        return {tap: out.cpu().numpy() for tap, out in outs.items()}

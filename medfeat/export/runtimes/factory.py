"""Runtimes: one interface over eager PyTorch, compiled PyTorch, ONNX Runtime and TensorRT.

``make_runtime(backbone, name, device=..., precision=...)`` returns a callable
``runtime(x) -> {tap: (B, D) float32 ndarray}`` for an input batch ``x`` (torch tensor
laid out as the spec's input, float32, on any device).

Names:

* ``eager``: PyTorch under ``inference_mode``; channels-last memory format for conv nets
  on the GPU; autocast for fp16/bf16.
* ``compiled``: ``torch.compile`` (inductor); on the GPU mode ``reduce-overhead``, which
  captures CUDA graphs.
* ``onnxruntime``: the cached ONNX export (parity-checked) in ONNX Runtime, CPU provider
  on ``cpu``, CUDA provider with IO binding on ``cuda``.
* ``ort-tensorrt``: ONNX Runtime's TensorRT execution provider (onnxruntime-gpu).
* ``tensorrt``: a native TensorRT engine built from the same ONNX file (cached).
* ``auto``: see :func:`choose_auto`.

When a runtime cannot serve the model (missing package, operator it cannot run), the
error names the operator and the runtime; with ``allow_fallback=True`` the next runtime
in :data:`FALLBACK` is tried instead and the reason is kept in ``runtime.fallback_reason``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from medfeat.errors import InputError, MedfeatError, RuntimeUnavailableError, UnknownNameError
from medfeat.export.backbones.registry import Backbone
from medfeat.export.runtimes.parity import ParityError

RUNTIMES = ("auto", "eager", "compiled", "onnxruntime", "ort-tensorrt", "tensorrt")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FALLBACK = {"tensorrt": "onnxruntime", "ort-tensorrt": "onnxruntime", "onnxruntime": "eager",
            "compiled": "eager"}
log = logging.getLogger(__name__)


class Runtime(Protocol):
    name: str

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]: ...


class MicroBatched:
    """``runtime`` called on slices of at most ``size`` items of each batch, outputs joined.

    A large 3D model on the CPU can run faster per item at a smaller batch than the
    pipeline's (SwinUNETR at 96^3 on 2 cores: 1.09 s per item at batch 1, 2.06 s at batch 4,
    its attention maps outgrowing the caches) and needs memory in proportion to the batch;
    ``--runtime auto`` measures both and picks the faster.
    """

    def __init__(self, runtime: Runtime, size: int) -> None:
        self.runtime, self.size = runtime, max(1, int(size))
        self.name = runtime.name
        self.fallback_reason = getattr(runtime, "fallback_reason", None)

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        if len(x) <= self.size:
            return self.runtime(x)
        parts = [self.runtime(x[i:i + self.size]) for i in range(0, len(x), self.size)]
        return {tap: np.concatenate([p[tap] for p in parts]) for tap in parts[0]}


def check_device(device: str) -> torch.device:
    """``device`` as a torch device, or one line saying why this machine cannot use it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r}: not a device name (cpu, cuda, cuda:1)") from exc
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r}: medfeat runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeUnavailableError(f"device {device!r}: no CUDA GPU is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeUnavailableError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def _check_precision(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise UnknownNameError(f"unknown precision {precision!r}; precisions: {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def _has_conv(module: torch.nn.Module, kind: type) -> bool:
    return any(isinstance(m, kind) for m in module.modules())


class EagerRuntime:
    """Eager PyTorch under inference mode.

    On CUDA, conv nets run channels-last (cuDNN's fast layout for tensor cores), and fp16 /
    bf16 run under autocast so reductions and norms stay in float32. On the CPU, reduced
    precision also uses autocast (bf16 has fast kernels on recent x86).
    """

    name = "eager"

    def __init__(self, backbone: Backbone, device: str = "cpu", precision: str = "fp32") -> None:
        self.dtype = _check_precision(precision)
        self.device = check_device(device)
        self.precision = precision
        self.backbone = backbone.to(self.device).eval()
        self.memory_format = torch.contiguous_format
        if self.device.type == "cuda":
            if _has_conv(backbone, torch.nn.Conv2d) and backbone.spec.input_kind == "image2d":
                self.memory_format = torch.channels_last
            elif _has_conv(backbone, torch.nn.Conv3d):
                self.memory_format = torch.channels_last_3d
            if self.memory_format is not torch.contiguous_format:
                self.backbone.to(memory_format=self.memory_format)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision != "fp32":
            return torch.autocast(self.device.type, dtype=self.dtype)
        if self.device.type == "cuda":
            # cuDNN convolutions default to TF32 (10-bit significand): fp32 means fp32
            cudnn = torch.backends.cudnn
            return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                               deterministic=cudnn.deterministic, allow_tf32=False)
        return contextlib.nullcontext()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32, non_blocking=True)
        if self.memory_format is not torch.contiguous_format:
            x = x.contiguous(memory_format=self.memory_format)
        return x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), self._autocast():
            return self.backbone(self._prepare(x))

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        return {k: v.float().cpu().numpy() for k, v in self.forward(x).items()}


class CompiledRuntime(EagerRuntime):
    """``torch.compile`` of the backbone (inductor); CUDA graphs on the GPU.

    Compilation happens on the first call per input shape. A failure there (no C compiler,
    an unsupported op) becomes a RuntimeUnavailableError naming the cause.
    """

    name = "compiled"

    def __init__(self, backbone: Backbone, device: str = "cpu", precision: str = "fp32",
                 backend: Any = "inductor", mode: str | None = None, allow_fallback: bool = False) -> None:
        super().__init__(backbone, device, precision)
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.compiled = torch.compile(self.backbone, backend=backend, mode=mode, dynamic=False)
        self.mode = mode
        self.allow_fallback = allow_fallback
        self.fallback_reason: str | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fallback_reason is not None:  # compilation failed earlier and fallback is allowed
            return super().forward(x)
        try:
            return self._forward_compiled(x)
        except RuntimeUnavailableError as exc:
            if not self.allow_fallback:
                raise
            # compilation happens at the first call, after make_runtime returned: fall back here
            log.warning("%s; falling back to eager", exc)
            self.fallback_reason = str(exc)
            self.name = "eager"
            return super().forward(x)

    def _forward_compiled(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self._prepare(x)
        try:
            # no_grad, not inference_mode: CUDA-graph trees reject inference tensors
            with torch.no_grad(), self._autocast():
                out = self.compiled(x)
                # CUDA graphs reuse output buffers on the next replay: copy out now
                return {k: v.clone() for k, v in out.items()}
        except MedfeatError:
            raise
        except Exception as exc:  # inductor/dynamo raise many types
            raise RuntimeUnavailableError(f"compiled PyTorch (torch.compile) failed for "
                                          f"{self.backbone.spec.name}: {_root_cause(exc)}") from exc


def _root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost exception: dynamo wraps the real reason (an
    unsupported op, a compiler error) in BackendCompilerFailed / InternalTorchDynamoError."""
    root, seen = exc, set()
    while id(root) not in seen:
        seen.add(id(root))
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None:
            break
        root = inner
    text = str(root).strip()
    return f"{type(root).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


class OnnxRuntime:
    """The backbone's cached, parity-checked ONNX export run by ONNX Runtime."""

    def __init__(self, backbone: Backbone, device: str = "cpu", precision: str = "fp32", *,
                 ep: str | None = None, input_size: Sequence[int] | int | None = None,
                 cache_dir: str | Path | None = None, threads: int | None = None) -> None:
        from medfeat.export.runtimes.artefacts import ONNX_FILE, onnx_artefact
        from medfeat.export.runtimes.ort_session import OrtRunner, available_providers

        _check_precision(precision)
        dev = check_device(device)
        self.ep = ep or ("cuda" if dev.type == "cuda" else "cpu")
        self.name = "onnxruntime" if self.ep != "tensorrt" else "ort-tensorrt"
        if self.ep != "cpu" and dev.type != "cuda":
            raise InputError(f"runtime {self.name} needs a CUDA device, got {device!r}")
        # the TensorRT EP reads fp32 graphs and lowers precision itself
        graph_precision = "fp32" if self.ep == "tensorrt" else precision
        parity_ep = self.ep if self.ep == "cuda" else "cpu"
        if parity_ep == "cuda" and "CUDAExecutionProvider" not in available_providers():
            parity_ep = "cpu"
        entry = onnx_artefact(backbone, input_size=input_size, precision=graph_precision,
                              cache_dir=cache_dir, parity_ep=parity_ep)
        meta = entry.meta()
        self.artefact = entry
        self.runner = OrtRunner(entry.path / ONNX_FILE, meta["outputs"], ep=self.ep,
                                input_shape=meta["input"]["shape"][1:], device_id=dev.index or 0,
                                threads=threads, trt_cache_dir=str(entry.path / "ort-trt-cache"))
        self.device = dev

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        if self.device.type == "cuda" and not x.is_cuda:
            x = x.to(self.device)
        return self.runner(x)


class TensorRTRuntime:
    """A native TensorRT engine built (and cached) from the backbone's ONNX export."""

    name = "tensorrt"

    def __init__(self, backbone: Backbone, device: str = "cuda", precision: str = "fp16", *,
                 input_size: Sequence[int] | int | None = None, cache_dir: str | Path | None = None,
                 profile: Sequence[int] | None = None) -> None:
        from medfeat.export.runtimes.artefacts import onnx_artefact
        from medfeat.export.runtimes.tensorrt import (
            DEFAULT_PROFILE,
            ENGINE_FILE,
            TensorRTRunner,
            engine_artefact,
            require_tensorrt,
        )

        _check_precision(precision)
        require_tensorrt()
        dev = check_device(device)
        if dev.type != "cuda":
            raise InputError(f"runtime tensorrt needs a CUDA device, got {device!r}")
        profile = tuple(profile or DEFAULT_PROFILE)
        onnx_entry = onnx_artefact(backbone, input_size=input_size, precision="fp32", cache_dir=cache_dir)
        entry = engine_artefact(onnx_entry, precision=precision, profile=profile, cache_dir=cache_dir,
                                device=dev.index or 0)
        meta = entry.meta()
        self.artefact = entry
        self.runner = TensorRTRunner(entry.path / ENGINE_FILE, meta["outputs"], input_name=meta["input"]["name"],
                                     profile=profile, device=dev.index or 0)

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        return self.runner(x)


def choose_auto(device: str, precision: str = "fp32", input_kind: str | None = None) -> list[str]:
    """Runtimes ``auto`` tries, best first, from what this machine has.

    GPU: native TensorRT > ONNX Runtime CUDA provider > compiled PyTorch (CUDA graphs) >
    eager. CPU at fp32: ONNX Runtime > eager for 3D inputs (``volume3d``, ``pair3d``) and
    for unknown kinds; eager for 2D images. Reduced precision on the CPU: eager.

    Why (benchmarks/RESULTS.md, "Runtimes" sections): on an H100, compiled bf16 ran 1.5x
    (DINOv2 ViT-B/14) and 2.0x (SAM-Med3D) eager bf16. On the CPU, ONNX Runtime ran the 3D
    encoders 2.0x (SwinUNETR 96^3, 2 cores) and 2.6x (SAM-Med3D 128^3, 16 cores) eager, but
    DINOv2 at 224 only 0.74-0.97x. Compiled PyTorch was 1.3-2.7x eager on the CPU too, but
    compiles for 1-8 minutes per process and input shape, so ``auto`` leaves it to users who
    ask for it there. ``auto`` falls back down its list when a runtime cannot serve the model
    (missing package, an operator it cannot run, parity outside tolerance).
    """
    from medfeat.export.runtimes.ort_session import available_providers

    order: list[str] = []
    providers = available_providers()
    if check_device(device).type == "cuda":
        if importlib.util.find_spec("tensorrt") is not None:
            order.append("tensorrt")
        if "CUDAExecutionProvider" in providers:
            order.append("onnxruntime")
        order.append("compiled")
    elif "CPUExecutionProvider" in providers and precision == "fp32" and input_kind != "image2d":
        # ORT's CPU provider lacks most fp16/bf16 kernels
        order.append("onnxruntime")
    order.append("eager")
    return order


def _build(backbone: Backbone, name: str, device: str, precision: str, options: dict[str, Any]) -> Runtime:
    if name == "eager":
        return EagerRuntime(backbone, device, precision)
    if name == "compiled":
        return CompiledRuntime(backbone, device, precision, allow_fallback=options.get("allow_fallback", False),
                               **options.get("compile", {}))
    if name in ("onnxruntime", "ort"):
        return OnnxRuntime(backbone, device, precision, input_size=options.get("input_size"),
                           cache_dir=options.get("cache_dir"), threads=options.get("threads"))
    if name == "ort-tensorrt":
        return OnnxRuntime(backbone, device, precision, ep="tensorrt", input_size=options.get("input_size"),
                           cache_dir=options.get("cache_dir"))
    if name == "tensorrt":
        return TensorRTRuntime(backbone, device, precision, input_size=options.get("input_size"),
                               cache_dir=options.get("cache_dir"), profile=options.get("profile"))
    raise UnknownNameError(f"unknown runtime {name!r}; runtimes: {', '.join(RUNTIMES)}")


def make_runtime(backbone: Backbone, name: str = "eager", *, device: str = "cpu", precision: str = "fp32",
                 allow_fallback: bool = False, **options: Any) -> Runtime:
    """A runtime named ``name`` for ``backbone`` on ``device`` at ``precision``.

    Parameters
    ----------
    name : one of :data:`RUNTIMES`.
    allow_fallback : on RuntimeUnavailableError, try :data:`FALLBACK` [name] instead (``auto``
        always falls back along its own order).
    options : ``input_size``, ``cache_dir`` (artefact cache), ``threads`` (ORT intra-op),
        ``profile`` (TensorRT batch min/opt/max), ``compile`` (torch.compile kwargs).

    The returned object has ``name`` (the runtime that actually runs) and
    ``fallback_reason`` (None unless a fallback happened).
    """
    _check_precision(precision)
    if name not in RUNTIMES and name != "ort":
        raise UnknownNameError(f"unknown runtime {name!r}; runtimes: {', '.join(RUNTIMES)}")
    chain = choose_auto(device, precision, backbone.spec.input_kind) if name == "auto" else [name]
    options = {**options, "allow_fallback": allow_fallback or name == "auto"}
    reasons: list[str] = []
    while chain:
        current = chain.pop(0)
        try:
            runtime = _build(backbone, current, device, precision, options)
        except (RuntimeUnavailableError, ParityError) as exc:
            reasons.append(str(exc))
            if name != "auto" and not allow_fallback:
                raise
            if name != "auto" and current in FALLBACK:
                chain.append(FALLBACK[current])
            if not chain:
                raise
            log.warning("runtime %s unavailable (%s); falling back to %s", current, exc, chain[0])
            continue
        if reasons or not getattr(runtime, "fallback_reason", None):
            runtime.fallback_reason = "; ".join(reasons) or None  # type: ignore[attr-defined]
        return runtime
    raise RuntimeUnavailableError(f"no runtime available for {backbone.spec.name}")  # pragma: no cover

"""Benchmark harness: timing with warm-up and repeats, the machine's own ceilings,
and the environment record that goes next to every figure.

Device work is asynchronous, so on CUDA every timed call is followed by a synchronise.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import numpy as np
import torch

_PACKAGES = ("medfeat", "torch", "numpy", "scipy", "numba", "zarr", "dask", "distributed", "onnx",
             "onnxruntime", "onnxruntime-gpu", "cupy-cuda12x", "cupy-cuda13x", "tensorrt", "SimpleITK",
             "monai", "timm", "scikit-learn")


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls after ``warmup`` untimed ones."""

    median_s: float
    min_s: float
    p10_s: float
    p90_s: float
    repeats: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: relative spread of the repeats."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "spread": self.spread}


def synchronize(device: str) -> None:
    """Wait for queued device work (no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, device: str = "cpu",
              min_total_s: float = 0.0) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``repeats`` timed ones
    (more until ``min_total_s`` seconds have passed, for very short calls)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_total_s:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return timing_of(times)


def timing_of(times: Sequence[float]) -> Timing:
    """The :class:`Timing` of seconds measured elsewhere (one entry per timed call)."""
    if not times:
        raise ValueError("timing_of: no times")
    q = np.percentile(times, [10, 90])
    return Timing(statistics.median(times), min(times), float(q[0]), float(q[1]), len(times))


def measure_copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """Memory copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), warmup=2, repeats=10, device=device)
    return 2 * nbytes / timing.min_s  # a ceiling: the best of the repeats


def measure_matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None) -> float:
    """Matrix-multiply rate in FLOP/s (2 n^3 per product) on random data through torch."""
    if n is None:
        # On the CPU, bf16 products are often emulated (~1 GFLOP/s): 512 keeps them to seconds.
        n = 8192 if device.startswith("cuda") else (2048 if dtype == torch.float32 else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    timing = time_call(lambda: a @ b, warmup=1, repeats=3 if device == "cpu" else 20, device=device)
    return 2 * n**3 / timing.min_s  # a ceiling: the best of the repeats


def machine_limits(device: str = "cpu", quick: bool = False) -> dict[str, float]:
    """The machine's own ceilings: copy bandwidth (bytes/s) and fp32 / bf16 matmul rates (FLOP/s)."""
    nbytes = (32 << 20) if quick else ((1 << 30) if device.startswith("cuda") else (256 << 20))
    n = 256 if quick else None
    return {
        "copy_bytes_per_s": measure_copy_bandwidth(device, nbytes),
        "matmul_fp32_flops": measure_matmul_rate(device, torch.float32, n),
        "matmul_bf16_flops": measure_matmul_rate(device, torch.bfloat16, n),
    }


def environment(device: str = "cpu") -> dict[str, Any]:
    """Device, driver and library versions to store beside the figures."""
    env: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host_cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "packages": {p: _version(p) for p in _PACKAGES if _version(p)},
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, driver=_nvidia_driver())
    return env


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nvidia_driver() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

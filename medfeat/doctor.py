"""``medfeat doctor``: what this machine can run, and for each missing piece why and how.

Checks are cheap (package metadata, provider lists, device queries; no model is built) and
never raise: a missing or broken optional package is reported as a row, not an error.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

OK, MISSING = "ok", "missing"


@dataclass
class Check:
    """One row: ``name``, ``kind`` (runtime / provider / device / package), status, detail,
    and for a missing item ``why`` (not installed, no driver, no GPU, ...) and ``how``."""

    name: str
    kind: str
    status: str
    detail: str = ""
    why: str = ""
    how: str = ""


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _gpu_state() -> tuple[bool, str, str]:
    """(cuda usable, why not, detail): distinguishes no driver from no GPU."""
    import torch

    if torch.version.cuda is None:
        return False, "torch is a CPU-only build", "pip install torch from the CUDA wheel index"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return True, "", ", ".join(names)
    if shutil.which("nvidia-smi") is None and not os.path.exists("/proc/driver/nvidia/version"):
        return False, "no NVIDIA driver", "install the NVIDIA driver on a machine with a GPU"
    return False, "no GPU visible (driver present)", "check CUDA_VISIBLE_DEVICES and nvidia-smi"


def check_devices() -> list[Check]:
    import torch

    rows = [Check("cpu", "device", OK, f"{platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")]
    cuda, why, detail = _gpu_state()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        rows.append(Check("cuda", "device", OK, f"{detail} (cc {props.major}.{props.minor}, "
                          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"))
        bf16 = torch.cuda.is_bf16_supported()
        rows.append(Check("bf16 on GPU", "device", OK if bf16 else MISSING, "",
                          "" if bf16 else "GPU older than Ampere", "" if bf16 else "use fp16"))
    else:
        rows.append(Check("cuda", "device", MISSING, f"torch {torch.__version__}", why, detail))
    return rows


def check_runtimes() -> list[Check]:
    import torch

    cuda, gpu_why, gpu_how = _gpu_state()
    rows = [Check("eager", "runtime", OK, f"torch {torch.__version__}")]
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        rows.append(Check("compiled", "runtime", MISSING, "", "no C compiler for inductor's CPU kernels",
                          "apt-get install gcc (or build-essential)"))
    else:
        triton = _version("triton", "pytorch-triton")
        gpu = f", triton {triton} for CUDA graphs + GPU kernels" if cuda and triton else ""
        rows.append(Check("compiled", "runtime", OK, f"torch.compile (inductor, {cc}){gpu}"))
    rows += _ort_rows(cuda, gpu_why)
    trt = _version("tensorrt", "tensorrt-cu12", "tensorrt-cu13")
    if trt is None:
        rows.append(Check("tensorrt", "runtime", MISSING, "", "not installed",
                          "pip install tensorrt (NVIDIA GPU + driver needed)"))
    elif not cuda:
        rows.append(Check("tensorrt", "runtime", MISSING, f"tensorrt {trt}", gpu_why, gpu_how))
    else:
        rows.append(Check("tensorrt", "runtime", OK, f"tensorrt {trt}"))
    return rows


def _ort_rows(cuda: bool, gpu_why: str) -> list[Check]:
    ort = _version("onnxruntime", "onnxruntime-gpu")
    if ort is None:
        return [Check("onnxruntime", "runtime", MISSING, "", "not installed", "pip install onnxruntime")]
    from medfeat.export.runtimes.ort_session import available_providers

    have = available_providers()
    rows = [Check("onnxruntime", "runtime", OK, f"onnxruntime {ort}; providers: {', '.join(have)}")]
    gpu_build = _version("onnxruntime-gpu") is not None
    for provider, label in (("CUDAExecutionProvider", "ort CUDA EP"), ("TensorrtExecutionProvider", "ort TensorRT EP")):
        if provider in have and cuda:
            rows.append(Check(label, "provider", OK, provider))
        elif provider in have:
            rows.append(Check(label, "provider", MISSING, provider, gpu_why, "run on a machine with an NVIDIA GPU"))
        elif not gpu_build:
            rows.append(Check(label, "provider", MISSING, "", "onnxruntime (CPU build) installed, not onnxruntime-gpu",
                              "pip uninstall onnxruntime && pip install onnxruntime-gpu"))
        else:
            extra = " + tensorrt" if "Tensorrt" in provider else ""
            rows.append(Check(label, "provider", MISSING, "", "provider libraries not found",
                              f"install the CUDA 12 / cuDNN 9{extra} runtime libraries"))
    return rows


_PACKAGES: list[tuple[str, str, str, str]] = [
    # module, distribution, what it is for, how to install
    ("onnx", "onnx", "ONNX export and checker", "pip install onnx"),
    ("onnxscript", "onnxscript", "dynamo ONNX exporter", "pip install onnxscript"),
    ("cupy", "cupy-cuda12x", "GPU kernels (resampling, crop, normalise)", "pip install cupy-cuda12x"),
    ("numba", "numba", "CPU kernels", "pip install numba"),
    ("dask", "dask", "streaming pipeline", "pip install 'dask[distributed]'"),
    ("distributed", "distributed", "LocalCluster / remote clusters", "pip install 'dask[distributed]'"),
    ("dask_cuda", "dask-cuda", "one Dask worker per GPU", "pip install dask-cuda"),
    ("zarr", "zarr", "feature store", "pip install 'zarr>=3'"),
    ("monai", "monai", "SwinUNETR", "pip install monai einops"),
    ("open_clip", "open_clip_torch", "OpenCLIP", "pip install open_clip_torch"),
    ("timm", "timm", "timm-based backbones", "pip install timm"),
    ("SimpleITK", "SimpleITK", "reference resampling in tests", "pip install SimpleITK"),
]


def _cupy_dist() -> str:
    """The CuPy wheel matching torch's CUDA major version (cupy-cuda12x, cupy-cuda13x)."""
    import torch

    major = (torch.version.cuda or "12").split(".")[0]
    return f"cupy-cuda{major}x"


def check_packages() -> list[Check]:
    rows = []
    for module, dist, purpose, how in _PACKAGES:
        if module == "cupy":
            dist = _cupy_dist()
            how = f"pip install {dist}"
        if _installed(module):
            version = _version(dist, "cupy-cuda12x", "cupy-cuda13x", "cupy", module) or "?"
            rows.append(Check(module, "package", OK, f"{version} ({purpose})"))
        else:
            rows.append(Check(module, "package", MISSING, purpose, "not installed", how))
    return rows


CHECKS: tuple[Callable[[], list[Check]], ...] = (check_devices, check_runtimes, check_packages)


def run_checks() -> list[Check]:
    """Every check; a check that itself breaks becomes a row saying so."""
    rows: list[Check] = []
    for check in CHECKS:
        try:
            rows += check()
        except Exception as exc:  # noqa: BLE001 - doctor must never fail
            rows.append(Check(check.__name__, "check", MISSING, "", f"check failed: {exc}", "report this"))
    return rows


def auto_runtime_rows() -> list[Check]:
    """What ``--runtime auto`` picks here, on the CPU and (if present) on the GPU."""
    try:
        import torch

        from medfeat.export.runtimes.factory import choose_auto

        rows = [Check("auto (cpu, 3D)", "choice", OK, " > ".join(choose_auto("cpu", "fp32", "volume3d"))),
                Check("auto (cpu, 2D)", "choice", OK, " > ".join(choose_auto("cpu", "fp32", "image2d")))]
        if torch.cuda.is_available():
            rows.append(Check("auto (cuda)", "choice", OK, " > ".join(choose_auto("cuda"))))
        return rows
    except Exception as exc:  # noqa: BLE001
        return [Check("auto", "choice", MISSING, "", f"check failed: {exc}", "report this")]


def report(rows: list[Check]) -> str:
    """Plain-text table: one line per row, then why / how for the missing ones."""
    width = max(len(r.name) for r in rows) + 2
    lines = []
    for kind in dict.fromkeys(r.kind for r in rows):
        lines.append(f"{kind}s:")
        for r in (r for r in rows if r.kind == kind):
            mark = "ok     " if r.status == OK else "MISSING"
            line = f"  {mark} {r.name:<{width}}{r.detail}"
            if r.status != OK:
                line += f"{' - ' if r.detail else ''}{r.why}; to get it: {r.how}"
            lines.append(line.rstrip())
    return "\n".join(lines)


def as_json(rows: list[Check]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]

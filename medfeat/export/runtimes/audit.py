"""Precision audit: how far reduced-precision runtimes drift from eager fp32, per tap.

The audit reports and never judges: a runtime this machine cannot run becomes a row saying
why, so the audit always completes (``medfeat export --audit``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medfeat.errors import RuntimeUnavailableError
from medfeat.export.backbones.registry import Backbone
from medfeat.export.runtimes.artefacts import ONNX_FILE, onnx_artefact
from medfeat.export.runtimes.factory import make_runtime
from medfeat.export.runtimes.ort_session import OrtRunner, available_providers
from medfeat.export.runtimes.parity import ParityError, check_parity

AUDIT_RUNTIMES = (("eager", "fp16"), ("eager", "bf16"), ("onnxruntime", "fp16"),
                  ("tensorrt", "fp16"), ("tensorrt", "bf16"))


def precision_audit(backbone: Backbone, *, device: str = "cpu", input_size: Sequence[int] | int | None = None,
                    cache_dir: str | None = None,
                    runtimes: Sequence[tuple[str, str]] = AUDIT_RUNTIMES) -> list[dict[str, Any]]:
    """How far reduced-precision features drift from eager fp32, per (runtime, precision, tap).

    Each row is ``{runtime, precision, status, reason, taps: {tap: {max_abs, rel, cosine}}}``;
    a runtime this machine cannot run gets ``status="unavailable"`` and the reason, so the
    audit always completes. Nothing fails on tolerance here: the audit reports, it does not judge.
    """
    rows: list[dict[str, Any]] = []
    for name, precision in runtimes:
        row: dict[str, Any] = {"runtime": name, "precision": precision, "device": device}
        try:
            dev = "cuda" if name == "tensorrt" else device
            if name in ("onnxruntime",) and precision != "fp32":
                # reduced-precision graphs are audited, not gated: build without the parity gate
                run = _unchecked_ort(backbone, precision, dev, input_size, cache_dir)
            else:
                run = make_runtime(backbone, name, device=dev, precision=precision,
                                   input_size=input_size, cache_dir=cache_dir)
            run_device = getattr(run, "device", dev)  # the ORT stand-in may run on the CPU
            report = check_parity(backbone, run, runtime=name, precision=precision,
                                  input_size=input_size, device=str(run_device))
        except (RuntimeUnavailableError, ParityError) as exc:
            rows.append({**row, "status": "unavailable", "reason": str(exc), "taps": {}})
            continue
        taps = {t: {"max_abs": p.max_abs, "rel": p.rel, "cosine": p.cosine, "within_tolerance": p.passed}
                for t, p in report.taps.items()}
        rows.append({**row, "device": str(run_device), "status": "ok", "reason": "", "taps": taps})
    return rows


def _unchecked_ort(backbone: Backbone, precision: str, device: str, input_size: Any, cache_dir: Any) -> Any:
    # the CPU provider stands in where onnxruntime-gpu is missing: the graph's drift is the same
    ep = "cuda" if device.startswith("cuda") and "CUDAExecutionProvider" in available_providers() else "cpu"
    entry = onnx_artefact(backbone, input_size=input_size, precision=precision, cache_dir=cache_dir,
                          check=False, parity_ep=ep)
    meta = entry.meta()
    runner = OrtRunner(entry.path / ONNX_FILE, meta["outputs"], ep=ep, input_shape=meta["input"]["shape"][1:])
    runner.device = "cuda" if ep == "cuda" else "cpu"  # type: ignore[attr-defined]
    return runner

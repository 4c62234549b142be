"""Parity of a compiled runtime against eager float32 PyTorch, per tap.

Metrics per tap, over all items of fresh random batches (never the export's trace input):

* ``max_abs``: max |got - ref|;
* ``rel``: ``max_abs / max |ref|`` (max-norm relative error; a global scale, so near-zero
  features do not blow it up the way an elementwise ratio would);
* ``cosine``: the smallest per-item cosine similarity between ``got`` and ``ref``.

A tap passes when ``rel <= tolerance`` and ``cosine >= min_cosine`` for the precision.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfeat.errors import MedfeatError
from medfeat.export.backbones.registry import Backbone
from medfeat.export.runtimes.onnx_export import random_input

# (rel, min cosine). fp32: the issue's ~1e-4; fp16 has a 11-bit significand (~5e-4 per op),
# bf16 8 bits (~4e-3 per op); deep nets accumulate a few ulps of each.
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-4, 0.99999),
    "fp16": (2e-2, 0.999),
    "bf16": (6e-2, 0.995),
}
PARITY_BATCHES = (1, 3)  # the export traces batch 2: other sizes prove the batch axis is dynamic


class ParityError(MedfeatError, RuntimeError):
    """A runtime whose features drift from eager PyTorch beyond the precision's tolerance.

    ``report`` holds the failing :class:`ParityReport` (so a CLI can still write it out).
    """

    def __init__(self, message: str, report: ParityReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class TapParity:
    """Parity figures of one tap (see the module docstring)."""

    max_abs: float
    rel: float
    cosine: float
    passed: bool


@dataclass
class ParityReport:
    """Per-tap parity of ``runtime`` at ``precision`` against eager fp32."""

    model: str
    runtime: str
    precision: str
    tolerance: float
    min_cosine: float
    batches: list[int]
    seed: int
    taps: dict[str, TapParity] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.taps.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def failures(self) -> list[str]:
        return [f"{tap} (rel {p.rel:.2e}, cosine {p.cosine:.6f})" for tap, p in self.taps.items() if not p.passed]

    def raise_if_failed(self) -> None:
        """Raise :class:`ParityError` naming each failing tap and the tolerance."""
        if not self.passed:
            raise ParityError(f"{self.model} on {self.runtime} ({self.precision}) is outside tolerance "
                              f"(rel <= {self.tolerance:g}, cosine >= {self.min_cosine}): "
                              + "; ".join(self.failures()), self)


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, tuple[float, float, float]]:
    """(max_abs, rel, min cosine) per tap of ``ref``; shapes (N, D) must match."""
    out = {}
    for tap, r in ref.items():
        g = np.asarray(got[tap], dtype=np.float64)
        r = np.asarray(r, dtype=np.float64)
        if g.shape != r.shape:
            raise ParityError(f"tap {tap}: runtime output shape {g.shape} differs from eager {r.shape}")
        if not np.isfinite(g).all():
            out[tap] = (float("inf"), float("inf"), -1.0)
            continue
        max_abs = float(np.abs(g - r).max(initial=0.0))
        scale = float(np.abs(r).max(initial=0.0))
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        norms = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
        dots = (g * r).sum(axis=1)
        # two all-zero vectors agree perfectly; one zero and one not do not
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(np.abs(g - r).max(1) == 0, 1.0, 0.0))
        out[tap] = (max_abs, rel, float(cos.min(initial=1.0)))
    return out


def eager_reference(backbone: Backbone, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Eager float32 features on the CPU: the ground truth every runtime is held to."""
    first = next(iter(backbone.parameters()), None)
    model = backbone
    if first is not None and (first.dtype != torch.float32 or first.device.type != "cpu"):
        import copy

        model = copy.deepcopy(backbone).to("cpu", torch.float32)
    with torch.inference_mode():
        out = model.eval()(x.to("cpu", torch.float32))
    return {k: v.float().numpy() for k, v in out.items()}


def check_parity(backbone: Backbone, run: Callable[[torch.Tensor], dict[str, np.ndarray]], *,
                 runtime: str, precision: str = "fp32", input_size: Sequence[int] | int | None = None,
                 batches: Sequence[int] = PARITY_BATCHES, seed: int = 20_241, device: str = "cpu",
                 tolerance: float | None = None) -> ParityReport:
    """Run ``run`` and eager fp32 on the same fresh random batches and compare per tap.

    Parameters
    ----------
    run : the runtime under test, ``run(x) -> {tap: (B, D)}``; gets ``x`` on ``device``.
    runtime, precision : labels; ``precision`` also picks the tolerance.
    batches : batch sizes, one random batch each (seeds ``seed``, ``seed + 1``, ...).
    tolerance : overrides the precision's relative tolerance.
    """
    rel_tol, min_cos = TOLERANCES[precision]
    rel_tol = rel_tol if tolerance is None else tolerance
    refs: dict[str, list[np.ndarray]] = {t: [] for t in backbone.tap_names}
    gots: dict[str, list[np.ndarray]] = {t: [] for t in backbone.tap_names}
    for i, b in enumerate(batches):
        x = random_input(backbone, b, input_size, seed=seed + i)
        ref = eager_reference(backbone, x)
        got = run(x.to(device))
        for tap in backbone.tap_names:
            if tap not in got:
                raise ParityError(f"{backbone.spec.name} on {runtime}: no output for tap {tap}")
            refs[tap].append(ref[tap])
            gots[tap].append(np.asarray(got[tap]))
    stats = compare({t: np.concatenate(v) for t, v in refs.items()}, {t: np.concatenate(v) for t, v in gots.items()})
    report = ParityReport(backbone.spec.name, runtime, precision, rel_tol, min_cos, list(batches), seed)
    for tap, (max_abs, rel, cos) in stats.items():
        report.taps[tap] = TapParity(max_abs, rel, cos, bool(rel <= rel_tol and cos >= min_cos))
    return report

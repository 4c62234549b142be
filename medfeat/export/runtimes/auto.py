"""``--runtime auto``: the fastest runtime measured for this model, precision and device.

For each runtime this machine offers (:func:`~medfeat.export.runtimes.factory.choose_auto`),
a short timing on random input is taken the first time the model is seen, at the run's
batch size and at one item per call (a large 3D model on the CPU can run faster per item
one at a time, and needs less memory; the faster is kept, see
:class:`~medfeat.export.runtimes.factory.MicroBatched`), and cached beside the exports
(keyed by the model's content, input size, precision, device, batch, threads and library
versions, so a new version measures again). A runtime
that needs an export first (ONNX Runtime, TensorRT) has its cost counted against the
cohort: when even a 3x speed-up over the measured eager rate could not pay back the
estimated export over the items of the run, it is not exported and eager runs. The choice
and why are returned as one line for the run record and the console.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfeat.errors import MedfeatError, RuntimeUnavailableError, one_line
from medfeat.export.backbones.registry import Backbone
from medfeat.export.runtimes.artefacts import ArtefactCache, artefact_key, onnx_key_fields
from medfeat.export.runtimes.factory import Runtime, check_device, choose_auto, make_runtime

TIMING_FILE = "timing.json"
MIN_SECONDS = 0.5  # time each runtime for at least this long (and at least MIN_REPEATS batches)
MIN_REPEATS = 2
BEST_SPEEDUP = 3.0  # the most a compiled runtime has gained over eager here (RESULTS.md): bounds the payback
EXPORT_PASSES = 6  # an export traces, checks and times the model: about this many eager batches
NEEDS_EXPORT = ("onnxruntime", "tensorrt", "ort-tensorrt")


@dataclass
class RuntimeChoice:
    """The runtime chosen, why, and the measured seconds per item of each runtime timed."""

    name: str
    reason: str
    seconds_per_item: dict[str, float] = field(default_factory=dict)
    runtime: Runtime | None = None  # the chosen runtime, built (reuse it rather than build again)
    micro_batch: int = 1  # items per call of the runtime that were fastest per item


def choose_runtime(backbone: Backbone, *, device: str, precision: str, input_size: Sequence[int],
                   batch_size: int, n_items: int, cache_dir: str | Path | None = None,
                   log: Callable[[str], None] | None = None) -> RuntimeChoice:
    """Measure (or read the cached timings of) each candidate runtime; pick the one that
    finishes ``n_items`` items first, export costs counted."""
    candidates = choose_auto(device, precision, None)
    if device == "cpu" and precision == "fp32" and "onnxruntime" not in candidates:
        candidates = ["onnxruntime", *candidates] if _has_ort() else candidates
    cache = ArtefactCache(cache_dir)
    timings: dict[str, float] = {}
    micro: dict[str, int] = {}
    built: dict[str, Runtime] = {}
    eager_s = _timed(backbone, "eager", device, precision, input_size, batch_size, cache, timings, micro, built)
    skipped: list[str] = []
    for name in [c for c in candidates if c != "eager"]:
        export_cached = name in NEEDS_EXPORT and _exported(backbone, input_size, precision, cache)
        if name in NEEDS_EXPORT and not export_cached and not _timing_cached(
                backbone, name, device, precision, input_size, batch_size, cache):
            export_est = EXPORT_PASSES * eager_s * batch_size + 1.0
            best_gain = n_items * eager_s * (1.0 - 1.0 / BEST_SPEEDUP)
            if best_gain < export_est:
                skipped.append(f"{name} not exported (about {export_est:.0f} s; at most {best_gain:.0f} s to "
                               f"gain over {n_items} items)")
                continue
        try:
            _timed(backbone, name, device, precision, input_size, batch_size, cache, timings, micro, built)
        except MedfeatError as exc:  # not available here, or its export fails parity: say so, go on
            skipped.append(f"{name} unavailable ({one_line(exc, 100)})")
    best = min(timings, key=lambda k: timings[k])
    others = ", ".join(f"{k} {v * 1000:.1f}" + (f" at {micro[k]}/call" if micro[k] < batch_size else "")
                       for k, v in sorted(timings.items(), key=lambda kv: kv[1]))
    calls = f", {micro[best]} item(s) per call" if micro[best] < batch_size else ""
    reason = f"runtime auto: {best}{calls} (ms/item measured: {others})"
    if skipped:
        reason += "; " + "; ".join(skipped)
    if log is not None:
        log(reason)
    return RuntimeChoice(best, reason, timings, built.get(best), micro[best])


def _has_ort() -> bool:
    from medfeat.export.runtimes.ort_session import available_providers

    return "CPUExecutionProvider" in available_providers()


def _exported(backbone: Backbone, input_size: Sequence[int], precision: str, cache: ArtefactCache) -> bool:
    fields = onnx_key_fields(backbone, input_size=tuple(input_size), precision=precision)
    return cache.lookup(artefact_key(fields)) is not None


def _timing_fields(backbone: Backbone, name: str, device: str, precision: str, input_size: Sequence[int],
                   batch_size: int) -> dict[str, Any]:
    from medfeat.export.runtimes.ort_session import available_providers

    model = onnx_key_fields(backbone, input_size=tuple(input_size), precision=precision)
    dev = check_device(device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor()} x{os.cpu_count()}"
    ort = None
    if available_providers():
        import onnxruntime

        ort = onnxruntime.__version__
    return {"kind": "timing", "model": model, "runtime": name, "device": where, "batch": int(batch_size),
            "threads": torch.get_num_threads(), "onnxruntime": ort}


def _timing_cached(backbone: Backbone, name: str, device: str, precision: str, input_size: Sequence[int],
                   batch_size: int, cache: ArtefactCache) -> bool:
    fields = _timing_fields(backbone, name, device, precision, input_size, batch_size)
    return cache.lookup(artefact_key(fields)) is not None


def _timed(backbone: Backbone, name: str, device: str, precision: str, input_size: Sequence[int],
           batch_size: int, cache: ArtefactCache, timings: dict[str, float], micro: dict[str, int],
           built: dict[str, Runtime]) -> float:
    """Seconds per item of ``name`` at its faster of one item and ``batch_size`` items per
    call (cached, else measured now; the count goes into ``micro``); the built runtime goes
    into ``built`` when it had to be built."""
    fields = _timing_fields(backbone, name, device, precision, input_size, batch_size)
    found = cache.lookup(artefact_key(fields))
    if found is not None:
        record = json.loads((found / TIMING_FILE).read_text())
        if "unavailable" in record:  # failed before with these versions: not tried again
            raise RuntimeUnavailableError(f"{record['unavailable']} (recorded in the artefact cache)")
        timings[name] = float(record["seconds_per_item"])
        micro[name] = int(record.get("micro_batch", batch_size))
        return timings[name]
    try:
        runtime = make_runtime(backbone, name, device=device, precision=precision, input_size=tuple(input_size),
                               cache_dir=str(cache.root))
    except RuntimeUnavailableError as exc:
        _record(cache, fields, {"unavailable": one_line(exc, 300)})
        raise
    built[name] = runtime
    by_size = {b: _measure(runtime, backbone, input_size, b) for b in sorted({1, batch_size})}
    micro[name] = min(by_size, key=lambda b: by_size[b])
    timings[name] = by_size[micro[name]]
    _record(cache, fields, {"seconds_per_item": timings[name], "micro_batch": micro[name],
                            "seconds_per_item_by_batch": {str(b): v for b, v in by_size.items()}})
    return timings[name]


def _record(cache: ArtefactCache, fields: dict[str, Any], record: dict[str, Any]) -> None:
    """Keep a timing (or why the runtime could not be built) with the exports."""

    def write(tmp: Path) -> None:
        (tmp / TIMING_FILE).write_text(json.dumps(record) + "\n")

    cache.get_or_build(fields, write)


def _measure(runtime: Runtime, backbone: Backbone, input_size: Sequence[int], batch_size: int) -> float:
    """Median seconds per item over repeated batches of seeded random input (one warm-up)."""
    shape = (batch_size, backbone.spec.in_channels, *input_size)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    runtime(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_REPEATS or time.perf_counter() - start < MIN_SECONDS:
        t0 = time.perf_counter()
        runtime(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / batch_size

"""CPU runtimes benchmark: eager vs ONNX Runtime vs compiled PyTorch, same process, same inputs.

Models at real input sizes: a 2D ViT (``dinov2_vitb14`` at 224^2) and a 3D encoder
(``swin_unetr_encoder`` at 96^3), truncated at their last tap, random init (throughput does
not depend on the weights). Each runtime gets the same fixed input batch; after warm-up the
timed loop runs for at least ``--seconds``; items/s and the ratio to eager are reported, with
each runtime's max-norm relative error against eager fp32 (a fast-but-wrong runtime shows).

Usage::

    python benchmarks/bench_runtimes.py --markdown benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# model, batch, input size (None = the spec's)
CASES = [("dinov2_vitb14", 4, None), ("swin_unetr_encoder", 1, None), ("sam_med3d", 1, None)]
DEFAULT_MODELS = ("dinov2_vitb14", "swin_unetr_encoder")
RUNTIMES = ("eager", "onnxruntime", "compiled")


def time_calls(run, x: torch.Tensor, seconds: float, warmup: int) -> tuple[float, int]:
    """(seconds per call, calls) of ``run(x)`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run(x)
    calls, start = 0, time.perf_counter()
    while True:
        run(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 2:
            return elapsed / calls, calls


def max_rel(ref: dict, got: dict) -> float:
    return max(float(np.abs(got[t] - ref[t]).max() / max(np.abs(ref[t]).max(), 1e-30)) for t in ref)


def bench_case(name: str, batch: int, size, args) -> dict:
    from medfeat.export.backbones.registry import create_backbone, get_spec
    from medfeat.export.runtimes.factory import make_runtime
    from medfeat.export.runtimes.onnx_export import random_input

    spec = get_spec(name)
    last = spec.tap_table(**(spec.tiny_config if args.tiny else {}))[-1].name
    backbone = create_backbone(name, [last], tiny=args.tiny)
    x = random_input(backbone, batch, size, seed=7)
    row = {"model": name, "tap": last, "input": list(x.shape[1:]), "batch": batch, "runtimes": {}}
    ref = None
    for runtime_name in args.runtimes:
        try:
            t0 = time.perf_counter()
            runtime = make_runtime(backbone, runtime_name, input_size=size, cache_dir=args.cache_dir,
                                   threads=args.threads)
            out = runtime(x)  # first call: compiles (compiled) / builds the session (onnxruntime)
            setup = time.perf_counter() - t0
            ref = out if runtime_name == "eager" else ref
            per_call, calls = time_calls(runtime, x, args.seconds, args.warmup)
        except Exception as exc:  # noqa: BLE001 - record it and go on
            row["runtimes"][runtime_name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            print(f"{name} {runtime_name}: {row['runtimes'][runtime_name]['error']}", flush=True)
            continue
        entry = {"items_per_s": batch / per_call, "s_per_item": per_call / batch, "calls": calls,
                 "setup_s": setup, "max_rel_vs_eager": max_rel(ref, out) if ref is not None else None}
        row["runtimes"][runtime_name] = entry
        print(f"{name} {runtime_name}: {entry['items_per_s']:.2f} items/s (setup {setup:.0f}s, {calls} calls)",
              flush=True)
    eager = row["runtimes"].get("eager", {}).get("items_per_s")
    for entry in row["runtimes"].values():
        if eager and "items_per_s" in entry:
            entry["vs_eager"] = entry["items_per_s"] / eager
    return row


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"## Runtimes on the CPU: eager vs ONNX Runtime vs compiled PyTorch ({result['date']})", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {env['machine']}, {env['cpu_count']} logical cores, {env['threads']} threads per runtime, "
             f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, load average {env['load_start']} at start "
             "(shared machine: absolute figures are noisy, ratios within one run are the point).  ",
             "Same process, same fixed input batch for every runtime; fp32; random init; timed after "
             f"{result['warmup']} warm-up call(s) for at least {result['seconds']} s. "
             "Setup = export + parity check + session build (onnxruntime) or compilation (compiled), "
             "first call included; the export is cached for later runs.", "",
             "| model | input | batch | runtime | items/s | vs eager | setup (s) | max rel err vs eager |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for row in result["models"]:
        for name, r in row["runtimes"].items():
            shape = "x".join(map(str, row["input"]))
            if "error" in r:
                lines.append(f"| {row['model']} | {shape} | {row['batch']} | {name} | failed: {r['error'][:80]} | | | |")
                continue
            rel = "-" if r["max_rel_vs_eager"] is None or name == "eager" else f"{r['max_rel_vs_eager']:.1e}"
            lines.append(f"| {row['model']} | {shape} | {row['batch']} | {name} | {r['items_per_s']:.2f} | "
                         f"{r.get('vs_eager', float('nan')):.2f}x | {r['setup_s']:.0f} | {rel} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="subset of: " + ", ".join(c[0] for c in CASES))
    parser.add_argument("--runtimes", nargs="*", default=list(RUNTIMES))
    parser.add_argument("--seconds", type=float, default=8.0, help="minimum timed seconds per runtime")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and ORT (default: all cores)")
    parser.add_argument("--cache-dir", default=None, help="artefact cache (default: a temporary directory)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a smoke test of this script)")
    parser.add_argument("--out", default="benchmarks/results/bench_runtimes_cpu.json")
    parser.add_argument("--markdown", default=None, help="append the table to this file (RESULTS.md)")
    args = parser.parse_args()
    import onnxruntime
    from gpu_runtimes import load_families_tolerantly  # this script's folder is on sys.path

    skipped = load_families_tolerantly()
    args.threads = args.threads or os.cpu_count()
    torch.set_num_threads(args.threads)
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="medfeat-bench-")
    load = os.getloadavg()[0]
    wanted = args.models or DEFAULT_MODELS
    cases = [c for c in CASES if c[0] in wanted]
    models = [bench_case(n, b, s, args) for n, b, s in cases]
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv), "seconds": args.seconds, "warmup": args.warmup,
        "env": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
                "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                "python": platform.python_version(), "load_start": round(load, 2),
                "skipped_families": skipped},
        "models": models,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()

"""GPU runtimes benchmark: bf16 eager vs compiled PyTorch (vs ONNX Runtime) per model, as a
fraction of the device's measured bf16 matrix rate.

For each model at its real input size: items/s of

* ``eager`` bf16 (autocast, channels-last for conv nets, inference mode);
* ``compiled`` bf16 (torch.compile, mode reduce-overhead = CUDA graphs);
* ``onnxruntime``: CUDA execution provider when onnxruntime-gpu is installed (IO binding);
  otherwise the CPU provider at fp32 on the host's cores, reported as such (the lent H100
  machine has the CPU build of onnxruntime only).

Model FLOPs per item are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmul,
conv and attention FLOPs, 2 per multiply-add), and the achieved rate is divided by a bf16
8192^3 matmul measured in the same process. Every runtime's features are checked against
eager fp32 (max-norm relative error) so a fast-but-wrong runtime shows.

Usage::

    python benchmarks/gpu_runtimes.py --out benchmarks/results/gpu_runtimes.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name, batch for the GPU runtimes, batch for ORT on the CPU
CASES = [("dinov2_vitb14", 128, 8), ("sam_med3d", 8, 1), ("swin_unetr_encoder", 8, 1)]


def load_families_tolerantly() -> list[str]:
    """Load the registry (it skips families whose optional package is missing) and list those."""
    from medfeat.export.backbones import registry

    registry.list_backbones()
    return [f"{name} ({why})" for name, why in sorted(registry._UNAVAILABLE.items())]


def matmul_rate(n: int = 8192, iters: int = 30) -> float:
    """Measured bf16 dense matmul rate, FLOP/s (random data, n^3, 2 FLOP per MAC)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3)


def count_flops(backbone, x: torch.Tensor) -> float:
    """FLOPs of one forward of ``x`` (batch 1), counted by medfeat's FlopCounterMode wrapper."""
    from medfeat.export.backbones.flops import model_flops

    return float(model_flops(backbone, x))


def time_runtime(runtime, x: torch.Tensor, min_seconds: float, warmup: int) -> tuple[float, int]:
    """(seconds per call, calls) after ``warmup`` calls; the runtime returns host arrays,
    so each call is synchronised."""
    for _ in range(warmup):
        runtime(x)
    calls, start = 0, time.perf_counter()
    while True:
        runtime(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 3:
            return elapsed / calls, calls


def max_rel(ref: dict, got: dict) -> float:
    return max(float(np.abs(got[t] - ref[t]).max() / max(np.abs(ref[t]).max(), 1e-30)) for t in ref)


def bench_model(name: str, batch: int, ort_batch: int, args) -> dict:
    from medfeat.export.backbones.registry import create_backbone, get_spec
    from medfeat.export.runtimes.factory import make_runtime
    from medfeat.export.runtimes.onnx_export import random_input
    from medfeat.export.runtimes.ort_session import available_providers

    spec = get_spec(name)
    last = spec.tap_table()[-1].name
    backbone = create_backbone(name, [last]).cuda().eval()
    flops = count_flops(backbone, random_input(backbone, 1, device="cuda")) if not args.no_flops else float("nan")
    x = random_input(backbone, batch, device="cuda")
    with torch.inference_mode():
        ref = {k: v.float().cpu().numpy() for k, v in backbone(x).items()}
    row = {"model": name, "tap": last, "input": list(x.shape[1:]), "batch": batch, "gflop_per_item": flops / 1e9,
           "runtimes": {}}
    plans = [("eager", "bf16", "cuda", x), ("compiled", "bf16", "cuda", x)]
    if "CUDAExecutionProvider" in available_providers():
        plans.append(("onnxruntime", "fp32", "cuda", x))
    elif not args.no_ort:
        plans.append(("onnxruntime", "fp32", "cpu", x[:ort_batch].cpu()))
    for runtime_name, precision, device, inp in plans:
        label = f"{runtime_name}-{device}-{precision}"
        try:
            t0 = time.perf_counter()
            runtime = make_runtime(backbone, runtime_name, device=device, precision=precision,
                                   cache_dir=args.cache_dir, threads=os.cpu_count())
            first = runtime(inp)
            setup = time.perf_counter() - t0
            per_call, calls = time_runtime(runtime, inp, args.seconds, args.warmup)
        except Exception as exc:  # noqa: BLE001 - record and go on to the next runtime
            row["runtimes"][label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            print(f"{name} {label}: {row['runtimes'][label]['error']}", flush=True)
            continue
        items = inp.shape[0] / per_call
        rel = max_rel({k: v[: inp.shape[0]] for k, v in ref.items()}, first)
        entry = {"items_per_s": items, "batch": int(inp.shape[0]), "calls": calls, "setup_s": setup,
                 "max_rel_vs_eager_fp32": rel}
        if device == "cuda":
            entry["tflops"] = items * flops / 1e12
            entry["fraction_of_matmul"] = items * flops / args.peak
        row["runtimes"][label] = entry
        print(f"{name} {label}: {items:.1f} items/s, {flops / 1e9:.1f} GFLOP/item, rel {rel:.1e}, setup {setup:.0f}s",
              flush=True)
        del runtime
        torch.cuda.empty_cache()
    return row


AB_CASES = [("dinov2_vitb14", 128), ("sam_med3d", 8), ("resnet50", 128), ("unigradicon", 1)]


def channels_last_ab(seconds: float = 2.0) -> None:
    """Eager bf16 items/s with the runtime's memory-format rule vs plain contiguous."""
    from medfeat.export.backbones.registry import create_backbone, get_spec
    from medfeat.export.runtimes.factory import EagerRuntime
    from medfeat.export.runtimes.onnx_export import random_input

    for name, batch in AB_CASES:
        try:
            backbone = create_backbone(name, [get_spec(name).tap_table()[-1].name])
        except ImportError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        x = random_input(backbone, batch, device="cuda")
        for variant in ("rule", "contiguous"):
            runtime = EagerRuntime(backbone, "cuda", "bf16")
            if variant == "contiguous":
                runtime.memory_format = torch.contiguous_format
                runtime.backbone.to(memory_format=torch.contiguous_format)
            per_call, _ = time_runtime(runtime, x, seconds, warmup=3)
            print(f"{name} {variant} ({runtime.memory_format}): {batch / per_call:.1f} items/s", flush=True)


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"## Runtimes on the GPU: bf16 eager vs compiled vs ONNX Runtime ({result['date']})", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {env['gpu']}, {env['cpu_count']} CPU cores, torch {env['torch']}, "
             f"onnxruntime {env['onnxruntime']} (providers: {', '.join(env['providers'])}).  ",
             f"Measured bf16 matmul rate (8192^3, random data): **{result['matmul_tflops']:.0f} TFLOP/s**. "
             "FLOPs per item from FlopCounterMode; random init; features checked against eager fp32 "
             "(max-norm relative error).", ""]
    if env["skipped_families"]:
        lines += [f"Families not importable here (package missing): {', '.join(env['skipped_families'])}.", ""]
    lines += ["| model | input | GFLOP/item | runtime | batch | items/s | TFLOP/s | of matmul rate | rel err vs fp32 |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in result["models"]:
        for label, r in row["runtimes"].items():
            if "error" in r:
                lines.append(f"| {row['model']} | {row['input']} | {row['gflop_per_item']:.1f} | {label} | | "
                             f"failed: {r['error'][:80]} | | | |")
                continue
            tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
            frac = f"{100 * r['fraction_of_matmul']:.1f}%" if "fraction_of_matmul" in r else "-"
            lines.append(f"| {row['model']} | {'x'.join(map(str, row['input']))} | {row['gflop_per_item']:.1f} | "
                         f"{label} | {r['batch']} | {r['items_per_s']:.1f} | {tf} | {frac} | "
                         f"{r['max_rel_vs_eager_fp32']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="subset of: " + ", ".join(c[0] for c in CASES))
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per runtime")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cache-dir", default=None, help="artefact cache (ONNX exports)")
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime on the CPU")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--channels-last-ab", action="store_true",
                        help="only compare eager bf16 with and without channels-last")
    parser.add_argument("--out", default="benchmarks/results/gpu_runtimes.json")
    parser.add_argument("--markdown", default=None, help="also append the table to this file (RESULTS.md)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_runtimes.py needs a CUDA GPU")
    import onnxruntime

    skipped = load_families_tolerantly()
    if args.channels_last_ab:
        channels_last_ab()
        return
    args.peak = matmul_rate()
    print(f"bf16 matmul: {args.peak / 1e12:.0f} TFLOP/s", flush=True)
    cases = [c for c in CASES if args.models is None or c[0] in args.models]
    from medfeat.export.backbones.registry import list_backbones

    models = []
    for name, batch, ort_batch in cases:
        if name not in list_backbones():
            continue
        try:
            models.append(bench_model(name, batch, ort_batch, args))
        except ImportError as exc:  # a family whose package this machine lacks (monai, ...)
            skipped.append(f"{name} ({exc.name})")
            print(f"{name}: skipped, {exc}", flush=True)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "matmul_tflops": args.peak / 1e12,
        "env": {"gpu": torch.cuda.get_device_name(0), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
                "python": platform.python_version(), "skipped_families": skipped},
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

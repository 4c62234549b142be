"""uniGradICON at its real input size: truncated taps against the full network.

Each case runs in a fresh subprocess, so its peak memory is its own. A case builds
``create_backbone("unigradicon", [tap])`` (random init: timing does not depend on the
weights), makes one (1, 2, 175, 175, 175) float32 pair and runs ``--warmup`` untimed then
``--repeats`` timed passes under ``torch.inference_mode``. ``D.phi`` is the untruncated
``regis_net`` (all four stages and every warp).

Figures per case: wall seconds and, on the CPU, process CPU seconds (user + system, less
sensitive to other load on a shared machine); memory as peak RSS (CPU) or peak CUDA
allocation (GPU), in total and added by the forward passes.

Usage::

    python benchmarks/bench_unigradicon.py [--cases A.enc.2 B.phi C.enc.2 D.phi] [--repeats 2]
        [--warmup 1] [--threads 2] [--device cpu|cuda] [--size 175]
        [--json benchmarks/results/unigradicon_cpu.json] [--results-md benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_CASES = ("A.enc.2", "B.phi", "C.enc.2", "D.phi")
WHAT = {
    "A.enc.2": "stage A (44^3) encoder level 2 of 5",
    "B.phi": "stages A, B (half the cascade) + their map at 175^3",
    "C.enc.2": "A, B, warp, stage C (175^3) encoder level 2 of 5",
    "D.phi": "full regis_net (4 stages, 3 warps)",
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _memory_mib(device: str) -> float:
    """Peak so far: RSS on the CPU, CUDA allocation on the GPU."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(tap: str, repeats: int, warmup: int, threads: int, size: int, device: str) -> dict:
    """Time one tap in this process; returns seconds and MiB."""
    import torch

    from medfeat.export.backbones.registry import create_backbone

    torch.set_num_threads(threads)
    backbone = create_backbone("unigradicon", [tap]).to(device)
    params = sum(p.numel() for p in backbone.parameters())
    pair = torch.rand(1, 2, size, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else _rss_mib()
    wall, cpu = [], []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            out = backbone(pair)
            sync()
            if i >= warmup:
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
    peak = _memory_mib(device)
    return {"tap": tap, "what": WHAT.get(tap, ""), "parameters": params, "wall_s": wall, "cpu_s": cpu,
            "median_wall_s": statistics.median(wall), "median_cpu_s": statistics.median(cpu),
            "peak_mib": round(peak), "before_forward_mib": round(before),
            "added_by_forward_mib": round(peak - before), "out_dim": int(out[tap].shape[1])}


def _environment(threads: int, device: str) -> dict:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    return {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "device": device,
            "device_name": name, "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}


def _markdown(env: dict, size: int, rows: list[dict], command: str) -> str:
    full = next((r for r in rows if r["tap"] == "D.phi"), None)
    cpu = env["device"] == "cpu"
    memory = "peak RSS" if cpu else "peak CUDA alloc"
    lines = [f"\n## uniGradICON: truncated taps vs the full network, {size}^3 pair, "
             f"{env['device'].upper()} ({env['date_utc']} UTC)\n",
             f"Command: `{command}`  ",
             f"Machine: {env['device_name']}, {env['threads']} torch threads, torch {env['torch']}, "
             f"1-min load average {env['load_avg_1m_at_end']} at the end.  ",
             f"Random init (timing does not depend on the weights); batch 1; median of {env['repeats']} "
             f"timed pass(es) after {env['warmup']} warm-up; each case in its own process.\n",
             f"| tap | what runs | params | wall (s) | CPU (s) | vs full | {memory} (MiB) | added by forward (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        key = "median_cpu_s" if cpu else "median_wall_s"
        ratio = f"{r[key] / full[key]:.3f}x" if full else "-"
        cpu_s = f"{r['median_cpu_s']:.2f}" if cpu else "-"
        lines.append(f"| `{r['tap']}` | {r['what']} | {r['parameters'] / 1e6:.1f} M | {r['median_wall_s']:.4g} | "
                     f"{cpu_s} | {ratio} | {r['peak_mib']} | {r['added_by_forward_mib']} |")
    lines.append(f"\n'vs full' compares {'CPU' if cpu else 'wall'} seconds with `D.phi`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=175)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None, help="default benchmarks/results/unigradicon_<device>.json")
    parser.add_argument("--results-md", default="benchmarks/RESULTS.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: run one case, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args.one, args.repeats, args.warmup, args.threads, args.size, args.device)))
        return
    rows = []
    for tap in args.cases:
        child = [sys.executable, __file__, "--one", tap, "--repeats", str(args.repeats), "--warmup",
                 str(args.warmup), "--threads", str(args.threads), "--size", str(args.size), "--device", args.device]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"case {tap} failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    env = {**_environment(args.threads, args.device), "repeats": args.repeats, "warmup": args.warmup}
    command = "python benchmarks/bench_unigradicon.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = _markdown(env, args.size, rows, command.strip())
    out_json = Path(args.json or f"benchmarks/results/unigradicon_{args.device}.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"environment": env, "size": args.size, "cases": rows}, indent=2))
    header = "" if Path(args.results_md).exists() else "# Benchmark results\n"
    with open(args.results_md, "a") as fh:  # append: other benchmarks write here too
        fh.write(header + report)
    print(report)


if __name__ == "__main__":
    main()

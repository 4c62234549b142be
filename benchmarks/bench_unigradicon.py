"""uniGradICON at its real input size on the CPU: truncated taps against the full network.

Each case runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) is its
own. A case builds ``create_backbone("unigradicon", [tap])`` (random init: timing does not
depend on the weights), makes one (1, 2, 175, 175, 175) float32 pair and runs ``--warmup``
untimed then ``--repeats`` timed passes under ``torch.inference_mode``. ``D.phi`` is the
untruncated ``regis_net`` (all four stages and every warp).

Usage::

    python benchmarks/bench_unigradicon.py [--cases A.enc.2 B.phi C.enc.2 D.phi] [--repeats 2] [--warmup 1]
        [--threads 2] [--json benchmarks/results/unigradicon_cpu.json] [--results-md benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import json
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
    "B.phi": "stages A, B (half the cascade) + warp to 175^3",
    "C.enc.2": "A, B, warp, stage C (175^3) encoder level 2 of 5",
    "D.phi": "full regis_net (4 stages, 3 warps)",
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(tap: str, repeats: int, warmup: int, threads: int, size: int) -> dict:
    """Time one tap in this process; returns seconds and MiB."""
    import torch

    from medfeat.export.registry import create_backbone

    torch.set_num_threads(threads)
    backbone = create_backbone("unigradicon", [tap])
    params = sum(p.numel() for p in backbone.parameters())
    pair = torch.rand(1, 2, size, size, size, generator=torch.Generator().manual_seed(0))
    before = _rss_mib()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            out = backbone(pair)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tap": tap, "what": WHAT.get(tap, ""), "parameters": params, "seconds": times,
            "median_s": statistics.median(times), "peak_rss_mib": round(peak),
            "rss_before_forward_mib": round(before), "peak_added_by_forward_mib": round(peak - before),
            "out_dim": int(out[tap].shape[1])}


def _environment(threads: int) -> dict:
    import torch

    return {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "device": "cpu",
            "cpu": platform.processor() or platform.machine(), "threads": threads,
            "python": platform.python_version(), "torch": torch.__version__,
            "load_avg_1m_at_start": round(__import__("os").getloadavg()[0], 2)}


def _markdown(env: dict, size: int, rows: list[dict], command: str) -> str:
    full = next((r for r in rows if r["tap"] == "D.phi"), None)
    lines = [f"\n## uniGradICON: truncated taps vs the full network, {size}^3 pair, CPU ({env['date_utc']} UTC)\n",
             f"Command: `{command}`  ",
             f"Machine: {env['cpu']}, {env['threads']} torch threads, torch {env['torch']}, "
             f"load average {env['load_avg_1m_at_start']} at start (shared machine).  ",
             f"Random init (timing does not depend on the weights); batch 1; median of "
             f"{env['repeats']} timed pass(es) after {env['warmup']} warm-up; peak RSS per case in its own process.\n",
             "| tap | what runs | params | time (s) | vs full | peak RSS (MiB) | added by forward (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['median_s'] / full['median_s']:.2f}x" if full else "-"
        lines.append(f"| `{r['tap']}` | {r['what']} | {r['parameters'] / 1e6:.1f} M | {r['median_s']:.2f} | "
                     f"{ratio} | {r['peak_rss_mib']} | {r['peak_added_by_forward_mib']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=175)
    parser.add_argument("--json", default="benchmarks/results/unigradicon_cpu.json")
    parser.add_argument("--results-md", default="benchmarks/RESULTS.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: run one case, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args.one, args.repeats, args.warmup, args.threads, args.size)))
        return
    rows = []
    for tap in args.cases:
        child = [sys.executable, __file__, "--one", tap, "--repeats", str(args.repeats),
                 "--warmup", str(args.warmup), "--threads", str(args.threads), "--size", str(args.size)]
        done = subprocess.run(child, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    env = {**_environment(args.threads), "repeats": args.repeats, "warmup": args.warmup}
    command = "python benchmarks/bench_unigradicon.py " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"environment": env, "size": args.size, "cases": rows}, indent=2))
    header = "" if Path(args.results_md).exists() else "# Benchmark results\n"
    with open(args.results_md, "a") as fh:  # append: other benchmarks write here too
        fh.write(header)
        fh.write(_markdown(env, args.size, rows, command.strip()))
    print(_markdown(env, args.size, rows, command.strip()))


if __name__ == "__main__":
    main()

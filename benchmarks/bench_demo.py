"""``medfeat demo``'s wall time, stage by stage, for the README's "under 3 minutes on 2 idle cores".

Runs the demo experiment in this process (``run_experiment(demo_experiment(...))``, what
``medfeat demo`` runs) and stamps every log line it prints with the wall clock and the
process CPU time (user + system): a line marks the end of a stage (cohort written, a model
trained, one extraction, one probe), so the differences between stamps are the stages' costs.
The load average before and after is recorded: a figure taken on a busy machine says so.

Stages are grouped as: synthesis, UNet training, registration training, extraction (per
model), probes, findings and report (the rest). CPU seconds are less sensitive to other load
than wall seconds, but two-thread OpenMP regions spin while they wait for a core, so on a
busy machine both grow; take the figure on a quiet one.

Usage::

    python benchmarks/bench_demo.py [--subjects 128] [--out /tmp/demo-bench] [--threads N]
        [--json benchmarks/results/demo_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _stage(previous: str, line: str) -> str:
    """The stage that ran between two log lines: the one ``previous`` announced (synthesis,
    a training), else the one ``line`` reports the end of (an extraction, a probe)."""
    if previous.startswith("cohort: synthesising"):
        return "synthesis"
    if ": training on " in previous:
        return f"training {previous.split(':')[0]}"
    if " extracted, " in line:
        return f"extraction {line.split()[0]}"
    if " auc=" in line:
        return "probes"
    return "other"


def run(subjects: int, out: Path, threads: int | None = None) -> dict:
    """Run the demo once (with ``threads`` torch threads instead of the demo's, when given:
    the numbers then differ from the README's); returns per-stage wall and CPU seconds."""
    from dataclasses import replace

    from medfeat.studies.demo import demo_experiment
    from medfeat.studies.experiment import run_experiment

    exp = demo_experiment(subjects)
    if threads:
        for model in exp.models:
            if "train_args" in model.extra:
                model.extra["train_args"]["threads"] = threads
        exp = replace(exp, threads=threads)

    load_before = os.getloadavg()
    stamps: list[tuple[str, float, float]] = []
    t0, c0 = time.perf_counter(), _cpu()
    last = [t0, c0]
    stages: dict[str, dict[str, float]] = {}

    previous = [""]

    def log(line: str) -> None:
        now, cpu = time.perf_counter(), _cpu()
        name = _stage(previous[0], line)
        previous[0] = line
        entry = stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        entry["wall_s"] += now - last[0]
        entry["cpu_s"] += cpu - last[1]
        stamps.append((line, round(now - t0, 3), round(cpu - c0, 3)))
        last[:] = [now, cpu]
        print(f"[{now - t0:7.1f} s wall, {cpu - c0:7.1f} s cpu] {line}", flush=True)

    run_experiment(exp, out, log=log)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    rest = stages.setdefault("findings, results, report", {"wall_s": 0.0, "cpu_s": 0.0})
    rest["wall_s"] += time.perf_counter() - last[0]
    rest["cpu_s"] += _cpu() - last[1]
    return {"subjects": subjects, "threads": exp.threads, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "stages": {k: {m: round(v, 2) for m, v in d.items()} for k, d in stages.items()},
            "load_before": [round(v, 2) for v in load_before],
            "load_after": [round(v, 2) for v in os.getloadavg()], "lines": stamps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None, help="Demo output folder (default: a temporary one).")
    ap.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    ap.add_argument("--threads", type=int, default=None,
                    help="Torch threads instead of the demo's 2 (for cost estimates; other numbers).")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="medfeat-demo-bench-"))
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)  # a rerun must not reuse the cohort, weights or store
    result = run(args.subjects, out, args.threads)
    result.update({"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores", "command": "medfeat demo"})
    print(json.dumps({k: v for k, v in result.items() if k != "lines"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

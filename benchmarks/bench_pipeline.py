"""Pipeline vs a plain sequential loop; pipeline efficiency; 1 vs 2 Dask workers; memory.

On one synthetic knee cohort and one model (default: the task UNet at 64^3):

* **sequential**: for each item, read -> preprocess -> infer (batch 1) -> write, nothing
  overlapped.
* **pipeline**: ``medfeat.engine.pipeline.extract`` with the given scheduler(s): batches, stages
  overlapped, bounded window.
* **ratio** = pipeline items/s / sequential items/s.
* **efficiency** = pipeline items/s / items/s of the slowest stage alone (1.0 = the pipeline
  hides every other stage behind the slowest one), each stage alone run on the *same*
  executor as the pipeline, alternating with the pipeline runs, ``--repeats`` times (default
  3), medians reported.
* **memory**: peak RSS of the driver and of each worker (psutil), and with ``--memory-demo``
  a cohort many times the worker's memory limit: bounded memory means the peak does not grow
  with the cohort.

The measurements live in :mod:`medfeat.bench.pipeline` (also the ``pipeline`` stage of
``medfeat bench``); this script adds the cohort, the JSON record and the RESULTS.md section.
Writes JSON to ``benchmarks/results/pipeline_<device>_<model>[_tiny]_<shape>.json`` and
replaces or appends its section of ``benchmarks/RESULTS.md``. Example::

    python benchmarks/bench_pipeline.py --subjects 12 --shape 64 --model unet3d --taps 3
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from medfeat.bench.pipeline import PipelineBenchConfig, compare, memory_demo, parse_kinds
from medfeat.cohorts.synth import synth_cohort

HERE = Path(__file__).parent


def _config(args: argparse.Namespace) -> PipelineBenchConfig:
    return PipelineBenchConfig(model=args.model, taps=(args.taps,), tiny=args.tiny, input_size=args.input_size,
                               device=args.device, batch=args.batch, threads=args.threads,
                               memory_limit=args.memory_limit, repeats=args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=12)
    ap.add_argument("--shape", type=int, default=64, help="scan edge in voxels (cube)")
    ap.add_argument("--model", default="unet3d")
    ap.add_argument("--taps", default="3")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--input-size", type=int, default=None, help="model input edge (cube)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="threads per worker")
    ap.add_argument("--memory-limit", default="4GB")
    ap.add_argument("--repeats", type=int, default=3, help="pipeline / stage-alone repeats (medians)")
    ap.add_argument("--kinds", default="threads:1,local:1,local:2", help="scheduler:workers list")
    ap.add_argument("--memory-demo", type=int, default=0,
                    help="also run a cohort of the scans repeated this many times (memory bound)")
    ap.add_argument("--no-record", action="store_true", help="print only; write no JSON / RESULTS.md")
    ap.add_argument("--work", default=None, help="folder for the cohort and stores (default: temp)")
    args = ap.parse_args()
    args.input_size = (args.input_size,) * 3 if args.input_size else None
    cfg = _config(args)
    kinds = parse_kinds(args.kinds)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_pipeline_"))
    t0 = time.perf_counter()
    manifest = synth_cohort(work / "cohort", subjects=args.subjects, seed=0, shape=(args.shape,) * 3)
    synth_s = time.perf_counter() - t0
    n = 2 * args.subjects
    load_start = os.getloadavg()
    runs = compare(manifest, work, cfg, kinds)
    demo = memory_demo(manifest, work, cfg, args.memory_demo) if args.memory_demo else None
    result = {"memory_demo": demo, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_average": {"start": [round(v, 2) for v in load_start],
                               "end": [round(v, 2) for v in os.getloadavg()]},
              "device": args.device, "args": {k: v for k, v in vars(args).items()},
              "cohort": {"scans": n, "shape": args.shape, "synth_s": synth_s,
                         "bytes_float32": int(n * args.shape ** 3 * 4)},
              "sequential": runs["sequential"], "pipeline": runs["pipeline"]}
    if not args.no_record:
        out = HERE / "results" / _json_name(args)
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        _write_results(result)
    print(json.dumps(result, indent=2, default=str))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def _json_name(args: argparse.Namespace) -> str:
    tiny = "_tiny" if args.tiny else ""
    return f"pipeline_{args.device.split(':')[0]}_{args.model}{tiny}_{args.shape}.json"


def _section(r: dict) -> str:
    a = r["args"]
    la = r["load_average"]
    lines = [f"## Pipeline vs sequential loop, {a['model']} tap {a['taps']} ({r['date']})\n",
             f"Command: `python benchmarks/bench_pipeline.py --subjects {a['subjects']} --shape {a['shape']} "
             f"--model {a['model']} --taps {a['taps']} --batch {a['batch']} --threads {a['threads']} "
             f"--device {a['device']} --kinds {a['kinds']} --repeats {a['repeats']} --memory-limit {a['memory_limit']}"
             f"{' --tiny' if a['tiny'] else ''}{' --memory-demo ' + str(a['memory_demo']) if a['memory_demo'] else ''}`  ",
             f"Machine: {r['machine']}; load average (1/5/15 min) {' / '.join(f'{v:.2f}' for v in la['start'])} "
             f"at the start, {' / '.join(f'{v:.2f}' for v in la['end'])} at the end. "
             f"Cohort: {r['cohort']['scans']} scans of {a['shape']}^3 "
             f"({r['cohort']['bytes_float32'] / 2**20:.0f} MiB as float32).  ",
             f"Sequential loop (batch 1, nothing overlapped): {r['sequential']['items_per_s']:.3g} items/s.\n",
             "| scheduler | workers x threads | items/s | vs sequential | read / preprocess / infer / write alone (items/s) "
             "| slowest | efficiency | model busy | peak RSS driver / worker (MiB) |",
             "|---|---|---:|---:|---|---|---:|---:|---:|"]
    for p in r["pipeline"]:
        al = p["alone_items_per_s"]
        lines.append(f"| {p['kind']} | {p['workers']} x {p['threads_per_worker']} | {p['items_per_s']:.3g} | "
                     f"{p['ratio_vs_sequential']:.2f}x | {' / '.join(f'{al[k]:.3g}' for k in ('read', 'preprocess', 'infer', 'write'))} "
                     f"| {p['slowest_stage']} | {p['efficiency']:.2f} | {p['infer_busy_fraction']:.2f} | "
                     f"{p['peak_rss_driver_mib']} / {p['peak_rss_worker_mib']} |")
    if r.get("memory_demo"):
        m = r["memory_demo"]
        lines.append(f"\nMemory bound (`--memory-demo {a['memory_demo']}`): {m['items']} items, "
                     f"{m['cohort_bytes_float32'] / 2**30:.2f} GiB of float32 scans = "
                     f"{m['cohort_over_limit']:.1f}x the worker's {a['memory_limit']} limit; peak worker RSS "
                     f"{m['peak_rss_worker_mib']} MiB, {m['items_per_s']:.2f} items/s.")
    lines.append(f"\nMedians of {a['repeats']} repeats; pipeline runs and stage-alone runs alternate on the same "
                 "executor. efficiency = pipeline items/s over the slowest stage's items/s alone, each stage "
                 "alone run on the same executor (same workers, threads, torch threads, cached model), same "
                 "items, same batches and window, its input prepared beforehand; model busy = the model's busy "
                 "seconds per worker over the pipeline's wall time (1.0: the other stages are hidden).  ")
    lines.append(f"JSON: `benchmarks/results/{_json_name(argparse.Namespace(**a))}`.\n")
    return "\n".join(lines) + "\n"


def _write_results(r: dict) -> None:
    """Replace this configuration's section of RESULTS.md (same heading up to the date), else append."""
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    a = r["args"]
    head = f"## Pipeline vs sequential loop, {a['model']} tap {a['taps']} ("
    new = _section(r)
    start = text.find(head)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + new
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + new + ("\n" + text[end + 1:] if end >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    main()

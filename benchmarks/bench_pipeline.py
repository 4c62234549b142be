"""Pipeline vs a plain sequential loop; pipeline efficiency; 1 vs 2 Dask workers; memory.

On one synthetic knee cohort and one model (default: the task UNet at 64^3):

* **sequential**: for each item, read -> preprocess -> infer (batch 1) -> write, nothing
  overlapped; also gives each stage's items/s *alone*.
* **pipeline**: ``medfeat.engine.extract`` with the given scheduler(s): batches, stages
  overlapped, bounded window.
* **ratio** = pipeline items/s / sequential items/s.
* **efficiency** = pipeline items/s / items/s of the slowest stage alone (1.0 = the pipeline
  hides every other stage behind the slowest one). Stages alone: read and preprocess
  timed per item, inference at the pipeline's batch size, write per chunk.
* **memory**: peak RSS of the driver and of each worker (psutil), for the cohort and for a
  cohort twice as large: bounded memory means the peak does not grow with the cohort.

Writes JSON to ``benchmarks/results/pipeline_<device>.json`` and appends a section to
``benchmarks/RESULTS.md``. Example::

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
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from medfeat.engine.extract import ExtractConfig, extract, read_manifest_rows
from medfeat.engine.items import Atlas, LoadTimer, load_item, plan_items
from medfeat.engine.pipeline import ModelConfig, get_model, make_executor
from medfeat.engine.readers import read_scan
from medfeat.engine.store import ArrayKey, FeatureStore
from medfeat.engine.synth import synth_cohort

HERE = Path(__file__).parent


class PeakRSS:
    """Samples the RSS of this process and its children every 0.2 s; keeps the peaks (MiB)."""

    def __init__(self) -> None:
        self.driver = 0.0
        self.children = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, me.memory_info().rss / 2**20)
                kids = [c.memory_info().rss / 2**20 for c in me.children(recursive=True)]
                self.children = max([self.children, *kids])
            except psutil.Error:
                pass
            time.sleep(0.2)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def sequential(manifest: Path, store: Path, args: argparse.Namespace) -> dict:
    """One item at a time, no overlap; per-stage seconds."""
    df, _ = read_manifest_rows(manifest)
    cfg = ModelConfig(args.model, (args.taps,), tiny=args.tiny, device=args.device, input_size=args.input_size)
    model = get_model(cfg)
    items, _ = plan_items(df, model.backbone.spec.input_kind, "none", "whole", Atlas.beside(manifest))
    fs = FeatureStore.create(store, chunk_items=args.batch)
    idx = fs.add_items(i.record() for i in items)
    key = ArrayKey(args.model, model.backbone.tap_names[0], "none-whole")
    fs.ensure_array(key, model.backbone.output_dims()[key.tap], {"model": args.model})
    import torch

    for item in items[:2]:  # warm-up (JIT compiles, allocator, first-call costs), not timed
        model.runtime(torch.from_numpy(load_item(item, model.backbone.spec, model.size, LoadTimer())[None]))
    t = {"read": 0.0, "preprocess": 0.0, "infer": 0.0, "write": 0.0}
    t0 = time.perf_counter()
    for i, item in zip(idx, items):
        timer = LoadTimer()
        x = load_item(item, model.backbone.spec, model.size, timer)
        t["read"] += timer.read
        t["preprocess"] += timer.preprocess
        s = time.perf_counter()
        out = model.runtime(torch.from_numpy(x[None]))
        t["infer"] += time.perf_counter() - s
        s = time.perf_counter()
        fs.write(key, [int(i)], out[key.tap])
        t["write"] += time.perf_counter() - s
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "items": len(items), "items_per_s": len(items) / wall, "stage_s": t}


def infer_alone(args: argparse.Namespace, n: int) -> float:
    """Items/s of inference alone at the pipeline's batch size (input already in memory)."""
    import torch

    model = get_model(ModelConfig(args.model, (args.taps,), tiny=args.tiny, device=args.device,
                                  input_size=args.input_size))
    x = torch.zeros((args.batch, model.backbone.spec.in_channels, *model.size))
    model.runtime(x)  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n:
        model.runtime(x)
        done += args.batch
    return done / (time.perf_counter() - t0)


def pipeline(manifest: Path, store: Path, args: argparse.Namespace, kind: str, workers: int) -> dict:
    cfg = ExtractConfig(str(manifest), str(store), args.model, (args.taps,), tiny=args.tiny, device=args.device,
                        input_size=args.input_size, batch_size=args.batch, chunk_items=args.batch * 2,
                        scheduler_kind=kind, workers=workers, threads_per_worker=args.threads,
                        memory_limit=args.memory_limit, progress=False)
    executor = make_executor(kind, workers=workers, threads_per_worker=args.threads,
                             memory_limit=args.memory_limit, device=args.device)
    try:
        # warm the workers (model build, imports, JIT) on a few items and a throwaway store
        import pandas as pd

        rows = pd.read_csv(manifest, dtype=str, keep_default_na=False).head(2 * args.batch)
        rows.to_csv(manifest.parent / "manifest_warm.csv", index=False)
        warm = ExtractConfig(**{**cfg.__dict__, "store": str(store) + ".warm",
                                "manifest": str(manifest.parent / "manifest_warm.csv")})
        extract(warm, executor=executor)
        with PeakRSS() as peak:
            rec = extract(cfg, executor=executor)
    finally:
        executor.close()
    n = rec["items"]["done"]
    wall = rec["timings"]["pipeline_wall"]
    return {"infer_busy_fraction": rec["timings"]["infer"] / max(workers, 1) / wall,
            "kind": kind, "workers": workers, "threads_per_worker": args.threads, "items": n,
            "wall_s": rec["timings"]["pipeline_wall"], "items_per_s": rec["items_per_s"],
            "stage_s": {k: rec["timings"][k] for k in ("read", "preprocess", "infer", "write")},
            "peak_rss_driver_mib": round(peak.driver), "peak_rss_worker_mib": round(peak.children)}


def memory_demo(manifest: Path, work: Path, args: argparse.Namespace) -> dict:
    """A cohort many times the worker's memory limit: every scan listed ``--memory-demo``
    times under new subject ids (the pipeline reads each row's file anew, so memory behaves
    as for distinct scans). Peak worker RSS must stay under the limit."""
    import pandas as pd

    from medfeat.engine.readers import read_scan

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    big = pd.concat([df.assign(subject=df["subject"] + f"_r{k}") for k in range(args.memory_demo)])
    big_manifest = manifest.parent / "manifest_big.csv"
    big.to_csv(big_manifest, index=False)
    scan_bytes = read_scan(manifest.parent / df["path"][0]).data.nbytes
    limit = _parse_bytes(args.memory_limit)
    r = pipeline(big_manifest, work / "big.zarr", args, "local", 1)
    return {"items": r["items"], "cohort_bytes_float32": int(len(big) * scan_bytes), "memory_limit_bytes": limit,
            "cohort_over_limit": len(big) * scan_bytes / limit, "peak_rss_worker_mib": r["peak_rss_worker_mib"],
            "items_per_s": r["items_per_s"]}


def _parse_bytes(text: str) -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(text))


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
    ap.add_argument("--kinds", default="threads:1,local:1,local:2", help="scheduler:workers list")
    ap.add_argument("--memory-demo", type=int, default=0,
                    help="also run a cohort of the scans repeated this many times (memory bound)")
    ap.add_argument("--no-record", action="store_true", help="print only; write no JSON / RESULTS.md")
    ap.add_argument("--work", default=None, help="folder for the cohort and stores (default: temp)")
    args = ap.parse_args()
    args.input_size = (args.input_size,) * 3 if args.input_size else None
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_pipeline_"))
    t0 = time.perf_counter()
    manifest = synth_cohort(work / "cohort", subjects=args.subjects, seed=0, shape=(args.shape,) * 3)
    synth_s = time.perf_counter() - t0
    n = 2 * args.subjects
    seq = sequential(manifest, work / "seq.zarr", args)
    # Inference alone is timed next to each pipeline run and the best rate kept: on a shared
    # machine the load changes from minute to minute, and the best rate gives the most
    # conservative (lowest) efficiency.
    infer_rates = [infer_alone(args, n)]
    runs = []
    for spec in args.kinds.split(","):
        kind, workers = spec.split(":")
        r = pipeline(manifest, work / f"pipe_{kind}_{workers}.zarr", args, kind, int(workers))
        infer_rates.append(infer_alone(args, n))
        runs.append(r)
    alone = {"read": n / seq["stage_s"]["read"], "preprocess": n / seq["stage_s"]["preprocess"],
             "infer": max(infer_rates), "write": n / max(seq["stage_s"]["write"], 1e-9)}
    slowest = min(alone, key=alone.get)
    for r in runs:
        r["ratio_vs_sequential"] = r["items_per_s"] / seq["items_per_s"]
        r["efficiency"] = r["items_per_s"] / alone[slowest]
    demo = memory_demo(manifest, work, args) if args.memory_demo else None
    result = {"memory_demo": demo, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
              "device": args.device, "args": {k: v for k, v in vars(args).items()},
              "cohort": {"scans": n, "shape": args.shape, "synth_s": synth_s,
                         "bytes_float32": int(n * args.shape ** 3 * 4)},
              "sequential": seq, "alone_items_per_s": alone, "infer_alone_samples": infer_rates, "slowest_stage": slowest, "pipeline": runs}
    if not args.no_record:
        out = HERE / "results" / _json_name(args)
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        _append_results(result)
    print(json.dumps(result, indent=2, default=str))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def _json_name(args: argparse.Namespace) -> str:
    tiny = "_tiny" if args.tiny else ""
    return f"pipeline_{args.device.split(':')[0]}_{args.model}{tiny}_{args.shape}.json"


def _append_results(r: dict) -> None:
    a = r["args"]
    lines = [f"\n## Pipeline vs sequential loop, {a['model']} tap {a['taps']} ({r['date']})\n",
             f"Command: `python benchmarks/bench_pipeline.py --subjects {a['subjects']} --shape {a['shape']} "
             f"--model {a['model']} --taps {a['taps']} --batch {a['batch']} --threads {a['threads']} "
             f"--device {a['device']} --kinds {a['kinds']} --memory-limit {a['memory_limit']}"
             f"{' --tiny' if a['tiny'] else ''}{' --memory-demo %d' % a['memory_demo'] if a['memory_demo'] else ''}`  ",
             f"Machine: {r['machine']}. Cohort: {r['cohort']['scans']} scans of {a['shape']}^3 "
             f"({r['cohort']['bytes_float32'] / 2**20:.0f} MiB as float32).  ",
             f"Sequential loop: {r['sequential']['items_per_s']:.2f} items/s. Stages alone (items/s): "
             + ", ".join(f"{k} {v:.1f}" for k, v in r["alone_items_per_s"].items())
             + f"; slowest: {r['slowest_stage']}.\n",
             "| scheduler | workers x threads | items/s | vs sequential | efficiency | model busy | peak RSS driver / worker (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for p in r["pipeline"]:
        lines.append(f"| {p['kind']} | {p['workers']} x {p['threads_per_worker']} | {p['items_per_s']:.2f} | "
                     f"{p['ratio_vs_sequential']:.2f}x | {p['efficiency']:.2f} | {p['infer_busy_fraction']:.2f} | "
                     f"{p['peak_rss_driver_mib']} / {p['peak_rss_worker_mib']} |")
    if r.get("memory_demo"):
        m = r["memory_demo"]
        lines.append(f"\nMemory bound (`--memory-demo {a['memory_demo']}`): {m['items']} items, "
                     f"{m['cohort_bytes_float32'] / 2**30:.2f} GiB of float32 scans = "
                     f"{m['cohort_over_limit']:.1f}x the worker's {a['memory_limit']} limit; peak worker RSS "
                     f"{m['peak_rss_worker_mib']} MiB, {m['items_per_s']:.2f} items/s.")
    lines.append("\nefficiency = pipeline items/s over the slowest stage's items/s alone (inference at the "
                 "same batch size, best of the samples taken beside each run); model busy = the model's "
                 "busy seconds per worker over the pipeline's wall time (1.0: the other stages are hidden).  ")
    lines.append(f"JSON: `benchmarks/results/{_json_name(argparse.Namespace(**a))}`.\n")
    with (HERE / "RESULTS.md").open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

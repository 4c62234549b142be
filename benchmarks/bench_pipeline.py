"""Pipeline vs a plain sequential loop; pipeline efficiency; 1 vs 2 Dask workers; memory.

On one synthetic knee cohort and one model (default: the task UNet at 64^3):

* **sequential**: for each item, read -> preprocess -> infer (batch 1) -> write, nothing
  overlapped; also gives each stage's items/s *alone*.
* **pipeline**: ``medfeat.engine.extract`` with the given scheduler(s): batches, stages
  overlapped, bounded window.
* **ratio** = pipeline items/s / sequential items/s.
* **efficiency** = pipeline items/s / items/s of the slowest stage alone (1.0 = the pipeline
  hides every other stage behind the slowest one). Each stage alone runs on the *same*
  executor as the pipeline (same workers, threads per worker, torch threads, cached model),
  on the same items in the same batches with the same bounded window, its input prepared
  beforehand: read = reading the scans; preprocess = resample + normalise of scans already
  in memory into the batch buffer; infer = the model on the preprocessed batches; write =
  the driver writing the chunks. Pipeline runs and stage-alone runs alternate, ``--repeats``
  times (default 3), and medians are reported, so load drift on a shared machine hits both.
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


def _window(executor) -> int:
    return 2 * executor.slots  # extract's default bounded window


def stage_jobs(manifest: Path, work: Path, args: argparse.Namespace, mcfg: ModelConfig) -> dict:
    """The items in the pipeline's batches, and each stage's input prepared in advance.

    Raw scans go to one ``.npy`` per item (the preprocess stage starts from voxels in
    memory: a page-cache copy of 1 MiB, negligible next to resampling), the preprocessed
    inputs to one ``(N, C, *size)`` ``.npy`` (the infer stage starts from the batch buffer).
    """
    import numpy as np

    df, _ = read_manifest_rows(manifest)
    model = get_model(mcfg)
    spec = model.backbone.spec
    items, _ = plan_items(df, spec.input_kind, "none", "whole", Atlas.beside(manifest))
    raw_dir = work / "stage_raw"
    raw_dir.mkdir(exist_ok=True)
    inputs = np.empty((len(items), spec.in_channels, *model.size), np.float32)
    raws = []
    for i, item in enumerate(items):
        vol = read_scan(item.channels[0].path)
        np.save(raw_dir / f"{i}.npy", vol.data)
        raws.append((str(raw_dir / f"{i}.npy"), vol.affine.tolist()))
        load_item(item, spec, model.size, LoadTimer(), out=inputs[i])
    np.save(work / "stage_inputs.npy", inputs)
    b = args.batch
    cuts = [(lo, min(lo + b, len(items))) for lo in range(0, len(items), b)]
    return {"items": items, "dims": model.backbone.output_dims(), "tap": model.backbone.tap_names[0],
            "read": [(items[lo:hi],) for lo, hi in cuts],
            "preprocess": [(mcfg, items[lo:hi], raws[lo:hi]) for lo, hi in cuts],
            "infer": [(mcfg, str(work / "stage_inputs.npy"), lo, hi) for lo, hi in cuts]}


# Stage tasks: each does one stage of run_batch on one batch (same code paths, same model).
def _read_task(items: list) -> int:
    from medfeat.engine.readers import read_scan

    for item in items:
        for ch in item.channels:
            read_scan(ch.path)
    return len(items)


def _preprocess_task(mcfg: ModelConfig, items: list, raws: list) -> int:
    import numpy as np

    from medfeat.engine.items import LoadTimer, load_item
    from medfeat.engine.pipeline import get_model
    from medfeat.engine.volume_io import Volume, affine_spacing

    model = get_model(mcfg)
    spec = model.backbone.spec
    timer = LoadTimer()
    for item, (path, affine) in zip(items, raws):
        a = np.asarray(affine, np.float64)
        timer.cache[item.channels[0].path] = Volume(np.load(path), a, affine_spacing(a))
    buf = np.empty((len(items), spec.in_channels, *model.size), np.float32)
    for row, item in enumerate(items):
        load_item(item, spec, model.size, timer, out=buf[row])
    return len(items)


def _infer_task(mcfg: ModelConfig, inputs: str, lo: int, hi: int) -> int:
    import numpy as np
    import torch

    from medfeat.engine.pipeline import get_model

    model = get_model(mcfg)
    x = np.ascontiguousarray(np.load(inputs, mmap_mode="r")[lo:hi])
    with model.lock:  # as run_batch: one batch at a time through the model
        model.runtime(torch.from_numpy(x))
    return hi - lo


STAGE_TASKS = {"read": _read_task, "preprocess": _preprocess_task, "infer": _infer_task}


def run_alone(executor, fn, jobs: list, window: int) -> float:
    """Items/s of ``fn(*job)`` over all jobs on ``executor``, at most ``window`` in flight."""
    t0 = time.perf_counter()
    pos, n, in_flight = 0, 0, set()
    while pos < len(jobs) or in_flight:
        while pos < len(jobs) and len(in_flight) < window:
            in_flight.add(executor.submit(fn, *jobs[pos]))
            pos += 1
        done, in_flight = executor.wait_first(in_flight)
        n += sum(f.result() for f in done)
    return n / (time.perf_counter() - t0)


def write_alone(store: Path, jobs: dict, args: argparse.Namespace) -> float:
    """Items/s of the driver's chunk writes (extract's ``_write_chunk``) of zero features."""
    import numpy as np

    from medfeat.engine.extract import _write_chunk
    from medfeat.engine.pipeline import BatchResult

    items, tap = jobs["items"], jobs["tap"]
    fs = FeatureStore.create(store, chunk_items=args.batch * 2)
    idx = fs.add_items(i.record() for i in items)
    key = ArrayKey(args.model, tap, "none-whole")
    fs.ensure_array(key, jobs["dims"][tap], {"model": args.model})
    chunk = args.batch * 2
    t0 = time.perf_counter()
    for c in range(0, len(items), chunk):
        batch = [(int(i), it) for i, it in zip(idx[c:c + chunk], items[c:c + chunk])]
        rows = {tap: np.zeros((len(batch), jobs["dims"][tap]), np.float32)}
        _write_chunk(fs, {tap: key}, [(batch, BatchResult([it.item_id for _, it in batch], rows, [], {}))])
    return len(items) / (time.perf_counter() - t0)


def _extract_cfg(manifest: Path, store: Path, args: argparse.Namespace, kind: str, workers: int) -> ExtractConfig:
    return ExtractConfig(str(manifest), str(store), args.model, (args.taps,), tiny=args.tiny, device=args.device,
                         input_size=args.input_size, batch_size=args.batch, chunk_items=args.batch * 2,
                         scheduler_kind=kind, workers=workers, threads_per_worker=args.threads,
                         memory_limit=args.memory_limit, progress=False)


def _warm(manifest: Path, store: Path, cfg: ExtractConfig, executor, args: argparse.Namespace) -> None:
    """Warm the workers (model build, imports, JIT) on a few items and a throwaway store."""
    import pandas as pd

    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False).head(2 * args.batch)
    rows.to_csv(manifest.parent / "manifest_warm.csv", index=False)
    warm = ExtractConfig(**{**cfg.__dict__, "store": str(store) + ".warm",
                            "manifest": str(manifest.parent / "manifest_warm.csv")})
    extract(warm, executor=executor)


def _pipeline_run(cfg: ExtractConfig, executor, workers: int) -> dict:
    with PeakRSS() as peak:
        rec = extract(cfg, executor=executor)
    wall = rec["timings"]["pipeline_wall"]
    return {"items": rec["items"]["done"], "wall_s": wall, "items_per_s": rec["items_per_s"],
            "infer_busy_fraction": rec["timings"]["infer"] / max(workers, 1) / wall,
            "stage_s": {k: rec["timings"][k] for k in ("read", "preprocess", "infer", "write")},
            "peak_rss_driver_mib": round(peak.driver), "peak_rss_worker_mib": round(peak.children)}


def measure(manifest: Path, work: Path, args: argparse.Namespace, kind: str, workers: int, jobs: dict) -> dict:
    """Pipeline and stages alone on one executor, alternating, ``args.repeats`` times; medians."""
    from statistics import median

    from medfeat.engine.extract import _torch_threads

    executor = make_executor(kind, workers=workers, threads_per_worker=args.threads,
                             memory_limit=args.memory_limit, device=args.device)
    name = f"{kind}_{workers}"
    threads = _torch_threads(workers) if kind == "local" else None
    # the pipeline's model config with its torch threads, so a worker that builds the model
    # first for a stage task builds it as the pipeline would
    mcfg = _extract_cfg(manifest, work, args, kind, workers).model_config(threads)
    tasks = {"read": jobs["read"], **{k: [(mcfg, *j[1:]) for j in jobs[k]] for k in ("preprocess", "infer")}}
    pipe, alone = [], {k: [] for k in (*STAGE_TASKS, "write")}
    try:
        _warm(manifest, work / f"warm_{name}.zarr", _extract_cfg(manifest, work, args, kind, workers), executor, args)
        for stage, fn in STAGE_TASKS.items():  # first calls (Numba, imports) off the clock
            run_alone(executor, fn, tasks[stage][:1], 1)
        for rep in range(args.repeats):
            cfg = _extract_cfg(manifest, work / f"pipe_{name}_{rep}.zarr", args, kind, workers)
            pipe.append(_pipeline_run(cfg, executor, workers))
            for stage, fn in STAGE_TASKS.items():
                alone[stage].append(run_alone(executor, fn, tasks[stage], _window(executor)))
            alone["write"].append(write_alone(work / f"write_{name}_{rep}.zarr", jobs, args))
    finally:
        executor.close()
    rates = [p["items_per_s"] for p in pipe]
    alone_med = {k: median(v) for k, v in alone.items()}
    slowest = min(alone_med, key=alone_med.get)
    return {"kind": kind, "workers": workers, "threads_per_worker": args.threads, "torch_threads": threads,
            "items": pipe[0]["items"], "repeats": args.repeats,
            "items_per_s": median(rates), "items_per_s_samples": rates,
            "alone_items_per_s": alone_med, "alone_samples": alone, "slowest_stage": slowest,
            "efficiency": median(rates) / alone_med[slowest],
            "infer_busy_fraction": median(p["infer_busy_fraction"] for p in pipe),
            "peak_rss_driver_mib": max(p["peak_rss_driver_mib"] for p in pipe),
            "peak_rss_worker_mib": max(p["peak_rss_worker_mib"] for p in pipe)}


def pipeline(manifest: Path, store: Path, args: argparse.Namespace, kind: str, workers: int) -> dict:
    """One warmed pipeline run on a fresh executor (the memory demo)."""
    cfg = _extract_cfg(manifest, store, args, kind, workers)
    executor = make_executor(kind, workers=workers, threads_per_worker=args.threads,
                             memory_limit=args.memory_limit, device=args.device)
    try:
        _warm(manifest, store, cfg, executor, args)
        return _pipeline_run(cfg, executor, workers)
    finally:
        executor.close()


def memory_demo(manifest: Path, work: Path, args: argparse.Namespace) -> dict:
    """A cohort many times the worker's memory limit: every scan listed ``--memory-demo``
    times under new subject ids (the pipeline reads each row's file anew, so memory behaves
    as for distinct scans). Peak worker RSS must stay under the limit."""
    import pandas as pd


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
    ap.add_argument("--repeats", type=int, default=3, help="pipeline / stage-alone repeats (medians)")
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
    load_start = os.getloadavg()
    seq = sequential(manifest, work / "seq.zarr", args)
    jobs = stage_jobs(manifest, work, args, ModelConfig(args.model, (args.taps,), tiny=args.tiny,
                                                        device=args.device, input_size=args.input_size))
    runs = []
    for spec in args.kinds.split(","):
        kind, workers = spec.split(":")
        r = measure(manifest, work, args, kind, int(workers), jobs)
        r["ratio_vs_sequential"] = r["items_per_s"] / seq["items_per_s"]
        runs.append(r)
    demo = memory_demo(manifest, work, args) if args.memory_demo else None
    result = {"memory_demo": demo, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_average": {"start": [round(v, 2) for v in load_start],
                               "end": [round(v, 2) for v in os.getloadavg()]},
              "device": args.device, "args": {k: v for k, v in vars(args).items()},
              "cohort": {"scans": n, "shape": args.shape, "synth_s": synth_s,
                         "bytes_float32": int(n * args.shape ** 3 * 4)},
              "sequential": seq, "pipeline": runs}
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
             f"{' --tiny' if a['tiny'] else ''}{' --memory-demo %d' % a['memory_demo'] if a['memory_demo'] else ''}`  ",
             f"Machine: {r['machine']}; load average (1/5/15 min) {' / '.join(f'{v:.2f}' for v in la['start'])} "
             f"at the start, {' / '.join(f'{v:.2f}' for v in la['end'])} at the end. "
             f"Cohort: {r['cohort']['scans']} scans of {a['shape']}^3 "
             f"({r['cohort']['bytes_float32'] / 2**20:.0f} MiB as float32).  ",
             f"Sequential loop (batch 1, nothing overlapped): {r['sequential']['items_per_s']:.2f} items/s.\n",
             "| scheduler | workers x threads | items/s | vs sequential | read / preprocess / infer / write alone (items/s) "
             "| slowest | efficiency | model busy | peak RSS driver / worker (MiB) |",
             "|---|---|---:|---:|---|---|---:|---:|---:|"]
    for p in r["pipeline"]:
        al = p["alone_items_per_s"]
        lines.append(f"| {p['kind']} | {p['workers']} x {p['threads_per_worker']} | {p['items_per_s']:.2f} | "
                     f"{p['ratio_vs_sequential']:.2f}x | {' / '.join(f'{al[k]:.1f}' for k in ('read', 'preprocess', 'infer', 'write'))} "
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

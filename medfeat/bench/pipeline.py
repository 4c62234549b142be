"""The extraction pipeline against a plain sequential loop, and its efficiency.

On one cohort (a manifest) and one model:

* **sequential**: for each item, read -> preprocess -> infer (batch 1) -> write, nothing
  overlapped, in this process.
* **pipeline**: :func:`medfeat.engine.pipeline.extract.extract` on a given executor (``threads``,
  ``local`` Dask workers): batches, stages overlapped, a bounded window of batches in flight.
* **ratio** = pipeline items/s over sequential items/s.
* **efficiency** = pipeline items/s over the items/s of its slowest stage alone (1.0: the
  pipeline hides every other stage behind the slowest one). Each stage alone runs on the
  *same* executor as the pipeline (same workers, threads per worker, torch threads, cached
  model), on the same items in the same batches with the same bounded window, its input
  prepared beforehand: read = reading the scans; preprocess = resample + normalise of scans
  already in memory into the batch buffer; infer = the model on the preprocessed batches;
  write = the driver writing the chunks. Pipeline runs and stage-alone runs alternate
  ``repeats`` times and medians are reported, so load drift on a shared machine hits both.
* **model busy** = the model's busy seconds per worker over the pipeline's wall time.
* **memory**: peak RSS of the driver and of each worker process (psutil, sampled every 0.2 s).

Used by ``benchmarks/bench_pipeline.py`` (the full study, RESULTS.md) and by the ``pipeline``
stage of ``medfeat bench``.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from medfeat.engine.pipeline.config import ClusterConfig, ExtractConfig, ModelConfig, Variant
from medfeat.engine.pipeline.executors import Executor, make_executor, run_bounded
from medfeat.engine.pipeline.extract import extract, torch_threads_per_worker, write_chunk
from medfeat.engine.pipeline.inputs import ScanCache, load_item
from medfeat.engine.pipeline.items import Atlas, Item, plan_items
from medfeat.engine.pipeline.worker import BatchResult, LoadedModel, get_model
from medfeat.engine.store.feature_store import ArrayKey, FeatureStore
from medfeat.errors import InputError
from medfeat.io.manifest import read_manifest_rows
from medfeat.io.nifti import Volume, affine_spacing
from medfeat.io.readers import read_scan

STAGE_NAMES = ("read", "preprocess", "infer", "write")
VARIANT = "none-whole"  # no alignment, whole scan: the variant every run here extracts


@dataclass(frozen=True)
class PipelineBenchConfig:
    """What is measured: the model, its batch, and the executor's threads.

    taps : tap names or indices of the model (as ``medfeat extract --taps``).
    input_size : model input (D, H, W) in voxels; None: the model's own.
    threads : threads per worker (``threads`` kind: threads in all = workers x threads).
    memory_limit : per Dask worker (``"4GB"``); None: Dask's ``auto``.
    repeats : pipeline / stage-alone runs per executor (medians reported).
    """

    model: str = "unet3d"
    taps: tuple[str, ...] = ("3",)
    tiny: bool = False
    input_size: tuple[int, ...] | None = None
    device: str = "cpu"
    batch: int = 4
    threads: int = 2
    memory_limit: str | None = "4GB"
    repeats: int = 3

    def model_config(self, torch_threads: int | None = None) -> ModelConfig:
        return ModelConfig(self.model, tuple(self.taps), tiny=self.tiny, device=self.device, runtime="eager",
                           input_size=self.input_size, torch_threads=torch_threads)

    def cluster(self, kind: str, workers: int) -> ClusterConfig:
        return ClusterConfig(scheduler_kind=kind, workers=workers, threads_per_worker=self.threads,
                             memory_limit=self.memory_limit)

    def extract_config(self, manifest: Path, store: Path, kind: str, workers: int) -> ExtractConfig:
        """The pipeline run: store chunks of two batches, so chunks complete while others run."""
        return ExtractConfig(str(manifest), str(store), self.model_config(), cluster=self.cluster(kind, workers),
                             batch_size=self.batch, chunk_items=self.batch * 2, progress=False,
                             random_init=True)


def parse_kinds(text: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"threads:1,local:2"`` (or a list of ``kind:workers``) -> [("threads", 1), ("local", 2)]."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for part in parts:
        kind, _, workers = part.strip().partition(":")
        if kind not in ("threads", "local") or not workers.isdigit() or int(workers) < 1:
            raise InputError(f"scheduler {part!r}: expected threads:N or local:N with N >= 1 workers")
        out.append((kind, int(workers)))
    return out


class PeakRSS:
    """Samples the RSS of this process and its children every 0.2 s; keeps the peaks (MiB)."""

    def __init__(self) -> None:
        self.driver = 0.0
        self.children = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            try:
                self.driver = max(self.driver, me.memory_info().rss / 2**20)
                kids = [c.memory_info().rss / 2**20 for c in me.children(recursive=True)]
                self.children = max([self.children, *kids])
            except psutil.Error:
                pass
            if self._stop.wait(0.2):  # sample once more at the end: short runs get a figure
                break

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- sequential loop -----------------------------------------------------------------------
def _items(manifest: Path, model: LoadedModel) -> list[Item]:
    df = read_manifest_rows(manifest).frame
    items, _ = plan_items(df, model.backbone.spec.input_kind, Variant(), Atlas.beside(manifest))
    return items


def _open_store(store: Path, cfg: PipelineBenchConfig, model: LoadedModel, items: list[Item], chunk: int
                ) -> tuple[FeatureStore, np.ndarray, dict[str, ArrayKey]]:
    fs = FeatureStore.create(store, chunk_items=chunk)
    idx = fs.add_items(i.record() for i in items)
    dims = model.backbone.output_dims()
    keys = {tap: ArrayKey(cfg.model, tap, VARIANT) for tap in model.backbone.tap_names}
    for tap, key in keys.items():
        fs.ensure_array(key, dims[tap], {"model": cfg.model})
    return fs, idx, keys


def sequential(manifest: Path, store: Path, cfg: PipelineBenchConfig) -> dict[str, Any]:
    """One item at a time in this process, no overlap: items/s and seconds per stage."""
    import torch

    model = get_model(cfg.model_config())
    items = _items(manifest, model)
    fs, idx, keys = _open_store(store, cfg, model, items, cfg.batch)
    for item in items[:2]:  # warm-up (JIT compiles, allocator, first-call costs), not timed
        model.runtime(torch.from_numpy(load_item(item, model.backbone.spec, model.size, ScanCache())[None]))
    t = dict.fromkeys(STAGE_NAMES, 0.0)
    t0 = time.perf_counter()
    for i, item in zip(idx, items):
        timer = ScanCache()
        x = load_item(item, model.backbone.spec, model.size, timer)
        t["read"] += timer.read
        t["preprocess"] += timer.preprocess
        s = time.perf_counter()
        out = model.runtime(torch.from_numpy(x[None]))
        t["infer"] += time.perf_counter() - s
        s = time.perf_counter()
        for tap, key in keys.items():
            fs.write(key, [int(i)], out[tap])
        t["write"] += time.perf_counter() - s
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "items": len(items), "items_per_s": len(items) / wall, "stage_s": t,
            "torch_threads": torch.get_num_threads()}


# -- stages alone --------------------------------------------------------------------------
def stage_jobs(manifest: Path, work: Path, cfg: PipelineBenchConfig) -> dict[str, Any]:
    """The items in the pipeline's batches, and each stage's input prepared in advance.

    Raw scans go to one ``.npy`` per item (the preprocess stage starts from voxels in
    memory: a page-cache copy, negligible next to resampling), the preprocessed inputs to
    one ``(N, C, *size)`` float32 ``.npy`` (the infer stage starts from the batch buffer).
    Jobs carry ``None`` where the model config goes: :func:`measure` fills in the executor's.
    """
    model = get_model(cfg.model_config())
    spec = model.backbone.spec
    items = _items(manifest, model)
    raw_dir = work / "stage_raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    inputs = np.empty((len(items), spec.in_channels, *model.size), np.float32)
    raws = []
    for i, item in enumerate(items):
        vol = read_scan(item.channels[0].path)
        np.save(raw_dir / f"{i}.npy", vol.data)
        raws.append((str(raw_dir / f"{i}.npy"), vol.affine.tolist()))
        load_item(item, spec, model.size, ScanCache(), out=inputs[i])
    np.save(work / "stage_inputs.npy", inputs)
    b = cfg.batch
    cuts = [(lo, min(lo + b, len(items))) for lo in range(0, len(items), b)]
    return {"items": items, "dims": model.backbone.output_dims(), "taps": list(model.backbone.tap_names),
            "read": [(items[lo:hi],) for lo, hi in cuts],
            "preprocess": [(None, items[lo:hi], raws[lo:hi]) for lo, hi in cuts],
            "infer": [(None, str(work / "stage_inputs.npy"), lo, hi) for lo, hi in cuts]}


# Stage tasks: each does one stage of run_batch on one batch (same code paths, same model).
def _read_task(items: list[Item]) -> int:
    for item in items:
        for ch in item.channels:
            read_scan(ch.path)
    return len(items)


def _preprocess_task(mcfg: ModelConfig, items: list[Item], raws: list[tuple[str, list]]) -> int:
    model = get_model(mcfg)
    spec = model.backbone.spec
    timer = ScanCache()
    for item, (path, affine) in zip(items, raws):
        a = np.asarray(affine, np.float64)
        timer.scans[item.channels[0].path] = Volume(np.load(path), a, affine_spacing(a))
    buf = np.empty((len(items), spec.in_channels, *model.size), np.float32)
    for row, item in enumerate(items):
        load_item(item, spec, model.size, timer, out=buf[row])
    return len(items)


def _infer_task(mcfg: ModelConfig, inputs: str, lo: int, hi: int) -> int:
    import torch

    model = get_model(mcfg)
    x = np.array(np.load(inputs, mmap_mode="r")[lo:hi])  # a writable copy, as run_batch's buffer
    with model.lock:  # as run_batch: one batch at a time through the model
        model.runtime(torch.from_numpy(x))
    return hi - lo


STAGE_TASKS: dict[str, Callable[..., int]] = {"read": _read_task, "preprocess": _preprocess_task,
                                              "infer": _infer_task}


def run_alone(executor: Executor, fn: Callable[..., int], jobs: list[tuple], window: int) -> float:
    """Items/s of ``fn(*job)`` over all jobs on ``executor``, at most ``window`` in flight."""
    t0 = time.perf_counter()
    n = sum(fut.result() for _, fut in run_bounded(executor, ((None, fn, job) for job in jobs), window))
    return n / (time.perf_counter() - t0)


def write_alone(store: Path, jobs: dict[str, Any], cfg: PipelineBenchConfig) -> float:
    """Items/s of the driver's chunk writes (extract's ``write_chunk``) of zero features."""
    items, taps, dims = jobs["items"], jobs["taps"], jobs["dims"]
    chunk = cfg.batch * 2  # as extract_config's chunk_items
    fs = FeatureStore.create(store, chunk_items=chunk)
    idx = fs.add_items(i.record() for i in items)
    keys = {tap: ArrayKey(cfg.model, tap, VARIANT) for tap in taps}
    for tap, key in keys.items():
        fs.ensure_array(key, dims[tap], {"model": cfg.model})
    t0 = time.perf_counter()
    for c in range(0, len(items), chunk):
        batch = [(int(i), it) for i, it in zip(idx[c:c + chunk], items[c:c + chunk])]
        rows = {tap: np.zeros((len(batch), dims[tap]), np.float32) for tap in taps}
        write_chunk(fs, keys, [(batch, BatchResult([it.item_id for _, it in batch], rows, [], {}))])
    return len(items) / (time.perf_counter() - t0)


# -- pipeline runs -------------------------------------------------------------------------
def _warm(manifest: Path, store: Path, ecfg: ExtractConfig, executor: Executor, batch: int) -> None:
    """Warm the workers (model build, imports, JIT) on a few items and a throwaway store."""
    import pandas as pd

    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False).head(2 * batch)
    warm_manifest = manifest.parent / "manifest_warm.csv"
    rows.to_csv(warm_manifest, index=False)
    extract(replace(ecfg, store=str(store), manifest=str(warm_manifest)), executor=executor)


def pipeline_run(ecfg: ExtractConfig, executor: Executor, workers: int) -> dict[str, Any]:
    """One extraction on ``executor``: items/s, model busy fraction, seconds per stage, peak RSS."""
    with PeakRSS() as peak:
        rec = extract(ecfg, executor=executor)
    wall = rec.timings["pipeline_wall"]
    return {"items": rec.items.done, "failed": rec.items.failed, "wall_s": wall,
            "items_per_s": rec.items_per_s,
            "infer_busy_fraction": rec.timings.get("infer", 0.0) / max(workers, 1) / wall,
            "stage_s": {k: rec.timings.get(k, 0.0) for k in STAGE_NAMES},
            "peak_rss_driver_mib": round(peak.driver), "peak_rss_worker_mib": round(peak.children)}


def measure(manifest: Path, work: Path, cfg: PipelineBenchConfig, kind: str, workers: int,
            jobs: dict[str, Any]) -> dict[str, Any]:
    """Pipeline and stages alone on one executor, alternating, ``cfg.repeats`` times; medians."""
    executor = make_executor(cfg.cluster(kind, workers), device=cfg.device)
    name = f"{kind}_{workers}"
    threads = torch_threads_per_worker(workers) if kind == "local" else None
    # the pipeline's model config with its torch threads, so a worker that builds the model
    # first for a stage task builds it as the pipeline would
    mcfg = cfg.model_config(threads)
    tasks = {"read": jobs["read"], **{k: [(mcfg, *j[1:]) for j in jobs[k]] for k in ("preprocess", "infer")}}
    window = 2 * executor.slots  # extract's default bounded window
    pipe: list[dict[str, Any]] = []
    alone: dict[str, list[float]] = {k: [] for k in STAGE_NAMES}
    try:
        _warm(manifest, _fresh(work / f"warm_{name}.zarr"), cfg.extract_config(manifest, work, kind, workers),
              executor, cfg.batch)
        for stage, fn in STAGE_TASKS.items():  # first calls (Numba, imports) off the clock
            run_alone(executor, fn, tasks[stage][:1], 1)
        for rep in range(max(1, cfg.repeats)):
            ecfg = cfg.extract_config(manifest, _fresh(work / f"pipe_{name}_{rep}.zarr"), kind, workers)
            pipe.append(pipeline_run(ecfg, executor, workers))
            for stage, fn in STAGE_TASKS.items():
                alone[stage].append(run_alone(executor, fn, tasks[stage], window))
            alone["write"].append(write_alone(_fresh(work / f"write_{name}_{rep}.zarr"), jobs, cfg))
    finally:
        executor.close()
    return summarise(kind, workers, cfg, threads, pipe, alone)


def _fresh(store: Path) -> Path:
    """``store`` with any earlier run's store there removed: a store with every item done
    would make the next run a no-op (extract resumes), not a measurement."""
    import shutil

    shutil.rmtree(store, ignore_errors=True)
    return store


def summarise(kind: str, workers: int, cfg: PipelineBenchConfig, torch_threads: int | None,
              pipe: list[dict[str, Any]], alone: dict[str, list[float]]) -> dict[str, Any]:
    """Medians over the repeats; the slowest stage alone, efficiency, the time-sharing bound."""
    rates = [p["items_per_s"] for p in pipe]
    alone_med = {k: median(v) for k, v in alone.items()}
    slowest = min(alone_med, key=alone_med.__getitem__)
    return {"kind": kind, "workers": workers, "threads_per_worker": cfg.threads, "torch_threads": torch_threads,
            "items": pipe[0]["items"], "failed": max(p["failed"] for p in pipe), "repeats": len(pipe),
            "items_per_s": median(rates), "items_per_s_samples": rates,
            "alone_items_per_s": alone_med, "alone_samples": alone, "slowest_stage": slowest,
            "efficiency": median(rates) / alone_med[slowest],
            # stages that cannot overlap at all (each takes the whole machine in turn) give this rate
            "time_sharing_items_per_s": 1.0 / sum(1.0 / v for v in alone_med.values()),
            "infer_busy_fraction": median(p["infer_busy_fraction"] for p in pipe),
            "peak_rss_driver_mib": max(p["peak_rss_driver_mib"] for p in pipe),
            "peak_rss_worker_mib": max(p["peak_rss_worker_mib"] for p in pipe)}


def compare(manifest: Path, work: Path, cfg: PipelineBenchConfig, kinds: Sequence[tuple[str, int]]
            ) -> dict[str, Any]:
    """The sequential loop, then the pipeline with its stages alone on each ``(kind, workers)``."""
    seq = sequential(manifest, _fresh(work / "seq.zarr"), cfg)
    jobs = stage_jobs(manifest, work, cfg)
    runs = []
    for kind, workers in kinds:
        r = measure(manifest, work, cfg, kind, workers, jobs)
        r["ratio_vs_sequential"] = r["items_per_s"] / seq["items_per_s"]
        runs.append(r)
    return {"sequential": seq, "pipeline": runs}


# -- memory bound --------------------------------------------------------------------------
def single_run(manifest: Path, store: Path, cfg: PipelineBenchConfig, kind: str, workers: int) -> dict[str, Any]:
    """One warmed pipeline run on a fresh executor."""
    ecfg = cfg.extract_config(manifest, _fresh(store), kind, workers)
    executor = make_executor(cfg.cluster(kind, workers), device=cfg.device)
    try:
        _warm(manifest, _fresh(Path(str(store) + ".warm")), ecfg, executor, cfg.batch)
        return pipeline_run(ecfg, executor, workers)
    finally:
        executor.close()


def memory_demo(manifest: Path, work: Path, cfg: PipelineBenchConfig, copies: int) -> dict[str, Any]:
    """A cohort many times the worker's memory limit: every scan listed ``copies`` times under
    new subject ids (the pipeline reads each row's file anew, so memory behaves as for distinct
    scans), on one Dask worker. Peak worker RSS must stay under the limit."""
    import pandas as pd
    from dask.utils import parse_bytes

    if not cfg.memory_limit:
        raise InputError("the memory demo needs a worker memory limit (e.g. 4GB)")
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    big = pd.concat([df.assign(subject=df["subject"] + f"_r{k}") for k in range(copies)])
    big_manifest = manifest.parent / "manifest_big.csv"
    big.to_csv(big_manifest, index=False)
    scan_bytes = read_scan(manifest.parent / df["path"][0]).data.nbytes
    limit = int(parse_bytes(cfg.memory_limit))
    r = single_run(big_manifest, work / "big.zarr", cfg, "local", 1)
    return {"items": r["items"], "cohort_bytes_float32": int(len(big) * scan_bytes), "memory_limit_bytes": limit,
            "cohort_over_limit": len(big) * scan_bytes / limit, "peak_rss_worker_mib": r["peak_rss_worker_mib"],
            "items_per_s": r["items_per_s"]}

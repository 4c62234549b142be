"""The extraction job: manifest -> items -> batches on a scheduler -> the feature store.

The driver (this module) plans items, registers them in the store, and submits one task per
batch with a bounded window of batches in flight, so memory stays bounded whatever the
cohort size (tasks return only pooled vectors). Batches never straddle a store chunk, and
the driver writes a chunk once all its batches are back: data of every tap first, then the
done marks. Chunk files are replaced atomically, so a run killed at any point leaves each
chunk either written and marked, or not marked (and redone, identically, on resume).

Failed items (unreadable, truncated, NaN or wrong-dimensional scans, bad manifest rows,
model errors) go to the store's failures table with their reason; the run goes on; a rerun
skips them unless ``retry_failed``.
"""
from __future__ import annotations

import datetime as _dt
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from medfeat import __version__
from medfeat.engine.pipeline import preprocess as pp
from medfeat.engine.pipeline.items import Atlas, Item, plan_items, variant_name
from medfeat.engine.store.lock import StoreLock
from medfeat.engine.pipeline.worker import BatchResult, Executor, ModelConfig, get_model, make_executor, run_batch
from medfeat.engine.pipeline.progress import Progress, StageTimes
from medfeat.engine.store.feature_store import ArrayKey, FeatureStore
from medfeat.errors import ManifestError, StoreError

DEFAULT_CHUNK_ITEMS = 64


@dataclass
class ExtractConfig:
    """One extraction run. ``align``/``roi`` make the variant name ``ALIGN-ROI``."""

    manifest: str
    store: str
    model: str
    taps: tuple[str, ...]
    weights: str | None = None
    align: str = "none"
    roi: str = "whole"
    roi_labels: tuple[int, ...] | None = None  # mask labels that make the crop ROI; None: all
    runtime: str = "eager"
    device: str = "cpu"
    precision: str = "fp32"
    pooling: str | None = None
    seed: int = 0
    tiny: bool = False
    input_size: tuple[int, ...] | None = None
    batch_size: int = 4
    chunk_items: int | None = None
    scheduler_kind: str = "local"
    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int = 2
    memory_limit: str | None = None
    malloc: str = "retain"  # medfeat.engine.pipeline.malloc: keep freed memory for the next batch, or "system"
    window: int | None = None
    retry_failed: bool = False
    atlas: str | None = None
    atlas_mask: str | None = None
    progress: bool = True
    modules: tuple[str, ...] = ()

    @property
    def variant(self) -> str:
        return variant_name(self.align, self.roi)

    def model_config(self, torch_threads: int | None = None) -> ModelConfig:
        return ModelConfig(self.model, tuple(self.taps), self.weights, self.tiny, self.pooling,
                           self.seed, self.runtime, self.device, self.precision,
                           tuple(self.input_size) if self.input_size else None, torch_threads,
                           tuple(self.modules))


@dataclass
class _ChunkState:
    expected: int
    results: list[tuple[list[tuple[int, Item]], BatchResult]] = field(default_factory=list)


def read_manifest_rows(path: str | Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The manifest's valid rows, and ``(row id, reason)`` for each bad row.

    File-level problems (missing file, missing columns) raise :class:`ManifestError`.
    """
    from medfeat.io import manifest as mf

    try:
        return mf.read_manifest(path), []
    except ManifestError as exc:
        if ": row " not in str(exc):
            raise
    p = Path(path)
    raw = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
    raw.columns = [str(c).strip() for c in raw.columns]
    raw = raw.apply(lambda col: col.str.strip())
    good, bad = [], []
    for i in range(len(raw)):
        try:  # validate one row at a time (read_manifest stops at the first bad row)
            good.append(mf._validate(raw.iloc[[i]].reset_index(drop=True), p, p.resolve().parent, False))
        except ManifestError as exc:
            msg = str(exc).replace("row 1 (line 2)", f"row {i + 1} (line {i + 2})")
            bad.append((f"row {i + 1}", msg))
    if not good:
        raise ManifestError(f"{p}: no valid rows ({bad[0][1]})")
    df = pd.concat(good, ignore_index=True)
    if "timepoint" in df.columns:
        dup = df.duplicated(subset=["subject", "timepoint"], keep="first")
        for s, tp in df.loc[dup, ["subject", "timepoint"]].itertuples(index=False):
            bad.append((f"{s}/{tp}", f"{p}: duplicated (subject, timepoint) ({s}, {tp})"))
        df = df.loc[~dup].reset_index(drop=True)
    return df, bad


def _versions() -> dict[str, str]:
    import dask
    import torch
    import zarr

    return {"medfeat": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "zarr": zarr.__version__, "dask": dask.__version__}


def _provenance(cfg: ExtractConfig, backbone: Any, tap: str, dim: int, size: tuple[int, ...]) -> dict[str, Any]:
    prov = backbone.provenance
    out = {
        "model": cfg.model, "config": prov.get("config", {}), "seed": prov.get("seed"),
        "weights": prov.get("weights"), "weights_sha256": prov.get("weights_sha256"),
        "tap": tap, "pooling": backbone.poolings[tap], "dim": dim,
        "input_kind": backbone.spec.input_kind,
        "preprocessing": {"variant": cfg.variant, "alignment": cfg.align, "roi": cfg.roi,
                          "roi_margin_mm": pp.ROI_MARGIN_MM if cfg.roi == "crop" else None,
                          "input_size": list(size), "intensity": pp.describe(backbone.spec.preprocess),
                          "interpolation": _interpolation(backbone)},
        "precision": cfg.precision, "runtime": cfg.runtime, "device": cfg.device,
        "versions": _versions(), "created": _now(),
    }
    if cfg.roi == "crop" and cfg.roi_labels is not None:
        # only when set: arrays cropped around every label keep the provenance they had
        out["preprocessing"]["roi_labels"] = [int(v) for v in cfg.roi_labels]
    return out


def _interpolation(backbone: Any) -> str:
    if backbone.spec.input_kind == "image2d":
        gray = backbone.provenance.get("config", {}).get("gray", "repeat")
        return f"bilinear resize (no antialias) to round(s*256/224), centre crop s; gray {gray}"
    return "linear, world space, zero outside"


def _chunks(indices: np.ndarray, items: list[Item], chunk: int, batch: int) -> dict[int, list[list[tuple[int, Item]]]]:
    """Pending items grouped by store chunk, each chunk cut into batches from its start."""
    by_chunk: dict[int, list[tuple[int, Item]]] = {}
    for idx, item in zip(indices.tolist(), items):
        by_chunk.setdefault(idx // chunk, []).append((idx, item))
    return {c: [members[i:i + batch] for i in range(0, len(members), batch)]
            for c, members in sorted(by_chunk.items())}


def extract(cfg: ExtractConfig, *, executor: Executor | None = None) -> dict[str, Any]:
    """Run one extraction; return its run record (also appended to the store)."""
    t_start = time.perf_counter()
    started = _now()
    df, row_failures = read_manifest_rows(cfg.manifest)
    model = get_model(cfg.model_config())  # fails fast on unknown model / tap / bad weights
    spec, size = model.backbone.spec, model.size
    atlas = Atlas.beside(cfg.manifest, cfg.atlas, cfg.atlas_mask)
    items, plan_failures = plan_items(df, spec.input_kind, cfg.align, cfg.roi, atlas, cfg.roi_labels)
    items, dup_failures = _dedupe(items)
    dims = model.backbone.output_dims()
    keys = {tap: ArrayKey(cfg.model, tap, cfg.variant) for tap in model.backbone.tap_names}
    store_path = Path(cfg.store)
    chunk = cfg.chunk_items or max(DEFAULT_CHUNK_ITEMS, cfg.batch_size)
    if store_path.exists() and not (store_path / "zarr.json").is_file():
        raise StoreError(f"{store_path}: exists and is not a feature store")
    with StoreLock(store_path):
        store = FeatureStore.create(store_path, chunk_items=chunk)
        indices = store.add_items(i.record() for i in items)
        for tap, key in keys.items():
            store.ensure_array(key, dims[tap], _provenance(cfg, model.backbone, tap, dims[tap], size))
        early = [(iid, r) for iid, r in row_failures + plan_failures + dup_failures]
        store.record_failures({"array": str(k), "item_id": i, "reason": r} for k in keys.values() for i, r in early)
        pending = _pending(store, keys, items, indices, cfg.retry_failed)
        record = _run(cfg, store, keys, items, indices, pending, executor)
        record.update(started=started, wall_s=time.perf_counter() - t_start)
        record["failures"] = [{"item_id": i, "reason": r} for i, r in early] + record["failures"]
        record["items"]["failed"] = len(record["failures"])
        store.add_run_record(record)
    return record


def _dedupe(items: list[Item]) -> tuple[list[Item], list[tuple[str, str]]]:
    seen: set[str] = set()
    out, bad = [], []
    for item in items:
        if item.item_id in seen:
            bad.append((item.item_id, f"item {item.item_id} appears twice in the manifest"))
        else:
            seen.add(item.item_id)
            out.append(item)
    return out, bad


def _pending(store: FeatureStore, keys: dict[str, ArrayKey], items: list[Item], indices: np.ndarray,
             retry: bool) -> np.ndarray:
    """Positions (into ``items``) of the items to compute: not done in every tap's array,
    and not recorded as failed unless ``retry``."""
    done = np.ones(len(items), dtype=bool)
    for key in keys.values():
        done &= store.done_mask(key)[indices]
    failed = {f["item_id"] for f in store.failures() if f["array"] in {str(k) for k in keys.values()}}
    skip = done | (np.array([i.item_id in failed for i in items], dtype=bool) if not retry
                   else np.zeros(len(items), dtype=bool))
    return np.flatnonzero(~skip)


def _run(cfg: ExtractConfig, store: FeatureStore, keys: dict[str, ArrayKey], items: list[Item],
         indices: np.ndarray, pending: np.ndarray, executor: Executor | None) -> dict[str, Any]:
    own = executor is None
    if own:
        executor = make_executor(cfg.scheduler_kind, workers=cfg.workers,
                                 threads_per_worker=cfg.threads_per_worker,
                                 memory_limit=cfg.memory_limit, scheduler=cfg.scheduler, device=cfg.device,
                                 malloc=cfg.malloc)
    workers = cfg.workers or 1
    threads = None if cfg.scheduler_kind != "local" or cfg.scheduler else _torch_threads(workers)
    mcfg = cfg.model_config(threads)
    times = StageTimes()
    progress = Progress(len(pending), enabled=cfg.progress)
    failures: list[dict[str, str]] = []
    n_done = 0
    t0 = time.perf_counter()
    try:
        plan = _chunks(indices[pending], [items[i] for i in pending], store.chunk_items, cfg.batch_size)
        for c, results in _stream(executor, mcfg, plan, cfg.window or 2 * executor.slots):
            tw = time.perf_counter()
            ok, bad = _write_chunk(store, keys, results)
            times.add({"write": time.perf_counter() - tw})
            for _, res in results:
                times.add(res.timings)
            n_done += ok
            failures += bad
            progress.update(n_done, len(failures))
    finally:
        progress.close(n_done, len(failures))
        if own:
            executor.close()
    wall = time.perf_counter() - t0
    return {
        "run": _now(), "command": "extract", "config": _jsonable(asdict(cfg)),
        "variant": cfg.variant, "arrays": [str(k) for k in keys.values()],
        "scheduler": executor.description, "versions": _versions(),
        "items": {"total": len(items), "skipped": len(items) - len(pending), "done": n_done,
                  "failed": len(failures)},
        "timings": {**{k: round(v, 4) for k, v in times.seconds.items()}, "pipeline_wall": round(wall, 4)},
        "items_per_s": round(n_done / wall, 4) if wall > 0 else None,
        "failures": failures, "finished": _now(),
    }


def _torch_threads(workers: int) -> int:
    import os

    return max(1, (os.cpu_count() or 1) // workers)


def _stream(executor: Executor, mcfg: ModelConfig, plan: dict[int, list[list[tuple[int, Item]]]],
            window: int) -> Iterator[tuple[int, list[tuple[list[tuple[int, Item]], BatchResult]]]]:
    """Submit batches with at most ``window`` in flight; yield each chunk once complete."""
    queue = [(c, b) for c, batches in plan.items() for b in batches]
    state = {c: _ChunkState(len(batches)) for c, batches in plan.items()}
    in_flight: dict[Any, tuple[int, list[tuple[int, Item]]]] = {}
    pos = 0
    while pos < len(queue) or in_flight:
        while pos < len(queue) and len(in_flight) < max(1, window):
            c, batch = queue[pos]
            in_flight[executor.submit(run_batch, mcfg, [it for _, it in batch])] = (c, batch)
            pos += 1
        done, _ = executor.wait_first(set(in_flight))
        for fut in done:
            c, batch = in_flight.pop(fut)
            state[c].results.append((batch, _result(fut, batch)))
            if len(state[c].results) == state[c].expected:
                yield c, state.pop(c).results


def _result(fut: Any, batch: list[tuple[int, Item]]) -> BatchResult:
    try:
        return fut.result()
    except Exception as exc:  # noqa: BLE001 - a lost worker or task fails its items, not the run
        reason = f"task failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        return BatchResult([], {}, [(it.item_id, reason) for _, it in batch], {})


def _write_chunk(store: FeatureStore, keys: dict[str, ArrayKey],
                 results: list[tuple[list[tuple[int, Item]], BatchResult]]) -> tuple[int, list[dict[str, str]]]:
    """Write one chunk's rows (data of every tap, then the done marks) and its failures."""
    ok_idx: list[int] = []
    rows: dict[str, list[np.ndarray]] = {tap: [] for tap in keys}
    failures: list[dict[str, str]] = []
    for batch, res in results:
        index_of = {item.item_id: i for i, item in batch}
        ok_idx += [index_of[i] for i in res.ok]
        if res.ok:
            for tap in keys:
                rows[tap].append(res.rows[tap])
        failures += [{"item_id": i, "reason": r} for i, r in res.failures]
    if ok_idx:
        order = np.argsort(ok_idx)
        idx = np.asarray(ok_idx, dtype=np.int64)[order]
        for tap, key in keys.items():
            store.write_rows(key, idx, np.concatenate(rows[tap])[order])
        for key in keys.values():
            store.mark_done(key, idx)
    ok_ids = [i for _, res in results for i in res.ok]
    if ok_ids:
        store.clear_failures([str(k) for k in keys.values()], ok_ids)
    store.record_failures({"array": str(k), **f} for k in keys.values() for f in failures)
    return len(ok_idx), failures


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

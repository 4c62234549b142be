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

import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medfeat.engine.pipeline import preprocess as pp
from medfeat.engine.pipeline.config import ExtractConfig, ItemCounts, ModelConfig, RunRecord
from medfeat.engine.pipeline.executors import Executor, make_executor, run_bounded
from medfeat.engine.pipeline.items import Atlas, Item, plan_items
from medfeat.engine.pipeline.malloc import apply_malloc_mode
from medfeat.engine.pipeline.progress import Progress, StageTimes
from medfeat.engine.pipeline.sources import check_sources, describe_changes
from medfeat.engine.pipeline.tokens import plan_arrays
from medfeat.engine.pipeline.worker import BatchResult, LoadedModel, adopt_model, get_model, run_batch
from medfeat.engine.store.feature_store import ArrayKey, FeatureStore, check_store_location
from medfeat.engine.store.lock import StoreLock
from medfeat.errors import InputError, ManifestError, StoreError, one_line
from medfeat.export.backbones.plugins import load_plugins
from medfeat.export.backbones.provenance import random_weights
from medfeat.export.backbones.registry import Backbone
from medfeat.export.runtimes.auto import choose_runtime
from medfeat.io.manifest import read_manifest_rows
from medfeat.io.visits import VisitPairing
from medfeat.timeutil import utc_now
from medfeat.version import __version__

DEFAULT_CHUNK_ITEMS = 64
Batch = list[tuple[int, Item]]  # (store index, item) pairs of one task


def _versions() -> dict[str, str]:
    import dask
    import torch
    import zarr

    return {"medfeat": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "zarr": zarr.__version__, "dask": dask.__version__}


def _provenance(cfg: ExtractConfig, backbone: Backbone, tap: str, dim: int,
                size: tuple[int, ...]) -> dict[str, Any]:
    prov = backbone.provenance
    variant = cfg.variant
    out = {
        "model": backbone.spec.store_key, "config": prov.get("config", {}), "seed": prov.get("seed"),
        "weights": prov.get("weights"), "weights_sha256": prov.get("weights_sha256"),
        "tap": tap, "pooling": backbone.poolings[tap], "dim": dim,
        "input_kind": backbone.spec.input_kind,
        "preprocessing": {"variant": variant.name, "alignment": variant.align, "roi": variant.roi,
                          "roi_margin_mm": pp.ROI_MARGIN_MM if variant.roi == "crop" else None,
                          "input_size": list(size), "intensity": _intensity(cfg.model, backbone),
                          "interpolation": _interpolation(backbone, cfg.model.resize)},
        "precision": cfg.model.precision, "runtime": cfg.model.runtime, "device": cfg.model.device,
        "versions": _versions(), "created": utc_now(),
    }
    if "source" in prov:  # a generic model: its full name, file sha256, factory, versions
        out["source"] = {"name": cfg.model.name, **prov["source"]}
    if "weights_filled" in prov:
        out["weights_filled"] = prov["weights_filled"]
    if variant.roi == "crop" and variant.roi_labels is not None:
        # only when set: arrays cropped around every label keep the provenance they had
        out["preprocessing"]["roi_labels"] = [int(v) for v in variant.roi_labels]
    return out


def _intensity(model: ModelConfig, backbone: Backbone) -> dict[str, Any]:
    """The intensity rule applied; a dataset-level mean/std (which replaces the model's rule)
    says so (``source``), the model's own rule is recorded as before."""
    rule = pp.describe(pp.image_rule(backbone.spec.preprocess, model.mean_std))
    return {**rule, "source": "dataset"} if model.mean_std is not None else rule


def _interpolation(backbone: Backbone, resize: str = "shorter") -> str:
    if backbone.spec.input_kind == "image2d":
        gray = backbone.provenance.get("config", {}).get("gray", "repeat")
        sides = "both sides" if resize == "square" else ""
        return f"bilinear resize (no antialias) {sides + ' ' if sides else ''}to round(s*256/224), centre crop s; gray {gray}"
    return pp.BORDER_DESCRIPTION


def _chunks(indices: np.ndarray, items: list[Item], chunk: int, batch: int) -> dict[int, list[Batch]]:
    """Pending items grouped by store chunk, each chunk cut into batches from its start."""
    by_chunk: dict[int, Batch] = {}
    for idx, item in zip(indices.tolist(), items):
        by_chunk.setdefault(idx // chunk, []).append((idx, item))
    return {c: [members[i:i + batch] for i in range(0, len(members), batch)]
            for c, members in sorted(by_chunk.items())}


def extract(cfg: ExtractConfig, *, executor: Executor | None = None) -> RunRecord:
    """Run one extraction; return its run record (also appended to the store).

    Everything that can be refused is checked before the store is touched: weights,
    manifest, model, taps, pooling, device, items, the store's location, the cluster, the
    arrays' provenance and the items' source files.
    """
    t_start = time.perf_counter()
    started = utc_now()
    plugins = load_plugins(cfg.plugins)  # in the driver first: they may register the model
    if plugins:
        cfg = cfg.with_model(modules=tuple(dict.fromkeys([*cfg.model.modules, *(p.module for p in plugins)])))
    manifest = read_manifest_rows(cfg.manifest)
    # fails fast on unknown model / tap / pooling / device / bad weights
    model = get_model(cfg.with_model(runtime="eager").model if cfg.model.runtime == "auto" else cfg.model)
    if random_weights(model.backbone.provenance) and not cfg.random_init:
        raise InputError(f"{cfg.model.name}: no weights given: pass --weights FILE (a local checkpoint), "
                         "or --random-init to extract with seeded random weights")
    spec = model.backbone.spec
    atlas = Atlas.beside(cfg.manifest, cfg.atlas, cfg.atlas_mask)
    visits = VisitPairing(cfg.baseline_visit, cfg.followup_visit, cfg.pairs)
    items, plan_failures = plan_items(manifest.frame, spec.input_kind, cfg.variant, atlas, visits)
    _check_unique_ids(items)
    notes = list(manifest.notes)
    if cfg.model.runtime == "auto":
        cfg, model = _auto_runtime(cfg, model, len(items), notes)
    dims = model.backbone.output_dims()
    plans = plan_arrays(cfg.model, model.backbone, model.size)  # token arrays: names, layouts, grids
    keys = {tap: ArrayKey(spec.store_key, plans[tap].name, cfg.variant.name) for tap in model.backbone.tap_names}
    provenances = {tap: {**_provenance(cfg, model.backbone, tap, dims[tap], model.size), **plans[tap].provenance}
                   for tap in keys}
    store_path = Path(cfg.store)
    check_store_location(store_path)
    own = executor is None
    executor = executor or make_executor(cfg.cluster, device=cfg.model.device)  # an unreachable cluster stops here
    try:
        with StoreLock(store_path):
            store = FeatureStore.create(store_path, chunk_items=cfg.chunk_items or max(DEFAULT_CHUNK_ITEMS,
                                                                                          cfg.batch_size))
            for tap, key in keys.items():  # a refused run adds nothing
                store.check_array(key, dims[tap], provenances[tap], plans[tap].layout)
            indices, redo = _register(cfg, store, items, keys)
            for tap, key in keys.items():
                store.ensure_array(key, dims[tap], provenances[tap], layout=plans[tap].layout)
            early = [{"item_id": i, "reason": r} for i, r in manifest.bad + plan_failures]
            store.record_failures({"array": str(k), **f} for k in keys.values() for f in early)
            pending = _pending(store, keys, items, indices, cfg.retry_failed)
            record = _run(cfg, store, keys, items, indices, pending, executor, [p.file for p in plugins if p.file])
            record.started, record.wall_s = started, time.perf_counter() - t_start
            record.failures = early + record.failures
            record.items.failed = len(record.failures)
            record.items.remain_failed = len(store.failed_items(str(k) for k in keys.values())
                                             & {i.item_id for i in items} | {f["item_id"] for f in early})
            record.notes, record.refreshed = notes, redo
            store.add_run_record(record.to_dict())
    finally:
        if own:
            executor.close()
    return record


def _auto_runtime(cfg: ExtractConfig, eager: LoadedModel, n_items: int,
                  notes: list[str]) -> tuple[ExtractConfig, LoadedModel]:
    """Resolve ``--runtime auto`` by measurement (:mod:`medfeat.export.runtimes.auto`); the
    chosen runtime reuses the backbone built for the measurement."""
    if not cfg.cluster.scheduler:
        # Time under the allocator the run's processes get (this one, or a LocalCluster's
        # workers): with glibc's defaults a large 3D model pays page faults that ``retain``
        # avoids (RESULTS.md: 2.4x slower per item for SwinUNETR at 96^3), skewing the choice.
        apply_malloc_mode(cfg.cluster.malloc)
    choice = choose_runtime(eager.backbone, device=cfg.model.device, precision=cfg.model.precision,
                            input_size=eager.size, batch_size=cfg.batch_size, n_items=n_items)
    notes.append(choice.reason)
    if cfg.progress:
        print(choice.reason, flush=True)
    micro = choice.micro_batch if choice.micro_batch < cfg.batch_size else None
    cfg = cfg.with_model(runtime=choice.name, micro_batch=micro)
    if choice.name == "eager" and micro is None:
        return cfg, eager
    return cfg, adopt_model(cfg.model, eager, eager.runtime if choice.name == "eager" else choice.runtime)


def _check_unique_ids(items: list[Item]) -> None:
    """Two manifest rows that make one item id would write one row twice: refuse before work."""
    seen: set[str] = set()
    for item in items:
        if item.item_id in seen:
            raise ManifestError(f"item {item.item_id} is made by two manifest rows; give the rows "
                                "distinct timepoints or an item_id column")
        seen.add(item.item_id)


def _register(cfg: ExtractConfig, store: FeatureStore, items: list[Item],
              keys: dict[str, ArrayKey]) -> tuple[np.ndarray, list[str]]:
    """Add the items to the store with their source signatures; refuse items whose sources
    changed unless ``refresh_changed``, and un-mark what is to be redone (changed items in
    every array, ``overwrite`` items in this run's arrays). Returns the store indices and
    the ids redone."""
    sources = check_sources(store, items)
    if sources.changed and not cfg.refresh_changed:
        raise StoreError(f"{store.path}: {describe_changes(sources.changed)}. Rerun with --refresh-changed to "
                         "extract them again, or use a new store")
    before = set(store.items()["item_id"])
    indices = store.add_items({**i.record(), "source_sig": sources.record.get(i.item_id, "")} for i in items)
    pos = {item.item_id: int(idx) for item, idx in zip(items, indices)}
    by_id = {item.item_id: item for item in items}
    resign = [i for i in sources.record if i in before]  # new items got theirs when added
    if resign:
        store.set_item_fields([pos[i] for i in resign], "source_sig", [sources.record[i] for i in resign])
        store.set_item_fields([pos[i] for i in resign], "source", [by_id[i].source for i in resign])
    existing = store.arrays()
    if sources.changed:
        for key in existing:  # stale everywhere: other models' features came from the old files too
            store.unmark_done(key, [pos[i] for i in sources.changed])
        store.clear_failures([str(k) for k in existing], list(sources.changed))
    over = _overwrite_ids(cfg.overwrite, items)
    if over:
        for key in set(keys.values()) & set(existing):
            store.unmark_done(key, [pos[i] for i in over])
        store.clear_failures([str(k) for k in keys.values()], over)
    return indices, sorted(set(sources.changed) | set(over))


def _overwrite_ids(overwrite: tuple[str, ...], items: list[Item]) -> list[str]:
    if not overwrite:
        return []
    if overwrite == ("all",):
        return [i.item_id for i in items]
    known = {i.item_id for i in items}
    unknown = [i for i in overwrite if i not in known]
    if unknown:
        raise InputError(f"--overwrite: no item {unknown[0]!r} in this run's manifest")
    return list(overwrite)


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
         indices: np.ndarray, pending: np.ndarray, executor: Executor,
         plugin_files: list[str] | None = None) -> RunRecord:
    if plugin_files and len(pending):
        executor.ship(plugin_files)  # worker processes import them before building the model
    mcfg = cfg.model
    if cfg.cluster.kind == "local" and not cfg.cluster.scheduler:
        mcfg = cfg.with_model(torch_threads=torch_threads_per_worker(cfg.cluster.workers or 1)).model
    times = StageTimes()
    progress = Progress(len(pending), enabled=cfg.progress)
    failures: list[dict[str, str]] = []
    n_done = 0
    t0 = time.perf_counter()
    try:
        plan = _chunks(indices[pending], [items[i] for i in pending], store.chunk_items, cfg.batch_size)
        for results in _stream(executor, mcfg, plan, cfg.window or 2 * executor.slots):
            tw = time.perf_counter()
            ok, bad = write_chunk(store, keys, results)
            times.add({"write": time.perf_counter() - tw})
            for _, res in results:
                times.add(res.timings)
            n_done += ok
            failures += bad
            progress.update(n_done, len(failures))
    finally:
        progress.close(n_done, len(failures))
    wall = time.perf_counter() - t0
    return RunRecord(
        config=cfg.to_dict(), variant=cfg.variant.name, arrays=[str(k) for k in keys.values()],
        scheduler=executor.description, versions=_versions(),
        items=ItemCounts(total=len(items), skipped=len(items) - len(pending), done=n_done,
                         failed=len(failures)),
        timings={**{k: round(v, 4) for k, v in times.seconds.items()}, "pipeline_wall": round(wall, 4)},
        items_per_s=round(n_done / wall, 4) if wall > 0 else None, failures=failures, finished=utc_now())


def torch_threads_per_worker(workers: int) -> int:
    """Torch threads for each of ``workers`` worker processes sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // workers)


def _stream(executor: Executor, mcfg: ModelConfig, plan: dict[int, list[Batch]],
            window: int) -> Iterator[list[tuple[Batch, BatchResult]]]:
    """Run every batch, at most ``window`` in flight; yield each chunk's results once complete."""
    expected = {c: len(batches) for c, batches in plan.items()}
    results: dict[int, list[tuple[Batch, BatchResult]]] = {c: [] for c in plan}
    jobs = (((c, b), run_batch, (mcfg, [it for _, it in b])) for c, batches in plan.items() for b in batches)
    for (c, batch), fut in run_bounded(executor, jobs, window):
        results[c].append((batch, _result(fut, batch)))
        if len(results[c]) == expected[c]:
            yield results.pop(c)


def _result(fut: Any, batch: Batch) -> BatchResult:
    try:
        return fut.result()
    except Exception as exc:  # noqa: BLE001 - a lost worker or task fails its items, not the run
        reason = f"task failed: {type(exc).__name__}: {one_line(exc, 200)}"
        return BatchResult([], {}, [(it.item_id, reason) for _, it in batch], {})


def write_chunk(store: FeatureStore, keys: dict[str, ArrayKey],
                results: list[tuple[Batch, BatchResult]]) -> tuple[int, list[dict[str, str]]]:
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

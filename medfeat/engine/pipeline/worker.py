"""The worker side of extraction: the per-process model cache and the batch task.

A task is one batch: read and preprocess its items, run the model once, return pooled
features per tap (small) and per-item failures. The model is built once per worker process
(:func:`get_model` caches it in a module-level dict keyed by :class:`ModelConfig`) and its
calls are serialised by a per-model lock, so on a worker with two or more threads one batch
is read and preprocessed while another runs through the model: the stages overlap.
"""
from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medfeat.engine.pipeline.config import ModelConfig
from medfeat.engine.pipeline.inputs import ScanCache, align_batch, gray_mode, load_item
from medfeat.engine.pipeline.items import Item
from medfeat.engine.pipeline.preprocess import image_rule
from medfeat.engine.pipeline.views import fill_views
from medfeat.errors import InputError, MedfeatError, one_line
from medfeat.export.backbones.generic import ModelInputs
from medfeat.export.backbones.registry import Backbone, create_backbone, get_spec
from medfeat.export.runtimes.factory import MicroBatched, Runtime, make_runtime


@dataclass
class LoadedModel:
    """A built backbone, the runtime that runs it, its input size, and the lock that lets
    one batch at a time through it."""

    backbone: Backbone
    runtime: Runtime
    size: tuple[int, ...]
    lock: threading.Lock = field(default_factory=threading.Lock)


_MODELS: dict[tuple[ModelConfig, tuple[int, int] | None], LoadedModel] = {}
_MODELS_LOCK = threading.Lock()
_BUILDS = {"count": 0}


def get_model(cfg: ModelConfig) -> LoadedModel:
    """The model for ``cfg``, built on first use in this process and cached (keyed also by
    the weights file's size and mtime, so a file rewritten in place is loaded again)."""
    key = (cfg, _stamp(cfg.weights))
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = build_model(cfg)
            _BUILDS["count"] += 1
        return _MODELS[key]


def _stamp(path: str | None) -> tuple[int, int] | None:
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return None if st is None else (st.st_size, st.st_mtime_ns)


def adopt_model(cfg: ModelConfig, base: LoadedModel, runtime: Runtime | None) -> LoadedModel:
    """Cache ``base``'s backbone under ``cfg`` (another runtime of the same model) with
    ``runtime`` (built already, e.g. while ``--runtime auto`` timed it), so the model is not
    built twice; without a runtime, one is made for the backbone."""
    key = (cfg, _stamp(cfg.weights))
    with _MODELS_LOCK:
        if key not in _MODELS:
            if runtime is None:
                runtime = make_runtime(base.backbone, cfg.runtime, device=cfg.device, precision=cfg.precision,
                                       input_size=base.size)
            _MODELS[key] = LoadedModel(base.backbone, _micro_batched(runtime, cfg.micro_batch), base.size)
        return _MODELS[key]


def clear_models() -> None:
    """Forget the cached models of this process (tests; a fresh run in a long-lived worker)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def model_builds() -> int:
    """How many models this process has built (tests check: once per worker)."""
    return _BUILDS["count"]


def build_model(cfg: ModelConfig) -> LoadedModel:
    """Import ``cfg.modules``, build the backbone and its runtime (uncached; see get_model)."""
    for module in cfg.modules:
        importlib.import_module(module)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    if cfg.image_settings and get_spec(cfg.name).input_kind != "image2d":
        raise InputError(f"{cfg.name}: gray, resize and mean_std are settings of 2D models only")
    backbone = create_backbone(cfg.name, list(cfg.taps), weights=cfg.weights, tiny=cfg.tiny,
                               pooling=cfg.pooling, seed=cfg.seed,
                               config={**model_args(cfg), **({"gray": cfg.gray} if cfg.gray is not None else {})} or None,
                               inputs=model_inputs(cfg))
    size = tuple(cfg.input_size or backbone.spec.input_size)
    runtime = make_runtime(backbone, cfg.runtime, device=cfg.device, precision=cfg.precision, input_size=size)
    return LoadedModel(backbone, _micro_batched(runtime, cfg.micro_batch), size)


def _micro_batched(runtime: Runtime, micro_batch: int | None) -> Runtime:
    return MicroBatched(runtime, micro_batch) if micro_batch else runtime


def model_inputs(cfg: ModelConfig) -> ModelInputs:
    """What a generic model's file may not declare, from the config."""
    return ModelInputs(cfg.input_kind, cfg.input_size, cfg.intensity)


def model_args(cfg: ModelConfig) -> dict:
    """The build arguments as a dict (nested pairs back to dicts are not needed: values are
    scalars or tuples)."""
    return dict(cfg.model_args)


@dataclass
class BatchResult:
    """What a batch task returns: features of the items that worked, reasons for the rest.

    rows : tap -> (len(ok), dim) float32, rows in the order of ``ok``.
    timings : seconds: read, preprocess, infer.
    """

    ok: list[str]
    rows: dict[str, np.ndarray]
    failures: list[tuple[str, str]]
    timings: dict[str, float]
    worker: str = ""


def run_batch(cfg: ModelConfig, items: Sequence[Item]) -> BatchResult:
    """Read, preprocess and infer one batch (runs on a worker)."""
    model = get_model(cfg)
    timer = ScanCache()
    ids: list[str] = []
    try:
        transforms, failures = align_batch(list(items), timer)
    except MedfeatError as exc:  # the batched registration itself failed: fail its items
        transforms = {}
        failures = [(i.item_id, f"alignment: {one_line(exc)}") for i in items
                    if any(c.estimate for c in i.channels)]
    failed = {i for i, _ in failures}
    spec = model.backbone.spec
    # One preallocated batch buffer; each item is resampled and normalised straight into its row
    # (row[0]: the eval input; rows 1..K: augmented views, for token arrays with views).
    buf = np.empty((len(items), 1 + cfg.views, spec.in_channels, *model.size), dtype=np.float32)
    gray = gray_mode(model.backbone)
    rule = image_rule(spec.preprocess, cfg.mean_std) if spec.input_kind == "image2d" else None
    rows_ok: list[int] = []
    for row, item in enumerate(items):
        if item.item_id in failed:
            continue
        try:
            load_item(item, spec, model.size, timer, transforms, out=buf[row, 0], gray=gray, rule=rule,
                      keep_aspect=cfg.resize != "square")
            if cfg.views:
                fill_views(item, spec, model.size, timer, buf[row, 1:], gray=gray, seed=cfg.seed,
                           augment=cfg.augment, rule=rule)
            rows_ok.append(row)
            ids.append(item.item_id)
        except MedfeatError as exc:
            failures.append((item.item_id, one_line(exc)))
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop a bulk run
            failures.append((item.item_id, f"{type(exc).__name__}: {one_line(exc)}"))
    timer.scans.clear()
    rows: dict[str, np.ndarray] = {}
    t_infer = 0.0
    if rows_ok:
        x = buf if len(rows_ok) == len(items) else buf[rows_ok]
        # views of an item are consecutive model rows, so a task's rows reshape to (items, views * ...)
        rows, ids, failures, t_infer = _infer(model, x.reshape(-1, *x.shape[2:]), ids, failures)
    return BatchResult(ids, rows, failures,
                       {"read": timer.read, "preprocess": timer.preprocess, "infer": t_infer},
                       worker=f"{os.getpid()}")


def _infer(model: LoadedModel, x: np.ndarray, ids: list[str], failures: list[tuple[str, str]]
           ) -> tuple[dict[str, np.ndarray], list[str], list[tuple[str, str]], float]:
    t0 = time.perf_counter()
    try:
        with model.lock:  # one batch at a time through the model; reading goes on beside it
            t0 = time.perf_counter()  # the model's busy time, not the wait for the lock
            out = model.runtime(torch.from_numpy(x))
    except MedfeatError as exc:
        return {}, [], failures + [(i, one_line(exc)) for i in ids], time.perf_counter() - t0
    except RuntimeError as exc:  # e.g. an input the model cannot take
        return {}, [], failures + [(i, f"model: {one_line(exc)}") for i in ids], time.perf_counter() - t0
    t_infer = time.perf_counter() - t0
    finite = np.ones(len(ids), dtype=bool)
    for v in out.values():
        finite &= np.isfinite(v.reshape(len(ids), -1)).all(1)
    failures = failures + [(i, f"model output for item {i} is NaN or Inf") for i, f in zip(ids, finite) if not f]
    rows = {k: np.ascontiguousarray(v.reshape(len(ids), -1)[finite], dtype=np.float32) for k, v in out.items()}
    return rows, [i for i, f in zip(ids, finite) if f], failures, t_infer

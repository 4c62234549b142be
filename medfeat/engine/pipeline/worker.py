"""The worker side of extraction and the schedulers that run it.

A task is one batch: read and preprocess its items, run the model once, return pooled
features per tap (small) and per-item failures. The model is built once per worker process
(:func:`get_model` caches it in a module-level dict keyed by :class:`ModelConfig`) and its
calls are serialised by a per-model lock, so on a worker with two or more threads one batch
is read and preprocessed while another runs through the model: the stages overlap.

Schedulers (:func:`make_executor`), all with one ``submit`` / ``wait_first`` interface so the
driver's bounded-window loop is the same everywhere:

``local``    a ``distributed.LocalCluster`` of worker processes (the default; a
             ``dask_cuda.LocalCUDACluster`` when the device is CUDA and dask-cuda is installed);
``ADDRESS``  an existing Dask cluster (``tcp://host:port``);
``threads``  a thread pool in this process (no Dask start-up cost; tests, small runs);
``sync``     inline, one batch at a time (debugging; the crash test).
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from medfeat.engine.pipeline.items import Item, LoadTimer, align_batch, gray_mode, load_item
from medfeat.engine.pipeline.malloc import MALLOC_MODES, apply_malloc_mode
from medfeat.errors import MedfeatError, RuntimeUnavailableError, UnknownNameError

SCHEDULER_KINDS = ("local", "threads", "sync")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the model a worker builds (hashable: the cache key)."""

    name: str
    taps: tuple[str, ...]
    weights: str | None = None
    tiny: bool = False
    pooling: str | None = None
    seed: int = 0
    runtime: str = "eager"
    device: str = "cpu"
    precision: str = "fp32"
    input_size: tuple[int, ...] | None = None
    # How many torch threads a worker uses is not part of the model's identity (cache key).
    torch_threads: int | None = field(default=None, compare=False)
    # Modules to import before building: they register extra backbones (plugins, tests),
    # which spawned worker processes would otherwise not know.
    modules: tuple[str, ...] = ()


@dataclass
class LoadedModel:
    backbone: Any
    runtime: Callable[[Any], dict[str, np.ndarray]]
    size: tuple[int, ...]
    lock: threading.Lock = field(default_factory=threading.Lock)


_MODELS: dict[ModelConfig, LoadedModel] = {}
_MODELS_LOCK = threading.Lock()
_BUILDS = {"count": 0}


def get_model(cfg: ModelConfig) -> LoadedModel:
    """The model for ``cfg``, built on first use in this process and cached."""
    with _MODELS_LOCK:
        if cfg not in _MODELS:
            _MODELS[cfg] = build_model(cfg)
            _BUILDS["count"] += 1
        return _MODELS[cfg]


def clear_models() -> None:
    """Forget the cached models of this process (tests; a fresh run in a long-lived worker)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def model_builds() -> int:
    """How many models this process has built (tests check: once per worker)."""
    return _BUILDS["count"]


def build_model(cfg: ModelConfig) -> LoadedModel:
    import importlib

    import torch

    from medfeat.export.runtimes.factory import make_runtime
    from medfeat.export.backbones.registry import create_backbone

    for module in cfg.modules:
        importlib.import_module(module)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    backbone = create_backbone(cfg.name, list(cfg.taps), weights=cfg.weights, tiny=cfg.tiny,
                               pooling=cfg.pooling, seed=cfg.seed)
    size = tuple(cfg.input_size or backbone.spec.input_size)
    runtime = make_runtime(backbone, cfg.runtime, device=cfg.device, precision=cfg.precision)
    return LoadedModel(backbone, runtime, size)


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
    timer = LoadTimer()
    ids: list[str] = []
    try:
        transforms, failures = align_batch(list(items), timer)
    except MedfeatError as exc:  # the batched registration itself failed: fail its items
        transforms = {}
        failures = [(i.item_id, f"alignment: {_one_line(exc)}") for i in items
                    if any(c.estimate for c in i.channels)]
    failed = {i for i, _ in failures}
    spec = model.backbone.spec
    # One preallocated batch buffer; each item is resampled and normalised straight into its row.
    buf = np.empty((len(items), spec.in_channels, *model.size), dtype=np.float32)
    gray = gray_mode(model.backbone)
    rows_ok: list[int] = []
    for row, item in enumerate(items):
        if item.item_id in failed:
            continue
        try:
            load_item(item, spec, model.size, timer, transforms, out=buf[row], gray=gray)
            rows_ok.append(row)
            ids.append(item.item_id)
        except MedfeatError as exc:
            failures.append((item.item_id, _one_line(exc)))
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop a bulk run
            failures.append((item.item_id, f"{type(exc).__name__}: {_one_line(exc)}"))
    timer.cache.clear()
    rows: dict[str, np.ndarray] = {}
    t_infer = 0.0
    if rows_ok:
        x = buf if len(rows_ok) == len(items) else buf[rows_ok]
        rows, ids, failures, t_infer = _infer(model, x, ids, failures)
    return BatchResult(ids, rows, failures,
                       {"read": timer.read, "preprocess": timer.preprocess, "infer": t_infer},
                       worker=f"{os.getpid()}")


def _infer(model: LoadedModel, x: np.ndarray, ids: list[str], failures: list[tuple[str, str]]
           ) -> tuple[dict[str, np.ndarray], list[str], list[tuple[str, str]], float]:
    import torch

    t0 = time.perf_counter()
    try:
        with model.lock:  # one batch at a time through the model; reading goes on beside it
            t0 = time.perf_counter()  # the model's busy time, not the wait for the lock
            out = model.runtime(torch.from_numpy(x))
    except MedfeatError as exc:
        return {}, [], failures + [(i, _one_line(exc)) for i in ids], time.perf_counter() - t0
    except RuntimeError as exc:  # e.g. an input the model cannot take
        return {}, [], failures + [(i, f"model: {_one_line(exc)}") for i in ids], time.perf_counter() - t0
    t_infer = time.perf_counter() - t0
    finite = np.ones(len(ids), dtype=bool)
    for v in out.values():
        finite &= np.isfinite(v.reshape(len(ids), -1)).all(1)
    failures = failures + [(i, "model output is NaN or Inf") for i, f in zip(ids, finite) if not f]
    rows = {k: np.ascontiguousarray(v.reshape(len(ids), -1)[finite], dtype=np.float32) for k, v in out.items()}
    return rows, [i for i, f in zip(ids, finite) if f], failures, t_infer


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


# -- executors ---------------------------------------------------------------------------
class Executor:
    """``submit(fn, *args) -> future``; ``wait_first(futures) -> (done, pending)``."""

    slots: int = 1
    description: str = ""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def wait_first(self, futures: set[Any]) -> tuple[set[Any], set[Any]]:
        done, pending = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
        return set(done), set(pending)

    def close(self) -> None:
        pass


class SyncExecutor(Executor):
    """Runs each task at submit time, in this thread."""

    description = "sync"

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - surfaced by .result()
            fut.set_exception(exc)
        return fut


class ThreadExecutor(Executor):
    def __init__(self, threads: int) -> None:
        self.slots = max(1, threads)
        self.pool = cf.ThreadPoolExecutor(self.slots, thread_name_prefix="medfeat")
        self.description = f"threads ({self.slots})"

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor(Executor):
    """A ``distributed.Client`` on a new LocalCluster or an existing scheduler."""

    def __init__(self, client: Any, cluster: Any = None) -> None:
        self.client, self.cluster = client, cluster
        info = client.scheduler_info()
        workers = info.get("workers", {})
        self.slots = max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
        self.description = f"dask {client.scheduler.address} ({len(workers)} workers, {self.slots} threads)"

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)

    def wait_first(self, futures: set[Any]) -> tuple[set[Any], set[Any]]:
        from distributed import wait

        done, pending = wait(list(futures), return_when="FIRST_COMPLETED")
        return set(done), set(pending)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(kind: str = "local", *, workers: int | None = None, threads_per_worker: int = 2,
                  memory_limit: str | None = None, scheduler: str | None = None,
                  device: str = "cpu", malloc: str = "retain") -> Executor:
    """An executor for ``kind`` (``local``, ``threads``, ``sync``), or the cluster at ``scheduler``.

    ``malloc`` (:mod:`medfeat.engine.pipeline.malloc`): ``retain`` keeps freed memory for the next
    batch in the processes this starts (this one for ``threads``/``sync``, the workers of a
    new LocalCluster), before their task threads exist; ``system`` leaves the allocator
    alone. An existing cluster (``scheduler``) is never changed.
    """
    if malloc not in MALLOC_MODES:
        raise UnknownNameError(f"unknown malloc mode {malloc!r}; modes: {', '.join(MALLOC_MODES)}")
    if scheduler:
        return _connect(scheduler)
    if kind == "sync":
        apply_malloc_mode(malloc)
        return SyncExecutor()
    if kind == "threads":
        apply_malloc_mode(malloc)
        return ThreadExecutor((workers or 1) * threads_per_worker)
    if kind != "local":
        raise UnknownNameError(f"unknown scheduler kind {kind!r}; kinds: {', '.join(SCHEDULER_KINDS)}")
    executor = _local_cluster(workers or 1, threads_per_worker, memory_limit, device)
    executor.client.run(apply_malloc_mode, malloc)  # before the workers' task threads start
    return executor


def _connect(address: str) -> DaskExecutor:
    from distributed import Client

    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise RuntimeUnavailableError(f"cannot reach the Dask scheduler at {address} ({_one_line(exc)})") from exc
    return DaskExecutor(client)


def _local_cluster(workers: int, threads: int, memory_limit: str | None, device: str) -> DaskExecutor:
    from distributed import Client, LocalCluster

    kwargs: dict[str, Any] = {"threads_per_worker": threads, "dashboard_address": None,
                              "memory_limit": memory_limit or "auto"}
    if device.startswith("cuda"):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            cluster = LocalCluster(n_workers=workers, processes=True, **kwargs)
        else:  # one worker per GPU; dask-cuda sets CUDA_VISIBLE_DEVICES per worker
            cluster = LocalCUDACluster(**kwargs)
    else:
        cluster = LocalCluster(n_workers=workers, processes=True, **kwargs)
    return DaskExecutor(Client(cluster), cluster)

"""Schedulers that run batch tasks, all behind one ``submit`` / ``wait_first`` interface, and
the bounded-window loop that feeds them.

Kinds (:func:`make_executor`):

``local``    a ``distributed.LocalCluster`` of worker processes (a
             ``dask_cuda.LocalCUDACluster`` when the device is CUDA and dask-cuda is installed);
``ADDRESS``  an existing Dask cluster (``tcp://host:port``);
``threads``  a thread pool in this process (no Dask start-up cost);
``sync``     inline, one batch at a time (debugging; the crash test).

:func:`run_bounded` keeps at most ``window`` tasks in flight whatever the number of jobs, so
memory stays bounded by the window, not the cohort.
"""
from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from medfeat.engine.pipeline.config import SCHEDULER_KINDS, ClusterConfig
from medfeat.engine.pipeline.malloc import apply_malloc_mode
from medfeat.errors import RuntimeUnavailableError, UnknownNameError, one_line

if TYPE_CHECKING:
    from distributed import Client, Future
    from distributed.deploy import Cluster

T = TypeVar("T")


class TaskFuture(Protocol):
    """What ``submit`` returns: a ``concurrent.futures`` or a ``distributed`` future."""

    def result(self) -> Any: ...


class Executor:
    """``submit(fn, *args) -> future``; ``wait_first(futures) -> (done, pending)``."""

    slots: int = 1
    description: str = ""

    def submit(self, fn: Callable[..., Any], *args: Any) -> TaskFuture:
        raise NotImplementedError

    def wait_first(self, futures: set[TaskFuture]) -> tuple[set[TaskFuture], set[TaskFuture]]:
        # the in-process schedulers' futures are concurrent.futures ones
        done, pending = cf.wait(cast("set[cf.Future[Any]]", futures), return_when=cf.FIRST_COMPLETED)
        return set(done), set(pending)

    def ship(self, files: list[str]) -> None:
        """Make plugin ``files`` importable where tasks run (this process: already imported)."""

    def close(self) -> None:
        pass


class SyncExecutor(Executor):
    """Runs each task at submit time, in this thread."""

    description = "sync"

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        fut: cf.Future[Any] = cf.Future()
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

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor(Executor):
    """A ``distributed.Client`` on a new LocalCluster or an existing scheduler."""

    def __init__(self, client: Client, cluster: Cluster | None = None) -> None:
        self.client, self.cluster = client, cluster
        info = client.scheduler_info()
        workers = info.get("workers", {})
        self.slots = max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
        self.description = f"dask {client.scheduler.address} ({len(workers)} workers, {self.slots} threads)"

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self.client.submit(fn, *args, pure=False)

    def ship(self, files: list[str]) -> None:
        """Upload each plugin file to every worker (and to workers that join later), which
        saves it beside its other files and imports it under its stem."""
        for path in files:
            try:
                self.client.upload_file(path)
            except Exception as exc:
                raise RuntimeUnavailableError(f"plugin {path}: the workers could not import it "
                                              f"({type(exc).__name__}: {one_line(exc)})") from exc

    def wait_first(self, futures: set[TaskFuture]) -> tuple[set[TaskFuture], set[TaskFuture]]:
        from distributed import wait

        # this scheduler's futures are distributed ones
        done, pending = wait(cast("list[Future]", list(futures)), return_when="FIRST_COMPLETED")
        return set(done), set(pending)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(cluster: ClusterConfig, device: str = "cpu") -> Executor:
    """An executor for ``cluster``: its scheduler kind, or the existing cluster at its address.

    ``cluster.malloc`` (:mod:`medfeat.engine.pipeline.malloc`): ``retain`` keeps freed memory
    for the next batch in the processes this starts (this one for ``threads``/``sync``, the
    workers of a new LocalCluster), before their task threads exist; ``system`` leaves the
    allocator alone. An existing cluster (an address) is never changed.
    """
    if cluster.scheduler:
        return _connect(cluster.scheduler)
    if cluster.kind == "sync":
        apply_malloc_mode(cluster.malloc)
        return SyncExecutor()
    if cluster.kind == "threads":
        apply_malloc_mode(cluster.malloc)
        return ThreadExecutor((cluster.workers or 1) * cluster.threads_per_worker)
    if cluster.kind != "local":  # pragma: no cover - ClusterConfig checks the kind
        raise UnknownNameError(f"unknown scheduler kind {cluster.kind!r}; "
                               f"kinds: {', '.join(SCHEDULER_KINDS)}")
    executor = _local_cluster(cluster.workers or 1, cluster.threads_per_worker, cluster.memory_limit, device)
    executor.client.run(apply_malloc_mode, cluster.malloc)  # before the workers' task threads start
    return executor


def run_bounded(executor: Executor, jobs: Iterable[tuple[T, Callable[..., Any], tuple[Any, ...]]],
                window: int) -> Iterator[tuple[T, TaskFuture]]:
    """Submit ``fn(*args)`` for each ``(tag, fn, args)`` with at most ``window`` in flight;
    yield ``(tag, future)`` as each completes (completion order)."""
    pending = iter(jobs)
    in_flight: dict[TaskFuture, T] = {}
    exhausted = False
    while True:
        while not exhausted and len(in_flight) < max(1, window):
            job = next(pending, None)
            if job is None:
                exhausted = True
                break
            tag, fn, args = job
            in_flight[executor.submit(fn, *args)] = tag
        if not in_flight:
            return
        done, _ = executor.wait_first(set(in_flight))
        for fut in done:
            yield in_flight.pop(fut), fut


def _connect(address: str) -> DaskExecutor:
    from distributed import Client

    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise RuntimeUnavailableError(f"cannot reach the Dask scheduler at {address} ({one_line(exc)})") from exc
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

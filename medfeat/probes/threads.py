"""Work of a probe evaluation spread over the machine's cores with threads.

NumPy and BLAS release the GIL in their loops, so folds of a cross-validation, or blocks of
bootstrap replicates, run in parallel on threads without copying their inputs to other
processes. While they do, BLAS runs one thread per call: the products are memory-bound and
gain little from more, and a fold's numbers then do not depend on how many run at once.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from threadpoolctl import threadpool_limits

__all__ = ["cores", "thread_map"]

T = TypeVar("T")
R = TypeVar("R")


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn(item)`` for each item, in order, on ``workers`` threads with one BLAS thread
    each; at most ``2 * workers`` items are taken from ``items`` ahead of the results (a
    generator of large blocks stays bounded in memory). One worker runs in this thread."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

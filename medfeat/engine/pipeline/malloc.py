"""How the C allocator treats the large, short-lived buffers of CPU inference.

A 3D backbone on the CPU allocates and frees tensors of tens to hundreds of MiB per layer.
glibc serves blocks that large with ``mmap`` and returns them with ``munmap`` on free, so
every layer of every batch touches fresh pages: SAM-Med3D at 128^3 takes ~700,000 page
faults per scan and spends more than half its time in the kernel. Dask workers make it
worse: their nanny sets ``MALLOC_TRIM_THRESHOLD_``, which also freezes glibc's adaptive
mmap threshold.

:func:`retain_freed_memory` tells glibc to serve every block from one heap and keep what is
freed for the next batch (``M_ARENA_MAX`` 1, ``M_MMAP_MAX`` 0, a 2 GiB trim threshold).
Inference then runs without page faults (SAM-Med3D at 128^3 on 2 cores: 1.68 s instead of
2.71 s per scan at the same peak RSS; benchmarks/bench_malloc.py, RESULTS.md). The price:
the process keeps its peak memory between batches instead of handing it back. Memory
stays bounded, since batches have one size. ``M_ARENA_MAX`` only affects threads that allocate for the first
time afterwards, so this is called before the pipeline's thread pools start.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

MALLOC_MODES = ("retain", "system")

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD = 2**31 - 1  # the largest int: never trim the heap top


def retain_freed_memory() -> bool:
    """Keep freed memory in this process for reuse (glibc only); True if applied.

    Process-wide and not undone; on other C libraries (musl, macOS) nothing happens.
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def apply_malloc_mode(mode: str) -> bool:
    """``retain``: :func:`retain_freed_memory`; ``system``: leave the allocator as it is."""
    return retain_freed_memory() if mode == "retain" else False


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None

"""Reproducible training runs: fixed thread counts, deterministic algorithms, seeds.

PyTorch's CPU kernels give the same bits run after run once the number of intra-op threads is
fixed (reductions are split by thread), and ``torch.use_deterministic_algorithms`` refuses the
few kernels that are not deterministic. Machines of one kind (same CPU, same thread count,
same library versions) then train identical weights.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def reproducible(threads: int | None, seed: int, device: str = "cpu") -> Iterator[None]:
    """Within the block: ``threads`` torch threads (None: leave as is), deterministic
    algorithms (warn-only on CUDA, where some backward kernels have no deterministic form),
    and torch's global generator seeded with ``seed`` (weight init; training loops draw from
    their own seeded generators). Threads and the deterministic flag come back afterwards."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if threads:
        torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True, warn_only=device.startswith("cuda"))
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)

"""Counted FLOPs of a model forward, for fraction-of-peak figures.

Uses :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions,
2 FLOPs per multiply-add) and adds the fused CPU attention kernel, which it does not count
by itself: ``4 * B * H * L * S * E`` (Q K^T and the weighted sum of V).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

_REGISTERED = False


def _register_cpu_attention() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return

    def formula(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int],
                *args: object, out_shape: object = None, **kwargs: object) -> int:
        b, h, n_q, e = query_shape
        s = key_shape[-2]
        ev = value_shape[-1]
        return 2 * b * h * n_q * s * e + 2 * b * h * n_q * s * ev

    try:
        register_flop_formula(op, get_raw=False)(formula)
    except Exception:  # noqa: BLE001 - already registered by torch itself in newer versions
        pass


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (run once under the counter, on whatever device it uses)."""
    _register_cpu_attention()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``module(x)`` for the batch ``x``."""
    return count_flops(lambda: module(x))

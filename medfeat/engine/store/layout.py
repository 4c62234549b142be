"""How one feature array lays out its items: the per-item shape and the value type.

A pooled array holds one vector per item, ``(items, dim)`` float32 (the first layout, and
the one an array without a recorded layout has). A token array holds every token of a tap
per item, ``(items, tokens, dim)``, or ``(items, views, tokens, dim)`` with augmented views,
in float16 or bfloat16 to halve the bytes. The layout is recorded in the array group's
``attrs["layout"]``; arrays written before layouts existed read as pooled float32.

Zarr v3 has no bfloat16 type, so bfloat16 values are stored as their 16-bit patterns in a
``uint16`` array (the upper half of the float32 bits, rounded to nearest even by
``ml_dtypes``) and turned back into numbers on read; the fill value is the bfloat16 NaN.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from medfeat.errors import StoreError

__all__ = ["ArrayLayout", "TOKEN_DTYPES", "VALUE_DTYPES"]

VALUE_DTYPES = ("float32", "float16", "bfloat16")
TOKEN_DTYPES = ("float16", "bfloat16")
_BF16_NAN = 0x7FC0  # a quiet NaN in bfloat16 bits


def _bfloat16() -> type[np.generic]:
    import ml_dtypes

    bfloat16: type[np.generic] = ml_dtypes.bfloat16
    return bfloat16


@dataclass(frozen=True)
class ArrayLayout:
    """Per-item shape and value type of one feature array.

    ``item_shape``: (dim,) pooled, (tokens, dim) or (views, tokens, dim); ``dtype``: one of
    :data:`VALUE_DTYPES`.
    """

    item_shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in VALUE_DTYPES:
            raise StoreError(f"feature dtype {self.dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
        if not self.item_shape or min(self.item_shape) < 1:
            raise StoreError(f"feature item shape {self.item_shape} must be non-empty and positive")

    @classmethod
    def pooled(cls, dim: int) -> ArrayLayout:
        """The pooled layout: one float32 vector of ``dim`` values per item."""
        return cls((int(dim),), "float32")

    @property
    def dim(self) -> int:
        """Channels per token (the vector length for pooled arrays)."""
        return self.item_shape[-1]

    @property
    def is_pooled(self) -> bool:
        return len(self.item_shape) == 1

    @property
    def values_per_item(self) -> int:
        return math.prod(self.item_shape)

    @property
    def storage_dtype(self) -> str:
        """The Zarr data type holding the values."""
        return "uint16" if self.dtype == "bfloat16" else self.dtype

    @property
    def fill_value(self) -> float:
        """What unwritten items hold: NaN (its bit pattern for bfloat16)."""
        return _BF16_NAN if self.dtype == "bfloat16" else np.nan

    @property
    def read_dtype(self) -> np.dtype:
        """The numpy type rows come back in: float16 stays float16, bfloat16 becomes float32."""
        return np.dtype("float16" if self.dtype == "float16" else "float32")

    def chunks(self, chunk_items: int) -> tuple[int, ...]:
        """Chunk shape: ``chunk_items`` whole items; with views, one view per chunk, so a
        training epoch that reads one view per item reads a fraction of the bytes."""
        if len(self.item_shape) == 3:
            return (chunk_items, 1) + self.item_shape[1:]
        return (chunk_items,) + self.item_shape

    def encode(self, rows: np.ndarray, n: int) -> np.ndarray:
        """``n`` rows as stored: shape (n, *item_shape) in the storage type.

        ``rows`` may come flat, (n, values_per_item), as worker tasks send them.
        """
        rows = np.asarray(rows)
        if rows.ndim < 1 or rows.shape[0] != n or rows.size != n * self.values_per_item:
            raise StoreError(f"rows of shape {rows.shape} for {n} items of shape {self.item_shape}")
        rows = rows.reshape((n,) + self.item_shape)
        if self.dtype == "bfloat16":
            return np.ascontiguousarray(rows.astype(np.float32).astype(_bfloat16()).view(np.uint16))
        return np.ascontiguousarray(rows, dtype=self.dtype)

    def decode(self, stored: npt.ArrayLike) -> np.ndarray:
        """Stored values -> numbers in :attr:`read_dtype`."""
        values = np.asarray(stored)
        if self.dtype == "bfloat16":
            return values.view(_bfloat16()).astype(np.float32)
        return values.astype(self.read_dtype, copy=False)

    def to_attrs(self) -> dict[str, list[int] | str]:
        return {"item_shape": list(self.item_shape), "dtype": self.dtype}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, object], data_shape: tuple[int, ...]) -> ArrayLayout:
        """The layout recorded in an array group's attrs, or the pooled float32 layout of an
        array written before layouts were recorded (its shape gives the dim)."""
        doc = attrs.get("layout")
        if not isinstance(doc, dict):
            return cls(tuple(int(s) for s in data_shape[1:]) or (1,), "float32")
        return cls(tuple(int(s) for s in doc["item_shape"]), str(doc["dtype"]))

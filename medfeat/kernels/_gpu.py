"""CuPy launchers for cuda/resample.cu; modules memoised per (device, input dtype).

Only imported when an input is a cupy array, so CuPy stays optional.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from medfeat.errors import RuntimeUnavailableError
from medfeat.kernels._checks import Array

if TYPE_CHECKING:  # cupy has no type information
    from cupy import RawKernel, RawModule

_CTYPES = {
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
    np.dtype(np.int16): "short",
    np.dtype(np.uint16): "unsigned short",
    np.dtype(np.uint8): "unsigned char",
}
#: Output kinds understood by the kernels' ``store``.
OUT_KINDS = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
_BLOCK = 32
_ROWS = 4


def _cupy() -> ModuleType:
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeUnavailableError(
            "cupy: not installed; install the GPU extra (pip install 'medfeat[gpu]') to run kernels on CUDA arrays"
        ) from e
    return cupy


def cuda_source() -> str:
    """Text of cuda/resample.cu, shipped as package data."""
    return resources.files("medfeat.kernels").joinpath("cuda/resample.cu").read_text()


@functools.cache
def _module(device_id: int, dtype: np.dtype) -> RawModule:
    cp = _cupy()
    # -DTIN picks the source dtype; float64 math with explicit _rn intrinsics keeps CPU parity.
    return cp.RawModule(code=cuda_source(), options=("-std=c++14", f"-DTIN={_CTYPES[dtype]}"))


def kernel(name: str, dtype: np.dtype) -> RawKernel:
    """The memoised RawKernel ``name`` compiled for source dtype ``dtype``."""
    cp = _cupy()
    return _module(cp.cuda.Device().id, np.dtype(dtype)).get_function(name)


def _grid(d: int, h: int, w: int) -> tuple[int, int, int]:
    """Blocks of _BLOCK (k) x _ROWS (j) threads; one slice i (x batch) per z."""
    if d > 65535:
        raise ValueError(f"output grid {d}x{h}x{w}: slices (x batch) must stay below 65536")
    return ((w + _BLOCK - 1) // _BLOCK, (h + _ROWS - 1) // _ROWS, d)


def _mat12(m: np.ndarray, off: np.ndarray) -> np.ndarray:
    return np.concatenate([m, off[:, None]], axis=1).astype(np.float64).ravel()


def affine3d(src: Array, m: np.ndarray, off: np.ndarray, out: Array, order: int, mode: int, cval: float) -> None:
    """Launch the plain resampler: out (D,H,W) float32/float64 from src (n0,n1,n2)."""
    cp = _cupy()
    src = cp.ascontiguousarray(src)
    mat = cp.asarray(_mat12(m, off))
    kind = OUT_KINDS[np.dtype(out.dtype).name]
    kernel("affine3d", src.dtype)(
        _grid(*out.shape), (_BLOCK, _ROWS),
        (src, np.int32(src.shape[0]), np.int32(src.shape[1]), np.int32(src.shape[2]), mat, out,
         np.int32(kind), np.int32(out.shape[0]), np.int32(out.shape[1]), np.int32(out.shape[2]),
         np.int32(order), np.int32(mode), np.float64(cval)),
    )


def fused3d(
    srcs: Sequence[Array],
    mats: np.ndarray,
    params: np.ndarray,
    out_ptr: Array | int,
    out_kind: int,
    out_shape: tuple[int, int, int, int, int],
    channel: int,
    order: int,
    mode: int,
) -> None:
    """One launch for the batch: see fused3d in resample.cu for the argument layout.

    ``out_ptr`` is a cupy array (any dtype view of the buffer) or an integer
    device pointer (from a torch tensor's ``data_ptr()``).
    """
    cp = _cupy()
    dtype = srcs[0].dtype
    ptrs = cp.asarray(np.array([s.data.ptr for s in srcs], dtype=np.uint64))
    shapes = cp.asarray(np.array([s.shape for s in srcs], dtype=np.int32).ravel())
    b, c, d, h, w = out_shape
    out_arg = np.uint64(out_ptr) if isinstance(out_ptr, (int, np.integer)) else out_ptr
    kernel("fused3d", dtype)(
        _grid(b * d, h, w), (_BLOCK, _ROWS),
        (ptrs, shapes, cp.asarray(mats.astype(np.float64).ravel()), cp.asarray(params.astype(np.float64).ravel()),
         out_arg, np.int32(out_kind), np.int32(b), np.int32(c), np.int32(channel),
         np.int32(d), np.int32(h), np.int32(w), np.int32(order), np.int32(mode)),
    )

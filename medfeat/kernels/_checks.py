"""Argument checks and array-module dispatch shared by the kernels.

Every public kernel validates here first, so a bad argument is reported with
its name and the reason before any compilation or launch. Checks raise
:class:`medfeat.errors.InputError` (a ``ValueError``) or ``TypeError``.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from medfeat.errors import InputError

#: A NumPy or CuPy array: the kernels take either and answer on the same device. (CuPy has
#: no type information, so to the checker this is ``Any``.)
Array = Any

#: Boundary modes with scipy.ndimage's names, mapped to the integer codes the
#: Numba and CUDA kernels use (the same numbers appear in cuda/resample.cu).
MODES: dict[str, int] = {
    "constant": 0,
    "grid-constant": 1,
    "nearest": 2,
    "reflect": 3,
    "grid-mirror": 3,  # scipy's alias of 'reflect'
    "mirror": 4,
}

#: Input dtypes the resampling kernels read (integers are read as-is, CT HU in int16).
INPUT_DTYPES = (np.float32, np.float64, np.int16, np.uint16, np.uint8)


def array_module(x: object) -> ModuleType:
    """Return ``numpy`` or ``cupy`` for an array; the module decides the device."""
    if isinstance(x, np.ndarray):
        return np
    mod = type(x).__module__
    if mod.startswith("cupy"):
        import cupy

        return cupy
    raise TypeError(f"expected a numpy or cupy array, got {type(x).__name__}")


def mode_code(mode: str) -> int:
    """Integer code of a boundary ``mode``; unknown names raise InputError."""
    if mode not in MODES:
        raise InputError(f"mode: unsupported boundary mode {mode!r}; choose one of {sorted(MODES)}")
    return MODES[mode]


def check_order(order: int) -> int:
    """Interpolation order: 0 (nearest neighbour) or 1 (linear)."""
    if isinstance(order, bool) or order not in (0, 1):
        raise InputError(f"order: only 0 and 1 are supported, got {order!r}")
    return int(order)


def check_volume(name: str, x: Array, ndims: tuple[int, ...], *, finite: bool = True) -> Array:
    """Check an image array: known module, dimensionality, dtype, finiteness.

    Parameters
    ----------
    name : the argument's name, used in the error message.
    x : numpy or cupy array.
    ndims : accepted numbers of dimensions.
    finite : reject NaN and Inf voxels (one reduction over the data).
    """
    xp = array_module(x)
    if x.ndim not in ndims:
        raise InputError(f"{name}: expected {' or '.join(map(str, ndims))} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in [np.dtype(d) for d in INPUT_DTYPES]:
        names = ", ".join(np.dtype(d).name for d in INPUT_DTYPES)
        raise InputError(f"{name}: unsupported dtype {x.dtype}; use one of {names}")
    if min(x.shape) < 1:
        raise InputError(f"{name}: empty array of shape {tuple(x.shape)}")
    if finite and x.dtype.kind == "f" and not bool(xp.isfinite(x).all()):
        raise InputError(f"{name}: contains NaN or Inf voxels")
    return x


def check_matrix(name: str, m: Any, n: int) -> np.ndarray:
    """Return a finite float64 (n, n) linear part; reject singular matrices.

    A singular map collapses the output onto a plane of the input, which is
    never a meaningful resampling and usually a header or fitting bug.
    """
    a = np.asarray(m.get() if hasattr(m, "get") else m, dtype=np.float64)
    if a.shape != (n, n):
        raise InputError(f"{name}: expected shape ({n}, {n}), got {a.shape}")
    if not np.isfinite(a).all():
        raise InputError(f"{name}: contains NaN or Inf")
    # Relative test: scale-free, so sub-millimetre spacings are not flagged.
    s = np.linalg.svd(a, compute_uv=False)
    if s[-1] <= 1e-12 * max(s[0], 1e-300):
        raise InputError(f"{name}: singular (condition number above 1e12)")
    return a


def check_affine4(name: str, a: Any, n: int = 3) -> np.ndarray:
    """Return a finite, non-singular homogeneous (n+1, n+1) float64 affine."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.shape != (n + 1, n + 1):
        raise InputError(f"{name}: expected a {n + 1}x{n + 1} affine, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or Inf")
    if not np.allclose(arr[n], np.eye(n + 1)[n]):
        raise InputError(f"{name}: last row must be {np.eye(n + 1)[n].tolist()}, got {arr[n].tolist()}")
    check_matrix(name, arr[:n, :n], n)
    return arr


def check_cval(cval: float) -> float:
    """The fill value must be finite: a NaN fill poisons linear taps with weight 0."""
    c = float(cval)
    if not np.isfinite(c):
        raise InputError(f"cval: must be finite, got {cval!r}")
    return c


def check_shape(name: str, shape: Any, n: int) -> tuple[int, ...]:
    """A tuple of ``n`` positive ints."""
    try:
        t = tuple(int(s) for s in shape)
    except TypeError:
        raise InputError(f"{name}: expected a sequence of {n} ints, got {shape!r}") from None
    if len(t) != n or min(t) < 1:
        raise InputError(f"{name}: expected {n} positive sizes, got {t}")
    return t

"""``affine_transform``: scipy.ndimage's signature, Numba on numpy arrays, CUDA on cupy arrays."""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from medfeat.errors import InputError
from medfeat.kernels import _checks
from medfeat.kernels._checks import Array


def split_matrix(matrix: npt.ArrayLike | Array, offset: npt.ArrayLike, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise scipy's matrix forms to a (ndim, ndim) linear part and (ndim,) offset.

    Accepts, like scipy: a (ndim,) diagonal, a (ndim, ndim) matrix with a
    separate ``offset`` (scalar or (ndim,)), a homogeneous (ndim+1, ndim+1)
    matrix or its top (ndim, ndim+1) rows (then ``offset`` is ignored).
    """
    m = np.asarray(matrix.get() if hasattr(matrix, "get") else matrix, dtype=np.float64)
    if m.ndim == 1 and m.shape == (ndim,):
        m = np.diag(m)
    if m.shape in ((ndim + 1, ndim + 1), (ndim, ndim + 1)):
        off = m[:ndim, ndim].copy()
        m = m[:ndim, :ndim]
    elif m.shape == (ndim, ndim):
        off = np.broadcast_to(np.asarray(offset, dtype=np.float64), (ndim,)).copy()
    else:
        raise InputError(f"matrix: shape {m.shape} does not fit a {ndim}-D input")
    if not np.isfinite(off).all():
        raise InputError("offset: contains NaN or Inf")
    return _checks.check_matrix("matrix", m, ndim).copy(), off


def _as_3d(x: Array, m: np.ndarray, off: np.ndarray) -> tuple[Array, np.ndarray, np.ndarray]:
    """Lift a 2D problem to 3D with a unit leading axis sampled at exactly 0."""
    if x.ndim == 3:
        return x, m, off
    m3 = np.eye(3)
    m3[1:, 1:] = m
    return x[None], m3, np.concatenate([[0.0], off])


def _output_array(xp: ModuleType, output: Any, shape: tuple[int, ...], dtype: npt.DTypeLike) -> Array:
    """``output`` as scipy takes it: an array to fill, a dtype, or None (the input's)."""
    if output is None or isinstance(output, (type, np.dtype, str)):
        want = np.dtype(dtype if output is None else output)
        if want not in (np.float32, np.float64):
            raise InputError(f"output: dtype {want} unsupported; use float32 or float64")
        return xp.empty(shape, dtype=want)
    if _checks.array_module(output) is not xp:
        raise InputError("output: must live on the same device as input")
    if tuple(output.shape) != shape or output.dtype not in (np.float32, np.float64):
        raise InputError(f"output: expected a float32/float64 array of shape {shape}, got {output.dtype} {output.shape}")
    if not output.flags.c_contiguous:
        raise InputError("output: must be C-contiguous")
    return output


def affine_transform(
    input: Array,
    matrix: npt.ArrayLike | Array,
    offset: npt.ArrayLike = 0.0,
    output_shape: tuple[int, ...] | None = None,
    output: Any = None,  # an array to fill, a dtype or None, as scipy
    order: int = 1,
    mode: str = "constant",
    cval: float = 0.0,
    prefilter: bool = True,
) -> Array:
    """Resample ``input`` at ``matrix @ o + offset`` for every output index ``o``.

    Same signature and semantics as ``scipy.ndimage.affine_transform`` for
    ``order`` 0 and 1 (no spline prefilter is involved at these orders, so
    ``prefilter`` is accepted and ignored) and modes 'constant',
    'grid-constant', 'nearest', 'reflect' ('grid-mirror') and 'mirror'.
    Coordinates are voxel indices (index space, not mm).

    Parameters
    ----------
    input : numpy or cupy array, 2D or 3D; float32/float64/int16/uint16/uint8.
        numpy runs the Numba twin on all cores, cupy the CUDA kernel.
    matrix, offset : see :func:`split_matrix`.
    output_shape : output shape; defaults to ``input.shape``.
    output : None (input dtype, floats only; integers give float32), a float
        dtype, or a preallocated C-contiguous array.

    Returns
    -------
    The resampled array, float32 or float64, on the input's device.
    float64 output matches scipy to float64 rounding (bit-identical in the
    tests); float32 output takes a float32 interpolation path where all taps
    lie inside the volume, a few float32 ulps from scipy, and scipy's float64
    arithmetic at the borders. numpy and cupy results are bit-identical.
    """
    _checks.check_volume("input", input, (2, 3))
    order = _checks.check_order(order)
    code = _checks.mode_code(mode)
    cval = _checks.check_cval(cval)
    m, off = split_matrix(matrix, offset, input.ndim)
    shape = tuple(input.shape) if output_shape is None else _checks.check_shape("output_shape", output_shape, input.ndim)
    xp = _checks.array_module(input)
    dtype = input.dtype if input.dtype.kind == "f" else np.float32
    out = _output_array(xp, output, shape, dtype)
    src3, m3, off3 = _as_3d(input, m, off)
    out3 = out if out.ndim == 3 else out.reshape((1,) + shape)
    if xp is np:
        from medfeat.kernels import _cpu

        _cpu.affine3d(np.ascontiguousarray(src3), m3, off3, out3, order, code, cval)
    else:
        from medfeat.kernels import _gpu

        _gpu.affine3d(src3, m3, off3, out3, order, code, cval)
    return out

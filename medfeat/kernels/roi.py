"""ROI boxes and integer cropping with padding (voxel space).

Boxes are half-open voxel index ranges ``[lo, hi)`` per axis. A box may reach
past the volume; :func:`crop` pads those voxels with ``fill``. World (mm)
boxes are converted with :func:`medfeat.kernels.geometry.world_box_to_voxels`;
an ROI on a resampled grid (model input, atlas) is a
:func:`medfeat.kernels.geometry.box_grid` handed to the resampler.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from medfeat.errors import InputError
from medfeat.kernels import _checks
from medfeat.kernels._checks import Array

if TYPE_CHECKING:
    from medfeat.kernels.geometry import Grid


def _box(lo: npt.ArrayLike, hi: npt.ArrayLike, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    lo_a = np.asarray(lo).astype(np.int64)
    hi_a = np.asarray(hi).astype(np.int64)
    if lo_a.shape != (ndim,) or hi_a.shape != (ndim,):
        raise InputError(f"box: expected {ndim} bounds per side, got lo={lo_a.tolist()} hi={hi_a.tolist()}")
    if not (hi_a > lo_a).all():
        raise InputError(f"box: need lo < hi on every axis, got lo={lo_a.tolist()} hi={hi_a.tolist()}")
    return lo_a, hi_a


def box_from_mask(mask: Array, margin: int | tuple[int, ...] = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box [lo, hi) of the nonzero voxels of ``mask``, grown by ``margin`` voxels.

    The grown box may extend outside the mask's array (crop pads it).
    """
    xp = _checks.array_module(mask)
    nz = xp.nonzero(mask)
    if nz[0].size == 0:
        raise InputError("mask: has no nonzero voxel, so no ROI can be derived")
    lo = np.array([int(a.min()) for a in nz])
    hi = np.array([int(a.max()) + 1 for a in nz])
    m = np.broadcast_to(np.asarray(margin, dtype=np.int64), lo.shape)
    return lo - m, hi + m


def crop(volume: Array, lo: npt.ArrayLike, hi: npt.ArrayLike, fill: float = 0.0) -> Array:
    """Copy of ``volume[lo:hi]`` (any ndim); voxels of the box outside the volume get ``fill``.

    Raises InputError when the box does not overlap the volume at all, which
    almost always means a box in the wrong space (mm given as voxels, or the
    atlas box applied without alignment).
    """
    xp = _checks.array_module(volume)
    lo_a, hi_a = _box(lo, hi, volume.ndim)
    shape = np.asarray(volume.shape)
    src_lo = np.maximum(lo_a, 0)
    src_hi = np.minimum(hi_a, shape)
    if (src_hi <= src_lo).any():
        raise InputError(
            f"roi: box lo={lo_a.tolist()} hi={hi_a.tolist()} lies wholly outside the volume of shape {tuple(shape)}"
        )
    out = xp.full(tuple(hi_a - lo_a), fill, dtype=volume.dtype)
    dst = tuple(slice(int(a - lo), int(b - lo)) for a, b, lo in zip(src_lo, src_hi, lo_a))
    src = tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi))
    out[dst] = volume[src]
    return out


def paste(patch: Array, lo: npt.ArrayLike, shape: npt.ArrayLike, fill: float = 0.0) -> Array:
    """Inverse of :func:`crop`: place ``patch`` with its origin at ``lo`` in a ``fill`` array of ``shape``.

    Voxels of the patch that fall outside ``shape`` are dropped, so
    ``paste(crop(v, lo, hi), lo, v.shape)`` restores ``v`` inside the box.
    """
    xp = _checks.array_module(patch)
    lo_a = np.asarray(lo).astype(np.int64)
    shp = np.asarray(_checks.check_shape("shape", shape, patch.ndim))
    hi_a = lo_a + np.asarray(patch.shape)
    dst_lo = np.maximum(lo_a, 0)
    dst_hi = np.minimum(hi_a, shp)
    out = xp.full(tuple(int(s) for s in shp), fill, dtype=patch.dtype)
    if (dst_hi <= dst_lo).any():
        return out
    dst = tuple(slice(int(a), int(b)) for a, b in zip(dst_lo, dst_hi))
    src = tuple(slice(int(a - lo), int(b - lo)) for a, b, lo in zip(dst_lo, dst_hi, lo_a))
    out[dst] = patch[src]
    return out


def mask_roi_grid(mask: Array, affine: npt.ArrayLike, out_shape: npt.ArrayLike | None = None,
                  margin: int = 0) -> Grid:
    """Sampling grid of the bounding box of ``mask`` (grown by ``margin`` voxels), optionally resized.

    ``affine`` is the mask's voxel -> world (mm) affine. With an atlas mask
    this is the atlas ROI: resample a scan onto it with
    ``resample_world(scan, scan_affine, grid, transform=inv(M))`` where
    ``atlas_world = M @ scan_world`` (the synthetic cohort's
    ``atlas_transform``), since the resampler's transform maps target
    (atlas) world points to source (scan) world points.
    """
    from medfeat.kernels.geometry import box_grid

    lo, hi = box_from_mask(mask, margin)
    return box_grid(affine, lo, hi, out_shape)

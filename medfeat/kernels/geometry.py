"""World-space geometry: grids, index maps and resampling from header affines.

Conventions
-----------
* A volume's array axes (0, 1, 2) are its voxel index (i, j, k); its affine
  (4x4, float64) maps homogeneous voxel indices to world millimetres, as a
  NIfTI sform/qform does (RAS+ for NIfTI; any right-handed frame works as long
  as all affines share it). Spacing may be anisotropic, axes oblique.
* An alignment ``transform`` (4x4, world mm -> world mm) maps a point of the
  *target* space to the corresponding point of the *source* space, the
  resampler's "pull" convention (ITK's fixed -> moving). For the synthetic
  cohort, whose follow-ups satisfy ``followup_world = T @ baseline_world``,
  resampling a follow-up onto the baseline grid takes ``transform=T``.
* The index map handed to :func:`affine_transform` is therefore
  ``inv(source_affine) @ transform @ target.affine``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from medfeat.errors import InputError
from medfeat.kernels import _checks
from medfeat.kernels._checks import Array
from medfeat.kernels.affine import affine_transform


@dataclass(frozen=True)
class Grid:
    """A sampling grid: ``shape`` (D, H, W) voxels and a 4x4 voxel -> world (mm) affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _checks.check_shape("grid.shape", self.shape, 3))
        object.__setattr__(self, "affine", _checks.check_affine4("grid.affine", self.affine))

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along each index axis, mm (column norms of the affine)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def world_corners(self) -> np.ndarray:
        """(8, 3) world positions (mm) of the eight corner voxel centres."""
        idx = np.array(np.meshgrid(*[[0, n - 1] for n in self.shape], indexing="ij")).reshape(3, -1)
        return (self.affine[:3, :3] @ idx + self.affine[:3, 3:4]).T


def _int3(values: Iterable[float]) -> tuple[int, int, int]:
    """Three sizes as ints (a grid's shape)."""
    d, h, w = (int(v) for v in values)
    return d, h, w


def index_map(
    source_affine: npt.ArrayLike, target: Grid, transform: npt.ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Compose ``inv(source_affine) @ transform @ target.affine`` into (matrix (3,3), offset (3,)).

    The result maps a target voxel index to a source voxel index (index
    space), ready for :func:`medfeat.kernels.affine_transform`.
    """
    src = _checks.check_affine4("source_affine", source_affine)
    t = np.eye(4) if transform is None else _checks.check_affine4("transform", transform)
    full = np.linalg.solve(src, t @ target.affine)
    # Composing an affine with its own inverse leaves 1e-16 residues, and a
    # last-slice coordinate of n - 1 + 1e-15 would read cval in 'constant'
    # mode; entries within 1e-10 of an integer are therefore snapped to it.
    near = np.abs(full - np.round(full)) < 1e-10
    full[near] = np.round(full[near])
    return full[:3, :3].copy(), full[:3, 3].copy()


def resample_world(
    volume: Array,
    source_affine: npt.ArrayLike,
    target: Grid,
    transform: npt.ArrayLike | None = None,
    *,
    order: int = 1,
    mode: str = "constant",
    cval: float = 0.0,
    output: Array | None = None,
) -> Array:
    """Resample a (D, H, W) ``volume`` onto ``target`` in world space.

    Returns an array of ``target.shape`` on the volume's device. Points of the
    target that map outside the source get ``cval`` (mode 'constant').
    """
    _checks.check_volume("volume", volume, (3,))
    m, off = index_map(source_affine, target, transform)
    return affine_transform(volume, m, off, output_shape=target.shape, output=output, order=order, mode=mode, cval=cval)


def fov_grid(shape: npt.ArrayLike, affine: npt.ArrayLike, out_shape: npt.ArrayLike) -> Grid:
    """A grid of ``out_shape`` covering the same field of view as (shape, affine).

    Voxel *edges* are matched (half-voxel convention, like
    ``torch.nn.functional.interpolate(align_corners=False)`` and uniGradICON's
    resize to 175^3 "regardless of spacing"): target index ``o`` maps to
    source index ``(o + 0.5) * n / m - 0.5`` along each axis.
    """
    n = np.asarray(_checks.check_shape("shape", shape, 3), dtype=np.float64)
    m = np.asarray(_checks.check_shape("out_shape", out_shape, 3), dtype=np.float64)
    a = _checks.check_affine4("affine", affine)
    scale = n / m
    s = np.eye(4)
    s[:3, :3] = np.diag(scale)
    s[:3, 3] = 0.5 * scale - 0.5
    return Grid(_int3(m), a @ s)


def edge_box_grid(affine: npt.ArrayLike, lo: npt.ArrayLike, hi: npt.ArrayLike, out_shape: npt.ArrayLike) -> Grid:
    """Grid of ``out_shape`` spanning the box between voxel-*edge* coordinates ``lo`` and
    ``hi`` (each (3,), continuous, any real values) of a volume with ``affine``.

    A whole volume of ``n`` voxels spans edges ``[-0.5, n - 0.5]``, so
    ``edge_box_grid(affine, -0.5, shape - 0.5, out)`` equals ``fov_grid(shape, affine, out)``;
    a crop box with a margin in mm has fractional edges, which this keeps exactly (target
    voxel ``t`` samples ``lo + (t + 0.5) * (hi - lo) / out_shape``).
    """
    lo_a = np.broadcast_to(np.asarray(lo, dtype=np.float64), (3,))
    hi_a = np.broadcast_to(np.asarray(hi, dtype=np.float64), (3,))
    if not (hi_a > lo_a).all():
        raise InputError(f"box: need lo < hi on all three axes, got lo={lo_a.tolist()} hi={hi_a.tolist()}")
    m = np.asarray(_checks.check_shape("out_shape", out_shape, 3), dtype=np.float64)
    step = (hi_a - lo_a) / m
    to_box = np.eye(4)
    to_box[:3, :3] = np.diag(step)
    to_box[:3, 3] = lo_a + 0.5 * step
    return Grid(_int3(m), _checks.check_affine4("affine", affine) @ to_box)


def box_grid(affine: npt.ArrayLike, lo: npt.ArrayLike, hi: npt.ArrayLike,
             out_shape: npt.ArrayLike | None = None) -> Grid:
    """Grid of the voxel box [lo, hi) of a volume with ``affine``; optionally resized.

    ``lo``/``hi`` are voxel indices of that volume (``hi`` exclusive) and may
    reach outside it (the resampler fills those voxels). With ``out_shape``
    the box's field of view is sampled at that shape (see :func:`fov_grid`).
    """
    lo_a = np.asarray(lo, dtype=np.float64)
    hi_a = np.asarray(hi, dtype=np.float64)
    if lo_a.shape != (3,) or hi_a.shape != (3,) or not (hi_a > lo_a).all():
        raise InputError(f"box: need lo < hi on all three axes, got lo={lo_a.tolist()} hi={hi_a.tolist()}")
    a = _checks.check_affine4("affine", affine)
    t = np.eye(4)
    t[:3, 3] = lo_a
    grid = Grid(_int3(round(v) for v in hi_a - lo_a), a @ t)
    return grid if out_shape is None else fov_grid(grid.shape, grid.affine, out_shape)


def world_box_to_voxels(affine: npt.ArrayLike, lo_mm: npt.ArrayLike, hi_mm: npt.ArrayLike
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Smallest voxel box [lo, hi) of a volume that contains the world box [lo_mm, hi_mm].

    The world box is axis-aligned in world coordinates (mm); with an oblique
    affine its eight corners are mapped to voxel space and enclosed.
    """
    a = _checks.check_affine4("affine", affine)
    lo_w = np.asarray(lo_mm, dtype=np.float64)
    hi_w = np.asarray(hi_mm, dtype=np.float64)
    if lo_w.shape != (3,) or hi_w.shape != (3,) or not (hi_w > lo_w).all():
        raise InputError(f"box_mm: need lo < hi (mm) on all three axes, got {lo_w.tolist()} {hi_w.tolist()}")
    corners = np.array(np.meshgrid(*zip(lo_w, hi_w), indexing="ij")).reshape(3, -1)
    inv = np.linalg.inv(a)
    vox = inv[:3, :3] @ corners + inv[:3, 3:4]
    return np.floor(vox.min(axis=1)).astype(int), np.ceil(vox.max(axis=1)).astype(int) + 1


def rigid_matrix(rotvec: npt.ArrayLike, translation: npt.ArrayLike,
                 center: npt.ArrayLike = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 rotation (rotation vector, radians) about ``center`` (mm), then translation (mm)."""
    r = np.asarray(rotvec, dtype=np.float64)
    theta = float(np.linalg.norm(r))
    k = np.array([[0, -r[2], r[1]], [r[2], 0, -r[0]], [-r[1], r[0], 0]])
    if theta < 1e-12:
        rot = np.eye(3) + k
    else:
        kn = k / theta
        rot = np.eye(3) + np.sin(theta) * kn + (1 - np.cos(theta)) * kn @ kn
    c = np.asarray(center, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = c - rot @ c + np.asarray(translation, dtype=np.float64)
    return out

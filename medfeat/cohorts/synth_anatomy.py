"""Implicit (analytic) knee anatomy for the synthetic longitudinal cohort.

Everything here is in the **knee frame**, in mm: +x lateral, -x medial (a
right knee in RAS+ orientation), +y anterior, +z superior; the origin is the
joint centre on the joint line. Structures are boolean combinations of
ellipsoids, elliptic cylinders and a curved tibial plateau, evaluated at
arbitrary points, so a scan is rendered exactly at its own voxel centres
through any pose (no interpolation of a template).

Geometry of one compartment k (0 = medial, 1 = lateral) at the contact point
``(x_k, y_c)`` below the condyle centre:

    tibial bone surface        z_b  = -dip_k              (fixed over time)
    tibial cartilage top       z_b + t_tib_k
    femoral cartilage bottom   z_b + t_tib_k + gap_k      (synovial fluid between)
    femoral bone bottom        z_b + t_tib_k + gap_k + t_fem_k
    condyle ellipsoid centre   femoral bone bottom + r_z,k

so the bone-to-bone joint-space width is ``t_tib + gap + t_fem`` and thinning
of either plate lowers the femoral condyle: cartilage loss *is* joint-space
narrowing, as in osteoarthritis.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import numpy as np

LABELS = {"background": 0, "femur": 1, "tibia": 2, "femoral_cartilage": 3,
          "tibial_cartilage": 4, "other": 5}
# Tissue classes, finer than labels, that decide MR intensity.
TISSUES = ("air", "fat", "muscle", "fluid", "marrow", "cortex", "cartilage")
AIR, FAT, MUSCLE, FLUID, MARROW, CORTEX, CARTILAGE = range(len(TISSUES))
_SIDE = np.array([-1.0, 1.0])  # medial at -x, lateral at +x
_TIBIA_FLARE_MM = 28.0          # metaphysis height over which the plateau narrows to the shaft


@dataclass(frozen=True)
class KneeShape:
    """Shape parameters of one knee at one time point (mm, knee frame).

    Two-element arrays are (medial, lateral) compartments.
    """

    condyle_x: np.ndarray           # (2,) |x| of the condyle centres
    condyle_y: float                # AP position of the condyle centres
    condyle_radii: np.ndarray       # (2, 3) ellipsoid radii (x, y, z) of each condyle
    femoral_cartilage: np.ndarray   # (2,) femoral cartilage thickness at the contact point
    tibial_cartilage: np.ndarray    # (2,) tibial cartilage thickness
    gap: np.ndarray                 # (2,) fluid gap between the plates at the contact point
    plateau_radii: np.ndarray       # (2,) tibial plateau half-widths (ML, AP)
    plateau_y: float                # AP centre of the plateau
    plateau_dip: np.ndarray         # (2,) concavity depth of the plateau under each condyle
    femur_shaft_radius: float
    tibia_shaft_radius: float
    soft_radii: np.ndarray          # (2,) half-widths (ML, AP) of the soft-tissue cylinder
    soft_y: float
    fat_thickness: float            # subcutaneous fat shell

    def joint_space_width(self) -> np.ndarray:
        """Bone-to-bone width at each compartment's contact point, shape (2,), mm."""
        return self.tibial_cartilage + self.gap + self.femoral_cartilage


# Uniform ranges (low, high) of each parameter across subjects; the atlas uses the midpoints.
SHAPE_RANGES: dict[str, tuple] = {
    "condyle_x": ((19.0, 19.0), (24.0, 24.0)),
    "condyle_y": (-5.0, -2.0),
    "condyle_radii": (((15.0, 20.0, 17.0),) * 2, ((19.0, 24.0, 22.0),) * 2),
    "femoral_cartilage": ((2.2, 2.0), (3.4, 3.0)),
    "tibial_cartilage": ((2.2, 2.6), (3.4, 3.6)),
    "gap": ((0.4, 0.4), (1.0, 1.0)),
    "plateau_radii": ((36.0, 24.0), (42.0, 28.0)),
    "plateau_y": (-3.0, 1.0),
    "plateau_dip": ((1.5, 0.8), (2.5, 1.6)),
    "femur_shaft_radius": (11.0, 14.0),
    "tibia_shaft_radius": (11.0, 14.0),
    "soft_radii": ((50.0, 42.0), (56.0, 48.0)),
    "soft_y": (-2.0, 2.0),
    "fat_thickness": (4.0, 8.0),
}


def sample_shape(rng: np.random.Generator) -> KneeShape:
    """Draw one subject's baseline knee from :data:`SHAPE_RANGES`."""
    values: dict[str, Any] = {}  # field -> its value (a float or an array, by field)
    for f in fields(KneeShape):  # fixed order keeps the stream of draws stable
        lo, hi = (np.asarray(v, dtype=np.float64) for v in SHAPE_RANGES[f.name])
        v = lo + (hi - lo) * rng.random(lo.shape)
        values[f.name] = float(v) if v.ndim == 0 else v
    return KneeShape(**values)


def mean_shape() -> KneeShape:
    """The knee with every parameter at the middle of its range (the atlas anatomy)."""
    values: dict[str, Any] = {}  # field -> its value (a float or an array, by field)
    for f in fields(KneeShape):
        lo, hi = (np.asarray(v, dtype=np.float64) for v in SHAPE_RANGES[f.name])
        v = (lo + hi) / 2
        values[f.name] = float(v) if v.ndim == 0 else v
    return KneeShape(**values)


def followup_shape(base: KneeShape, femoral_loss: np.ndarray, tibial_loss: np.ndarray,
                   gap_change: np.ndarray) -> KneeShape:
    """The same knee after cartilage loss.

    ``femoral_loss`` and ``tibial_loss`` are fractions of thickness lost per
    compartment, shape (2,); ``gap_change`` is added to the fluid gap (mm,
    floored at 0.1 mm). The condyles move down by the resulting narrowing.
    """
    return replace(
        base,
        femoral_cartilage=base.femoral_cartilage * (1.0 - np.asarray(femoral_loss)),
        tibial_cartilage=base.tibial_cartilage * (1.0 - np.asarray(tibial_loss)),
        gap=np.maximum(base.gap + np.asarray(gap_change), 0.1),
    )


def _plateau_surface(s: KneeShape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height (mm) of the tibial bone surface: flat at 0, dipping under each condyle."""
    z = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=np.result_type(x, y))
    for k in range(2):
        sx, sy = 0.5 * float(s.condyle_radii[k, 0]), 0.5 * float(s.condyle_radii[k, 1])
        cx, cy = float(_SIDE[k] * s.condyle_x[k]), float(s.condyle_y)
        d2 = ((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2
        z -= float(s.plateau_dip[k]) * np.exp(-0.5 * d2)
    return z


def condyle_centres(s: KneeShape) -> np.ndarray:
    """Centres of the two condyle ellipsoids, shape (2, 3), mm."""
    cx = _SIDE * s.condyle_x
    cy = np.full(2, s.condyle_y)
    top = _plateau_surface(s, cx, cy) + s.tibial_cartilage
    cz = top + s.gap + s.femoral_cartilage + s.condyle_radii[:, 2]
    return np.stack([cx, cy, cz], axis=1)


# Parameters go in as Python floats so float32 coordinates stay float32 (NumPy 2 promotion).
def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    (cx, cy, cz), (rx, ry, rz) = (map(float, centre)), (map(float, radii))
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0


def _ellipse(x, y, cx, cy, rx, ry) -> np.ndarray:
    if np.ndim(rx) == 0:
        rx, ry = float(rx), float(ry)
    return ((x - float(cx)) / rx) ** 2 + ((y - float(cy)) / ry) ** 2 <= 1.0


@dataclass(frozen=True)
class Structure:
    """One painted piece of anatomy: where it may be (a knee-frame box, mm) and what it is there.

    ``inside(x, y, z)`` is only asked about points in ``[lo, hi]``, so a
    structure may rely on its box (the box is also what lets a renderer
    evaluate it on a sub-block of the grid only).
    """

    name: str
    label: int
    tissue: int
    lo: np.ndarray                  # (3,) box corner, -inf allowed
    hi: np.ndarray                  # (3,) box corner, +inf allowed
    inside: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _box(centre, half) -> tuple[np.ndarray, np.ndarray]:
    c, h = np.asarray(centre, dtype=np.float64), np.asarray(half, dtype=np.float64)
    return c - h, c + h


def structures(s: KneeShape) -> list[Structure]:
    """The knee's structures in painting order: later ones win where they overlap.

    Priority, low to high: fat, muscle, joint fluid, tibial cartilage,
    femoral cartilage, tibia, femur. Cartilage and fluid are shells drawn
    generously and cut back by the bone painted over them.
    """
    inf = np.inf
    c = condyle_centres(s)
    r_mean = s.condyle_radii.mean(axis=0)
    zc = float(c[:, 2].mean())
    dip = float(s.plateau_dip.sum())
    lab, out = LABELS, []
    soft_half = (s.soft_radii[0], s.soft_radii[1], inf)
    core = s.soft_radii - s.fat_thickness
    out.append(Structure("fat", lab["other"], FAT, *_box((0, s.soft_y, 0), soft_half),
                         lambda x, y, z: _ellipse(x, y, 0.0, s.soft_y, *s.soft_radii)))
    out.append(Structure("muscle", lab["other"], MUSCLE, *_box((0, s.soft_y, 0), (*core, inf)),
                         lambda x, y, z: _ellipse(x, y, 0.0, s.soft_y, *core)))
    for k in range(2):
        rf = s.condyle_radii[k] + s.femoral_cartilage[k] + s.gap[k] + 0.5
        lo, hi = _box(c[k], rf)
        hi[2] = c[k, 2]
        out.append(Structure(f"fluid{k}", lab["other"], FLUID, lo, hi, _fluid(s, c[k], rf)))
    for k in range(2):
        r = s.condyle_radii[k]
        foot = (_SIDE[k] * s.condyle_x[k], s.condyle_y, 0.8 * r[0], 0.7 * r[1])
        lo, hi = _box((foot[0], foot[1], 0.0), (foot[2], foot[3], 0.0))
        lo[2], hi[2] = -dip - 0.01, s.tibial_cartilage[k] + 0.01
        out.append(Structure(f"tibial_cartilage{k}", lab["tibial_cartilage"], CARTILAGE, lo, hi,
                             _tibial_cartilage(s, foot, float(s.tibial_cartilage[k]))))
    for k in range(2):
        r = s.condyle_radii[k] + s.femoral_cartilage[k]
        lo, hi = _box(c[k], r)
        hi[2] = c[k, 2] + 0.25 * s.condyle_radii[k, 2]  # weight-bearing and posterior surfaces
        out.append(Structure(f"femoral_cartilage{k}", lab["femoral_cartilage"], CARTILAGE, lo, hi,
                             partial(_ellipsoid, centre=c[k], radii=r)))
    # The tibia: below the dips only the (flaring) cross-section matters.
    out.append(Structure("tibia_shaft", lab["tibia"], MARROW, np.array([-inf, -inf, -inf]),
                         np.array([inf, inf, -dip - 0.01]), _tibia_section(s)))
    section = _tibia_section(s)
    out.append(Structure("tibia_plateau", lab["tibia"], MARROW,
                         np.array([-inf, -inf, -dip - 0.01]), np.array([inf, inf, 0.0]),
                         lambda x, y, z: section(x, y, z) & (z <= _plateau_surface(s, x, y))))
    for k in range(2):
        out.append(Structure(f"condyle{k}", lab["femur"], MARROW, *_box(c[k], s.condyle_radii[k]),
                             partial(_ellipsoid, centre=c[k], radii=s.condyle_radii[k])))
    # The metaphysis bridges the condyles; its bottom sits 0.3 r_z above theirs (the notch).
    meta_c = (0.0, s.condyle_y, zc + 0.3 * r_mean[2])
    meta_r = (s.condyle_x.mean() + 0.7 * r_mean[0], 0.9 * r_mean[1], r_mean[2])
    out.append(Structure("metaphysis", lab["femur"], MARROW, *_box(meta_c, meta_r),
                         lambda x, y, z: _ellipsoid(x, y, z, meta_c, meta_r)))
    rs = s.femur_shaft_radius
    lo, hi = _box((0.0, s.condyle_y, 0.0), (rs, rs, inf))
    lo[2] = zc
    out.append(Structure("femur_shaft", lab["femur"], MARROW, lo, hi,
                         lambda x, y, z: _ellipse(x, y, 0.0, s.condyle_y, rs, rs)))
    return out


def _tibia_section(s: KneeShape) -> Callable:
    """Inside the tibia's cross-section, which narrows from the plateau to the shaft below it."""
    def inside(x, y, z):
        u = np.clip((z + _TIBIA_FLARE_MM) / _TIBIA_FLARE_MM, 0.0, 1.0)
        flare = u * u * (3.0 - 2.0 * u)  # smoothstep: plateau above, shaft below
        shaft = float(s.tibia_shaft_radius)
        rx = shaft + float(s.plateau_radii[0] - shaft) * flare
        ry = shaft + float(s.plateau_radii[1] - shaft) * flare
        return _ellipse(x, y, 0.0, s.plateau_y, rx, ry)
    return inside


def _tibial_cartilage(s: KneeShape, foot: tuple, thickness: float) -> Callable:
    def inside(x, y, z):
        surface = _plateau_surface(s, x, y)
        return (_ellipse(x, y, *foot) & _ellipse(x, y, 0.0, s.plateau_y, *s.plateau_radii)
                & (z > surface) & (z <= surface + thickness))
    return inside


def _fluid(s: KneeShape, centre: np.ndarray, radii: np.ndarray) -> Callable:
    """Synovial fluid: a thin shell around the condyle's cartilage, above the tibial cartilage."""
    def inside(x, y, z):
        return _ellipsoid(x, y, z, centre, radii) & (z > _plateau_surface(s, x, y))
    return inside


def render(s: KneeShape, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label and tissue class at arbitrary knee-frame points (mm), arrays of one shape.

    Returns uint8 ``labels`` (see :data:`LABELS`) and ``tissue`` (see
    :data:`TISSUES`; bone is ``MARROW``, a renderer adds the cortex). The
    reference for :func:`render_grid`, which gives the same result faster.
    """
    labels = np.zeros(np.shape(x), dtype=np.uint8)
    tissue = np.zeros(np.shape(x), dtype=np.uint8)
    for st in structures(s):
        m = ((x >= st.lo[0]) & (x <= st.hi[0]) & (y >= st.lo[1]) & (y <= st.hi[1])
             & (z >= st.lo[2]) & (z <= st.hi[2]))
        m[m] = st.inside(x[m], y[m], z[m])
        labels[m], tissue[m] = st.label, st.tissue
    return labels, tissue


def _voxel_box(st: Structure, voxel_from_knee: np.ndarray, grid_lo: np.ndarray,
               grid_hi: np.ndarray, grid_shape) -> tuple[slice, ...] | None:
    """The voxel sub-block that holds a structure's knee-frame box, or None if it misses the grid."""
    lo, hi = np.maximum(st.lo, grid_lo), np.minimum(st.hi, grid_hi)
    if np.any(lo > hi):
        return None
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1)
    vox = voxel_from_knee[:3, :3] @ corners + voxel_from_knee[:3, 3:4]
    start = np.maximum(np.floor(vox.min(axis=1)).astype(int), 0)
    stop = np.minimum(np.ceil(vox.max(axis=1)).astype(int) + 1, grid_shape)
    if np.any(start >= stop):
        return None
    return tuple(slice(a, b) for a, b in zip(start, stop))


def render_grid(s: KneeShape, knee_from_voxel: np.ndarray, grid_shape: tuple[int, int, int],
                max_block_voxels: int = 1 << 21) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render` at every voxel centre of a grid, evaluating each structure in its own block.

    ``knee_from_voxel`` (4x4) maps voxel index (i, j, k) to knee-frame mm.
    Coordinates are float32 (sub-micrometre error at knee scale). Blocks are
    cut along axis 0 to at most ``max_block_voxels`` to bound memory.
    Returns uint8 ``labels`` and ``tissue`` of shape ``grid_shape``.
    """
    m = np.asarray(knee_from_voxel, dtype=np.float64)
    shape = tuple(int(n) for n in grid_shape)
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], indexing="ij")).reshape(3, -1)
    knee_corners = m[:3, :3] @ corners + m[:3, 3:4]
    grid_lo, grid_hi = knee_corners.min(axis=1) - 1.0, knee_corners.max(axis=1) + 1.0
    voxel_from_knee = np.linalg.inv(m)
    labels = np.zeros(shape, dtype=np.uint8)
    tissue = np.zeros(shape, dtype=np.uint8)
    # Small grids: coordinates once, sliced per block; large ones: per block, bounded memory.
    full = _coordinates(m, (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))) \
        if labels.size <= max_block_voxels else None
    for st in structures(s):
        block = _voxel_box(st, voxel_from_knee, grid_lo, grid_hi, shape)
        if block is None:
            continue
        b0, b1, b2 = block
        rows = max(1, max_block_voxels // ((b1.stop - b1.start) * (b2.stop - b2.start)))
        for start in range(b0.start, b0.stop, rows):
            sl = slice(start, min(start + rows, b0.stop))
            if full is None:
                x, y, z = _coordinates(m, (sl, b1, b2))
            else:
                x, y, z = (c[sl, b1, b2] for c in full)
            hit = st.inside(x, y, z)
            for coord, lo, hi, g_lo, g_hi in zip((x, y, z), st.lo, st.hi, grid_lo, grid_hi):
                # A bound outside the grid's extent excludes nothing: skip its pass.
                if lo > g_lo:
                    hit &= coord >= float(lo)
                if hi < g_hi:
                    hit &= coord <= float(hi)
            labels[sl, b1, b2][hit] = st.label
            tissue[sl, b1, b2][hit] = st.tissue
    return labels, tissue


def _coordinates(knee_from_voxel: np.ndarray, block: tuple[slice, slice, slice]) -> list[np.ndarray]:
    """Knee-frame x, y, z (float32 mm) at the voxel centres of a block of the grid."""
    mf = knee_from_voxel.astype(np.float32)
    i = np.arange(block[0].start, block[0].stop, dtype=np.float32)[:, None, None]
    j = np.arange(block[1].start, block[1].stop, dtype=np.float32)[None, :, None]
    k = np.arange(block[2].start, block[2].stop, dtype=np.float32)[None, None, :]
    return [mf[r, 0] * i + mf[r, 1] * j + mf[r, 2] * k + mf[r, 3] for r in range(3)]

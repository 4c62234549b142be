"""A synthetic longitudinal knee-MRI cohort standing in for OAI data.

``synth_cohort(out, subjects=48, seed=0)`` writes, per subject, a baseline and
a follow-up 3D scan (NIfTI, int16 with scaling) and their label maps (uint8:
0 background, 1 femur, 2 tibia, 3 femoral cartilage, 4 tibial cartilage, 5
other tissue), an atlas (mean anatomy, ``atlas.nii.gz`` + ``atlas_mask.nii.gz``),
``manifest.csv`` and ``cohort.json`` (parameters and column docs).

Anatomy (:mod:`medfeat.cohorts.synth_anatomy`) varies per subject (condyle
radii and positions, plateau curvature, cartilage thickness, soft tissue).
Progressors (label 1, about ``progressor_fraction`` of subjects) lose 12-45 %
of each medial cartilage plate's thickness between the scans (0-12 %
laterally), stable subjects 0-12 % (0-8 %); the femur sinks by the loss, so
the joint space narrows. The two groups overlap a little at the slow end, as
real progression labels do; noise, bias, partial volume and the
misalignment hide the rest of the effect behind the imaging.

Geometry and conventions
------------------------
* Default grid 64^3 at 2.0 x 1.6 x 1.6 mm (a 128 x 102 x 102 mm field of
  view); OAI-DESS-like resolution is ``shape=(160, 384, 384), spacing=(0.7,
  0.365, 0.365)``. The anatomy is in mm, so any grid whose field of view holds
  the knee (``MIN_FOV_MM``) shows the same knee.
* World coordinates are NIfTI RAS+ mm. Each scan's header affine (sform ==
  qform, code 1) maps voxel ``(i, j, k)`` = array index ``[i, j, k]`` to world;
  axis 0 runs medio-laterally with the coarse spacing (sagittal slices, as in
  OAI DESS), axes 1 and 2 antero-posteriorly and infero-superiorly, with a
  small random oblique rotation per scan.
* The knee sits in each scanner's world at a pose: baseline knee frame ->
  baseline world is ``P``; the follow-up is the same knee moved by the
  patient's repositioning ``T``.
* **transform** (manifest column): the true 4x4 world-space (mm) matrix ``T``
  such that a point at ``x`` in the baseline scan's world coordinates is at
  ``T @ x`` in the follow-up scan's world coordinates (homogeneous column
  vectors): ``followup_world = T @ baseline_world``. Identity on baseline
  rows. Hence the follow-up voxel that shows baseline voxel ``v`` is
  ``inv(A_f) @ T @ A_b @ v`` with ``A_b``, ``A_f`` the header affines; to pull
  the baseline onto the follow-up grid sample the baseline at
  ``inv(A_b) @ inv(T) @ A_f @ u`` for follow-up voxels ``u``. ``T`` is exact
  for the tibia and the soft tissue; the femur additionally sinks towards the
  tibia by the true narrowing (``jsn_mm``, about 0-3 mm), and the cartilage
  thins: that change is the signal.
* **atlas_transform**: the 4x4 matrix mapping this scan's world coordinates to
  the atlas's world (= knee frame) coordinates: ``atlas_world = M @ scan_world``
  (``inv(P)`` for baselines, ``inv(P) @ inv(T)`` for follow-ups). Exact up to
  the subject's shape differences from the mean.
* Intensities: DESS-like tissue contrasts with per-subject and per-scan gain,
  a Gaussian point-spread (partial volume), smooth texture, a smooth
  multiplicative bias field and Rician noise (magnitude of complex Gaussian).
  Follow-ups are rendered analytically at their own voxel centres through
  ``inv(P) @ inv(T) @ A_f``, not resampled from the baseline, so they carry
  no interpolation blur and their masks are exact.

Determinism: every subject draws from ``numpy.random.default_rng([seed, i])``
and the labels from ``default_rng(seed)``; the same arguments give the same
bytes (gzip mtime is 0).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medfeat.cohorts import synth_anatomy as anat
from medfeat.errors import InputError
from medfeat.io.manifest import format_transform
from medfeat.io.nifti import write_volume

# Field of view (mm) along the array axes (ML, AP, SI); 64^3 gives 2.0 x 1.6 x 1.6 mm voxels.
DEFAULT_FOV_MM = (128.0, 102.4, 102.4)
# Below this field of view (mm) parts of the knee (cartilage included) routinely leave the grid.
MIN_FOV_MM = (110.0, 96.0, 96.0)
# Mean DESS-like intensity per tissue class (air, fat, muscle, fluid, marrow, cortex, cartilage).
TISSUE_INTENSITY = np.array([0.0, 380.0, 260.0, 850.0, 150.0, 30.0, 560.0])
MISALIGN_MODES = ("none", "rigid", "affine")
# World z (mm) of the joint line, about the field-of-view centre: the cartilage spans
# about -4 to +34 mm around the joint line, so the knee sits a little low in the grid.
JOINT_LINE_MM = -10.0

COLUMN_DOCS = {
    "subject": "subject id",
    "timepoint": "baseline or followup",
    "path": "scan, NIfTI int16 with scaling, relative to this folder",
    "mask_path": "label map (uint8: 0 background, 1 femur, 2 tibia, 3 femoral cartilage, "
                 "4 tibial cartilage, 5 other tissue), same grid and affine as the scan",
    "label": "1 progressor, 0 stable",
    "transform": "16 numbers, row-major 4x4 T with followup_world = T @ baseline_world "
                 "(world mm, RAS+); identity on baseline rows",
    "atlas_transform": "16 numbers, row-major 4x4 M with atlas_world = M @ scan_world",
    "jsn_mm": "true medial joint-space narrowing between the scans, mm (same on both rows)",
    "jsn_lateral_mm": "true lateral joint-space narrowing, mm",
    "misalign_deg": "rotation angle of T, degrees",
    "misalign_mm": "displacement of the knee centre by T, mm",
}


@dataclass(frozen=True)
class ScanLayout:
    """A synthetic scan's voxel layout: shape (D, H, W) and spacing (mm); its affine comes later."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def fov(self) -> np.ndarray:
        return np.asarray(self.shape) * np.asarray(self.spacing)


def make_layout(shape=(64, 64, 64), spacing=None) -> ScanLayout:
    """Check ``shape`` / ``spacing`` and fill in the default spacing (``DEFAULT_FOV_MM / shape``)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise InputError(f"grid shape {shape}: need three sizes of at least 8 voxels")
    if spacing is None:
        spacing = tuple(f / n for f, n in zip(DEFAULT_FOV_MM, shape))
    spacing = tuple(float(v) for v in spacing)
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(f"voxel spacing {spacing}: need three positive sizes in mm")
    grid = ScanLayout(shape, spacing)
    if np.any(grid.fov < np.asarray(MIN_FOV_MM)):
        fov = " x ".join(f"{v:g}" for v in np.round(grid.fov, 1))
        raise InputError(f"field of view {fov} mm (shape x spacing) is "
                         "smaller than the knee: need at least "
                         + " x ".join(f"{v:g}" for v in MIN_FOV_MM) + " mm")
    return grid


def rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """3x3 rotation by ``angle_rad`` about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1.0 - np.cos(angle_rad)) * (k @ k)


def _random_rotation(rng: np.random.Generator, max_deg: float, min_deg: float = 0.0) -> np.ndarray:
    axis = rng.standard_normal(3)
    return rotation(axis, np.deg2rad(rng.uniform(min_deg, max_deg)))


def _homogeneous(linear: np.ndarray, translation: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = translation
    return m


def header_affine(grid: ScanLayout, rng: np.random.Generator | None, max_oblique_deg: float = 3.0,
                  max_offset_mm: float = 2.0) -> np.ndarray:
    """Voxel -> world affine of a scan: oblique rotation @ diag(spacing), grid centre near the origin.

    Rounded to float32, as the NIfTI header stores it, so rendering and the
    file agree exactly. ``rng=None`` gives the axis-aligned atlas grid, whose
    centre is ``-JOINT_LINE_MM`` above the world (= knee frame) origin, so the
    atlas frames the knee as the scans do.
    """
    if rng is None:
        rot, centre = np.eye(3), np.array([0.0, 0.0, -JOINT_LINE_MM])
    else:
        rot = _random_rotation(rng, max_oblique_deg)
        centre = rng.uniform(-max_offset_mm, max_offset_mm, 3)
    linear = rot @ np.diag(grid.spacing)
    half = (np.asarray(grid.shape) - 1) / 2.0
    affine = _homogeneous(linear, centre - linear @ half)
    return affine.astype(np.float32).astype(np.float64)


def misalignment(rng: np.random.Generator, mode: str, pivot: np.ndarray,
                 max_rotation_deg: float, max_translation_mm: float) -> np.ndarray:
    """Random world-space transform T (4x4) acting about ``pivot`` (mm).

    Rotation angle and translation length are drawn from [0.3, 1] x their
    maxima so every follow-up is visibly misaligned; ``affine`` adds scales in
    [0.95, 1.05] and shears up to 0.03.
    """
    if mode == "none":
        return np.eye(4)
    linear = _random_rotation(rng, max_rotation_deg, 0.3 * max_rotation_deg)
    if mode == "affine":
        shear = np.eye(3) + np.triu(rng.uniform(-0.03, 0.03, (3, 3)), 1)
        linear = linear @ shear @ np.diag(rng.uniform(0.95, 1.05, 3))
    direction = rng.standard_normal(3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(0.3, 1.0) * max_translation_mm
    return _homogeneous(linear, pivot - linear @ pivot + shift)


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """Angle (degrees) of the rotation nearest to the 3x3 part of ``matrix`` (polar decomposition)."""
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    r = u @ vt
    return float(np.rad2deg(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def render_labels(shape: anat.KneeShape, knee_from_voxel: np.ndarray,
                  grid_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Label map and tissue map (uint8, ``grid_shape``) of ``shape`` seen through ``knee_from_voxel``."""
    labels, tissue = anat.render_grid(shape, knee_from_voxel, grid_shape)
    bone = (labels == anat.LABELS["femur"]) | (labels == anat.LABELS["tibia"])
    # A one-voxel cortical rim: dark on MR, unlike marrow.
    tissue[bone & ~ndimage.binary_erosion(bone, border_value=1)] = anat.CORTEX
    return labels, tissue


def _smooth_field(rng: np.random.Generator, grid_shape, coarse: int) -> np.ndarray:
    """A smooth random field, values about N(0, 1), float32 ``grid_shape``.

    Random weights on a ``coarse``^3 lattice of Gaussian bumps spanning the
    grid; separable, so it costs three small matrix products.
    """
    lattice = rng.standard_normal((coarse,) * 3).astype(np.float32)
    weights = []
    for n in grid_shape:
        u = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
        centres = np.linspace(0.0, 1.0, coarse, dtype=np.float32)[None, :]
        w = np.exp(-0.5 * ((u - centres) * (coarse - 1)) ** 2)
        weights.append(w / np.sqrt((w ** 2).sum(axis=1, keepdims=True)))  # unit variance
    # einsum's own loops: BLAS threads cost more than these small products on a busy machine.
    field = np.einsum("ck,ijk->ijc", weights[2], lattice)
    field = np.einsum("bj,ijc->ibc", weights[1], field)
    field = np.einsum("ai,ibc->abc", weights[0], field)
    return np.ascontiguousarray(field, dtype=np.float32)


def render_intensity(tissue: np.ndarray, tissue_intensity: np.ndarray,
                     rng: np.random.Generator | None, noise_rel: float = 0.0) -> np.ndarray:
    """MR-like float32 image from a tissue map.

    ``rng=None`` gives the clean image (point-spread only): the atlas.
    Otherwise texture, bias field and Rician noise of standard deviation
    ``noise_rel`` x the cartilage intensity are added.
    """
    img = tissue_intensity.astype(np.float32)[tissue]
    # Point-spread of about 0.5 voxel: partial-volume edges, as a real MR acquisition has.
    img = ndimage.gaussian_filter(img, 0.5, mode="nearest", truncate=3.0)
    if rng is None:
        return img
    # Multiplicative texture (about 4 %) and bias field (exp of a very smooth field,
    # about +-10-30 % across the field of view), in place to spare memory traffic.
    gain = _smooth_field(rng, tissue.shape, coarse=8)
    gain *= np.float32(0.04)
    gain += np.float32(rng.uniform(0.1, 0.3)) * _smooth_field(rng, tissue.shape, coarse=3)
    img *= np.exp(gain, out=gain)
    # Rician noise: magnitude of the complex signal plus complex Gaussian noise.
    noise = rng.standard_normal((2,) + tissue.shape, dtype=np.float32)
    noise *= np.float32(noise_rel * tissue_intensity[anat.CARTILAGE])
    noise[0] += img
    np.square(noise, out=noise)
    return np.sqrt(noise[0] + noise[1])


def _subject_intensities(rng: np.random.Generator) -> np.ndarray:
    return TISSUE_INTENSITY * rng.uniform(0.9, 1.1, TISSUE_INTENSITY.shape)


def _cartilage_loss(rng: np.random.Generator, progressor: bool) -> tuple[np.ndarray, np.ndarray]:
    """Fractions of (medial, lateral) thickness lost by the femoral and tibial plates."""
    if progressor:
        lo, hi = np.array([0.12, 0.0]), np.array([0.45, 0.12])
    else:
        lo, hi = np.array([0.0, 0.0]), np.array([0.12, 0.08])
    return rng.uniform(lo, hi), rng.uniform(lo, hi)


def _labels(n: int, fraction: float, seed: int) -> np.ndarray:
    n_prog = int(round(fraction * n))
    if n >= 2:
        n_prog = min(max(n_prog, 1), n - 1)  # both classes, so a probe can be trained
    labels = np.zeros(n, dtype=np.int64)
    labels[np.random.default_rng(seed).permutation(n)[:n_prog]] = 1
    return labels


def _write_scan(out: Path, stem: str, image: np.ndarray, labels: np.ndarray,
                affine: np.ndarray) -> tuple[str, str]:
    path, mask = f"images/{stem}.nii.gz", f"masks/{stem}_mask.nii.gz"
    write_volume(out / path, image, affine, dtype=np.int16)
    write_volume(out / mask, labels, affine, dtype=np.uint8)
    return path, mask


def synth_subject(out: Path, sid: str, rng: np.random.Generator, label: int, grid: ScanLayout,
                  misalign: str, max_rotation_deg: float, max_translation_mm: float) -> list[dict]:
    """Render and write one subject's two scans; return their two manifest rows."""
    base = anat.sample_shape(rng)
    fem_loss, tib_loss = _cartilage_loss(rng, bool(label))
    follow = anat.followup_shape(base, fem_loss, tib_loss, rng.normal(0.0, 0.1, 2))
    gains = _subject_intensities(rng)
    # Knee pose in the baseline scanner: small tilt; the joint line sits JOINT_LINE_MM below
    # the field-of-view centre, which leaves room for the femoral cartilage above it.
    pose = _homogeneous(_random_rotation(rng, 3.0),
                        rng.uniform(-2.0, 2.0, 3) + (0.0, 0.0, JOINT_LINE_MM))
    t = misalignment(rng, misalign, pose[:3, 3], max_rotation_deg, max_translation_mm)
    a_base = header_affine(grid, rng)
    a_follow = a_base if misalign == "none" else header_affine(grid, rng)
    jsn = base.joint_space_width() - follow.joint_space_width()
    common = {"subject": sid, "label": label, "jsn_mm": round(float(jsn[0]), 4),
              "jsn_lateral_mm": round(float(jsn[1]), 4),
              "misalign_deg": round(rotation_angle_deg(t), 4),
              "misalign_mm": round(float(np.linalg.norm(t[:3, 3] + t[:3, :3] @ pose[:3, 3]
                                                        - pose[:3, 3])), 4)}
    rows = []
    for tp, shape, world_to_base, affine in (("baseline", base, np.eye(4), a_base),
                                             ("followup", follow, np.linalg.inv(t), a_follow)):
        to_atlas = np.linalg.inv(pose) @ world_to_base  # scan world -> knee frame
        labels, tissue = render_labels(shape, to_atlas @ affine, grid.shape)
        image = render_intensity(tissue, gains * rng.uniform(0.9, 1.1), rng,
                                 noise_rel=rng.uniform(0.03, 0.07))
        path, mask = _write_scan(out, f"{sid}_{tp}", image, labels, affine)
        rows.append({**common, "timepoint": tp, "path": path, "mask_path": mask,
                     "transform": format_transform(np.eye(4) if tp == "baseline" else t),
                     "atlas_transform": format_transform(to_atlas)})
    return rows


def write_atlas(out: Path, grid: ScanLayout) -> tuple[Path, Path]:
    """Render the mean anatomy, clean, on an axis-aligned grid whose world is the knee frame."""
    affine = header_affine(grid, None)
    labels, tissue = render_labels(anat.mean_shape(), affine, grid.shape)
    image = render_intensity(tissue, TISSUE_INTENSITY, None)
    write_volume(out / "atlas.nii.gz", image.astype(np.float32), affine)
    write_volume(out / "atlas_mask.nii.gz", labels, affine, dtype=np.uint8)
    return out / "atlas.nii.gz", out / "atlas_mask.nii.gz"


MANIFEST_COLUMNS = ("subject", "timepoint", "path", "mask_path", "label", "transform",
                    "atlas_transform", "jsn_mm", "jsn_lateral_mm", "misalign_deg", "misalign_mm")


def synth_cohort(
    out: str | Path,
    subjects: int = 48,
    seed: int = 0,
    shape: tuple[int, int, int] = (64, 64, 64),
    spacing: tuple[float, float, float] | None = None,
    *,
    misalign: str = "rigid",
    progressor_fraction: float = 0.4,
    max_rotation_deg: float = 10.0,
    max_translation_mm: float = 8.0,
    workers: int | None = None,
) -> Path:
    """Write a synthetic longitudinal knee cohort into ``out``; return the manifest path.

    Parameters
    ----------
    out : folder to create (existing files of the same names are overwritten).
    subjects : number of subjects; each gets a baseline and a follow-up scan.
    seed : the same seed gives byte-identical files.
    shape : grid (D, H, W), axis 0 medio-lateral.
    spacing : voxel size (mm) per axis; default ``DEFAULT_FOV_MM / shape``
        (2.0 x 1.6 x 1.6 mm at 64^3). The field of view must hold the knee
        (at least ``MIN_FOV_MM``).
    misalign : ``none`` (follow-up on the baseline's grid, T = identity),
        ``rigid`` or ``affine`` repositioning between the scans.
    progressor_fraction : share of subjects with label 1 (at least one of each
        label when ``subjects >= 2``).
    max_rotation_deg, max_translation_mm : bounds of the misalignment T.
    workers : threads rendering subjects in parallel (default: up to 4, one
        per core); the files do not depend on it.
    """
    if subjects < 1:
        raise InputError(f"--subjects {subjects}: need at least one subject")
    if misalign not in MISALIGN_MODES:
        raise InputError(f"misalign '{misalign}': expected one of {', '.join(MISALIGN_MODES)}")
    if not 0.0 <= progressor_fraction <= 1.0:
        raise InputError(f"progressor fraction {progressor_fraction}: expected a value in [0, 1]")
    grid = make_layout(shape, spacing)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(subjects, progressor_fraction, seed)
    width = max(4, len(str(subjects - 1)))

    def one(i: int) -> list[dict]:
        return synth_subject(out, f"S{i:0{width}d}", np.random.default_rng([seed, i]),
                             int(labels[i]), grid, misalign, max_rotation_deg, max_translation_mm)

    # Threads: NumPy, SciPy and zlib release the GIL; each subject has its own
    # generator and files, so the output does not depend on the scheduling.
    n_workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        rows = [row for subject_rows in pool.map(one, range(subjects)) for row in subject_rows]
    write_atlas(out, grid)
    manifest = out / "manifest.csv"
    _write_csv(manifest, rows)
    meta = {
        "generator": "medfeat.cohorts.synth.synth_cohort",
        "subjects": subjects, "seed": seed, "shape": list(grid.shape),
        "spacing_mm": list(grid.spacing), "misalign": misalign,
        "progressor_fraction": progressor_fraction, "max_rotation_deg": max_rotation_deg,
        "max_translation_mm": max_translation_mm, "labels": anat.LABELS,
        "atlas": "atlas.nii.gz", "atlas_mask": "atlas_mask.nii.gz", "columns": COLUMN_DOCS,
    }
    (out / "cohort.json").write_text(json.dumps(meta, indent=2) + "\n")
    return manifest


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

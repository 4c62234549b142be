"""Extraction items: what one row of a feature array is, and how to build its model input.

An *item* is one row of the store: a scan (per-scan models: ``volume3d``, ``image2d``), a
baseline/follow-up pair (``pair3d`` models), or a scan paired with the atlas (``pair3d``
with the ``atlas`` alignments). Each item has one :class:`Channel` per model input
channel; a channel says which scan to sample, which scan defines its target grid (the
*reference*: itself, the subject's baseline, or the atlas), how the reference world maps
to the scan's world (a recorded transform, or one estimated by alignment), and which mask
locates the ROI crop.

Alignments (the first half of a variant name ``ALIGN-ROI``):

``none``          every scan on its own field of view.
``rigid|affine``  follow-ups aligned to their baseline by the kernels' registration.
``oracle``        follow-ups aligned to their baseline by the manifest's recorded
                  ``transform`` (synthetic cohorts; an upper bound for tests and studies).
``atlas``         per-scan models: each scan aligned (affine) to the atlas and sampled on
                  its grid; pair models: each scan paired with the atlas, unaligned.
``oracle_atlas``  as ``atlas`` for per-scan models, with the manifest's ``atlas_transform``.

ROI (second half): ``whole`` (field of view of the reference) or ``crop`` (box around the
reference's mask, else the atlas mask, plus a margin). ``roi_labels`` restricts the box to
some of the mask's labels: a mask whose labels include a tissue filling the field of view
(the synthetic cohort's label 5, soft tissue) otherwise gives a box as large as the scan.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfeat.engine.pipeline import preprocess as pp
from medfeat.errors import InputError, ManifestError, RuntimeUnavailableError, UnknownNameError

ALIGNMENTS = ("none", "rigid", "affine", "oracle", "atlas", "oracle_atlas")
ROIS = ("whole", "crop")


def variant_name(align: str, roi: str) -> str:
    """Store variant name, e.g. ``none-whole``, ``rigid-crop``."""
    if align not in ALIGNMENTS:
        raise UnknownNameError(f"unknown alignment {align!r}; alignments: {', '.join(ALIGNMENTS)}")
    if roi not in ROIS:
        raise UnknownNameError(f"unknown ROI {roi!r}; ROIs: {', '.join(ROIS)}")
    return f"{align}-{roi}"


@dataclass(frozen=True)
class Channel:
    """One input channel of an item.

    path : scan (or 2D image) to sample.
    ref : scan whose grid the channel is sampled on (``None``: the scan itself).
    mask : label map locating the ROI, in the reference's world (``None``: no crop mask).
    transform : 16 floats, row-major (4, 4) reference world mm -> scan world mm, or None.
    estimate : ``""``, ``"rigid"`` or ``"affine"``: estimate ``transform`` by registration.
    mask_labels : labels of ``mask`` that make the ROI (``None``: every non-zero label).
    """

    path: str
    ref: str | None = None
    mask: str | None = None
    transform: tuple[float, ...] | None = None
    estimate: str = ""
    mask_labels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Item:
    """One row of a feature array, and how to compute its input."""

    item_id: str
    subject: str
    timepoint: str
    kind: str
    channels: tuple[Channel, ...]
    label: str = ""

    @property
    def source(self) -> str:
        return ";".join(c.path for c in self.channels)

    def record(self) -> dict[str, str]:
        return {"item_id": self.item_id, "subject": self.subject, "timepoint": self.timepoint,
                "kind": self.kind, "source": self.source}


@dataclass
class Atlas:
    """The atlas image and mask paths (either may be None)."""

    image: str | None = None
    mask: str | None = None

    @classmethod
    def beside(cls, manifest: str | Path, image: str | None = None, mask: str | None = None) -> "Atlas":
        """Given paths, else ``atlas.nii.gz`` / ``atlas_mask.nii.gz`` next to the manifest."""
        root = Path(manifest).resolve().parent
        img = image or (str(root / "atlas.nii.gz") if (root / "atlas.nii.gz").exists() else None)
        msk = mask or (str(root / "atlas_mask.nii.gz") if (root / "atlas_mask.nii.gz").exists() else None)
        return cls(img, msk)


# -- planning ----------------------------------------------------------------------------
def _tuple(m: Any) -> tuple[float, ...] | None:
    if m is None or (isinstance(m, float) and np.isnan(m)):
        return None
    return tuple(float(v) for v in np.asarray(m, np.float64).ravel())


def _atlas_transform(row: dict[str, Any]) -> tuple[float, ...] | None:
    from medfeat.io.manifest import parse_transform

    text = row.get("atlas_transform")
    if not isinstance(text, str) or not text.strip():
        return None
    # manifest: atlas_world = M @ scan_world; a channel wants reference(atlas) world -> scan world.
    return _tuple(np.linalg.inv(parse_transform(text, f"subject {row['subject']}: atlas_transform")))


def _scan_id(row: dict[str, Any], unique_subjects: bool) -> str:
    if row.get("item_id"):
        return str(row["item_id"])
    if row.get("timepoint"):
        return f"{row['subject']}/{row['timepoint']}"
    return str(row["subject"]) if unique_subjects else f"{row['subject']}/{Path(row['path']).name}"


def plan_items(df: pd.DataFrame, input_kind: str, align: str, roi: str, atlas: Atlas,
               roi_labels: tuple[int, ...] | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items for a manifest frame (from ``read_manifest``), plus ``(item_id, reason)`` for
    rows that cannot make an item (no baseline for an alignment, no atlas, ...).

    ``roi_labels``: mask labels whose bounding box is the ``crop`` ROI (None: all non-zero).
    """
    items, bad = _plan(df, input_kind, align, roi, atlas)
    if roi_labels is not None and roi == "crop":
        labels = tuple(int(v) for v in roi_labels)
        items = [replace(it, channels=tuple(replace(c, mask_labels=labels) if c.mask else c
                                            for c in it.channels)) for it in items]
    return items, bad


def _plan(df: pd.DataFrame, input_kind: str, align: str, roi: str,
          atlas: Atlas) -> tuple[list[Item], list[tuple[str, str]]]:
    variant_name(align, roi)
    if input_kind == "image2d" and align != "none":
        raise UnknownNameError(f"alignment {align!r} is for 3D cohorts; 2D models take 'none'")
    if align in ("atlas", "oracle_atlas") and atlas.image is None:
        raise ManifestError("the atlas alignment needs an atlas (atlas.nii.gz beside the manifest, or --atlas)")
    if input_kind == "pair3d" and align == "oracle_atlas":
        raise UnknownNameError("pair models take the atlas unaligned: use the 'atlas' alignment")
    rows = df.to_dict("records")
    unique = df["subject"].is_unique
    bad: list[tuple[str, str]] = []
    crop = roi == "crop"
    amask = atlas.mask if crop else None
    if align in ("rigid", "affine", "atlas") and not (input_kind == "pair3d" and align == "atlas"):
        check_alignment_available(align)
    if input_kind == "pair3d" and align != "atlas":
        return _plan_pairs(rows, align, crop, amask, bad), bad
    items = []
    by_subject = {(r["subject"], r.get("timepoint")): r for r in rows}
    for r in rows:
        iid = _scan_id(r, unique)
        own_mask = (r.get("mask_path") or amask) if crop else None
        kind = "image" if input_kind == "image2d" else "scan"
        meta = dict(item_id=iid, subject=str(r["subject"]), timepoint=str(r.get("timepoint") or ""),
                    label=_label(r))
        if input_kind == "pair3d":  # atlas pairs: (scan, atlas)
            ch = (Channel(r["path"], mask=own_mask), Channel(atlas.image, mask=amask))
            items.append(Item(kind="pair", channels=ch, **meta))
        elif align == "none" or input_kind == "image2d":
            items.append(Item(kind=kind, channels=(Channel(r["path"], mask=own_mask),), **meta))
        elif align in ("atlas", "oracle_atlas"):
            t = _atlas_transform(r) if align == "oracle_atlas" else None
            if align == "oracle_atlas" and t is None:
                bad.append((iid, "no atlas_transform in the manifest for the oracle_atlas alignment"))
                continue
            ch = Channel(r["path"], ref=atlas.image, mask=amask, transform=t,
                         estimate="" if t else "affine")
            items.append(Item(kind=kind, channels=(ch,), **meta))
        else:
            ch, reason = _to_baseline(r, by_subject.get((r["subject"], "baseline")), align, crop, amask)
            if ch is None:
                bad.append((iid, reason))
                continue
            items.append(Item(kind=kind, channels=(ch,), **meta))
    return items, bad


def _label(r: dict[str, Any]) -> str:
    v = r.get("label")
    return "" if v is None or pd.isna(v) else str(int(v))


def _to_baseline(r: dict[str, Any], base: dict[str, Any] | None, align: str, crop: bool,
                 amask: str | None) -> tuple[Channel | None, str]:
    """Channel sampling scan row ``r`` on its subject's baseline grid, aligned by ``align``."""
    if base is None:
        return None, f"no baseline scan of subject {r['subject']} to align to"
    mask = (base.get("mask_path") or amask) if crop else None
    if r is base:
        return Channel(r["path"], mask=mask), ""
    if align == "oracle":
        t = _tuple(r.get("transform"))
        if t is None:
            return None, "no recorded transform in the manifest for the oracle alignment"
        return Channel(r["path"], ref=base["path"], mask=mask, transform=t), ""
    return Channel(r["path"], ref=base["path"], mask=mask, estimate=align), ""


def _plan_pairs(rows: list[dict[str, Any]], align: str, crop: bool, amask: str | None,
                bad: list[tuple[str, str]]) -> list[Item]:
    """One item per subject: channel 0 the follow-up (moving), channel 1 the baseline (fixed)."""
    by_subject: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_subject.setdefault(str(r["subject"]), {})[str(r.get("timepoint") or "")] = r
    items = []
    for subject, tps in by_subject.items():
        base, follow = tps.get("baseline"), tps.get("followup")
        if base is None or follow is None:
            bad.append((subject, f"subject {subject} lacks a {'baseline' if base is None else 'followup'} scan for a pair"))
            continue
        fixed = Channel(base["path"], mask=(base.get("mask_path") or amask) if crop else None)
        if align == "none":
            moving = Channel(follow["path"], mask=(follow.get("mask_path") or amask) if crop else None)
        else:
            moving, reason = _to_baseline(follow, base, align, crop, amask)
            if moving is None:
                bad.append((subject, reason))
                continue
        items.append(Item(subject, subject, "baseline+followup", "pair", (moving, fixed),
                          label=_label(follow) or _label(base)))
    return items


# -- loading -----------------------------------------------------------------------------
@dataclass
class LoadTimer:
    """Seconds spent reading files and preprocessing, summed over calls."""

    read: float = 0.0
    preprocess: float = 0.0
    cache: dict[str, Any] = field(default_factory=dict)

    def volume(self, path: str) -> Any:
        """Read a scan once per batch (a baseline can serve several channels)."""
        if path not in self.cache:
            t0 = time.perf_counter()
            from medfeat.io.readers import read_scan

            self.cache[path] = read_scan(path)
            self.read += time.perf_counter() - t0
        return self.cache[path]


def load_item(item: Item, spec: Any, size: tuple[int, ...], timer: LoadTimer,
              transforms: dict[tuple[str, int], np.ndarray] | None = None,
              out: np.ndarray | None = None, gray: str = "repeat") -> np.ndarray:
    """The model input of ``item``: (C, *size) float32, written into ``out`` when given (a
    row of the batch buffer). Raises InputError for bad inputs.

    ``transforms`` holds estimated alignments by (item id, channel) from :func:`align_batch`;
    channels that need one and are missing there are aligned on their own. ``gray`` is the
    2D model's grey-image mode (:func:`gray_mode`).
    """
    if spec.input_kind == "image2d":
        ch = item.channels[0]
        t0 = time.perf_counter()
        from medfeat.io.readers import read_image

        img = read_image(ch.path)
        timer.read += time.perf_counter() - t0
        t0 = time.perf_counter()
        x = pp.prepare_image(img, size, spec.preprocess, spec.in_channels, gray=gray, out=out)
        timer.preprocess += time.perf_counter() - t0
        return x
    if len(item.channels) != spec.in_channels:
        raise InputError(f"{item.item_id}: {len(item.channels)} input channel(s), model takes {spec.in_channels}")
    if out is None:
        out = np.empty((spec.in_channels, *size), dtype=np.float32)
    transforms = transforms or {}
    for k, ch in enumerate(item.channels):
        _load_channel(ch, spec, size, timer, transforms.get((item.item_id, k)), out, k)
    return out


def gray_mode(backbone: Any) -> str:
    """The grey-image mode a 2D backbone was built with (its ``gray`` config; ``repeat``)."""
    return str((getattr(backbone, "provenance", None) or {}).get("config", {}).get("gray", "repeat"))


def _load_channel(ch: Channel, spec: Any, size: tuple[int, ...], timer: LoadTimer,
                  estimated: np.ndarray | None, out: np.ndarray, k: int) -> None:
    vol = timer.volume(ch.path)
    ref = timer.volume(ch.ref) if ch.ref else vol
    mask = timer.volume(ch.mask) if ch.mask else None
    t0 = time.perf_counter()
    transform = None if ch.transform is None else np.asarray(ch.transform).reshape(4, 4)
    if ch.estimate:
        transform = estimated if estimated is not None else estimate_alignment(vol, ref, ch.estimate)
    if mask is not None:
        roi = mask.data if ch.mask_labels is None else np.isin(mask.data, ch.mask_labels)
        if not roi.any():
            raise InputError(f"{ch.mask}: no voxel has an ROI label {list(ch.mask_labels or ())}")
        lo, hi = pp.mask_box(roi, mask.affine, ref.affine)
        grid = pp.box_grid(ref.affine, lo, hi, size)
    else:
        grid = pp.fov_grid(ref.affine, ref.shape, size)
    try:
        pp.prepare_volume_into(out[None], k, vol.data, vol.affine, grid, spec.preprocess, transform)
    except ImportError:  # kernels not built: the unfused SciPy path
        out[k] = pp.prepare_volume(vol.data, vol.affine, grid, spec.preprocess, transform)
    timer.preprocess += time.perf_counter() - t0


def check_alignment_available(kind: str) -> None:
    """Raise RuntimeUnavailableError (one line, at planning time) when no registration exists."""
    try:
        from medfeat.kernels import align  # noqa: F401
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"{kind} alignment is not available (medfeat.kernels has no align); "
            "use --variant oracle on cohorts with recorded transforms") from exc


def estimate_alignment(moving: Any, fixed: Any, kind: str) -> np.ndarray:
    """(4, 4) fixed world mm -> moving world mm, by the kernels' registration (NCC, pyramid).

    ``kind``: ``rigid`` or ``affine``. Scans are aligned one item at a time here.
    """
    from medfeat.kernels import align

    out = align([moving.data], [fixed.data], [moving.affine], [fixed.affine], kind=kind)
    return np.asarray(out[0], dtype=np.float64)


def align_batch(items: list[Item], timer: LoadTimer) -> tuple[dict[tuple[str, int], np.ndarray], list[tuple[str, str]]]:
    """Estimate every alignment a batch needs in one batched registration per kind.

    Returns transforms by (item id, channel) and ``(item id, reason)`` for items whose
    scans could not be read (they fail; the rest of the batch goes on).
    """
    from medfeat.errors import MedfeatError

    wanted: dict[str, list[tuple[str, int, Any, Any]]] = {}
    failures = []
    for item in items:
        for k, ch in enumerate(item.channels):
            if not ch.estimate:
                continue
            try:
                moving, fixed = timer.volume(ch.path), timer.volume(ch.ref or ch.path)
            except MedfeatError as exc:
                failures.append((item.item_id, " ".join(str(exc).split())[:300]))
                continue
            wanted.setdefault(ch.estimate, []).append((item.item_id, k, moving, fixed))
    out: dict[tuple[str, int], np.ndarray] = {}
    t0 = time.perf_counter()
    for kind, jobs in wanted.items():
        from medfeat.kernels import align

        mats = align([j[2].data for j in jobs], [j[3].data for j in jobs],
                     [j[2].affine for j in jobs], [j[3].affine for j in jobs], kind=kind)
        out.update({(j[0], j[1]): np.asarray(m, np.float64) for j, m in zip(jobs, mats)})
    timer.preprocess += time.perf_counter() - t0
    return out, failures

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

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfeat.engine.pipeline.config import Variant
from medfeat.errors import InputError, ManifestError, RuntimeUnavailableError, UnknownNameError, one_line
from medfeat.io.manifest import KNOWN_COLUMNS, parse_transform
from medfeat.io.visits import VisitPairing, baseline_of, pair_id, visit_pairs


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
    extra: tuple[tuple[str, str], ...] = ()  # the manifest's other columns (age, sex, site, ...)

    @property
    def source(self) -> str:
        return ";".join(c.path for c in self.channels)

    def record(self) -> dict[str, str]:
        return {**dict(self.extra), "item_id": self.item_id, "subject": self.subject,
                "timepoint": self.timepoint, "kind": self.kind, "source": self.source}


@dataclass
class Atlas:
    """The atlas image and mask paths (either may be None)."""

    image: str | None = None
    mask: str | None = None

    @classmethod
    def beside(cls, manifest: str | Path, image: str | None = None, mask: str | None = None) -> Atlas:
        """Given paths, else ``atlas.nii.gz`` / ``atlas_mask.nii.gz`` next to the manifest."""
        root = Path(manifest).resolve().parent
        img = image or (str(root / "atlas.nii.gz") if (root / "atlas.nii.gz").exists() else None)
        msk = mask or (str(root / "atlas_mask.nii.gz") if (root / "atlas_mask.nii.gz").exists() else None)
        return cls(img, msk)

    def required_image(self) -> str:
        """The atlas image; a ManifestError when there is none."""
        if self.image is None:
            raise ManifestError("the atlas alignment needs an atlas (atlas.nii.gz beside the manifest, or --atlas)")
        return self.image


# -- planning ----------------------------------------------------------------------------
def _tuple(m: object) -> tuple[float, ...] | None:
    if m is None or (isinstance(m, float) and np.isnan(m)):
        return None
    return tuple(float(v) for v in np.asarray(m, np.float64).ravel())


def _atlas_transform(row: dict[str, Any]) -> tuple[float, ...] | None:
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


def plan_items(df: pd.DataFrame, input_kind: str, variant: Variant, atlas: Atlas,
               visits: VisitPairing | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items for a manifest frame (from ``read_manifest``), plus ``(item_id, reason)`` for
    rows that cannot make an item (no baseline for an alignment, no atlas, ...).

    ``variant.roi_labels``: mask labels whose bounding box is the ``crop`` ROI (None: all
    non-zero). ``visits``: which visits pair up (pair models) and which is each subject's
    baseline (alignment to the baseline); see :mod:`medfeat.io.visits`. Every manifest
    column the pipeline does not read itself is carried in each item's ``extra``.
    """
    items, bad = _plan(df, input_kind, variant.align, variant.roi, atlas, visits or VisitPairing())
    if variant.roi != "crop":
        return items, bad
    croppable = [it for it in items if all(c.mask for c in it.channels)]
    no_mask = [it for it in items if not all(c.mask for c in it.channels)]
    if no_mask and not croppable:
        raise InputError(f"--roi crop: no item can be cropped: no mask_path in the manifest rows "
                         f"(e.g. {no_mask[0].item_id}) and no atlas mask (atlas_mask.nii.gz or --atlas-mask)")
    bad += [(it.item_id, "--roi crop: no mask for this item (empty mask_path and no atlas mask)") for it in no_mask]
    if variant.roi_labels is not None:
        labels = tuple(int(v) for v in variant.roi_labels)
        croppable = [replace(it, channels=tuple(replace(c, mask_labels=labels) for c in it.channels))
                     for it in croppable]
    return croppable, bad


def _extra(row: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The row's carried columns as text (empty for missing values)."""
    out = []
    for key, value in row.items():
        if key in KNOWN_COLUMNS or key == "label":
            continue
        missing = value is None or (not isinstance(value, str) and bool(pd.isna(value)))
        out.append((str(key), "" if missing else str(value)))
    if "label" in row:
        out.append(("label", _label(row)))
    return tuple(out)


def _pair_extra(base: dict[str, Any], follow: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """A pair's columns: the baseline row's, plus ``followup_<column>`` where the follow-up differs."""
    b, f = dict(_extra(base)), dict(_extra(follow))
    if f.get("label"):  # a pair's label is the follow-up's (progression), else the baseline's
        b["label"] = f["label"]
    return tuple(b.items()) + tuple((f"followup_{k}", v) for k, v in f.items() if k != "label" and b.get(k) != v)


def _plan(df: pd.DataFrame, input_kind: str, align: str, roi: str,
          atlas: Atlas, visits: VisitPairing) -> tuple[list[Item], list[tuple[str, str]]]:
    if input_kind == "image2d" and align != "none":
        raise UnknownNameError(f"alignment {align!r} is for 3D cohorts; 2D models take 'none'")
    if input_kind == "image2d" and roi != "whole":
        raise UnknownNameError(f"ROI {roi!r} is for 3D cohorts; 2D models take the whole image")
    if align in ("atlas", "oracle_atlas"):
        atlas.required_image()
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
        return _plan_pairs(rows, align, crop, amask, bad, visits), bad
    items = []
    subject_rows: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        subject_rows.setdefault(str(r["subject"]), []).append(r)
    for r in rows:
        iid = _scan_id(r, unique)
        own_mask = (r.get("mask_path") or amask) if crop else None
        kind = "image" if input_kind == "image2d" else "scan"
        meta: dict[str, Any] = dict(item_id=iid, subject=str(r["subject"]), timepoint=str(r.get("timepoint") or ""),
                    label=_label(r), extra=_extra(r))
        if input_kind == "pair3d":  # atlas pairs: (scan, atlas)
            # an id of its own: in a store shared with per-scan models, SUBJECT/TIMEPOINT is the scan alone
            meta["item_id"] = f"{iid}+atlas"
            pair = (Channel(r["path"], mask=own_mask), Channel(atlas.required_image(), mask=amask))
            items.append(Item(kind="pair", channels=pair, **meta))
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
            try:
                base = baseline_of(subject_rows[str(r["subject"])], visits, str(r["subject"]))
            except ManifestError as exc:
                bad.append((iid, str(exc)))
                continue
            aligned, reason = _to_baseline(r, base, align, crop, amask)
            if aligned is None:
                bad.append((iid, reason))
                continue
            items.append(Item(kind=kind, channels=(aligned,), **meta))
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
        t = r.get("transform")
        if t is None or (isinstance(t, float) and np.isnan(t)):
            return None, "no recorded transform in the manifest for the oracle alignment"
        tb = base.get("transform")
        if isinstance(tb, np.ndarray):  # transforms are from the subject's first scan: compose to base
            t = np.asarray(t, np.float64) @ np.linalg.inv(tb)
        return Channel(r["path"], ref=base["path"], mask=mask, transform=_tuple(t)), ""
    return Channel(r["path"], ref=base["path"], mask=mask, estimate=align), ""


def _plan_pairs(rows: list[dict[str, Any]], align: str, crop: bool, amask: str | None,
                bad: list[tuple[str, str]], visits: VisitPairing) -> list[Item]:
    """One item per visit pair of a subject (:mod:`medfeat.io.visits`): channel 0 the
    follow-up (moving), channel 1 the baseline (fixed)."""
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_subject.setdefault(str(r["subject"]), []).append(r)
    items = []
    for subject, subject_rows in by_subject.items():
        try:
            pairs, reason = visit_pairs(subject_rows, visits, subject)
        except ManifestError as exc:
            pairs, reason = [], str(exc)
        if not pairs:
            bad.append((subject, reason))
            continue
        for base, follow in pairs:
            iid, timepoint = pair_id(subject, base, follow)
            fixed = Channel(base["path"], mask=(base.get("mask_path") or amask) if crop else None)
            moving: Channel | None
            if align == "none":
                moving = Channel(follow["path"], mask=(follow.get("mask_path") or amask) if crop else None)
            else:
                moving, reason = _to_baseline(follow, base, align, crop, amask)
                if moving is None:
                    bad.append((iid, reason))
                    continue
            items.append(Item(iid, subject, timepoint, "pair", (moving, fixed),
                              label=_label(follow) or _label(base), extra=_pair_extra(base, follow)))
    return items


def check_alignment_available(kind: str) -> None:
    """Raise RuntimeUnavailableError (one line, at planning time) when no registration exists."""
    try:
        import medfeat.kernels.align  # noqa: F401
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"{kind} alignment is not available ({one_line(exc)}); "
            "use --align oracle on cohorts with recorded transforms") from exc

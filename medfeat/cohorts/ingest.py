"""Ingest: a manifest's scans converted once into a Zarr v3 cohort (OME-Zarr metadata).

Cohorts read more than once (several models, variants or studies) are faster to read from
Zarr chunks than from gzip-compressed NIfTI; the new manifest points at the Zarr scans and
keeps every other column of the original row, digits of transforms included.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import zarr

from medfeat.errors import InputError
from medfeat.io.manifest import read_manifest_rows
from medfeat.io.readers import read_scan
from medfeat.io.zarr_scans import check_codec, write_zarr_volume
from medfeat.timeutil import utc_now


def ingest_cohort(manifest: str | Path, out: str | Path, *, chunk: int = 64, codec: str = "zstd",
                  on_item: Callable[[str, str | None], None] | None = None) -> tuple[Path, list[tuple[str, str]]]:
    """Convert a manifest's scans (NIfTI or DICOM series) and masks into a Zarr cohort store.

    Returns the new manifest path (inside ``out``) and ``(row, reason)`` for scans that
    could not be read (left out of the new manifest). ``on_item(name, error)`` is called
    per scan (progress).
    """
    check_codec(codec)
    read = read_manifest_rows(manifest)
    df, failures = read.frame, read.bad
    out = Path(out)
    root = zarr.open_group(str(out), mode="a", zarr_format=3)
    root.attrs["medfeat_cohort"] = {"format": 1, "source": str(Path(manifest).resolve()),
                                    "created": utc_now()}
    raw = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    rows: list[dict[str, str]] = []
    for i, r in df.iterrows():
        name = f"{r['subject']}/{r.get('timepoint') or i}"
        try:
            write_zarr_volume(root, f"scans/{name}", read_scan(r["path"]), chunk=chunk, codec=codec)
            if isinstance(r.get("mask_path"), str) and r["mask_path"]:
                write_zarr_volume(root, f"masks/{name}", read_scan(r["mask_path"]), chunk=chunk,
                                  codec=codec, dtype="uint8")
        except InputError as exc:
            failures.append((name, str(exc)))
            if on_item:
                on_item(name, str(exc))
            continue
        row = _source_row(raw, r)
        row["path"] = f"scans/{name}"
        if "mask_path" in row and row["mask_path"]:
            row["mask_path"] = f"masks/{name}"
        rows.append(row)
        if on_item:
            on_item(name, None)
    for name in ("atlas.nii.gz", "atlas_mask.nii.gz"):  # the atlas variants look beside the manifest
        src = Path(manifest).resolve().parent / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    new = out / "manifest.csv"
    pd.DataFrame(rows, columns=list(raw.columns)).to_csv(new, index=False)
    return new, failures


def _source_row(raw: pd.DataFrame, r: pd.Series) -> dict[str, str]:
    """The original CSV text of the row for ``r`` (transforms keep their exact digits)."""
    match = raw[(raw["subject"].str.strip() == r["subject"])]
    if "timepoint" in raw.columns and len(match) > 1:
        match = match[[str(t).strip().lower().replace("-", "").replace("_", "") == r["timepoint"]
                       for t in match["timepoint"]]]
    out = dict(match.iloc[0]) if len(match) else {c: str(r.get(c, "")) for c in raw.columns}
    if "timepoint" in out:
        out["timepoint"] = r["timepoint"]
    return out

"""DICOM trees as scanners and PACS export them -> cohort manifests, one row per series.

Every file under the root is tried (with or without a ``.dcm`` suffix; headers only): files
that are not DICOM, or DICOM without an image (DICOMDIR, structured reports, RT plans),
are counted and left out. Images are grouped by SeriesInstanceUID. A row's subject is the
PatientID, its visit (``timepoint``) the StudyDate (``YYYY-MM-DD``, also in
``acquisition_date``, which orders visits); its path is the series' folder when the folder
holds that series alone, else one file of it (the reader takes the folder's files of the
same series), or the file itself for an enhanced multi-frame object. Series whose files
lie in several folders are reported, not guessed at.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medfeat.errors import InputError
from medfeat.io.dicom import is_dicom_file, read_dataset

_TAGS = ("PatientID", "StudyDate", "StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription", "Modality",
         "SeriesNumber", "NumberOfFrames")


@dataclass
class DicomScan:
    """What a scan found: the manifest frame, series left out with the reason, and how many
    files were not DICOM images."""

    manifest: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)
    other_files: int = 0


def _header(path: Path) -> dict[str, str] | None:
    """The grouping tags of a DICOM image file, or None for anything else."""
    if not is_dicom_file(path):
        return None
    try:
        ds = read_dataset(path, headers_only=True)
    except InputError:
        return None
    if "SeriesInstanceUID" not in ds or "Rows" not in ds:  # DICOMDIR, SR, RT plan: no image
        return None
    return {t: str(ds.get(t, "") or "") for t in _TAGS}


def _date(text: str) -> str:
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if re.fullmatch(r"\d{8}", text) else ""


def scan_dicom(root: str | Path, *, series_description: str | None = None) -> DicomScan:
    """Group the DICOM images under ``root`` by series; keep series whose SeriesDescription
    matches the regular expression ``series_description`` (case-insensitive, anywhere)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    pattern = re.compile(series_description, re.IGNORECASE) if series_description else None
    series: dict[str, list[tuple[Path, dict[str, str]]]] = {}
    by_folder: dict[Path, set[str]] = {}
    other = 0
    for top, _, names in os.walk(root):
        for name in sorted(names):
            path = Path(top) / name
            head = _header(path)
            if head is None:
                other += 1
                continue
            series.setdefault(head["SeriesInstanceUID"], []).append((path, head))
            by_folder.setdefault(path.parent, set()).add(head["SeriesInstanceUID"])
    rows, skipped = [], []
    for uid, members in series.items():
        head = members[0][1]
        if pattern is not None and not pattern.search(head["SeriesDescription"]):
            continue
        folders = {p.parent for p, _ in members}
        if len(folders) > 1:
            skipped.append((uid, f"series {head['SeriesDescription'] or uid} spans {len(folders)} folders"))
            continue
        folder = folders.pop()
        multiframe = len(members) == 1 and int(head["NumberOfFrames"] or 1) > 1
        alone = by_folder[folder] == {uid} and not multiframe
        where = folder if alone else sorted(p for p, _ in members)[0]
        if not head["PatientID"]:
            skipped.append((uid, f"series {head['SeriesDescription'] or uid} has no PatientID"))
            continue
        rows.append({"subject": head["PatientID"], "timepoint": _date(head["StudyDate"]) or head["StudyInstanceUID"],
                     "path": where.relative_to(root).as_posix() or ".", "acquisition_date": _date(head["StudyDate"]),
                     "modality": head["Modality"], "series_description": head["SeriesDescription"],
                     "series_number": head["SeriesNumber"], "series_uid": uid,
                     "files": len(members), "frames": int(head["NumberOfFrames"] or 1) * len(members)})
    if not rows:
        raise InputError(f"{root}: no DICOM image series" + (f" matching {series_description!r}" if pattern else ""))
    df = pd.DataFrame(rows).sort_values(["subject", "timepoint", "series_number", "path"], kind="mergesort")
    return DicomScan(df.reset_index(drop=True), skipped, other)


def check_one_series_per_visit(df: pd.DataFrame, root: Path) -> None:
    """A manifest has one scan per (subject, visit): name the first visit holding several."""
    dup = df.duplicated(["subject", "timepoint"], keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        names = sorted(df.loc[dup & (df["subject"] == first["subject"]) & (df["timepoint"] == first["timepoint"]),
                              "series_description"])
        raise InputError(f"{root}: patient {first['subject']} on {first['timepoint']} has {len(names)} series "
                         f"({', '.join(repr(n) for n in names)}): choose one with --series-description REGEX")

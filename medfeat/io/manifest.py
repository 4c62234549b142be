"""Cohort manifests: a CSV with one row per scan (or image).

Required columns: ``subject`` and ``path``. Optional columns, validated when
present:

``timepoint``
    the visit label: any text (``bl``, ``m12``, ``00m``, a BIDS session);
    ``baseline`` and ``followup`` (``follow-up`` / ``follow_up`` are normalised,
    case-insensitive) are the default pair. ``(subject, timepoint)`` must be unique.
    How visits are ordered and paired: :mod:`medfeat.io.visits`.
``visit_order``
    a number ordering a subject's visits; may be empty.
``acquisition_date``
    the date of the scan (``YYYY-MM-DD`` or DICOM's ``YYYYMMDD``), normalised to
    ``YYYY-MM-DD``; orders visits when there is no ``visit_order``; may be empty.
``mask_path``
    label map with the same grid as ``path``; may be empty.
``label``
    integer class label (e.g. 1 = progressor, 0 = stable); may be empty.
``transform``
    16 space-separated numbers, a row-major 4x4 world-space (mm) affine ``T``
    with ``followup_world = T @ baseline_world`` for homogeneous points: a point
    at ``x`` in the baseline scan's world coordinates is at ``T @ x`` in the
    follow-up scan's world coordinates. Identity on baseline rows; empty means
    unknown. Parsed into a (4, 4) float64 array (or ``None``).
``atlas_transform``
    same format, ``atlas_world = M @ scan_world`` (written by the synthetic
    cohort; see :mod:`medfeat.cohorts.synth`); validated like ``transform`` but
    kept as text: parse it with :func:`parse_transform`.
``jsn_mm``, ``jsn_lateral_mm``, ``misalign_deg``, ``misalign_mm``
    numbers (the synthetic cohort's ground truth); empty is NaN.

Any other columns are kept as strings. Relative paths are resolved against
the manifest's folder. Errors are :class:`medfeat.errors.ManifestError` with a
one-line message naming the file, the data row (1-based, header excluded), the
CSV line and the column.

Rows that repeat an earlier row exactly are dropped (with a note); two different rows for
one scan (the same ``item_id``, or the same ``subject`` and ``timepoint``) are refused with
both line numbers, since either could be the one meant.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medfeat.errors import ManifestError, one_line

REQUIRED_COLUMNS = ("subject", "path")
TIMEPOINTS = ("baseline", "followup")
_TIMEPOINT_ALIASES = {"baseline": "baseline", "followup": "followup",
                      "follow-up": "followup", "follow_up": "followup"}
PATH_COLUMNS = ("path", "mask_path")
NUMBER_COLUMNS = ("jsn_mm", "jsn_lateral_mm", "misalign_deg", "misalign_mm", "visit_order")
# what the pipeline reads itself; every other column is carried into the store's items table
KNOWN_COLUMNS = ("item_id", "subject", "timepoint", "path", "mask_path", "transform", "atlas_transform")


def format_transform(matrix: np.ndarray) -> str:
    """The manifest text of a 4x4 matrix: 16 space-separated numbers, row-major, round-trip exact."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"transform must be 4x4, got shape {m.shape}")
    return " ".join(repr(float(v)) for v in m.ravel())


def parse_transform(text: str, where: str = "transform") -> np.ndarray:
    """Parse 16 space-separated numbers (row-major) into a (4, 4) float64 affine.

    The matrix must be finite, have last row ``0 0 0 1`` and a non-singular
    3x3 part. ``where`` prefixes the error message.
    """
    parts = str(text).replace(",", " ").split()
    if len(parts) != 16:
        raise ManifestError(f"{where}: expected 16 numbers, got {len(parts)}")
    try:
        m = np.array([float(v) for v in parts], dtype=np.float64).reshape(4, 4)
    except ValueError as exc:
        raise ManifestError(f"{where}: not a number ({exc})") from exc
    if not np.all(np.isfinite(m)):
        raise ManifestError(f"{where}: non-finite entries")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise ManifestError(f"{where}: last row must be '0 0 0 1', got {m[3].tolist()}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-9:
        raise ManifestError(f"{where}: singular matrix")
    return m


@dataclass
class ManifestRows:
    """A manifest read for a bulk run: the valid rows (``frame``), ``(row id, reason)`` for
    each bad row, and notes (e.g. exact duplicate rows dropped)."""

    frame: pd.DataFrame
    bad: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_manifest(path: str | Path, *, check_files: bool = False) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    Returns a DataFrame with one row per CSV row, in file order: ``subject``
    (str), ``path`` (absolute str), and the optional columns parsed as
    described in the module docstring (``label`` as nullable ``Int64``,
    ``transform`` as (4, 4) arrays or ``None``, ``mask_path`` absolute or
    ``None``). With ``check_files`` every ``path`` (and non-empty
    ``mask_path``) must exist; by default missing files are left for the bulk
    run to record as failed items.
    """
    p = Path(path)
    raw, _ = _unique_rows(_read_raw(p), p)
    return _validate(raw, p, p.resolve().parent, check_files).reset_index(drop=True)


def read_manifest_rows(path: str | Path) -> ManifestRows:
    """The manifest's valid rows, the bad rows with their reasons, and notes.

    File-level problems (missing file, missing columns, two different rows for one scan)
    raise :class:`ManifestError`; a bad row is reported and the others go on.
    """
    p = Path(path)
    raw, notes = _unique_rows(_read_raw(p), p)
    root = p.resolve().parent
    try:
        return ManifestRows(_validate(raw, p, root, False).reset_index(drop=True), [], notes)
    except ManifestError as exc:
        if ": row " not in str(exc):
            raise
    good, bad = [], []
    for i in raw.index:
        try:  # validate one row at a time (validation stops at the first bad row)
            good.append(_validate(raw.loc[[i]], p, root, False))
        except ManifestError as exc:
            bad.append((f"row {i + 1}", str(exc)))
    if not good:
        raise ManifestError(f"{p}: no valid rows ({bad[0][1]})")
    return ManifestRows(pd.concat(good).reset_index(drop=True), bad, notes)


def _read_raw(p: Path) -> pd.DataFrame:
    """The CSV's cells as stripped strings, its index the 0-based data row."""
    if not p.is_file():
        raise ManifestError(f"{p}: manifest not found")
    try:
        raw = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError as exc:
        raise ManifestError(f"{p}: manifest is empty") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{p}: not a readable CSV ({one_line(exc, 160)})") from exc
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise ManifestError(f"{p}: missing required column(s) {', '.join(missing)}{_delimiter_hint(raw)}")
    dupes = sorted({c for c in raw.columns if list(raw.columns).count(c) > 1})
    if dupes:
        raise ManifestError(f"{p}: duplicated column(s) {', '.join(dupes)}")
    if len(raw) == 0:
        raise ManifestError(f"{p}: manifest has no rows")
    return raw.apply(lambda col: col.str.strip())


def _delimiter_hint(raw: pd.DataFrame) -> str:
    header = ",".join(raw.columns)
    for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
        if sep in header:
            return (f" (the header {header[:60]!r} looks separated by {name}: medfeat reads comma-separated "
                    "CSV; save the file with commas)")
    return ""


def _unique_rows(raw: pd.DataFrame, p: Path) -> tuple[pd.DataFrame, list[str]]:
    """Drop rows that repeat an earlier row exactly (noted); refuse two different rows for
    one scan (same item_id, or same subject and timepoint) with both line numbers."""
    notes = []
    exact = raw.duplicated(keep="first")
    for i in raw.index[exact]:
        first = raw.index[(raw == raw.loc[i]).all(axis=1)][0]
        notes.append(f"{p}: line {i + 2} repeats line {first + 2} exactly; dropped")
    raw = raw.loc[~exact]
    for keys in (["item_id"], ["subject", "timepoint"]):
        if not all(k in raw.columns for k in keys) or (keys == ["item_id"] and not (raw["item_id"] != "").all()):
            continue
        ident = raw[keys].apply(lambda r: tuple(_TIMEPOINT_ALIASES.get(v.lower(), v.lower()) if k == "timepoint"
                                                else v for k, v in r.items()), axis=1)
        clash = ident.duplicated(keep="first")
        if clash.any():
            i = raw.index[clash][0]
            first = raw.index[ident == ident.loc[i]][0]
            what = ", ".join(f"{k} {raw.loc[i, k]!r}" for k in keys)
            raise ManifestError(f"{p}: lines {first + 2} and {i + 2} are different rows for one scan ({what}); "
                                "keep one")
    return raw, notes


def _where(p: Path, row: int, column: str) -> str:
    # row is the 0-based DataFrame index; the header is CSV line 1.
    return f"{p}: row {row + 1} (line {row + 2}), column '{column}'"


def _validate(df: pd.DataFrame, p: Path, root: Path, check_files: bool) -> pd.DataFrame:
    """Parse and check ``df``'s rows; messages name rows by ``df``'s index (0-based data row)."""
    out = df.copy()
    for i, value in zip(df.index, df["subject"]):
        if not value:
            raise ManifestError(f"{_where(p, i, 'subject')}: empty subject")
    for column in PATH_COLUMNS:
        if column in df.columns:
            # object dtype, so an empty mask_path stays None rather than becoming NaN
            out[column] = pd.Series([_resolve(v, root, p, i, column, column == "path", check_files)
                                     for i, v in zip(df.index, df[column])], dtype=object, index=out.index)
    if "timepoint" in df.columns:
        out["timepoint"] = [_timepoint(v, p, i) for i, v in zip(df.index, df["timepoint"])]
    if "label" in df.columns:
        out["label"] = pd.array([_label(v, p, i) for i, v in zip(df.index, df["label"])], dtype="Int64")
    if "transform" in df.columns:
        out["transform"] = pd.Series(
            [parse_transform(v, _where(p, i, "transform")) if v else None
             for i, v in zip(df.index, df["transform"])], dtype=object, index=out.index)
    if "atlas_transform" in df.columns:  # checked, but kept as text (engine.items parses it)
        for i, v in zip(df.index, df["atlas_transform"]):
            if v:
                parse_transform(v, _where(p, i, "atlas_transform"))
    for column in NUMBER_COLUMNS:
        if column in df.columns:
            out[column] = [_number(v, p, i, column) for i, v in zip(df.index, df[column])]
    if "acquisition_date" in df.columns:
        out["acquisition_date"] = [_date(v, p, i) for i, v in zip(df.index, df["acquisition_date"])]
    return out


def _date(value: str, p: Path, row: int) -> str:
    """``YYYY-MM-DD`` (ISO, optionally with a time) or ``YYYYMMDD`` -> ``YYYY-MM-DD``."""
    import datetime as dt

    if not value:
        return ""
    text = value.strip()
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(text[:10] if fmt == "%Y-%m-%d" else text, fmt).date().isoformat()
        except ValueError:
            continue
    raise ManifestError(f"{_where(p, row, 'acquisition_date')}: '{value}' is not a date (YYYY-MM-DD or YYYYMMDD)")


def _resolve(value: str, root: Path, p: Path, row: int, column: str,
             required: bool, check_files: bool) -> str | None:
    if not value:
        if required:
            raise ManifestError(f"{_where(p, row, column)}: empty path")
        return None
    full = Path(value) if Path(value).is_absolute() else root / value
    if check_files and not full.exists():
        raise ManifestError(f"{_where(p, row, column)}: file not found: {full}")
    return str(full)


def _timepoint(value: str, p: Path, row: int) -> str:
    """The visit label; the spellings of baseline and follow-up normalised."""
    if any(c in value for c in "/:"):  # item ids are SUBJECT/VISIT and store keys split on ':'
        raise ManifestError(f"{_where(p, row, 'timepoint')}: '{value}' may not contain '/' or ':'")
    return _TIMEPOINT_ALIASES.get(value.lower(), value)


def _label(value: str, p: Path, row: int) -> int | None:
    if not value:
        return None
    try:
        f = float(value)
    except ValueError:
        f = float("nan")
    if not np.isfinite(f) or f != int(f):
        raise ManifestError(f"{_where(p, row, 'label')}: '{value}' is not an integer label")
    return int(f)


def _number(value: str, p: Path, row: int, column: str) -> float:
    if not value:
        return float("nan")
    try:
        return float(value)
    except ValueError as exc:
        raise ManifestError(f"{_where(p, row, column)}: '{value}' is not a number") from exc


def pairs(df: pd.DataFrame, *, missing: str = "error") -> pd.DataFrame:
    """One row per subject with both a baseline and a follow-up scan.

    Parameters
    ----------
    df : a frame from :func:`read_manifest` with a ``timepoint`` column.
    missing : ``"error"`` raises for a subject lacking one of the two scans,
        ``"skip"`` drops it.

    Returns
    -------
    DataFrame with columns ``subject, baseline_path, followup_path, label,
    transform`` (``transform`` is the follow-up row's (4, 4) array mapping
    baseline world mm to follow-up world mm, or ``None``; ``label`` is the
    follow-up row's label, else the baseline's), plus ``baseline_mask_path``,
    ``followup_mask_path`` and ``jsn_mm`` when the manifest has them. Subjects
    are in order of first appearance.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    if "timepoint" not in df.columns:
        raise ManifestError("manifest has no 'timepoint' column, so it has no baseline/follow-up pairs")
    rows = []
    for subject, group in df.groupby("subject", sort=False):
        by_tp = {tp: r for tp, r in zip(group["timepoint"], group.to_dict("records"))}
        absent = [tp for tp in TIMEPOINTS if tp not in by_tp]
        if absent:
            if missing == "skip":
                continue
            raise ManifestError(f"subject {subject}: no {absent[0]} scan in the manifest")
        base, follow = by_tp["baseline"], by_tp["followup"]
        row = {
            "subject": subject,
            "baseline_path": base["path"],
            "followup_path": follow["path"],
            "label": _first_label(follow, base),
            "transform": follow.get("transform"),
        }
        if "mask_path" in df.columns:
            row["baseline_mask_path"] = base["mask_path"]
            row["followup_mask_path"] = follow["mask_path"]
        if "jsn_mm" in df.columns:
            row["jsn_mm"] = follow["jsn_mm"]
        rows.append(row)
    if not rows:
        raise ManifestError("manifest has no subject with both a baseline and a follow-up scan")
    out = pd.DataFrame(rows)
    out["label"] = pd.array(out["label"].tolist(), dtype="Int64")
    return out


def _first_label(*records: dict) -> int | None:
    for r in records:
        v = r.get("label")
        if v is not None and not pd.isna(v):
            return int(v)
    return None

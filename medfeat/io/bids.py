"""BIDS trees -> cohort manifests.

Reads ``sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_acq-<label>][_run-<n>]..._<suffix>.nii[.gz]``
(only the ``anat`` datatype), keeps the images with the wanted suffix (``T1w``, ``T2w``,
``FLAIR``, ...) and acquisition, and joins ``participants.tsv`` (per subject) and each
subject's ``sub-<label>_sessions.tsv`` (per session) columns. The session label is the
visit (``timepoint``); a session file's ``acq_time`` becomes ``acquisition_date``, which
orders visits (:mod:`medfeat.io.visits`).
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from medfeat.errors import InputError

_ENTITY = re.compile(r"([a-zA-Z0-9]+)-([a-zA-Z0-9]+)")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def parse_name(name: str) -> tuple[dict[str, str], str] | None:
    """``sub-01_ses-bl_acq-mprage_T1w.nii.gz`` -> ``({"sub": "01", "ses": "bl", "acq": "mprage"}, "T1w")``."""
    stem = next((name[: -len(s)] for s in NIFTI_SUFFIXES if name.endswith(s)), None)
    if stem is None:
        return None
    *parts, suffix = stem.split("_")
    entities = {}
    for part in parts:
        match = _ENTITY.fullmatch(part)
        if match is None:
            return None
        entities[match.group(1)] = match.group(2)
    return (entities, suffix) if "sub" in entities else None


def _tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=["n/a"])
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable TSV ({exc})") from exc


def scan_bids(root: str | Path, *, suffix: str = "T1w", acquisition: str | None = None,
              run: str | None = None) -> pd.DataFrame:
    """A manifest frame of a BIDS tree: one row per image.

    Columns: ``subject`` (the label without ``sub-``), ``timepoint`` (the session label, or
    empty), ``path`` (relative to ``root``), ``acq`` and ``run`` when any image has them,
    then the participants' and sessions' columns (``acq_time`` as ``acquisition_date``).
    Rows are sorted by subject, session and path. Raises InputError when nothing matches.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    rows = []
    for path in sorted(root.glob("sub-*/**/anat/*")):
        parsed = parse_name(path.name)
        if parsed is None or not path.is_file():
            continue
        entities, file_suffix = parsed
        if file_suffix != suffix or (acquisition is not None and entities.get("acq") != acquisition) \
                or (run is not None and entities.get("run") != run):
            continue
        rows.append({"subject": entities["sub"], "timepoint": entities.get("ses", ""),
                     "path": path.relative_to(root).as_posix(), "acq": entities.get("acq", ""),
                     "run": entities.get("run", "")})
    if not rows:
        what = f"*_{suffix}.nii[.gz]" + (f" with acq-{acquisition}" if acquisition else "")
        raise InputError(f"{root}: no BIDS anat images {what} under sub-*/[ses-*/]anat/")
    df = pd.DataFrame(rows)
    dup = df.duplicated(["subject", "timepoint"], keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        names = ", ".join(Path(p).name for p in df.loc[dup & (df["subject"] == first["subject"])
                                                      & (df["timepoint"] == first["timepoint"]), "path"])
        raise InputError(f"{root}: subject {first['subject']} session {first['timepoint'] or '-'} has several "
                         f"{suffix} images ({names}): choose one with --acq or --run")
    df = df.drop(columns=[c for c in ("acq", "run") if not df[c].any()])
    df = _join_participants(df, root)
    df = _join_sessions(df, root)
    return df.sort_values(["subject", "timepoint", "path"], kind="mergesort").reset_index(drop=True)


def _join_participants(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    path = root / "participants.tsv"
    if not path.is_file():
        return df
    table = _tsv(path)
    if "participant_id" not in table.columns:
        raise InputError(f"{path}: no participant_id column")
    table["subject"] = table.pop("participant_id").str.removeprefix("sub-")
    clash = [c for c in table.columns if c in df.columns and c != "subject"]
    return df.merge(table.rename(columns={c: f"participant_{c}" for c in clash}), on="subject", how="left")


def _join_sessions(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    tables = []
    for subject in df["subject"].unique():
        path = root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
        if path.is_file():
            table = _tsv(path)
            if "session_id" not in table.columns:
                raise InputError(f"{path}: no session_id column")
            table["timepoint"] = table.pop("session_id").str.removeprefix("ses-")
            tables.append(table.assign(subject=subject))
    if not tables:
        return df
    sessions = pd.concat(tables, ignore_index=True)
    if "acq_time" in sessions.columns:  # ISO date-time: its date orders visits
        sessions["acquisition_date"] = sessions.pop("acq_time").str.slice(0, 10)
    clash = [c for c in sessions.columns if c in df.columns and c not in ("subject", "timepoint")]
    return df.merge(sessions.rename(columns={c: f"session_{c}" for c in clash}), on=["subject", "timepoint"],
                    how="left")

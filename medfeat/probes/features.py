"""Feature matrices for probes: store rows joined with a labels manifest.

A labels manifest is a CSV with the target column(s) and keys to join on:

* ``item_id``: joined on the store's item id (2D image sets);
* else ``subject`` and ``timepoint``: one label per scan;
* else ``subject``: one label per subject (longitudinal progression labels;
  pairs and combined scan pairs take their subject's label).

A multi-label target is a comma-separated list of columns (``"A,B,C"``).
Rows without a label are dropped.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from medfeat.errors import InputError, ManifestError, UnknownNameError
from medfeat.probes.pairs import pair_scans

__all__ = ["FeatureSet", "parse_spec", "resolve_key", "read_labels", "features_from_arrays", "load_features",
           "column_for_items"]


_TIMEPOINT_ALIASES = {"baseline": "baseline", "followup": "followup", "follow-up": "followup",
                      "follow_up": "followup"}


class FeatureSet(NamedTuple):
    """X (n, d) float32, y (n,) or (n, L), groups (n,) subjects, item ids (n,)."""

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    item_ids: list[str]


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """``MODEL:TAP[:VARIANT]`` -> (model, tap, variant or None)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise UnknownNameError(f"feature spec {spec!r} is not MODEL:TAP[:VARIANT]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def resolve_key(store, spec: str):
    """The store's array key for a spec; the variant may be omitted when only one exists."""
    model, tap, variant = parse_spec(spec)
    keys = list(store.arrays())
    hits = [k for k in keys if k.model == model and k.tap == tap and (variant is None or k.variant == variant)]
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(str(k) for k in keys) or "none"
    if not hits:
        raise UnknownNameError(f"no feature array {spec} in the store; arrays: {known}")
    raise UnknownNameError(f"{spec} matches {len(hits)} variants ({', '.join(k.variant for k in hits)}): add :VARIANT")


def read_labels(path: str | Path) -> pd.DataFrame:
    """A labels manifest as strings (keys) and raw values; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: labels manifest not found")
    df = pd.read_csv(path, dtype={"item_id": str, "subject": str, "timepoint": str})
    if not {"item_id", "subject"} & set(df.columns):
        raise ManifestError(f"{path}: labels manifest needs an item_id or a subject column")
    if "timepoint" in df:  # the spellings cohort manifests accept (medfeat.io.manifest)
        low = df["timepoint"].str.strip().str.lower()
        df["timepoint"] = df["timepoint"].where(~low.isin(_TIMEPOINT_ALIASES), low.map(_TIMEPOINT_ALIASES))
    return df


def _target_columns(labels: pd.DataFrame, target: str) -> list[str]:
    cols = [c.strip() for c in target.split(",") if c.strip()]
    missing = [c for c in cols if c not in labels.columns]
    if not cols or missing:
        raise ManifestError(f"target column(s) {missing or target!r} not in the labels manifest "
                            f"(columns: {', '.join(map(str, labels.columns))})")
    return cols


def _per_subject(labels: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """One label row per subject; subjects whose rows disagree are an error."""
    rows = labels.dropna(subset=cols, how="all")
    n_distinct = rows.groupby("subject")[cols].nunique()
    bad = n_distinct.index[(n_distinct > 1).any(axis=1)]
    if len(bad):
        raise ManifestError(f"subject {bad[0]}: rows disagree on {', '.join(cols)} (a per-subject label is needed)")
    return rows.groupby("subject")[cols].first()


def _label_values(values: pd.DataFrame, cols: list[str]) -> np.ndarray:
    """(n,) labels (ints when integral) or an (n, L) 0/1 matrix for several columns."""
    if len(cols) > 1:
        return (values[cols].astype(float).to_numpy() > 0).astype(np.int64)
    v = values[cols[0]]
    num = pd.to_numeric(v, errors="coerce")
    if num.notna().all() and np.all(np.mod(num, 1) == 0):
        return num.to_numpy().astype(np.int64)
    return v.astype(str).to_numpy()


def features_from_arrays(items: pd.DataFrame, item_ids: Sequence[str], X: np.ndarray, labels: pd.DataFrame,
                         target: str, pair_mode: str | None = None) -> FeatureSet:
    """Join feature rows with labels (pure function; :func:`load_features` reads the store)."""
    cols = _target_columns(labels, target)
    item_ids = [str(i) for i in item_ids]
    meta = items.astype({"item_id": str}).set_index("item_id").loc[item_ids]
    kinds = set(meta["kind"].astype(str)) if "kind" in meta else {"scan"}
    if pair_mode and (kinds <= {"scan", "image", ""} or _scan_pairs(meta)):
        X, subjects, item_ids = pair_scans(items, item_ids, X, pair_mode)
        keys = pd.DataFrame({"subject": subjects})
    else:
        keys = meta.reset_index()[["item_id", "subject", "timepoint"]].astype(str)
    if "item_id" in labels.columns and "item_id" in keys:
        joined = keys.merge(labels.drop_duplicates("item_id")[["item_id"] + cols], on="item_id", how="left")
    elif "timepoint" in labels.columns and "timepoint" in keys and not (kinds & {"pair"}):
        lab = labels.dropna(subset=cols, how="all").drop_duplicates(["subject", "timepoint"])
        joined = keys.merge(lab[["subject", "timepoint"] + cols], on=["subject", "timepoint"], how="left")
    else:
        joined = keys.merge(_per_subject(labels, cols).reset_index(), on="subject", how="left")
    have = joined[cols].notna().all(axis=1).to_numpy()
    if not have.any():
        raise ManifestError(f"no item in the store has a {target!r} label in the manifest")
    y = _label_values(joined.loc[have], cols)
    groups = joined.loc[have, "subject"].astype(str).to_numpy()
    ids = [i for i, h in zip(item_ids, have) if h]
    return FeatureSet(np.asarray(X, dtype=np.float32)[have], y, groups, ids)


def _scan_pairs(meta: pd.DataFrame) -> bool:
    """Items that pair each scan with a fixed reference (a pair model's ``atlas`` variant: one
    item per scan and timepoint), which combine per subject as per-scan features do."""
    if "timepoint" not in meta or set(meta["kind"].astype(str)) != {"pair"}:
        return False
    timepoints = meta["timepoint"].astype(str)
    return bool((timepoints != "").all() and not timepoints.str.contains("+", regex=False).any())


def load_features(store_path: str | Path, spec: str, labels_manifest: str | Path, target: str,
                  pair_mode: str | None = None) -> FeatureSet:
    """X, y, groups, item ids for one array of a feature store.

    Parameters
    ----------
    store_path : a store written by :class:`medfeat.engine.store.feature_store.FeatureStore`.
    spec : ``MODEL:TAP[:VARIANT]``.
    labels_manifest : CSV with the target column(s), see the module docstring.
    pair_mode : combine per-scan rows into baseline/follow-up pairs
        (``concat``, ``diff``, ``absdiff``, ``concat+diff``), and so the rows of a pair model
        that paired each scan with the atlas; baseline/follow-up pair items pass through.
    """
    from medfeat.engine.store.feature_store import FeatureStore

    store = FeatureStore.open(store_path, mode="r")
    key = resolve_key(store, spec)
    item_ids, X = store.read(key)
    if len(item_ids) == 0:
        raise InputError(f"feature array {key} has no finished items")
    return features_from_arrays(store.items(), item_ids, X, read_labels(labels_manifest), target, pair_mode)


def column_for_items(labels_manifest: str | Path | pd.DataFrame, item_ids: Sequence[str], column: str) -> np.ndarray:
    """Values of a manifest column (e.g. ``split``) for the given item ids, joined on ``item_id``."""
    labels = labels_manifest if isinstance(labels_manifest, pd.DataFrame) else read_labels(labels_manifest)
    if "item_id" not in labels.columns or column not in labels.columns:
        raise ManifestError(f"the labels manifest needs item_id and {column!r} columns for a fixed split")
    values = labels.drop_duplicates("item_id").set_index("item_id")[column].reindex(list(item_ids))
    if values.isna().any():
        raise ManifestError(f"item {values.index[values.isna()][0]} has no {column!r} value in the manifest")
    return values.astype(str).to_numpy()

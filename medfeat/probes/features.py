"""Feature matrices for probes: store rows joined with a labels manifest.

A labels manifest is a CSV with the target column(s) and keys to join on:

* ``item_id``: joined on the store's item id (2D image sets);
* else ``subject`` and ``timepoint``: one label per scan;
* else ``subject``: one label per subject (longitudinal progression labels;
  pairs and combined scan pairs take their subject's label).

A multi-label target is a comma-separated list of columns (``"A,B,C"``).
Rows without a label are dropped.

Feature specs are ``MODEL:TAP[:VARIANT]``. A multi-layer feature set joins taps with ``+``
(``dinov2_vitb14:blocks.8@norm-cls+blocks.9@norm-cls+blocks.10@norm-cls+norm``, the norm
tap pooled ``cls+mean``: DINOv2's own linear-evaluation feature, see :func:`multi_layer_spec`): each item's vectors of every part, concatenated in the order
given, over the items done in all parts. Token arrays (``TAP@tokens``) load as
(n, [views,] tokens, dim) for token heads.

Without a labels manifest, the store's own items table is one: it carries every column of
the cohort manifest the items came from (age, sex, site, KL grade, ...), joined on
``item_id``. Covariates are further columns appended to the features: numbers as they are,
text one-hot (one column per value); items missing a covariate are dropped.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from medfeat.errors import InputError, ManifestError, UnknownNameError
from medfeat.export.backbones.provenance import random_weights
from medfeat.probes.pairs import pair_scans

__all__ = ["FeatureSet", "parse_spec", "resolve_key", "read_labels", "features_from_arrays", "load_features",
           "column_for_items", "array_meta", "multi_layer_spec", "read_spec", "labels_from_items",
           "covariate_matrix", "store_labels"]


_TIMEPOINT_ALIASES = {"baseline": "baseline", "followup": "followup", "follow-up": "followup",
                      "follow_up": "followup"}


class FeatureSet(NamedTuple):
    """X (n, d) float32, y (n,) or (n, L), groups (n,) subjects, item ids (n,); ``dropped``:
    rows left out and why (reason -> count); ``random_weights``: the features come from a
    backbone with random weights."""

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    item_ids: list[str]
    dropped: dict[str, int] = {}
    random_weights: bool = False

    def describe_dropped(self) -> str:
        """e.g. ``"3 without a label, 2 without features (failed or not extracted)"``; "" if none."""
        return ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n)


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


def labels_from_items(items: pd.DataFrame) -> pd.DataFrame:
    """A store's items table as a labels manifest: empty text is a missing value."""
    return items.drop(columns=[c for c in ("kind", "source") if c in items]).replace("", np.nan)


def store_labels(store_path: str | Path) -> pd.DataFrame:
    """The items table of the store at ``store_path`` as a labels manifest."""
    from medfeat.engine.store.feature_store import FeatureStore

    return labels_from_items(FeatureStore.open(store_path, mode="r").items())


def read_labels(path: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A labels manifest as strings (keys) and raw values; errors name the file."""
    if isinstance(path, pd.DataFrame):
        return path
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
    """(n,) labels (ints when integral, floats when numeric, else text) or an (n, L) 0/1
    matrix for several columns. Numbers stay numbers so the task inference can see a
    continuous column for what it is."""
    if len(cols) > 1:
        return (values[cols].astype(float).to_numpy() > 0).astype(np.int64)
    v = values[cols[0]]
    num = pd.to_numeric(v, errors="coerce")
    if num.notna().all():
        return num.to_numpy().astype(np.int64) if np.all(np.mod(num, 1) == 0) else num.to_numpy(dtype=np.float64)
    return v.astype(str).to_numpy()


def covariate_matrix(values: pd.DataFrame) -> np.ndarray:
    """(n, k) float32 of covariate columns: numeric columns as they are, others one-hot."""
    parts = []
    for column in values.columns:
        num = pd.to_numeric(values[column], errors="coerce")
        if num.notna().all():
            parts.append(num.to_numpy(np.float64)[:, None])
        else:
            text = values[column].astype(str)
            parts.append(np.stack([(text == v).to_numpy(np.float64) for v in sorted(text.unique())], axis=1))
    return np.concatenate(parts, axis=1).astype(np.float32)


def features_from_arrays(items: pd.DataFrame, item_ids: Sequence[str], X: np.ndarray, labels: pd.DataFrame,
                         target: str, pair_mode: str | None = None,
                         covariates: Sequence[str] = ()) -> FeatureSet:
    """Join feature rows with labels (pure function; :func:`load_features` reads the store);
    ``covariates``: label columns appended to the features (:func:`covariate_matrix`)."""
    targets = _target_columns(labels, target)
    covs = _target_columns(labels, ",".join(covariates)) if covariates else []
    cols = targets + [c for c in covs if c not in targets]
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
        raise ManifestError(f"no item in the store has a {target!r} label"
                            f"{' and the covariates ' + ', '.join(covs) if covs else ''} in the manifest")
    y = _label_values(joined.loc[have], targets)
    groups = joined.loc[have, "subject"].astype(str).to_numpy()
    ids = [i for i, h in zip(item_ids, have) if h]
    same_kind = items["kind"].astype(str).isin(kinds) if "kind" in items else np.ones(len(items), bool)
    dropped = {"without a label": int((~have).sum()),
               "without features (failed or not extracted)": int(same_kind.sum()) - len(meta)}
    features = np.asarray(X, dtype=np.float32)
    features = features if have.all() else features[have]  # no 400 MB copy when every item has a label
    if covs:
        features = np.concatenate([features, covariate_matrix(joined.loc[have, covs])], axis=1)
    return FeatureSet(features, y, groups, ids, dropped)


def _scan_pairs(meta: pd.DataFrame) -> bool:
    """Items that pair each scan with a fixed reference (a pair model's ``atlas`` variant: one
    item per scan and timepoint), which combine per subject as per-scan features do."""
    if "timepoint" not in meta or set(meta["kind"].astype(str)) != {"pair"}:
        return False
    timepoints = meta["timepoint"].astype(str)
    return bool((timepoints != "").all() and not timepoints.str.contains("+", regex=False).any())


def load_features(store_path: str | Path, spec: str, labels_manifest: str | Path | pd.DataFrame | None,
                  target: str, pair_mode: str | None = None, covariates: Sequence[str] = ()) -> FeatureSet:
    """X, y, groups, item ids for one array (or a multi-layer set of arrays) of a feature store.

    Parameters
    ----------
    store_path : a store written by :class:`medfeat.engine.store.feature_store.FeatureStore`.
    spec : ``MODEL:TAP[:VARIANT]``, or ``MODEL:TAP+TAP+...[:VARIANT]``.
    labels_manifest : CSV with the target column(s), see the module docstring; None: the
        store's items table (the cohort manifest's columns).
    covariates : label columns appended to the features.
    pair_mode : combine per-scan rows into baseline/follow-up pairs
        (``concat``, ``diff``, ``absdiff``, ``concat+diff``), and so the rows of a pair model
        that paired each scan with the atlas; baseline/follow-up pair items pass through.
    """
    from medfeat.engine.store.feature_store import FeatureStore

    store = FeatureStore.open(store_path, mode="r")
    item_ids, X = read_spec(store, spec)
    items = store.items()
    labels = labels_from_items(items) if labels_manifest is None else read_labels(labels_manifest)
    fs = features_from_arrays(items, item_ids, X, labels, target, pair_mode, covariates)
    random = any(random_weights(store.provenance(resolve_key(store, p))) for p in _parts(spec))
    return fs._replace(random_weights=random)


def _parts(spec: str) -> list[str]:
    """``M:A+B:V`` -> [``M:A:V``, ``M:B:V``]; a plain spec -> [spec]."""
    model, taps, variant = parse_spec(spec)
    names = _split_taps(taps)
    return [f"{model}:{t}" + (f":{variant}" if variant else "") for t in names]


_COMPOUND_POOLINGS = ("cls+mean", "norm-cls+mean", "stats+grid2")


def _split_taps(taps: str) -> list[str]:
    """Tap names of ``"blocks.9@norm-cls+norm@cls+mean"``: ``+`` separates taps, except
    inside the pooling after an ``@`` (``cls+mean``, ``stats+grid2``)."""
    out: list[str] = []
    for piece in taps.split("+"):
        if out and "@" in out[-1] and f"{out[-1].rsplit('@', 1)[1]}+{piece}" in _COMPOUND_POOLINGS:
            out[-1] += "+" + piece  # a cls+mean or stats+grid2 pooling, not a new tap
        else:
            out.append(piece)
    return out


def read_spec(store, spec: str) -> tuple[list[str], np.ndarray]:
    """Item ids and rows of a spec: one array, or the concatenation of several (pooled) ones
    over the items done in all of them, in store order."""
    parts = _parts(spec)
    keys = [resolve_key(store, p) for p in parts]
    reads = [store.read(k) for k in keys]
    for key, (ids, _) in zip(keys, reads):
        if len(ids) == 0:
            raise InputError(f"feature array {key} has no finished items")
    if len(reads) == 1:
        return reads[0]
    shapes = {str(k): x.shape[1:] for k, (_, x) in zip(keys, reads)}
    bad = [k for k, shape in shapes.items() if len(shape) != 1]
    if bad:
        raise InputError(f"a multi-layer feature set joins pooled arrays; {bad[0]} holds {shapes[bad[0]]} per item")
    common = set(reads[0][0]).intersection(*(set(ids) for ids, _ in reads[1:]))
    order = [i for i in reads[0][0] if i in common]
    cols = []
    for ids, x in reads:
        pos = {iid: k for k, iid in enumerate(ids)}
        cols.append(np.asarray(x, dtype=np.float32)[[pos[i] for i in order]])
    return order, np.concatenate(cols, axis=1)


def array_meta(store_path: str | Path, spec: str) -> dict:
    """Per-item shape and token provenance of a stored array: ``item_shape``, ``grid``,
    ``prefix_tokens`` and ``views`` (1 without views); what a token head needs to know."""
    from medfeat.engine.store.feature_store import FeatureStore

    store = FeatureStore.open(store_path, mode="r")
    parts = _parts(spec)
    key = resolve_key(store, parts[0])
    layout, prov = store.layout(key), store.provenance(key)
    tokens = prov.get("tokens") or {}
    views = (prov.get("views") or {}).get("count", 1)
    return {"item_shape": list(layout.item_shape), "grid": tokens.get("grid"),
            "prefix_tokens": int(tokens.get("prefix_tokens", 0)), "views": int(views), "parts": len(parts)}


def multi_layer_spec(model: str, depth: int, *, blocks: int = 4, variant: str | None = None) -> tuple[str, str]:
    """DINOv2's linear-evaluation feature as (feature spec, extraction pooling).

    DINOv2's ``create_linear_input`` (eval/linear.py) concatenates the CLS tokens of the last
    ``blocks`` blocks, each after the final norm (``get_intermediate_layers(norm=True)``),
    and the mean of the last block's normed patch tokens. Extract taps
    ``blocks.{depth-blocks}`` .. ``blocks.{depth-2}`` and ``norm`` with the returned pooling,
    then probe the returned spec.
    """
    if not 1 <= blocks <= depth:
        raise InputError(f"blocks={blocks}: need 1 to {depth} blocks")
    inner = [f"blocks.{i}" for i in range(depth - blocks, depth - 1)]
    pooling = ",".join([f"{t}=norm-cls" for t in inner] + ["norm=cls+mean"])
    taps = [f"{t}@norm-cls" for t in inner] + ["norm"]  # cls+mean is a plain pooling: array "norm"
    spec = f"{model}:{'+'.join(taps)}" + (f":{variant}" if variant else "")
    return spec, pooling


def column_for_items(labels_manifest: str | Path | pd.DataFrame, item_ids: Sequence[str], column: str) -> np.ndarray:
    """Values of a manifest column (e.g. ``split``) for the given item ids, joined on ``item_id``."""
    labels = labels_manifest if isinstance(labels_manifest, pd.DataFrame) else read_labels(labels_manifest)
    if "item_id" not in labels.columns or column not in labels.columns:
        raise ManifestError(f"the labels manifest needs item_id and {column!r} columns for a fixed split")
    values = labels.drop_duplicates("item_id").set_index("item_id")[column].reindex(list(item_ids))
    if values.isna().any():
        raise ManifestError(f"item {values.index[values.isna()][0]} has no {column!r} value in the manifest")
    return values.astype(str).to_numpy()

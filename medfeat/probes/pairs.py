"""Feature rows for longitudinal pairs (baseline, follow-up) of one subject.

Segmentation backbones see one scan at a time, so a pair's feature combines
the two scans' vectors: ``concat`` [b, f], ``diff`` f - b, ``absdiff`` |f - b|,
``concat+diff`` [b, f, f - b]. Registration backbones see the pair at once
and store one row per pair (item kind ``"pair"``); those pass through.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from medfeat.errors import InputError, ManifestError, UnknownNameError
from medfeat.io.visits import label_rank, order_visits

__all__ = ["PAIR_MODES", "combine_pair", "timepoint_rank", "pair_scans"]

PAIR_MODES = ("concat", "diff", "absdiff", "concat+diff")


def combine_pair(base: np.ndarray, follow: np.ndarray, mode: str) -> np.ndarray:
    """Combine (n, d) baseline and follow-up features into (n, d), (n, 2d) or (n, 3d)."""
    if base.shape != follow.shape:
        raise InputError(f"baseline features {base.shape} and follow-up features {follow.shape} differ in shape")
    if mode == "concat":
        return np.concatenate([base, follow], axis=1)
    if mode == "diff":
        return follow - base
    if mode == "absdiff":
        return np.abs(follow - base)
    if mode == "concat+diff":
        return np.concatenate([base, follow, follow - base], axis=1)
    raise UnknownNameError(f"unknown pair mode {mode!r}: use one of {', '.join(PAIR_MODES)}")


def timepoint_rank(tp: object) -> float:
    """Sortable position of a timepoint label: numbers as they are, ``baseline`` 0,
    ``followup`` 1, otherwise the first number in the text (``m12`` -> 12); see
    :func:`medfeat.io.visits.label_rank`."""
    rank = label_rank(tp)
    if rank is None:
        raise InputError(f"cannot order timepoint {tp!r}: use numbers or baseline/followup")
    return rank


def pair_scans(items: pd.DataFrame, item_ids: Sequence[str], X: np.ndarray, mode: str,
               *, baseline: str | None = None, followup: str | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pair each subject's baseline and follow-up scan rows.

    Parameters
    ----------
    items : items table with ``item_id``, ``subject``, ``timepoint`` columns.
    item_ids : (n,) ids of the rows of X.
    X : (n, d) per-scan features.
    mode : one of :data:`PAIR_MODES`.
    baseline, followup : timepoint names to use; by default each subject's
        earliest and latest visit, ordered as :mod:`medfeat.io.visits` orders them (the
        items table's ``visit_order``, else ``acquisition_date``, else the label).
        Subjects with fewer than two scans are skipped.

    Returns
    -------
    (n_pairs, d') features, (n_pairs,) subjects and pair ids ``"base->follow"``.
    """
    cols = ["subject", "timepoint"] + [c for c in ("visit_order", "acquisition_date") if c in items.columns]
    meta = items.set_index("item_id").loc[list(item_ids), cols]
    frame = meta.assign(row=np.arange(len(meta)))
    frame["rank"] = 0
    for subject, g in frame.groupby("subject", sort=False):
        try:
            ordered = order_visits(g.replace("", np.nan).to_dict("records"), str(subject))
        except ManifestError as exc:
            raise InputError(str(exc)) from None
        position = {r["row"]: k for k, r in enumerate(ordered)}
        frame.loc[g.index, "rank"] = [position[r] for r in g["row"]]
    b_rows, f_rows, subjects, ids = [], [], [], []
    for subject, g in frame.groupby("subject", sort=True):
        b, f = _choose(g, baseline, followup)
        if b is None or f is None:
            continue
        b_rows.append(b)
        f_rows.append(f)
        subjects.append(str(subject))
        ids.append(f"{item_ids[b]}->{item_ids[f]}")
    if not ids:
        raise InputError("no subject has both a baseline and a follow-up scan with features")
    Xp = combine_pair(X[b_rows], X[f_rows], mode)
    return Xp, np.asarray(subjects, dtype=object), ids


def _choose(g: pd.DataFrame, baseline: str | None, followup: str | None) -> tuple[int | None, int | None]:
    """Row numbers of one subject's baseline and follow-up scan (None if missing)."""
    def pick(name: str | None, earliest: bool) -> int | None:
        if name is not None:
            hit = g[g["timepoint"].astype(str) == name]
            return int(hit["row"].iloc[0]) if len(hit) else None
        ordered = g.sort_values("rank", kind="mergesort")
        return int(ordered["row"].iloc[0 if earliest else -1])

    b, f = pick(baseline, True), pick(followup, False)
    return (None, None) if b is None or f is None or b == f else (b, f)

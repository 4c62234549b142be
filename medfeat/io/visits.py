"""Visits of a subject: their order, and which pairs of them make longitudinal items.

Visit labels are data (OAI's ``00m``/``12m``, ADNI's ``bl``/``m06``, BIDS sessions, or
``baseline``/``followup``). A subject's visits are ordered by the manifest's
``visit_order`` column when it has one, else by ``acquisition_date``, else by the label:
``baseline``/``bl``/``sc``/``screening`` first, ``followup``/``fu`` second, otherwise the
first number in the label (``m06`` -> 6, ``24m`` -> 24, ``ses-02`` -> 2).

Pairs (:class:`VisitPairing`): ``baseline`` and ``followup`` name the two visits of the one
pair per subject (by default the visits named ``baseline`` and ``followup``); ``pairs``
``consecutive`` makes every pair of consecutive visits an item, ``all-to-baseline`` every
visit with the baseline (``baseline`` if given, else the first visit).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medfeat.errors import ManifestError, UnknownNameError

PAIRINGS = ("consecutive", "all-to-baseline")
DEFAULT_BASELINE, DEFAULT_FOLLOWUP = "baseline", "followup"
_NAMED = {"baseline": 0.0, "bl": 0.0, "sc": 0.0, "screening": 0.0, "followup": 1.0,
          "follow-up": 1.0, "follow_up": 1.0, "fu": 1.0}

Row = dict[str, Any]


@dataclass(frozen=True)
class VisitPairing:
    """Which visits pair up (see the module docstring); all ``None``: baseline + followup."""

    baseline: str | None = None
    followup: str | None = None
    pairs: str | None = None

    def __post_init__(self) -> None:
        if self.pairs is not None and self.pairs not in PAIRINGS:
            raise UnknownNameError(f"unknown pairing {self.pairs!r}; pairings: {', '.join(PAIRINGS)}")
        if self.pairs == "consecutive" and (self.baseline or self.followup):
            raise ManifestError("--pairs consecutive pairs every visit with the next: "
                                "--baseline-visit/--followup-visit do not apply")
        if self.pairs == "all-to-baseline" and self.followup:
            raise ManifestError("--pairs all-to-baseline pairs every visit with the baseline: "
                                "--followup-visit does not apply")

    @property
    def is_default(self) -> bool:
        return self.baseline is None and self.followup is None and self.pairs is None


def label_rank(label: object) -> float | None:
    """Position of a visit label, or None when the label carries none (see module docstring)."""
    text = str(label).strip().lower()
    if text in _NAMED:
        return _NAMED[text]
    try:
        value = float(text)
        return value if math.isfinite(value) else None
    except ValueError:
        pass
    match = re.search(r"\d+(\.\d+)?", text)
    return float(match.group()) if match else None


def _key(row: Row) -> tuple[int, float | str]:
    order = row.get("visit_order")
    if order is not None and not (isinstance(order, float) and math.isnan(order)) and order != "":
        return (0, float(order))
    date = row.get("acquisition_date")
    if isinstance(date, str) and date:
        return (1, date)
    rank = label_rank(row.get("timepoint", ""))
    return (2, rank) if rank is not None else (3, str(row.get("timepoint", "")))


def order_visits(rows: Sequence[Row], subject: str = "") -> list[Row]:
    """One subject's rows in visit order; ManifestError when the order is not known."""
    keys = [_key(r) for r in rows]
    if len(rows) > 1 and (any(k[0] == 3 for k in keys) or len({k[0] for k in keys}) > 1):
        labels = ", ".join(str(r.get("timepoint", "")) for r in rows)
        raise ManifestError(f"subject {subject}: cannot order visits {labels}: add a visit_order or "
                            "acquisition_date column, or name the visits with --baseline-visit/--followup-visit")
    return [r for _, r in sorted(zip(keys, rows), key=lambda kr: kr[0])]


def baseline_of(rows: Sequence[Row], pairing: VisitPairing, subject: str = "") -> Row | None:
    """The subject's baseline row: the visit named ``pairing.baseline``, else the one named
    ``baseline``, else its first visit in visit order (None when it has no such visit)."""
    by_label = {str(r.get("timepoint") or ""): r for r in rows}
    if pairing.baseline is not None:
        return by_label.get(pairing.baseline)
    if DEFAULT_BASELINE in by_label:
        return by_label[DEFAULT_BASELINE]
    return order_visits(rows, subject)[0] if rows else None


def visit_pairs(rows: Sequence[Row], pairing: VisitPairing, subject: str = "") -> tuple[list[tuple[Row, Row]], str]:
    """``(baseline row, follow-up row)`` pairs of one subject, and why there are none."""
    by_label = {str(r.get("timepoint") or ""): r for r in rows}
    labels = ", ".join(by_label) or "none"
    if pairing.pairs == "consecutive":
        ordered = order_visits(rows, subject)
        pairs = list(zip(ordered, ordered[1:]))
        return pairs, "" if pairs else f"subject {subject} has one visit ({labels}): no consecutive pair"
    if pairing.pairs == "all-to-baseline":
        base = baseline_of(rows, pairing, subject)
        if base is None:
            return [], f"subject {subject} has no visit {pairing.baseline!r} (visits: {labels})"
        later = [r for r in order_visits(rows, subject) if r is not base and _key(r) > _key(base)]
        return [(base, r) for r in later], "" if later else f"subject {subject} has no visit after its baseline"
    b_name = pairing.baseline or DEFAULT_BASELINE
    f_name = pairing.followup or DEFAULT_FOLLOWUP
    base, follow = by_label.get(b_name), by_label.get(f_name)
    if base is not None and follow is not None:
        return [(base, follow)], ""
    missing = b_name if base is None else f_name
    hint = "" if not pairing.is_default else ": name the pair with --baseline-visit/--followup-visit, or use --pairs"
    return [], f"subject {subject} lacks a {missing} scan for a pair (visits: {labels}){hint}"


def pair_id(subject: str, base: Row, follow: Row) -> tuple[str, str]:
    """Item id and timepoint of a pair item: ``S`` / ``baseline+followup`` for the default
    labels (as stores made before visits were data), else ``S/B->F`` / ``B+F``."""
    b, f = str(base.get("timepoint") or ""), str(follow.get("timepoint") or "")
    if (b, f) == (DEFAULT_BASELINE, DEFAULT_FOLLOWUP):
        return subject, f"{b}+{f}"
    return f"{subject}/{b}->{f}", f"{b}+{f}"

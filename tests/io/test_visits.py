"""Visits as data: ordering by visit_order, acquisition_date or label, and the pairings."""
from __future__ import annotations

import pytest

from medfeat.errors import ManifestError, UnknownNameError
from medfeat.io.visits import VisitPairing, baseline_of, label_rank, order_visits, pair_id, visit_pairs


def _rows(*labels: str, **cols: list) -> list[dict]:
    rows = [{"subject": "S", "timepoint": t, "path": f"{t}.nii.gz"} for t in labels]
    for key, values in cols.items():
        for r, v in zip(rows, values):
            r[key] = v
    return rows


def test_labels_order_oai_adni_and_bids_visits() -> None:
    assert [label_rank(t) for t in ("bl", "m06", "m12", "00m", "24m", "ses-02", "baseline", "followup")] == \
        [0, 6, 12, 0, 24, 2, 0, 1]
    assert label_rank("pre") is None
    ordered = order_visits(_rows("m24", "bl", "m06"))
    assert [r["timepoint"] for r in ordered] == ["bl", "m06", "m24"]


def test_order_column_and_dates_win_over_labels() -> None:
    rows = _rows("pre", "post", "late", visit_order=[2.0, 1.0, 3.0])
    assert [r["timepoint"] for r in order_visits(rows)] == ["post", "pre", "late"]
    rows = _rows("b", "a", acquisition_date=["2020-05-01", "2019-01-31"])
    assert [r["timepoint"] for r in order_visits(rows)] == ["a", "b"]
    with pytest.raises(ManifestError, match="cannot order visits pre, post"):
        order_visits(_rows("pre", "post"), "S")


def test_pairings() -> None:
    rows = _rows("bl", "m12", "m24")
    pairs, _ = visit_pairs(rows, VisitPairing(pairs="consecutive"))
    assert [(b["timepoint"], f["timepoint"]) for b, f in pairs] == [("bl", "m12"), ("m12", "m24")]
    pairs, _ = visit_pairs(rows, VisitPairing(pairs="all-to-baseline"))
    assert [(b["timepoint"], f["timepoint"]) for b, f in pairs] == [("bl", "m12"), ("bl", "m24")]
    pairs, _ = visit_pairs(rows, VisitPairing("m12", "m24"))
    assert [(b["timepoint"], f["timepoint"]) for b, f in pairs] == [("m12", "m24")]
    pairs, why = visit_pairs(rows, VisitPairing(), "S")
    assert not pairs and "--baseline-visit" in why and "bl, m12, m24" in why
    assert pair_id("S", rows[0], rows[2]) == ("S/bl->m24", "bl+m24")
    assert pair_id("S", {"timepoint": "baseline"}, {"timepoint": "followup"}) == ("S", "baseline+followup")
    assert baseline_of(rows, VisitPairing())["timepoint"] == "bl"
    assert baseline_of(rows, VisitPairing("m12"))["timepoint"] == "m12"
    with pytest.raises(UnknownNameError):
        VisitPairing(pairs="every")
    with pytest.raises(ManifestError, match="do not apply"):
        VisitPairing("bl", "m12", "consecutive")

"""Per-scan features paired by visit order: dates and visit_order from the items table."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medfeat.errors import InputError
from medfeat.probes.pairs import pair_scans


def test_pairs_follow_dates_then_labels() -> None:
    items = pd.DataFrame({"item_id": ["a1", "a2", "a3", "b1", "b2"], "subject": ["A", "A", "A", "B", "B"],
                          "timepoint": ["2020-11-05", "2020-01-05", "2021-03-01", "bl", "m12"],
                          "acquisition_date": ["2020-11-05", "2020-01-05", "2021-03-01", "", ""]})
    X = np.arange(10, dtype=np.float32).reshape(5, 2)
    Xp, subjects, ids = pair_scans(items, list(items["item_id"]), X, "diff")
    assert ids == ["a2->a3", "b1->b2"] and list(subjects) == ["A", "B"]
    np.testing.assert_array_equal(Xp, [X[2] - X[1], X[4] - X[3]])


def test_visit_order_column_wins_and_unordered_visits_are_refused() -> None:
    items = pd.DataFrame({"item_id": ["p", "q"], "subject": ["A", "A"], "timepoint": ["pre", "post"],
                          "visit_order": ["2", "1"]})
    X = np.eye(2, dtype=np.float32)
    assert pair_scans(items, ["p", "q"], X, "diff")[2] == ["q->p"]
    with pytest.raises(InputError, match="cannot order visits pre, post"):
        pair_scans(items.drop(columns="visit_order"), ["p", "q"], X, "diff")

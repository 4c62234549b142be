"""Grouped splits: no subject on both sides, every item tested once per seed."""
from __future__ import annotations

import numpy as np
import pytest

from medfeat.errors import InputError
from medfeat.probes.splits import grouped_kfold, repeated_grouped_kfold, stratification_labels


@pytest.mark.parametrize("items_per_subject", [1, 2, 5])
def test_no_subject_leaks_and_every_item_tested_once(items_per_subject):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), items_per_subject)
    y = rng.integers(0, 2, 40)[np.repeat(np.arange(40), items_per_subject)]
    seen = {}
    for s in repeated_grouped_kfold(y, groups, 5, seeds=(0, 1)):
        assert not set(groups[s.train]) & set(groups[s.test])
        assert len(s.train) + len(s.test) == len(y)
        seen.setdefault(s.seed, []).extend(s.test.tolist())
    for tested in seen.values():
        assert sorted(tested) == list(range(len(y)))


def test_seeds_give_different_folds_and_stratify():
    groups = np.arange(100)
    y = np.r_[np.zeros(80, int), np.ones(20, int)]
    a = grouped_kfold(y, groups, 5, 0)
    b = grouped_kfold(y, groups, 5, 1)
    assert any(not np.array_equal(x[1], z[1]) for x, z in zip(a, b))
    assert all(y[test].sum() == 4 for _, test in a)  # 20 positives over 5 folds


def test_fallback_when_a_class_has_too_few_subjects():
    groups = np.repeat(np.arange(12), 2)
    y = np.zeros(24, int)
    y[:2] = 1  # one subject positive: cannot stratify into 4 folds
    folds = grouped_kfold(y, groups, 4, 0)
    assert len(folds) == 4
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])


def test_multilabel_stratification_uses_rarest_label():
    Y = np.array([[1, 1], [1, 0], [0, 0], [1, 1]])
    np.testing.assert_array_equal(stratification_labels(Y), [1, 0, -1, 1])


def test_too_few_subjects_is_a_user_error():
    with pytest.raises(InputError, match="subjects"):
        grouped_kfold(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), 3, 0)

"""Cross-validation splits grouped by subject.

Every split keeps all items of one subject (group) on one side, so scans of
the same knee or images of the same patient never sit in train and test at
once. Stratified by label where the data allow it: groups are sorted by their
(majority) label in a seeded random order and dealt to the folds in turn, so
each label's subjects spread evenly (within one subject per fold) in O(subjects)
numpy work, fast at 100,000 subjects; otherwise groups are shuffled and dealt to
folds by size.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from medfeat.errors import InputError

__all__ = ["Split", "grouped_kfold", "repeated_grouped_kfold", "stratification_labels", "C_GRID"]

#: Default grid of inverse regularisation strengths for the probes (log-spaced).
C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 4, 9))


@dataclass(frozen=True)
class Split:
    """One outer fold: indices into the rows of X (int64 arrays)."""

    seed: int
    fold: int
    train: np.ndarray
    test: np.ndarray


def stratification_labels(y: np.ndarray) -> np.ndarray:
    """One integer per row to stratify on.

    Class labels as they are; for a multi-label indicator matrix (n, L), the
    rarest label each row carries (-1 for none), so rare labels spread over folds.
    """
    y = np.asarray(y)
    if y.ndim == 1:
        return np.unique(y, return_inverse=True)[1]
    prevalence = y.sum(axis=0)
    order = np.argsort(prevalence)  # rarest first
    strat = np.full(len(y), -1, dtype=np.int64)
    for j in order[::-1]:  # rarer labels overwrite commoner ones
        strat[y[:, j] > 0] = j
    return strat


def grouped_kfold(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` (train, test) index pairs with no group on both sides.

    Parameters
    ----------
    y : (n,) labels or (n, L) indicator matrix, used for stratification only.
    groups : (n,) subject of each row.
    n_splits : number of folds; at most the number of distinct groups.
    seed : shuffles the assignment of groups to folds.
    """
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_splits < 2:
        raise InputError(f"n_splits={n_splits}: cross-validation needs at least 2 folds")
    if n_groups < n_splits:
        raise InputError(f"only {n_groups} subjects for {n_splits} folds: lower --folds")
    strat = stratification_labels(y)
    if _can_stratify(strat, groups, n_splits):
        return _stratified_group_folds(strat, groups, n_splits, seed)
    return _shuffled_group_folds(groups, n_splits, seed)


def _stratified_group_folds(strat: np.ndarray, groups: np.ndarray, n_splits: int,
                            seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Groups sorted by majority label in a seeded random order, dealt to folds in turn."""
    uniq, inv = np.unique(groups, return_inverse=True)
    labels, lab = np.unique(strat, return_inverse=True)
    counts = np.zeros((len(uniq), len(labels)), dtype=np.int64)
    np.add.at(counts, (inv, lab), 1)
    majority = counts.argmax(axis=1)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(uniq)), majority))  # by label, randomly within a label
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    fold_of_group[order] = (np.arange(len(uniq)) + rng.integers(n_splits)) % n_splits
    fold = fold_of_group[inv]
    idx = np.arange(len(groups))
    return [(idx[fold != f], idx[fold == f]) for f in range(n_splits)]


def _can_stratify(strat: np.ndarray, groups: np.ndarray, n_splits: int) -> bool:
    """Stratify only when every class has at least ``n_splits`` subjects."""
    for c in np.unique(strat):
        if len(np.unique(groups[strat == c])) < n_splits:
            return False
    return True


def _shuffled_group_folds(groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deal shuffled groups to folds, each to the currently smallest fold."""
    uniq, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    sizes = np.zeros(n_splits, dtype=np.int64)
    for g in order:
        f = int(np.argmin(sizes))
        fold_of_group[g] = f
        sizes[f] += counts[g]
    fold = fold_of_group[inv]
    idx = np.arange(len(groups))
    return [(idx[fold != f], idx[fold == f]) for f in range(n_splits)]


def repeated_grouped_kfold(y: np.ndarray, groups: np.ndarray, n_splits: int,
                           seeds: Sequence[int]) -> Iterator[Split]:
    """Grouped k-fold repeated once per seed (a different group shuffle each time)."""
    for seed in seeds:
        for fold, (train, test) in enumerate(grouped_kfold(y, groups, n_splits, seed)):
            yield Split(seed=int(seed), fold=fold, train=train, test=test)

"""Confidence intervals and paired comparisons for probe metrics.

Bootstrap replicates resample *subjects* (groups) with replacement, not rows:
items of one subject are correlated (two knees, many images of one patient),
and resampling rows would understate the spread. A replicate is expressed as
a row weight (how often the row's subject was drawn) so metrics run on the
original arrays (see :mod:`medfeat.probes.metrics`).

DeLong's test for two correlated AUCs follows DeLong, DeLong & Clarke-Pearson
(1988) with the midrank formulation of Sun & Xu (2014).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

from medfeat.errors import InputError
from medfeat.probes.threads import cores, thread_map

__all__ = ["CI", "bootstrap_weights", "bootstrap_ci", "bootstrap_cis", "paired_bootstrap", "delong_test",
           "PairedResult"]

#: A metric over a weight vector: ``fn(sample_weight) -> float`` (NaN if undefined).
WeightedStat = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class CI:
    """A point estimate with a two-sided confidence interval."""

    value: float
    low: float
    high: float
    level: float = 0.95
    method: str = "percentile"
    n_boot: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def bootstrap_weights(groups: np.ndarray | None, n: int, n_boot: int,
                      rng: np.random.Generator, batch: int | None = None) -> Iterator[np.ndarray]:
    """Yield blocks of row weights, each (b, n) with b <= ``batch``
    (default: as many as fit in about 20 MB), in Fortran order.

    Each row's weight is how many times its group was drawn when drawing as
    many groups as there are, with replacement (rows are their own groups
    when ``groups`` is None).
    """
    if groups is None:
        inv, n_groups = np.arange(n), n
    else:
        _, inv = np.unique(np.asarray(groups), return_inverse=True)
        n_groups = int(inv.max()) + 1
    batch = batch or max(1, min(256, 2_500_000 // max(n, 1)))  # 20 MB blocks stay cache-friendly
    done = 0
    while done < n_boot:
        b = min(batch, n_boot - done)
        # Each replicate draws n_groups groups uniformly with replacement; counting the draws
        # of all b replicates in one bincount is ~2x faster than numpy's multinomial.
        draws = rng.integers(0, n_groups, size=(b, n_groups)) + n_groups * np.arange(b)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        # Laid out (n, b) in memory (a (b, n) view in Fortran order): metrics gather rows in
        # score order, and a gather of contiguous columns is ~4x faster than of scattered ones.
        yield np.ascontiguousarray(counts.T, dtype=np.float64)[inv].T
        done += b


def _replicates(stat: WeightedStat, groups: np.ndarray | None, n: int, n_boot: int, seed: int) -> np.ndarray:
    return _replicates_of({"_": stat}, groups, n, n_boot, seed)["_"]


def _replicates_of(stats: Mapping[str, WeightedStat], groups: np.ndarray | None, n: int, n_boot: int,
                   seed: int) -> dict[str, np.ndarray]:
    """Bootstrap replicates of several statistics on the same resampled subjects. A stat
    marked ``vectorised`` takes a whole block of weights (B, n) at once; others one vector
    at a time."""
    rng = np.random.default_rng(seed)

    def evaluate(block: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.atleast_1d(np.asarray(stat(block), dtype=np.float64)) if getattr(stat, "vectorised", False)
                else np.asarray([stat(w) for w in block], dtype=np.float64) for name, stat in stats.items()}

    # Blocks are drawn in order in this thread (the same replicates for any worker count);
    # vectorised statistics (numpy code) evaluate blocks on all cores, others on this thread.
    vectorised = all(getattr(stat, "vectorised", False) for stat in stats.values())
    done = list(thread_map(evaluate, bootstrap_weights(groups, n, n_boot, rng), cores() if vectorised else 1))
    return {name: np.concatenate([d[name] for d in done]) for name in stats}


def bootstrap_ci(stat: WeightedStat, n: int, *, groups: np.ndarray | None = None, n_boot: int = 1000,
                 level: float = 0.95, method: str = "percentile", seed: int = 0) -> CI:
    """Bootstrap CI of a weighted statistic over n rows.

    Parameters
    ----------
    stat : the statistic as a function of a row-weight vector (n,).
    n : number of rows.
    groups : (n,) subject per row; whole subjects are resampled.
    method : ``"percentile"`` or ``"bca"`` (bias-corrected and accelerated;
        acceleration from a delete-one-group jackknife, over at most 200 blocks
        of groups to bound its cost).
    """
    return _ci_of(stat, _replicates(stat, groups, n, n_boot, seed), groups, n, n_boot, level, method)


def bootstrap_cis(stats: Mapping[str, WeightedStat], n: int, *, groups: np.ndarray | None = None, n_boot: int = 1000,
                  level: float = 0.95, method: str = "percentile", seed: int = 0) -> dict[str, CI]:
    """:func:`bootstrap_ci` of several statistics from one set of replicates (the weights are
    drawn once; the same ``seed`` gives each statistic the replicates it would get alone)."""
    reps = _replicates_of(stats, groups, n, n_boot, seed)
    return {name: _ci_of(stat, reps[name], groups, n, n_boot, level, method) for name, stat in stats.items()}


def _ci_of(stat: WeightedStat, reps: np.ndarray, groups: np.ndarray | None, n: int, n_boot: int, level: float,
           method: str) -> CI:
    point = float(stat(np.ones(n)))
    reps = reps[np.isfinite(reps)]
    if len(reps) < max(10, n_boot // 2):  # the metric was undefined in most replicates
        return CI(point, float("nan"), float("nan"), level, method, n_boot)
    alpha = (1 - level) / 2
    if method == "percentile":
        lo, hi = np.quantile(reps, [alpha, 1 - alpha])
    elif method == "bca":
        lo, hi = _bca_interval(stat, point, reps, groups, n, alpha)
    else:
        raise InputError(f"unknown CI method {method!r}: use 'percentile' or 'bca'")
    return CI(point, float(lo), float(hi), level, method, n_boot)


def _bca_interval(stat: WeightedStat, point: float, reps: np.ndarray, groups: np.ndarray | None,
                  n: int, alpha: float) -> tuple[float, float]:
    prop_below = (np.sum(reps < point) + 0.5 * np.sum(reps == point)) / len(reps)
    z0 = sps.norm.ppf(np.clip(prop_below, 1e-6, 1 - 1e-6))
    jack = _jackknife(stat, groups, n)
    d = jack.mean() - jack
    denom = 6.0 * (np.sum(d ** 2) ** 1.5)
    accel = float(np.sum(d ** 3) / denom) if denom > 0 else 0.0
    z = sps.norm.ppf([alpha, 1 - alpha])
    adj = sps.norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))
    lo, hi = np.quantile(reps, np.clip(adj, 0.0, 1.0))
    return float(lo), float(hi)


def _jackknife(stat: WeightedStat, groups: np.ndarray | None, n: int, max_blocks: int = 200) -> np.ndarray:
    """Delete-one-block jackknife values; blocks are groups, merged down to ``max_blocks``."""
    inv = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    n_groups = int(inv.max()) + 1
    block_of_group = np.arange(n_groups) % max_blocks if n_groups > max_blocks else np.arange(n_groups)
    block = block_of_group[inv]
    vals = []
    for b in range(int(block.max()) + 1):
        v = stat((block != b).astype(np.float64))
        if np.isfinite(v):
            vals.append(v)
    return np.asarray(vals)


@dataclass(frozen=True)
class PairedResult:
    """Comparison of a metric between two feature sets on the same items (A minus B)."""

    value_a: float
    value_b: float
    difference: float
    low: float
    high: float
    p_value: float
    method: str
    n_boot: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(stat_a: WeightedStat, stat_b: WeightedStat, n: int, *, groups: np.ndarray | None = None,
                     n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> PairedResult:
    """Paired bootstrap of ``stat_a - stat_b`` with the same resampled subjects for both.

    The two-sided p-value is twice the smaller tail of the replicate
    differences around zero, with the +1 correction so it is never 0.
    """
    ones = np.ones(n)
    a, b = float(stat_a(ones)), float(stat_b(ones))
    reps = _replicates_of({"a": stat_a, "b": stat_b}, groups, n, n_boot, seed)
    diffs = reps["a"] - reps["b"]
    diffs = diffs[np.isfinite(diffs)]
    if len(diffs) == 0:
        return PairedResult(a, b, a - b, float("nan"), float("nan"), float("nan"), "paired_bootstrap", n_boot)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    tail = min(np.sum(diffs <= 0), np.sum(diffs >= 0))
    p = min(1.0, 2 * (tail + 1) / (len(diffs) + 1))
    return PairedResult(a, b, a - b, float(lo), float(hi), float(p), "paired_bootstrap", n_boot)


def _midrank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their mean rank."""
    return sps.rankdata(x, method="average")


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, level: float = 0.95) -> PairedResult:
    """DeLong's test of AUC(A) = AUC(B) for two scores of the same binary items.

    Returns the AUCs, their difference with a normal-theory CI, and the
    two-sided p-value of z = diff / se(diff).
    """
    y = np.asarray(y).astype(bool)
    m, k = int(y.sum()), int((~y).sum())
    if m < 2 or k < 2:
        raise InputError(f"DeLong's test needs at least 2 positives and 2 negatives, got {m} and {k}")
    scores = np.vstack([np.asarray(score_a, float), np.asarray(score_b, float)])
    aucs, v10, v01 = [], [], []
    for s in scores:
        pos, neg = s[y], s[~y]
        r_all = _midrank(np.r_[pos, neg])
        r_pos, r_neg = _midrank(pos), _midrank(neg)
        # Structural components: V10[i] = fraction of negatives below positive i (ties 1/2).
        comp10 = (r_all[:m] - r_pos) / k
        comp01 = 1.0 - (r_all[m:] - r_neg) / m
        aucs.append(comp10.mean())
        v10.append(comp10)
        v01.append(comp01)
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    cov = s10 / m + s01 / k
    diff = aucs[0] - aucs[1]
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0:
        p = 1.0 if diff == 0 else 0.0
        lo = hi = diff
    else:
        z = diff / se
        p = float(2 * sps.norm.sf(abs(z)))
        q = sps.norm.ppf(0.5 + level / 2)
        lo, hi = diff - q * se, diff + q * se
    return PairedResult(float(aucs[0]), float(aucs[1]), float(diff), float(lo), float(hi), p, "delong")


"""Classification metrics with sample weights.

Every metric takes an optional ``sample_weight`` so that a bootstrap replicate is
a weight vector (how often each row was drawn) rather than a copy of the data. A
weight *matrix* (B, n) evaluates B replicates at once and returns (B,) values:
each metric is a few weighted sums, so a block of replicates is one product of
the weight matrix with a sparse indicator matrix (rows to confusion cells, or to
blocks of tied scores for AUC), with no sort and no Python loop per replicate
(see :mod:`medfeat.probes.stats`).

Conventions: ``y`` holds integer class labels (n,) or a 0/1 indicator
matrix (n, L) for multi-label tasks; scores are probabilities or any
monotone score. The tests check each function against scikit-learn.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import sparse

from medfeat.errors import InputError

__all__ = [
    "roc_auc",
    "prepared_auc",
    "best_f1_threshold",
    "f1_binary",
    "accuracy",
    "balanced_accuracy",
    "confusion",
    "quadratic_weighted_kappa",
    "macro_f1",
    "multiclass_auc",
    "mean_label_auc",
    "roc_curve_points",
    "headline_from_proba",
    "METRICS_BY_TASK",
]


def _weights(n: int, sample_weight: np.ndarray | None) -> np.ndarray:
    """(n,) or (B, n) float64 weights; ones when None."""
    if sample_weight is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.shape[-1:] != (n,) or w.ndim > 2:
        raise InputError(f"sample_weight has shape {w.shape}, expected ({n},) or (replicates, {n})")
    return w


def _out(values: np.ndarray) -> Any:
    """A float for one weight vector, the (B,) array for a weight matrix."""
    return float(values) if np.ndim(values) == 0 else values


def _indicator(codes: np.ndarray, n_codes: int) -> sparse.csr_matrix:
    """(n, n_codes) 0/1 matrix with one 1 per row, at column ``codes[i]``."""
    n = len(codes)
    return sparse.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, n_codes))


def _sums(w: np.ndarray, onehot: sparse.csr_matrix) -> np.ndarray:
    """Weighted counts per column: (n_codes,) for w (n,), (B, n_codes) for w (B, n)."""
    return np.asarray(onehot.T @ w.T).T


def roc_auc(y: np.ndarray, score: np.ndarray, sample_weight: np.ndarray | None = None) -> Any:
    """ROC AUC of a binary problem; ties count one half (the Mann-Whitney statistic).

    Parameters
    ----------
    y : (n,) 0/1 labels.
    score : (n,) higher means more likely positive.

    Returns NaN when only one class has positive weight (AUC undefined).
    """
    return prepared_auc(y, score)(sample_weight)


def prepared_auc(y: np.ndarray, score: np.ndarray) -> Callable[[np.ndarray | None], Any]:
    """``roc_auc(y, score, w)`` as a function of ``w`` alone, sorting once.

    With the negatives sorted by score, a positive's share of the statistic is the weight of
    the negatives below it plus half the tied ones: two cumulative sums read at positions
    found once. A replicate then costs O(n) without a sort, and a weight matrix (B, n)
    evaluates B replicates in a few array passes.
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    pos, neg = pos[np.argsort(score[pos], kind="stable")], neg[np.argsort(score[neg], kind="stable")]
    below = np.searchsorted(score[neg], score[pos], side="left")  # negatives strictly lower
    upto = np.searchsorted(score[neg], score[pos], side="right")  # ... or tied
    tied = bool((upto != below).any())

    def auc(w: np.ndarray | None = None) -> Any:
        w = _weights(len(y), w)
        W = np.asfortranarray(np.atleast_2d(w))  # (B, n); columns contiguous, so gathers are fast
        cum = np.zeros((len(W), len(neg) + 1), order="F")  # cum[:, j]: weight of the j lowest
        np.cumsum(W[:, neg], axis=1, out=cum[:, 1:])
        lower = cum[:, below] if not tied else 0.5 * (cum[:, below] + cum[:, upto])
        w_pos = W[:, pos]
        total_pos, total_neg = w_pos.sum(axis=1), cum[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.einsum("bi,bi->b", w_pos, lower) / (total_pos * total_neg)
        value = np.where((total_pos > 0) & (total_neg > 0), value, np.nan)
        return _out(value[0] if w.ndim == 1 else value)

    auc.vectorised = True  # type: ignore[attr-defined]
    return auc


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int,
              sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Weighted confusion matrix (n_classes, n_classes): rows true, columns predicted; a
    weight matrix (B, n) gives (B, n_classes, n_classes)."""
    y = np.asarray(y, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    w = _weights(len(y), sample_weight)
    codes = y * n_classes + pred
    if w.ndim == 1:
        flat = np.bincount(codes, weights=w, minlength=n_classes * n_classes)
    else:
        flat = _sums(w, _indicator(codes, n_classes * n_classes))
    return flat.reshape(*w.shape[:-1], n_classes, n_classes)


def accuracy(y: np.ndarray, pred: np.ndarray, sample_weight: np.ndarray | None = None) -> Any:
    """Weighted fraction of correct predictions."""
    w = _weights(len(y), sample_weight)
    correct = (np.asarray(y) == np.asarray(pred)).astype(np.float64)
    return _out(w @ correct / w.sum(axis=-1))


def _diag(cm: np.ndarray) -> np.ndarray:
    return np.diagonal(cm, axis1=-2, axis2=-1)


def _masked_mean(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Mean over the last axis of ``values`` where ``keep``; NaN where nothing is kept."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(keep, values, 0.0).sum(axis=-1) / keep.sum(axis=-1)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int | None = None,
                      sample_weight: np.ndarray | None = None) -> Any:
    """Macro recall: mean over classes present in ``y`` of the per-class recall."""
    k = _n_classes(y, pred, n_classes)
    cm = confusion(y, pred, k, sample_weight)
    support = cm.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = _diag(cm) / support
    return _out(_masked_mean(recall, support > 0))


def quadratic_weighted_kappa(y: np.ndarray, pred: np.ndarray, n_classes: int | None = None,
                             sample_weight: np.ndarray | None = None) -> Any:
    """Cohen's kappa with quadratic weights (ordinal grades 0..K-1)."""
    k = _n_classes(y, pred, n_classes)
    cm = confusion(y, pred, k, sample_weight)
    total = cm.sum(axis=(-2, -1))[..., None, None]
    expected = cm.sum(axis=-1)[..., :, None] * cm.sum(axis=-2)[..., None, :] / total
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / max((k - 1) ** 2, 1)
    denom = (weights * expected).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = 1.0 - (weights * cm).sum(axis=(-2, -1)) / denom
    return _out(np.where(denom != 0, kappa, np.nan))


def f1_binary(y: np.ndarray, pred: np.ndarray, sample_weight: np.ndarray | None = None) -> Any:
    """F1 of the positive class; 0 when there are no predicted and no true positives."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    w = _weights(len(y), sample_weight)
    tp = w @ (y & pred).astype(np.float64)
    fp = w @ (~y & pred).astype(np.float64)
    fn = w @ (y & ~pred).astype(np.float64)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return _out(np.where(denom > 0, 2 * tp / denom, 0.0))


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int | None = None,
             sample_weight: np.ndarray | None = None) -> Any:
    """Unweighted mean of per-class F1 over the classes seen in ``y`` or ``pred``."""
    k = _n_classes(y, pred, n_classes)
    cm = confusion(y, pred, k, sample_weight)
    denom = cm.sum(axis=-2) + cm.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * _diag(cm) / denom
    return _out(_masked_mean(f1, denom > 0))


def best_f1_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """Threshold on ``score`` maximising F1 (predict positive when ``score >= t``).

    Chosen on training-fold predictions and applied unchanged to the test fold,
    so the reported F1 is not tuned on the data it is measured on.
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    if not y.any():
        return float(np.inf)  # predict nothing positive
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], y[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    # Only cut between distinct scores: the last index of each tie block.
    last = np.r_[s[1:] != s[:-1], True]
    f1 = 2 * tp[last] / (tp[last] + fp[last] + t.sum())
    best = int(np.argmax(f1))
    return float(s[last][best])


def _nanmean_over(aucs: list) -> Any:
    """Mean over the list of (scalar or (B,)) AUCs, skipping NaN ones; NaN if all are."""
    stacked = np.stack([np.asarray(a, dtype=np.float64) for a in aucs], axis=-1)
    return _out(_masked_mean(np.nan_to_num(stacked), ~np.isnan(stacked)))


def multiclass_auc(y: np.ndarray, proba: np.ndarray, sample_weight: np.ndarray | None = None) -> Any:
    """Macro one-vs-rest AUC over classes present in ``y``; ``proba`` is (n, K)."""
    y = np.asarray(y, dtype=np.int64)
    return _nanmean_over([roc_auc(y == k, proba[:, k], sample_weight) for k in range(proba.shape[1])])


def mean_label_auc(Y: np.ndarray, S: np.ndarray, sample_weight: np.ndarray | None = None) -> Any:
    """Mean per-label AUC of a multi-label problem; labels with one class only are skipped."""
    return _nanmean_over([roc_auc(Y[:, j], S[:, j], sample_weight) for j in range(Y.shape[1])])


def roc_curve_points(y: np.ndarray, score: np.ndarray, max_points: int = 200) -> tuple[list, list]:
    """(fpr, tpr) of the ROC curve, thinned to at most ``max_points`` for storage in JSON."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    s, t = np.asarray(score)[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]
    tpr = np.r_[0.0, np.cumsum(t)[last] / max(t.sum(), 1)]
    fpr = np.r_[0.0, np.cumsum(~t)[last] / max((~t).sum(), 1)]
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return [round(float(v), 5) for v in fpr], [round(float(v), 5) for v in tpr]


def _n_classes(y: np.ndarray, pred: np.ndarray, n_classes: int | None) -> int:
    if n_classes is not None:
        return int(n_classes)
    return int(max(np.max(y), np.max(pred))) + 1


# Metric name -> what it needs: "score" metrics read probabilities, "pred" metrics
# read hard predictions. The first metric of each task is its headline metric.
MetricFn = Callable[..., float]
METRICS_BY_TASK: dict[str, dict[str, tuple[str, MetricFn]]] = {
    "binary": {
        "auc": ("score", lambda y, s, w=None: roc_auc(y, s, w)),
        "f1": ("pred", lambda y, p, w=None: f1_binary(y, p, w)),
        "accuracy": ("pred", lambda y, p, w=None: accuracy(y, p, w)),
        "balanced_accuracy": ("pred", lambda y, p, w=None: balanced_accuracy(y, p, 2, w)),
    },
    "multiclass": {
        "balanced_accuracy": ("pred", lambda y, p, w=None: balanced_accuracy(y, p, None, w)),
        "accuracy": ("pred", lambda y, p, w=None: accuracy(y, p, w)),
        "macro_f1": ("pred", lambda y, p, w=None: macro_f1(y, p, None, w)),
        "auc": ("score", lambda y, s, w=None: multiclass_auc(y, s, w)),
    },
    "ordinal": {
        "kappa": ("pred", lambda y, p, w=None: quadratic_weighted_kappa(y, p, None, w)),
        "accuracy": ("pred", lambda y, p, w=None: accuracy(y, p, w)),
        "balanced_accuracy": ("pred", lambda y, p, w=None: balanced_accuracy(y, p, None, w)),
        "auc": ("score", lambda y, s, w=None: multiclass_auc(y, s, w)),
    },
    "multilabel": {
        "auc": ("score", lambda y, s, w=None: mean_label_auc(y, s, w)),
        "f1": ("pred", lambda y, p, w=None: _out(np.mean(
            np.stack([np.asarray(f1_binary(y[:, j], p[:, j], w)) for j in range(y.shape[1])]), axis=0))),
    },
}


def headline_from_proba(task: str, y: np.ndarray, proba: np.ndarray) -> float:
    """The task's headline metric of class probabilities: AUC (binary: ``proba`` (n, 2) or
    (n,) positive scores; multi-label: per-label), or of their argmax (multiclass, ordinal).

    What a trained head's validation score is (higher is better)."""
    y, proba = np.asarray(y), np.asarray(proba, dtype=np.float64)
    if task == "binary":
        return roc_auc(y, proba[:, -1] if proba.ndim == 2 else proba)
    if task == "multilabel":
        return mean_label_auc(y, proba)
    kind, fn = next(iter(METRICS_BY_TASK[task].values()))
    return float(fn(y, np.argmax(proba, axis=1)) if kind == "pred" else fn(y, proba))

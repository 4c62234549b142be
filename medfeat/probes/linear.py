"""The linear probe: standardisation, then L2-regularised logistic regression with its C
tuned by a grouped inner cross-validation, following scikit-learn's estimator contract.

Binary, multiclass (multinomial) and multi-label (one binary model per label) targets. The
models are fitted by :mod:`medfeat.probes.logistic`, which solves scikit-learn's
``LogisticRegression(penalty="l2")`` objective for the whole C grid at once (one pass over
the features per iteration for all C) with a covariance preconditioner, so tuning C costs
about what one fit costs. ``fit(X, y, groups=None)`` returns ``self``; fitted attributes
end in ``_``. X is (n_items, dim) float; y is (n,) class labels or an (n, L) 0/1 matrix.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from threadpoolctl import threadpool_limits

from medfeat.errors import InputError
from medfeat.probes.checks import check_param, check_predict_x, check_xy
from medfeat.probes.knn import KNNProbe
from medfeat.probes.logistic import Preconditioner, as_design, fit_path
from medfeat.probes.splits import C_GRID, grouped_kfold
from medfeat.probes.standardise import Standardised

__all__ = ["LinearProbe", "KNNProbe", "make_probe", "shared_preconditioner"]

_SMALL = 1_000_000  # feature-matrix elements below which BLAS runs single-threaded


def row_space(Z: np.ndarray) -> np.ndarray:
    """(d, r) orthonormal basis of the span of Z's rows (n, d), r <= n.

    With more features than rows, an L2-penalised linear model's weights lie in that span
    (they are a combination of the rows the loss sees, the penalty removing any other part),
    so fitting on ``Z @ basis`` (n, r) and mapping the weights back by ``basis`` gives the
    same optimum with r parameters instead of d."""
    _, sv, Vt = np.linalg.svd(np.asarray(Z, dtype=np.float64), full_matrices=False)
    rank_tol = (sv.max() if len(sv) else 0.0) * max(Z.shape) * np.finfo(np.float32).eps
    return Vt[sv > rank_tol].T.astype(Z.dtype)


def shared_preconditioner(X: np.ndarray, seed: int = 0) -> Preconditioner:
    """The solver's preconditioner for every fold of a cross-validation on X (n, d): the
    covariance of (a row subset of) X standardised on all rows. Folds standardise on their
    own rows, which barely moves it, and a preconditioner only needs to be close."""
    X, _ = check_xy(X)
    return Preconditioner.of(Standardised.fit(X), seed)


@dataclass
class _Fitted:
    """One fitted model: ``coef`` (k, d) and ``intercept`` (k,) with k = 1 (binary) or K
    classes; or a constant P(class 1) for a label with one class only."""

    coef: np.ndarray | None
    intercept: np.ndarray | None
    constant: float = 0.0

    def in_features(self, basis: np.ndarray) -> _Fitted:
        """The model fitted on ``Z @ basis`` as a model of Z's features (``basis`` (d, r))."""
        coef = None if self.coef is None else self.coef @ basis.T
        return _Fitted(coef, self.intercept, self.constant)

    def proba(self, Z: np.ndarray | Standardised) -> np.ndarray:
        """(n, K) class probabilities of standardised features Z (n, d); binary models give (n, 2)."""
        if self.coef is None or self.intercept is None:
            return np.full((len(Z), 1), 1.0)
        return _logits_proba(as_design(Z).dot(self.coef.T) + self.intercept)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Standardisation + logistic regression with ``C`` tuned by grouped inner CV.

    Parameters
    ----------
    Cs : grid of inverse regularisation strengths (scikit-learn's C).
    inner_splits : folds of the inner (tuning) cross-validation, grouped by subject.
    tune_max_samples : tune ``C`` on a random subset of at most this many rows (whole
        subjects); the final model is fitted on all rows. Keeps tuning cost flat for
        100k-row feature matrices.
    max_iter, tol : solver settings (tol as scikit-learn's lbfgs gtol).
    class_weight : ``"balanced"``, a dict class -> weight, or None.
    random_state : seeds the inner split and the tuning subset.
    """

    def __init__(self, *, Cs: Sequence[float] = C_GRID, inner_splits: int = 3,
                 tune_max_samples: int = 20000, max_iter: int = 1000, tol: float = 1e-5,
                 class_weight: str | dict | None = None, random_state: int = 0) -> None:
        self.Cs = Cs
        self.inner_splits = inner_splits
        self.tune_max_samples = tune_max_samples
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.random_state = random_state

    # -- fitting ------------------------------------------------------------
    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, *,
            preconditioner: Preconditioner | None = None) -> LinearProbe:
        """Fit on X (n, dim), y (n,) or (n, L); ``groups`` (n,) subjects for the inner CV.

        ``preconditioner``: the solver's, from features standardised like these (a cross-
        validation computes it once for all its folds); computed here when None.
        """
        self._check_params()
        X, y_checked = check_xy(X, y)
        y = np.asarray(y_checked)
        groups = np.arange(len(X)) if groups is None else np.asarray(groups)
        if len(groups) != len(X):
            raise InputError(f"{len(X)} feature rows but {len(groups)} groups")
        # Small problems: BLAS threads only spin against each other (10x slower on 2 busy cores).
        with threadpool_limits(limits=1 if X.size < _SMALL else None):
            standardised = Standardised.fit(X)
            self.mean_, self.scale_ = standardised.mean, standardised.scale
            Z: np.ndarray | Standardised = standardised
            basis = None
            if X.shape[1] > X.shape[0]:  # fit in the rows' span: fewer parameters, the same optimum
                rows = standardised.rows()
                basis = row_space(rows)
                Z, preconditioner = rows @ basis, None
            pre = preconditioner or Preconditioner.of(Z, self.random_state)
            self.multilabel_ = y.ndim == 2
            if self.multilabel_:
                self.classes_ = np.arange(y.shape[1])
                fits = [self._fit_one(Z, (y[:, j] > 0).astype(np.int64), groups, 2, pre) for j in range(y.shape[1])]
                self.estimators_ = [f for f, _ in fits]
                self.C_ = np.array([c for _, c in fits])
            else:
                self.classes_, y_enc = np.unique(y, return_inverse=True)
                est, C = self._fit_one(Z, y_enc, groups, len(self.classes_), pre)
                self.C_ = np.asarray(C)
                self.estimators_ = [est]
            if basis is not None:
                self.estimators_ = [e.in_features(basis) for e in self.estimators_]
        self.n_features_in_ = X.shape[1]
        return self

    def _check_params(self) -> None:
        Cs = list(np.atleast_1d(np.asarray(self.Cs, dtype=float)))
        check_param("Cs", self.Cs, len(Cs) > 0 and all(np.isfinite(Cs)) and min(Cs) > 0,
                    "need one or more positive, finite values")
        check_param("inner_splits", self.inner_splits, int(self.inner_splits) == self.inner_splits
                    and self.inner_splits >= 2, "the inner cross-validation needs at least 2 folds")
        check_param("tune_max_samples", self.tune_max_samples, self.tune_max_samples >= 1, "need at least 1")
        check_param("max_iter", self.max_iter, self.max_iter >= 1, "need at least 1")
        check_param("tol", self.tol, self.tol > 0, "need a positive tolerance")

    def _standardise(self, X: np.ndarray) -> Standardised:
        return Standardised(X, np.asarray(self.mean_), np.asarray(self.scale_))

    def _sample_weight(self, y: np.ndarray, n_classes: int) -> np.ndarray | None:
        """Row weights of ``class_weight`` (scikit-learn's definition of ``"balanced"``)."""
        if self.class_weight is None:
            return None
        counts = np.bincount(y, minlength=n_classes).astype(np.float64)
        if self.class_weight == "balanced":
            per_class = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
        elif isinstance(self.class_weight, dict):
            per_class = np.array([float(self.class_weight.get(k, 1.0)) for k in range(n_classes)])
        else:
            raise InputError(f"class_weight={self.class_weight!r}: use 'balanced', a dict or None")
        return per_class[y]

    def _fit_one(self, Z: np.ndarray | Standardised, y: np.ndarray, groups: np.ndarray, n_classes: int,
                 pre: Preconditioner) -> tuple[_Fitted, float]:
        """Tune C, then fit one model on integer labels 0..n_classes-1."""
        if len(np.unique(y)) < 2:
            return _Fitted(None, None, float(y[0]) if len(y) else 0.0), float("nan")
        C, warm = self._tune_C(Z, y, groups, n_classes, pre)
        theta, _ = fit_path(Z, y, np.array([C]), n_classes=n_classes, sample_weight=self._sample_weight(y, n_classes),
                            init=warm, precond=pre, tol=self.tol, max_iter=self.max_iter)
        d = Z.shape[1]
        return _Fitted(theta[:d].T.copy(), theta[d].copy()), C

    def _tune_C(self, Z: np.ndarray | Standardised, y: np.ndarray, groups: np.ndarray, n_classes: int,
                pre: Preconditioner) -> tuple[float, np.ndarray | None]:
        """The C with the best mean held-out log loss over grouped inner folds (ties: the
        strongest regularisation), and that C's solution on the last fold (a warm start)."""
        Cs = np.array(sorted(float(c) for c in np.atleast_1d(self.Cs)))
        if len(Cs) == 1:
            return float(Cs[0]), None
        idx = self._tuning_subset(groups)
        Zt, yt, gt = as_design(Z).rows(idx), y[idx], groups[idx]
        n_subjects = len(np.unique(gt))
        if n_subjects < self.inner_splits:
            raise InputError(f"tuning C needs at least inner_splits={self.inner_splits} subjects, the training "
                             f"rows hold {n_subjects}: give a single C (Cs=[C]) or fewer inner splits")
        losses = np.zeros(len(Cs))
        k = 1 if n_classes == 2 else n_classes
        theta = None
        for train, val in grouped_kfold(yt, gt, self.inner_splits, self.random_state):
            theta, _ = fit_path(Zt[train], yt[train], Cs, n_classes=n_classes,
                                sample_weight=self._sample_weight(yt[train], n_classes), precond=pre,
                                tol=self.tol, max_iter=self.max_iter)
            logits = Zt[val] @ theta[:-1].astype(Zt.dtype) + theta[-1]  # (n_val, k * m): every C at once
            losses += [_log_loss(yt[val], _logits_proba(logits[:, c * k:(c + 1) * k])) for c in range(len(Cs))]
        best = int(np.argmin(losses))
        warm = None if theta is None else theta[:, best * k:(best + 1) * k]
        return float(Cs[best]), warm

    def _tuning_subset(self, groups: np.ndarray) -> np.ndarray:
        """Row indices of whole subjects, at most about ``tune_max_samples`` rows."""
        n = len(groups)
        if n <= self.tune_max_samples:
            return np.arange(n)
        uniq, inv = np.unique(groups, return_inverse=True)
        rng = np.random.default_rng(self.random_state)
        keep = np.zeros(len(uniq), dtype=bool)
        keep[rng.permutation(len(uniq))[: max(1, int(len(uniq) * self.tune_max_samples / n))]] = True
        return np.flatnonzero(keep[inv])

    # -- prediction ---------------------------------------------------------
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probabilities: (n, K) for K classes, or (n, L) P(label present) for multi-label."""
        X = check_predict_x(self, X)
        Z = self._standardise(X)
        if self.multilabel_:
            return np.column_stack([_positive_proba(e, Z) for e in self.estimators_])
        return self.estimators_[0].proba(Z)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Log-odds (binary, (n,)), class scores (n, K), or per-label log-odds (n, L)."""
        p = np.clip(self.predict_proba(X), 1e-12, 1 - 1e-12)
        if self.multilabel_:
            return np.log(p / (1 - p))
        if p.shape[1] == 2:
            return np.log(p[:, 1] / p[:, 0])
        return np.log(p)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class labels (n,), or a 0/1 matrix (n, L) at 0.5 for multi-label."""
        p = self.predict_proba(X)
        if self.multilabel_:
            return (p >= 0.5).astype(np.int64)
        return self.classes_[np.argmax(p, axis=1)]


def _logits_proba(z: np.ndarray) -> np.ndarray:
    """(n, K) probabilities from (n, 1) binary log-odds or (n, K) class scores."""
    if z.shape[1] == 1:
        p = expit(z[:, 0].astype(np.float64))
        return np.column_stack([1.0 - p, p])
    return softmax(z.astype(np.float64), axis=1)


def _positive_proba(est: _Fitted, Z: np.ndarray | Standardised) -> np.ndarray:
    if est.coef is None:
        return np.full(len(Z), est.constant)
    return est.proba(Z)[:, 1]


def _log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-likelihood of integer labels ``y`` under (n, K) probabilities."""
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0))))


def make_probe(kind: str, **params: object) -> BaseEstimator:
    """A fresh probe by name: ``"linear"``, ``"knn"``, or a trained head (``"mlp"``,
    ``"attention"``, ``"transformer"``: :class:`~medfeat.probes.headfit.HeadProbe`)."""
    if kind == "linear":
        return LinearProbe(**params)  # type: ignore[arg-type]
    if kind == "knn":
        return KNNProbe(**params)  # type: ignore[arg-type]
    from medfeat.probes.headfit import HEAD_KINDS, HeadProbe  # torch: only when a head is asked for

    if kind in HEAD_KINDS:
        return HeadProbe(head=kind, **params)  # type: ignore[arg-type]
    raise InputError(f"unknown probe {kind!r}: use linear, knn, {', '.join(HEAD_KINDS)}")

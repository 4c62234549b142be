"""Probes on frozen features, following scikit-learn's estimator contract.

* :class:`LinearProbe`: per-feature standardisation, then L2-regularised
  logistic regression (lbfgs). Its inverse regularisation ``C`` is chosen on a
  log grid by an inner cross-validation grouped by subject. Binary,
  multiclass (multinomial) and multi-label (one binary model per label).
* :class:`KNNProbe`: cosine k-nearest neighbours with temperature-weighted
  votes (as in DINO's kNN evaluation), on L2-normalised or standardised features.

``fit(X, y, groups=None)`` returns ``self``; fitted attributes end in ``_``.
X is (n_items, dim) float; y is (n,) class labels or an (n, L) 0/1 matrix.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from medfeat.errors import InputError
from medfeat.probes.splits import C_GRID, grouped_kfold

__all__ = ["LinearProbe", "KNNProbe", "make_probe"]


def _check_xy(X: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    X = np.asarray(X)
    if X.ndim != 2:
        raise InputError(f"features must be 2D (items, dim), got shape {X.shape}")
    if X.dtype != np.float32 and X.dtype != np.float64:
        X = X.astype(np.float32)
    if not np.isfinite(X).all():
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))[:5].tolist()
        raise InputError(f"features contain NaN or inf (rows {bad})")
    if y is not None:
        y = np.asarray(y)
        if len(y) != len(X):
            raise InputError(f"{len(X)} feature rows but {len(y)} labels")
    return X, y


def _check_predict_x(probe: BaseEstimator, X: np.ndarray) -> np.ndarray:
    """X for a fitted probe: NotFittedError before ``fit``, a clear error on a feature count
    other than the one it was fitted on."""
    check_is_fitted(probe, "n_features_in_")
    X, _ = _check_xy(X)
    if X.shape[1] != probe.n_features_in_:
        raise InputError(f"X has {X.shape[1]} features, but {type(probe).__name__} was fitted with "
                         f"{probe.n_features_in_} features")
    return X


def _check_param(name: str, value: object, ok: bool, want: str) -> None:
    if not ok:
        raise InputError(f"{name}={value!r}: {want}")


_PATIENCE = 2  # C values with rising held-out loss before the tuning path stops
_SMALL = 1_000_000  # feature-matrix elements below which BLAS runs single-threaded


@dataclass
class _Fitted:
    """One fitted logistic model, or a constant for a label with one class only."""

    model: LogisticRegression | None
    constant: float = 0.0  # P(class 1) when model is None


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Standardisation + logistic regression with ``C`` tuned by grouped inner CV.

    Parameters
    ----------
    Cs : grid of inverse regularisation strengths, tried from strongest
        regularisation upwards with warm starts; a fold's path stops once its
        held-out log loss has risen twice in a row.
    inner_splits : folds of the inner (tuning) cross-validation, grouped by subject.
    tune_max_samples : tune ``C`` on a random subset of at most this many rows
        (whole subjects); the final model is fitted on all rows. Keeps tuning
        cost flat for 100k-row feature matrices.
    max_iter, tol : lbfgs settings.
    class_weight : passed to scikit-learn (``"balanced"`` helps macro recall).
    random_state : seeds the inner split and the tuning subset.
    """

    def __init__(self, *, Cs: Sequence[float] = C_GRID, inner_splits: int = 3,
                 tune_max_samples: int = 20000, max_iter: int = 1000, tol: float = 1e-4,
                 class_weight: str | dict | None = None, random_state: int = 0) -> None:
        self.Cs = Cs
        self.inner_splits = inner_splits
        self.tune_max_samples = tune_max_samples
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.random_state = random_state

    # -- fitting ------------------------------------------------------------
    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> LinearProbe:
        """Fit on X (n, dim), y (n,) or (n, L); ``groups`` (n,) subjects for the inner CV."""
        self._check_params()
        X, y = _check_xy(X, y)
        groups = np.arange(len(X)) if groups is None else np.asarray(groups)
        if len(groups) != len(X):
            raise InputError(f"{len(X)} feature rows but {len(groups)} groups")
        # Small problems: BLAS threads only spin against each other (10x slower on 2 busy cores).
        with threadpool_limits(limits=1 if X.size < _SMALL else None):
            return self._fit(X, y, groups)

    def _check_params(self) -> None:
        Cs = list(np.atleast_1d(np.asarray(self.Cs, dtype=float)))
        _check_param("Cs", self.Cs, len(Cs) > 0 and all(np.isfinite(Cs)) and min(Cs) > 0,
                     "need one or more positive, finite values")
        _check_param("inner_splits", self.inner_splits, int(self.inner_splits) == self.inner_splits
                     and self.inner_splits >= 2, "the inner cross-validation needs at least 2 folds")
        _check_param("tune_max_samples", self.tune_max_samples, self.tune_max_samples >= 1, "need at least 1")
        _check_param("max_iter", self.max_iter, self.max_iter >= 1, "need at least 1")
        _check_param("tol", self.tol, self.tol > 0, "need a positive tolerance")

    def _fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> LinearProbe:
        self.mean_ = X.mean(axis=0, dtype=np.float64).astype(X.dtype)
        std = X.std(axis=0, dtype=np.float64)
        self.scale_ = np.where(std > 1e-12, std, 1.0).astype(X.dtype)
        Z = self._standardise(X)
        self.multilabel_ = y.ndim == 2
        if self.multilabel_:
            self.classes_ = np.arange(y.shape[1])
            fits = [self._fit_one(Z, (y[:, j] > 0).astype(np.int64), groups) for j in range(y.shape[1])]
            self.estimators_ = [f for f, _ in fits]
            self.C_ = np.array([c for _, c in fits])
        else:
            self.classes_, y_enc = np.unique(y, return_inverse=True)
            est, self.C_ = self._fit_one(Z, y_enc, groups)
            self.estimators_ = [est]
        self.n_features_in_ = X.shape[1]
        return self

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) / self.scale_

    def _fit_one(self, Z: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[_Fitted, float]:
        """Tune C then fit one logistic model on integer labels 0..K-1."""
        if len(np.unique(y)) < 2:
            return _Fitted(None, float(y[0]) if len(y) else 0.0), float("nan")
        C = self._tune_C(Z, y, groups)
        model = self._new_model(C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(Z, y)
        return _Fitted(model), C

    def _new_model(self, C: float, warm_start: bool = False) -> LogisticRegression:
        return LogisticRegression(C=C, solver="lbfgs", max_iter=self.max_iter, tol=self.tol,
                                  class_weight=self.class_weight, warm_start=warm_start)

    def _tune_C(self, Z: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
        """Pick C with the best mean held-out log loss over grouped inner folds."""
        Cs = sorted(float(c) for c in self.Cs)
        if len(Cs) == 1:
            return Cs[0]
        idx = self._tuning_subset(groups)
        Zt, yt, gt = Z[idx], y[idx], groups[idx]
        n_subjects = len(np.unique(gt))
        if n_subjects < self.inner_splits:
            raise InputError(f"tuning C needs at least inner_splits={self.inner_splits} subjects, the training "
                             f"rows hold {n_subjects}: give a single C (Cs=[C]) or fewer inner splits")
        folds = grouped_kfold(yt, gt, self.inner_splits, self.random_state)
        losses = np.zeros(len(Cs))
        n_classes = int(y.max()) + 1
        for train, val in folds:
            if len(np.unique(yt[train])) < 2:
                continue
            losses += self._loss_path(Zt[train], yt[train], Zt[val], yt[val], Cs, n_classes)
        # Ties go to the strongest regularisation (first in the sorted grid).
        return Cs[int(np.argmin(losses))]

    def _loss_path(self, Ztr: np.ndarray, ytr: np.ndarray, Zval: np.ndarray, yval: np.ndarray,
                   Cs: list[float], n_classes: int) -> np.ndarray:
        """Held-out log loss along the C path, strong to weak regularisation.

        Each fit starts from the previous solution. Once the held-out loss has
        risen for ``_PATIENCE`` consecutive C values the rest of the path is
        skipped (loss +inf): held-out loss is near-unimodal in log C, and the
        weakly regularised fits are the slow ones (many lbfgs iterations).
        """
        out = np.full(len(Cs), np.inf)
        model = self._new_model(Cs[0], warm_start=True)
        rising = 0
        for i, C in enumerate(Cs):
            model.set_params(C=C)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(Ztr, ytr)
            out[i] = _log_loss(yval, model.predict_proba(Zval), model.classes_, n_classes)
            rising = rising + 1 if i > 0 and out[i] > out[i - 1] else 0
            if rising >= _PATIENCE:
                break
        return out

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
        X = _check_predict_x(self, X)
        Z = self._standardise(X.astype(self.mean_.dtype, copy=False))
        if self.multilabel_:
            return np.column_stack([_positive_proba(e, Z) for e in self.estimators_])
        est = self.estimators_[0]
        if est.model is None:
            return np.ones((len(Z), 1))
        return est.model.predict_proba(Z)

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


def _positive_proba(est: _Fitted, Z: np.ndarray) -> np.ndarray:
    if est.model is None:
        return np.full(len(Z), est.constant)
    return est.model.predict_proba(Z)[:, 1]


def _log_loss(y: np.ndarray, proba: np.ndarray, seen: np.ndarray, n_classes: int) -> float:
    """Mean negative log-likelihood; classes unseen in training get probability ~0."""
    full = np.full((len(y), n_classes), 1e-15)
    full[:, seen] = proba
    return float(-np.mean(np.log(np.clip(full[np.arange(len(y)), y], 1e-15, 1.0))))


class KNNProbe(ClassifierMixin, BaseEstimator):
    """Cosine k-nearest-neighbour classifier with softmax-weighted votes.

    Parameters
    ----------
    n_neighbors : k.
    temperature : votes weigh ``exp(cosine / temperature)``.
    normalize : ``"l2"`` (cosine on raw features) or ``"standard"`` (z-score, then cosine).
    batch_size : query rows per similarity block, bounding memory to batch x n_train.
    """

    def __init__(self, *, n_neighbors: int = 20, temperature: float = 0.07,
                 normalize: str = "l2", batch_size: int = 2048) -> None:
        self.n_neighbors = n_neighbors
        self.temperature = temperature
        self.normalize = normalize
        self.batch_size = batch_size

    def _prep(self, X: np.ndarray) -> np.ndarray:
        X = X.astype(np.float32, copy=False)
        if self.normalize == "standard":
            X = (X - self.mean_) / self.scale_
        norm = np.linalg.norm(X, axis=1, keepdims=True)
        return X / np.maximum(norm, 1e-12)

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> KNNProbe:
        """Store normalised training features (n, dim) and label vectors."""
        _check_param("n_neighbors", self.n_neighbors, int(self.n_neighbors) == self.n_neighbors
                     and self.n_neighbors >= 1, "need at least 1 neighbour")
        _check_param("temperature", self.temperature, self.temperature > 0, "need a positive temperature")
        _check_param("normalize", self.normalize, self.normalize in ("l2", "standard"), "use 'l2' or 'standard'")
        _check_param("batch_size", self.batch_size, self.batch_size >= 1, "need at least 1")
        X, y = _check_xy(X, y)
        X = X.astype(np.float32, copy=False)
        self.mean_ = X.mean(axis=0)
        std = X.std(axis=0)
        self.scale_ = np.where(std > 1e-12, std, 1.0).astype(np.float32)
        self.train_ = self._prep(X)
        self.multilabel_ = y.ndim == 2
        if self.multilabel_:
            self.classes_ = np.arange(y.shape[1])
            self.targets_ = (y > 0).astype(np.float32)
        else:
            self.classes_, enc = np.unique(y, return_inverse=True)
            self.targets_ = np.eye(len(self.classes_), dtype=np.float32)[enc]
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Weighted neighbour label frequencies: (n, K) or (n, L) for multi-label."""
        X = _check_predict_x(self, X)
        return self._vote(self._prep(X), exclude_self=False)

    def loo_proba(self) -> np.ndarray:
        """Leave-one-out probabilities of the training rows (each row not its own neighbour).

        Used to choose decision thresholds on training data without the
        trivial self-match.
        """
        check_is_fitted(self, "train_")
        return self._vote(self.train_, exclude_self=True)

    def _vote(self, Q: np.ndarray, exclude_self: bool) -> np.ndarray:
        k = min(self.n_neighbors, len(self.train_) - int(exclude_self))
        if k < 1:
            raise InputError("kNN probe needs at least 2 training items")
        out = np.empty((len(Q), self.targets_.shape[1]), dtype=np.float64)
        for start in range(0, len(Q), self.batch_size):
            sim = Q[start:start + self.batch_size] @ self.train_.T
            if exclude_self:
                rows = np.arange(len(sim))
                sim[rows, start + rows] = -np.inf
            nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            s = np.take_along_axis(sim, nn, axis=1).astype(np.float64)
            w = np.exp((s - s.max(axis=1, keepdims=True)) / self.temperature)
            votes = np.einsum("qk,qkc->qc", w, self.targets_[nn])
            out[start:start + len(s)] = votes / w.sum(axis=1, keepdims=True)
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class labels (n,), or a 0/1 matrix (n, L) at 0.5 for multi-label."""
        p = self.predict_proba(X)
        if self.multilabel_:
            return (p >= 0.5).astype(np.int64)
        return self.classes_[np.argmax(p, axis=1)]


def make_probe(kind: str, **params: object) -> BaseEstimator:
    """A fresh probe by name: ``"linear"``, ``"knn"``, or a trained head (``"mlp"``,
    ``"attention"``, ``"transformer"``: :class:`~medfeat.probes.headfit.HeadProbe`)."""
    if kind == "linear":
        return LinearProbe(**params)
    if kind == "knn":
        return KNNProbe(**params)
    from medfeat.probes.headfit import HEAD_KINDS, HeadProbe  # torch: only when a head is asked for

    if kind in HEAD_KINDS:
        return HeadProbe(head=kind, **params)  # type: ignore[arg-type]
    raise InputError(f"unknown probe {kind!r}: use linear, knn, {', '.join(HEAD_KINDS)}")

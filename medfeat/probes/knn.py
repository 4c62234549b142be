"""A cosine k-nearest-neighbour probe with temperature-weighted votes (DINO's kNN evaluation),
following scikit-learn's estimator contract."""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from medfeat.errors import InputError
from medfeat.probes.checks import check_param, check_predict_x, check_xy

__all__ = ["KNNProbe"]


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
        check_param("n_neighbors", self.n_neighbors, int(self.n_neighbors) == self.n_neighbors
                     and self.n_neighbors >= 1, "need at least 1 neighbour")
        check_param("temperature", self.temperature, self.temperature > 0, "need a positive temperature")
        check_param("normalize", self.normalize, self.normalize in ("l2", "standard"), "use 'l2' or 'standard'")
        check_param("batch_size", self.batch_size, self.batch_size >= 1, "need at least 1")
        X, y_checked = check_xy(X, y)
        y = np.asarray(y_checked)
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
        X = check_predict_x(self, X)
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

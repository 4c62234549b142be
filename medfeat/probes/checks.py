"""Input and parameter checks shared by the probes (scikit-learn's contract: fitted state,
feature count, parameters validated in ``fit``)."""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from medfeat.engine.store.finite import non_finite_rows
from medfeat.errors import InputError


def check_xy(X: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    X = np.asarray(X)
    if X.ndim != 2:
        raise InputError(f"features must be 2D (items, dim), got shape {X.shape}")
    if X.dtype != np.float32 and X.dtype != np.float64:
        X = X.astype(np.float32)
    bad = non_finite_rows(X)
    if len(bad):
        raise InputError(f"features contain NaN or inf (rows {bad[:5].tolist()})")
    if y is not None:
        y = np.asarray(y)
        if len(y) != len(X):
            raise InputError(f"{len(X)} feature rows but {len(y)} labels")
    return X, y


def check_predict_x(probe: BaseEstimator, X: np.ndarray) -> np.ndarray:
    """X for a fitted probe: NotFittedError before ``fit``, a clear error on a feature count
    other than the one it was fitted on."""
    check_is_fitted(probe, "n_features_in_")
    X, _ = check_xy(X)
    if X.shape[1] != probe.n_features_in_:
        raise InputError(f"X has {X.shape[1]} features, but {type(probe).__name__} was fitted with "
                         f"{probe.n_features_in_} features")
    return X


def check_param(name: str, value: object, ok: bool, want: str) -> None:
    if not ok:
        raise InputError(f"{name}={value!r}: {want}")

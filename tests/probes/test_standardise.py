"""Standardised features without a standardised copy: moments, products, and a probe that
does not care where the features' origin lies."""
from __future__ import annotations

import numpy as np
import pytest

from medfeat.probes.linear import LinearProbe
from medfeat.probes.standardise import MAX_OFFSET, Standardised, column_moments


def _features(n=3000, d=40, offset=3.0, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 10.0, d)
    return (rng.standard_normal((n, d)) * scale + offset * scale * rng.uniform(-1, 1, d)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_moments_match_float64_numpy(dtype):
    X = _features(n=9000, offset=50.0, dtype=dtype)  # several blocks; means far from 0
    mean, std = column_moments(X)
    ref = X.astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(axis=0), rtol=1e-6, atol=1e-6 * ref.std(axis=0).max())
    np.testing.assert_allclose(std, ref.std(axis=0), rtol=2e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("offset", [3.0, 4 * MAX_OFFSET], ids=["raw-products", "far-offset-copy"])
def test_products_equal_those_of_the_standardised_matrix(offset):
    X = _features(offset=offset)
    A = Standardised.fit(X)
    assert (A._Z is not None) == (offset > MAX_OFFSET)
    Z = (X.astype(np.float64) - A.mean) / A.scale
    rng = np.random.default_rng(1)
    W, R = rng.standard_normal((X.shape[1], 3)), rng.standard_normal((len(X), 3))
    tol = {"rtol": 1e-4, "atol": 1e-4 * np.sqrt(X.shape[1])}
    np.testing.assert_allclose(A.dot(W), Z @ W, **tol)
    np.testing.assert_allclose(A.dot_then_tdot(W, lambda rows, Zw: R[rows])[0], Z.T @ R, rtol=1e-4,
                               atol=1e-4 * np.sqrt(len(X)))
    np.testing.assert_allclose(A.rows(np.arange(5, 9)), Z[5:9], rtol=1e-5, atol=1e-5)
    # The fused pass: blocks of rows, the residual of each block from its products.
    seen = []

    def residual(rows, Zw):
        seen.append((rows.start, rows.stop))
        return np.tanh(Zw) * R[rows]

    XtR, r_sum = A.dot_then_tdot(W, residual)
    full = np.tanh(Z @ W) * R
    np.testing.assert_allclose(XtR, Z.T @ full, rtol=1e-4, atol=1e-4 * np.sqrt(len(X)))
    np.testing.assert_allclose(r_sum, full.sum(axis=0), rtol=1e-4, atol=1e-3)
    assert seen[0][0] == 0 and seen[-1][1] == len(X) and all(a[1] == b[0] for a, b in zip(seen, seen[1:]))


def test_probe_does_not_depend_on_the_features_origin():
    """Standardisation removes column offsets, so a probe on X + c must predict what the probe
    on X does, whether the products run on raw values or on an explicit copy (c huge)."""
    X = _features(n=600, d=20, offset=0.0)
    rng = np.random.default_rng(3)
    y = (X[:, 0] / X[:, 0].std() + rng.normal(size=600) > 0).astype(int)
    base = LinearProbe(Cs=(0.1,), tol=1e-8).fit(X, y).predict_proba(X)
    for shift in (5.0, 1e3):  # in units of each column's std: raw products, then the copy
        Xs = (X + shift * X.std(axis=0)).astype(np.float32)
        moved = LinearProbe(Cs=(0.1,), tol=1e-8).fit(Xs, y).predict_proba(Xs)
        np.testing.assert_allclose(moved, base, atol=2e-4)

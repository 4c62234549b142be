"""Newton's method for small binary probes: the same optimum as the L-BFGS path and as
scikit-learn, in far fewer iterations where the data are nearly separable."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import medfeat.probes.newton as newton
from medfeat.probes.logistic import fit_path
from medfeat.probes.newton import newton_fits

CS = np.array([1e-3, 1e-1, 1e1, 1e3])


def _nearly_separable(n=120, d=30, seed=0):
    """Standardised features where a few rows sit on the wrong side: large C nearly separates."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d))
    y = (Z[:, 0] + 0.3 * Z[:, 1] + 0.15 * rng.standard_normal(n) > 0).astype(int)
    Z = (Z - Z.mean(axis=0)) / Z.std(axis=0)
    return Z.astype(np.float32), y


def test_newton_is_used_only_for_small_problems():
    assert newton_fits(150, 150, 9) and newton_fits(2000, 64, 9)
    assert not newton_fits(13_000, 1024, 9) and not newton_fits(20_000, 128, 9)


@pytest.mark.parametrize("weighted", [False, True])
def test_newton_path_equals_the_lbfgs_path(monkeypatch, weighted):
    Z, y = _nearly_separable()
    sw = np.where(y == 1, 2.0, 0.5) if weighted else None
    theta_newton, it_newton = fit_path(Z, y, CS, n_classes=2, sample_weight=sw, tol=1e-8, max_iter=5000)
    monkeypatch.setattr(newton, "NEWTON_MAX_FLOPS", 0)  # the same call, now by L-BFGS
    theta_lbfgs, it_lbfgs = fit_path(Z, y, CS, n_classes=2, sample_weight=sw, tol=1e-8, max_iter=5000)
    logits_n, logits_l = Z @ theta_newton[:-1] + theta_newton[-1], Z @ theta_lbfgs[:-1] + theta_lbfgs[-1]
    np.testing.assert_allclose(logits_n, logits_l, rtol=1e-3, atol=1e-3 * np.abs(logits_l).max())
    assert it_newton.max() < 60 and it_newton.max() * 3 < it_lbfgs.max()


def test_newton_equals_scikit_learn_at_large_C():
    Z, y = _nearly_separable(seed=4)
    theta, _ = fit_path(Z, y, np.array([1e3]), n_classes=2, tol=1e-8, max_iter=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegression(C=1e3, tol=1e-12, max_iter=100000, solver="newton-cg").fit(Z.astype(np.float64), y)
    p = 1 / (1 + np.exp(-(Z @ theta[:-1, 0] + theta[-1, 0])))
    np.testing.assert_allclose(p, ref.predict_proba(Z.astype(np.float64))[:, 1], atol=1e-4)

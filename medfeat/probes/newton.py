"""Newton's method for small binary L2 logistic regressions, a whole C grid at once.

A study's probes often have few rows: a few hundred subjects, whose thousands of features
the linear probe first reduces to the rows' span (at most n parameters). On such problems
L-BFGS spends hundreds of iterations at large C, where the data are nearly separable and
the penalty barely curves the objective, and each iteration is Python overhead on tiny
arrays. Newton's method forms the Hessian ``Xa.T diag(s p (1 - p)) Xa + I / C`` (intercept
unpenalised) and converges in a few dozen steps at every C; with p parameters and n rows a
step costs about ``n p^2 + p^3 / 3`` per C, so it is used only where that is small
(:func:`newton_fits`). Same objective, convergence rule and result format as
:func:`medfeat.probes.logistic.fit_path`.
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit, log_expit

__all__ = ["fit_path_newton", "newton_fits"]

#: Floating-point work per Newton step (all C together) up to which Newton's method is used.
NEWTON_MAX_FLOPS = 5e8
_ARMIJO = 1e-4


def newton_fits(n: int, d: int, m: int) -> bool:
    """Whether Newton steps are cheap for n rows, d features and m values of C."""
    p = d + 1
    return m * (n * p * p + p ** 3 / 3) <= NEWTON_MAX_FLOPS


def _objective(Xa: np.ndarray, y: np.ndarray, sw: np.ndarray, theta: np.ndarray, inv_c: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Objective divided by C per C (m,), its gradient (p, m) and the probabilities (n, m)."""
    Z = Xa @ theta
    signed = np.where(y[:, None] > 0, Z, -Z)
    W = theta[:-1]
    f = -(sw[:, None] * log_expit(signed)).sum(axis=0) + 0.5 * (W * W).sum(axis=0) * inv_c
    P = expit(Z)
    g = Xa.T @ ((P - y[:, None]) * sw[:, None])
    g[:-1] += W * inv_c
    return f, g, P


def fit_path_newton(Z: np.ndarray, y: np.ndarray, sw: np.ndarray, Cs: np.ndarray, *, init: np.ndarray | None,
                    tol: float, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit one binary model per C of ``Cs`` on standardised Z (n, d).

    y : (n,) 0/1 floats; sw : (n,) row weights; init : (d + 1, m) warm start or None.
    Returns theta (d + 1, m) (weights, then the intercept) and n_iter (m,).
    """
    n, d = Z.shape
    m = len(Cs)
    Xa = np.hstack([np.asarray(Z, dtype=np.float64), np.ones((n, 1))])
    inv_c = 1.0 / np.asarray(Cs, dtype=np.float64)
    ridge = np.append(np.ones(d), 0.0)[None, :] * inv_c[:, None]  # (m, p): the penalty's curvature
    theta = np.zeros((d + 1, m)) if init is None else np.array(init, dtype=np.float64)
    f, g, P = _objective(Xa, y, sw, theta, inv_c)
    n_iter = np.full(m, max_iter)
    done = np.zeros(m, dtype=bool)
    scale = sw.sum()
    for it in range(max_iter):
        newly = ~done & (np.abs(g).max(axis=0) / scale <= tol)  # scikit-learn's rule, as fit_path
        n_iter[newly] = it
        done |= newly
        if done.all():
            break
        step = _newton_steps(Xa, sw, P, g, ridge, done)
        theta, f, g, P, moved = _backtrack(Xa, y, sw, theta, f, g, P, step, inv_c, ~done)
        stalled = ~done & ~moved  # no decrease along the Newton direction: converged to rounding
        n_iter[stalled] = it + 1
        done |= stalled
    return theta, n_iter


def _newton_steps(Xa: np.ndarray, sw: np.ndarray, P: np.ndarray, g: np.ndarray, ridge: np.ndarray,
                  done: np.ndarray) -> np.ndarray:
    """``-H^-1 g`` per C (p, m), zero for the Cs already done."""
    active = np.flatnonzero(~done)
    curv = sw[:, None] * P[:, active] * (1.0 - P[:, active])  # (n, a)
    H = (Xa.T[None, :, :] * curv.T[:, None, :]) @ Xa  # (a, p, p)
    H[:, np.arange(Xa.shape[1]), np.arange(Xa.shape[1])] += ridge[active]
    # Nearly separable data at large C leave the intercept almost flat: a tiny floor keeps H
    # positive definite without moving the step elsewhere.
    H[:, -1, -1] += 1e-12 * max(1.0, float(sw.sum()))
    step = np.zeros_like(g)
    step[:, active] = -np.linalg.solve(H, g[:, active].T[:, :, None])[:, :, 0].T
    return step


def _backtrack(Xa: np.ndarray, y: np.ndarray, sw: np.ndarray, theta: np.ndarray, f: np.ndarray, g: np.ndarray,
               P: np.ndarray, step: np.ndarray, inv_c: np.ndarray, pending: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Armijo backtracking along the Newton steps, a step length per C; returns the new
    point, objective, gradient, probabilities and which C moved."""
    slope = (g * step).sum(axis=0)
    pending = pending & (slope < 0)
    t = np.ones(len(f))
    moved = np.zeros(len(f), dtype=bool)
    theta, f, g, P = theta.copy(), f.copy(), g.copy(), P.copy()
    for _ in range(60):
        if not pending.any():
            break
        trial = theta + step * np.where(pending, t, 0.0)
        f_t, g_t, P_t = _objective(Xa, y, sw, trial, inv_c)
        ok = pending & np.isfinite(f_t) & (f_t <= f + _ARMIJO * t * slope)
        theta[:, ok], g[:, ok], P[:, ok], f[ok] = trial[:, ok], g_t[:, ok], P_t[:, ok], f_t[ok]
        moved |= ok
        pending &= ~ok
        t = np.where(pending, 0.5 * t, t)
    return theta, f, g, P, moved

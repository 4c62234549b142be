"""L2-regularised logistic regression fitted for a whole grid of C at once.

The objective per C is scikit-learn's (``LogisticRegression(penalty="l2")`` with lbfgs):
``C * sum_i s_i * loss_i + ||W||^2 / 2``, intercepts unpenalised; binary problems use the
logistic loss on one weight vector, multiclass problems the multinomial (softmax) loss on
K weight vectors. Here it is divided by C (same minimiser) and solved for all C of a grid
together by L-BFGS, vectorised over the grid: every iteration costs one product ``X @ W``
and one ``X.T @ R`` for the whole grid, so a 9-point path costs about what one fit costs
(the passes over X dominate; they are memory-bound).

The initial inverse Hessian of the L-BFGS recursion is not the usual scaled identity but
``(beta * n * Cov(X) + I / C)^-1`` from an eigendecomposition of the features' covariance
(on at most ``PRECONDITION_ROWS`` rows): real feature matrices are badly conditioned, and
this preconditioner makes the number of iterations nearly independent of that.

Convergence follows scikit-learn's lbfgs rule (1.2 and later): the largest gradient
component of ``mean loss + ||W||^2 / (2 C n)`` at most ``tol``. Products with X run in
X's dtype (float32 halves the memory traffic); the line search allows for the rounding of
float32 sums near the optimum, where decreases fall below it. X may be a
:class:`~medfeat.probes.standardise.Standardised` matrix (products run on the raw features).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit, log_expit, logsumexp, softmax

from medfeat.probes.newton import fit_path_newton, newton_fits
from medfeat.probes.standardise import Standardised

PRECONDITION_ROWS = 20000
_HISTORY = 10
_CURVATURE_EPS = 1e-12
_ROUNDING = 1e-6  # relative error of an objective summed from float32 products


@dataclass(frozen=True)
class Preconditioner:
    """Eigenvectors ``V`` (d, r) and eigenvalues ``lam`` (r,) of the feature covariance (r = d,
    or the rank of fewer rows than features: the other eigenvalues are 0), and ``beta``, the
    expected loss curvature per row (1/4 for the logistic loss at 0)."""

    V: np.ndarray
    lam: np.ndarray
    beta: float = 0.25

    @classmethod
    def of(cls, X: np.ndarray | Standardised, rng_seed: int = 0) -> Preconditioner:
        """From (a random subset of at most PRECONDITION_ROWS rows of) X (n, d)."""
        A = as_design(X)
        pick = None
        if len(A) > PRECONDITION_ROWS:
            pick = np.sort(np.random.default_rng(rng_seed).choice(len(A), PRECONDITION_ROWS, replace=False))
        rows = A.rows(pick)
        centred = rows - rows.mean(axis=0, dtype=np.float64).astype(rows.dtype)
        if len(rows) < centred.shape[1]:
            # fewer rows than features (a study's few hundred subjects, thousands of features):
            # the thin SVD costs O(n^2 d) where the d x d eigendecomposition costs O(d^3)
            _, sv, Vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
            return cls(Vt.T, sv**2 / len(rows))
        # The product in the features' type (float32: half the time), the eigenproblem in float64.
        lam, V = np.linalg.eigh((centred.T @ centred).astype(np.float64) / len(rows))
        return cls(V, np.maximum(lam, 0.0))

    def apply(self, q: np.ndarray, n: float, Cs: np.ndarray, k: int) -> np.ndarray:
        """``H0 @ q`` for stacked parameters q (d + 1, k * m): per class block and C, weights
        get ``(beta n Cov + I/C)^-1`` (in the objective divided by C, i.e. times C), the
        intercept ``1 / (beta n)``."""
        d = self.V.shape[0]
        c_cols = np.repeat(Cs, k)  # column j belongs to C index j // k
        denom = self.beta * n * self.lam[:, None] + 1.0 / c_cols[None, :]
        out = np.empty_like(q)
        p = self.V.T @ q[:d]
        out[:d] = self.V @ (p / denom)
        if self.V.shape[1] < d:  # directions of zero variance: (I/C)^-1
            out[:d] += (q[:d] - self.V @ p) * c_cols[None, :]
        out[d] = q[d] / (self.beta * n)
        return out


def as_design(X: np.ndarray | Standardised) -> Standardised:
    """X as the solver's matrix: a Standardised one as it is, an array as already standardised."""
    if isinstance(X, Standardised):
        return X
    X = np.asarray(X)
    return Standardised(X, np.zeros(X.shape[1]), np.ones(X.shape[1]))


def _objective(X: Standardised, Y: np.ndarray, sw: np.ndarray, theta: np.ndarray, Cs: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Objective divided by C (``sum s_i loss_i + ||W||^2 / (2C)``) per C, and its gradient.

    theta : (d + 1, k * m) weights then intercepts; for each C a block of k columns.
    Y : (n,) 0/1 for k == 1, else (n, k) one-hot.
    Returns f (m,) and g (d + 1, k * m).
    """
    d = X.shape[1]
    m = len(Cs)
    W, b = theta[:d], theta[d]
    loss = np.zeros(m)

    def residual(rows: slice, Zw: np.ndarray) -> np.ndarray:
        """Adds the rows' loss to ``loss``; returns their weighted residuals (rows, k*m)."""
        Z, w = Zw + b, sw[rows, None]
        if k == 1:
            y = Y[rows, None]
            loss[:] -= (w * log_expit(np.where(y > 0, Z, -Z))).sum(axis=0)
            return (expit(Z) - y) * w
        Z3, y = Z.reshape(len(Z), m, k), Y[rows]
        loss[:] += (w * (logsumexp(Z3, axis=2) - np.einsum("nmk,nk->nm", Z3, y))).sum(axis=0)
        return ((softmax(Z3, axis=2) - y[:, None, :]) * w[:, :, None]).reshape(len(Z), m * k)

    XtR, r_sum = X.dot_then_tdot(W, residual)
    c_cols = np.repeat(Cs, k)
    penalty = 0.5 * (W * W).sum(axis=0) / c_cols
    f = loss + penalty.reshape(m, k).sum(axis=1)
    g = np.empty_like(theta)
    g[:d] = XtR + W / c_cols
    g[d] = r_sum
    return f, g


def fit_path(X: np.ndarray | Standardised, y: np.ndarray, Cs: np.ndarray, *, n_classes: int,
             sample_weight: np.ndarray | None = None,
             init: np.ndarray | None = None, precond: Preconditioner | None = None, tol: float = 1e-4,
             max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Fit one model per C of ``Cs`` together (small binary problems by Newton's method,
    :mod:`medfeat.probes.newton`; the rest by the L-BFGS of this module).

    Parameters
    ----------
    X : (n, d) standardised features (float32 or float64), or a :class:`Standardised` matrix.
    y : (n,) integer labels 0..n_classes-1.
    n_classes : 2 fits one weight vector (the logistic loss); more fit the softmax.
    sample_weight : (n,) row weights (class weights folded in), default ones.
    init : (d + 1, k * m) warm start (e.g. the path of a neighbouring fold).

    Returns
    -------
    theta : (d + 1, k * m) with k = 1 (binary) or n_classes; rows are the d weights, then
        the intercept; column ``c * k + j`` is class j's (or the positive class's) at ``Cs[c]``.
    n_iter : (m,) iterations until each C converged (``max_iter`` if it did not).
    """
    Cs = np.asarray(Cs, dtype=np.float64)
    X = as_design(X)
    n, d = X.shape
    m = len(Cs)
    k = 1 if n_classes == 2 else n_classes
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    Y = np.asarray(y, dtype=np.float64) if k == 1 else np.eye(k)[np.asarray(y, dtype=np.int64)]
    if k == 1 and newton_fits(n, d, m):  # few rows and parameters: Newton steps, far fewer of them
        return fit_path_newton(X.rows(), Y, sw, Cs, init=init, tol=tol, max_iter=max_iter)
    theta = np.zeros((d + 1, k * m)) if init is None else np.array(init, dtype=np.float64)
    f, g = _objective(X, Y, sw, theta, Cs, k)
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    n_iter = np.full(m, max_iter)
    done = np.zeros(m, dtype=bool)
    for it in range(max_iter):
        grad_norm = np.abs(g).reshape(d + 1, m, k).max(axis=(0, 2)) / sw.sum()  # scikit-learn's scale
        newly = ~done & (grad_norm <= tol)
        n_iter[newly] = it
        done |= newly
        if done.all():
            break
        direction = -_two_loop(g, history, precond, n, Cs, k)
        direction[:, np.repeat(done, k)] = 0.0
        theta_new, f_new, g_new, moved = _line_search(X, Y, sw, theta, f, g, direction, Cs, k)
        stalled = ~done & ~moved  # no decrease along any step: as converged as it gets
        n_iter[stalled] = it + 1
        done |= stalled
        s, yv = theta_new - theta, g_new - g
        sy = (s * yv).reshape(d + 1, m, k).sum(axis=(0, 2))
        rho = np.where(sy > _CURVATURE_EPS, 1.0 / np.where(sy > _CURVATURE_EPS, sy, 1.0), 0.0)
        history = (history + [(s, yv, rho)])[-_HISTORY:]
        theta, f, g = theta_new, f_new, g_new
    return theta, n_iter


def _col_dot(a: np.ndarray, b: np.ndarray, m: int, k: int) -> np.ndarray:
    """Per-C inner products of stacked parameter blocks: (m,)."""
    return (a * b).reshape(a.shape[0], m, k).sum(axis=(0, 2))


def _per_col(v: np.ndarray, k: int) -> np.ndarray:
    return np.repeat(v, k)[None, :]


def _two_loop(g: np.ndarray, history: list, precond: Preconditioner | None, n: int, Cs: np.ndarray,
              k: int) -> np.ndarray:
    """L-BFGS's ``H @ g`` per C column block (history entries with no curvature skipped)."""
    m = len(Cs)
    q = g.copy()
    alphas = []
    for s, yv, rho in reversed(history):
        a = rho * _col_dot(s, q, m, k)
        q -= _per_col(a, k) * yv
        alphas.append(a)
    if precond is not None:
        r = precond.apply(q, n, Cs, k)
    elif history:
        s, yv, rho = history[-1]
        yy = _col_dot(yv, yv, m, k)
        gamma = np.where((rho > 0) & (yy > 0), _col_dot(s, yv, m, k) / np.where(yy > 0, yy, 1.0), 1.0 / n)
        r = _per_col(gamma, k) * q
    else:
        r = q / n
    for (s, yv, rho), a in zip(history, reversed(alphas)):
        beta = rho * _col_dot(yv, r, m, k)
        r += _per_col(a - beta, k) * s
    return r


def _line_search(X: Standardised, Y: np.ndarray, sw: np.ndarray, theta: np.ndarray, f: np.ndarray, g: np.ndarray,
                 direction: np.ndarray, Cs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backtracking (Armijo) along ``direction``, a step per C; a non-descent direction is
    replaced by the negative gradient. All C share each trial's pass over X. Returns the new
    point, its objective and gradient, and which C moved (a C that found no decrease stays)."""
    m = len(Cs)
    slope = _col_dot(g, direction, m, k)
    uphill = slope >= 0
    if uphill.any():
        cols = np.repeat(uphill, k)
        direction[:, cols] = -g[:, cols] / max(len(X), 1)
        slope = _col_dot(g, direction, m, k)
    pending = slope < 0
    moved = np.zeros(m, dtype=bool)
    step = np.ones(m)
    new_theta, new_f, new_g = theta.copy(), f.copy(), g.copy()
    for _ in range(40):
        if not pending.any():
            break
        trial = theta + _per_col(np.where(pending, step, 0.0), k) * direction
        f_t, g_t = _objective(X, Y, sw, trial, Cs, k)
        noise = _ROUNDING * np.abs(f) if X.dtype == np.float32 else 0.0
        ok = pending & np.isfinite(f_t) & (f_t <= f + 1e-4 * step * slope + noise)
        cols = np.repeat(ok, k)
        new_theta[:, cols], new_g[:, cols], new_f[ok] = trial[:, cols], g_t[:, cols], f_t[ok]
        moved |= ok
        pending &= ~ok
        step = np.where(pending, step * 0.5, step)
    return new_theta, new_f, new_g, moved

"""Levenberg-Marquardt (damped Gauss-Newton) on normalised cross-correlation, batched per pair.

The solver of :func:`medfeat.kernels.align` (``optimizer='gauss-newton'``),
in PyTorch so the same code runs on the CPU and on CUDA. For B pairs it keeps
B world transforms ``y = L (x - c) + c + t`` (x a fixed-world point, y the
moving-world point, c the fixed scan's centre, all mm). At each pyramid
level every iteration samples the moving image *and its spatial gradient*
at a fixed random subset of fixed voxels (one ``grid_sample`` call, no
autograd), forms the analytic Jacobian of the standardised warped values
and solves a damped 6x6 (rigid) or 12x12 (affine) normal system per pair.

Why this shape: NCC is a least-squares problem in disguise. With F^ and M^
the fixed and warped values standardised over the overlap (zero mean, unit
variance), ``|F^ - M^|^2 / 2n = 1 - NCC``, so Gauss-Newton on that residual
maximises NCC and converges in a handful of iterations where first-order
methods need a hundred. Each pair has its own damping and leaves the batch
as soon as its last step moves no point of the field of view by more than
``tolerance`` voxels of the level (early stopping per pair).

Points mapped outside the moving scan drop out of the sums (a hard overlap
mask, whose change with the parameters is not differentiated; ITK's metrics
do the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def _torch() -> Any:
    import torch

    return torch


def rotvec_to_matrix(r: Any) -> Any:
    """(B, 3) rotation vectors (radians) -> (B, 3, 3) rotation matrices (Rodrigues, safe at 0)."""
    torch = _torch()
    theta = torch.sqrt((r * r).sum(-1, keepdim=True) + 1e-20)
    k = r / theta
    zero = torch.zeros_like(k[:, 0])
    kx = torch.stack(
        [zero, -k[:, 2], k[:, 1], k[:, 2], zero, -k[:, 0], -k[:, 1], k[:, 0], zero], dim=-1
    ).view(-1, 3, 3)
    eye = torch.eye(3, dtype=r.dtype, device=r.device).expand_as(kx)
    s = torch.sin(theta)[..., None]
    c = torch.cos(theta)[..., None]
    return eye + s * kx + (1 - c) * (kx @ kx)


#: Damping (Marquardt-scaled) after a rejected step: at least 1, so the next step is at most about half.
REJECT_DAMPING = 1.0
#: A rejected step shorter than this many tolerances ends the pair's level: the optimum is bracketed
#: to within the sampled objective's noise, and shrinking further buys no accuracy.
REJECT_FACTOR = 4.0


@dataclass
class Level:
    """One pyramid level of a batch, on the torch device.

    ``stack``: (B, 4, D, H, W) float32 moving image and its gradient along
    array axes 0, 1, 2 (per index step); ``fixed``: (B, N) fixed values at
    the sampled voxels; ``points``: (B, 3, N) float32 their fixed-world
    positions (mm) minus the centres ``c`` (B, 3, float64); ``to_grid``:
    (B, 3, 4) float64 moving world mm -> ``grid_sample``'s (x, y, z) in
    [-1, 1]; ``to_index``: (B, 3, 3) the linear part of moving world ->
    moving voxel index; ``radius``: (B,) largest |x - c| of the samples (mm);
    ``voxel``: (B,) float64 each pair's voxel size at this level (mm), the
    unit of its tolerance (per pair, so a pair's result does not depend on
    the batch it is in).
    """

    stack: Any
    fixed: Any
    points: Any
    c: Any
    to_grid: Any
    to_index: Any
    radius: Any
    voxel: Any


def gradient_stack(images: Any) -> Any:
    """(B, 1, D, H, W) -> (B, 4, D, H, W): the image and its central differences along axes 0, 1, 2."""
    torch = _torch()
    grads = torch.gradient(images[:, 0], dim=(1, 2, 3))
    return torch.cat([images, torch.stack(grads, dim=1)], dim=1)


def _select(level: Level, idx: Any) -> Level:
    return Level(level.stack[idx], level.fixed[idx], level.points[idx], level.c[idx],
                 level.to_grid[idx], level.to_index[idx], level.radius[idx], level.voxel[idx])


def _moments(lv: Level, lin: Any, t: Any, kind: str) -> Any:
    """(B, P + 3, P + 3) float64 Gram matrix of [J; F; M; 1] over the overlap at ``y = lin x + c + t``.

    J (P rows) is d(warped value) / d(parameter increment) per sample: for
    ``lin <- lin exp([w]x)``, ``t <- t + lin tau`` (rigid) it is
    ``[x cross G; G]`` and for ``lin <- lin (I + D)`` (affine) ``[G x^T; G]``,
    with ``G = (A lin)^T grad_index M`` and x the point about the centre, so
    the per-point work is a few float32 products of (B, 3, N) arrays.
    """
    torch = _torch()
    f32 = torch.float32
    k = (lv.to_grid[:, :, :3] @ lin).to(f32)
    off = (lv.to_grid[:, :, :3] @ (lv.c + t)[..., None] + lv.to_grid[:, :, 3:]).to(f32)
    q = k @ lv.points + off  # (B, 3, N): grid_sample (x, y, z) of the moved points
    inside = (q.abs() <= 1.0).all(dim=1, keepdim=True).to(f32)  # (B, 1, N)
    s = torch.nn.functional.grid_sample(lv.stack, q.transpose(1, 2)[:, :, None, None, :],
                                        mode="bilinear", padding_mode="zeros", align_corners=True)
    s = s.reshape(s.shape[0], 4, -1)
    g = (lv.to_index @ lin).to(f32).transpose(1, 2) @ s[:, 1:]  # (B, 3, N)
    x = lv.points
    if kind == "rigid":
        rows = [torch.linalg.cross(x, g, dim=1), g]
    else:
        rows = [(g[:, :, None, :] * x[:, None, :, :]).flatten(1, 2), g]
    z = torch.cat(rows + [lv.fixed[:, None], s[:, :1], torch.ones_like(inside)], dim=1) * inside
    z = z.to(torch.float64)
    return z @ z.transpose(1, 2)


def evaluate(lv: Level, lin: Any, t: Any, kind: str) -> tuple[Any, Any, Any]:
    """1 - NCC (B,), its gradient (B, P) and Gauss-Newton matrix (B, P, P), all float64.

    From the Gram matrix of :func:`_moments`: with centred sums S over the
    overlap, NCC = S_fm / sqrt(S_ff S_mm); the Gauss-Newton matrix is that of
    the residual F^ - M^ of the standardised values, whose squared norm is
    2 n (1 - NCC): (S_JJ - S_Jm S_Jm^T / S_mm) / S_mm.
    """
    torch = _torch()
    gram = _moments(lv, lin, t, kind)
    p = gram.shape[1] - 3
    n = gram[:, -1, -1].clamp(min=1.0)
    mean = gram[:, -1, :] / n[:, None]  # means of J, F, M, 1
    cov = gram - n[:, None, None] * mean[:, :, None] * mean[:, None, :]  # centred sums
    s_jj, s_jf, s_jm = cov[:, :p, :p], cov[:, :p, p], cov[:, :p, p + 1]
    s_ff, s_mm, s_fm = cov[:, p, p].clamp(min=1e-12), cov[:, p + 1, p + 1].clamp(min=1e-12), cov[:, p, p + 1]
    ncc = s_fm / torch.sqrt(s_ff * s_mm)
    grad = -(s_jf / torch.sqrt(s_ff * s_mm)[:, None] - ncc[:, None] * s_jm / s_mm[:, None])
    hess = (s_jj - s_jm[:, :, None] * s_jm[:, None, :] / s_mm[:, None, None]) / s_mm[:, None, None]
    return 1.0 - ncc, grad, hess


def apply_step(lin: Any, t: Any, step: Any, kind: str) -> tuple[Any, Any]:
    """Parameters after ``step`` (B, P), applied on the right: ``lin exp([w]x)`` or ``lin (I + D)``; ``t + lin tau``."""
    inc = rotvec_to_matrix(step[:, :3]) if kind == "rigid" else step[:, :9].reshape(-1, 3, 3)
    new_lin = lin @ inc if kind == "rigid" else lin + lin @ inc
    return new_lin, t + (lin @ step[:, -3:, None])[..., 0]


def _step_size(step: Any, radius: Any, kind: str) -> Any:
    """Largest displacement (mm) the step causes within ``radius`` of the centre (for ``lin`` near a rotation)."""
    torch = _torch()
    if kind == "rigid":
        turn = torch.linalg.vector_norm(step[:, :3], dim=1) * radius
    else:
        turn = torch.linalg.matrix_norm(step[:, :9].reshape(-1, 3, 3), ord=2) * radius
    return turn + torch.linalg.vector_norm(step[:, -3:], dim=1)


def solve_level(lv: Level, lin: Any, t: Any, kind: str, iterations: int, tolerance: float) -> tuple[Any, Any, int]:
    """Levenberg-Marquardt on one level for all pairs; returns (lin, t, evaluations).

    A pair stops when a step it takes (or rejects) would move no point by
    more than ``tolerance`` level voxels, when its damping runs away (no
    descent left at this sampling), or after ``iterations`` evaluations.
    Stopped pairs leave the batch, so late iterations cost only the pairs
    still moving.
    """
    torch = _torch()
    b = lin.shape[0]
    lin, t = lin.clone(), t.clone()
    p = 6 if kind == "rigid" else 12
    lam = torch.full((b,), 1e-3, dtype=torch.float64, device=lin.device)
    cost, grad, hess = evaluate(lv, lin, t, kind)
    active = torch.arange(b, device=lin.device)
    sub, evals = lv, 1
    eye = torch.eye(p, dtype=torch.float64, device=lin.device)
    for _ in range(iterations - 1):
        h, g, la = hess[active], grad[active], lam[active]
        diag = torch.diagonal(h, dim1=1, dim2=2).clamp(min=1e-12)
        step = -torch.linalg.solve(h + la[:, None, None] * torch.diag_embed(diag) + 1e-12 * eye, g[..., None])[..., 0]
        lin_t, t_t = apply_step(lin[active], t[active], step, kind)
        c_t, g_t, h_t = evaluate(sub, lin_t, t_t, kind)
        evals += 1
        better = c_t < cost[active]
        keep = active[better]
        lin[keep], t[keep] = lin_t[better], t_t[better]
        cost[keep], grad[keep], hess[keep] = c_t[better], g_t[better], h_t[better]
        la = torch.where(better, la / 4.0, torch.clamp(la * 8.0, min=REJECT_DAMPING)).clamp(1e-7, 1e7)
        lam[active] = la
        size = _step_size(step, sub.radius, kind) / sub.voxel
        done = (size < tolerance) | (~better & (size < REJECT_FACTOR * tolerance)) | (la >= 1e7)
        if bool(done.all()):
            break
        if bool(done.any()):
            active, sub = active[~done], _select(sub, ~done)
    return lin, t, evals


def level_points(shape: tuple[int, int, int], n: int, seed: int) -> np.ndarray:
    """(3, N) voxel indices: all voxels, or a fixed random subset of ``n`` (sorted, for cache order)."""
    total = int(np.prod(shape))
    flat = np.arange(total) if total <= n else np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    return np.stack(np.unravel_index(flat, shape)).astype(np.float64)

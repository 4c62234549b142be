"""Batched rigid / affine alignment of moving scans to fixed ones, in PyTorch.

The same code runs on the CPU and on CUDA (pick ``device``). For a batch of B
(moving, fixed) pairs it optimises B independent world-space transforms at
once: each scan is first resampled (with the Numba/CUDA resampler) to a
working cube of ``size`` voxels covering its field of view, a pyramid is
built by 2x average pooling, and at each level, coarsest first, the negative
global normalised cross-correlation over the overlap is minimised at a fixed
random subset of fixed voxels. All geometry is in world millimetres, so
anisotropic spacing and oblique headers are handled.

Optimisers (``AlignConfig.optimizer``): ``gauss-newton`` (the default),
Levenberg-Marquardt with the analytic Jacobian, a few iterations per level
and early stopping per pair (:mod:`medfeat.kernels.align_newton`); ``adam``,
the former first-order optimiser (a fixed number of Adam steps per level on
the autograd gradient of ``grid_sample``), kept to reproduce earlier results.

Returned transforms are 4x4 (float64, world mm -> world mm) in the
resampler's pull convention: they map a point of the *fixed* scan's world to
the corresponding point of the *moving* scan's world, i.e. pass them as
``transform=`` to :func:`medfeat.kernels.geometry.resample_world` to bring the
moving scan onto the fixed grid. For the synthetic cohort
(``followup_world = T @ baseline_world``), aligning follow-up (moving) to
baseline (fixed) recovers ``T``.

Parameters: 'rigid' has 6 (rotation about the fixed scan's centre,
translation in mm); 'affine' has 12 (a 3x3 linear part about the same
centre, initialised from the rigid solution, plus translation).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfeat.errors import InputError
from medfeat.kernels import _checks
from medfeat.kernels.align_newton import Level, gradient_stack, level_points, rotvec_to_matrix, solve_level
from medfeat.kernels.geometry import Grid, fov_grid, resample_world


@dataclass(frozen=True)
class AlignConfig:
    """Optimiser settings; ``iterations`` per pyramid level, coarsest first.

    ``gauss-newton`` reads ``iterations`` as the most evaluations a pair may
    take at a level (most stop far earlier, at ``tolerance``: their last step
    moved no point of the field of view by more than that many voxels of the
    level); ``adam`` takes exactly that many steps with the ``lr_*`` rates.
    ``samples``: fixed voxels sampled per level (all of a smaller level).
    """

    size: int = 64
    levels: int = 3
    iterations: tuple[int, ...] = (60, 40, 25)
    lr_rotation: float = 0.02  # adam: radians per step
    lr_translation: float = 0.5  # adam: in units of the working voxel size (mm / voxel)
    lr_linear: float = 0.005  # adam: affine linear part, per step
    samples: int = 16384  # fixed voxels sampled per level
    optimizer: str = "gauss-newton"  # or 'adam'
    tolerance: float = 0.05  # gauss-newton: stopping step, in voxels of the level


def _torch() -> Any:
    import torch

    return torch


def _index_to_norm(shape: tuple[int, int, int]) -> np.ndarray:
    """4x4 map from voxel index (i, j, k) to grid_sample's (x, y, z) in [-1, 1] (align_corners=True)."""
    p = np.zeros((4, 4))
    for row, axis in enumerate((2, 1, 0)):
        n = shape[axis]
        p[row, axis] = 2.0 / (n - 1) if n > 1 else 0.0
        p[row, 3] = -1.0
    p[3, 3] = 1.0
    return p


def _pool_affine(affine: np.ndarray) -> np.ndarray:
    """Affine of a 2x average-pooled grid: coarse index o sits at fine index 2o + 0.5."""
    s = np.eye(4)
    s[:3, :3] *= 2.0
    s[:3, 3] = 0.5
    return affine @ s


def _working(side: str, volumes: Sequence[Any], affines: Sequence[Any], size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Resample each scan to a size^3 cube over its own field of view; z-score it.

    ``side`` ('moving' or 'fixed') names the item in errors: NaN/Inf voxels,
    a singular or non-finite affine, or a constant scan (no contrast, so no
    correlation to maximise: aligning it would silently return the identity).
    """
    cubes, grids = [], []
    for i, (v, a) in enumerate(zip(volumes, affines)):
        _checks.check_volume(f"{side}[{i}]", v, (3,))
        a = _checks.check_affine4(f"{side}_affines[{i}]", a)
        g = fov_grid(v.shape, a, (size,) * 3)
        c = resample_world(v, a, g, order=1, mode="nearest")
        c = c.get() if hasattr(c, "get") else c
        if not float(c.std()) > 0.0:
            raise InputError(f"{side}[{i}]: constant image (no contrast to align on)")
        c = (c - c.mean()) / (c.std() + 1e-8)
        cubes.append(c.astype(np.float32))
        grids.append(g.affine)
    return np.stack(cubes), grids


def _ncc(fixed: Any, warped: Any, weight: Any) -> Any:
    """Overlap-weighted global NCC per batch item: (B,) tensor."""
    dims = tuple(range(1, fixed.dim()))
    wsum = weight.sum(dims) + 1e-6
    mf = (weight * fixed).sum(dims) / wsum
    mw = (weight * warped).sum(dims) / wsum
    f = fixed - mf.view(-1, *[1] * len(dims))
    w = warped - mw.view(-1, *[1] * len(dims))
    cov = (weight * f * w).sum(dims)
    var = (weight * f * f).sum(dims) * (weight * w * w).sum(dims)
    return cov / _torch().sqrt(var + 1e-12)


class _Params:
    """World transforms T_b = [L_b, c_b - L_b c_b + t_b] about the fixed centres c_b."""

    def __init__(self, centres: np.ndarray, kind: str, device: Any, init: np.ndarray | None) -> None:
        torch = _torch()
        b = centres.shape[0]
        self.kind = kind
        self.c = torch.tensor(centres, dtype=torch.float64, device=device)
        self.rot = torch.zeros(b, 3, dtype=torch.float64, device=device, requires_grad=True)
        self.lin = torch.zeros(b, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
        self.t = torch.zeros(b, 3, dtype=torch.float64, device=device, requires_grad=True)
        self.base = torch.eye(3, dtype=torch.float64, device=device).repeat(b, 1, 1)
        if init is not None:
            with torch.no_grad():
                self.base = torch.tensor(init[:, :3, :3], dtype=torch.float64, device=device)
                lin = self.base
                self.t += torch.tensor(init[:, :3, 3], device=device) - (self.c - (lin @ self.c[..., None])[..., 0])

    def matrix(self) -> Any:
        torch = _torch()
        lin = rotvec_to_matrix(self.rot) @ self.base if self.kind == "rigid" else self.base + self.lin
        trans = self.c - (lin @ self.c[..., None])[..., 0] + self.t
        b = lin.shape[0]
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=lin.dtype, device=lin.device).expand(b, 1, 4)
        return torch.cat([torch.cat([lin, trans[..., None]], dim=2), bottom], dim=1)


def _sample_points(shape: tuple[int, int, int], n: int, seed: int) -> np.ndarray:
    """(4, N) homogeneous voxel indices: all voxels, or a fixed random subset of ``n``."""
    idx = level_points(shape, n, seed)
    return np.vstack([idx, np.ones((1, idx.shape[1]))])


def _run_level(fix: Any, mov: Any, a_fix: list, a_mov: list, params: _Params, iters: int, cfg: AlignConfig, spacing: float, level: int) -> None:
    """Adam on the similarity at one pyramid level, over a fixed random subset of fixed voxels.

    Sampling a subset (as ITK's registration does) keeps every iteration at
    ``cfg.samples`` points whatever the level's size; the learning rates
    scale with the level's voxel size and decay linearly to 10 % within the
    level, so the last steps settle instead of oscillating around the optimum.
    """
    torch = _torch()
    b = fix.shape[0]
    shape = tuple(fix.shape[2:])
    pts_np = _sample_points(shape, cfg.samples, seed=level)
    flat = torch.from_numpy(np.ravel_multi_index(pts_np[:3].astype(np.int64), shape)).to(fix.device)
    fixed_vals = fix.reshape(b, -1)[:, flat]
    pts = torch.tensor(pts_np, device=fix.device)
    # moving voxel index -> grid_sample's normalised (x, y, z), per item
    left = torch.tensor(np.stack([_index_to_norm(tuple(mov.shape[2:])) @ np.linalg.inv(a) for a in a_mov]), device=fix.device)
    right = torch.tensor(np.stack(a_fix), device=fix.device)
    lr_t = cfg.lr_translation * spacing
    lr_r = cfg.lr_rotation * (2.0 ** (cfg.levels - 1 - level)) / 2.0 ** (cfg.levels - 1)
    groups = [{"params": [params.t], "lr": lr_t}]
    groups.append({"params": [params.rot], "lr": lr_r} if params.kind == "rigid" else {"params": [params.lin], "lr": cfg.lr_linear})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - 0.9 * k / max(iters, 1))
    both = torch.cat([mov, torch.ones_like(mov)], dim=1)
    weight_fixed = torch.ones_like(fixed_vals)
    for _ in range(iters):
        opt.zero_grad()
        q = (left @ params.matrix() @ right @ pts)[:, :3, :]  # (B, 3, N) normalised moving coords
        grid = q.transpose(1, 2).reshape(b, -1, 1, 1, 3).to(fix.dtype)
        out = torch.nn.functional.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out = out.reshape(b, 2, -1)
        loss = -_ncc(fixed_vals, out[:, 0], out[:, 1] * weight_fixed).sum()
        loss.backward()
        opt.step()
        sched.step()


def align(
    moving: Sequence[Any],
    fixed: Sequence[Any],
    moving_affines: Sequence[Any],
    fixed_affines: Sequence[Any],
    *,
    kind: str = "rigid",
    device: str | None = None,
    config: AlignConfig = AlignConfig(),
) -> np.ndarray:
    """Align B moving scans to B fixed scans; returns (B, 4, 4) fixed-world -> moving-world transforms.

    ``moving``/``fixed`` are (D, H, W) arrays (numpy or cupy, any shape each)
    with their 4x4 voxel -> world (mm) affines. ``device`` is a torch device
    ('cpu', 'cuda'); default: CUDA when the inputs are cupy arrays.
    """
    torch = _torch()
    if kind not in ("rigid", "affine"):
        raise InputError(f"kind: expected 'rigid' or 'affine', got {kind!r}")
    b = len(moving)
    if not (len(fixed) == len(moving_affines) == len(fixed_affines) == b) or b == 0:
        raise InputError("moving/fixed: need the same positive number of scans and affines on both sides")
    if device is None:
        device = "cpu" if _checks.array_module(moving[0]) is np else "cuda"
    cfg = config
    if len(cfg.iterations) != cfg.levels:
        raise InputError(f"config.iterations: need one count per level ({cfg.levels}), got {cfg.iterations}")
    if cfg.optimizer not in ("gauss-newton", "adam"):
        raise InputError(f"config.optimizer: expected 'gauss-newton' or 'adam', got {cfg.optimizer!r}")
    mov_np, a_mov = _working("moving", moving, moving_affines, cfg.size)
    fix_np, a_fix = _working("fixed", fixed, fixed_affines, cfg.size)
    centres = np.stack([Grid((cfg.size,) * 3, a).world_corners().mean(axis=0) for a in a_fix])
    mov = torch.from_numpy(mov_np)[:, None].to(device)
    fix = torch.from_numpy(fix_np)[:, None].to(device)
    pyramid = [(fix, mov, a_fix, a_mov)]
    for _ in range(cfg.levels - 1):
        f, m, af, am = pyramid[-1]
        pool = torch.nn.functional.avg_pool3d
        pyramid.append((pool(f, 2), pool(m, 2), [_pool_affine(a) for a in af], [_pool_affine(a) for a in am]))
    pyramid = pyramid[::-1]
    spacings = np.array([Grid((cfg.size,) * 3, a).spacing.mean() for a in a_fix])  # (B,) mm, working cubes
    if cfg.optimizer == "gauss-newton":
        return _newton(pyramid, centres, kind, cfg, spacings)
    return _adam(pyramid, centres, kind, cfg, float(spacings.mean()), device)


def _adam(pyramid: list, centres: np.ndarray, kind: str, cfg: AlignConfig, spacing: float, device: Any) -> np.ndarray:
    """The former optimiser: fixed Adam steps per level (rigid), then the affine refinement."""
    params = _Params(centres, "rigid", device, None)
    for level, (f, m, af, am) in enumerate(pyramid):
        scale = 2.0 ** (cfg.levels - 1 - level)
        _run_level(f, m, af, am, params, cfg.iterations[level], cfg, spacing * scale, level)
    result = params.matrix().detach().cpu().numpy()
    if kind == "affine":
        params = _Params(centres, "affine", device, result)
        for level, (f, m, af, am) in enumerate(pyramid[1:], start=1):
            scale = 2.0 ** (cfg.levels - 1 - level)
            _run_level(f, m, af, am, params, cfg.iterations[level], cfg, spacing * scale, level)
        result = params.matrix().detach().cpu().numpy()
    return result


def _newton_level(fix: Any, mov: Any, a_fix: list, a_mov: list, centres: np.ndarray, cfg: AlignConfig, voxel: np.ndarray, level: int) -> Level:
    """The solver's view of one level: sampled fixed voxels about the centres (mm), moving image + gradient."""
    torch = _torch()
    b, dev = fix.shape[0], fix.device
    shape = tuple(fix.shape[2:])
    idx = level_points(shape, cfg.samples, seed=level)
    flat = torch.from_numpy(np.ravel_multi_index(idx.astype(np.int64), shape)).to(dev)
    about = np.stack([a[:3, :3] @ idx + (a[:3, 3] - c)[:, None] for a, c in zip(a_fix, centres)])  # (B, 3, N)
    radius = np.linalg.norm(about, axis=1).max(axis=1)
    to_index = np.stack([np.linalg.inv(a) for a in a_mov])
    to_grid = np.stack([_index_to_norm(tuple(mov.shape[2:]))[:3] @ m for m in to_index])
    return Level(gradient_stack(mov), fix.reshape(b, -1)[:, flat], torch.from_numpy(about).to(dev, torch.float32),
                 torch.tensor(centres, device=dev), torch.tensor(to_grid, device=dev),
                 torch.tensor(to_index[:, :3, :3], device=dev), torch.tensor(radius, device=dev),
                 torch.tensor(voxel, dtype=torch.float64, device=dev))


def _newton(pyramid: list, centres: np.ndarray, kind: str, cfg: AlignConfig, spacings: np.ndarray) -> np.ndarray:
    """Rigid Levenberg-Marquardt over all levels, then (affine) the linear part refined on the finer ones.

    The transform starts at the identity (world to world), as the former optimiser's did.
    """
    torch = _torch()
    dev = pyramid[0][0].device
    b = centres.shape[0]
    lin = torch.eye(3, dtype=torch.float64, device=dev).repeat(b, 1, 1)
    t = torch.zeros(b, 3, dtype=torch.float64, device=dev)
    levels = [_newton_level(f, m, af, am, centres, cfg, spacings * 2.0 ** (cfg.levels - 1 - k), k)
              for k, (f, m, af, am) in enumerate(pyramid)]
    for k, lv in enumerate(levels):
        lin, t, _ = solve_level(lv, lin, t, "rigid", cfg.iterations[k], cfg.tolerance)
    if kind == "affine":
        for k, lv in enumerate(levels[1:], start=1):
            lin, t, _ = solve_level(lv, lin, t, "affine", cfg.iterations[k], cfg.tolerance)
    lin_np = lin.cpu().numpy()
    out = np.tile(np.eye(4), (b, 1, 1))
    out[:, :3, :3] = lin_np
    out[:, :3, 3] = centres - (lin_np @ centres[..., None])[..., 0] + t.cpu().numpy()
    return out

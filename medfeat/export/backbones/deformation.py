"""Features of a registration map: displacement and the Jacobian determinant (tensor-based morphometry).

A map is a (B, 3, D, H, W) tensor of positions in [0, 1]^3 on a regular grid, channel ``d``
indexing spatial axis ``d`` (the convention of :mod:`medfeat.export.backbones.models.unigradicon_net`):
voxel ``i`` of an axis of ``n`` voxels sits at ``i / (n - 1)``. For a map ``phi`` from the fixed
(reference) grid into the moving image, ``det(d phi / d x) > 1`` where a region of the fixed
image corresponds to a larger region of the moving one (the moving scan has grown there) and
``< 1`` where it has shrunk; ``<= 0`` marks a fold.

Derivatives are finite differences in grid voxels, as :func:`numpy.gradient` takes them
(central inside, one-sided on the first and last voxel of each axis). The determinant does not
depend on the voxel spacing (scaling an axis of both grids scales a row and a column of the
Jacobian by inverse factors), so it is the same in voxels and in mm.
"""
from __future__ import annotations

import torch

# log-Jacobians are taken of max(det, LOGJAC_FLOOR): a fold (det <= 0) has no logarithm, so it
# counts as a very strong local compression (log(1e-3) = -6.9); folds are reported apart.
LOGJAC_FLOOR = 1e-3


def _check_map(phi: torch.Tensor) -> None:
    if phi.ndim != 5 or phi.shape[1] != 3 or min(phi.shape[2:]) < 2:
        raise ValueError(f"a map is (B, 3, D, H, W) with every size >= 2, got {tuple(phi.shape)}")


def to_voxels(phi: torch.Tensor) -> torch.Tensor:
    """Positions in [0, 1] units -> grid voxel units (channel ``d`` times ``n_d - 1``)."""
    _check_map(phi)
    scale = torch.tensor([n - 1.0 for n in phi.shape[2:]], dtype=phi.dtype, device=phi.device)
    return phi * scale.view(1, 3, 1, 1, 1)


def identity_voxels(size: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32,
                    device: torch.device | None = None) -> torch.Tensor:
    """The identity map in voxel units, (1, 3, *size): channel ``d`` holds the index along axis ``d``."""
    axes = [torch.arange(n, dtype=dtype, device=device) for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


def displacement_voxels(phi: torch.Tensor) -> torch.Tensor:
    """Displacement ``phi(x) - x`` in grid voxels, (B, 3, D, H, W)."""
    vox = to_voxels(phi)
    return vox - identity_voxels(phi.shape[2:], vox.dtype, vox.device)


def _diff(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``numpy.gradient(x, axis=dim)`` with unit spacing and first-order edges."""
    n = x.shape[dim]
    first = x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1)
    inner = (x.narrow(dim, 2, n - 2) - x.narrow(dim, 0, n - 2)) * 0.5
    last = x.narrow(dim, n - 1, 1) - x.narrow(dim, n - 2, 1)
    return torch.cat([first, inner, last], dim=dim)


def jacobian(phi: torch.Tensor) -> torch.Tensor:
    """The Jacobian ``J[..., i, j] = d phi_i / d x_j`` in voxel units, (B, D, H, W, 3, 3)."""
    vox = to_voxels(phi)
    cols = [_diff(vox, 2 + j) for j in range(3)]  # each (B, 3, D, H, W): d phi / d x_j
    return torch.stack(cols, dim=-1).permute(0, 2, 3, 4, 1, 5)


def jacobian_determinant(phi: torch.Tensor) -> torch.Tensor:
    """``det(d phi / d x)`` per voxel, (B, 1, D, H, W); computed in float32 or wider.

    The 3x3 determinant is expanded by hand (cofactors of the first row), which exports to
    ONNX and costs a fraction of ``torch.linalg.det`` on millions of tiny matrices.
    """
    wide = phi if phi.dtype in (torch.float32, torch.float64) else phi.float()
    j = jacobian(wide)
    det = (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
           - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
           + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))
    return det.unsqueeze(1)


def log_jacobian(phi: torch.Tensor, floor: float = LOGJAC_FLOOR) -> torch.Tensor:
    """``log(max(det, floor))`` per voxel, (B, 1, D, H, W), in ``phi``'s dtype."""
    det = jacobian_determinant(phi)
    return torch.log(torch.clamp(det, min=floor)).to(phi.dtype)


def folded_fraction(phi: torch.Tensor) -> torch.Tensor:
    """Fraction of voxels with ``det <= 0`` per map, (B,)."""
    return (jacobian_determinant(phi) <= 0).flatten(1).float().mean(1)

"""The GradICON objective and uniGradICON's training augmentation, for the medfeat cascade.

Written from the papers (Tian et al., GradICON, CVPR 2023; uniGradICON, MICCAI 2024) and the
defaults of their public code (``icon_registration.losses.GradientICONSparse`` as
``unigradicon.make_network`` builds it: LNCC with sigma 5 voxels at 175^3, lambda 1.5):

    L = sim(I_A o phi_AB, I_B) + sim(I_B o phi_BA, I_A) + lambda * L_gradicon

where ``phi_AB = net(moving=A, fixed=B)`` maps the fixed grid into the moving image, warped
images are sampled trilinearly with zeros outside, and

    L_gradicon = sum_d mean_x | (e(x) - e(x + delta e_d)) / delta |^2,   e(x) = x - phi_AB(phi_BA(x))

is the squared Frobenius norm of the Jacobian of the inverse-consistency error, by finite
differences (``delta`` = 0.001 in [0, 1] units), at the identity grid jittered by 2 / n
voxels' worth of Gaussian noise and subsampled by 2 per axis (the "sparse" variant).
Composed transforms are evaluated through each stage's displacement field, as upstream does.

Augmentation: each pair gets one random signed axis permutation (both images), then each
image its own affine noise (0.05 x N(0, 1) on the 3 x 4 matrix in normalised coordinates),
resampled with border padding.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from medfeat.errors import UnknownNameError
from medfeat.export.backbones.models.unigradicon_net import warp

SIMILARITIES = ("lncc", "ncc", "mse")
Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DELTA = 0.001  # finite-difference step of the GradICON penalty, [0, 1] units


def transform_points(displacements: Sequence[torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
    """``phi(coords)`` for ``phi = psi_1 o ... o psi_n``, ``psi_i(x) = x + u_i(x)``; coords (B or 1, 3, *out).

    Unlike :func:`~medfeat.export.backbones.models.unigradicon_net.compose` this never takes
    the identity-grid shortcut: ``coords`` may be any points.
    """
    for disp in reversed(displacements):
        coords = coords + warp(disp, coords)
    return coords


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, D, H, W), window ``2 * ceil(2 sigma) + 1``, zero padded.

    Each axis is a product with a banded (n, n) matrix: on the CPU a matrix product runs
    several times faster than a depthwise ``conv3d``, forward and backward.
    """
    half = math.ceil(2 * sigma)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    for dim in range(3):
        x = torch.movedim(torch.movedim(x, 2 + dim, -1) @ _band(kernel, x.shape[2 + dim]).to(x), -1, 2 + dim)
    return x


def _band(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) matrix ``B`` with ``(x @ B)[i] = sum_k kernel[k] x[i + k - half]`` (zeros outside)."""
    half = (kernel.numel() - 1) // 2
    offset = torch.arange(n)[:, None] - torch.arange(n)[None, :] + half  # row: source j, column: target i
    inside = (offset >= 0) & (offset < kernel.numel())
    return torch.where(inside, kernel[offset.clamp(0, kernel.numel() - 1)], torch.zeros(()))


def lncc_loss(sigma: float) -> Similarity:
    """1 - mean local normalised cross-correlation in Gaussian windows of ``sigma`` voxels."""
    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mean_a, mean_b = gaussian_blur(a, sigma), gaussian_blur(b, sigma)
        cov = gaussian_blur(a * b, sigma) - mean_a * mean_b
        var_a = torch.relu(gaussian_blur(a * a, sigma) - mean_a ** 2)
        var_b = torch.relu(gaussian_blur(b * b, sigma) - mean_b ** 2)
        return 1 - torch.mean(cov / torch.sqrt((var_a + 1e-5) * (var_b + 1e-5)))
    return loss


def ncc_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - global normalised cross-correlation, per image, averaged over the batch."""
    def standardise(x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=(2, 3, 4), keepdim=True)
        return centred / torch.sqrt(torch.mean(centred ** 2, dim=(2, 3, 4), keepdim=True) + 1e-12)
    return 1 - torch.mean(standardise(a) * standardise(b))


def mse_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mean((a - b) ** 2)


def make_similarity(name: str, sigma: float) -> Similarity:
    """The similarity loss ``name`` (lower is better); ``sigma`` is LNCC's window in voxels."""
    if name == "lncc":
        return lncc_loss(sigma)
    if name == "ncc":
        return ncc_loss
    if name == "mse":
        return mse_loss
    raise UnknownNameError(f"similarity {name!r} is not one of {', '.join(SIMILARITIES)}")


def gradicon_penalty(disps_ab: Sequence[torch.Tensor], disps_ba: Sequence[torch.Tensor],
                     identity: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The gradient-inverse-consistency penalty ``L_gradicon`` (see the module docstring)."""
    noise = torch.randn(identity.shape, generator=generator).to(identity)
    points = (identity + 2 * noise / identity.shape[-1])[:, :, ::2, ::2, ::2]
    error = points - transform_points(disps_ab, transform_points(disps_ba, points))
    total = torch.zeros((), dtype=identity.dtype, device=identity.device)
    for d in range(3):
        step = torch.zeros(1, 3, 1, 1, 1, dtype=identity.dtype, device=identity.device)
        step[0, d] = DELTA
        moved = points + step
        error_d = moved - transform_points(disps_ab, transform_points(disps_ba, moved))
        total = total + torch.mean(((error - error_d) / DELTA) ** 2)
    return total


def signed_permutation(generator: torch.Generator) -> torch.Tensor:
    """A random 3 x 3 matrix with one +-1 per row and column (axis permutation and flips)."""
    perm = torch.randperm(3, generator=generator)
    signs = torch.randint(0, 2, (3,), generator=generator).float() * 2 - 1
    out = torch.zeros(3, 3)
    out[torch.arange(3), perm] = signs
    return out


def augment_pair(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator,
                 noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """uniGradICON's augmentation of a batch of pairs (B, 1, D, H, W) each (see the module docstring)."""
    batch = a.shape[0]
    flips = torch.stack([signed_permutation(generator) for _ in range(batch)])
    base = torch.cat([flips, torch.zeros(batch, 3, 1)], dim=2)
    out = []
    for image in (a, b):
        theta = (base + noise * torch.randn(batch, 3, 4, generator=generator)).to(image)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        out.append(F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False))
    return out[0], out[1]

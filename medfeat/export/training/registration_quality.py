"""Registration quality of a trained cascade on held-out pairs.

For each pair (moving, fixed), both resized to the training grid of ``size``^3 voxels:

* the similarity loss before (identity) and after registration, and the global NCC;
* the fraction of folded voxels (Jacobian determinant <= 0) of the map;
* the inverse-consistency error ``|phi_AB(phi_BA(x)) - x|`` on the grid, in voxels;
* on cohorts with a recorded ``transform`` (``followup_world = T @ baseline_world``, the
  synthetic cohort), the rigid transform recovered from the map against ``T``: the map's
  correspondences inside the fixed scan's foreground are taken to world mm through both scans'
  headers, a rigid transform is fitted to them (least squares, Kabsch), and its error is the
  mean distance ``|T_hat x - T x|`` over the same points, in mm. The identity map (no
  registration) gets the same treatment: the network must beat it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from medfeat.export.backbones.deformation import folded_fraction
from medfeat.export.backbones.models.unigradicon_net import UniGradICONNet, compose, identity_grid, warp
from medfeat.export.training.gradicon_loss import Similarity, ncc_loss, transform_points

# Fixed-image voxels brighter than this (intensities in [0, 1]) and away from the border
# are the foreground the rigid fit uses: air carries no correspondence.
FOREGROUND = 0.1
BORDER = 0.1


@dataclass(frozen=True)
class ScanGeometry:
    """Where a scan's voxels are: header affine (voxel -> world mm) and array shape."""

    affine: np.ndarray
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class HeldOutPair:
    """Indices of a held-out pair into the loaded scans, and ``T`` when recorded."""

    subject: str
    kind: str  # "intra" (a subject's follow-up to its baseline) or "inter"
    moving: int
    fixed: int
    transform: np.ndarray | None = None  # followup_world = T @ baseline_world


@dataclass(frozen=True)
class PairQuality:
    """Quality numbers of one held-out pair (see the module docstring)."""

    subject: str
    kind: str
    similarity_before: float
    similarity_after: float
    ncc_before: float
    ncc_after: float
    folded_fraction: float
    inverse_consistency_vox: float
    rigid_error_mm: float | None = None
    identity_error_mm: float | None = None


def model_to_world(points: np.ndarray, geometry: ScanGeometry, size: int) -> np.ndarray:
    """(N, 3) positions on the resized ``size``^3 grid (voxels) -> world mm of the scan.

    The resize is ``F.interpolate(..., align_corners=False)``: grid voxel ``u`` samples scan
    voxel ``(u + 0.5) * n / size - 0.5`` along an axis of ``n`` voxels.
    """
    scale = np.asarray(geometry.shape, np.float64) / size
    scan = (points + 0.5) * scale - 0.5
    return scan @ geometry.affine[:3, :3].T + geometry.affine[:3, 3]


def fit_rigid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The rigid (4, 4) ``M`` minimising ``sum |M x - y|^2`` over (N, 3) point pairs (Kabsch)."""
    cx, cy = x.mean(0), y.mean(0)
    u, _, vt = np.linalg.svd((x - cx).T @ (y - cy))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rot, cy - rot @ cx
    return out


def rigid_error_mm(phi: np.ndarray, fixed_image: np.ndarray, fixed: ScanGeometry, moving: ScanGeometry,
                   transform: np.ndarray, size: int) -> float:
    """Mean ``|T_hat x - T x|`` (mm) over the fixed foreground, ``T_hat`` fitted to the map.

    ``phi`` is one map (3, S, S, S) in [0, 1] units on the fixed grid; ``fixed_image`` (S, S, S).
    """
    idx = np.indices(phi.shape[1:]).reshape(3, -1).T.astype(np.float64)
    inner = np.all((idx >= BORDER * (size - 1)) & (idx <= (1 - BORDER) * (size - 1)), axis=1)
    keep = inner & (fixed_image.reshape(-1) > FOREGROUND)
    if keep.sum() < 10:
        return float("nan")
    x = model_to_world(idx[keep], fixed, size)
    y = model_to_world(phi.reshape(3, -1).T[keep].astype(np.float64) * (size - 1), moving, size)
    fitted = fit_rigid(x, y)
    truth = x @ transform[:3, :3].T + transform[:3, 3]
    return float(np.linalg.norm(x @ fitted[:3, :3].T + fitted[:3, 3] - truth, axis=1).mean())


@torch.no_grad()
def pair_quality(model: UniGradICONNet, scans: torch.Tensor, pair: HeldOutPair, stages: str,
                 similarity: Similarity, geometry: Sequence[ScanGeometry]) -> PairQuality:
    """Quality of one pair; ``scans`` (N, 1, S, S, S) in [0, 1], ``model`` in eval mode."""
    moving, fixed = scans[pair.moving:pair.moving + 1], scans[pair.fixed:pair.fixed + 1]
    size = int(scans.shape[-1])
    identity = identity_grid(scans.shape[2:], scans.device, scans.dtype)
    disps_ab = model.displacements(moving, fixed, stages)
    disps_ba = model.displacements(fixed, moving, stages)
    phi_ab = compose(disps_ab, identity)
    warped = warp(moving, phi_ab, "zeros")
    round_trip = transform_points(disps_ab, transform_points(disps_ba, identity))
    ic = ((round_trip - identity) * (size - 1)).norm(dim=1).mean()
    rigid = ident = None
    if pair.transform is not None:
        args = (fixed[0, 0].numpy(), geometry[pair.fixed], geometry[pair.moving], pair.transform, size)
        rigid = rigid_error_mm(phi_ab[0].double().numpy(), *args)
        ident = rigid_error_mm(identity[0].double().numpy(), *args)
    return PairQuality(pair.subject, pair.kind, float(similarity(moving, fixed)), float(similarity(warped, fixed)),
                       1 - float(ncc_loss(moving, fixed)), 1 - float(ncc_loss(warped, fixed)),
                       float(folded_fraction(phi_ab)[0]), float(ic), rigid, ident)


def summarise(pairs: Sequence[PairQuality], similarity: str) -> dict:
    """Means per pair kind (intra, inter) and the rigid-recovery verdict, JSON-ready."""
    out: dict = {"similarity": similarity, "pairs": [asdict(p) for p in pairs]}
    for kind in ("intra", "inter"):
        group = [p for p in pairs if p.kind == kind]
        if not group:
            continue
        mean = {name: round(float(np.mean([getattr(p, name) for p in group])), 6)
                for name in ("similarity_before", "similarity_after", "ncc_before", "ncc_after",
                             "folded_fraction", "inverse_consistency_vox")}
        out[kind] = {"n": len(group), **mean}
    rigid = [p for p in pairs if p.rigid_error_mm is not None and np.isfinite(p.rigid_error_mm)]
    if rigid:
        net = float(np.mean([p.rigid_error_mm for p in rigid]))
        ident = float(np.mean([p.identity_error_mm for p in rigid]))
        out["rigid_recovery"] = {"n": len(rigid), "error_mm": round(net, 4), "identity_error_mm": round(ident, 4),
                                 "beats_identity": net < ident}
    else:
        out["rigid_recovery"] = None  # no recorded transform in this cohort
    return out

"""Pooling of raw tap outputs into one vector per item.

Maps (B, C, *spatial): ``avg``, ``max``, ``avgmax`` (concatenated, 2C), and ``grid2``: the
mean over each cell of a 2 x 2 (x 2) grid, C * 2^ndim values that keep coarse position, so
that features of aligned scans correspond cell by cell.
Tokens (B, N, C) with ``prefix`` leading non-patch tokens: ``cls`` (token 0), ``mean``
(mean of patch tokens), ``cls+mean`` (2C), ``token1`` (token index 1).
Vectors (B, C): ``none``.
"""
from __future__ import annotations

import torch

from medfeat.errors import UnknownNameError

MAP_POOLINGS = ("avg", "max", "avgmax", "grid2")
TOKEN_POOLINGS = ("cls", "mean", "cls+mean", "token1")


POOLINGS_BY_KIND = {"map": MAP_POOLINGS + ("none",), "tokens": TOKEN_POOLINGS + ("none",), "vector": ("none",)}


def check_pooling(kind: str, method: str, where: str = "") -> None:
    """Raise UnknownNameError (before any work) for a pooling a tap of ``kind`` cannot do."""
    allowed = POOLINGS_BY_KIND.get(kind)
    if allowed is None:
        raise UnknownNameError(f"tap kind {kind!r} is not one of {', '.join(POOLINGS_BY_KIND)}")
    if method not in allowed:
        raise UnknownNameError(f"{where}pooling {method!r} is not one of {', '.join(allowed)} for a {kind} tap")


def pooled_dim(channels: int, method: str, ndim: int = 3) -> int:
    """Length of the pooled vector for a tap of ``channels`` channels over ``ndim`` spatial axes."""
    if method == "grid2":
        return channels * 2**ndim
    return 2 * channels if method in ("avgmax", "cls+mean") else channels


def pool(x: torch.Tensor, kind: str, method: str, prefix: int = 0) -> torch.Tensor:
    """Pool one raw tap output to (B, D) float.

    Parameters
    ----------
    x : (B, C, *spatial) for maps, (B, N, C) for tokens, (B, C) for vectors.
    kind : ``"map"``, ``"tokens"`` or ``"vector"``.
    method : a pooling name valid for ``kind``.
    prefix : number of leading non-patch tokens (tokens only).
    """
    if kind == "vector" or method == "none":
        return x.flatten(1)
    if kind == "map":
        flat = x.flatten(2)
        if method == "grid2" and x.dim() not in (4, 5):
            raise UnknownNameError(f"pooling grid2 needs a 2D or 3D map, got {x.dim() - 2} spatial axes")
        if method == "avg":
            return flat.mean(-1)
        if method == "max":
            return flat.amax(-1)
        if method == "avgmax":
            return torch.cat([flat.mean(-1), flat.amax(-1)], dim=1)
        if method == "grid2":
            pool_fn = (torch.nn.functional.adaptive_avg_pool2d if x.dim() == 4
                       else torch.nn.functional.adaptive_avg_pool3d)
            return pool_fn(x, 2).flatten(1)
        raise UnknownNameError(f"pooling {method!r} is not one of {MAP_POOLINGS} for a map tap")
    if kind == "tokens":
        if method == "cls":
            return x[:, 0]
        if method == "token1":
            return x[:, 1]
        patches = x[:, prefix:]
        if method == "mean":
            return patches.mean(1)
        if method == "cls+mean":
            return torch.cat([x[:, 0], patches.mean(1)], dim=1)
        raise UnknownNameError(f"pooling {method!r} is not one of {TOKEN_POOLINGS} for a token tap")
    raise UnknownNameError(f"tap kind {kind!r} is not one of map, tokens, vector")

"""Pooling of raw tap outputs into one vector per item.

Maps (B, C, *spatial): ``avg``, ``max``, ``avgmax`` (concatenated, 2C).
Tokens (B, N, C) with ``prefix`` leading non-patch tokens: ``cls`` (token 0), ``mean``
(mean of patch tokens), ``cls+mean`` (2C), ``token1`` (token index 1).
Vectors (B, C): ``none``.
"""
from __future__ import annotations

import torch

from medfeat.errors import UnknownNameError

MAP_POOLINGS = ("avg", "max", "avgmax")
TOKEN_POOLINGS = ("cls", "mean", "cls+mean", "token1")


def pooled_dim(channels: int, method: str) -> int:
    """Length of the pooled vector for a tap of ``channels`` channels."""
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
        if method == "avg":
            return flat.mean(-1)
        if method == "max":
            return flat.amax(-1)
        if method == "avgmax":
            return torch.cat([flat.mean(-1), flat.amax(-1)], dim=1)
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

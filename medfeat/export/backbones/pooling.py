"""Pooling of raw tap outputs into one vector per item.

Maps (B, C, *spatial): ``avg``, ``max``, ``avgmax`` (concatenated, 2C), and ``grid2``: the
mean over each cell of a 2 x 2 (x 2) grid, C * 2^ndim values that keep coarse position, so
that features of aligned scans correspond cell by cell; ``stats``: per channel the mean and
the 5th, 25th, 50th, 75th and 95th percentiles (6C, linear interpolation as
``numpy.percentile``), the usual summary of a log-Jacobian map in tensor-based morphometry;
``stats+grid2``: both (6C + C * 2^ndim).
Tokens (B, N, C) with ``prefix`` leading non-patch tokens: ``cls`` (token 0), ``mean``
(mean of patch tokens), ``cls+mean`` (2C), ``token1`` (token index 1).
Vectors (B, C): ``none``.
Either kind, ``tokens``: nothing pooled, every token kept, (B, N, C) (maps flattened row-major
to (B, H*W, C)): the input of token heads, stored unpooled.
``norm-`` before a token pooling (``norm-cls``, ``norm-mean``, ``norm-tokens``) applies the
model's final norm to the tap first, as DINOv2's ``get_intermediate_layers(norm=True)`` does
for its linear evaluation; the backbone applies it (:func:`split_normed`), not :func:`pool`.
"""
from __future__ import annotations

import torch

from medfeat.errors import UnknownNameError

MAP_POOLINGS = ("avg", "max", "avgmax", "grid2", "stats", "stats+grid2")
STATS_PERCENTILES = (5.0, 25.0, 50.0, 75.0, 95.0)
TOKEN_POOLINGS = ("cls", "mean", "cls+mean", "token1")
KEEP_TOKENS = "tokens"
NORMED = "norm-"


def split_normed(method: str) -> tuple[bool, str]:
    """``"norm-cls"`` -> (True, "cls"); ``"cls"`` -> (False, "cls")."""
    if method.startswith(NORMED):
        return True, method[len(NORMED):]
    return False, method


def check_pooling(tap: str, kind: str, method: str) -> None:
    """Raise :class:`UnknownNameError` unless ``method`` pools a ``kind`` tap (before any run)."""
    normed, base = split_normed(method)
    valid = {"map": MAP_POOLINGS, "tokens": TOKEN_POOLINGS, "vector": ("none",)}.get(kind, ())
    if normed and kind != "tokens":
        raise UnknownNameError(f"tap {tap}: pooling {method!r} applies a final norm to tokens; {tap} is a {kind}")
    if base not in valid + (KEEP_TOKENS,) or (kind == "vector" and base == KEEP_TOKENS):
        choices = ", ".join(valid + ((KEEP_TOKENS,) if kind != "vector" else ()))
        raise UnknownNameError(f"tap {tap}: unknown pooling {method!r} for a {kind} tap; poolings: {choices}")


def parse_pooling(text: str) -> tuple[str | None, dict[str, str]]:
    """``POOL`` or ``[POOL,]TAP=POOL,...`` -> (pooling for every other tap or None, per-tap poolings).

    E.g. ``grid2,B.phi.logjac=stats+grid2``: grid2 everywhere but the log-Jacobian tap.
    """
    default: str | None = None
    per_tap: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        tap, sep, method = part.rpartition("=")
        if not sep:
            if default is not None:
                raise UnknownNameError(f"pooling {text!r} names two default poolings ({default}, {part})")
            default = part
        elif not tap or not method:
            raise UnknownNameError(f"pooling {text!r}: {part!r} is not TAP=POOLING")
        else:
            per_tap[tap] = method
    return default, per_tap


def pooled_dim(channels: int, method: str, ndim: int = 3) -> int:
    """Length of the pooled vector for a tap of ``channels`` channels over ``ndim`` spatial axes."""
    method = split_normed(method)[1]
    if method == "grid2":
        return channels * 2**ndim
    if method == "stats":
        return channels * (1 + len(STATS_PERCENTILES))
    if method == "stats+grid2":
        return channels * (1 + len(STATS_PERCENTILES) + 2**ndim)
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
    if method == KEEP_TOKENS and kind in ("map", "tokens"):
        return x.flatten(2).transpose(1, 2) if kind == "map" else x
    if kind == "vector" or method == "none":
        return x.flatten(1)
    if kind == "map":
        flat = x.flatten(2)
        if "grid2" in method and x.dim() not in (4, 5):
            raise UnknownNameError(f"pooling {method} needs a 2D or 3D map, got {x.dim() - 2} spatial axes")
        if method == "avg":
            return flat.mean(-1)
        if method == "max":
            return flat.amax(-1)
        if method == "avgmax":
            return torch.cat([flat.mean(-1), flat.amax(-1)], dim=1)
        if method == "grid2":
            return _grid2(x)
        if method == "stats":
            return _stats(flat)
        if method == "stats+grid2":
            return torch.cat([_stats(flat), _grid2(x)], dim=1)
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


def _grid2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C * 2^ndim): the mean over each cell of a 2 x 2 (x 2) grid, as
    adaptive average pooling to 2 per axis gives it (along an odd axis the middle slice
    belongs to both halves). Written as means over the halves of each axis in turn, so the
    ONNX export works where adaptive pooling's cannot (its input size not static, e.g. after
    uniGradICON's warps)."""
    for axis in range(2, x.dim()):
        n = x.shape[axis]
        half = (n + 1) // 2  # positive operands: a traced // stays a floor in ONNX
        x = torch.cat([x.narrow(axis, 0, half).mean(axis, keepdim=True),
                       x.narrow(axis, n - half, half).mean(axis, keepdim=True)], dim=axis)
    return x.flatten(1)


def _stats(flat: torch.Tensor) -> torch.Tensor:
    """(B, C, N) -> (B, 6C): per channel the mean, then the percentiles, channel by channel.

    Percentiles interpolate linearly between order statistics, as ``numpy.percentile``; a sort
    and two gathers instead of ``torch.quantile``, so the graph exports to ONNX (TopK) and any
    N works (``torch.quantile`` takes at most 2^24 values).
    """
    n = flat.shape[-1]
    ordered = torch.sort(flat, dim=-1).values
    values = [flat.mean(-1)]
    for p in STATS_PERCENTILES:
        pos = p / 100.0 * (n - 1)
        lo, frac = int(pos), pos - int(pos)
        hi = min(lo + 1, n - 1)
        values.append(ordered[..., lo] + frac * (ordered[..., hi] - ordered[..., lo]))
    return torch.stack(values, dim=-1).flatten(1)  # (B, C, 6) -> (B, 6C)

"""SAM-Med3D image encoder: a 3D ViT-B (ViTDet-style) with windowed and global attention.

Architecture (after uni-medical/SAM-Med3D, ``segment_anything/modeling/image_encoder3D.py``,
the ``vit_b_ori`` build used by the published SAM-Med3D / SAM-Med3D-turbo checkpoints):

* patch embedding: Conv3d, kernel = stride = 16, 1 -> 768 channels; 128^3 input -> 8^3 tokens;
* absolute position embedding of shape (1, 8, 8, 8, 768), added to the token grid;
* 12 blocks (12 heads, MLP ratio 4, LayerNorm eps 1e-6), each with decomposed relative
  position biases along D, H and W, computed in upstream's broadcast form, not the textbook
  one (see :func:`rel_pos_bias`: the published weights were trained with it); blocks 2, 5, 8, 11 attend globally over the 8^3 grid, the
  others within 14^3 windows. 14 > 8, so a "windowed" block zero-pads the grid to 14^3 and
  attends over the padded window; the padded tokens take part in the softmax (upstream does
  not mask them), which we reproduce because the published weights were trained that way;
* neck: Conv3d 1x1 768 -> 384 (no bias), channel LayerNorm, Conv3d 3x3x3 384 -> 384 (no bias),
  channel LayerNorm.

Tokens stay as (B, D, H, W, C) grids; taps are ``blocks.0`` .. ``blocks.11`` (768 channels,
reduction 16, returned as maps (B, C, D, H, W)) and ``neck`` (384 channels). Parameter names
match the checkpoint's ``image_encoder.*`` keys, so a published checkpoint loads strictly.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfeat.errors import InputError, UnknownNameError
from medfeat.export.backbones.registry import converter_for, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec
from medfeat.export.backbones.weights import strip_prefix

DEFAULT_CONFIG: dict[str, Any] = dict(
    input_size=(128, 128, 128), patch_size=16, in_chans=1, embed_dim=768, depth=12, num_heads=12,
    mlp_ratio=4.0, out_chans=384, window_size=14, global_attn_indexes=(2, 5, 8, 11),
)
# 32^3 input, 8^3 patches -> 4^3 grid; window 3 forces the pad-to-window path (4 -> 6).
TINY_CONFIG: dict[str, Any] = dict(
    input_size=(32, 32, 32), patch_size=8, embed_dim=48, depth=4, num_heads=2, out_chans=24,
    window_size=3, global_attn_indexes=(1, 3),
)


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of (B, C, D, H, W) maps (eps 1e-6, as upstream)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None, None] + self.bias[:, None, None, None]


class PatchEmbed3D(nn.Module):
    """(B, C_in, D, H, W) -> (B, D/p, H/p, W/p, C) by a strided Conv3d."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class MLPBlock(nn.Module):
    """Linear -> GELU -> Linear (parameter names ``lin1``, ``lin2`` as upstream)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


def rel_pos_bias(q: torch.Tensor, tables: Sequence[torch.Tensor], grid: tuple[int, int, int]) -> torch.Tensor:
    """Decomposed relative-position attention bias, in SAM-Med3D's own (not the textbook) form.

    Parameters
    ----------
    q : (B', N, c) queries, N = s^3 in row-major (d, h, w) order.
    tables : per axis a (2 * s - 1, c) table; row ``i - j + s - 1`` embeds offset i - j.
    grid : (s, s, s), the (cubic) query and key grid.

    Returns
    -------
    (B', N, N) bias. With ``q[d, h, w]`` the query at grid position (d, h, w) and key
    position (d', h', w')::

        bias[(d, h, w), (d', h', w')] = q[d, h, w]  . Rd[d - w']
                                      + q[d, h, d'] . Rh[h - w']
                                      + q[d, h, h'] . Rw[h' - w']

    Why not the textbook ``q[d, h, w] . (Rd[d - d'] + Rh[h - h'] + Rw[w - w'])``:
    SAM-Med3D's ``add_decomposed_rel_pos`` (``image_encoder3D.py``, also in the ``medim``
    package) adds the 5-D per-axis terms ``rel_X[b, d, h, w, k]`` to the 7-D attention
    ``(B, d, h, w, d', h', w')`` as ``rel_d[:, :, :, :, None, None] + rel_h[:, :, :, None, :, None]
    + rel_w[:, :, :, None, None, :]``, which puts each term's key offset on the w' axis and its
    query w (h) axis on d' (h'). The published weights were trained with that form, so the
    features equal SAM-Med3D's only if we compute exactly it (the textbook form gives cosine
    0.986 at ``blocks.11``). It is defined for cubic grids only (broadcasting needs s_d = s_h = s_w).
    """
    b, _, c = q.shape
    if grid[1] != grid[0] or grid[2] != grid[0]:  # not set(): sizes are symbolic while exporting
        raise InputError(f"sam_med3d: the relative-position bias needs a cubic token grid, got {tuple(grid)}")
    q = q.reshape(b, *grid, c)
    terms = []
    for axis, (size, table) in enumerate(zip(grid, tables)):
        if table.shape[0] != 2 * size - 1:
            raise InputError(f"relative position table of {table.shape[0]} rows does not fit a grid of {size}")
        idx = torch.arange(size, device=q.device)
        rel = table[idx[:, None] - idx[None, :] + size - 1]  # (size_q, size_k, c)
        sub = f"bdhwc,{'dhw'[axis]}kc->bdhwk"
        terms.append(torch.einsum(sub, q, rel))  # (B', d, h, w, k)
    n = grid[0] * grid[1] * grid[2]
    # Upstream's indexing, verbatim: 5-D terms broadcast onto (B', d, h, w, d', h', w').
    bias = terms[0][:, :, :, :, None, None] + terms[1][:, :, :, None, :, None] + terms[2][:, :, :, None, None, :]
    return bias.reshape(b, n, n)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, D, H, W, C) grid with relative position biases."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # Zero-initialised as upstream (rel_pos_zero_init); the checkpoint overwrites them.
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * grid[0] - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid[1] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid[2] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        n, heads = d * h * w, self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * heads, n, c // heads).unbind(0)
        bias = rel_pos_bias(q, (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w), (d, h, w))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale = head_dim ** -0.5
        out = out.view(b, heads, d, h, w, -1).permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, c)
        return self.proj(out)


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, D, H, W, C) -> (B * nW, ws, ws, ws, C), zero-padding each axis to a multiple of ``ws``."""
    b, d, h, w, c = x.shape
    pads = [(ws - s % ws) % ws for s in (d, h, w)]
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    dp, hp, wp = d + pads[0], h + pads[1], w + pads[2]
    x = x.view(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, c), (dp, hp, wp)


def window_unpartition(windows: torch.Tensor, ws: int, padded: tuple[int, int, int],
                       size: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`, cropping the padding: -> (B, D, H, W, C)."""
    dp, hp, wp = padded
    b = windows.shape[0] // ((dp // ws) * (hp // ws) * (wp // ws))
    x = windows.view(b, dp // ws, hp // ws, wp // ws, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, : size[0], : size[1], : size[2]].contiguous()


class Block3D(nn.Module):
    """Pre-norm transformer block; ``window_size`` 0 means global attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int,
                 grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, grid if window_size == 0 else (window_size,) * 3)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            size = (x.shape[1], x.shape[2], x.shape[3])
            x, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SamMed3DEncoder(TappedModel):
    """SAM-Med3D image encoder; ``forward``: (B, 1, 128, 128, 128) -> (B, 384, 8, 8, 8) neck map."""

    def __init__(self, input_size: Sequence[int] | int = 128, patch_size: int = 16, in_chans: int = 1,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 out_chans: int = 384, window_size: int = 14,
                 global_attn_indexes: Sequence[int] = (2, 5, 8, 11)) -> None:
        super().__init__()
        size = (input_size,) * 3 if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 3 or any(s % patch_size for s in size) or len(set(size)) != 1:
            # cubic: upstream's relative-position bias is only defined on cubic grids (rel_pos_bias)
            raise ValueError(f"sam_med3d: input size {size} must be 3 equal sizes divisible by patch {patch_size}")
        self.input_size = size
        gd, gh, gw = (s // patch_size for s in size)
        grid = (gd, gh, gw)
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(embed_dim, num_heads, mlp_ratio, 0 if i in global_attn_indexes else window_size, grid)
            for i in range(depth)
        )
        self.neck: nn.Sequential | None = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def tap_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))] + (["neck"] if self.neck is not None else [])

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or tuple(x.shape[2:]) != self.input_size:
            raise InputError(f"sam_med3d: input of shape {tuple(x.shape)} is not (B, C, {self.input_size})")

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        """Raw taps: ``blocks.i`` and ``neck`` as (B, C, D/16, H/16, W/16) maps."""
        self._check(x)
        names = self.tap_names()
        unknown = [t for t in taps if t not in names]
        if unknown:
            raise UnknownNameError(f"sam_med3d: unknown or pruned tap {unknown[0]!r}; taps are: {', '.join(names)}")
        last = max(names.index(t) for t in taps)
        out: dict[str, torch.Tensor] = {}
        h = self.patch_embed(x) + self.pos_embed
        for i, block in enumerate(self.blocks[: min(last + 1, len(self.blocks))]):
            h = block(h)
            if f"blocks.{i}" in taps:
                out[f"blocks.{i}"] = h.permute(0, 4, 1, 2, 3)
        if "neck" in taps and self.neck is not None:  # a pruned neck is an unknown tap above
            out["neck"] = self.neck(h.permute(0, 4, 1, 2, 3))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.neck is None:
            raise UnknownNameError("sam_med3d: the neck was pruned; use forward_taps")
        return self.forward_taps(x, ["neck"])["neck"]

    def prune_after(self, tap: str) -> None:
        names = self.tap_names()
        if tap not in names:
            raise UnknownNameError(f"sam_med3d: unknown tap {tap!r}; taps are: {', '.join(names)}")
        if tap != "neck":
            self.blocks = self.blocks[: int(tap.split(".")[1]) + 1]
            self.neck = None


def _taps(**config: Any) -> tuple[TapSpec, ...]:
    cfg = {**DEFAULT_CONFIG, **config}
    blocks = tuple(TapSpec(f"blocks.{i}", cfg["embed_dim"], cfg["patch_size"]) for i in range(cfg["depth"]))
    return blocks + (TapSpec("neck", cfg["out_chans"], cfg["patch_size"]),)


def _build(**config: Any) -> SamMed3DEncoder:
    return SamMed3DEncoder(**{**DEFAULT_CONFIG, **config})


def _from_sam_med3d(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A full SAM-Med3D checkpoint (``image_encoder.*``, also under DDP's ``module.``)."""
    for prefix in ("image_encoder.", "module.image_encoder."):
        if any(k.startswith(prefix) for k in state):
            return strip_prefix(state, prefix)
    return None


def _from_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A bare image-encoder state dict (keys ``patch_embed.*``, ``blocks.*``, ``neck.*``)."""
    return state if "patch_embed.proj.weight" in state else None


SPEC = register_backbone(BackboneSpec(
    name="sam_med3d",
    input_kind="volume3d",
    input_size=DEFAULT_CONFIG["input_size"],
    in_channels=1,
    # SAM-Med3D normalises with torchio ZNormalization over voxels > 0.
    preprocess=Preprocess("zscore", {"foreground": "nonzero"}),
    taps=_taps(),
    taps_for=_taps,
    build=_build,
    weight_formats=("sam_med3d", "image_encoder"),
    convert_checkpoint=converter_for({"sam_med3d": _from_sam_med3d, "image_encoder": _from_encoder}, "sam_med3d"),
    tiny_config=TINY_CONFIG,
    licence="Apache-2.0 (SAM-Med3D code and weights, uni-medical/SAM-Med3D)",
    description="SAM-Med3D image encoder, 3D ViT-B/16 with windowed + global attention, neck to 384",
))

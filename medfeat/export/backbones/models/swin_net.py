"""SwinUNETR's Swin transformer encoder (MONAI's ``SwinTransformer``) in plain torch.

Written here, not imported from MONAI, so that building SwinUNETR does not run
``monai/__init__.py`` (see :mod:`.monai_blocks` for why, and how it is verified against MONAI).
Module names, parameter shapes, buffers and the order of every tensor operation are MONAI's,
so its state dicts load strictly and the outputs are equal to MONAI's bit for bit
(``tests/parity/test_parity_3d.py``).

The encoder (``swinViT``): a 2x2x2 patch embedding (``patch_embed.proj``), then four stages
``layers1`` .. ``layers4`` (each a one-element ModuleList holding the stage), stage i working
at ``embed_dim * 2**i`` channels on the grid the previous stage left and ending with a patch
merging that halves the grid and doubles the channels. A stage's blocks alternate plain and
shifted windows of ``window_size`` tokens per axis. States 0..4 (patch embedding, stages 1..4)
are ``(B, embed_dim * 2**i, D / 2**(i+1), H / 2**(i+1), W / 2**(i+1))``; with ``normalize``
each is layer-normalised over channels (no affine), as SwinUNETR's decoder sees them.

Two behaviours are kept exactly as MONAI has them because checkpoints were trained with them:
a window larger than the grid shrinks to the grid and stops shifting along that axis; and the
relative-position bias of a shrunk window of n tokens reads the top-left n x n block of the
full window's index (not the index of the smaller window).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medfeat.errors import InputError

Triple = tuple[int, int, int]


def window_grid(size: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> tuple[Triple, Triple]:
    """Window and shift for a grid of ``size`` tokens: a window no larger than the grid, and no
    shift along an axis the window covers."""
    win, sft = list(window), list(shift)
    for i, s in enumerate(size):
        if s <= window[i]:
            win[i], sft[i] = s, 0
    return (win[0], win[1], win[2]), (sft[0], sft[1], sft[2])


def partition(x: torch.Tensor, window: Triple) -> torch.Tensor:
    """(B, D, H, W, C) with D, H, W multiples of the window -> (B * windows, tokens per window, C),
    windows in row-major order of their position, tokens row-major inside each."""
    b, d, h, w, c = x.shape
    x = x.view(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).contiguous().view(-1, window[0] * window[1] * window[2], c)


def unpartition(windows: torch.Tensor, window: Triple, dims: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`partition`: windows (B * n, wd, wh, ww, C) -> (B, D, H, W, C) for
    ``dims`` = (B, D, H, W)."""
    b, d, h, w = dims
    x = windows.view(b, d // window[0], h // window[1], w // window[2], window[0], window[1], window[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous().view(b, d, h, w, -1)


def shift_mask(dims: Sequence[int], window: Triple, shift: Triple, device: torch.device) -> torch.Tensor:
    """Attention mask of shifted windows over a padded grid ``dims`` (D, H, W): tokens that
    came from different regions of the unshifted grid get -100, others 0.
    Returns (windows, tokens, tokens), float32."""
    regions = torch.zeros((1, *dims, 1), device=device)
    bands = [(slice(-win), slice(-win, -s), slice(-s, None)) for win, s in zip(window, shift)]
    for label, (sd, sh, sw) in enumerate(itertools.product(*bands)):
        regions[:, sd, sh, sw, :] = label
    labels = partition(regions, window).squeeze(-1)
    diff = labels.unsqueeze(1) - labels.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def relative_position_index(window: Triple) -> torch.Tensor:
    """(n, n) int64 index into the bias table for every query/key pair of a window of n tokens:
    the offsets along d, h, w (each shifted to be non-negative) in row-major order."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(s) for s in window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    d, h, w = (rel[..., i] + window[i] - 1 for i in range(3))
    return (d * (2 * window[1] - 1) + h) * (2 * window[2] - 1) + w


def truncated_normal_(tensor: torch.Tensor, std: float, low: float = -2.0, high: float = 2.0) -> torch.Tensor:
    """Fill with a normal(0, std) truncated to [low, high] by inverse-CDF sampling (one uniform
    draw per value, mapped through erfinv): MONAI's initialiser, so a seed gives MONAI's values."""
    def cdf(v: float) -> float:
        return (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        tensor.uniform_(2 * cdf(low / std) - 1, 2 * cdf(high / std) - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        return tensor.clamp_(min=low, max=high)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned bias per head and relative
    offset. (windows, n, C) -> (windows, n, C)."""

    relative_position_index: torch.Tensor  # a buffer (in the state dict, as in MONAI's)

    def __init__(self, dim: int, num_heads: int, window: Triple, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim, self.num_heads, self.window_size = dim, num_heads, window
        self.scale = (dim // num_heads) ** -0.5
        offsets = math.prod(2 * s - 1 for s in window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(offsets, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        truncated_normal_(self.relative_position_bias_table, std=0.02)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1).contiguous()
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(self.softmax(attn)).to(v.dtype)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """linear1 -> GELU -> linear2 (MONAI's ``MLPBlock``; one dropout module used twice)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.fn = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.drop2 = self.drop1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(self.fn(self.linear1(x)))))


class SwinBlock(nn.Module):
    """Pre-norm window attention (shifted by ``shift`` tokens when non-zero) and MLP, each with
    a residual. (B, D, H, W, C) -> same; the grid is zero-padded to whole windows inside."""

    def __init__(self, dim: int, num_heads: int, window: Triple, shift: Triple, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.window_size, self.shift_size = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.drop_path = nn.Identity()  # stochastic depth is a training option; inference has none
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x)
        b, d, h, w, c = x.shape
        window, shift = window_grid((d, h, w), self.window_size, self.shift_size)
        pad = [(win - s % win) % win for s, win in zip((d, h, w), window)]
        x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        dims = (b, *x.shape[1:4])
        shifted = any(s > 0 for s in shift)
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
        out = self.attn(partition(x, window), mask if shifted else None)
        x = unpartition(out.view(-1, *window, c), window, dims)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        if any(pad):
            x = x[:, :d, :h, :w, :].contiguous()
        return x

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_path(self._attend(x, mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2x2 neighbours concatenated (8C), layer-normalised and projected to 2C (no bias).
    (B, D, H, W, C) -> (B, ceil(D/2), ceil(H/2), ceil(W/2), 2C); odd sizes are zero-padded."""

    _CORNERS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(8 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self._CORNERS], -1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` Swin blocks (odd ones shifted by half a window) then a patch merging.
    (B, C, D, H, W) -> (B, 2C, D/2, H/2, W/2)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: Triple) -> None:
        super().__init__()
        self.window_size = window
        self.shift_size: Triple = (window[0] // 2, window[1] // 2, window[2] // 2)
        self.no_shift: Triple = (0, 0, 0)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, self.shift_size if i % 2 else self.no_shift) for i in range(depth))
        self.downsample = PatchMerging(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d, h, w = x.shape
        window, shift = window_grid((d, h, w), self.window_size, self.shift_size)
        x = x.permute(0, 2, 3, 4, 1)
        mask = None
        if any(s > 0 for s in shift):
            # ceil(s / win) * win with positive operands only: a traced shape's // becomes
            # ONNX's Div, which truncates, so -(-s // win) would round the other way there
            padded = [(s + win - 1) // win * win for s, win in zip((d, h, w), window)]
            mask = shift_mask(padded, window, shift, x.device)
        for block in self.blocks:
            x = block(x, mask)
        x = self.downsample(x.view(b, d, h, w, -1))
        return x.permute(0, 4, 1, 2, 3)


class PatchEmbed(nn.Module):
    """Non-overlapping patches (a strided convolution); the input is zero-padded at the far
    end of each axis to whole patches. (B, C, D, H, W) -> (B, embed_dim, D/p, H/p, W/p)."""

    def __init__(self, patch: Triple, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size, self.embed_dim = patch, embed_dim
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch, stride=patch)
        self.norm = None  # SwinUNETR's default: no norm after the patch embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, h, w = x.shape[2:]
        p = self.patch_size
        if w % p[2]:
            x = F.pad(x, (0, p[2] - w % p[2]))
        if h % p[1]:
            x = F.pad(x, (0, 0, 0, p[1] - h % p[1]))
        if d % p[0]:
            x = F.pad(x, (0, 0, 0, 0, 0, p[0] - d % p[0]))
        return self.proj(x)


class SwinEncoder(nn.Module):
    """SwinUNETR's ``swinViT``: patch embedding and four :class:`SwinStage` s.

    ``forward(x, normalize=True)`` returns the five states (see the module docstring);
    :meth:`states` stops after as many stages as asked.
    """

    def __init__(self, in_channels: int, embed_dim: int, window_size: Triple, depths: Sequence[int],
                 num_heads: Sequence[int], patch_size: Triple = (2, 2, 2), mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise InputError(f"SwinUNETR has four stages: got depths {tuple(depths)} and heads {tuple(num_heads)}")
        for i, heads in enumerate(num_heads):
            if (embed_dim * 2 ** i) % heads:
                raise InputError(f"SwinUNETR stage {i + 1}: {embed_dim * 2 ** i} channels do not split "
                                 f"into {heads} heads")
        self.num_layers, self.embed_dim, self.patch_norm = 4, embed_dim, False
        self.window_size, self.patch_size = window_size, patch_size
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.pos_drop = nn.Dropout(0.0)
        self.use_v2 = False
        for i in range(4):
            stage = SwinStage(embed_dim * 2 ** i, depths[i], num_heads[i], window_size)
            self.add_module(f"layers{i + 1}", nn.ModuleList([stage]))
        self.num_features = embed_dim * 2 ** 3

    @staticmethod
    def proj_out(x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Layer norm over channels of (B, C, D, H, W), no affine (identity unless ``normalize``)."""
        if not normalize:
            return x
        x = F.layer_norm(x.permute(0, 2, 3, 4, 1), [int(x.shape[1])])
        return x.permute(0, 4, 1, 2, 3)

    def states(self, x: torch.Tensor, upto: int = 4, normalize: bool = True) -> list[torch.Tensor]:
        """States 0..``upto`` of (B, C, D, H, W) ``x``, running stages 1..``upto`` only."""
        h = self.pos_drop(self.patch_embed(x))
        out = [self.proj_out(h, normalize)]
        for i in range(upto):
            h = getattr(self, f"layers{i + 1}")[0](h.contiguous())
            out.append(self.proj_out(h, normalize))
        return out

    def forward(self, x: torch.Tensor, normalize: bool = True) -> list[torch.Tensor]:
        return self.states(x, 4, normalize)

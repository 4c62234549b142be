"""Trainable heads on frozen features: an MLP on vectors, and two heads on token maps.

* :class:`MLPHead`: standardised vector -> Linear -> GELU -> dropout -> Linear.
* :class:`AttentiveHead`: an attentive-pooling probe. Learned queries cross-attend the
  tokens (after a learned position embedding over the token grid and a LayerNorm); the
  attended vectors, normalised, go through one linear layer. The position embedding is
  ours: a frozen model's tokens may carry little position, and where a finding lies can
  be what matters.
* :class:`TransformerHead`: the transfer study's head on a frozen foundation model's token
  map (joanaapa/Foundation-Medical, defaults/models.py ``Ymodel_*`` and wrappers.py): the
  tokens are projected to the head's width by Linear + LayerNorm and fed to a DeiT (a CLS
  token, position embeddings resampled bicubically to the token grid, ``depth`` blocks, the
  final norm) whose CLS token goes through a linear classifier. The study uses DeiT-B
  (width 768, depth 12, 12 heads) initialised from ImageNet DeiT-B; :func:`load_deit`
  loads such a checkpoint in timm's layout (``cls_token``, ``pos_embed``, ``blocks.N.*``,
  ``norm.*``; blocks past ``depth`` are dropped, ``patch_embed`` and ``head`` unused).

Token heads take (B, N, C) patch tokens (prefix tokens already dropped) on a (gh, gw) grid.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from medfeat.errors import InputError, WeightsError
from medfeat.export.backbones.models.vit2d import resample_pos_embed
from medfeat.export.backbones.weights import read_checkpoint, sha256_file

__all__ = ["AttentiveHead", "MLPHead", "TransformerHead", "deit_base_grid", "load_deit"]


def _init(module: nn.Module) -> None:
    """timm's ViT initialisation: truncated normal (std 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MLPHead(nn.Module):
    """(B, D) vectors -> (B, n_out) logits; ``mean``/``std`` standardise the input."""

    def __init__(self, dim: int, n_out: int, *, hidden: int = 512, dropout: float = 0.1,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.float())
        self.register_buffer("std", torch.ones(dim) if std is None else std.float())
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) / self.std)


def _heads_for(width: int, wanted: int) -> int:
    """The largest head count <= ``wanted`` that divides ``width``."""
    return max(h for h in range(1, max(1, wanted) + 1) if width % h == 0)


class AttentiveHead(nn.Module):
    """Attentive pooling: (B, N, C) tokens -> (B, n_out) logits."""

    def __init__(self, dim: int, n_out: int, n_tokens: int, *, queries: int = 1, heads: int = 8,
                 pos_embed: bool = True) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, dim)) if pos_embed else None
        self.queries = nn.Parameter(torch.zeros(1, queries, dim))
        self.norm_in = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, _heads_for(dim, heads), batch_first=True)
        self.norm_out = nn.LayerNorm(queries * dim)
        self.fc = nn.Linear(queries * dim, n_out)
        self.apply(_init)
        trunc_normal_(self.queries, std=0.02)
        if self.pos is not None:
            trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.pos is not None:
            if x.shape[1] != self.pos.shape[1]:
                raise InputError(f"attentive head built for {self.pos.shape[1]} tokens, got {x.shape[1]}")
            x = x + self.pos
        x = self.norm_in(x)
        out, _ = self.attn(self.queries.expand(len(x), -1, -1), x, x, need_weights=False)
        return self.fc(self.norm_out(out.flatten(1)))


class TransformerHead(nn.Module):
    """The study's DeiT head: (B, N, C) tokens on ``grid`` -> (B, n_out) logits.

    ``base_grid`` is the position-embedding grid (14 x 14 for a DeiT-B checkpoint at 224);
    embeddings are resampled to ``grid`` at run time.
    """

    def __init__(self, dim: int, n_out: int, grid: Sequence[int], *, width: int = 768, depth: int = 12,
                 heads: int = 12, mlp_ratio: float = 4.0, base_grid: Sequence[int] | None = None) -> None:
        super().__init__()
        if len(grid) != 2 or (base_grid is not None and len(base_grid) != 2):
            raise InputError(f"the transformer head needs a 2D token grid, got {tuple(grid)}")
        self.grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.base_grid: tuple[int, int] = (int(base_grid[0]), int(base_grid[1])) if base_grid else self.grid
        n_base = self.base_grid[0] * self.base_grid[1]
        self.proj = nn.Sequential(nn.Linear(dim, width), nn.LayerNorm(width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_base, width))
        norm = partial(nn.LayerNorm, eps=1e-6)  # DeiT's LayerNorm(eps=1e-6), as timm builds it
        self.blocks = nn.ModuleList(Block(width, _heads_for(width, heads), mlp_ratio, qkv_bias=True,
                                          norm_layer=norm)  # type: ignore[arg-type]  # timm takes any layer factory
                                    for _ in range(depth))
        self.norm = norm(width)
        self.fc = nn.Linear(width, n_out)
        self.apply(_init)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.weights_sha256: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.grid[0] * self.grid[1]:
            raise InputError(f"transformer head built for a {self.grid} grid, got {x.shape[1]} tokens")
        x = self.proj(x.float())
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + resample_pos_embed(self.pos_embed, self.grid, self.base_grid, 1)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.norm(x)[:, 0])


def load_deit(head: TransformerHead, path: str) -> TransformerHead:
    """Initialise ``head``'s CLS token, position embeddings, blocks and final norm from a
    local DeiT checkpoint in timm's layout (the first ``depth`` blocks); strict on those keys.

    The head must have been built with the checkpoint's width and ``base_grid`` equal to
    its position-embedding grid (see :func:`deit_base_grid`).
    """
    state = read_checkpoint(path)
    keep = ("cls_token", "pos_embed", "norm.weight", "norm.bias")
    depth = len(head.blocks)
    sub = {k: v for k, v in state.items()
           if k in keep or (k.startswith("blocks.") and int(k.split(".")[1]) < depth)}
    own = {k: v for k, v in head.state_dict().items() if not k.startswith(("proj.", "fc."))}
    missing = sorted(set(own) - set(sub))
    if missing:
        raise WeightsError(f"{path}: not a DeiT checkpoint in timm's layout for this head "
                           f"(missing {', '.join(missing[:4])})")
    bad = [k for k in own if tuple(sub[k].shape) != tuple(own[k].shape)]
    if bad:
        raise WeightsError(f"{path}: {bad[0]} has shape {tuple(sub[bad[0]].shape)}, the head "
                           f"{tuple(own[bad[0]].shape)} (width, depth or grid differ)")
    head.load_state_dict({**head.state_dict(), **{k: sub[k] for k in own}}, strict=True)
    head.weights_sha256 = sha256_file(path)
    return head


def deit_base_grid(path: str) -> tuple[tuple[int, int], int, int]:
    """((gh, gw), width, blocks) of a DeiT checkpoint: its position-embedding grid (square,
    one prefix token), its width and its number of blocks."""
    state = read_checkpoint(path)
    if "pos_embed" not in state:
        raise WeightsError(f"{path}: no pos_embed; not a DeiT checkpoint in timm's layout")
    n, width = int(state["pos_embed"].shape[1]) - 1, int(state["pos_embed"].shape[2])
    side = int(round(n ** 0.5))
    if side * side != n:
        raise WeightsError(f"{path}: pos_embed holds {n} patch positions, not a square grid")
    blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return (side, side), width, blocks

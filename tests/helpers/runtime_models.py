"""Tiny registered backbones for the runtime / export tests (not a test module).

Three families, each exercising what an exporter can get wrong:

* ``rt_tiny_cnn`` (image2d): convs, batch norm, avg / max / avgmax pooled maps.
* ``rt_tiny_vit`` (image2d): patch embedding, CLS token, attention via
  ``scaled_dot_product_attention``, layer norm, GELU; token taps pooled cls / mean.
* ``rt_tiny_warp`` (pair3d): a two-stage cascade like uniGradICON's: stage A predicts a
  displacement field, the moving image is warped with 5-D ``grid_sample``, stage B encodes
  (warped moving, fixed).

Registered once per process by tests/export/conftest.py, which imports this file by path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfeat.export.backbones import registry
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec


class _Staged(TappedModel):
    """Stages in order; ``forward_taps`` stops after the last requested stage."""

    order: list[str]

    def tap_names(self) -> list[str]:
        return list(self.order)

    def prune_after(self, tap: str) -> None:
        for name in self.order[self.order.index(tap) + 1:]:
            if hasattr(self, name.replace(".", "_")):
                delattr(self, name.replace(".", "_"))
        self.order = self.order[: self.order.index(tap) + 1]


class TinyCNN(_Staged):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.order = ["stem", "layer1", "layer2"]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.ReLU())
        with torch.no_grad():  # non-trivial batch-norm statistics
            self.stem[1].running_mean.uniform_(-0.2, 0.2)
            self.stem[1].running_var.uniform_(0.5, 1.5)

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.order:
            x = getattr(self, name)(x)
            out[name] = x
            if all(t in out for t in taps):
                break
        return {t: out[t] for t in taps}


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class TinyViT(TappedModel):
    def __init__(self, dim: int = 32, depth: int = 3, patch: int = 8, size: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 1 + (size // patch) ** 2, dim) * 0.1)
        self.blocks = nn.ModuleList(_Block(dim, 4) for _ in range(depth))

    def tap_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def prune_after(self, tap: str) -> None:
        keep = int(tap.split(".")[1]) + 1
        self.blocks = self.blocks[:keep]

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        out = {}
        last = max(int(t.split(".")[1]) for t in taps)
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            out[f"blocks.{i}"] = x
        return {t: out[t] for t in taps}


class TinyWarp(_Staged):
    """(B, 2, D, H, W) pair -> stage A displacement -> warp moving -> stage B encoder."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.order = ["stage_a", "stage_b.down.0", "stage_b.down.1"]
        self.stage_a = nn.Sequential(nn.Conv3d(2, width, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv3d(width, 3, 3, 1, 1))
        self.stage_b_down_0 = nn.Conv3d(2, width, 3, 2, 1)
        self.stage_b_down_1 = nn.Conv3d(width, 2 * width, 3, 2, 1)

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        disp = torch.tanh(self.stage_a(x)) * 0.2  # (B, 3, D, H, W) in normalised coordinates
        out = {"stage_a": disp}
        if set(taps) - set(out):
            eye = torch.eye(3, 4, dtype=x.dtype, device=x.device).unsqueeze(0).expand(x.shape[0], 3, 4)
            grid = F.affine_grid(eye, list(x.shape), align_corners=False) + disp.permute(0, 2, 3, 4, 1)
            warped = F.grid_sample(x[:, :1], grid, mode="bilinear", padding_mode="border", align_corners=False)
            h = F.leaky_relu(self.stage_b_down_0(torch.cat([warped, x[:, 1:]], 1)), 0.2)
            out["stage_b.down.0"] = h
            if hasattr(self, "stage_b_down_1"):
                out["stage_b.down.1"] = F.leaky_relu(self.stage_b_down_1(h), 0.2)
        return {t: out[t] for t in taps}


SPECS = [
    BackboneSpec("rt_tiny_cnn", "image2d", (32, 32), 3, Preprocess("mean_std"),
                 (TapSpec("stem", 8, 2), TapSpec("layer1", 16, 4, pooling="max"), TapSpec("layer2", 32, 4, pooling="avgmax")),
                 build=lambda **cfg: TinyCNN(**cfg)),
    BackboneSpec("rt_tiny_vit", "image2d", (32, 32), 3, Preprocess("mean_std"),
                 tuple(TapSpec(f"blocks.{i}", 32, 8, "tokens", "cls" if i % 2 else "mean", 1) for i in range(3)),
                 build=lambda **cfg: TinyViT(**cfg)),
    BackboneSpec("rt_tiny_warp", "pair3d", (12, 12, 12), 2, Preprocess("percentile_clamp"),
                 (TapSpec("stage_a", 3, 1), TapSpec("stage_b.down.0", 4, 2), TapSpec("stage_b.down.1", 8, 4, pooling="avgmax")),
                 build=lambda **cfg: TinyWarp(**cfg)),
]
for _spec in SPECS:
    if _spec.name not in registry._REGISTRY:
        registry.register_backbone(_spec)

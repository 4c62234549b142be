"""Shared pieces of the 2D backbones: grayscale input stems, tap bookkeeping, timm ViTs.

* :class:`GrayConv2d` lets a model's first convolution take a one-channel image, either
  repeated to three channels or convolved with the first input channel's weights only
  (the Palés Huix et al. study's choice), without changing the checkpoint's keys.
* :func:`tap_positions` turns requested tap names into positions in a tap table and
  rejects unknown taps with a one-line error; :func:`check_patch_multiple` rejects images
  whose sides are not multiples of the patch size.
* :func:`resample_pos_embed` resamples learned position embeddings to another patch grid
  (bicubic, no antialias, as Hugging Face's DINOv2 and BLIP's ``interpolate_pos_embed``).
* :class:`TappedViT` is timm's ``VisionTransformer`` with medfeat's tap contract: one tap
  per block (raw tokens) plus a ``norm`` tap (the final LayerNorm on the last block's
  tokens); position embeddings are resampled to the input's patch grid at run time.
* :func:`vit_taps` / :func:`strip_keys` / :func:`with_head_dropped` help the families build
  their tap tables and checkpoint converters.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medfeat.errors import InputError, UnknownNameError
from medfeat.export.backbones.spec import TappedModel, TapSpec

GRAY_MODES = ("repeat", "first_channel")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class GrayConv2d(nn.Conv2d):
    """A ``Conv2d`` that also takes one-channel input.

    Three-channel input is convolved as usual. One-channel input (B, 1, H, W) is, with
    ``gray="repeat"``, repeated to (B, 3, H, W); with ``gray="first_channel"``, convolved
    with ``weight[:, :1]`` only, i.e. the patch embedding of the image ``[x, 0, 0]``.
    The parameters and their state-dict keys are those of the replaced convolution, so
    checkpoints load unchanged.
    """

    gray: str = "repeat"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise InputError(f"image batch must be (B, C, H, W), got shape {tuple(x.shape)}")
        channels = x.shape[1]
        if channels == self.in_channels:
            return super().forward(x)
        if channels != 1:
            raise InputError(f"image has {channels} channels; the model takes {self.in_channels} or 1")
        if self.gray == "repeat":
            return super().forward(x.expand(-1, self.in_channels, -1, -1))
        return F.conv2d(x, self.weight[:, :1], self.bias, self.stride, self.padding, self.dilation, self.groups)


def enable_gray(parent: nn.Module, attr: str, gray: str) -> None:
    """Replace ``parent.<attr>`` (a ``Conv2d``) by a :class:`GrayConv2d` sharing its parameters."""
    if gray not in GRAY_MODES:
        raise UnknownNameError(f"gray mode {gray!r} is not one of {', '.join(GRAY_MODES)}")
    conv = getattr(parent, attr)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{type(parent).__name__}.{attr} is not a Conv2d")
    padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
    new = GrayConv2d(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), _pair(conv.stride), padding,
                     _pair(conv.dilation), conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode)
    new.weight = conv.weight
    new.bias = conv.bias
    new.gray = gray
    setattr(parent, attr, new)


def _pair(size: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's size attribute as the pair it is (torch types it as a tuple of any length)."""
    first, second = size
    return first, second


def check_patch_multiple(model: str, x: torch.Tensor, patch: Sequence[int]) -> None:
    """Raise :class:`InputError` unless ``x`` is (B, C, H, W) with H, W multiples of ``patch``."""
    if x.ndim != 4 or x.shape[2] % patch[0] or x.shape[3] % patch[1]:
        raise InputError(f"{model}: input of shape {tuple(x.shape)} is not (B, C, H, W) with H, W "
                         f"multiples of the patch size {tuple(patch)}")


def tap_positions(model: str, table: Sequence[str], taps: Iterable[str]) -> list[int]:
    """Sorted positions of ``taps`` in ``table``; an unknown tap raises :class:`UnknownNameError`."""
    index = {name: i for i, name in enumerate(table)}
    positions = []
    for tap in taps:
        if tap not in index:
            raise UnknownNameError(f"{model}: unknown or pruned tap {tap!r}; taps are: {', '.join(table)}")
        positions.append(index[tap])
    if not positions:
        raise UnknownNameError(f"{model}: no taps given")
    return sorted(set(positions))


def vit_taps(depth: int, width: int, patch: int, prefix: int, block_pooling: str,
             norm_pooling: str) -> tuple[TapSpec, ...]:
    """Tap table of a plain ViT: ``blocks.0`` .. ``blocks.{depth-1}`` then ``norm``."""
    blocks = tuple(TapSpec(f"blocks.{i}", width, patch, "tokens", block_pooling, prefix) for i in range(depth))
    return blocks + (TapSpec("norm", width, patch, "tokens", norm_pooling, prefix),)


def strip_keys(state: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """The keys under the first of ``prefixes`` that any key starts with, without it; else None."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return None


def with_head_dropped(state: dict[str, torch.Tensor],
                      heads: Sequence[str] = ("head.", "fc.")) -> dict[str, torch.Tensor]:
    """``state`` without classifier keys: a feature trunk has no classifier."""
    return {k: v for k, v in state.items() if not k.startswith(tuple(heads))}


def resample_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                       prefix: int, offset: float = 0.0) -> torch.Tensor:
    """Resample (1, prefix + h*w, C) position embeddings to ``new_grid`` patches.

    Bicubic (``align_corners=False``, no antialias) in float32; the prefix (CLS, register)
    embeddings are kept. Returns ``pos`` itself when the grid already fits.

    ``offset`` > 0 reproduces the original DINO / DINOv2 code (``interpolate_offset`` 0.1 in
    facebookresearch/dino and dinov2): it passes the scale factor ``(new + offset) / old``
    instead of the output size, which moves the sampling positions slightly (the output size
    is still ``new``). With 0 the output size is passed (Hugging Face's DINOv2, BLIP).
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos
    head, grid = pos[:, :prefix], pos[:, prefix:]
    channels = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2).float()
    if offset:
        scale = tuple(float(n + offset) / o for n, o in zip(new_grid, old_grid))
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    else:
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    if tuple(grid.shape[2:]) != tuple(new_grid):
        raise InputError(f"position embeddings resampled to {tuple(grid.shape[2:])}, not {tuple(new_grid)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, channels).to(pos.dtype)
    return torch.cat([head, grid], dim=1)


class TappedViT(VisionTransformer, TappedModel):
    """timm ``VisionTransformer`` with medfeat taps.

    Build it with the timm architecture arguments plus ``num_classes=0`` and
    ``dynamic_img_size=True``. Position embeddings stay at the checkpoint's grid and are
    resampled to the input's patch grid at run time by :func:`resample_pos_embed`
    (bicubic, no antialiasing, as Hugging Face's DINOv2 and the original DINO/DINOv2 code;
    timm's default would antialias, which changes the kernel). The ``norm`` tap is the final LayerNorm applied to the
    last block's tokens; block taps are raw (pre-norm) tokens, as timm's
    ``forward_intermediates(norm=False)``.

    ``forward(x)`` is timm's own ``forward_features``: (B, N, C) normed tokens, equal to the
    raw ``norm`` tap.
    """

    medfeat_name: str = "vit"
    interpolate_offset: float = 0.0  # see resample_pos_embed (0.1 for the DINO / DINOv2 families)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) patch grid -> (B, prefix + H*W, C) tokens with position embeddings."""
        batch, height, width, channels = x.shape
        prefix = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is None:
            raise TypeError(f"{self.medfeat_name}: built without position embeddings (pos_embed='none')")
        pos = resample_pos_embed(self.pos_embed, (height, width), self.patch_embed.grid_size,
                                 0 if self.no_embed_class else self.num_prefix_tokens, self.interpolate_offset)
        x = x.reshape(batch, height * width, channels)
        if self.no_embed_class:
            return self.pos_drop(torch.cat(prefix + [x + pos], dim=1))
        return self.pos_drop(torch.cat(prefix + [x], dim=1) + pos)

    def tap_names(self) -> list[str]:
        names = [f"blocks.{i}" for i in range(len(self.blocks))]
        return names + (["norm"] if not isinstance(self.norm, nn.Identity) else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        check_patch_multiple(self.medfeat_name, x, self.patch_embed.patch_size)
        return self.forward_features(x)

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        """Raw tap outputs: (B, N, C) tokens, N = prefix tokens + patch grid."""
        check_patch_multiple(self.medfeat_name, x, self.patch_embed.patch_size)
        names = self.tap_names()
        wanted = set(tap_positions(self.medfeat_name, names, taps))
        last = max(wanted)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if i > last:
                break
            x = block(x)
            if i in wanted:
                out[names[i]] = x
        if len(self.blocks) in wanted:
            out["norm"] = self.norm(x)
        return out

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm on (B, N, C) tokens of any block (DINOv2's normed intermediates)."""
        if isinstance(self.norm, nn.Identity):
            raise UnknownNameError(f"{self.medfeat_name}: has no final norm here (pruned, or none in this model)")
        return self.norm(tokens)

    def prune_after(self, tap: str) -> None:
        position = tap_positions(self.medfeat_name, self.tap_names(), [tap])[0]
        if position < len(self.blocks):
            self.prune_intermediate_layers([position], prune_norm=not self.keep_final_norm, prune_head=True)
        else:
            self.reset_classifier(0, "")
        # the token pooling and head of timm are never used: medfeat pools taps itself
        self.fc_norm = nn.Identity()
        self.head_drop = nn.Identity()  # type: ignore[assignment]  # timm infers Dropout; any Module serves
        self.attn_pool = None  # type: ignore[assignment]  # timm infers its first assignment; None is valid


def build_vit(name: str, gray: str, img_size: int, interpolate_offset: float = 0.0, **arch: Any) -> TappedViT:
    """A :class:`TappedViT` at ``img_size`` (the checkpoint's position-embedding grid)."""
    model = TappedViT(img_size=img_size, num_classes=0, dynamic_img_size=True, **arch)
    model.medfeat_name = name
    model.interpolate_offset = float(interpolate_offset)
    enable_gray(model.patch_embed, "proj", gray)
    return model

"""2D image ops for the transfer study: resize, centre crop, mean/std normalisation, gray to RGB.

Images are sampled with the same kernels as volumes: a 2D image (H, W, C)
is a 3D source whose last axis is the channel, sampled at integer channel
positions, so resize + crop + normalise + channel expansion + cast is one
fused pass per output channel over the whole batch.

Resizing is bilinear with the half-pixel (edge-aligned) convention and edge
clamping, i.e. ``torch.nn.functional.interpolate(mode='bilinear',
align_corners=False, antialias=False)``; there is no antialiasing filter, so
downscaling by much more than 2x aliases (pre-shrink such images first).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medfeat.errors import InputError
from medfeat.kernels import _checks
from medfeat.kernels._checks import Array
from medfeat.kernels.affine import affine_transform

#: Per-model normalisation constants (on [0, 1] pixel values).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(images: Array, size: tuple[int, int], *, order: int = 1) -> Array:
    """Resize a batch (B, H, W) to (B, h, w) (edge-aligned, bilinear or nearest)."""
    _checks.check_volume("images", images, (3,))
    h, w = _checks.check_shape("size", size, 2)
    sy, sx = images.shape[1] / h, images.shape[2] / w
    m = np.diag([1.0, sy, sx])
    off = np.array([0.0, 0.5 * sy - 0.5, 0.5 * sx - 0.5])
    return affine_transform(images, m, off, output_shape=(images.shape[0], h, w), order=order, mode="nearest")


def center_crop(images: Array, size: tuple[int, int], fill: float = 0.0) -> Array:
    """Central (h, w) window of the last two axes (torchvision's rounding); pads with ``fill`` when smaller."""
    from medfeat.kernels.roi import crop

    h, w = _checks.check_shape("size", size, 2)
    hh, ww = images.shape[-2:]
    top, left = int(round((hh - h) / 2.0)), int(round((ww - w) / 2.0))
    lead = images.ndim - 2
    lo = [0] * lead + [top, left]
    hi = list(images.shape[:lead]) + [top + h, left + w]
    return crop(images, lo, hi, fill)


def normalize(images: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
    """(B, C, H, W) -> (x - mean[c]) / std[c], float32."""
    xp = _checks.array_module(images)
    if images.ndim != 4 or images.shape[1] != len(mean) or len(mean) != len(std):
        raise InputError(f"images: expected (B, {len(mean)}, H, W) for {len(mean)} means, got {tuple(images.shape)}")
    m = xp.asarray(mean, dtype=xp.float32).reshape(1, -1, 1, 1)
    s = xp.asarray(std, dtype=xp.float32).reshape(1, -1, 1, 1)
    return (images.astype(xp.float32) - m) / s


def gray_to_rgb(images: Array) -> Array:
    """(B, H, W) or (B, 1, H, W) -> (B, 3, H, W) by repeating the channel."""
    xp = _checks.array_module(images)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] != 1:
        raise InputError(f"images: expected (B, H, W) or (B, 1, H, W), got {tuple(images.shape)}")
    return xp.repeat(images, 3, axis=1)


def _resize_crop_map(hw: tuple[int, int], resize_to: int, crop: int,
                     keep_aspect: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Index map (output y, x) -> source (y, x) of 'shorter side to resize_to, then centre crop'
    (``keep_aspect``), or of 'both sides to resize_to, then centre crop'."""
    h, w = hw
    if not keep_aspect:
        nh = nw = resize_to
    elif h <= w:
        nh, nw = resize_to, int(resize_to * w / h)
    else:
        nh, nw = int(resize_to * h / w), resize_to
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    sy, sx = h / nh, w / nw
    return np.array([sy, sx]), np.array([(top + 0.5) * sy - 0.5, (left + 0.5) * sx - 0.5])


def prepare_images(
    images: Sequence[Array],
    out: Any,  # numpy, cupy or torch
    *,
    resize_to: int = 256,
    crop: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    pixel_scale: float = 1.0 / 255.0,
    keep_aspect: bool = True,
) -> Any:
    """Fused eval transform of a batch of images into ``out`` (B, 3, crop, crop).

    Each image is (H, W) grayscale or (H, W, C) with C in {1, 3}, any supported
    dtype (uint8 typically), its own size. Shorter side resized to
    ``resize_to`` (torchvision ``Resize(256)`` geometry), or with ``keep_aspect=False``
    both sides (``Resize((256, 256))``, the aspect ratio not kept), centre crop
    ``crop``, pixel values times ``pixel_scale``, then (x - mean[c]) / std[c];
    a grayscale image feeds all three channels. ``out`` is numpy/cupy float32,
    float16 or bfloat16 (numpy via ml_dtypes), or a torch tensor.
    """
    from medfeat.kernels.fused import launch_cpu, launch_gpu

    device, dtype_name, shape = _check_out_2d(out, len(images), crop)
    srcs = []
    for i, img in enumerate(images):
        _checks.check_volume(f"images[{i}]", img, (2, 3))
        src = img[:, :, None] if img.ndim == 2 else img
        if src.shape[2] not in (1, 3):
            raise InputError(f"images[{i}]: expected 1 or 3 channels, got shape {tuple(img.shape)}")
        srcs.append(src)
    out5 = out.reshape(shape[0], 3, 1, crop, crop)
    xp = _checks.array_module(srcs[0])
    for c in range(3):
        mats = np.zeros((len(srcs), 12))
        params = np.zeros((len(srcs), 5))
        for i, src in enumerate(srcs):
            s, off = _resize_crop_map(src.shape[:2], resize_to, crop, keep_aspect)
            ch = float(min(c, src.shape[2] - 1))
            # rows: src y from out y (axis 1), src x from out x (axis 2), channel fixed.
            mats[i] = [0, s[0], 0, off[0], 0, 0, s[1], off[1], 0, 0, 0, ch]
            inf = float("inf")
            params[i] = (-inf, inf, mean[c] / pixel_scale, pixel_scale / std[c], 0.0)
        if xp is np:
            launch_cpu(srcs, mats, params, out5, dtype_name, c, 1, _checks.MODES["nearest"])
        else:
            launch_gpu(srcs, mats, params, out5, dtype_name, (shape[0], 3, 1, crop, crop), c, 1, _checks.MODES["nearest"])
    return out


def _check_out_2d(out: Any, batch: int, crop: int) -> tuple[str, str, tuple[int, ...]]:
    from medfeat.kernels.fused import out_kind

    device, name = out_kind(out)
    shape = tuple(int(s) for s in out.shape)
    if shape != (batch, 3, crop, crop):
        raise InputError(f"out: expected shape {(batch, 3, crop, crop)}, got {shape}")
    if name not in ("float32", "float16", "bfloat16"):
        raise InputError(f"out: dtype {name} unsupported; use float32, float16 or bfloat16")
    return device, name, shape

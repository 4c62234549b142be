"""The transfer study's train-time augmentation of 2D images, deterministic per item and view.

The study (Palés Huix et al. 2024, joanaapa/Foundation-Medical params.json and
defaults/bases.py) trains on: resize and centre crop (the eval geometry), then
``RandomResizedCrop(224, scale=(0.8, 1.2))`` (bilinear), ``RandomVerticalFlip(0.5)``,
``RandomHorizontalFlip(0.5)``, ``ColorJitter(0.2, 0.2, 0.1, 0.1)`` applied with p 0.8, then
normalisation. :func:`study_view` draws the same random parameters the way torchvision's
transforms do (crop: ten tries at area scale x log-uniform aspect in (3/4, 4/3), else a
central crop; jitter: factors uniform in [1 - b, 1 + b] etc., applied in a random order),
but from a numpy generator that :func:`view_rng` seeds from (seed, item id, view, epoch),
so a view can be made again bit for bit on any worker. One difference, kept on purpose:
the first step is medfeat's eval geometry (shorter side to round(s * 256 / 224), centre
crop s, :func:`eval_view`), where the study resizes to a 256 x 256 square (aspect not kept);
training views are then crops of exactly the image that evaluation sees.

Images are (H, W) grey or (H, W, C) with C in {1, 3, 4} (alpha dropped), uint8, uint16 or
float; output is (3, s, s) float32, normalised with the model's per-channel mean and std.
Grey images feed all three channels (``gray="repeat"``) or channel 0 only, zeros elsewhere
(``"first_channel"``), as the feature pipeline does.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from medfeat.errors import InputError
from medfeat.kernels.image2d import prepare_images

__all__ = ["AUGMENTS", "StudyAugment", "STUDY", "crop_box", "eval_view", "image_source", "rule_mean_std",
           "study_view", "view_rng"]

AUGMENTS = ("none", "study")


@dataclass(frozen=True)
class StudyAugment:
    """Parameters of the study's train transform (defaults: the study's params.json)."""

    scale: tuple[float, float] = (0.8, 1.2)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    vflip: float = 0.5
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.1
    jitter_p: float = 0.8


STUDY = StudyAugment()


def view_rng(seed: int, item_id: str, view: int, epoch: int = 0) -> np.random.Generator:
    """The generator of one augmented view: same (seed, item, view, epoch), same view."""
    digest = int.from_bytes(hashlib.sha256(str(item_id).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest, int(view), int(epoch)])


def image_source(image: np.ndarray) -> tuple[np.ndarray, float]:
    """(H, W, 1|3) array and the factor taking its values to [0, 1]: 1/255 for uint8,
    1/65535 for uint16; other types are min-max scaled to [0, 1] (as the feature pipeline)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape) < 1:
        raise InputError(f"expected a 2D image (H, W) or (H, W, 1|3|4), got shape {np.shape(image)}")
    img = np.ascontiguousarray(img[:, :, :3])
    if img.dtype == np.uint8:
        return img, 1.0 / 255.0
    if img.dtype == np.uint16:
        return img, 1.0 / 65535.0
    x = img.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise InputError("image has NaN or Inf pixels")
    lo, hi = float(x.min()), float(x.max())
    return (x - np.float32(lo)) * np.float32(1.0 / max(hi - lo, 1e-6)), 1.0


class NamedRule(Protocol):
    """An intensity rule by name and its parameters (a backbone spec's ``Preprocess``)."""

    @property
    def rule(self) -> str: ...

    @property
    def params(self) -> Mapping[str, Any]: ...


def rule_mean_std(rule: NamedRule) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) on [0, 1] pixels of a 2D model's intensity rule (a backbone
    spec's ``Preprocess``: ``mean_std`` with ``mean``/``std``; ``none``/``minmax``: 0 and 1)."""
    if rule.rule == "mean_std":
        mean = [float(v) for v in rule.params.get("mean", (0.485, 0.456, 0.406))]
        std = [float(v) for v in rule.params.get("std", (0.229, 0.224, 0.225))]
        return tuple(mean), tuple(std)
    if rule.rule in ("none", "minmax"):
        return (0.0,), (1.0,)
    raise InputError(f"intensity rule {rule.rule!r} is not one of mean_std, minmax, none for a 2D model")


def _three(values: Sequence[float], name: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    if len(vals) not in (1, 3):
        raise InputError(f"{name} needs 1 or 3 values, got {vals}")
    return vals * (3 // len(vals))


def eval_view(image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float], *,
              gray: str = "repeat") -> np.ndarray:
    """The eval transform: (3, size, size) float32 (shorter side to round(size * 256 / 224),
    centre crop, (x - mean) / std), equal to what the feature pipeline feeds a 2D model."""
    src, pixel_scale = image_source(image)
    out = np.empty((1, 3, size, size), dtype=np.float32)
    prepare_images([src], out, resize_to=round(size * 256 / 224), crop=size, mean=_three(mean, "mean"),
                   std=_three(std, "std"), pixel_scale=pixel_scale)
    if gray == "first_channel" and src.shape[2] == 1:
        out[0, 1:] = 0.0
    return out[0]


def crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, drawn as torchvision's RandomResizedCrop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # every try fell outside the image: a central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def study_view(image: np.ndarray, rng: np.random.Generator, size: int, mean: Sequence[float],
               std: Sequence[float], *, gray: str = "repeat", aug: StudyAugment = STUDY) -> np.ndarray:
    """One augmented training view, (3, size, size) float32, from the draws of ``rng``."""
    import torch
    import torch.nn.functional as F
    import torchvision.transforms.v2.functional as TF

    base = eval_view(image, size, (0.0,), (1.0,), gray="repeat")  # [0, 1], the eval crop
    top, left, h, w = crop_box(rng, size, size, aug.scale, aug.ratio)
    x = torch.from_numpy(base[:, top:top + h, left:left + w].copy())[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if rng.random() < aug.vflip:
        x = x.flip(-2)
    if rng.random() < aug.hflip:
        x = x.flip(-1)
    if rng.random() < aug.jitter_p:
        x = _jitter(x.clamp(0.0, 1.0), rng, aug, TF)
    m = torch.tensor(_three(mean, "mean")).view(3, 1, 1)
    s = torch.tensor(_three(std, "std")).view(3, 1, 1)
    out = ((x - m) / s).numpy().astype(np.float32, copy=False)
    if gray == "first_channel" and image_source(image)[0].shape[2] == 1:
        out[1:] = 0.0
    return out


def _jitter(x, rng: np.random.Generator, aug: StudyAugment, TF):  # noqa: N803 - torchvision's alias
    """ColorJitter: the four adjustments in a random order, factors drawn as torchvision's."""
    factors = {
        0: rng.uniform(max(0.0, 1 - aug.brightness), 1 + aug.brightness),
        1: rng.uniform(max(0.0, 1 - aug.contrast), 1 + aug.contrast),
        2: rng.uniform(max(0.0, 1 - aug.saturation), 1 + aug.saturation),
        3: rng.uniform(-aug.hue, aug.hue),
    }
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k in rng.permutation(4):
        x = ops[k](x, float(factors[int(k)]))
    return x

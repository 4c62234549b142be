"""Augmented views of 2D items for token arrays (``--views K --augment study``).

View 0 of an item is its usual eval input (written by :func:`~.inputs.load_item`); views
1..K are the study's train-time augmentation (:func:`medfeat.kernels.augment2d.study_view`)
drawn from ``view_rng(seed, item id, view)``, so a rerun, a resumed run or another worker
makes the same views bit for bit.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from medfeat.engine.pipeline.inputs import ScanCache
from medfeat.engine.pipeline.items import Item
from medfeat.errors import InputError, UnknownNameError
from medfeat.io.readers import read_image
from medfeat.kernels.augment2d import rule_mean_std, study_view, view_rng

if TYPE_CHECKING:
    from medfeat.export.backbones.spec import BackboneSpec, Preprocess


def fill_views(item: Item, spec: BackboneSpec, size: tuple[int, ...], timer: ScanCache, out: np.ndarray, *,
               gray: str, seed: int, augment: str, rule: Preprocess | None = None) -> None:
    """Write views 1..K of ``item`` into ``out`` (K, 3, s, s) float32, normalised by ``rule``
    (a dataset's own mean/std) or else the model's."""
    if augment != "study":
        raise UnknownNameError(f"unknown augmentation {augment!r}")
    if spec.in_channels != 3 or len(size) != 2 or size[0] != size[1]:
        raise InputError(f"augmented views need a 3-channel model with a square input, got "
                         f"{spec.in_channels} channels at {tuple(size)}")
    t0 = time.perf_counter()
    image = read_image(item.channels[0].path)
    timer.read += time.perf_counter() - t0
    t0 = time.perf_counter()
    mean, std = rule_mean_std(rule or spec.preprocess)
    for v in range(out.shape[0]):
        out[v] = study_view(image, view_rng(seed, item.item_id, v + 1), int(size[0]), mean, std, gray=gray)
    timer.preprocess += time.perf_counter() - t0

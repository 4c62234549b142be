"""Model inputs of items: scans read once per batch, aligned, resampled into the batch buffer.

:class:`ScanCache` holds one batch's scans (a subject's baseline serves every channel that
references it) and the read / preprocess seconds; :func:`align_batch` estimates every
alignment a batch needs in one batched registration per kind; :func:`load_item` writes
one item's input into its row of the preallocated batch buffer.

Estimated alignments are remembered per process (:class:`AlignmentCache`), keyed by the two
files (path, size, modification time) and the kind: an experiment that extracts several
models with ``--align rigid`` registers each follow-up once, not once per model.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from medfeat.engine.pipeline import preprocess as pp
from medfeat.engine.pipeline.items import Channel, Item
from medfeat.errors import InputError, MedfeatError, one_line
from medfeat.io.nifti import Volume
from medfeat.io.readers import read_image, read_scan
from medfeat.kernels import align, edge_box_grid, fov_grid

if TYPE_CHECKING:
    from medfeat.export.backbones.spec import BackboneSpec, Preprocess


@dataclass
class ScanCache:
    """The scans of one batch, each read once (a baseline can serve several channels and
    items), with the seconds spent reading and preprocessing summed over the batch."""

    read: float = 0.0
    preprocess: float = 0.0
    scans: dict[str, Volume] = field(default_factory=dict)

    def volume(self, path: str) -> Volume:
        """The scan at ``path``, read on first use."""
        if path not in self.scans:
            t0 = time.perf_counter()
            self.scans[path] = read_scan(path)
            self.read += time.perf_counter() - t0
        return self.scans[path]


def load_item(item: Item, spec: BackboneSpec, size: tuple[int, ...], timer: ScanCache,
              transforms: dict[tuple[str, int], np.ndarray] | None = None,
              out: np.ndarray | None = None, gray: str = "repeat", rule: Preprocess | None = None,
              keep_aspect: bool = True) -> np.ndarray:
    """The model input of ``item``: (C, *size) float32, written into ``out`` when given (a
    row of the batch buffer). Raises InputError for bad inputs.

    ``transforms`` holds estimated alignments by (item id, channel) from :func:`align_batch`;
    channels that need one and are missing there are aligned on their own. ``gray`` is the
    2D model's grey-image mode (:func:`gray_mode`), ``rule`` its intensity rule when not the
    spec's (a dataset's own mean/std, :func:`~medfeat.engine.pipeline.preprocess.image_rule`),
    ``keep_aspect`` its resize geometry.
    """
    if spec.input_kind == "image2d":
        ch = item.channels[0]
        t0 = time.perf_counter()
        img = read_image(ch.path)
        timer.read += time.perf_counter() - t0
        t0 = time.perf_counter()
        x = pp.prepare_image(img, size, rule or spec.preprocess, spec.in_channels, gray=gray, out=out,
                             keep_aspect=keep_aspect)
        timer.preprocess += time.perf_counter() - t0
        return x
    if len(item.channels) != spec.in_channels:
        raise InputError(f"{item.item_id}: {len(item.channels)} input channel(s), model takes {spec.in_channels}")
    if out is None:
        out = np.empty((spec.in_channels, *size), dtype=np.float32)
    transforms = transforms or {}
    for k, ch in enumerate(item.channels):
        _load_channel(ch, spec, size, timer, transforms.get((item.item_id, k)), out, k)
    return out


def gray_mode(backbone: object) -> str:
    """The grey-image mode a 2D backbone was built with (its ``gray`` config; ``repeat``)."""
    return str((getattr(backbone, "provenance", None) or {}).get("config", {}).get("gray", "repeat"))


def _load_channel(ch: Channel, spec: BackboneSpec, size: tuple[int, ...], timer: ScanCache,
                  estimated: np.ndarray | None, out: np.ndarray, k: int) -> None:
    vol = timer.volume(ch.path)
    ref = timer.volume(ch.ref) if ch.ref else vol
    mask = timer.volume(ch.mask) if ch.mask else None
    t0 = time.perf_counter()
    transform = None if ch.transform is None else np.asarray(ch.transform).reshape(4, 4)
    if ch.estimate:
        transform = estimated if estimated is not None else estimate_alignment(vol, ref, ch.estimate)
    if mask is not None:
        roi = mask.data if ch.mask_labels is None else np.isin(mask.data, ch.mask_labels)
        if not roi.any():
            raise InputError(f"{ch.mask}: no voxel has an ROI label {list(ch.mask_labels or ())}")
        lo, hi = pp.mask_box(roi, mask.affine, ref.affine)
        grid = edge_box_grid(ref.affine, lo, hi, size)
    else:
        grid = fov_grid(ref.shape, ref.affine, size)
    mode = pp.border_mode(mask is None and transform is None and ch.ref is None)
    pp.prepare_volume_into(out[None], k, vol.data, vol.affine, grid, spec.preprocess, transform, mode)
    timer.preprocess += time.perf_counter() - t0


class AlignmentCache:
    """Estimated transforms by (kind, moving file, fixed file), least recently used first out.

    A file is identified by its path, size and modification time, so a changed scan is
    registered again. Thread-safe (the threads scheduler runs batches side by side).
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(kind: str, moving: str, fixed: str) -> tuple | None:
        """The cache key, or None when a file cannot be stat'ed (then nothing is cached)."""
        try:
            stats = [os.stat(p) for p in (moving, fixed)]
        except OSError:
            return None
        return (kind, moving, fixed, *((s.st_size, s.st_mtime_ns) for s in stats))

    def get(self, key: tuple | None) -> np.ndarray | None:
        with self._lock:
            if key is None or key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key].copy()

    def put(self, key: tuple | None, matrix: np.ndarray) -> None:
        if key is None:
            return
        with self._lock:
            self._items[key] = np.array(matrix, dtype=np.float64)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


ALIGNMENTS = AlignmentCache()


def estimate_alignment(moving: Volume, fixed: Volume, kind: str) -> np.ndarray:
    """(4, 4) fixed world mm -> moving world mm, by the kernels' registration (NCC, pyramid).

    ``kind``: ``rigid`` or ``affine``. Scans are aligned one item at a time here.
    """
    out = align([moving.data], [fixed.data], [moving.affine], [fixed.affine], kind=kind)
    return np.asarray(out[0], dtype=np.float64)


def align_batch(items: list[Item], timer: ScanCache) -> tuple[dict[tuple[str, int], np.ndarray], list[tuple[str, str]]]:
    """Estimate every alignment a batch needs in one batched registration per kind.

    Returns transforms by (item id, channel) and ``(item id, reason)`` for items whose
    scans could not be read (they fail; the rest of the batch goes on).
    """
    wanted: dict[str, list[tuple[str, int, Volume, Volume, tuple | None]]] = {}
    failures = []
    out: dict[tuple[str, int], np.ndarray] = {}
    for item in items:
        for k, ch in enumerate(item.channels):
            if not ch.estimate:
                continue
            key = AlignmentCache.key(ch.estimate, ch.path, ch.ref or ch.path)
            known = ALIGNMENTS.get(key)
            if known is not None:
                out[(item.item_id, k)] = known
                continue
            try:
                moving, fixed = timer.volume(ch.path), timer.volume(ch.ref or ch.path)
            except MedfeatError as exc:
                failures.append((item.item_id, one_line(exc)))
                continue
            wanted.setdefault(ch.estimate, []).append((item.item_id, k, moving, fixed, key))
    t0 = time.perf_counter()
    for kind, jobs in wanted.items():
        mats = align([j[2].data for j in jobs], [j[3].data for j in jobs],
                     [j[2].affine for j in jobs], [j[3].affine for j in jobs], kind=kind)
        for job, matrix in zip(jobs, mats):
            out[(job[0], job[1])] = np.asarray(matrix, np.float64)
            ALIGNMENTS.put(job[4], matrix)
    timer.preprocess += time.perf_counter() - t0
    return out, failures

"""A synthetic 2D task where the label is *where* a pattern lies, not what it looks like.

Each image is a textured background cut into a ``cells`` x ``cells`` grid; one bright square
pattern, the same in every image, sits inside one cell (jittered within it). The label is 1
when that cell is one of the central ones (the inner ``cells - 2`` square) and 0 when it is
on the border. Whatever pools a backbone's tokens into one vector keeps what the image
holds and little of where (position is a nonlinear, ring-shaped function of the cell), so a
linear probe on pooled features does poorly, while a head that sees the token map (or a
fine-tuned backbone) can read the position: the test bed of token heads and fine-tuning.

Outputs: ``images/<item_id>.png`` (RGB uint8) and ``manifest.csv`` with ``item_id, subject,
path, label, split, cell`` (random 70/15/15 split). Same arguments, same bytes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from medfeat.cohorts.synth2d import write_manifest
from medfeat.errors import InputError

__all__ = ["central_cells", "render_where", "synth_where_cohort"]


def central_cells(cells: int) -> list[tuple[int, int]]:
    """(row, column) of the cells whose images have label 1."""
    return [(r, c) for r in range(1, cells - 1) for c in range(1, cells - 1)]


def render_where(cell: tuple[int, int], rng: np.random.Generator, size: int = 64, cells: int = 4) -> np.ndarray:
    """One image with the pattern in ``cell`` (row, column), (size, size, 3) uint8."""
    side = size // cells
    texture = gaussian_filter(rng.normal(size=(size, size, 3)), (size / 16, size / 16, 0))
    texture = 0.35 + 0.12 * texture / max(float(np.abs(texture).max()), 1e-9)
    img = texture * rng.uniform(0.8, 1.2, 3) + rng.normal(0.0, 0.03, (size, size, 3))
    patch = max(2, side // 2)
    top = cell[0] * side + int(rng.integers(0, side - patch + 1))
    left = cell[1] * side + int(rng.integers(0, side - patch + 1))
    img[top:top + patch, left:left + patch] = np.array([0.95, 0.85, 0.2]) + rng.normal(0, 0.02, 3)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def synth_where_cohort(out: str | Path, *, images: int = 200, seed: int = 0, size: int = 64, cells: int = 4,
                       fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)) -> Path:
    """Write ``images`` PNGs (half of each label) and ``manifest.csv``; returns the manifest path."""
    if images < 2:
        raise InputError(f"--images {images}: need at least two images")
    if cells < 3 or size < 2 * cells:
        raise InputError(f"need at least 3 cells of 2 pixels a side, got {cells} cells at {size} pixels")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inner = central_cells(cells)
    border = [(r, c) for r in range(cells) for c in range(cells) if (r, c) not in inner]
    labels = rng.permutation(np.arange(images) % 2)
    order = rng.permutation(images)
    n_train, n_val = int(round(fractions[0] * images)), int(round(fractions[1] * images))
    split = np.empty(images, dtype=object)
    split[order[:n_train]], split[order[n_train:n_train + n_val]], split[order[n_train + n_val:]] = \
        "train", "val", "test"
    rows = []
    for i, label in enumerate(labels):
        item_rng = np.random.default_rng([seed, i])
        choices = inner if label else border
        cell = choices[int(item_rng.integers(len(choices)))]
        item_id = f"where{i:05d}"
        rel = f"images/{item_id}.png"
        Image.fromarray(render_where(cell, item_rng, size, cells), "RGB").save(out / rel)
        rows.append({"item_id": item_id, "subject": item_id, "path": rel, "label": int(label),
                     "split": split[i], "cell": f"{cell[0]},{cell[1]}"})
    return write_manifest(rows, out / "manifest.csv")

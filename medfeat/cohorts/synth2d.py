"""A synthetic 2D classification set: fundus-like images with graded findings.

Each image shows a circular fundus (orange-red, darker at the rim, with a
low-frequency texture), an optic disc, vessels branching from the disc, and
lesions whose number and size grow with a diabetic-retinopathy-like grade
0..4: red dots (microaneurysms, haemorrhages) from grade 1, yellow exudates
from grade 2, pale cotton-wool spots from grade 3, and extra fine tortuous
vessels near the disc (new vessels) at grade 4.

Outputs: ``images/<item_id>.png`` (RGB, uint8) and ``manifest.csv`` with
``item_id, subject, path, label, split`` (random 70/15/15 split, like the
APTOS2019 protocol). Same arguments, byte-identical files.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from medfeat.errors import InputError

__all__ = ["GRADE_PROBS", "render_fundus", "synth2d_cohort", "write_manifest"]

#: Grade frequencies (skewed to healthy eyes, as in screening data).
GRADE_PROBS = (0.40, 0.15, 0.20, 0.10, 0.15)
# Mean lesion counts per grade: red dots, exudates, cotton-wool spots, new vessels.
_RED = (0, 5, 12, 24, 36)
_EXUDATE = (0, 0, 6, 12, 18)
_COTTON = (0, 0, 0, 3, 5)
_NEW_VESSELS = (0, 0, 0, 0, 4)

_BACKGROUND = np.array([0.78, 0.36, 0.16])
_DISC = np.array([1.0, 0.86, 0.58])
_VESSEL = np.array([0.42, 0.07, 0.05])
_RED_LESION = np.array([0.35, 0.03, 0.02])
_EXUDATE_COLOUR = np.array([0.98, 0.92, 0.45])
_COTTON_COLOUR = np.array([0.93, 0.85, 0.74])


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """In place: img = (1 - alpha) img + alpha colour; alpha (H, W) in [0, 1]."""
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    img *= 1.0 - a
    img += a * colour


def _curve_mask(size: int, start: np.ndarray, angle: float, length: float, rng: np.random.Generator,
                width_px: float, tortuosity: float = 0.08) -> np.ndarray:
    """Soft mask (size, size) of a random-walk curve from ``start`` (pixels)."""
    steps = max(int(length), 2)
    turns = np.cumsum(rng.normal(0.0, tortuosity, steps))
    angles = angle + turns
    pts = start + np.cumsum(np.stack([np.cos(angles), np.sin(angles)], axis=1), axis=0)
    pts = pts[(pts >= 0).all(axis=1) & (pts < size - 1).all(axis=1)]
    hits = np.zeros((size, size))
    np.add.at(hits, (pts[:, 1].round().astype(int), pts[:, 0].round().astype(int)), 1.0)
    soft = gaussian_filter(hits, width_px)
    return soft / max(soft.max(), 1e-9)


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Soft-edged disc of radius r (pixels) centred at (cy, cx)."""
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return 1.0 / (1.0 + np.exp((d - r) / max(0.35 * r, 0.5)))


def _stamp(img: np.ndarray, cy: float, cx: float, r: float, colour: np.ndarray, strength: float) -> None:
    """Blend a soft disc into img inside its bounding window only (lesions are small)."""
    size = img.shape[0]
    half = int(np.ceil(r * 2.5)) + 2
    y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, size)
    x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, size)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    _blend(img[y0:y1, x0:x1], strength * _blob(yy, xx, cy, cx, r), colour)


def _random_points(rng: np.random.Generator, n: int, size: int, radius: float) -> np.ndarray:
    """n points (y, x) uniform in the fundus disc of ``radius`` pixels."""
    r = radius * np.sqrt(rng.random(n))
    t = rng.uniform(0, 2 * np.pi, n)
    c = (size - 1) / 2
    return np.stack([c + r * np.sin(t), c + r * np.cos(t)], axis=1)


def render_fundus(grade: int, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """One fundus-like image of the given grade 0..4, (size, size, 3) uint8."""
    if grade not in range(5):
        raise InputError(f"grade {grade} is not in 0..4")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2
    radius = 0.46 * size
    rr = np.sqrt((yy - c) ** 2 + (xx - c) ** 2) / radius
    texture = gaussian_filter(rng.normal(size=(size, size)), size / 40)
    texture /= max(np.abs(texture).max(), 1e-9)
    tint = _BACKGROUND * rng.uniform(0.85, 1.1, 3)
    img = tint * (1.0 - 0.45 * rr[..., None] ** 2) * (1.0 + 0.08 * texture[..., None])
    side = rng.choice([-1.0, 1.0])
    disc = np.array([c + rng.normal(0, 0.03) * size, c + side * 0.32 * size])  # (y, x)
    disc_r = rng.uniform(0.055, 0.07) * size
    _blend(img, _blob(yy, xx, disc[0], disc[1], disc_r), _DISC)
    scale = size / 224
    for k in range(8):  # vessels leave the disc in all directions
        angle = (k / 8) * 2 * np.pi + rng.normal(0, 0.2)
        mask = _curve_mask(size, disc[::-1].copy(), angle, rng.uniform(0.5, 0.9) * size, rng,
                           width_px=rng.uniform(0.9, 1.6) * scale, tortuosity=0.04)
        _blend(img, 0.9 * np.clip(mask * 2.5, 0, 1), _VESSEL)
    for _ in range(rng.poisson(_NEW_VESSELS[grade])):
        mask = _curve_mask(size, disc[::-1] + rng.normal(0, disc_r, 2), rng.uniform(0, 2 * np.pi),
                           0.25 * size, rng, width_px=0.6 * scale, tortuosity=0.35)
        _blend(img, 0.8 * np.clip(mask * 3, 0, 1), _VESSEL)
    grow = 1.0 + 0.35 * grade  # lesions get larger with grade
    for count, colour, r_range in ((_RED[grade], _RED_LESION, (0.006, 0.014)),
                                   (_EXUDATE[grade], _EXUDATE_COLOUR, (0.005, 0.011)),
                                   (_COTTON[grade], _COTTON_COLOUR, (0.02, 0.035))):
        for cy, cx in _random_points(rng, rng.poisson(count), size, 0.85 * radius):
            _stamp(img, cy, cx, rng.uniform(*r_range) * size * grow, colour, 0.9)
    img[rr > 1.0] = 0.0
    img += rng.normal(0, 0.01, img.shape)  # sensor noise
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _splits(n: int, rng: np.random.Generator, fractions: tuple[float, float, float]) -> list[str]:
    order = rng.permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    split = np.empty(n, dtype=object)
    split[order[:n_train]] = "train"
    split[order[n_train:n_train + n_val]] = "val"
    split[order[n_train + n_val:]] = "test"
    return split.tolist()


def synth2d_cohort(out: str | Path, *, images: int = 100, seed: int = 0, size: int = 224,
                   fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)) -> Path:
    """Write ``images`` PNGs and ``manifest.csv`` into ``out``; returns the manifest path.

    Image i is drawn from ``default_rng([seed, i])``, so a subset of a larger
    run has the same pixels.
    """
    if images < 1:
        raise InputError(f"--images {images}: need at least one image")
    if size < 32:
        raise InputError(f"--size {size}: images must be at least 32 pixels")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grades = rng.choice(5, size=images, p=GRADE_PROBS)
    split = _splits(images, rng, fractions)
    rows = []
    for i, grade in enumerate(grades):
        item_id = f"fundus{i:05d}"
        pixels = render_fundus(int(grade), np.random.default_rng([seed, i]), size)
        rel = f"images/{item_id}.png"
        Image.fromarray(pixels, "RGB").save(out / rel, compress_level=6)
        rows.append({"item_id": item_id, "subject": item_id, "path": rel, "label": int(grade), "split": split[i]})
    return write_manifest(rows, out / "manifest.csv")


def write_manifest(rows: list[dict], path: Path) -> Path:
    """Write ``rows`` (dicts with the same keys) as a CSV manifest at ``path``; returns it."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path

"""The study's train augmentation: eval geometry equal to the pipeline's, each random step
checked against its definition, views reproducible from their seeds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfeat.engine.pipeline.preprocess import prepare_image
from medfeat.export.backbones.spec import Preprocess
from medfeat.kernels.augment2d import StudyAugment, crop_box, eval_view, study_view, view_rng

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IDENTITY = StudyAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), vflip=0.0, hflip=0.0, jitter_p=0.0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["rgb8", "grey16", "float"])
def test_eval_view_is_the_pipeline_eval_input(kind):
    rng = np.random.default_rng(1)
    img = {"rgb8": (rng.random((30, 41, 3)) * 255).astype(np.uint8),
           "grey16": (rng.random((33, 29)) * 65535).astype(np.uint16),
           "float": rng.normal(size=(28, 28)).astype(np.float32)}[kind]
    ref = prepare_image(img, (32, 32), Preprocess("mean_std", {"mean": list(MEAN), "std": list(STD)}))
    np.testing.assert_array_equal(eval_view(img, 32, MEAN, STD), ref)


def test_identity_draws_give_the_eval_view(image):
    """Whole-image crop resized to its own size, no flip, no jitter: the eval view (float32 ulps)."""
    out = study_view(image, np.random.default_rng(0), 32, MEAN, STD, aug=IDENTITY)
    np.testing.assert_allclose(out, eval_view(image, 32, MEAN, STD), atol=1e-5)


@pytest.mark.parametrize("flip, axis", [("hflip", -1), ("vflip", -2)])
def test_flips(image, flip, axis):
    aug = StudyAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0,
                       **{"hflip": 0.0, "vflip": 0.0, flip: 1.0})
    out = study_view(image, np.random.default_rng(0), 32, MEAN, STD, aug=aug)
    np.testing.assert_allclose(out, np.flip(eval_view(image, 32, MEAN, STD), axis), atol=1e-5)


def test_crop_box_follows_random_resized_crop():
    """Tries: area share in scale, aspect in ratio, inside the image; scale > 1 can never fit,
    so the study's (0.8, 1.2) falls back to the central crop as torchvision does."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop_box(rng, 224, 224, (0.3, 0.6), (3 / 4, 4 / 3))
        assert 0 <= top <= 224 - h and 0 <= left <= 224 - w
        assert 0.3 * 224 * 224 * 0.97 <= h * w <= 0.6 * 224 * 224 * 1.03
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    assert crop_box(rng, 224, 224, (1.21, 1.3), (3 / 4, 4 / 3)) == (0, 0, 224, 224)
    areas = [crop_box(rng, 224, 224, (0.8, 1.2), (3 / 4, 4 / 3)) for _ in range(400)]
    full = np.mean([b == (0, 0, 224, 224) for b in areas])
    assert 0.03 < full < 0.3  # all ten tries exceed the image now and then: the central crop
    assert all(b[2] * b[3] >= 0.8 * 224 * 224 * 0.97 for b in areas)


def test_jitter_applies_torchvision_brightness_exactly(image):
    """With only brightness jitter, the view is the eval view in [0, 1] times the drawn factor."""
    aug = StudyAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), vflip=0.0, hflip=0.0, brightness=0.2, contrast=0.0,
                       saturation=0.0, hue=0.0, jitter_p=1.0)
    out = study_view(image, np.random.default_rng(5), 32, (0.0,), (1.0,), aug=aug)
    base = eval_view(image, 32, (0.0,), (1.0,))
    ratio = out[base > 0.05] / base[base > 0.05]
    factor = float(np.median(ratio))
    assert 0.8 <= factor <= 1.2 and not math.isclose(factor, 1.0, abs_tol=1e-4)
    np.testing.assert_allclose(out, np.clip(base * factor, 0, 1), atol=1e-5)


def test_views_are_reproducible_and_distinct(image):
    a = study_view(image, view_rng(3, "item7", 1), 32, MEAN, STD)
    b = study_view(image, view_rng(3, "item7", 1), 32, MEAN, STD)
    c = study_view(image, view_rng(3, "item7", 2), 32, MEAN, STD)
    d = study_view(image, view_rng(3, "item7", 1, epoch=1), 32, MEAN, STD)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, d)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and torch.from_numpy(a).isfinite().all()


def test_grey_first_channel_zeros_the_others():
    grey = (np.random.default_rng(2).random((40, 40)) * 255).astype(np.uint8)
    out = study_view(grey, view_rng(0, "g", 1), 32, MEAN, STD, gray="first_channel")
    assert np.all(out[1:] == 0) and np.any(out[0] != 0)
    rep = study_view(grey, view_rng(0, "g", 1), 32, (0.5,), (0.25,))
    np.testing.assert_allclose(rep[0], rep[1], atol=1e-6)  # grey fed to every channel

"""2D ops against torch.nn.functional.interpolate and plain NumPy.

Tolerance: 1e-5 of the pixel range (float32 rounding of two bilinear
implementations); the fused ``prepare_images`` matches the unfused chain
(resize, crop, gray-to-RGB, normalise) to 1e-5 in float32.
"""
import numpy as np
import pytest

from medfeat.errors import InputError
from medfeat.kernels import center_crop, gray_to_rgb, normalize, prepare_images, resize
from medfeat.kernels.image2d import IMAGENET_MEAN, IMAGENET_STD

torch = pytest.importorskip("torch")


def test_resize_matches_torch_bilinear():
    x = np.random.default_rng(0).random((3, 17, 23)).astype(np.float32)
    for size in [(8, 11), (30, 40)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=size, mode="bilinear", align_corners=False)
        np.testing.assert_allclose(resize(x, size), ref[:, 0].numpy(), atol=1e-5)


def test_crop_normalize_gray():
    x = np.arange(2 * 9 * 10, dtype=np.float32).reshape(2, 9, 10)
    np.testing.assert_array_equal(center_crop(x, (5, 4)), x[:, 2:7, 3:7])
    assert center_crop(x, (11, 10))[:, 0].max() == 0.0  # padded like torchvision
    rgb = gray_to_rgb(x)
    assert rgb.shape == (2, 3, 9, 10) and np.all(rgb[:, 2] == x)
    n = normalize(rgb, IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(n[:, 1], (x - IMAGENET_MEAN[1]) / IMAGENET_STD[1], rtol=1e-6)
    with pytest.raises(InputError, match="images: expected"):
        normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def _unfused(img, resize_to, crop, keep_aspect=True):
    h, w = img.shape[:2]
    nh, nw = (resize_to, int(resize_to * w / h)) if h <= w else (int(resize_to * h / w), resize_to)
    if not keep_aspect:  # torchvision Resize((r, r))
        nh = nw = resize_to
    chans = img[..., None] if img.ndim == 2 else img
    t = torch.from_numpy(chans.astype(np.float32)).permute(2, 0, 1)[None]
    r = torch.nn.functional.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False)[0].numpy()
    r = center_crop(r, (crop, crop)) / 255.0
    if r.shape[0] == 1:
        r = np.repeat(r, 3, axis=0)
    return (r - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]


def test_prepare_images_fused_equals_chain():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (40, 52, 3), dtype=np.uint8), rng.integers(0, 256, (61, 37), dtype=np.uint8)]
    out = np.zeros((2, 3, 24, 24), np.float32)
    prepare_images(imgs, out, resize_to=28, crop=24)
    for b, img in enumerate(imgs):
        np.testing.assert_allclose(out[b], _unfused(img, 28, 24), atol=1e-5 * 4.4)  # 1/std stretches the range to ~4.4
    with pytest.raises(InputError, match="out: expected shape"):
        prepare_images(imgs, np.zeros((2, 3, 20, 20), np.float32), resize_to=28, crop=24)
    with pytest.raises(InputError, match=r"images\[0\]: expected 1 or 3 channels"):
        prepare_images([np.zeros((5, 5, 4), np.uint8)], np.zeros((1, 3, 4, 4), np.float32), resize_to=4, crop=4)


def test_prepare_images_square_resize_equals_chain():
    """``keep_aspect=False``: both sides to ``resize_to`` (torchvision ``Resize((256, 256))``,
    the transfer study's eval transform), then the centre crop."""
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, (40, 70, 3), dtype=np.uint8), rng.integers(0, 256, (61, 37), dtype=np.uint8)]
    out = np.zeros((2, 3, 24, 24), np.float32)
    prepare_images(imgs, out, resize_to=28, crop=24, keep_aspect=False)
    for b, img in enumerate(imgs):
        np.testing.assert_allclose(out[b], _unfused(img, 28, 24, keep_aspect=False), atol=1e-5 * 4.4)
        assert not np.allclose(out[b], _unfused(img, 28, 24))

"""CUDA kernels against their Numba twin and against cupyx.scipy.ndimage (``gpu`` marker).

Tolerances: the CUDA and Numba kernels do the same float64 operations with
round-to-nearest intrinsics (no FMA contraction), so they must agree bit for
bit; against cupyx.scipy.ndimage.affine_transform (float64 coordinates too)
1e-6 for float32. fp16/bf16 outputs: identical to rounding the float32
result. GPU percentiles (device sort) equal the CPU's exact selection to 1e-12
relative.
"""
import numpy as np
import pytest

from medfeat.kernels import (
    AlignConfig,
    Grid,
    IntensityRule,
    affine_transform,
    align,
    box_grid,
    percentile,
    prepare_images,
    resample_normalise,
    rigid_matrix,
)

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")


def _scan(shape, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 100.0, size=shape)
    x[rng.random(shape) < 0.3] = 0.0
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8])
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("mode", ["constant", "grid-constant", "nearest", "reflect", "mirror"])
def test_cuda_equals_numba_twin(dtype, order, mode):
    x = _scan((17, 13, 19), 0, dtype)
    m = rigid_matrix([0.3, -0.2, 0.1], [1.0, -2.0, 0.5])[:3, :3] @ np.diag([1.2, 0.8, 1.1])
    off = np.array([-3.0, 2.5, 1.25])
    kw = dict(output_shape=(21, 11, 16), order=order, mode=mode, cval=7.0)
    cpu = affine_transform(x, m, off, **kw)
    gpu = affine_transform(cp.asarray(x), m, off, **kw)
    assert isinstance(gpu, cp.ndarray) and gpu.dtype == cpu.dtype
    np.testing.assert_array_equal(gpu.get(), cpu)


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("mode", ["constant", "nearest", "reflect", "mirror"])
def test_cuda_matches_cupyx(order, mode):
    from cupyx.scipy import ndimage as cndi

    x = cp.asarray(_scan((20, 24, 18), 1))
    m = rigid_matrix([0.1, 0.2, -0.3], [0, 0, 0])[:3, :3] * 0.9
    off = np.array([2.0, -1.37, 3.0])  # no exact order-0 ties: cupyx rounds them unlike scipy
    ours = affine_transform(x, m, off, output_shape=(16, 16, 16), order=order, mode=mode)
    ref = cndi.affine_transform(x, cp.asarray(m), off, output_shape=(16, 16, 16), order=order, mode=mode)
    np.testing.assert_allclose(ours.get(), ref.get(), rtol=0, atol=1e-6 * float(x.max()))


@pytest.mark.parametrize("rule", [IntensityRule(), IntensityRule("zscore"), IntensityRule("ct_window", window=(0.0, 300.0))], ids=str)
def test_fused_batch_equals_cpu(rule):
    vols = [_scan((12, 10, 14), 2), _scan((16, 12, 10), 3)]
    affs = [np.diag([1.2, 0.9, 2.0, 1.0]), rigid_matrix([0.1, -0.2, 0.05], [3.0, -2.0, 1.0])]
    roi = box_grid(affs[0], [1, -1, 2], [11, 8, 12], out_shape=(8, 9, 7))
    tfs = [None, rigid_matrix([0.05, 0.0, 0.1], [1.0, 0.5, -1.0])]
    cpu = np.zeros((2, 2, 8, 9, 7), np.float32)
    resample_normalise(vols, affs, roi, cpu, transforms=tfs, channel=1, rule=rule)
    gpu = cp.zeros((2, 2, 8, 9, 7), cp.float32)
    resample_normalise([cp.asarray(v) for v in vols], affs, roi, gpu, transforms=tfs, channel=1, rule=rule)
    # GPU statistics come from cupy reductions (other summation order): 1e-5 relative.
    np.testing.assert_allclose(gpu.get(), cpu, rtol=1e-5, atol=1e-5)
    half = cp.zeros((2, 2, 8, 9, 7), cp.float16)
    resample_normalise([cp.asarray(v) for v in vols], affs, roi, half, transforms=tfs, channel=1, rule=rule)
    np.testing.assert_allclose(half.get().astype(np.float32), gpu.get().astype(np.float16).astype(np.float32), atol=2e-3)


def test_fused_into_torch_bf16_cuda():
    torch = pytest.importorskip("torch")
    vol = _scan((10, 10, 10), 4)
    grid = Grid((6, 6, 6), np.diag([1.5, 1.5, 1.5, 1.0]))
    t = torch.zeros(1, 3, 6, 6, 6, dtype=torch.bfloat16, device="cuda")
    resample_normalise([cp.asarray(vol)], [np.eye(4)], grid, t, channel=2)
    ref = np.zeros((1, 3, 6, 6, 6), np.float32)
    resample_normalise([vol], [np.eye(4)], grid, ref, channel=2)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(t.float().cpu().numpy(), torch.from_numpy(ref).bfloat16().float().numpy())


def test_percentile_on_gpu():
    x = _scan((20, 21, 22), 5)
    for q in (0.0, 50.0, 99.0, 99.9):
        assert percentile(cp.asarray(x), q) == pytest.approx(percentile(x, q), rel=1e-12)


def test_prepare_images_on_gpu():
    rng = np.random.default_rng(6)
    imgs = [rng.integers(0, 256, (40, 52, 3), dtype=np.uint8), rng.integers(0, 256, (61, 37), dtype=np.uint8)]
    cpu = np.zeros((2, 3, 24, 24), np.float32)
    prepare_images(imgs, cpu, resize_to=28, crop=24)
    gpu = cp.zeros((2, 3, 24, 24), cp.float32)
    prepare_images([cp.asarray(i) for i in imgs], gpu, resize_to=28, crop=24)
    np.testing.assert_allclose(gpu.get(), cpu, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["gauss-newton", "adam"])
def test_align_on_cuda_matches_cpu(optimizer):
    from scipy.ndimage import gaussian_filter

    fixed = gaussian_filter(np.random.default_rng(7).standard_normal((32, 32, 32)), 3).astype(np.float32)
    a = np.diag([1.5, 1.0, 1.0, 1.0])
    t = rigid_matrix([0.05, -0.08, 0.1], [2.0, -1.0, 1.5], center=[24, 16, 16])
    moving = affine_transform(fixed, *_pull(a, np.linalg.inv(t)), mode="nearest")
    cfg = AlignConfig(size=32, iterations=(60, 40, 25), samples=16384, optimizer=optimizer)
    est_gpu = align([cp.asarray(moving)], [cp.asarray(fixed)], [a], [a], config=cfg)[0]
    est_cpu = align([moving], [fixed], [a], [a], config=cfg)[0]
    np.testing.assert_allclose(est_gpu, est_cpu, atol=0.2)
    np.testing.assert_allclose(est_gpu, t, atol=0.5)


def _pull(a, t):
    full = np.linalg.inv(a) @ t @ a
    return full[:3, :3], full[:3, 3]

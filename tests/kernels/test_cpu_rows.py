"""Row splitting of the Numba resampler (interior run, cval-filled ends, tested voxels) against SciPy.

``_cpu._resample`` cuts each output row into a run sampled without tests,
and in 'constant' mode into ends filled with cval without sampling; both
cuts come from solving the linear coordinate with safety margins. These
maps put row crossings of the source edges exactly on representable
coordinates (-1, 0, n-1, n and just beside them), use tiny and zero slopes,
and unit-length axes, where a wrong cut would show. Tolerances as in
test_affine.py: float64 within 1e-12 of SciPy (bit-for-bit, atol 0, in
the constant modes), float32 within
1e-6 of the data's largest magnitude.
"""
import numpy as np
import pytest
import scipy.ndimage as ndi

from medfeat.kernels import affine_transform

# (matrix, offset, output shape) for a (6, 5, 7) source: rows that enter and leave the volume.
CASES = [
    # unit step along the last axis: coordinates hit -2..n+1 exactly
    (np.eye(3), [0.0, 0.0, -2.0], (6, 5, 12)),
    (np.eye(3), [5.0, 4.0, -3.0], (1, 1, 13)),
    # half steps, and a row starting just below 0 / ending just above n-1
    (np.diag([1.0, 1.0, 0.5]), [0.0, 0.0, -1.5], (6, 5, 20)),
    (np.diag([1.0, 1.0, 0.5]), [0.0, 0.0, -1e-12], (6, 5, 14)),
    (np.diag([1.0, 1.0, 0.5]), [0.0, 0.0, 1e-12], (6, 5, 14)),
    # oblique rows that cross the first two axes' edges too
    (np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -0.25], [0.0, 0.0, 1.0]]), [-2.0, 1.0, -1.0], (6, 5, 10)),
    (np.array([[0.5, 0.0, 0.125], [0.25, 1.0, 0.375], [0.0, 0.5, 0.75]]), [-1.0, -0.5, -2.0], (8, 7, 16)),
    # tiny and zero slopes along the row
    (np.array([[1.0, 0.0, 1e-15], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), [5.0, 0.0, -1.0], (2, 5, 9)),
    (np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), [0.0, -1.0, 5.0], (6, 3, 8)),
    (np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), [0.0, -1.0, 6.5], (6, 3, 8)),
    # reversed direction
    (np.diag([1.0, 1.0, -0.75]), [0.0, 0.0, 8.0], (6, 5, 15)),
]


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("mode", ["constant", "grid-constant", "nearest", "mirror"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_rows_match_scipy(case, mode, order):
    m, off, shape = CASES[case]
    x64 = np.random.default_rng(case).uniform(1.0, 2.0, size=(6, 5, 7))
    kw = dict(output_shape=shape, order=order, mode=mode, cval=-3.0)
    ref = ndi.affine_transform(x64, m, off, **kw)
    # Bit-for-bit in the constant modes; elsewhere 1e-12 as in test_affine.py (folding a coordinate
    # a few ulps past the edge, as the tiny slopes do, may round differently from SciPy by 1 ulp).
    atol = 0.0 if mode in ("constant", "grid-constant") else 1e-12
    np.testing.assert_allclose(affine_transform(x64, m, off, **kw), ref, rtol=0, atol=atol)
    x32 = x64.astype(np.float32)
    ref32 = ndi.affine_transform(x32.astype(np.float64), m, off, **kw)
    got32 = affine_transform(x32, m, off, **kw)
    np.testing.assert_allclose(got32, ref32, rtol=0, atol=1e-6 * 3.0)


def test_unit_axes_constant():
    """Axes of length 1: only coordinate exactly 0 is inside; everything else is cval."""
    x = np.random.default_rng(9).standard_normal((1, 1, 5))
    m = np.array([[1.0, 0.0, 0.25], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    for off in ([-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [-0.5, 0.0, 0.5]):
        kw = dict(output_shape=(1, 2, 9), order=1, mode="constant", cval=7.0)
        np.testing.assert_allclose(affine_transform(x, m, off, **kw), ndi.affine_transform(x, m, off, **kw), rtol=0, atol=0)

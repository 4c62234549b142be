"""Fused resample + ROI + intensity + cast, and exact percentiles.

References: np.percentile (linear method; agreement to 1e-12 relative, the
same order statistics are selected), and the unfused pipeline built from
scipy.ndimage.affine_transform + NumPy clip/scale/cast (float32 output
within 1e-6 of the data's normalised range; fp16/bf16 within one rounding of
the float32 result).
"""
import numpy as np
import pytest
import scipy.ndimage as ndi

from medfeat.errors import InputError
from medfeat.kernels import (
    Grid,
    IntensityRule,
    box_grid,
    index_map,
    percentile,
    resample_normalise,
    rigid_matrix,
    rule_params,
)
from medfeat.kernels.intensity import normalise_reference


def _scan(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 100.0, size=shape).astype(np.float32)
    x[rng.random(shape) < 0.3] = 0.0  # background ties, like MRI
    return x


@pytest.mark.parametrize("q", [0.0, 1.0, 37.5, 50.0, 99.0, 99.9, 100.0])
def test_percentile_is_exact(q):
    x = _scan((13, 17, 11), 0)
    assert percentile(x, q) == pytest.approx(float(np.percentile(x.astype(np.float64), q)), rel=1e-12, abs=1e-9)
    assert percentile(np.full((3, 3, 3), 2.5, np.float32), q) == 2.5
    xi = np.random.default_rng(1).integers(-1000, 3000, size=(9, 8, 7)).astype(np.int16)
    assert percentile(xi, q) == pytest.approx(float(np.percentile(xi, q)), rel=1e-12)


def test_percentile_rejects_bad_q():
    with pytest.raises(InputError, match="q: percentiles"):
        percentile(np.zeros(4, np.float32), 101)


def _reference(vol, aff, grid, tf, rule, cval=None):
    """Unfused pipeline: clamp the scan, resample with SciPy, scale (float64)."""
    lo, hi, shift, scale = rule_params(vol, rule)
    m, off = index_map(aff, grid, tf)
    fill = (lo if np.isfinite(lo) else 0.0) if cval is None else cval
    clamped = np.clip(vol.astype(np.float64), lo, hi)
    res = ndi.affine_transform(clamped, m, off, output_shape=grid.shape, order=1, mode="constant", cval=min(max(fill, lo), hi))
    return (res - shift) * scale


RULES = [IntensityRule(), IntensityRule(lower=1.0, upper=99.5), IntensityRule("zscore"), IntensityRule("ct_window", window=(50.0, 400.0)), IntensityRule("none")]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.kind + str(r.lower))
def test_fused_matches_unfused_pipeline(rule):
    vols = [_scan((12, 10, 9), 1), _scan((9, 11, 13), 2)]
    affs = [np.diag([1.2, 0.9, 2.0, 1.0]), rigid_matrix([0.1, -0.2, 0.05], [3.0, -2.0, 1.0]) @ np.diag([1.0, 1.0, 1.5, 1.0])]
    roi = box_grid(affs[0], [1, -1, 2], [11, 8, 8], out_shape=(6, 7, 5))  # an ROI reaching outside scan 0
    tfs = [None, rigid_matrix([0.05, 0.0, 0.1], [1.0, 0.5, -1.0], center=[6, 5, 7])]
    out = np.full((2, 2, 6, 7, 5), 9.0, np.float32)
    resample_normalise(vols, affs, roi, out, transforms=tfs, channel=1, rule=rule)
    assert np.all(out[:, 0] == 9.0)  # the other channel is untouched
    span = 1.0 if rule.kind in ("percentile_clamp", "ct_window") else float(np.abs(out[:, 1]).max())
    for b in range(2):
        ref = _reference(vols[b], affs[b], roi, tfs[b], rule)
        np.testing.assert_allclose(out[b, 1], ref, rtol=0, atol=1e-6 * max(span, 1.0))
    if rule == IntensityRule():
        assert out[:, 1].min() >= 0.0 and out[:, 1].max() <= 1.0
        # the uniGradICON rule, written out in plain NumPy, on an identity grid
        one = np.zeros((1, 1) + vols[0].shape, np.float32)
        resample_normalise(vols[:1], affs[:1], Grid(vols[0].shape, affs[0]), one, rule=rule)
        np.testing.assert_allclose(one[0, 0], normalise_reference(vols[0], rule), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_outputs(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    npd = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    vol, aff = _scan((8, 9, 10), 3), np.eye(4)
    grid = Grid((5, 6, 7), np.diag([1.5, 1.4, 1.3, 1.0]))
    ref = np.zeros((1, 1, 5, 6, 7), np.float32)
    resample_normalise([vol], [aff], grid, ref)
    low = np.zeros((1, 1, 5, 6, 7), npd)
    resample_normalise([vol], [aff], grid, low)
    np.testing.assert_array_equal(low.astype(np.float32), ref.astype(npd).astype(np.float32))


def test_torch_buffer_on_cpu():
    torch = pytest.importorskip("torch")
    vol = _scan((8, 8, 8), 4)
    grid = Grid((4, 4, 4), np.diag([2.0, 2.0, 2.0, 1.0]))
    t = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bfloat16)
    ref = np.zeros((1, 1, 4, 4, 4), np.float32)
    resample_normalise([vol], [np.eye(4)], grid, t)
    resample_normalise([vol], [np.eye(4)], grid, ref)
    np.testing.assert_array_equal(t.float().numpy(), torch.from_numpy(ref).bfloat16().float().numpy())


def test_bad_inputs_name_the_argument():
    vol = _scan((6, 6, 6), 5)
    grid = Grid((4, 4, 4), np.eye(4))
    out = np.zeros((1, 1, 4, 4, 4), np.float32)
    bad = vol.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(InputError, match=r"volumes\[0\]: contains NaN"):
        resample_normalise([bad], [np.eye(4)], grid, out)
    with pytest.raises(InputError, match="source_affine: singular"):
        resample_normalise([vol], [np.zeros((4, 4)) + np.eye(4)[3]], grid, out)
    with pytest.raises(InputError, match="out: dtype int32"):
        resample_normalise([vol], [np.eye(4)], grid, np.zeros((1, 1, 4, 4, 4), np.int32))
    with pytest.raises(InputError, match=r"targets\[0\]: grid shape"):
        resample_normalise([vol], [np.eye(4)], Grid((3, 4, 4), np.eye(4)), out)
    with pytest.raises(InputError, match="rule.kind"):
        IntensityRule("minmax")
    with pytest.raises(InputError, match="rule.window"):
        IntensityRule("ct_window", window=(5, 1))

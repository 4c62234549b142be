"""Intensity rules and exact percentiles, on the CPU (Numba) and the GPU (CuPy).

Every rule reduces to four numbers per volume, which the fused resampler
applies: clamp each interpolation tap to ``[lo, hi]``, interpolate, then
write ``(value - shift) * scale``. Statistics (percentiles, min, mean, std)
are computed over the whole *source* volume, before resampling, as
uniGradICON does (it clamps the scan to [min, p99] and only then resizes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import numpy as np

from medfeat.errors import InputError
from medfeat.kernels import _checks
from medfeat.kernels._checks import Array

# The names of the backbone specs' rules (medfeat.export.backbones.spec.Preprocess), so a
# rule has one name from the registry to the kernel.
_KINDS = ("percentile_clamp", "zscore", "ct_window", "none")
_NBINS = 1 << 16


@dataclass(frozen=True)
class IntensityRule:
    """How to map scanner intensities to model input.

    kind : 'percentile_clamp' clamps to [lower percentile (None: the minimum),
        upper percentile] and scales that range to [0, 1] (uniGradICON MRI:
        ``IntensityRule()``); 'ct_window' does the same with fixed bounds
        ``window=(lo, hi)`` in scanner units (CT: (-1000, 1000) HU);
        'zscore' subtracts the mean and divides by the standard deviation;
        'none' passes values through.
    """

    kind: str = "percentile_clamp"
    lower: float | None = None
    upper: float = 99.0
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InputError(f"rule.kind: unknown intensity rule {self.kind!r}; choose one of {_KINDS}")
        if self.kind == "ct_window":
            if self.window is None or len(self.window) != 2 or not float(self.window[0]) < float(self.window[1]):
                raise InputError(f"rule.window: need (lo, hi) with lo < hi, got {self.window!r}")
        for name, q in (("lower", self.lower), ("upper", self.upper)):
            if q is not None and not 0.0 <= float(q) <= 100.0:
                raise InputError(f"rule.{name}: percentile must lie in [0, 100], got {q!r}")

    def window_bounds(self) -> tuple[float, float]:
        """(lo, hi) of a 'ct_window' rule, scanner units."""
        if self.window is None:
            raise InputError(f"rule.window: a {self.kind!r} rule has no window")
        return float(self.window[0]), float(self.window[1])


def _select_cpu(flat: np.ndarray, ranks: list[int]) -> list[float]:
    """Exact order statistics of ``flat`` at ``ranks`` (0-based) via histogram selection.

    float32: one parallel pass builds a 65536-bin histogram of order-preserving
    keys of the float bits (radix select), a second gathers the few values in
    the bins holding the ranks, which are then sorted. Other dtypes: the same
    with equal-width value bins after a min/max. Exact like np.partition, but
    parallel and without copying the volume.
    """
    from medfeat.kernels import _cpu

    if flat.dtype == np.float32:
        counts = _cpu.key_histogram(flat.view(np.uint32))
        cum = np.cumsum(counts)
        bins = sorted({int(np.searchsorted(cum, r, side="right")) for r in ranks})
        total = int(sum(counts[b] for b in bins))
        keys = np.sort(_cpu.key_gather(flat.view(np.uint32), np.asarray(bins, dtype=np.uint32), total))
        neg = keys < np.uint32(0x80000000)
        vals = np.where(neg, ~keys, keys ^ np.uint32(0x80000000)).view(np.float32)
        out = []
        for r in ranks:
            b = int(np.searchsorted(cum, r, side="right"))
            # position of rank r among the gathered (bin-ordered) values
            offset = sum(int(counts[c]) for c in bins if c < b)
            out.append(float(vals[offset + r - (int(cum[b - 1]) if b > 0 else 0)]))
        return out
    lo, hi = float(flat.min()), float(flat.max())
    if lo == hi:
        return [lo] * len(ranks)
    width = (hi - lo) / _NBINS
    counts = _cpu.histogram_bins(flat, lo, width, _NBINS)
    cum = np.cumsum(counts)
    bins = [int(np.searchsorted(cum, r, side="right")) for r in ranks]
    b_lo, b_hi = min(bins), max(bins)
    total = int(cum[b_hi] - (cum[b_lo - 1] if b_lo > 0 else 0))
    vals = np.sort(_cpu.gather_bins(flat, lo, width, _NBINS, b_lo, b_hi, total))
    before = int(cum[b_lo - 1]) if b_lo > 0 else 0
    return [float(vals[r - before]) for r in ranks]


@overload
def percentile(x: Array, q: float) -> float: ...


@overload
def percentile(x: Array, q: list[float]) -> list[float]: ...


def percentile(x: Array, q: float | list[float]) -> float | list[float]:
    """Exact percentile(s) of all voxels, with np.percentile's 'linear' method.

    numpy input: Numba histogram selection; cupy input: a device sort and a
    gather of the needed ranks. Both then interpolate like np.percentile, so
    they match it to float64 rounding.
    Returns a float or a list of floats (host values).
    """
    qs = [float(v) for v in np.atleast_1d(q)]
    if any(not 0.0 <= v <= 100.0 for v in qs):
        raise InputError(f"q: percentiles must lie in [0, 100], got {qs}")
    xp = _checks.array_module(x)
    n = int(x.size)
    pos = [v / 100.0 * (n - 1) for v in qs]
    ranks = sorted({int(np.floor(p)) for p in pos} | {min(int(np.floor(p)) + 1, n - 1) for p in pos})
    if xp is np:
        values = _select_cpu(np.ascontiguousarray(x).ravel(), ranks)
    else:
        # A device radix sort in the native dtype (no float64 copy), then a gather.
        # (A histogram selection like the CPU's measured slower on an H100: bincount's
        # atomics contend on the few bins that hold most voxels.)
        values = [float(v) for v in xp.sort(x.ravel())[xp.asarray(ranks)].get()]
    stats = dict(zip(ranks, values))
    res = []
    for p in pos:
        k = int(np.floor(p))
        a, b, t = stats[k], stats[min(k + 1, n - 1)], p - k
        # numpy's _lerp: a + (b-a)*t, taken from the upper end when t >= 0.5.
        res.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)
    return res if np.ndim(q) else res[0]


def _min_max(x: Array) -> tuple[float, float]:
    # NumPy's SIMD reductions beat a scalar Numba loop here.
    return float(x.min()), float(x.max())


def _mean_std(x: Array) -> tuple[float, float]:
    xp = _checks.array_module(x)
    if xp is np:
        from medfeat.kernels import _cpu

        m, s = _cpu.mean_std(np.ascontiguousarray(x).ravel())
        return float(m), float(s)
    x64 = x.astype(xp.float64)
    return float(x64.mean()), float(x64.std())


def rule_params(volume: Array, rule: IntensityRule) -> tuple[float, float, float, float]:
    """(lo, hi, shift, scale) of ``rule`` for this volume: out = (clamp(v, lo, hi) - shift) * scale.

    A constant volume under 'percentile_clamp' maps to 0 (scale 0) rather than
    dividing by zero; a constant volume under 'zscore' gets scale 1.
    """
    inf = float("inf")
    if rule.kind == "none":
        return -inf, inf, 0.0, 1.0
    if rule.kind == "zscore":
        mean, std = _mean_std(volume)
        return -inf, inf, mean, (1.0 / std if std > 0 else 1.0)
    if rule.kind == "ct_window":
        lo, hi = rule.window_bounds()
    elif rule.lower is None:
        lo, _ = _min_max(volume)
        hi = percentile(volume, rule.upper)
    else:
        lo, hi = percentile(volume, [rule.lower, rule.upper])
    return lo, hi, lo, (1.0 / (hi - lo) if hi > lo else 0.0)


def normalise_reference(volume: np.ndarray, rule: IntensityRule) -> np.ndarray:
    """Plain NumPy application of ``rule`` (float64), the reference for tests."""
    v = np.asarray(volume, dtype=np.float64)
    if rule.kind == "none":
        return v
    if rule.kind == "zscore":
        return (v - v.mean()) / (v.std() or 1.0)
    if rule.kind == "ct_window":
        lo, hi = rule.window_bounds()
    else:
        lo = v.min() if rule.lower is None else np.percentile(v, rule.lower)
        hi = np.percentile(v, rule.upper)
    return (np.clip(v, lo, hi) - lo) / (hi - lo)

"""The fused preprocessing op: world-space resample + ROI + intensity rule + cast, batched.

One pass over the output: each output voxel is sampled from its source scan
(taps clamped by the rule), scaled, cast and written straight into a
preallocated (batch, channels, D, H, W) model-input buffer. On cupy data the
whole batch is one kernel launch; on numpy data the Numba twin runs once per
volume, each parallel over slices.

The ROI is part of the target grid: pass ``box_grid(...)`` (an ROI in a scan's
or the atlas's voxel box, resized to the model's input shape) and only the ROI
is ever sampled.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from medfeat.errors import InputError
from medfeat.kernels import _checks
from medfeat.kernels._checks import Array
from medfeat.kernels.geometry import Grid, index_map
from medfeat.kernels.intensity import IntensityRule, rule_params

DEFAULT_RULE = IntensityRule()  # frozen: one shared default instance is safe


def out_kind(out: Any) -> tuple[str, str]:  # out: numpy, cupy or torch
    """(device, dtype name) of the output buffer: numpy, cupy or torch."""
    mod = type(out).__module__
    if mod.startswith("torch"):
        name = str(out.dtype).replace("torch.", "")
        return ("cuda" if out.is_cuda else "cpu"), name
    xp = _checks.array_module(out)
    name = np.dtype(out.dtype).name
    return ("cpu" if xp is np else "cuda"), name


def _check_out(out: Any) -> tuple[str, str, tuple[int, ...]]:
    device, name = out_kind(out)
    shape = tuple(int(s) for s in out.shape)
    if len(shape) != 5:
        raise InputError(f"out: expected a (batch, channels, D, H, W) buffer, got shape {shape}")
    if name not in ("float32", "float16", "bfloat16"):
        raise InputError(f"out: dtype {name} unsupported; use float32, float16 or bfloat16")
    contiguous = out.is_contiguous() if hasattr(out, "is_contiguous") else out.flags.c_contiguous
    if not contiguous:
        raise InputError("out: must be C-contiguous")
    return device, name, shape


def _default_cval(rule: IntensityRule, lo: float) -> float:
    """Fill for voxels outside the scan: the rule's lower clamp (0 after scaling), else 0."""
    return lo if np.isfinite(lo) else 0.0


def resample_normalise(
    volumes: Sequence[Array],
    source_affines: Sequence[npt.ArrayLike],
    targets: Grid | Sequence[Grid],
    out: Any,  # numpy, cupy or torch
    *,
    transforms: Sequence[npt.ArrayLike | None] | None = None,
    channel: int = 0,
    rule: IntensityRule = DEFAULT_RULE,
    order: int = 1,
    mode: str = "constant",
    cval: float | None = None,
) -> Any:
    """Fill ``out[b, channel]`` with volume b resampled onto its target grid and normalised.

    Parameters
    ----------
    volumes : B arrays (D_b, H_b, W_b), numpy or cupy (all on one device, one dtype).
    source_affines : B 4x4 voxel -> world (mm) affines.
    targets : one Grid for all, or B Grids (ROIs per subject); each grid's
        shape must equal out's (D, H, W).
    out : (B, C, D, H, W) buffer: numpy (float32, float16, ml_dtypes.bfloat16),
        cupy (float32, float16) or a torch tensor (float32, float16, bfloat16)
        on the matching device.
    transforms : optional B world->world alignment transforms (target world to
        source world; see :mod:`medfeat.kernels.geometry`).
    rule : intensity rule; its statistics come from each whole source volume.
    cval : fill for target voxels outside the scan, in scanner units; None
        uses the rule's lower clamp (so the fill becomes 0 after scaling).

    Returns ``out``. Against the unfused reference (clamp the scan, resample
    with SciPy in float64, scale, cast) float32 output agrees to 1e-6 of the
    normalised range; fp16/bf16 outputs are the float32 result rounded to
    nearest even. numpy and cupy (one launch per batch) results are identical.
    """
    b = len(volumes)
    device, dtype_name, shape = _check_out(out)
    if b != shape[0] or len(source_affines) != b:
        raise InputError(f"volumes: got {b} volumes and {len(source_affines)} affines for a batch of {shape[0]}")
    if not 0 <= channel < shape[1]:
        raise InputError(f"channel: {channel} outside the buffer's {shape[1]} channels")
    grids = [targets] * b if isinstance(targets, Grid) else list(targets)
    tfs = [None] * b if transforms is None else list(transforms)
    if len(grids) != b or len(tfs) != b:
        raise InputError(f"targets/transforms: expected {b} of each")
    order = _checks.check_order(order)
    code = _checks.mode_code(mode)
    mats = np.zeros((b, 12))
    params = np.zeros((b, 5))
    for i, (vol, aff, grid, tf) in enumerate(zip(volumes, source_affines, grids, tfs)):
        _checks.check_volume(f"volumes[{i}]", vol, (3,))
        if grid.shape != shape[2:]:
            raise InputError(f"targets[{i}]: grid shape {grid.shape} differs from out's {shape[2:]}")
        m, off = index_map(aff, grid, tf)
        mats[i] = np.concatenate([m, off[:, None]], axis=1).ravel()
        lo, hi, shift, scale = rule_params(vol, rule)
        fill = _default_cval(rule, lo) if cval is None else _checks.check_cval(cval)
        params[i] = (lo, hi, shift, scale, fill)
    xp = _checks.array_module(volumes[0])
    if (xp is np) != (device == "cpu"):
        raise InputError("out: must be on the same device as the volumes")
    if xp is np:
        launch_cpu(volumes, mats, params, out, dtype_name, channel, order, code)
    else:
        launch_gpu(volumes, mats, params, out, dtype_name, shape, channel, order, code)
    return out


def launch_cpu(volumes, mats, params, out, dtype_name, channel, order, code) -> None:
    from medfeat.kernels import _cpu

    if type(out).__module__.startswith("torch"):
        import torch

        # A view with numpy-compatible storage; bf16 goes through ml_dtypes.
        out = out.view(torch.int16).numpy().view(_np_dtype(dtype_name)) if out.dtype != torch.float32 else out.numpy()
    scratch = None
    for i, vol in enumerate(volumes):
        m = mats[i].reshape(3, 4)
        dst = out[i, channel]
        if dst.dtype != np.float32:
            # Numba has no bf16 store; sample in fp32, then cast once (round to nearest even).
            scratch = np.empty(dst.shape, np.float32) if scratch is None else scratch
            target = scratch
        else:
            target = dst
        lo, hi, shift, scale, fill = params[i]
        _cpu.fused3d(np.ascontiguousarray(vol), m[:, :3].copy(), m[:, 3].copy(), target, order, code, fill, lo, hi, shift, scale)
        if target is not dst:
            dst[...] = target.astype(dst.dtype)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def launch_gpu(volumes, mats, params, out, dtype_name, shape, channel, order, code) -> None:
    import cupy as cp

    from medfeat.kernels import _gpu

    srcs = [cp.ascontiguousarray(v) for v in volumes]
    if len({s.dtype for s in srcs}) != 1:
        raise InputError("volumes: all volumes of a GPU batch must share one dtype")
    ptr = out.data_ptr() if type(out).__module__.startswith("torch") else out
    _gpu.fused3d(srcs, mats, params, ptr, _gpu.OUT_KINDS[dtype_name], shape, channel, order, code)

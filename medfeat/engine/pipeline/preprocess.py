"""Scan -> model input: world-space resampling to the model grid, alignment, ROI crop, intensity.

3D inputs are resampled in world space. A *target grid* is a (4, 4) affine mapping target
voxel indices to world mm plus a shape (the model's input size). For a scan ``S`` with header
affine ``A_s`` and a world transform ``T`` (reference world -> scan world, e.g. the
manifest's ``followup_world = T @ baseline_world``), target voxel ``t`` samples scan voxel
``inv(A_s) @ T @ G @ t``: one affine per item, so resampling, alignment and cropping are
one interpolation pass.

Grids use the voxel-centre convention of image resizing: a box spanning continuous
reference indices ``[e0, e1]`` (voxel edges; a whole scan of ``n`` voxels is
``[-0.5, n - 0.5]``) is sampled at ``m`` target voxels whose centres sit at
``e0 + (t + 0.5) * (e1 - e0) / m``.

Intensity statistics (percentiles, mean, std) are taken on the source scan before
resampling, as uniGradICON's preprocessing does (clamp, then resize), so they do not depend
on how much zero padding the target grid adds.

2D images follow the usual eval transform, through the kernels' fused ``prepare_images``:
resize the shorter side to ``size * 256 / 224`` (bilinear, no antialias), centre crop
``size``, scale to [0, 1], grey -> 3 channels (or channel 0 only), per-channel mean/std.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medfeat.errors import InputError, UnknownNameError
from medfeat.export.backbones.spec import Preprocess
from medfeat.kernels import Grid, IntensityRule, affine_transform, prepare_images, resample_normalise
from medfeat.kernels.augment2d import image_source

# Margin around a mask's bounding box for the ROI crop, in mm.
ROI_MARGIN_MM = 10.0


def mask_box(mask: np.ndarray, mask_affine: np.ndarray, ref_affine: np.ndarray,
             ref_to_mask_world: np.ndarray | None = None,
             margin_mm: float = ROI_MARGIN_MM) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of ``mask > 0`` in reference voxel-edge coordinates, with a margin in mm.

    ``ref_to_mask_world`` maps reference world mm to the mask's world mm (identity when the
    mask lives in the reference's world). Returns ``(lo, hi)``, each (3,).
    """
    idx = np.argwhere(mask > 0)
    if len(idx) == 0:
        raise InputError("ROI mask is empty")
    lo_i, hi_i = idx.min(0) - 0.5, idx.max(0) + 0.5
    corners = np.array([[a, b, c, 1.0] for a in (lo_i[0], hi_i[0])
                        for b in (lo_i[1], hi_i[1]) for c in (lo_i[2], hi_i[2])]).T
    world = np.asarray(mask_affine, np.float64) @ corners
    if ref_to_mask_world is not None:
        world = np.linalg.inv(ref_to_mask_world) @ world
    ref = np.linalg.inv(np.asarray(ref_affine, np.float64)) @ world
    spacing = np.linalg.norm(np.asarray(ref_affine, np.float64)[:3, :3], axis=0)
    margin = margin_mm / spacing
    return ref[:3].min(1) - margin, ref[:3].max(1) + margin


def resample(data: np.ndarray, data_affine: np.ndarray, grid: Grid,
             world_transform: np.ndarray | None = None, order: int = 1, mode: str = "constant") -> np.ndarray:
    """Sample a (D, H, W) volume on ``grid``; outside the volume is 0 (``mode="constant"``),
    or the nearest edge voxel (``mode="nearest"``).

    ``world_transform`` (4, 4) maps grid (reference) world mm to the volume's world mm;
    identity when None. Returns float32 of ``grid.shape``.
    """
    m = np.linalg.inv(np.asarray(data_affine, np.float64))
    if world_transform is not None:
        m = m @ np.asarray(world_transform, np.float64)
    m = m @ grid.affine
    out = affine_transform(np.ascontiguousarray(data, np.float32), m[:3, :3], m[:3, 3],
                           output_shape=grid.shape, order=order, mode=mode, cval=0.0)
    return np.asarray(out, dtype=np.float32)


# -- intensity ---------------------------------------------------------------------------
def intensity_params(source: np.ndarray, rule: Preprocess) -> tuple[float, float, float, float]:
    """(clamp_lo, clamp_hi, shift, scale) so that ``(clip(x, lo, hi) - shift) * scale`` applies
    ``rule``, with statistics from the source scan ``source`` (any shape)."""
    p = rule.params
    x = np.asarray(source, dtype=np.float32)
    if rule.rule == "percentile_clamp":
        lo = float(np.percentile(x, p["lower"])) if "lower" in p else float(x.min())
        hi = float(np.percentile(x, p.get("upper", 99.0)))
        return lo, hi, lo, 1.0 / max(hi - lo, 1e-6)
    if rule.rule == "minmax":
        lo, hi = float(x.min()), float(x.max())
        return lo, hi, lo, 1.0 / max(hi - lo, 1e-6)
    if rule.rule == "zscore":
        mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
        return -np.inf, np.inf, mean, 1.0 / max(std, 1e-6)
    if rule.rule == "ct_window":
        lo, hi = float(p.get("lo", -1000.0)), float(p.get("hi", 1000.0))
        return lo, hi, lo, 1.0 / (hi - lo)
    if rule.rule == "none":
        return -np.inf, np.inf, 0.0, 1.0
    raise UnknownNameError(f"intensity rule {rule.rule!r} is not one of percentile_clamp, minmax, "
                           "zscore, ct_window, none for a 3D model")


def apply_intensity(x: np.ndarray, params: tuple[float, float, float, float]) -> np.ndarray:
    """``(clip(x, lo, hi) - shift) * scale`` in float32, in place when ``x`` is float32."""
    lo, hi, shift, scale = params
    x = np.asarray(x, dtype=np.float32)
    if np.isfinite(lo) or np.isfinite(hi):
        np.clip(x, lo, hi, out=x)
    x -= np.float32(shift)
    x *= np.float32(scale)
    return x


def prepare_volume(data: np.ndarray, affine: np.ndarray, grid: Grid, rule: Preprocess,
                   world_transform: np.ndarray | None = None, mode: str = "constant") -> np.ndarray:
    """One scan -> (D, H, W) float32 model input on ``grid`` with ``rule`` applied.

    The rule clamps and scales the source before interpolation (uniGradICON clamps, then
    resizes); outside the scan is 0 after scaling, or its edge voxels with ``mode="nearest"``
    (see :func:`border_mode`). Unfused reference of :func:`prepare_volume_into`.
    """
    params = intensity_params(data, rule)
    scaled = apply_intensity(np.array(data, dtype=np.float32), params)
    return resample(scaled, affine, grid, world_transform, mode=mode)


def border_mode(own_field_of_view: bool) -> str:
    """How samples outside a scan are filled. A scan resampled over its own field of view
    (no crop, no alignment) reaches half a voxel past its outer voxel centres: those samples
    take the edge voxels (``nearest``), as ``F.interpolate``, MONAI's ``Resized`` and
    uniGradICON's resize to 175^3 do. A crop margin or an aligned scan can reach far beyond
    the scan, where nothing is known: zero (``constant``)."""
    return "nearest" if own_field_of_view else "constant"


BORDER_DESCRIPTION = ("linear, world space; edge voxels over the border half-voxel of a scan's own field of "
                      "view, zero beyond a scan")


def kernel_rule(rule: Preprocess) -> IntensityRule:
    """The kernels' :class:`~medfeat.kernels.IntensityRule` equal to a spec's 3D rule."""
    p = rule.params
    if rule.rule == "percentile_clamp":
        return IntensityRule("percentile_clamp", lower=p.get("lower"), upper=float(p.get("upper", 99.0)))
    if rule.rule == "minmax":
        return IntensityRule("percentile_clamp", lower=0.0, upper=100.0)
    if rule.rule == "ct_window":
        return IntensityRule("ct_window", window=(float(p.get("lo", -1000.0)), float(p.get("hi", 1000.0))))
    if rule.rule in ("zscore", "none"):
        return IntensityRule(rule.rule)
    raise UnknownNameError(f"intensity rule {rule.rule!r} is not one of percentile_clamp, minmax, "
                           "zscore, ct_window, none for a 3D model")


def prepare_volume_into(out: np.ndarray, channel: int, data: np.ndarray, affine: np.ndarray, grid: Grid,
                        rule: Preprocess, world_transform: np.ndarray | None = None, mode: str = "constant") -> None:
    """Like :func:`prepare_volume`, written into ``out[0, channel]`` of a (1, C, D, H, W)
    float32 buffer in one fused pass (the kernels' ``resample_normalise``: resample, clamp,
    scale, cast); :func:`prepare_volume` is its unfused reference."""
    resample_normalise([np.ascontiguousarray(data, np.float32)], [affine], grid,
                       out, transforms=[world_transform], channel=channel, rule=kernel_rule(rule), mode=mode)


# -- 2D ----------------------------------------------------------------------------------
GRAY_MODES = ("repeat", "first_channel")


def image_rule(rule: Preprocess, mean_std: tuple[Sequence[float], Sequence[float]] | None) -> Preprocess:
    """The intensity rule a 2D input gets: a dataset's own ``(mean, std)`` when given (the
    transfer study normalises with each dataset's statistics), else the model's ``rule``."""
    if mean_std is None:
        return rule
    return Preprocess("mean_std", {"mean": [float(v) for v in mean_std[0]], "std": [float(v) for v in mean_std[1]]})


def prepare_image(image: np.ndarray, size: Sequence[int], rule: Preprocess, in_channels: int = 3, *,
                  gray: str = "repeat", out: np.ndarray | None = None, keep_aspect: bool = True) -> np.ndarray:
    """A 2D image (H, W) or (H, W, C) of any real dtype -> (in_channels, s, s) float32 model input.

    The kernels' fused eval transform (:func:`medfeat.kernels.prepare_images`): resize so
    the shorter side is ``round(s * 256 / 224)`` (the longer one truncated, as torchvision's
    ``Resize``; with ``keep_aspect=False`` both sides, as ``Resize((256, 256))``; bilinear, half-pixel centres, edge clamp, no antialias, i.e.
    ``F.interpolate(mode="bilinear", align_corners=False)``), centre crop ``s``, scale to
    [0, 1] (by 255 for 8-bit, 65535 for 16-bit, else min-max), then the rule (``mean_std``
    per channel, or ``none``), written straight into ``out`` when given (a row of the batch
    buffer). ``size`` must be square (s, s).

    Grey images (H, W) or (H, W, 1): ``gray="repeat"`` feeds the grey values to all three
    channels (each normalised with its own mean/std); ``"first_channel"`` puts them in
    channel 0 and zeros in channels 1-2, which through the model's first convolution is
    exactly the study's "first channel's weights only" (``GrayConv2d``). RGB(A) images keep
    their channels (alpha dropped). A one-channel model gets the channel mean of RGB.
    """
    if gray not in GRAY_MODES:
        raise UnknownNameError(f"gray mode {gray!r} is not one of {', '.join(GRAY_MODES)}")
    h, w = (int(s) for s in size)
    if h != w:
        raise InputError(f"2D model input must be square for the resize + centre-crop transform, got {h}x{w}")
    src, pixel_scale = image_source(image)  # 8/16-bit as they are (the fused pass scales them)
    mean, std = _mean_std(rule, in_channels)
    if out is None:
        out = np.empty((in_channels, h, w), dtype=np.float32)
    if out.shape != (in_channels, h, w):
        raise InputError(f"2D input buffer has shape {out.shape}, expected {(in_channels, h, w)}")
    resize_to = round(h * 256 / 224)
    if in_channels == 3:
        prepare_images([src], out[None], resize_to=resize_to, crop=h, mean=mean, std=std, pixel_scale=pixel_scale,
                       keep_aspect=keep_aspect)
        if gray == "first_channel" and src.shape[2] == 1:
            out[1:] = 0.0
        return out
    if in_channels != 1:
        raise InputError(f"a 2D model takes 1 or 3 input channels, this one {in_channels}")
    tmp = np.empty((1, 3, h, w), dtype=np.float32)  # unit-range RGB, then the channel mean
    prepare_images([src], tmp, resize_to=resize_to, crop=h, mean=(0.0,) * 3, std=(1.0,) * 3, pixel_scale=pixel_scale,
                   keep_aspect=keep_aspect)
    out[0] = (tmp[0].mean(0) - mean[0]) / std[0]
    return out


def _mean_std(rule: Preprocess, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of a 2D rule, on [0, 1] pixel values (3 entries each)."""
    if rule.rule == "mean_std":
        mean = [float(v) for v in rule.params.get("mean", (0.485, 0.456, 0.406))]
        std = [float(v) for v in rule.params.get("std", (0.229, 0.224, 0.225))]
        if len(mean) not in (1, 3) or len(std) != len(mean) or min(std) <= 0:
            raise InputError(f"mean_std rule needs 1 or 3 means and positive stds, got {mean} / {std}")
        return tuple(mean * (3 // len(mean))), tuple(std * (3 // len(std)))
    if rule.rule in ("none", "minmax"):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    raise UnknownNameError(f"intensity rule {rule.rule!r} is not one of mean_std, minmax, none for a 2D model")


def describe(rule: Preprocess) -> dict[str, Any]:
    """JSON-able description of an intensity rule (for provenance)."""
    return {"rule": rule.rule, "params": dict(rule.params)}

"""medfeat.kernels: resampling, ROI cropping, intensity normalisation and alignment.

One public function per op; the array module decides the device (numpy ->
Numba twin on all cores, cupy -> CUDA kernels from ``cuda/*.cu``).
"""
from medfeat.kernels.affine import affine_transform
from medfeat.kernels.align import AlignConfig, align
from medfeat.kernels.fused import resample_normalise
from medfeat.kernels.geometry import (
    Grid,
    box_grid,
    edge_box_grid,
    fov_grid,
    index_map,
    resample_world,
    rigid_matrix,
    world_box_to_voxels,
)
from medfeat.kernels.image2d import center_crop, gray_to_rgb, normalize, prepare_images, resize
from medfeat.kernels.intensity import IntensityRule, percentile, rule_params
from medfeat.kernels.roi import box_from_mask, crop, mask_roi_grid, paste

__all__ = [
    "AlignConfig",
    "Grid",
    "IntensityRule",
    "affine_transform",
    "align",
    "box_from_mask",
    "box_grid",
    "center_crop",
    "crop",
    "edge_box_grid",
    "fov_grid",
    "gray_to_rgb",
    "index_map",
    "mask_roi_grid",
    "normalize",
    "paste",
    "percentile",
    "prepare_images",
    "resample_normalise",
    "resample_world",
    "resize",
    "rigid_matrix",
    "rule_params",
    "world_box_to_voxels",
]

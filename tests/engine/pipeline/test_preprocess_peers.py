"""The whole-scan model input equals what MONAI's tutorial transforms make of the same file."""
from __future__ import annotations

import numpy as np
import pytest

from medfeat.cohorts.synth import synth_cohort
from medfeat.engine.pipeline.config import Variant
from medfeat.engine.pipeline.inputs import ScanCache, load_item
from medfeat.engine.pipeline.items import Atlas, plan_items
from medfeat.export.backbones.registry import get_spec
from medfeat.io.manifest import read_manifest


def test_whole_scan_input_equals_monai_resized(tmp_path):
    transforms = pytest.importorskip("monai.transforms")
    manifest = synth_cohort(tmp_path / "c", subjects=1, seed=0, shape=(40, 36, 44))
    df = read_manifest(manifest)
    items, _ = plan_items(df, "volume3d", Variant(), Atlas())
    ours = load_item(items[0], get_spec("unet3d"), (48, 48, 48), ScanCache())
    monai = transforms.Compose([
        transforms.LoadImaged(keys="image", image_only=True), transforms.EnsureChannelFirstd(keys="image"),
        transforms.Orientationd(keys="image", axcodes="RAS"),
        transforms.ScaleIntensityRangePercentilesd(keys="image", lower=0, upper=99, b_min=0.0, b_max=1.0, clip=True),
        transforms.Resized(keys="image", spatial_size=(48, 48, 48), mode="trilinear", align_corners=False),
    ])({"image": df["path"][0]})["image"].as_tensor().numpy()
    np.testing.assert_allclose(ours, monai, atol=5e-6)  # float32 rounding (two interpolation orders); borders too

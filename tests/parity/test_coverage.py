"""The parity suite covers every backbone the registry offers.

:data:`COVERED` names, for each registry entry, the parity test that compares it with its
upstream implementation; a new family must add its test here, or this fails.
"""
from __future__ import annotations

from pathlib import Path

from medfeat.export.backbones.models import BACKBONE_MODULES

HERE = Path(__file__).resolve().parent
_2D, _3D, _FX = "test_parity_2d.py", "test_parity_3d.py", "test_parity_fixtures.py"
COVERED = {
    "unigradicon": (_3D, "test_unigradicon_every_tap_equals_make_network"),
    "sam_med3d": (_3D, "test_sam_med3d_every_tap_equals_upstream_encoder"),
    "swin_unetr": (_3D, "test_swin_unetr_every_tap_equals_monai"),
    "swin_unetr_encoder": (_3D, "test_swin_unetr_encoder_ssl_checkpoint_equals_monai_load_from"),
    "unet3d": (_3D, "test_unet3d_every_tap_equals_monai"),
    "sam_vit_b": (_2D, "test_sam_every_tap_equals_segment_anything"),
    "sam_vit_l": (_2D, "test_sam_every_tap_equals_segment_anything"),
    "sam_vit_h": (_2D, "test_sam_every_tap_equals_segment_anything"),
    "dinov2_vits14": (_2D, "test_dinov2_every_tap_equals_transformers"),
    "dinov2_vitb14": (_2D, "test_dinov2_every_tap_equals_transformers"),
    "dinov2_vitl14": (_2D, "test_dinov2_every_tap_equals_transformers"),
    "dinov2_vitg14": (_FX, "test_dinov2_every_tap_equals_original_code"),
    "openclip_vitb16": (_2D, "test_openclip_every_tap_equals_open_clip"),
    "deit_b16": (_2D, "test_imagenet_vits_every_tap_equal_timm"),
    "dino_vitb16": (_FX, "test_dino_every_tap_equals_original_code"),
    "resnet50": (_2D, "test_resnet50_every_tap_equals_torchvision"),
    "resnet152": (_2D, "test_resnet_every_tap_equals_timm"),
    "blip_vitb16": (_FX, "test_blip_every_tap_equals_upstream_vit"),
    "seem_focalt": (_FX, "test_seem_focalnet_every_tap_equals_upstream_focal_dw"),
}


def test_every_registry_entry_has_a_parity_test():
    assert sorted(COVERED) == sorted(BACKBONE_MODULES)
    for name, (module, test) in COVERED.items():
        assert f"def {test}(" in (HERE / module).read_text(), f"{name}: {module}::{test} does not exist"

"""Model families; each module registers its backbones on import.

:data:`BACKBONE_MODULES` is a static index from backbone name to the family module that
registers it, so :func:`medfeat.export.backbones.registry.get_spec` can import one family (and its
architecture package: timm, open_clip, monai, ...) instead of all of them. It must name
exactly what the modules register; ``tests/export/test_registry_index.py`` fails when the
two drift apart. This module stays free of heavy imports (no torch): the CLI imports it
to start fast.
"""
from __future__ import annotations

# backbone name -> module under medfeat.export.backbones.models that registers it
BACKBONE_MODULES: dict[str, str] = {
    "blip_vitb16": "blip",
    "dinov2_vits14": "dinov2",
    "dinov2_vitb14": "dinov2",
    "dinov2_vitl14": "dinov2",
    "dinov2_vitg14": "dinov2",
    "deit_b16": "imagenet",
    "dino_vitb16": "imagenet",
    "resnet50": "imagenet",
    "resnet152": "imagenet",
    "openclip_vitb16": "openclip",
    "sam_vit_b": "sam2d",
    "sam_vit_l": "sam2d",
    "sam_vit_h": "sam2d",
    "sam_med3d": "sam_med3d",
    "seem_focalt": "seem",
    "swin_unetr": "swin_unetr",
    "swin_unetr_encoder": "swin_unetr",
    "unet3d": "unet3d",
    "unigradicon": "unigradicon",
}

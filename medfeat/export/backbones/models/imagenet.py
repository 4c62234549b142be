"""ImageNet baselines: DeiT-B/16, DINO ViT-B/16, ResNet-50 and ResNet-152, on timm.

Checkpoint formats:

* DeiT-B/16 ``timm``: timm's ``deit_base_patch16_224`` weights or the original
  facebookresearch/deit ``deit_base_patch16_224-b5f2ef4d.pth`` (same keys, nested under
  ``model``): ``cls_token``, ``pos_embed`` (1, 197, 768), ``patch_embed.proj.*``,
  ``blocks.N.*``, ``norm.*``; the classifier ``head.*`` is dropped.
* DINO ViT-B/16 ``original``: facebookresearch/dino ``dino_vitbase16_pretrain.pth`` (timm's
  ViT keys, no head) or timm's ``vit_base_patch16_224.dino``.
* ResNet ``timm``: timm's (or torchvision's, same layout) ``conv1``, ``bn1``,
  ``layerL.B.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}``; ``fc.*`` is
  dropped; BatchNorm ``num_batches_tracked`` buffers absent from old files are zero-filled.

Taps: ViTs as DINOv2 (``blocks.N`` raw tokens, ``norm``; default ``cls``); ResNets
``layer1`` .. ``layer4`` (maps at strides 4, 8, 16, 32; default ``avg`` = global average pool,
timm's pre-logits feature).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.models.resnet import Bottleneck, ResNet

from medfeat.export.backbones.models.vit2d import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TappedViT,
    build_vit,
    enable_gray,
    tap_positions,
    vit_taps,
    with_head_dropped,
)
from medfeat.export.backbones.registry import converter_for, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec

IMAGENET = Preprocess("mean_std", {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
VIT_B16: dict[str, Any] = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
VIT_TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2)
RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet152": (3, 8, 36, 3)}
RESNET_TINY = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)


def build_vitb16(name: str, *, gray: str = "repeat", interpolate_offset: float | None = None, **arch: Any) -> TappedViT:
    """Plain ViT-B/16 (DeiT-B, DINO), random init.

    Position embeddings are resampled at other input sizes as the original code does: DINO's
    with the 0.1 offset of facebookresearch/dino, DeiT's with a plain resize (see
    :func:`~medfeat.export.backbones.models.vit2d.resample_pos_embed`).
    """
    cfg = {**VIT_B16, **arch}
    offset = (0.1 if name == "dino_vitb16" else 0.0) if interpolate_offset is None else interpolate_offset
    return build_vit(name, gray, cfg.pop("img_size"), offset, qkv_bias=True, **cfg)


def vitb16_taps(**config: Any) -> tuple[TapSpec, ...]:
    cfg = {**VIT_B16, **config}
    return vit_taps(cfg["depth"], cfg["embed_dim"], cfg["patch_size"], prefix=1, block_pooling="cls",
                    norm_pooling="cls")


def from_timm_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """timm / original DeiT and DINO keys, classifier dropped; None if not a ViT state dict."""
    if "cls_token" not in state or "pos_embed" not in state:
        return None
    return with_head_dropped(state, ("head.", "head_dist."))


class TappedResNet(ResNet, TappedModel):
    """timm ``ResNet`` with taps ``layer1`` .. ``layer4``.

    ``forward(x)`` is timm's ``forward_features``: the (B, C, H/32, W/32) ``layer4`` map.
    """

    medfeat_name: str = "resnet"

    def tap_names(self) -> list[str]:
        return [f"layer{i}" for i in range(1, 5) if len(getattr(self, f"layer{i}")) > 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        """Raw taps: (B, C, H/s, W/s) maps, s = 4, 8, 16, 32."""
        names = self.tap_names()
        wanted = set(tap_positions(self.medfeat_name, names, taps))
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(names[:max(wanted) + 1]):
            x = getattr(self, name)(x)
            if i in wanted:
                out[name] = x
        return out

    def prune_after(self, tap: str) -> None:
        position = tap_positions(self.medfeat_name, self.tap_names(), [tap])[0]
        # timm counts the stem as feature 0
        self.prune_intermediate_layers([position + 1], prune_norm=True, prune_head=True)


def build_resnet(name: str, *, gray: str = "repeat", layers: tuple[int, ...] | None = None,
                 channels: tuple[int, ...] = (64, 128, 256, 512), stem_width: int = 64) -> TappedResNet:
    """timm ResNet-50/152 (bottleneck blocks), random init, no classifier."""
    # timm annotates ``block`` as an instance; it takes the class
    model = TappedResNet(block=Bottleneck,  # type: ignore[arg-type]
                         layers=tuple(layers or RESNET_LAYERS[name]), num_classes=0,
                         channels=tuple(channels), stem_width=stem_width, zero_init_last=False)
    model.medfeat_name = name
    enable_gray(model, "conv1", gray)
    return model


def resnet_taps(**config: Any) -> tuple[TapSpec, ...]:
    channels = config.get("channels", (64, 128, 256, 512))
    return tuple(TapSpec(f"layer{i + 1}", c * Bottleneck.expansion, 4 * 2 ** i, "map", "avg")
                 for i, c in enumerate(channels))


def from_timm_resnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """timm / torchvision ResNet keys, ``fc`` dropped; None if not a ResNet state dict."""
    if "conv1.weight" not in state or "layer1.0.conv1.weight" not in state:
        return None
    out = with_head_dropped(state, ("fc.",))
    for key in [k for k in out if k.endswith(".running_mean")]:
        out.setdefault(key.replace(".running_mean", ".num_batches_tracked"), torch.tensor(0))
    return out


def _register_vit(name: str, title: str, fmt: str, licence: str) -> None:
    register_backbone(BackboneSpec(
        name=name, input_kind="image2d", input_size=(224, 224), in_channels=3, preprocess=IMAGENET,
        taps=vitb16_taps(), build=partial(build_vitb16, name), weight_formats=(fmt,),
        convert_checkpoint=converter_for({fmt: from_timm_vit}, name), tiny_config=dict(VIT_TINY),
        licence=licence, taps_for=vitb16_taps,
        description=f"{title}; taps blocks.0-11 and norm (cls default); config gray=repeat|first_channel",
    ))


_register_vit("deit_b16", "DeiT-B/16 ImageNet-1k supervised baseline", "timm",
              "Apache-2.0 (facebookresearch/deit, timm)")
_register_vit("dino_vitb16", "DINO ViT-B/16 self-supervised ImageNet baseline", "original",
              "Apache-2.0 (facebookresearch/dino)")

for _name in RESNET_LAYERS:
    register_backbone(BackboneSpec(
        name=_name, input_kind="image2d", input_size=(224, 224), in_channels=3, preprocess=IMAGENET,
        taps=resnet_taps(), build=partial(build_resnet, _name), weight_formats=("timm",),
        convert_checkpoint=converter_for({"timm": from_timm_resnet}, _name), tiny_config=dict(RESNET_TINY),
        licence="Apache-2.0 (timm code and ImageNet weights; ImageNet terms apply to the data)",
        taps_for=resnet_taps,
        description=f"{_name.replace('resnet', 'ResNet-')} ImageNet baseline; taps layer1-4 (avg); "
                    "config gray=repeat|first_channel",
    ))

"""Parity of the 2D families whose upstream code installs from PyPI, at every tap, fp32.

Each upstream module is built at a small size (the registry's tiny widths and depths),
perturbed with seeded noise, saved in its released checkpoint's layout (wrapping dict, key
prefixes, heads and other sub-models that medfeat must ignore) and loaded through
``create_backbone``; every raw tap is compared with upstream's tensor at the same place
(forward hooks on upstream's blocks, or upstream's own output). Relative error <= 1e-5.

* SAM ViT-B / L / H: ``segment_anything`` (a whole ``Sam``, as ``sam_vit_*.pth`` holds);
* DINOv2: ``transformers.Dinov2Model`` (hub and transformers-5 key layouts); the original
  facebookresearch/dinov2 layout and code are in ``test_parity_fixtures.py``;
* OpenCLIP: ``open_clip.model.CLIP`` (``open_clip_pytorch_model.bin`` and a training
  checkpoint with DDP keys);
* DeiT-B/16, DINO ViT-B/16, ResNet-50/152: ``timm`` (DeiT's own code is timm's ViT; the
  released DeiT and DINO files are loaded in their layouts), ResNet-50 also against
  ``torchvision`` (the study's ResNet-50 came from torchvision's hub).
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
from parity_common import all_taps, check_taps, load_trunk, randomize, save_checkpoint, seeded_input, upstream
from torch import nn

from medfeat.export.backbones.registry import get_spec

# --------------------------------------------------------------------------- SAM


def _tiny_sam(name: str) -> tuple[nn.Module, dict]:
    """A whole segment-anything ``Sam`` whose image encoder has the variant's heads and
    global-attention pattern, at tiny width and depth."""
    sam_modeling = upstream("segment_anything.modeling")
    heads = {"sam_vit_b": 12, "sam_vit_l": 16, "sam_vit_h": 16}[name]
    config = dict(embed_dim=2 * heads, num_heads=heads, depth=3, global_attn_indexes=(1,))
    cfg = {**get_spec(name).tiny_config, **config}
    torch.manual_seed(0)
    encoder = sam_modeling.ImageEncoderViT(img_size=cfg["img_size"], patch_size=16, embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                              num_heads=cfg["num_heads"], mlp_ratio=4, out_chans=8, qkv_bias=True,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                              window_size=cfg["window_size"], global_attn_indexes=cfg["global_attn_indexes"])
    grid = cfg["img_size"] // 16
    two_way = sam_modeling.TwoWayTransformer(depth=1, embedding_dim=8, mlp_dim=16, num_heads=2)
    sam = sam_modeling.Sam(
        image_encoder=encoder,
        prompt_encoder=sam_modeling.PromptEncoder(embed_dim=8, image_embedding_size=(grid, grid),
                                                  input_image_size=(cfg["img_size"],) * 2, mask_in_chans=4),
        mask_decoder=sam_modeling.MaskDecoder(num_multimask_outputs=3, transformer_dim=8, iou_head_hidden_dim=8,
                                              transformer=two_way))
    return randomize(sam, seed=1), config


@pytest.mark.parametrize("name", ["sam_vit_b", "sam_vit_l", "sam_vit_h"])
def test_sam_every_tap_equals_segment_anything(tmp_path, name):
    sam, config = _tiny_sam(name)
    # sam_vit_*.pth: the whole Sam's state dict, flat (neck, prompt encoder, mask decoder ignored).
    path = save_checkpoint(tmp_path / f"{name}.pth", sam.state_dict())
    trunk = load_trunk(name, path, config=config)
    expected: dict[str, torch.Tensor] = {}
    for i, block in enumerate(sam.image_encoder.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: expected.__setitem__(f"blocks.{i}", o.permute(0, 3, 1, 2)))
    x = seeded_input(2, 3, 64, 64, seed=2)
    with torch.no_grad():
        sam.image_encoder(x)
        ours = trunk.forward_taps(x, trunk.tap_names())
    assert sorted(expected) == sorted(all_taps(name, config))
    check_taps(name, ours, expected)


# --------------------------------------------------------------------------- DINOv2 (transformers)


def _hf_dinov2(name: str) -> tuple[nn.Module, dict]:
    transformers = upstream("transformers")
    tiny = get_spec(name).tiny_config
    config = transformers.Dinov2Config(hidden_size=tiny["embed_dim"], num_hidden_layers=tiny["depth"],
                          num_attention_heads=tiny["num_heads"], mlp_ratio=4, image_size=tiny["img_size"],
                          patch_size=14, use_swiglu_ffn=name == "dinov2_vitg14", layerscale_value=1.0)
    torch.manual_seed(0)
    return randomize(transformers.Dinov2Model(config), seed=3), tiny


def _hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 in-memory names -> the layout of the hub's ``model.safetensors``
    (transformers-4 names under ``dinov2.``... as ``facebook/dinov2-*`` ships them)."""
    out = {}
    for key, value in state.items():
        for new, old in (("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"),
                         ("attention.o_proj", "attention.output.dense"), ("mlp.down_proj", "mlp.weights_out")):
            key = key.replace(new, old)
        if ".mlp.up_proj." in key:
            continue
        if ".mlp.gate_proj." in key:
            value = torch.cat([value, state[key.replace("gate_proj", "up_proj")]], dim=0)
            key = key.replace("gate_proj", "weights_in")
        out[key] = value
    return out


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"])
@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_dinov2_every_tap_equals_transformers(tmp_path, name, layout):
    model, tiny = _hf_dinov2(name)
    state = model.state_dict()
    if layout == "hub":
        state = _hub_names(state)
    path = save_checkpoint(tmp_path / "model.safetensors", state)
    # transformers resamples position embeddings to the output size: offset 0 (see dinov2.py)
    trunk = load_trunk(name, path, config={"interpolate_offset": 0.0})
    for side in (tiny["img_size"], 2 * tiny["img_size"]):  # native grid, then a resampled one
        x = seeded_input(2, 3, side, side, seed=side)
        with torch.no_grad():
            out = model(pixel_values=x, output_hidden_states=True)
            ours = trunk.forward_taps(x, trunk.tap_names())
        expected = {f"blocks.{i}": h for i, h in enumerate(out.hidden_states[1:])}
        expected["norm"] = out.last_hidden_state
        assert sorted(expected) == sorted(all_taps(name))
        check_taps(name, ours, expected)


# --------------------------------------------------------------------------- OpenCLIP


@pytest.mark.parametrize("layout", ["open_clip_pytorch_model", "training_checkpoint"])
def test_openclip_every_tap_equals_open_clip(tmp_path, layout):
    import open_clip

    tiny = get_spec("openclip_vitb16").tiny_config
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(
        embed_dim=tiny["output_dim"],
        vision_cfg=dict(image_size=tiny["image_size"], patch_size=16, width=tiny["width"], layers=tiny["layers"],
                        head_width=tiny["width"] // tiny["heads"]),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
    randomize(clip, seed=4)
    if layout == "open_clip_pytorch_model":  # the hub file: the whole CLIP, flat
        path = save_checkpoint(tmp_path / "open_clip_pytorch_model.bin", clip.state_dict())
    else:  # open_clip's training script: {"epoch", "name", "state_dict": {"module." + key}}
        path = save_checkpoint(tmp_path / "epoch_32.pt", clip.state_dict(), prefix="module.", wrap="state_dict",
                               extra={"epoch": 32, "name": "ViT-B-16"})
    trunk = load_trunk("openclip_vitb16", path)
    expected: dict[str, torch.Tensor] = {}
    blocks = clip.visual.transformer.resblocks
    batch_first = getattr(clip.visual.transformer, "batch_first", True)
    for i, block in enumerate(blocks):
        block.register_forward_hook(
            lambda m, a, o, i=i: expected.__setitem__(f"blocks.{i}", o if batch_first else o.transpose(0, 1)))
    x = seeded_input(2, 3, tiny["image_size"], tiny["image_size"], seed=5)
    with torch.no_grad():
        expected["proj"] = clip.encode_image(x)
        ours = trunk.forward_taps(x, trunk.tap_names())
    assert sorted(expected) == sorted(all_taps("openclip_vitb16"))
    check_taps("openclip_vitb16", ours, expected)


# --------------------------------------------------------------------------- DeiT-B, DINO ViT-B (timm)


def _timm(arch: str, seed: int, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return randomize(timm.create_model(arch, pretrained=False, **kwargs), seed=seed)


def _vit_hooks(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    expected: dict[str, torch.Tensor] = {}
    handles = [block.register_forward_hook(lambda m, a, o, i=i: expected.__setitem__(f"blocks.{i}", o))
               for i, block in enumerate(model.blocks)]
    with torch.no_grad():
        expected["norm"] = model.forward_features(x)
    for handle in handles:
        handle.remove()
    return expected


@pytest.mark.parametrize("name,arch,layout", [
    # facebookresearch/deit deit_base_patch16_224-b5f2ef4d.pth: {"model": {..., head.*}}
    ("deit_b16", "deit_base_patch16_224", "deit"),
    # facebookresearch/dino dino_vitbase16_pretrain.pth: the backbone alone, flat, no head
    ("dino_vitb16", "vit_base_patch16_224", "dino"),
])
def test_imagenet_vits_every_tap_equal_timm(tmp_path, name, arch, layout):
    tiny = get_spec(name).tiny_config
    model = _timm(arch, seed=6, img_size=tiny["img_size"], embed_dim=tiny["embed_dim"], depth=tiny["depth"],
                  num_heads=tiny["num_heads"], num_classes=10 if layout == "deit" else 0)
    if layout == "deit":
        path = save_checkpoint(tmp_path / "deit_base_patch16_224.pth", model.state_dict(), wrap="model",
                               extra={"epoch": 299})
    else:
        path = save_checkpoint(tmp_path / "dino_vitbase16_pretrain.pth", model.state_dict())
    trunk = load_trunk(name, path)
    x = seeded_input(2, 3, tiny["img_size"], tiny["img_size"], seed=7)  # the native grid (timm antialiases others)
    expected = _vit_hooks(model, x)
    with torch.no_grad():
        ours = trunk.forward_taps(x, trunk.tap_names())
    assert sorted(expected) == sorted(all_taps(name))
    check_taps(name, ours, expected)


# --------------------------------------------------------------------------- ResNet-50/152 (timm, torchvision)

RESNET_TINY_CHANNELS = (8, 16, 32, 64)


def _resnet_hooks(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    expected: dict[str, torch.Tensor] = {}
    handles = [getattr(model, f"layer{i}").register_forward_hook(
        lambda m, a, o, i=i: expected.__setitem__(f"layer{i}", o)) for i in range(1, 5)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return expected


@pytest.mark.parametrize("name", ["resnet50", "resnet152"])
def test_resnet_every_tap_equals_timm(tmp_path, name):
    # the real depths (3, 4, 6, 3) / (3, 8, 36, 3), narrow
    config = {"layers": None, "channels": RESNET_TINY_CHANNELS, "stem_width": 8}
    model = _timm(name, seed=8, channels=RESNET_TINY_CHANNELS, stem_width=8)
    path = save_checkpoint(tmp_path / f"{name}.pth", model.state_dict())  # with its fc head
    trunk = load_trunk(name, path, tiny=False, config=config)
    x = seeded_input(2, 3, 64, 64, seed=9)
    expected = _resnet_hooks(model, x)
    with torch.no_grad():
        ours = trunk.forward_taps(x, trunk.tap_names())
    assert sorted(expected) == sorted(all_taps(name, config, tiny=False))
    check_taps(name, ours, expected)


def test_resnet50_every_tap_equals_torchvision(tmp_path):
    """The study's ResNet-50 (torchvision's hub ``resnet50``, ``resnet50-0676ba61.pth``: a flat
    state dict with ``fc``), here with one block per stage at torchvision's widths."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    model = randomize(ResNet(Bottleneck, [1, 1, 1, 1]), seed=10)
    path = save_checkpoint(tmp_path / "resnet50-0676ba61.pth", model.state_dict())
    config = {"layers": (1, 1, 1, 1), "channels": (64, 128, 256, 512), "stem_width": 64}
    trunk = load_trunk("resnet50", path, tiny=False, config=config)
    x = seeded_input(1, 3, 64, 64, seed=11)
    expected = _resnet_hooks(model, x)
    with torch.no_grad():
        ours = trunk.forward_taps(x, trunk.tap_names())
    check_taps("resnet50", ours, expected)

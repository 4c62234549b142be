"""Tests of the 2D backbone zoo (DINOv2, SAM, OpenCLIP, BLIP, SEEM, ImageNet baselines).

Every entry is built with its tiny config. References are the upstream classes where
they install offline (timm, open_clip, segment_anything, transformers); BLIP and SEEM
have no installable upstream (see the checkpoint round-trip tests for what stands in).
Tolerances: 1e-5 absolute on float32 features of order 1 (same ops, different order).
"""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from medfeat.errors import InputError, UnknownNameError, WeightsError
from medfeat.export.backbones.registry import create_backbone, get_spec

MODELS_2D = [
    "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
    "sam_vit_b", "sam_vit_l", "sam_vit_h",
    "openclip_vitb16", "blip_vitb16", "seem_focalt",
    "deit_b16", "dino_vitb16", "resnet50", "resnet152",
]
# one of each distinct tiny architecture (S/L/B DINOv2, SAM B/L/H and ResNet-50/152 share theirs)
DISTINCT = ["dinov2_vits14", "dinov2_vitg14", "sam_vit_b", "openclip_vitb16", "blip_vitb16", "seem_focalt",
            "deit_b16", "resnet50"]
TIMM_VITS = ["dinov2_vits14", "dinov2_vitg14", "blip_vitb16", "deit_b16", "dino_vitb16"]
ATOL = 1e-5


def _side(name: str) -> int:
    """A small input side that is a multiple of the model's patch size."""
    return 56 if name.startswith("dinov2") else 64


def _tiny(name: str, **config):
    spec = get_spec(name)
    cfg = {**spec.tiny_config, **config}
    torch.manual_seed(0)
    model = spec.build(**cfg).eval()
    _perturb(model)
    return spec, cfg, model


@torch.no_grad()
def _perturb(model: nn.Module) -> None:
    """Random, non-trivial parameters (zero layer scales or rel-pos tables would hide bugs)."""
    gen = torch.Generator().manual_seed(1)
    for param in model.parameters():
        param.add_(0.05 * torch.randn(param.shape, generator=gen))


def _image(side: int, batch: int = 2, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=1e-5), (a - b).abs().max().item()


# --------------------------------------------------------------------------- registry entries


FULL_SIZE = {  # name: (number of taps, channels of the last tap)
    "dinov2_vits14": (13, 384), "dinov2_vitb14": (13, 768), "dinov2_vitl14": (25, 1024),
    "dinov2_vitg14": (41, 1536), "sam_vit_b": (12, 768), "sam_vit_l": (24, 1024), "sam_vit_h": (32, 1280),
    "openclip_vitb16": (13, 512), "blip_vitb16": (13, 768), "seem_focalt": (4, 768), "deit_b16": (13, 768),
    "dino_vitb16": (13, 768), "resnet50": (4, 2048), "resnet152": (4, 2048),
}


def test_full_size_tap_tables():
    assert sorted(FULL_SIZE) == sorted(MODELS_2D)
    for name, (count, channels) in FULL_SIZE.items():
        spec = get_spec(name)
        table = spec.tap_table()
        assert (len(table), table[-1].channels) == (count, channels), name
        assert spec.input_size == (224, 224) and spec.tiny_config and spec.licence and spec.weight_formats
        assert len(spec.preprocess.params["mean"]) == len(spec.preprocess.params["std"]) == 3


@pytest.mark.parametrize("name", MODELS_2D)
def test_tap_shapes_forward_and_no_nan(name):
    spec, cfg, model = _tiny(name)
    assert spec.input_kind == "image2d" and spec.in_channels == 3 and spec.preprocess.rule == "mean_std"
    table = spec.tap_table(**cfg)
    assert [t.name for t in table] == model.tap_names()
    side = _side(name)
    x = _image(side)
    with torch.no_grad():
        raw = model.forward_taps(x, [t.name for t in table])
        plain = model(x)
    for tap in table:
        out = raw[tap.name]
        assert torch.isfinite(out).all(), tap.name
        if tap.kind == "map":
            cells = math.ceil(side / tap.reduction)
            assert out.shape == (2, tap.channels, cells, cells), tap.name
        elif tap.kind == "tokens":
            assert out.shape == (2, tap.prefix_tokens + (side // tap.reduction) ** 2, tap.channels), tap.name
        else:
            assert out.shape == (2, tap.channels), tap.name
    # the last tap is the untruncated model's plain forward (upstream's own code path)
    _close(raw[table[-1].name], plain)


@pytest.mark.parametrize("name", DISTINCT)
def test_truncation_keeps_features_and_drops_later_layers(name):
    spec, cfg, full = _tiny(name)
    table = spec.tap_table(**cfg)
    mid = table[len(table) // 2 - 1]
    torch.manual_seed(0)
    backbone = create_backbone(name, [mid.name, 0], tiny=True)
    backbone.trunk.load_state_dict({k: v for k, v in full.state_dict().items() if k in backbone.trunk.state_dict()})
    x = _image(_side(name))
    with torch.no_grad():
        ref = full.forward_taps(x, [table[0].name, mid.name])
        got = backbone(x)
    from medfeat.export.backbones.pooling import pool

    for tap in (table[0], mid):
        _close(got[tap.name], pool(ref[tap.name], tap.kind, tap.pooling, tap.prefix_tokens))
    # no parameter past the last tap: every parameter left reaches a requested tap
    trunk = backbone.trunk
    n_full = sum(p.numel() for p in full.parameters())
    assert sum(p.numel() for p in trunk.parameters()) < n_full
    trunk.zero_grad()
    raw = trunk.forward_taps(x, [table[0].name, mid.name])
    sum(out.square().sum() for out in raw.values()).backward()
    unused = [n for n, p in trunk.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused, unused
    assert mid.name in trunk.tap_names() and table[-1].name not in trunk.tap_names()


@pytest.mark.parametrize("name", TIMM_VITS + ["sam_vit_b", "resnet50"])
def test_taps_equal_timm_forward_intermediates(name):
    spec, cfg, model = _tiny(name)
    table = spec.tap_table(**cfg)
    x = _image(_side(name))
    for index in (0, len(table) - 2):
        tap = table[index]
        timm_index = index + 1 if name.startswith("resnet") else index  # timm counts the ResNet stem
        with torch.no_grad():
            ours = model.forward_taps(x, [tap.name])[tap.name]
            if tap.kind == "tokens":
                theirs = model.forward_intermediates(x, indices=[timm_index], intermediates_only=True,
                                                     output_fmt="NLC", return_prefix_tokens=True)[0]
                theirs = torch.cat([theirs[1], theirs[0]], dim=1)  # (prefix, patches) -> tokens
            else:
                theirs = model.forward_intermediates(x, indices=[timm_index], intermediates_only=True)[0]
        _close(ours, theirs)


def test_openclip_taps_equal_open_clip_forward_intermediates():
    spec, cfg, model = _tiny("openclip_vitb16")
    x = _image(64)
    with torch.no_grad():
        ours = model.forward_taps(x, ["blocks.0", "blocks.1"])
        theirs = model.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", output_extra_tokens=True)
    for i in (0, 1):
        tokens = torch.cat([theirs["image_intermediates_prefix"][i], theirs["image_intermediates"][i]], dim=1)
        _close(ours[f"blocks.{i}"], tokens)


@pytest.mark.parametrize("name", ["dinov2_vits14", "sam_vit_b", "openclip_vitb16", "seem_focalt", "resnet50"])
def test_grayscale_modes(name):
    spec = get_spec(name)
    x = _image(_side(name), channels=1)
    zeros = torch.zeros_like(x)
    out = {}
    for gray in ("repeat", "first_channel"):
        torch.manual_seed(0)
        model = spec.build(**spec.tiny_config, gray=gray).eval()
        last = model.tap_names()[-1]
        with torch.no_grad():
            out[gray] = model.forward_taps(x, [last])[last]
            three = x.repeat(1, 3, 1, 1) if gray == "repeat" else torch.cat([x, zeros, zeros], dim=1)
            _close(out[gray], model.forward_taps(three, [last])[last])
    assert not torch.allclose(out["repeat"], out["first_channel"])
    with pytest.raises(InputError, match="channels"):
        model.forward_taps(_image(_side(name), channels=2), [last])
    with pytest.raises(UnknownNameError):
        spec.build(**spec.tiny_config, gray="average")


def test_bad_input_size_and_unknown_tap_are_one_line_errors():
    spec, _, model = _tiny("dinov2_vits14")
    with pytest.raises(InputError, match="multiples of the patch size"):
        model.forward_taps(_image(50), ["norm"])
    with pytest.raises(UnknownNameError, match="blocks.7"):
        model.forward_taps(_image(56), ["blocks.7"])
    with pytest.raises(UnknownNameError):
        create_backbone("sam_vit_b", ["neck"], tiny=True)


def test_blip_token1_pooling_is_first_patch_token():
    backbone = create_backbone("blip_vitb16", ["norm"], tiny=True, pooling="token1")
    x = _image(32)
    with torch.no_grad():
        tokens = backbone.trunk.forward_taps(x, ["norm"])["norm"]
        _close(backbone(x)["norm"], tokens[:, 1])
    assert get_spec("blip_vitb16").tap_table()[-1].pooling == "cls"


# --------------------------------------------------------------------------- checkpoint round trips


def _save(state: dict, path, nest: str | None = None) -> str:
    torch.save({nest: state} if nest else state, path)
    return str(path)


def _load_trunk(name: str, path: str, taps: list[str], **config):
    backbone = create_backbone(name, taps, weights=path, tiny=True, config=config or None)
    assert backbone.provenance["weights_sha256"] and len(backbone.provenance["weights_sha256"]) == 64
    return backbone.trunk


def test_sam_checkpoint_matches_segment_anything(tmp_path):
    from segment_anything.modeling import ImageEncoderViT

    tiny = get_spec("sam_vit_b").tiny_config
    torch.manual_seed(0)
    upstream = ImageEncoderViT(img_size=tiny["img_size"], patch_size=16, embed_dim=tiny["embed_dim"],
                               depth=tiny["depth"], num_heads=tiny["num_heads"], window_size=tiny["window_size"],
                               global_attn_indexes=tiny["global_attn_indexes"], use_rel_pos=True, out_chans=8,
                               norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    _perturb(upstream)
    state = {f"image_encoder.{k}": v for k, v in upstream.state_dict().items()}
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 4)
    trunk = _load_trunk("sam_vit_b", _save(state, tmp_path / "sam_vit_b_tiny.pth"), ["blocks.1"])
    blocks: list[torch.Tensor] = []
    for block in upstream.blocks:
        block.register_forward_hook(lambda _m, _i, out: blocks.append(out.permute(0, 3, 1, 2)))
    x = _image(64)
    with torch.no_grad():
        upstream(x)
        ours = trunk.forward_taps(x, ["blocks.0", "blocks.1"])
    _close(ours["blocks.0"], blocks[0])
    _close(ours["blocks.1"], blocks[1])


def test_sam_below_native_size_interpolates_rel_pos_like_segment_anything():
    """At 32 px (native 64) the global block's rel-pos tables are interpolated; segment-anything's
    own ``get_rel_pos`` does the same when given the abs pos embedding at the new grid."""
    from segment_anything.modeling import ImageEncoderViT
    from timm.layers import resample_abs_pos_embed_nhwc

    spec, cfg, model = _tiny("sam_vit_b")
    upstream = ImageEncoderViT(img_size=32, patch_size=16, embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                               num_heads=cfg["num_heads"], window_size=cfg["window_size"],
                               global_attn_indexes=cfg["global_attn_indexes"], use_rel_pos=True, out_chans=8,
                               norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    state = {k.replace(".mlp.fc", ".mlp.lin"): v for k, v in model.state_dict().items()}
    state["pos_embed"] = resample_abs_pos_embed_nhwc(state["pos_embed"], (2, 2))
    for i in cfg["global_attn_indexes"]:  # keep the native tables: get_rel_pos interpolates them per call
        attn = upstream.blocks[i].attn
        attn.rel_pos_h = nn.Parameter(state[f"blocks.{i}.attn.rel_pos_h"].clone())
        attn.rel_pos_w = nn.Parameter(state[f"blocks.{i}.attn.rel_pos_w"].clone())
    state.update({k: v for k, v in upstream.state_dict().items() if k.startswith("neck.")})
    upstream.load_state_dict(state, strict=True)
    blocks: list[torch.Tensor] = []
    upstream.blocks[1].register_forward_hook(lambda _m, _i, out: blocks.append(out.permute(0, 3, 1, 2)))
    x = _image(32)
    with torch.no_grad():
        upstream(x)
        _close(model.forward_taps(x, ["blocks.1"])["blocks.1"], blocks[0])


def _hf_dinov2(swiglu: bool):
    from transformers import Dinov2Config, Dinov2Model

    name = "dinov2_vitg14" if swiglu else "dinov2_vits14"
    tiny = get_spec(name).tiny_config
    config = Dinov2Config(hidden_size=tiny["embed_dim"], num_hidden_layers=tiny["depth"],
                          num_attention_heads=tiny["num_heads"], mlp_ratio=4, image_size=tiny["img_size"],
                          patch_size=14, use_swiglu_ffn=swiglu, layerscale_value=0.5)
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    _perturb(model)
    return name, model


def _hub_layout(state: dict) -> dict:
    """transformers 5 in-memory keys -> the hub checkpoint layout (transformers 4 names)."""
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
            up = state[key.replace("gate_proj", "up_proj")]
            key, value = key.replace("gate_proj", "weights_in"), torch.cat([value, up], dim=0)
        out[key] = value
    return out


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("layout", ["transformers5", "hub"])
def test_dinov2_hf_checkpoint_matches_transformers(tmp_path, swiglu, layout):
    from safetensors.torch import save_file

    name, upstream = _hf_dinov2(swiglu)
    state = upstream.state_dict()
    if layout == "hub":
        state = {f"dinov2.{k}": v for k, v in _hub_layout(state).items()}
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    # transformers resamples position embeddings to the output size (no 0.1 offset)
    trunk = _load_trunk(name, str(path), ["norm"], interpolate_offset=0.0)
    for side in (28, 56):  # native grid, then a resampled one
        x = _image(side)
        with torch.no_grad():
            ref = upstream(pixel_values=x, output_hidden_states=True)
            ours = trunk.forward_taps(x, ["blocks.0", "blocks.1", "norm"])
        _close(ours["blocks.0"], ref.hidden_states[1])
        _close(ours["blocks.1"], ref.hidden_states[2])
        _close(ours["norm"], ref.last_hidden_state)


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_original_checkpoint_layout(tmp_path, swiglu):
    """The facebookresearch/dinov2 layout (timm names, ``mask_token``, ``w12``/``w3`` for
    ViT-g, chunked ``blocks.C.N``) loads and gives transformers' outputs."""
    name, upstream = _hf_dinov2(swiglu)
    spec = get_spec(name)
    timm_state = spec.convert_checkpoint(upstream.state_dict())
    state = {"mask_token": torch.zeros(1, spec.tiny_config["embed_dim"])}
    for key, value in timm_state.items():
        key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.") if swiglu else key
        state[key.replace("blocks.", "blocks.0.", 1) if key.startswith("blocks.") else key] = value
    trunk = _load_trunk(name, _save(state, tmp_path / "dinov2_pretrain.pth"), ["norm"])
    x = _image(28)
    with torch.no_grad():
        _close(trunk.forward_taps(x, ["norm"])["norm"], upstream(pixel_values=x).last_hidden_state)


def test_openclip_checkpoint_matches_open_clip(tmp_path):
    import open_clip

    tiny = get_spec("openclip_vitb16").tiny_config
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(
        embed_dim=tiny["output_dim"],
        vision_cfg=dict(image_size=tiny["image_size"], patch_size=16, width=tiny["width"], layers=tiny["layers"],
                        head_width=tiny["width"] // tiny["heads"]),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    ).eval()
    _perturb(clip)
    trunk = _load_trunk("openclip_vitb16", _save(clip.state_dict(), tmp_path / "open_clip_model.bin"), ["proj"])
    x = _image(32)
    with torch.no_grad():
        _close(trunk.forward_taps(x, ["proj"])["proj"], clip.encode_image(x))
        # another size resamples the position embedding (no upstream counterpart to compare with)
        ours = trunk.forward_taps(_image(64), ["proj"])["proj"]
    assert ours.shape == (2, tiny["output_dim"]) and torch.isfinite(ours).all()


def _timm_reference(arch: str, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    _perturb(model)
    return model


def test_blip_checkpoint_layout(tmp_path):
    """BLIP's ``models/vit.py`` has timm's ViT keys; ``model_base.pth`` nests them under
    ``model`` with the prefix ``visual_encoder.`` next to a momentum copy and the text encoder."""
    tiny = get_spec("blip_vitb16").tiny_config
    ref = _timm_reference("vit_base_patch16_224", img_size=tiny["img_size"], embed_dim=tiny["embed_dim"],
                          depth=tiny["depth"], num_heads=tiny["num_heads"], num_classes=0)
    state = {f"visual_encoder.{k}": v for k, v in ref.state_dict().items()}
    state.update({f"visual_encoder_m.{k}": v for k, v in ref.state_dict().items()})
    state["text_encoder.embeddings.word_embeddings.weight"] = torch.randn(8, 4)
    trunk = _load_trunk("blip_vitb16", _save(state, tmp_path / "model_base.pth", nest="model"), ["norm"])
    x = _image(32)
    with torch.no_grad():
        _close(trunk.forward_taps(x, ["norm"])["norm"], ref.forward_features(x))


@pytest.mark.parametrize("name,arch", [("deit_b16", "deit_base_patch16_224"), ("dino_vitb16", "vit_base_patch16_224")])
def test_imagenet_vit_checkpoints_match_timm(tmp_path, name, arch):
    tiny = get_spec(name).tiny_config
    ref = _timm_reference(arch, img_size=tiny["img_size"], embed_dim=tiny["embed_dim"], depth=tiny["depth"],
                          num_heads=tiny["num_heads"], num_classes=10)
    trunk = _load_trunk(name, _save(ref.state_dict(), tmp_path / "ckpt.pth", nest="model"), ["norm"])
    x = _image(32)
    with torch.no_grad():
        _close(trunk.forward_taps(x, ["norm"])["norm"], ref.forward_features(x))


def test_resnet_checkpoint_matches_timm(tmp_path):
    tiny = get_spec("resnet50").tiny_config
    ref = _timm_reference("resnet50", layers=tiny["layers"], channels=tiny["channels"], stem_width=tiny["stem_width"])
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}  # old-file style
    trunk = _load_trunk("resnet50", _save(state, tmp_path / "resnet50.pth"), ["layer4"])
    x = _image(64)
    with torch.no_grad():
        _close(trunk.forward_taps(x, ["layer4"])["layer4"], ref.forward_features(x))


def test_checkpoint_that_does_not_fit_lists_missing_and_unexpected(tmp_path):
    spec, cfg, model = _tiny("blip_vitb16")
    state = {f"visual_encoder.{k}": v for k, v in model.state_dict().items() if k != "norm.weight"}
    state["visual_encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"missing: norm\.weight.*unexpected: extra\.weight"):
        create_backbone("blip_vitb16", ["norm"], weights=_save(state, tmp_path / "bad.pth"), tiny=True)
    with pytest.raises(WeightsError, match="none of the formats"):
        create_backbone("sam_vit_b", ["blocks.0"], weights=_save({"x.weight": torch.zeros(1)}, tmp_path / "x.pth"),
                        tiny=True)


# --------------------------------------------------------------------------- SEEM FocalNet-DW


def _seem_block_reference(block, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SEEM ``focal_dw`` block with post-LN, written on (B, L, C) tokens the way upstream
    does, with timm's ``FocalModulation`` (conv form, ``normalize_modulator``) standing in
    for the modulation: an independent implementation of the same layer."""
    from timm.models.focalnet import FocalModulation

    batch, length, dim = x.shape
    mod = block.modulation
    timm_mod = FocalModulation(dim, focal_window=3, focal_level=mod.levels, normalize_modulator=True).eval()
    timm_mod.f.weight.data = mod.f.weight[:, :, None, None]
    timm_mod.f.bias.data = mod.f.bias
    timm_mod.h.load_state_dict(mod.h.state_dict())
    timm_mod.proj.weight.data = mod.proj.weight[:, :, None, None]
    timm_mod.proj.bias.data = mod.proj.bias
    for ours, theirs in zip(mod.focal_layers, timm_mod.focal_layers):
        theirs[0].weight.data = ours[0].weight

    def dw(conv, t):
        grid = t.transpose(1, 2).reshape(batch, dim, height, width)
        return (grid + conv(grid)).flatten(2).transpose(1, 2)

    x = dw(block.dw1, x)
    modulated = timm_mod(x.transpose(1, 2).reshape(batch, dim, height, width)).flatten(2).transpose(1, 2)
    x = block.norm1(x + block.gamma_1 * modulated)
    x = dw(block.dw2, x)
    return block.norm2(x + block.gamma_2 * block.mlp.fc2(nn.functional.gelu(block.mlp.fc1(x))))


def test_seem_focalnet_matches_reference_and_loads_seem_keys(tmp_path):
    spec, cfg, model = _tiny("seem_focalt")
    x = _image(64)
    with torch.no_grad():
        ours = model.forward_taps(x, ["res2", "res3"])
        tokens = model.patch_embed(x)  # (B, 16, 16, C)
        _, height, width, dim = tokens.shape
        t = tokens.reshape(2, -1, dim)
        for block in model.layers[0].blocks:
            t = _seem_block_reference(block, t, height, width)
        res2 = model.norm0(t).transpose(1, 2).reshape(2, dim, height, width)
    _close(ours["res2"], res2)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state["sem_seg_head.pixel_decoder.x"] = torch.zeros(2)
    trunk = _load_trunk("seem_focalt", _save(state, tmp_path / "seem_focalt_v0.pt", nest="model"), ["res5"])
    with torch.no_grad():
        _close(trunk.forward_taps(x, ["res3"])["res3"], ours["res3"])
    keys = set(model.state_dict())
    for key in ("layers.0.blocks.0.modulation.focal_layers.2.0.weight", "layers.2.downsample.proj.weight",
                "layers.1.blocks.0.gamma_2", "norm3.weight", "patch_embed.norm.bias"):
        assert key in keys, key
    assert not any(k.startswith("layers.3.downsample") for k in keys)


def test_sam_timm_format_drops_neck(tmp_path):
    """timm's ``samvit_*.sa1b`` layout: timm keys plus a conv neck, which is dropped."""
    spec, cfg, model = _tiny("sam_vit_b")
    state = dict(model.state_dict())
    state.update({"neck.0.weight": torch.zeros(8, cfg["embed_dim"], 1, 1), "neck.1.weight": torch.ones(8)})
    trunk = _load_trunk("sam_vit_b", _save(state, tmp_path / "samvit.pth"), ["blocks.1"])
    x = _image(32)
    with torch.no_grad():
        _close(trunk.forward_taps(x, ["blocks.1"])["blocks.1"], model.forward_taps(x, ["blocks.1"])["blocks.1"])

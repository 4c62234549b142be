"""The 3D segmentation backbones against independent references and their original checkpoint layouts.

* SAM-Med3D: each block against a loop-by-loop reference of windowed attention with decomposed
  relative position biases in SAM-Med3D's own broadcast form (``tests/parity`` checks the whole
  encoder against upstream's code); the real 128^3 config's parameter shapes against the published
  layout; a full SAM-Med3D checkpoint (``image_encoder.*`` + prompt encoder + mask decoder,
  nested under ``model_state_dict``) loads strictly and gives identical outputs.
* SwinUNETR: taps against forward hooks on MONAI's own ``SwinUNETR``; a full state dict and
  MONAI's self-supervised ``model_swinvit.pt`` layout (checked by MONAI's ``load_from``) round-trip.
* UNet: taps and logits against forward hooks on MONAI's ``UNet``.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from medfeat.errors import InputError, WeightsError
from medfeat.export.backbones.models import sam_med3d, swin_unetr, unet3d
from medfeat.export.backbones.registry import create_backbone, get_spec

ATOL = 1e-5


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter with noise (zero-initialised rel-pos tables would test nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


# --------------------------------------------------------------------------- SAM-Med3D


def _reference_attention(attn: sam_med3d.Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention over one (1, S, S, S, C) window, bias entry by entry from token coordinates.

    The bias is SAM-Med3D's (``add_decomposed_rel_pos`` broadcasts its 5-D per-axis terms
    onto the 7-D attention so that each key offset is taken along w'), written out per
    entry: for query (d, h, w) and key (d', h', w'),
    ``q[d,h,w].Rd[d-w'] + q[d,h,d'].Rh[h-w'] + q[d,h,h'].Rw[h'-w']``.
    """
    _, d, h, w, c = x.shape
    s = d
    heads, hd = attn.num_heads, c // attn.num_heads
    coords = list(itertools.product(range(d), range(h), range(w)))  # row-major token order
    position = {p: i for i, p in enumerate(coords)}
    tokens = x.reshape(-1, c)
    q, k, v = attn.qkv(tokens).reshape(-1, 3, heads, hd).unbind(1)  # (N, heads, hd)
    out = torch.empty(len(coords), heads, hd)
    for head in range(heads):
        logits = (q[:, head] @ k[:, head].T) * hd ** -0.5
        bias = torch.empty(len(coords), len(coords))
        for i, (qd, qh, _qw) in enumerate(coords):
            for j, (kd, kh, kw) in enumerate(coords):
                bias[i, j] = (q[i, head] @ attn.rel_pos_d[qd - kw + s - 1]
                              + q[position[(qd, qh, kd)], head] @ attn.rel_pos_h[qh - kw + s - 1]
                              + q[position[(qd, qh, kh)], head] @ attn.rel_pos_w[kh - kw + s - 1])
        out[:, head] = torch.softmax(logits + bias, dim=-1) @ v[:, head]
    return attn.proj(out.reshape(len(coords), c)).reshape(1, d, h, w, c)


def _reference_block(block: sam_med3d.Block3D, x: torch.Tensor) -> torch.Tensor:
    """Block3D on a (1, D, H, W, C) grid: zero-pad to whole windows, attend per window, crop."""
    y = block.norm1(x)
    ws = block.window_size
    if ws == 0:
        y = _reference_attention(block.attn, y)
    else:
        size = y.shape[1:4]
        pad = [(-s) % ws for s in size]
        y = F.pad(y, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        out = torch.empty_like(y)
        for a, b, c in itertools.product(*(range(0, s, ws) for s in y.shape[1:4])):
            window = y[:, a:a + ws, b:b + ws, c:c + ws]
            out[:, a:a + ws, b:b + ws, c:c + ws] = _reference_attention(block.attn, window)
        y = out[:, : size[0], : size[1], : size[2]]
    x = x + y
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("window", [0, 3])  # global over a 4^3 grid; windows of 3 with padding 4 -> 6
def test_sam_med3d_block_matches_loop_reference(window: int) -> None:
    block = sam_med3d.Block3D(dim=8, num_heads=2, mlp_ratio=2.0, window_size=window, grid=(4, 4, 4)).eval()
    _randomise(block)
    x = _rand(1, 4, 4, 4, 8) - 0.5
    with torch.no_grad():
        torch.testing.assert_close(block(x), _reference_block(block, x), atol=ATOL, rtol=1e-4)


def test_sam_med3d_real_config_has_published_layout() -> None:
    with torch.device("meta"):
        model = sam_med3d.SamMed3DEncoder()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["patch_embed.proj.weight"] == (768, 1, 16, 16, 16)
    assert shapes["pos_embed"] == (1, 8, 8, 8, 768)
    for i in range(12):  # global blocks see the 8^3 grid, windowed ones a 14^3 window
        assert shapes[f"blocks.{i}.attn.rel_pos_d"] == ((15, 64) if i in (2, 5, 8, 11) else (27, 64))
    assert shapes["blocks.11.mlp.lin1.weight"] == (3072, 768)
    assert shapes["neck.0.weight"] == (384, 768, 1, 1, 1)
    assert shapes["neck.2.weight"] == (384, 384, 3, 3, 3)
    assert shapes["neck.3.bias"] == (384,)
    assert len(shapes) == 3 + 12 * 15 + 6  # pos/patch, 15 per block, neck


def test_sam_med3d_full_checkpoint_round_trips(tmp_path) -> None:
    torch.manual_seed(3)
    reference = sam_med3d._build(**sam_med3d.TINY_CONFIG).eval()
    _randomise(reference, seed=3)
    state = {f"image_encoder.{k}": v for k, v in reference.state_dict().items()}
    # The rest of a SAM-Med3D checkpoint, which the encoder does not take.
    state["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 384)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 384)
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": state, "epoch": 200}, path)
    backbone = create_backbone("sam_med3d", ["blocks.1", "neck"], weights=str(path), tiny=True, pooling="avgmax")
    x = _rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        got = backbone(x)
        neck = reference(x)
        block1 = reference.forward_taps(x, ["blocks.1"])["blocks.1"]
    torch.testing.assert_close(got["neck"], torch.cat([neck.mean((2, 3, 4)), neck.amax((2, 3, 4))], 1))
    torch.testing.assert_close(got["blocks.1"][:, :48], block1.mean((2, 3, 4)))
    assert backbone.output_dims() == {"blocks.1": 96, "neck": 48}


def test_sam_med3d_rejects_wrong_input_size() -> None:
    backbone = create_backbone("sam_med3d", ["blocks.0"], tiny=True)
    with pytest.raises(InputError, match="sam_med3d"):
        backbone(torch.zeros(1, 1, 48, 48, 48))


# --------------------------------------------------------------------------- SwinUNETR


def _monai_swin(seed: int = 0) -> torch.nn.Module:
    from monai.networks.nets import SwinUNETR

    cfg = {k: v for k, v in swin_unetr.TINY_CONFIG.items() if k != "input_size"}
    torch.manual_seed(seed)
    net = SwinUNETR(in_channels=1, **cfg).eval()
    _randomise(net, seed)  # batch-norm running stats stay at their defaults
    return net


def _monai_swin_taps(net: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Encoder-block outputs and Swin states captured by hooks during MONAI's own forward."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10")]
    hooks.append(net.swinViT.register_forward_hook(
        lambda m, i, o: seen.update({f"swinViT.{k}": s for k, s in enumerate(o)})))
    with torch.no_grad():
        seen["logits"] = net(x)
    for hook in hooks:
        hook.remove()
    return seen


def test_swin_unetr_full_checkpoint_matches_monai(tmp_path) -> None:
    net = _monai_swin(seed=1)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)  # DDP-saved
    x = _rand(1, 1, 32, 32, 32)
    expected = _monai_swin_taps(net, x)
    taps = get_spec("swin_unetr").tap_table(**swin_unetr.TINY_CONFIG)
    backbone = create_backbone("swin_unetr", [t.name for t in taps], weights=str(path), tiny=True)
    with torch.no_grad():
        raw = backbone.trunk.forward_taps(x, backbone.tap_names)
    for tap in taps:
        torch.testing.assert_close(raw[tap.name], expected[tap.name], atol=ATOL, rtol=1e-4, msg=tap.name)
    full = create_backbone("swin_unetr", ["encoder10"], weights=str(path), tiny=True).trunk
    assert full.decoder1 is None and full.out is None  # pruned, not skipped
    untruncated = swin_unetr._build_full(**swin_unetr.TINY_CONFIG).eval()
    untruncated.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(untruncated(x), expected["logits"], atol=ATOL, rtol=1e-4)


def _ssl_checkpoint(net: torch.nn.Module) -> dict:
    """A state dict in the layout of MONAI's self-supervised ``model_swinvit.pt``."""
    state = {}
    for key, value in net.swinViT.state_dict().items():
        key = key.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2")
        state[f"module.{key}"] = value.clone()
    return {"state_dict": state}


def test_swin_unetr_ssl_checkpoint_matches_monai_load_from(tmp_path) -> None:
    source = _monai_swin(seed=2)
    ckpt = _ssl_checkpoint(source)
    path = tmp_path / "model_swinvit.pt"
    torch.save(ckpt, path)
    target = _monai_swin(seed=5)
    target.load_from(weights=ckpt)  # MONAI's own reader of this format
    x = _rand(1, 1, 32, 32, 32, seed=4)
    with torch.no_grad():
        expected = target.swinViT(x, True)
    names = [f"swinViT.{i}" for i in range(5)]
    backbone = create_backbone("swin_unetr_encoder", names, weights=str(path), tiny=True)
    with torch.no_grad():
        raw = backbone.trunk.forward_taps(x, names)
    for i, name in enumerate(names):
        torch.testing.assert_close(raw[name], expected[i], atol=ATOL, rtol=1e-4, msg=name)
    with pytest.raises(WeightsError, match="swin_unetr_encoder"):
        create_backbone("swin_unetr", ["swinViT.0"], weights=str(path), tiny=True)


def test_swin_unetr_encoder_takes_swinvit_part_of_full_checkpoint(tmp_path) -> None:
    net = _monai_swin(seed=6)
    path = tmp_path / "full.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    backbone = create_backbone("swin_unetr_encoder", ["swinViT.2"], weights=str(path), tiny=True)
    x = _rand(1, 1, 32, 32, 32, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(backbone.trunk.forward_taps(x, ["swinViT.2"])["swinViT.2"],
                                   net.swinViT(x, True)[2], atol=ATOL, rtol=1e-4)
    assert len(backbone.trunk.swinViT.layers3) == 0 and len(backbone.trunk.swinViT.layers4) == 0


# --------------------------------------------------------------------------- UNet


def _monai_unet(seed: int = 0) -> torch.nn.Module:
    from monai.networks.nets import UNet

    cfg = {**unet3d.DEFAULT_CONFIG, **unet3d.TINY_CONFIG}
    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=cfg["out_channels"], channels=cfg["channels"],
                strides=cfg["strides"], num_res_units=cfg["num_res_units"]).eval()


def test_unet3d_taps_match_monai_hooks(tmp_path) -> None:
    net = _monai_unet(seed=8)
    path = tmp_path / "unet.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    blocks = {"down.0": net.model[0], "down.1": net.model[1].submodule[0],
              "bottom": net.model[1].submodule[1].submodule,
              "up.1": net.model[1].submodule[2], "up.0": net.model[2]}
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n, m in blocks.items()]
    x = _rand(2, 1, 16, 16, 16, seed=9)
    with torch.no_grad():
        logits = net(x)
    for hook in hooks:
        hook.remove()
    backbone = create_backbone("unet3d", list(blocks), weights=str(path), tiny=True)
    with torch.no_grad():
        raw = backbone.trunk.forward_taps(x, list(blocks))
    for name in blocks:
        torch.testing.assert_close(raw[name], seen[name], atol=ATOL, rtol=1e-4, msg=name)
    torch.testing.assert_close(raw["up.0"], logits, atol=ATOL, rtol=1e-4)
    pruned = create_backbone("unet3d", ["down.1"], weights=str(path), tiny=True).trunk
    assert isinstance(pruned.model[2], unet3d.Pruned)
    assert isinstance(pruned.model[1].submodule[1].submodule, unet3d.Pruned)
    assert sum(p.numel() for p in pruned.parameters()) == sum(
        p.numel() for p in list(net.model[0].parameters()) + list(net.model[1].submodule[0].parameters()))


def test_unet3d_wrong_channels_names_model_and_keys(tmp_path) -> None:
    from monai.networks.nets import UNet

    other = UNet(spatial_dims=3, in_channels=1, out_channels=6, channels=(4, 8, 32), strides=(2, 2), num_res_units=1)
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match=r"unet3d.*shape mismatch"):
        create_backbone("unet3d", ["down.0"], weights=str(path), tiny=True)

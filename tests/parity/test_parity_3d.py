"""Parity of the 3D families with their upstream packages, at every tap, fp32.

Each test builds the upstream module (seeded, then every parameter and BatchNorm statistic
perturbed), writes its weights in the released checkpoint's layout, loads that file through
``create_backbone`` and compares every raw tap with the upstream tensor at the same place,
captured by forward hooks during upstream's own forward. Relative error <= 1e-5
(``parity_common.TOL``).

* uniGradICON: ``unigradicon.make_network(..., include_last_step=True).regis_net`` (full
  width, the smallest size its five levels take);
* SAM-Med3D: ``medim.models.sam_med3d.ImageEncoderViT3D`` (the same code as
  uni-medical/SAM-Med3D ``segment_anything/modeling/image_encoder3D.py``), whose
  ``add_decomposed_rel_pos`` medfeat reproduces;
* SwinUNETR and the task UNet: ``monai.networks.nets.SwinUNETR`` / ``UNet``.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
from parity_common import all_taps, check_taps, load_trunk, randomize, save_checkpoint, seeded_input, upstream
from torch import nn

from medfeat.export.backbones.models import sam_med3d, swin_unetr, unet3d
from medfeat.export.backbones.models.unigradicon import upstream_prefixes
from medfeat.export.backbones.models.unigradicon_net import STAGES
from medfeat.export.backbones.registry import create_backbone, get_spec

# --------------------------------------------------------------------------- uniGradICON

UNIGRADICON_SIZE = (65, 70, 76)  # the smallest the five-level UNets take; anisotropic, odd


def _transform_modules(regis_net: nn.Module) -> dict[str, nn.Module]:
    """Upstream module whose output is the transform of stages A..S, for each S."""
    ffvf_a = upstream_prefixes()["A"][: -len("net.")].rstrip(".")
    paths = {"A": ffvf_a, "B": "netPhi.netPhi.net", "C": "netPhi", "D": ""}
    return {s: regis_net.get_submodule(p) for s, p in paths.items()}


def _capture_unigradicon(regis_net: nn.Module, monkeypatch: pytest.MonkeyPatch,
                         pair: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tap of upstream's cascade during its own forward.

    ``S.enc.k`` is ``y + pad_or_crop(avg_pool(x))`` inside ``UNet2.forward``: ``y`` is the
    output of ``downConvs[k]`` (a hook) and the second operand the k-th value upstream's own
    ``pad_or_crop`` returns (recorded by a wrapper), added as upstream adds them.
    ``S.dec.d`` is ``batchNorms[d]``'s output cropped to the skip's size (the input size of
    ``downConvs[d]``). ``S.phi`` is the transform returned by the wrapper around stages A..S,
    evaluated on the full-size identity map.
    """
    networks = upstream("icon_registration.networks")
    current: list[str] = []
    operands: dict[str, list[torch.Tensor]] = {s: [] for s in STAGES}
    convs: dict[str, torch.Tensor] = {}
    sizes: dict[str, torch.Size] = {}
    norms: dict[str, torch.Tensor] = {}
    transforms: dict[str, object] = {}
    original = networks.pad_or_crop

    def recording_pad_or_crop(x, shape, dimension):  # noqa: ANN001, ANN202 - upstream's signature
        out = original(x, shape, dimension)
        operands[current[-1]].append(out)
        return out

    monkeypatch.setattr(networks, "pad_or_crop", recording_pad_or_crop)
    handles = []
    for stage, prefix in upstream_prefixes().items():
        unet = regis_net.get_submodule(prefix.rstrip("."))
        handles.append(unet.register_forward_pre_hook(lambda m, a, s=stage: current.append(s)))
        for k, conv in enumerate(unet.downConvs):
            handles.append(conv.register_forward_pre_hook(
                lambda m, a, s=stage, k=k: sizes.__setitem__(f"{s}.{k}", a[0].shape[2:])))
            handles.append(conv.register_forward_hook(lambda m, a, o, s=stage, k=k: convs.__setitem__(f"{s}.{k}", o)))
        for d, norm in enumerate(unet.batchNorms):
            handles.append(norm.register_forward_hook(lambda m, a, o, s=stage, d=d: norms.__setitem__(f"{s}.{d}", o)))
    for stage, module in _transform_modules(regis_net).items():
        handles.append(module.register_forward_hook(lambda m, a, o, s=stage: transforms.__setitem__(s, o)))
    try:
        with torch.no_grad():
            regis_net(pair[:, :1], pair[:, 1:])
            identity = regis_net.identity_map
            out = {f"{s}.phi": transforms[s](identity) for s in STAGES}
    finally:
        for handle in handles:
            handle.remove()
    for stage in STAGES:
        depth = len(regis_net.get_submodule(upstream_prefixes()[stage].rstrip(".")).downConvs)
        for k in range(depth):
            out[f"{stage}.enc.{k}"] = convs[f"{stage}.{k}"] + operands[stage][k]
        for d in range(depth):
            size = sizes[f"{stage}.{d}"]
            out[f"{stage}.dec.{d}"] = norms[f"{stage}.{d}"][:, :, : size[0], : size[1], : size[2]]
    return out


def test_unigradicon_every_tap_equals_make_network(tmp_path, monkeypatch):
    unigradicon = upstream("unigradicon")
    torch.manual_seed(0)
    regis_net = randomize(unigradicon.make_network([1, 1, *UNIGRADICON_SIZE], include_last_step=True).regis_net,
                          seed=1)
    # Step_2_final.trch: regis_net.state_dict(), flat, with the cascade's nested keys.
    path = save_checkpoint(tmp_path / "Step_2_final.trch", regis_net.state_dict())
    trunk = load_trunk("unigradicon", path, tiny=False, config={"input_size": UNIGRADICON_SIZE})
    pair = torch.rand(1, 2, *UNIGRADICON_SIZE, generator=torch.Generator().manual_seed(2))
    expected = _capture_unigradicon(regis_net, monkeypatch, pair)
    assert len(expected) == len(trunk.tap_names()) == 44
    with torch.no_grad():
        ours = trunk.forward_taps(pair, trunk.tap_names())
    check_taps("unigradicon", ours, expected)
    moved = (expected["D.phi"] - regis_net.identity_map).abs().max() * (min(UNIGRADICON_SIZE) - 1)
    assert moved > 0.5, "the random warps barely move: the comparison would not test the warps"


# --------------------------------------------------------------------------- SAM-Med3D

# The registry's tiny config (windows of 3 over a 4^3 grid: several padded windows), and the
# real window of 14 over a 4^3 grid (one window, mostly padding, as at 128^3 with 8^3 tokens).
SAM_MED3D_CONFIGS = {
    "tiny": {},
    "window14": dict(input_size=(64, 64, 64), patch_size=16, embed_dim=48, depth=4, num_heads=4,
                     out_chans=24, window_size=14, global_attn_indexes=(1, 3)),
}


def _medim_encoder(cfg: dict) -> nn.Module:
    return upstream("medim.models.sam_med3d").ImageEncoderViT3D(
        img_size=cfg["input_size"][0], patch_size=cfg["patch_size"], in_chans=1, embed_dim=cfg["embed_dim"],
        depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], out_chans=cfg["out_chans"],
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        window_size=cfg["window_size"], global_attn_indexes=tuple(cfg["global_attn_indexes"]))


@pytest.mark.parametrize("variant", list(SAM_MED3D_CONFIGS))
def test_sam_med3d_every_tap_equals_upstream_encoder(tmp_path, variant):
    overrides = SAM_MED3D_CONFIGS[variant]
    cfg = {**sam_med3d.DEFAULT_CONFIG, **sam_med3d.TINY_CONFIG, **overrides}
    torch.manual_seed(0)
    encoder = randomize(_medim_encoder(cfg), seed=3, scale=0.2)
    # sam_med3d_turbo.pth: the whole SAM-Med3D under model_state_dict, beside the training state.
    others = {"prompt_encoder.point_embeddings.0.weight": torch.randn(1, 384),
              "mask_decoder.iou_token.weight": torch.randn(1, 384)}
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()} | others
    # the tiny model as the released file; the other as saved from DDP (``module.`` keys)
    prefix = "" if variant == "tiny" else "module."
    path = save_checkpoint(tmp_path / "sam_med3d_turbo.pth", state, prefix=prefix, wrap="model_state_dict",
                           extra={"epoch": 200, "best_dice": 0.5})
    trunk = load_trunk("sam_med3d", path, config=overrides)
    expected: dict[str, torch.Tensor] = {}
    for i, block in enumerate(encoder.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: expected.__setitem__(f"blocks.{i}", o.permute(0, 4, 1, 2, 3)))
    x = seeded_input(2, 1, *cfg["input_size"], seed=4)
    with torch.no_grad():
        expected["neck"] = encoder(x)
        ours = trunk.forward_taps(x, trunk.tap_names())
    assert sorted(expected) == sorted(all_taps("sam_med3d", overrides))
    check_taps("sam_med3d", ours, expected)


def test_sam_med3d_textbook_bias_would_not_pass():
    """The comparison above can fail: the textbook decomposed bias (what medfeat computed
    before) differs from upstream's form by far more than the tolerance."""
    add_decomposed_rel_pos = upstream("medim.models.sam_med3d").add_decomposed_rel_pos
    gen = torch.Generator().manual_seed(0)
    s, c = 3, 4
    q = torch.randn(2, s ** 3, c, generator=gen)
    tables = [torch.randn(2 * s - 1, c, generator=gen) for _ in range(3)]
    reference = add_decomposed_rel_pos(torch.zeros(2, s ** 3, s ** 3), q, *tables, (s,) * 3, (s,) * 3)
    ours = sam_med3d.rel_pos_bias(q, tables, (s,) * 3)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    idx = torch.arange(s)
    rel = [t[idx[:, None] - idx[None, :] + s - 1] for t in tables]
    grid = q.reshape(2, s, s, s, c)
    textbook = (torch.einsum("bdhwc,dkc->bdhwk", grid, rel[0])[..., :, None, None]
                + torch.einsum("bdhwc,hkc->bdhwk", grid, rel[1])[..., None, :, None]
                + torch.einsum("bdhwc,wkc->bdhwk", grid, rel[2])[..., None, None, :]).reshape(2, s ** 3, s ** 3)
    assert (textbook - reference).abs().max() > 0.1


# --------------------------------------------------------------------------- SwinUNETR (MONAI)


def _monai_swin(seed: int) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    cfg = {k: v for k, v in swin_unetr.TINY_CONFIG.items() if k != "input_size"}
    torch.manual_seed(seed)
    return randomize(SwinUNETR(in_channels=1, **cfg), seed=seed, scale=0.1)


def _swin_hooks(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [getattr(net, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
               for n in ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10")]
    handles.append(net.swinViT.register_forward_hook(
        lambda m, a, o: seen.update({f"swinViT.{k}": s for k, s in enumerate(o)})))
    with torch.no_grad():
        net(x)
    for handle in handles:
        handle.remove()
    return seen


def test_swin_unetr_every_tap_equals_monai(tmp_path):
    net = _monai_swin(seed=1)
    # A fine-tuned SwinUNETR saved from DDP: {"state_dict": {"module.swinViT...", ...}}.
    path = save_checkpoint(tmp_path / "model.pt", net.state_dict(), prefix="module.", wrap="state_dict",
                           extra={"epoch": 5000})
    trunk = load_trunk("swin_unetr", path)
    x = seeded_input(1, 1, 32, 32, 32, seed=2)
    expected = _swin_hooks(net, x)
    with torch.no_grad():
        ours = trunk.forward_taps(x, trunk.tap_names())
    assert sorted(expected) == sorted(all_taps("swin_unetr"))
    check_taps("swin_unetr", ours, expected)


def test_swin_unetr_encoder_ssl_checkpoint_equals_monai_load_from(tmp_path):
    """``model_swinvit.pt`` (self-supervised): ``{"state_dict": {"module.<swinViT keys with
    mlp.fc1/fc2>", heads of the pretext tasks}}``, read by MONAI's own ``load_from``."""
    source = _monai_swin(seed=3)
    state = {k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v
             for k, v in source.swinViT.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    heads = {"rotation_head.weight": torch.randn(4, 8, generator=gen),
             "contrastive_head.weight": torch.randn(8, 8, generator=gen), "conv.0.weight": torch.randn(2, 2)}
    ckpt = {"state_dict": {f"module.{k}": v.clone() for k, v in (state | heads).items()}}
    path = tmp_path / "model_swinvit.pt"
    torch.save(ckpt, path)
    target = _monai_swin(seed=5)
    target.load_from(weights=ckpt)  # MONAI's reader of this format
    x = seeded_input(1, 1, 32, 32, 32, seed=4)
    with torch.no_grad():
        expected = {f"swinViT.{i}": s for i, s in enumerate(target.swinViT(x, True))}
    trunk = load_trunk("swin_unetr_encoder", str(path))
    with torch.no_grad():
        ours = trunk.forward_taps(x, trunk.tap_names())
    check_taps("swin_unetr_encoder", ours, expected)


# --------------------------------------------------------------------------- task UNet (MONAI)


@pytest.mark.parametrize("layout", ["safetensors", "ddp_state_dict"])
def test_unet3d_every_tap_equals_monai(tmp_path, layout):
    from monai.networks.nets import UNet

    cfg = {**unet3d.DEFAULT_CONFIG, **unet3d.TINY_CONFIG}
    torch.manual_seed(0)
    net = randomize(UNet(spatial_dims=3, in_channels=1, out_channels=cfg["out_channels"], channels=cfg["channels"],
                         strides=cfg["strides"], num_res_units=cfg["num_res_units"]), seed=6, scale=0.1)
    if layout == "safetensors":  # what `medfeat models train-unet` writes
        path = save_checkpoint(tmp_path / "unet.safetensors", net.state_dict())
    else:
        path = save_checkpoint(tmp_path / "unet.pt", net.state_dict(), prefix="module.", wrap="state_dict")
    trunk = load_trunk("unet3d", path)
    blocks = {"down.0": net.model[0], "down.1": net.model[1].submodule[0],
              "bottom": net.model[1].submodule[1].submodule, "up.1": net.model[1].submodule[2], "up.0": net.model[2]}
    expected: dict[str, torch.Tensor] = {}
    for name, module in blocks.items():
        module.register_forward_hook(lambda m, a, o, n=name: expected.__setitem__(n, o))
    x = seeded_input(2, 1, 16, 16, 16, seed=7)
    with torch.no_grad():
        logits = net(x)
        ours = trunk.forward_taps(x, trunk.tap_names())
    assert sorted(expected) == sorted(all_taps("unet3d"))
    check_taps("unet3d", ours, expected)
    check_taps("unet3d", {"logits": ours["up.0"]}, {"logits": logits})


# UNet layouts beyond the tiny one: plain convolutions (no residual units), and three levels
# with two residual units per block (the registry's default shape, narrower).
UNET_CONFIGS = {
    "plain": dict(channels=(4, 8, 16), strides=(2, 2), num_res_units=0),
    "three_levels": dict(channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=2),
}


@pytest.mark.parametrize("variant", list(UNET_CONFIGS))
def test_unet3d_layouts_equal_monai(tmp_path, variant):
    from monai.networks.nets import UNet

    overrides = UNET_CONFIGS[variant]
    cfg = {**unet3d.DEFAULT_CONFIG, **unet3d.TINY_CONFIG, **overrides}
    torch.manual_seed(0)
    net = randomize(UNet(spatial_dims=3, in_channels=1, out_channels=cfg["out_channels"], channels=cfg["channels"],
                         strides=cfg["strides"], num_res_units=cfg["num_res_units"]), seed=8, scale=0.1)
    path = save_checkpoint(tmp_path / "unet.safetensors", net.state_dict())
    trunk = load_trunk("unet3d", path, config=overrides)
    expected: dict[str, torch.Tensor] = {}
    for name in all_taps("unet3d", overrides):  # MONAI's module at each tap's path (same nesting)
        module = net.get_submodule(trunk._paths[name])
        module.register_forward_hook(lambda m, a, o, n=name: expected.__setitem__(n, o))
    x = seeded_input(1, 1, 16, 16, 16, seed=9)
    with torch.no_grad():
        logits = net(x)
        ours = trunk.forward_taps(x, trunk.tap_names())
    check_taps("unet3d", ours, expected)
    check_taps("unet3d", {"logits": ours["up.0"]}, {"logits": logits})


def test_swin_unetr_window7_instance_norm_equals_monai(tmp_path):
    """The released shape's window (7) and instance norm at 64^3: windows padded (32 and 16
    tokens are not multiples of 7), shifted with masks, and shrunk to the 4^3 grid of the
    last stage (where MONAI reads the top-left block of the full window's bias index)."""
    from monai.networks.nets import SwinUNETR

    overrides = dict(input_size=(64, 64, 64), feature_size=12, depths=(2, 2, 2, 2), window_size=7,
                     out_channels=3, norm_name="instance")
    cfg = {k: v for k, v in overrides.items() if k != "input_size"}
    torch.manual_seed(0)
    net = randomize(SwinUNETR(in_channels=1, **cfg), seed=10, scale=0.1)
    path = save_checkpoint(tmp_path / "model.pt", net.state_dict(), wrap="state_dict")
    trunk = load_trunk("swin_unetr", path, config=overrides)
    x = seeded_input(1, 1, 64, 64, 64, seed=11)
    expected = _swin_hooks(net, x)
    whole = get_spec("swin_unetr").build(**{**swin_unetr.DEFAULT_CONFIG, **overrides}).eval()
    whole.load_state_dict(net.state_dict())  # untruncated: the decoder too
    with torch.no_grad():
        ours = trunk.forward_taps(x, trunk.tap_names())
        logits_ref, logits = net(x), whole(x)
    check_taps("swin_unetr", ours, expected)
    check_taps("swin_unetr", {"logits": logits}, {"logits": logits_ref})


@pytest.mark.parametrize("name", ["unet3d", "swin_unetr", "swin_unetr_encoder"])
def test_random_init_equals_monai_for_the_same_seed(name):
    """``--random-init`` weights are MONAI's for the same seed (modules made in MONAI's order
    with its initialisers), so random-weight features stay what they were when MONAI built them."""
    from monai.networks.nets import SwinUNETR, UNet

    cfg = {**get_spec(name).tiny_config}
    torch.manual_seed(21)
    if name == "unet3d":
        cfg = {**unet3d.DEFAULT_CONFIG, **cfg}
        ref = UNet(spatial_dims=3, in_channels=1, out_channels=cfg["out_channels"], channels=cfg["channels"],
                   strides=cfg["strides"], num_res_units=cfg["num_res_units"]).state_dict()
    else:
        net = SwinUNETR(in_channels=1, **{k: v for k, v in cfg.items() if k != "input_size"})
        ref = (net.swinViT if name == "swin_unetr_encoder" else net).state_dict()
        ref = {f"swinViT.{k}": v for k, v in ref.items()} if name == "swin_unetr_encoder" else ref
    ours = create_backbone(name, all_taps(name), seed=21, tiny=True).trunk.state_dict()
    # the registry's trunk ends at the last tap: swin_unetr's decoder is pruned away
    pruned = {k for k in ref if k.startswith(("decoder", "out."))} if name == "swin_unetr" else set()
    assert list(ours) == [k for k in ref if k not in pruned]
    unequal = [k for k in ours if not torch.equal(ours[k], ref[k])]
    assert not unequal, f"{name}: random init differs from MONAI's at {unequal[:5]}"

"""uniGradICON registry entry: taps, truncation, weights, and parity with references.

References, independent of the code under test:

* ``scipy.ndimage.map_coordinates`` (order 1, mode ``nearest``) for the warp;
* ``_Upstream*`` below: the cascade rebuilt the way ``icon_registration``'s wrappers are
  written (nested modules, transforms as closures, the identity-map shortcut, mermaid's
  in-place channel reordering), which also gives the original checkpoint key layout;
* ``unigradicon.make_network`` itself, at every tap: ``tests/parity/test_parity_3d.py``
  (the ``parity`` extra; it pulls ITK, so it is not in the ``test`` extra).

Tolerances: the cascade rebuilt here and upstream agree to the bit (same float ops in the
same order), so they are compared with ``torch.equal``; scipy to 1e-5 (float32 vs float64).
Other dtypes against the float32 cascade: float64 to 1e-5 of each tap's max; fp16 / bf16
within the exporter's parity tolerances (:data:`medfeat.export.runtimes.parity.TOLERANCES`).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from medfeat.errors import InputError, UnknownNameError, WeightsError
from medfeat.export.backbones.models.unigradicon import to_regis_net_layout, upstream_prefixes
from medfeat.export.backbones.models.unigradicon_net import STAGES, UNet2, identity_grid, warp
from medfeat.export.backbones.registry import create_backbone, get_spec
from medfeat.export.backbones.weights import sha256_file
from medfeat.export.runtimes.onnx_export import DTYPES
from medfeat.export.runtimes.parity import TOLERANCES, compare

SPEC = get_spec("unigradicon")
TINY = SPEC.tiny_config
SIZE = tuple(TINY["input_size"])


def _randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random weights everywhere, last convs included (they start at zero), so warps move."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=g)
        elif "lastConv" in key:
            state[key] = 0.05 * torch.randn(value.shape, generator=g)
        elif key.endswith(("bias", "running_mean")):
            state[key] = 0.1 * torch.randn(value.shape, generator=g)
        else:
            fan_in = value[0].numel() if "upConvs" not in key else value.shape[0] * value[0, 0].numel()
            state[key] = torch.randn(value.shape, generator=g) / math.sqrt(fan_in)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _randomize(SPEC.build(**TINY))


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 2, *SIZE, generator=g)


@pytest.fixture(scope="module")
def all_taps(model, pair):
    with torch.no_grad():
        return model.forward_taps(pair, model.tap_names())


# --- independent rebuild of the upstream wrappers -------------------------------------------

def _mermaid_warp(image, coords):
    """compute_warped_image_multiNC(image, coords, 1 / (n - 1), 1), written as mermaid does."""
    size = image.shape[2:]
    scaled = torch.zeros_like(coords)
    for d in range(3):
        spacing = 1.0 / (size[d] - 1)
        scaled[:, d, ...] = coords[:, d, ...] * (2.0 / (size[d] - 1.0) / spacing) - 1.0
    ordered = torch.zeros_like(scaled)
    ordered[:, 0], ordered[:, 1], ordered[:, 2] = scaled[:, 2], scaled[:, 1], scaled[:, 0]
    if ordered.shape[0] == 1 and image.shape[0] != 1:
        ordered = ordered.expand(image.shape[0], -1, -1, -1, -1)
    return F.grid_sample(image, ordered.permute([0, 2, 3, 4, 1]), mode="bilinear",
                         padding_mode="border", align_corners=True)


def _mermaid_identity(size):
    grid = np.mgrid[0:size[0], 0:size[1], 0:size[2]].astype("float32")
    spacing = 1.0 / (np.array(size) - 1)  # float64, as upstream's assign_identity_map
    for d in range(3):
        grid[d] *= spacing[d]
    return torch.from_numpy(grid[None].astype("float32"))


class _UpstreamModule(nn.Module):
    def set_size(self, size):
        self.identity_map = _mermaid_identity(size)


class _UpstreamFFVF(_UpstreamModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image_a, image_b):
        disp = self.net.run(image_a, image_b, set(), None, {})

        def transform(coords):
            if getattr(coords, "is_identity", False) and coords.shape == disp.shape:
                return coords + disp
            return coords + _mermaid_warp(disp, coords)
        return transform


class _UpstreamDownsample(_UpstreamModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image_a, image_b):
        return self.net(F.avg_pool3d(image_a, 2, ceil_mode=True), F.avg_pool3d(image_b, 2, ceil_mode=True))


class _UpstreamTwoStep(_UpstreamModule):
    def __init__(self, net_phi, net_psi):
        super().__init__()
        self.netPhi = net_phi
        self.netPsi = net_psi

    def forward(self, image_a, image_b):
        self.identity_map.is_identity = True
        phi = self.netPhi(image_a, image_b)
        psi = self.netPsi(_mermaid_warp(image_a, phi(self.identity_map)), image_b)
        return lambda coords: phi(psi(coords))


def _upstream_cascade(unets: dict[str, UNet2], size) -> _UpstreamTwoStep:
    """make_network(include_last_step=True).regis_net around the given UNets."""
    inner = _UpstreamFFVF(unets["A"])
    for stage in ("B", "C"):
        inner = _UpstreamTwoStep(_UpstreamDownsample(inner), _UpstreamFFVF(unets[stage]))
    net = _UpstreamTwoStep(inner, _UpstreamFFVF(unets["D"]))

    def assign(module, shape):
        if isinstance(module, _UpstreamModule):
            module.set_size(shape)
            if isinstance(module, _UpstreamDownsample):
                shape = tuple(math.ceil(n / 2) for n in shape)
        for child in module.children():
            assign(child, shape)
    assign(net, size)
    return net


# --- spec and tap table ---------------------------------------------------------------------

def test_spec_declares_the_published_model():
    assert SPEC.input_kind == "pair3d" and SPEC.in_channels == 2
    assert SPEC.input_size == (175, 175, 175)
    assert (SPEC.preprocess.rule, SPEC.preprocess.params) == ("percentile_clamp", {"upper": 99.0})
    names = [t.name for t in SPEC.taps]
    # per stage: 5 encoder and 5 decoder levels, the map, and the map's two features
    assert len(names) == 4 * 13 and names[0] == "A.enc.0" and names[-1] == "D.phi.logjac"
    assert names[10:13] == ["A.phi", "A.phi.disp", "A.phi.logjac"]
    assert {t.name: t.channels for t in SPEC.taps}["C.enc.4"] == 512
    assert {t.name: t.reduction for t in SPEC.taps}["A.enc.0"] == 8


def test_full_size_model_has_upstream_parameter_count_and_keys():
    with torch.device("meta"):  # shapes only: skips initialising 70 M parameters
        full = SPEC.build()
    per_unet = sum(p.numel() for p in full.stages["A"].parameters())
    assert per_unet == 17_670_229
    assert sum(p.numel() for p in full.parameters()) == 4 * per_unet  # 70.7 M
    keys = to_regis_net_layout(full.state_dict())
    assert len(keys) == 188
    assert "netPhi.netPhi.net.netPhi.net.net.downConvs.0.weight" in keys
    assert "netPsi.net.lastConv.bias" in keys
    assert upstream_prefixes()["B"] == "netPhi.netPhi.net.netPsi.net."


def test_every_tap_has_the_declared_shape(model, pair, all_taps):
    table = SPEC.tap_table(**TINY)
    features = model.feature_names()
    assert [t.name for t in table if t.name not in features] == model.tap_names() == list(all_taps)
    all_taps = {**all_taps, **model.forward_taps(pair, features)}
    for tap in table:
        expected = (pair.shape[0], tap.channels, *(math.ceil(n / tap.reduction) for n in SIZE))
        assert tuple(all_taps[tap.name].shape) == expected, tap.name
        assert torch.isfinite(all_taps[tap.name]).all(), tap.name


def test_last_tap_equals_plain_forward(model, pair, all_taps):
    with torch.no_grad():
        out = model(pair)
    assert out.shape == (1, 3, *SIZE)
    assert torch.equal(out, all_taps["D.phi"])
    # The warps are not trivial: the map moves voxels by more than a voxel somewhere.
    moved = (out - identity_grid(SIZE)).abs().amax(dim=(0, 2, 3, 4)) * (torch.tensor(SIZE) - 1)
    assert (moved > 1.0).all()


def test_cascade_matches_the_upstream_wrappers_rebuilt(model, pair):
    second = torch.rand(1, 2, *SIZE, generator=torch.Generator().manual_seed(7))
    # Batch 1 takes upstream's identity-map shortcut, batch 2 interpolates instead.
    for batch in (pair, torch.cat([pair, second])):
        reference = _upstream_cascade(dict(model.stages.items()), SIZE)
        with torch.no_grad():
            phi = reference(batch[:, :1], batch[:, 1:])
            expected = phi(reference.identity_map)
            assert torch.equal(model(batch), expected)


def test_warp_matches_scipy():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 1, 7, 9, 11, generator=g)
    coords = torch.rand(1, 3, 4, 5, 6, generator=g) * 1.2 - 0.1  # some outside [0, 1]: border
    out = warp(image, coords)[0, 0].numpy()
    index = coords[0].double().numpy() * (np.array([7, 9, 11]) - 1)[:, None, None, None]
    ref = ndimage.map_coordinates(image[0, 0].double().numpy(), index, order=1, mode="nearest")
    np.testing.assert_allclose(out, ref, atol=1e-5)



# --- dtypes: the warps follow the input's dtype ----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_identity_grid_is_made_in_the_requested_dtype(dtype):
    size = (3, 7, 10)
    ref = torch.from_numpy(np.stack(np.meshgrid(*[np.arange(n) / (n - 1) for n in size], indexing="ij"))[None])
    grid = identity_grid(size, dtype=dtype)
    assert grid.dtype == dtype and grid.shape == (1, 3, *size)
    # rounded once from float64: within half an ulp at 1 (float64: i * (1 / (n-1)) vs i / (n-1))
    assert (grid.double() - ref).abs().max() <= torch.finfo(dtype).eps / 2


def test_float64_cascade_matches_float32(model, pair, all_taps):
    """A float64 copy runs every warp in float64 and agrees with float32 (measured 6e-7)."""
    wide = copy.deepcopy(model).double()
    with torch.no_grad():
        out = wide.forward_taps(pair.double(), wide.tap_names())
    for tap, ref in all_taps.items():
        assert out[tap].dtype == torch.float64, tap
        err = float((out[tap] - ref.double()).abs().max() / ref.abs().max())
        assert err <= 1e-5, f"{tap}: float64 vs float32 relative error {err:.2e}"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_cascade_runs_in_that_dtype(model, pair, all_taps, precision, monkeypatch):
    """fp16 / bf16 end to end: identity grids, warps and compositions in the input's dtype
    (a float32 grid made ``grid_sample`` refuse the half image). Measured worst rel: fp16
    5e-3, bf16 4.6e-2 (D.enc.0), against tolerances 2e-2 / 6e-2."""
    dtype = DTYPES[precision]
    pool = F.avg_pool3d
    # The CPU has no half avg_pool3d kernel: pool in float32 and round back, as a GPU half
    # kernel (float accumulator) does. Everything else runs in ``dtype``.
    monkeypatch.setattr(F, "avg_pool3d", lambda x, *a, **k: pool(x.float(), *a, **k).to(x.dtype))
    low = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        out = low.forward_taps(pair.to(dtype), low.tap_names())
    assert {t.dtype for t in out.values()} == {dtype}
    ref = {tap: v.reshape(1, -1).numpy() for tap, v in all_taps.items()}
    got = {tap: v.float().reshape(1, -1).numpy() for tap, v in out.items()}
    rel_tol, cos_tol = TOLERANCES[precision]
    for tap, (_, rel, cos) in compare(ref, got).items():
        assert rel <= rel_tol and cos >= cos_tol, f"{tap} at {precision}: rel {rel:.2e}, cosine {cos:.6f}"


def test_order_swaps_moving_and_fixed(model, pair):
    swapped = SPEC.build(**TINY, order="fixed_moving")
    swapped.load_state_dict(model.state_dict())
    swapped.eval()
    with torch.no_grad():
        assert torch.equal(swapped(pair.flip(1)), model(pair))
    with pytest.raises(InputError, match="order"):
        SPEC.build(**TINY, order="moving_first")


def test_bad_input_is_rejected(model):
    with pytest.raises(InputError, match=r"\(B, 2, D, H, W\)"):
        model(torch.zeros(1, 1, *SIZE))
    with pytest.raises(InputError, match=">= 17"):
        model(torch.zeros(1, 2, 16, 30, 30))


# --- running only what is needed, and pruning -----------------------------------------------

def _calls(model: nn.Module) -> tuple[list[str], list]:
    seen: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=name: seen.append(n))
               for name, m in model.named_modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    return seen, handles


@pytest.mark.parametrize("tap, ran, not_ran", [
    ("A.enc.1", ["stages.A.downConvs.1"], ["stages.A.downConvs.2", "stages.A.upConvs.2", "stages.B.downConvs.0"]),
    ("A.phi", ["stages.A.lastConv"], ["stages.B.downConvs.0"]),
    ("C.dec.2", ["stages.A.lastConv", "stages.B.lastConv", "stages.C.upConvs.2"],
     ["stages.C.upConvs.1", "stages.C.lastConv", "stages.D.downConvs.0"]),
])
def test_forward_taps_runs_nothing_after_the_last_tap(model, pair, all_taps, tap, ran, not_ran):
    seen, handles = _calls(model)
    try:
        with torch.no_grad():
            out = model.forward_taps(pair, [tap])
    finally:
        for h in handles:
            h.remove()
    assert set(ran) <= set(seen) and not set(not_ran) & set(seen)
    assert torch.equal(out[tap], all_taps[tap])


def _needed_parameters(model: nn.Module, tap: str) -> int:
    """Parameters an unpruned model needs for ``tap``, counted layer by layer."""
    stage, level = tap.split(".", 1)
    total = sum(p.numel() for s in STAGES[: STAGES.index(stage)] for p in model.stages[s].parameters())
    unet = model.stages[stage]
    if level == "phi":
        return total + sum(p.numel() for p in unet.parameters())
    kind, index = level.split(".")

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())
    if kind == "enc":
        return total + sum(count(unet.downConvs[k]) for k in range(int(index) + 1))
    kept = range(int(index), unet.depth)
    return total + count(unet.downConvs) + sum(count(unet.upConvs[d]) + count(unet.batchNorms[d]) for d in kept)


@pytest.mark.parametrize("tap", ["A.enc.0", "A.dec.1", "B.enc.2", "C.phi", "D.dec.0"])
def test_pruned_model_holds_nothing_past_its_tap(model, pair, all_taps, tap):
    pruned = _randomize(SPEC.build(**TINY))
    expected = _needed_parameters(pruned, tap)
    pruned.prune_after(tap)
    assert sum(p.numel() for p in pruned.parameters()) == expected
    pruned.load_state_dict({k: v for k, v in model.state_dict().items() if k in pruned.state_dict()})
    taps = [t for t in model.tap_names()[: model.tap_names().index(tap) + 1] if t.startswith(tap[0])]
    with torch.no_grad():
        out = pruned.forward_taps(pair, taps)
    for name in taps:
        assert torch.equal(out[name], all_taps[name]), name
    later = model.tap_names()[model.tap_names().index(tap) + 1:]
    if later:
        with pytest.raises(UnknownNameError, match="pruned"):
            pruned.forward_taps(pair, [later[0]])


def test_create_backbone_pools_several_taps_in_one_pass(model, pair, all_taps, tmp_path):
    path = tmp_path / "regis_net.trch"
    torch.save(to_regis_net_layout(model.state_dict()), path)
    backbone = create_backbone("unigradicon", ["A.enc.2", "B.dec.0", "B.phi"], weights=str(path), tiny=True,
                               pooling={"B.dec.0": "max"})
    assert "C" not in backbone.trunk.stages and "D" not in backbone.trunk.stages
    assert backbone.provenance["weights_sha256"] == sha256_file(path)
    assert backbone.output_dims() == {"A.enc.2": 16, "B.dec.0": 4, "B.phi": 3}
    with torch.no_grad():
        out = backbone(pair)
    torch.testing.assert_close(out["A.enc.2"], all_taps["A.enc.2"].mean(dim=(2, 3, 4)), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["B.dec.0"], all_taps["B.dec.0"].amax(dim=(2, 3, 4)), rtol=0, atol=0)
    torch.testing.assert_close(out["B.phi"], all_taps["B.phi"].mean(dim=(2, 3, 4)), rtol=0, atol=1e-6)


# --- checkpoint formats ---------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["regis_net", "gradicon", "medfeat", "safetensors"])
def test_each_checkpoint_format_round_trips(model, pair, all_taps, layout, tmp_path):
    if layout in ("regis_net", "gradicon"):
        # The key layout comes from the rebuilt upstream nesting, not from our converter.
        state = _upstream_cascade(dict(model.stages.items()), SIZE).state_dict()
        if layout == "gradicon":
            state = {f"regis_net.{k}": v for k, v in state.items()}
            # icon_registration before 2022 saved identity maps; they are derived, not loaded.
            state["regis_net.identity_map"] = _mermaid_identity(SIZE)
        path = tmp_path / "Step_2_final.trch"
        torch.save(state, path)
    elif layout == "medfeat":
        path = tmp_path / "medfeat.pt"
        torch.save({"state_dict": model.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file(to_regis_net_layout(model.state_dict()), str(path))
    backbone = create_backbone("unigradicon", ["D.phi"], weights=str(path), tiny=True, pooling="max")
    with torch.no_grad():
        out = backbone(pair)["D.phi"]
    assert torch.equal(out, all_taps["D.phi"].amax(dim=(2, 3, 4)))


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(model, tmp_path):
    state = to_regis_net_layout(model.state_dict())
    del state["netPsi.net.lastConv.bias"]
    state["netPsi.net.extraConv.weight"] = torch.zeros(1)
    path = tmp_path / "bad.trch"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        create_backbone("unigradicon", ["A.enc.0"], weights=str(path), tiny=True)
    message = str(err.value)
    assert "unigradicon" in message and "\n" not in message
    assert "missing: stages.D.lastConv.bias" in message
    assert "unexpected: stages.D.extraConv.weight" in message


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="none of the formats unigradicon loads"):
        create_backbone("unigradicon", ["A.enc.0"], weights=str(path), tiny=True)

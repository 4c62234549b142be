"""Generic backbones (timm:, hf:, torchscript:, onnx:, module:) against their own models.

Each kind is checked against an independent reference: the plain model run by its own
library (timm's ``forward_intermediates`` / ``forward_head``, transformers'
``output_hidden_states``, the scripted module, ONNX Runtime on the untouched file, the
module's own submodules), with a tolerance of 1e-5 (the same float32 arithmetic).
"""
from __future__ import annotations

import json
from pathlib import Path

import generic_nets
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medfeat.errors import InputError, UnknownNameError, WeightsError
from medfeat.export.backbones.generic import ModelInputs, array_name, parse_intensity, tap_name
from medfeat.export.backbones.generic.hooks import Cut
from medfeat.export.backbones.registry import create_backbone, get_spec
from medfeat.export.runtimes.artefacts import PARITY_FILE, onnx_artefact

ATOL = 1e-5
VOL = ModelInputs("volume3d", (16, 16, 16), "zscore")
VIT = {"depth": 3, "img_size": 32, "embed_dim": 48, "num_heads": 3}


def _parity(backbone, tmp_path: Path) -> dict:
    entry = onnx_artefact(backbone, cache_dir=tmp_path / "cache")
    report = json.loads((entry.path / PARITY_FILE).read_text())
    assert report["passed"], report
    return report


# -- module: --------------------------------------------------------------------------------
def test_module_taps_are_submodules_in_forward_order() -> None:
    spec = get_spec("module:generic_nets:plain_convnet", VOL)
    names = [t.name for t in spec.taps]
    assert names.index("encoder.layer1") < names.index("encoder.layer3") < names.index("bottleneck") < names.index("head")
    layer2 = next(t for t in spec.taps if t.name == "encoder.layer2")
    assert (layer2.channels, layer2.reduction, layer2.kind) == (8, 4, "map")
    assert spec.store_key == "module-generic_nets.plain_convnet" and spec.in_channels == 1


def test_module_tap_matches_the_submodule_and_nothing_after_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = generic_nets.plain_convnet().eval()
    path = tmp_path / "w.safetensors"
    save_file(ref.state_dict(), str(path))
    bb = create_backbone("module:generic_nets:plain_convnet", ["encoder.layer2"], weights=str(path), inputs=VOL)
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        want = ref.encoder.layer2(ref.encoder.layer1(x)).mean(dim=(2, 3, 4))
        got = bb(x)["encoder.layer2"]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    net = bb.trunk.net
    # the encoder is not sequential: its layer3 is a Cut; bottleneck and head likewise
    assert isinstance(net.encoder.layer3, Cut) and isinstance(net.head, Cut) and isinstance(net.bottleneck, Cut)
    assert sum(p.numel() for p in bb.parameters()) == sum(
        p.numel() for m in (ref.encoder.layer1, ref.encoder.layer2) for p in m.parameters())


def test_sequential_module_is_truly_cut() -> None:
    inputs = ModelInputs("image2d", (32, 32), "mean_std:imagenet")
    bb = create_backbone("module:generic_nets:sequential_net", ["2"], inputs=inputs)
    assert len(bb.trunk.net) == 3  # conv, relu, conv: the rest is gone
    torch.manual_seed(0)
    ref = generic_nets.sequential_net()
    torch.manual_seed(0)
    bb = create_backbone("module:generic_nets:sequential_net", ["2", "6"], inputs=inputs)
    ref.load_state_dict(bb.trunk.net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = bb(x)
        torch.testing.assert_close(out["6"], ref(x), rtol=0, atol=ATOL)
        torch.testing.assert_close(out["2"], ref[:3](x).mean(dim=(2, 3)), rtol=0, atol=ATOL)


def test_module_strict_weights_and_missing_declarations(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"encoder.layer1.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="does not fit"):
        create_backbone("module:generic_nets:plain_convnet", ["head"], weights=str(bad), inputs=VOL)
    with pytest.raises(InputError, match="--intensity"):
        get_spec("module:generic_nets:plain_convnet", ModelInputs("volume3d", (16, 16, 16)))
    with pytest.raises(InputError, match="--input-size"):
        get_spec("module:generic_nets:plain_convnet", ModelInputs("volume3d", None, "zscore"))
    with pytest.raises(InputError, match="has no nope"):
        get_spec("module:generic_nets:nope", VOL)


def test_module_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    bb = create_backbone("module:generic_nets:plain_convnet", ["encoder.layer1", "encoder.layer3.0"], inputs=VOL)
    report = _parity(bb, tmp_path)
    assert set(report["taps"]) == {"encoder.layer1", "encoder.layer3.0"}


# -- timm: ----------------------------------------------------------------------------------
def test_timm_vit_taps_and_data_config_from_timm() -> None:
    import timm

    spec = get_spec("timm:vit_tiny_patch16_224", None, VIT)
    assert [t.name for t in spec.taps] == ["blocks.0", "blocks.1", "blocks.2", "pre_logits"]
    assert spec.input_size == (32, 32) and spec.store_key == "timm-vit_tiny_patch16_224"
    cfg = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).pretrained_cfg
    assert spec.preprocess.params == {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def test_timm_matches_forward_intermediates_and_head(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).eval()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    bb = create_backbone("timm:vit_tiny_patch16_224", ["blocks.1", "pre_logits"], weights=str(path), config=VIT)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inter = ref.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        head = ref.forward_head(ref.forward_features(x), pre_logits=True)
        out = bb(x)
    torch.testing.assert_close(out["blocks.1"], inter.mean(dim=(2, 3)), rtol=0, atol=ATOL)
    torch.testing.assert_close(out["pre_logits"], head, rtol=0, atol=ATOL)
    cut = create_backbone("timm:vit_tiny_patch16_224", ["blocks.0"], weights=str(path), config=VIT)
    assert len(cut.trunk.net.blocks) == 1  # pruned by timm's prune_intermediate_layers


def test_timm_hooks_path_equals_forward_intermediates() -> None:
    args = {"layers": [1, 1, 1, 1]}
    a = create_backbone("timm:resnet18", ["layer2"], config=args, inputs=ModelInputs(size=(64, 64)))
    b = create_backbone("timm:resnet18", ["layer2"], config={**args, "tap_with_hooks": True},
                        inputs=ModelInputs(size=(64, 64)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x)["layer2"], b(x)["layer2"], rtol=0, atol=ATOL)
    assert "layer3" in b.trunk.pruned and "fc" in b.trunk.pruned


def test_timm_refuses_downloads_and_unknown_models() -> None:
    with pytest.raises(InputError, match="download"):
        get_spec("timm:resnet18", None, {"pretrained": True})
    with pytest.raises(UnknownNameError, match="no model"):
        get_spec("timm:not_a_model_at_all")


def test_timm_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    bb = create_backbone("timm:vit_tiny_patch16_224", ["blocks.1", "pre_logits"], config=VIT)
    _parity(bb, tmp_path)


# -- hf: ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> tuple[Path, object]:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=14)
    torch.manual_seed(2)
    model = Dinov2Model(cfg).eval()
    folder = tmp_path_factory.mktemp("hf") / "rad-dino-tiny"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 28, "width": 28}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    return folder, model


def test_hf_hidden_states_and_pooler_match_transformers(dinov2_dir) -> None:
    folder, model = dinov2_dir
    spec = get_spec(f"hf:{folder}")
    assert spec.store_key == "hf-rad-dino-tiny" and spec.input_size == (28, 28)
    assert spec.preprocess.params == {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    taps = {t.name: t for t in spec.taps}
    assert taps["hidden_states.2"].prefix_tokens == 1 and "pooler_output" in taps
    bb = create_backbone(f"hf:{folder}", ["hidden_states.0", "hidden_states.2", "pooler_output"],
                         pooling={"hidden_states.0": "mean", "hidden_states.2": "cls"})
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = model(pixel_values=x, output_hidden_states=True)
        out = bb(x)
    torch.testing.assert_close(out["hidden_states.0"], ref.hidden_states[0][:, 1:].mean(1), rtol=0, atol=ATOL)
    torch.testing.assert_close(out["hidden_states.2"], ref.hidden_states[2][:, 0], rtol=0, atol=ATOL)
    torch.testing.assert_close(out["pooler_output"], ref.pooler_output, rtol=0, atol=ATOL)
    cut = create_backbone(f"hf:{folder}", ["hidden_states.1"])
    assert "encoder.layer.1" in cut.trunk.pruned and sum(p.numel() for p in cut.parameters()) < sum(
        p.numel() for p in model.parameters())


def test_hf_refuses_weights_that_do_not_fit_and_extra_weights(dinov2_dir, tmp_path: Path) -> None:
    folder, _ = dinov2_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "layer.2." not in k}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="missing"):
        create_backbone(f"hf:{broken}", ["hidden_states.1"], inputs=ModelInputs(intensity="mean_std"))
    with pytest.raises(WeightsError, match="not taken"):
        create_backbone(f"hf:{folder}", ["hidden_states.1"], weights=str(folder / "model.safetensors"))


def test_hf_exports_to_onnx_with_parity(dinov2_dir, tmp_path: Path) -> None:
    folder, _ = dinov2_dir
    _parity(create_backbone(f"hf:{folder}", ["hidden_states.2", "pooler_output"]), tmp_path)


# -- torchscript: and onnx: -----------------------------------------------------------------
@pytest.fixture(scope="module")
def graph_files(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("graphs")
    torch.manual_seed(3)
    net = generic_nets.NamedOutputs().eval()
    torch.jit.script(net).save(str(folder / "net.pt"))
    tup = generic_nets.TupleOutputs().eval()
    tup.load_state_dict(net.state_dict())
    names = ["enc/a", "enc/b", "vec"]
    torch.onnx.export(tup, (torch.rand(2, 1, 16, 16, 16),), str(folder / "net.onnx"), input_names=["image"],
                      output_names=names, dynamic_axes={n: {0: "b"} for n in ["image", *names]},
                      opset_version=17, dynamo=False)
    torch.onnx.export(tup, (torch.rand(1, 1, 16, 16, 16),), str(folder / "fixed.onnx"), input_names=["image"],
                      output_names=names, opset_version=17, dynamo=False)
    return folder / "net.pt", folder / "net.onnx", net


def test_torchscript_named_outputs_are_the_taps(graph_files, tmp_path: Path) -> None:
    script, _, net = graph_files
    bb = create_backbone(f"torchscript:{script}", ["enc.b", "vec"], inputs=VOL)
    assert [t.name for t in bb.spec.taps] == ["enc.a", "enc.b", "vec"] and bb.spec.store_key == "torchscript-net"
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        ref = net(x)
        out = bb(x)
    torch.testing.assert_close(out["enc.b"], ref["enc/b"].mean(dim=(2, 3, 4)), rtol=0, atol=ATOL)
    torch.testing.assert_close(out["vec"], ref["vec"], rtol=0, atol=ATOL)
    assert bb.provenance["source"]["pruned"] is False  # a scripted graph runs whole, and says so
    _parity(bb, tmp_path)


def test_onnx_outputs_are_the_taps_and_the_graph_is_cut(graph_files, tmp_path: Path) -> None:
    import onnxruntime as ort

    _, path, _ = graph_files
    spec = get_spec(f"onnx:{path}", ModelInputs(intensity="zscore"))
    assert (spec.input_kind, spec.input_size, spec.in_channels) == ("volume3d", (16, 16, 16), 1)
    bb = create_backbone(f"onnx:{path}", ["enc.a"], inputs=ModelInputs(intensity="zscore"))
    assert {n.op_type for n in bb.trunk.model.graph.node} == {"Conv", "Relu"} and len(bb.trunk.model.graph.node) == 2
    x = np.random.default_rng(0).random((3, 1, 16, 16, 16), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(["enc/a"], {"image": x})[0]
    got = bb(torch.from_numpy(x))["enc.a"].numpy()
    np.testing.assert_allclose(got, ref.mean(axis=(2, 3, 4)), rtol=0, atol=ATOL)
    _parity(bb, tmp_path)


def test_onnx_fixed_batch_runs_item_by_item(graph_files) -> None:
    _, path, net = graph_files
    fixed = path.with_name("fixed.onnx")
    bb = create_backbone(f"onnx:{fixed}", ["vec"], inputs=ModelInputs(intensity="zscore"))
    x = torch.rand(3, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(bb(x)["vec"], net(x)["vec"], rtol=0, atol=ATOL)


# -- names and rules -----------------------------------------------------------------------
def test_names_are_store_safe_and_rules_parse() -> None:
    assert tap_name("/encoder/layer3/Relu_output_0") == "encoder.layer3.Relu_output_0"
    assert array_name("module", "pkg.mod:make") == "module-pkg.mod.make"
    assert parse_intensity("ct_window:lo=-1000,hi=1000").params == {"lo": -1000.0, "hi": 1000.0}
    assert parse_intensity("percentile_clamp").params == {"upper": 99.0}
    assert parse_intensity("mean_std:mean=0.5,std=0.25").params == {"mean": (0.5,), "std": (0.25,)}
    with pytest.raises(UnknownNameError, match="unknown rule"):
        parse_intensity("gamma")
    with pytest.raises(InputError, match="lo and hi"):
        parse_intensity("ct_window:lo=0")
    with pytest.raises(InputError, match="generic models"):
        get_spec("unet3d", ModelInputs(intensity="zscore"))


def test_hf_siglip_vision_tower_without_cls(tmp_path: Path) -> None:
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=32, patch_size=8)
    text = SiglipTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            vocab_size=64, max_position_embeddings=16)
    torch.manual_seed(4)
    model = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())).eval()
    model.save_pretrained(tmp_path / "siglip")
    spec = get_spec(f"hf:{tmp_path / 'siglip'}", ModelInputs(intensity="mean_std:mean=0.5,std=0.5"))
    taps = {t.name: t for t in spec.taps}
    assert taps["hidden_states.2"].prefix_tokens == 0 and taps["hidden_states.2"].pooling == "mean"
    bb = create_backbone(f"hf:{tmp_path / 'siglip'}", ["hidden_states.1", "pooler_output"],
                         inputs=ModelInputs(intensity="mean_std:mean=0.5,std=0.5"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=x, output_hidden_states=True)
        out = bb(x)
    torch.testing.assert_close(out["hidden_states.1"], ref.hidden_states[1].mean(1), rtol=0, atol=ATOL)
    torch.testing.assert_close(out["pooler_output"], ref.pooler_output, rtol=0, atol=ATOL)

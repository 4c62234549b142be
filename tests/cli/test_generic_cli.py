"""Any model from the command line: each generic kind and a plugin file, end to end.

``medfeat extract`` runs every generic kind on a tiny cohort into a store that verifies;
``medfeat export`` exports one with its parity report; a plugin file registers a model that
a two-worker LocalCluster builds (the file shipped to the workers); an installed package
registers one through the ``medfeat.backbones`` entry point group.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import generic_nets
import pytest
import torch
from _cohort import tiny_cohort
from cli_run import run_medfeat

from medfeat.engine.store.feature_store import FeatureStore

VOL_ARGS = ["--input-kind", "volume3d", "--input-size", "16,16,16", "--intensity", "zscore"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return tiny_cohort(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from medfeat.cohorts.synth2d import synth2d_cohort

    return synth2d_cohort(tmp_path_factory.mktemp("img"), images=4, seed=0, size=32)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = generic_nets.NamedOutputs().eval()
    torch.jit.script(net).save(str(folder / "scripted.pt"))
    tup = generic_nets.TupleOutputs().eval()
    tup.load_state_dict(net.state_dict())
    names = ["enc/a", "enc/b", "vec"]
    torch.onnx.export(tup, (torch.rand(2, 1, 16, 16, 16),), str(folder / "graph.onnx"), input_names=["image"],
                      output_names=names, dynamic_axes={n: {0: "b"} for n in ["image", *names]},
                      opset_version=17, dynamo=False)
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(folder / "dino")
    return {"torchscript": folder / "scripted.pt", "onnx": folder / "graph.onnx", "hf": folder / "dino"}


def _extract_and_verify(capsys, manifest: Path, store: Path, model: str, taps: str, *extra: str) -> list[str]:
    code, out, err = run_medfeat(capsys, "extract", "--random-init", "--manifest", str(manifest), "--store", str(store),
                              "--model", model, "--taps", taps, "--scheduler-kind", "sync", "--quiet", *extra)
    assert code == 0, err + out
    code, out, err = run_medfeat(capsys, "store", "verify", str(store))
    assert code == 0 and out.strip().endswith("ok"), out + err
    fs = FeatureStore.open(store)
    return [str(k) for k in fs.arrays()]


@pytest.mark.parametrize("kind", ["module", "torchscript", "onnx"])
def test_3d_generic_kinds_extract(kind, manifest, graphs, tmp_path, capsys) -> None:
    model = {"module": "module:generic_nets:plain_convnet", "torchscript": f"torchscript:{graphs['torchscript']}",
             "onnx": f"onnx:{graphs['onnx']}"}[kind]
    taps = "encoder.layer2" if kind == "module" else "enc.b"
    extra = VOL_ARGS if kind != "onnx" else ["--intensity", "zscore"]  # the ONNX input declares kind and size
    arrays = _extract_and_verify(capsys, manifest, tmp_path / "s.zarr", model, taps, *extra)
    stem = {"module": "module-generic_nets.plain_convnet", "torchscript": "torchscript-scripted",
            "onnx": "onnx-graph"}[kind]
    assert arrays == [f"{stem}:{taps}:none-whole"]
    fs = FeatureStore.open(tmp_path / "s.zarr")
    ids, X = fs.read(arrays[0])
    assert len(ids) == 6 and X.shape == (6, 8)
    prov = fs.provenance(fs.arrays()[0])
    assert prov["source"]["name"] == model and prov["preprocessing"]["intensity"]


def test_2d_generic_kinds_extract(images, graphs, tmp_path, capsys) -> None:
    arrays = _extract_and_verify(capsys, images, tmp_path / "t.zarr", "timm:resnet18", "layer2,pre_logits",
                                 "--model-arg", "layers=[1,1,1,1]", "--input-size", "32,32")
    assert arrays == ["timm-resnet18:layer2:none-whole", "timm-resnet18:pre_logits:none-whole"]
    arrays = _extract_and_verify(capsys, images, tmp_path / "h.zarr", f"hf:{graphs['hf']}", "hidden_states.1",
                                 "--intensity", "mean_std:imagenet")
    assert arrays == ["hf-dino:hidden_states.1:none-whole"]


def test_generic_export_and_show(graphs, tmp_path, capsys) -> None:
    out = tmp_path / "onnx"
    code, stdout, err = run_medfeat(capsys, "export", f"onnx:{graphs['onnx']}", "--taps", "enc.a,vec",
                                 "--intensity", "zscore", "--out", str(out), "--cache-dir", str(tmp_path / "c"))
    assert code == 0, err
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and set(parity["taps"]) == {"enc.a", "vec"}
    code, stdout, err = run_medfeat(capsys, "models", "show", "timm:vit_tiny_patch16_224", "--model-arg", "depth=2",
                                 "--model-arg", "img_size=32", "--model-arg", "embed_dim=48", "--model-arg", "num_heads=3")
    assert code == 0 and "blocks.1" in stdout and "pre_logits" in stdout and "timm-vit_tiny_patch16_224" in stdout, err


def test_generic_user_errors_are_one_line(manifest, graphs, tmp_path, capsys) -> None:
    base = ["extract", "--random-init", "--manifest", str(manifest), "--store", str(tmp_path / "s"), "--scheduler-kind", "sync"]
    for args, message in [
        (["--model", "module:generic_nets:plain_convnet", "--taps", "head", "--input-kind", "volume3d",
          "--input-size", "16,16,16"], "--intensity"),
        (["--model", f"torchscript:{graphs['torchscript']}", "--taps", "nope", *VOL_ARGS], "unknown tap 'nope'"),
        (["--model", "unet3d", "--taps", "bottom", "--intensity", "zscore"], "for generic models"),
        (["--model", "onnx:/no/such.onnx", "--taps", "a", "--intensity", "zscore"], "file not found"),
    ]:
        code, out, err = run_medfeat(capsys, *base, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


PLUGIN = '''
"""A user's plugin: a plain 3D conv net registered as 'plugged_net'."""
import torch
from torch import nn

from medfeat.export.backbones.registry import get_spec, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec


class Plugged(TappedModel):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Conv3d(1, 4, 3, stride=2, padding=1), nn.Conv3d(4, 8, 3, stride=2, padding=1)])

    def tap_names(self):
        return ["stage0", "stage1"]

    def forward_taps(self, x, taps):
        out = {}
        for i, stage in enumerate(self.stages):
            x = torch.relu(stage(x))
            out[f"stage{i}"] = x
            if all(t in out for t in taps):
                break
        return {t: out[t] for t in taps}

    def prune_after(self, tap):
        del self.stages[int(tap[-1]) + 1:]


try:
    get_spec("plugged_net")
except KeyError:
    register_backbone(BackboneSpec("plugged_net", "volume3d", (16, 16, 16), 1, Preprocess("zscore"),
                                   (TapSpec("stage0", 4, 2), TapSpec("stage1", 8, 4)), build=lambda **cfg: Plugged()))
'''


def test_plugin_file_on_a_two_worker_local_cluster(manifest, tmp_path, capsys) -> None:
    plugin = tmp_path / "plugins" / "lab_models.py"
    plugin.parent.mkdir()
    plugin.write_text(PLUGIN)
    code, out, err = run_medfeat(capsys, "models", "list", "--plugin", str(plugin))
    assert code == 0 and "plugged_net" in out, err
    store = tmp_path / "p.zarr"
    code, out, err = run_medfeat(capsys, "extract", "--random-init", "--manifest", str(manifest), "--store", str(store),
                              "--model", "plugged_net", "--taps", "stage1", "--plugin", str(plugin),
                              "--workers", "2", "--threads-per-worker", "1", "--batch-size", "1",
                              "--chunk-items", "1", "--quiet")
    assert code == 0, err + out
    assert "2 workers" in out and "6 done now" in out
    runs = FeatureStore.open(store).runs()
    assert runs[-1]["config"]["model"]["modules"] == ["lab_models"]
    code, out, err = run_medfeat(capsys, "export", "plugged_net", "--taps", "stage0", "--plugin", str(plugin),
                              "--out", str(tmp_path / "onnx"), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0 and "stage0" in out and json.loads((tmp_path / "onnx" / "parity.json").read_text())["passed"], err


def test_missing_plugin_is_one_line(manifest, tmp_path, capsys) -> None:
    code, out, err = run_medfeat(capsys, "extract", "--random-init", "--manifest", str(manifest), "--store", str(tmp_path / "s"),
                              "--model", "x", "--taps", "a", "--plugin", str(tmp_path / "none.py"))
    assert code == 2 and "file not found" in err and len(err.strip().splitlines()) == 1


def test_installed_package_registers_through_entry_points(tmp_path) -> None:
    site = tmp_path / "site"
    (site / "acme_models").mkdir(parents=True)
    (site / "acme_models" / "__init__.py").write_text(PLUGIN.replace("plugged_net", "acme_net"))
    dist = site / "acme_models-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[medfeat.backbones]\nacme = acme_models\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "medfeat", "models", "show", "acme_net"], capture_output=True,
                       text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0 and "stage1" in r.stdout, r.stderr

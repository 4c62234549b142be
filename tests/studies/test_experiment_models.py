"""Experiment files with plugins and generic models: ``plugins:`` (relative to the file),
a ``module:`` model with its input declaration and build ``args``, visit settings in
``extract:``; the grid runs end to end and the probes find the arrays by their store name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from _cohort import tiny_cohort

from medfeat.errors import InputError
from medfeat.studies.experiment import load_experiment, run_experiment

PLUGIN = '''
from medfeat.export.backbones.registry import get_spec, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TapSpec
from generic_nets import plain_convnet  # noqa: F401  (the factory's module must import)

try:
    get_spec("exp_plugin_net")
except KeyError:
    import _tiny_backbone
    register_backbone(BackboneSpec("exp_plugin_net", "volume3d", (16, 16, 16), 1, Preprocess("zscore"),
                                   _tiny_backbone.TAPS, build=lambda **cfg: _tiny_backbone.TinyConvNet(1, 3)))
'''


def test_plugins_and_generic_models_in_an_experiment(tmp_path: Path, tmp_path_factory) -> None:
    manifest = tiny_cohort(tmp_path_factory, subjects=8)
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "exp_models.py").write_text(PLUGIN)
    yaml = tmp_path / "e.yaml"
    yaml.write_text(f"""
name: any
cohort: {{manifest: {manifest}}}
target: label
plugins: [lab/exp_models.py]
models:
  - {{name: exp_plugin_net, taps: [conv2]}}
  - name: module:generic_nets:plain_convnet
    taps: [encoder.layer2]
    input_kind: volume3d
    input_size: [16, 16, 16]
    intensity: zscore
    args: {{width: 2}}
variants: [none-whole]
pair_modes: [diff]
probe: {{n_splits: 2, seeds: [0], n_boot: 20}}
extract: {{scheduler_kind: sync, baseline_visit: baseline}}
""")
    exp = load_experiment(yaml)
    assert exp.plugins == [str((tmp_path / "lab" / "exp_models.py").resolve())]
    assert exp.models[1].args == {"width": 2} and exp.models[1].intensity == "zscore"
    paths = run_experiment(exp, tmp_path / "out", log=lambda line: None)
    specs = {c["spec"] for c in json.loads(Path(paths["results"]).read_text())["configs"]}
    assert specs == {"exp_plugin_net:conv2:none-whole", "module-generic_nets.plain_convnet:encoder.layer2:none-whole"}


def test_model_args_must_be_a_mapping(tmp_path: Path) -> None:
    yaml = tmp_path / "e.yaml"
    yaml.write_text("name: x\ncohort: {manifest: m.csv}\nmodels:\n  - {name: timm:resnet18, taps: [layer1], args: [1]}\n")
    with pytest.raises(InputError, match="args is a mapping"):
        load_experiment(yaml)

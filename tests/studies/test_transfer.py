"""The transfer study's three settings from an experiment file, and its per-dataset table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfeat.cohorts.synth_where import synth_where_cohort
from medfeat.errors import InputError
from medfeat.studies.experiment import load_experiment, run_experiment

ROOT = Path(__file__).resolve().parents[2]

YAML = """
name: transfer-tiny
kind: transfer2d
cohorts:
  - {{name: where, manifest: {manifest}, target: label, probe: {{task: binary}}}}
target: label
models:
  - {{name: deit_b16, tiny: true, input_size: [48, 48], taps: [blocks.0, norm]}}
variants: [none-whole]
probe: {{n_splits: 2, seeds: [0], n_boot: 50}}
extract: {{batch_size: 32, scheduler_kind: sync, progress: false}}
transfer:
  split_column: split
  n_boot: 50
  linear: {{}}
  transformer_head:
    views: 1
    head: {{width: 16, depth: 1, heads: 2}}
    train: {{epochs: 2, batch_size: 16, warmup_iters: 2, device: cpu}}
  finetune: {{epochs: 1, batch_size: 16, warmup_iters: 2, augment: none, device: cpu}}
"""


def test_three_settings_one_table_per_dataset(tmp_path):
    manifest = synth_where_cohort(tmp_path / "c", images=40, size=48, cells=3, fractions=(0.5, 0.2, 0.3))
    exp = load_experiment(_write(tmp_path / "e.yaml", YAML.format(manifest=manifest)))
    paths = run_experiment(exp, tmp_path / "out", log=lambda s: None)
    configs = json.loads(Path(paths["results"]).read_text())["configs"]
    shown = {c["setting"]: c for c in configs if c.get("table")}
    assert set(shown) == {"linear", "transformer_head", "finetune"}
    assert shown["linear"]["spec"] == "deit_b16:norm:none-whole"  # the model's last tap
    assert shown["transformer_head"]["spec"] == "deit_b16:norm@tokens-study1:none-whole"
    n_test = {c["result"]["n_items"] for c in shown.values()}
    assert n_test == {12}  # every setting scored on the same 30% test split
    report = Path(paths["report"]).read_text()
    assert "### where (auc, 95% CI)" in report
    row = next(line for line in report.splitlines() if line.startswith("| deit_b16 |") and "[" in line
               and line.count("|") == 5)
    assert row.count("[") == 3  # three settings filled
    assert (Path(paths["report"]).parent / "settings.png").is_file()


def test_transfer_block_is_checked(tmp_path):
    bad = YAML.format(manifest="m.csv").replace("  n_boot: 50\n", "  n_bot: 50\n")
    with pytest.raises(InputError, match="unknown transfer key"):
        load_experiment(_write(tmp_path / "e.yaml", bad))
    with pytest.raises(InputError, match="kind: transfer2d"):
        load_experiment(_write(tmp_path / "f.yaml", YAML.format(manifest="m.csv").replace("kind: transfer2d",
                                                                                         "kind: progression")))


def test_shipped_transfer2d_experiment_runs_the_three_settings():
    exp = load_experiment(ROOT / "experiments" / "transfer2d.yaml")
    assert {"linear", "transformer_head", "finetune"} <= set(exp.transfer)
    head = exp.transfer["transformer_head"]
    assert head["views"] >= 1 and head["head"]["depth"] == 12 and head["head"]["width"] == 768
    assert exp.transfer["finetune"]["epochs"] == 100


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path

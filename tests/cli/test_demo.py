"""``medfeat demo``, the README's main job, end to end on a small cohort (the default is 128 subjects)."""
from __future__ import annotations

import json
import math

from medfeat.cli import main
from medfeat.engine.store.feature_store import FeatureStore
from medfeat.studies.demo import DEMO_SUBJECTS, demo_experiment


def test_demo_default_grid() -> None:
    exp = demo_experiment()
    assert exp.cohorts[0]["synth"]["subjects"] == DEMO_SUBJECTS
    assert [tuple(v) for v in exp.variants] == [("none", "whole"), ("none", "crop"), ("rigid", "crop")]
    assert exp.models[0].extra["train_args"]["max_subjects"] < DEMO_SUBJECTS  # the UNet trains on a subset


def test_demo_runs_end_to_end(tmp_path, capsys) -> None:
    main(["demo", "--subjects", "10", "--size", "32", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "auc=" in text and "report" in text
    configs = json.loads((tmp_path / "results.json").read_text())["configs"]
    assert sorted(c["variant"] for c in configs) == ["none-crop", "none-whole", "rigid-crop"]
    for c in configs:
        auc = c["result"]["metrics"]["auc"]
        assert 0.0 <= auc["ci_low"] <= auc["value"] <= auc["ci_high"] <= 1.0 and c["result"]["n_subjects"] == 10
    store = FeatureStore.open(tmp_path / "features.zarr")
    assert len(store.arrays()) == 3
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "weights" / "unet3d.safetensors").is_file()
    assert not math.isnan(configs[0]["result"]["metrics"]["f1"]["value"])

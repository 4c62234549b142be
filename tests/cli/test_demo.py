"""``medfeat demo``, the README's main job: a small run end to end, and the default run, whose
printed numbers the README quotes (checked here, to the last digit)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medfeat.cli import main
from medfeat.engine.store.feature_store import FeatureStore
from medfeat.studies.demo import DEMO_SUBJECTS, DEMO_THREADS, demo_experiment

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- demo output: begin -->", "<!-- demo output: end -->"


def test_demo_default_grid() -> None:
    exp = demo_experiment()
    assert exp.cohorts[0]["synth"]["subjects"] == DEMO_SUBJECTS
    assert [tuple(v) for v in exp.variants] == [("none", "whole"), ("none", "crop"), ("rigid", "crop")]
    assert [m.store_name for m in exp.models] == ["unigradicon", "unigradicon_random", "unet3d"]
    trained, control, unet = exp.models
    assert trained.train and control.weights == "random" and unet.train
    assert control.taps == trained.taps[:1] and trained.input_size == control.input_size  # the same network
    assert unet.extra["train_args"]["max_subjects"] < DEMO_SUBJECTS  # the UNet trains on a subset
    for model in (trained, unet):
        assert model.extra["train_args"]["threads"] == exp.threads == DEMO_THREADS  # fixed: the numbers repeat


def test_demo_runs_end_to_end(tmp_path, capsys) -> None:
    main(["demo", "--subjects", "10", "--size", "32", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "auc=" in text and "report" in text and "Findings" in text
    assert "Progression probe AUC [95% CI], 10 subjects" in text
    configs = json.loads((tmp_path / "results.json").read_text())["configs"]
    assert {(c["model"], c["tap"]) for c in configs} == {
        ("unigradicon", "A.enc.2"), ("unigradicon", "B.phi.logjac"), ("unigradicon_random", "A.enc.2"),
        ("unet3d", "down.3")}
    for c in configs:
        assert sorted(x["variant"] for x in configs if (x["model"], x["tap"]) == (c["model"], c["tap"])) == [
            "none-crop", "none-whole", "rigid-crop"]
        auc = c["result"]["metrics"]["auc"]
        assert 0.0 <= auc["ci_low"] <= auc["value"] <= auc["ci_high"] <= 1.0 and c["result"]["n_subjects"] == 10
    assert len(FeatureStore.open(tmp_path / "features.zarr").arrays()) == 3 * 3  # 2 registration + 1 UNet tap
    assert len(FeatureStore.open(tmp_path / "features-unigradicon_random.zarr").arrays()) == 3
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Findings" in report and (tmp_path / "report" / "variants.png").is_file()
    for name in ("unet3d", "unigradicon"):
        assert (tmp_path / "weights" / f"{name}.safetensors").is_file()
    assert json.loads((tmp_path / "weights" / "unigradicon.json").read_text())["heldout"]["rigid_recovery"]
    assert not math.isnan(configs[0]["result"]["metrics"]["f1"]["value"])


def _quoted() -> list[str]:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise AssertionError(f"README.md lacks the {BEGIN} ... {END} block the demo test checks")
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    lines = [line[4:].rstrip() if line.startswith("    ") else line.strip() for line in block.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


@pytest.mark.slow
def test_readme_quotes_what_the_default_demo_prints(tmp_path) -> None:
    """The default demo (128 subjects, about 2 minutes on 2 cores) prints the README's numbers."""
    env = {**os.environ, "PYTHONPATH": str(README.parent)}
    run = subprocess.run([sys.executable, "-m", "medfeat", "demo", "--out", str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = [line.rstrip() for line in run.stdout.splitlines()]
    quoted = _quoted()
    assert len(quoted) >= 8
    start = printed.index(quoted[0]) if quoted[0] in printed else -1
    assert start >= 0, f"the demo did not print {quoted[0]!r}:\n{run.stdout}"
    assert printed[start:start + len(quoted)] == quoted, run.stdout

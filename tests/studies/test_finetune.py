"""``medfeat finetune`` end to end: fine-tuning beats the frozen linear probe where the
features must change (the position task), with CIs apart; outputs and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from medfeat.cli import main
from medfeat.cohorts.synth_where import synth_where_cohort
from medfeat.export.training.finetune import FinetuneConfig, build_model
from medfeat.export.training.loop import TrainSettings
from medfeat.io.readers import read_image
from medfeat.kernels.augment2d import eval_view, rule_mean_std
from medfeat.probes.evaluate import holdout_probe
from medfeat.studies.finetune import run_finetune

SIZE = 48


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return synth_where_cohort(tmp_path_factory.mktemp("where"), images=300, size=SIZE, cells=3,
                              fractions=(0.5, 0.15, 0.35))


def _cfg(epochs: int) -> FinetuneConfig:
    # img_size 48: the tiny DeiT learns one position embedding per token of the 3 x 3 grid
    return FinetuneConfig("deit_b16", tiny=True, input_size=SIZE, augment="none", build_config={"img_size": SIZE},
                          settings=TrainSettings(lr=3e-3, batch_size=16, epochs=epochs, warmup_iters=10, device="cpu"))


def test_finetuning_beats_the_frozen_linear_probe(cohort, tmp_path):
    res = run_finetune(_cfg(30), cohort, tmp_path / "ft", n_boot=300, log=lambda s: None)
    # the frozen linear probe: the same model before training, its pooled feature, the same split
    df = pd.read_csv(cohort)
    mean, std = rule_mean_std(build_model(_cfg(1), 2).backbone.spec.preprocess)
    x = torch.from_numpy(np.stack([eval_view(read_image(cohort.parent / p), SIZE, mean, std) for p in df["path"]]))
    frozen = build_model(_cfg(1), 2).backbone
    with torch.no_grad():
        feats = frozen(x)[frozen.tap_names[-1]].numpy()
    linear = holdout_probe(feats, df["label"].to_numpy(), df["subject"].astype(str).to_numpy(),
                           df["split"].to_numpy(), n_boot=300)
    ft, lin = res.metrics["auc"], linear.metrics["auc"]
    assert len(res.y) == len(linear.y) == int((df["split"] == "test").sum())  # the same test rows
    assert ft["value"] > 0.8 and ft["ci_low"] > lin["ci_high"], (ft, lin)
    doc = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert doc["seconds_per_epoch"] > 0 and len(doc["history"]) == 30 and doc["best_epoch"] >= 0
    results = json.loads((tmp_path / "ft" / "results.json").read_text())["configs"]
    assert results[0]["setting"] == "finetune" and results[0]["spec"] == "deit_b16:norm:finetune"


def test_finetune_cli(tmp_path, capsys):
    small = synth_where_cohort(tmp_path / "c", images=30, size=32, cells=3)
    out = tmp_path / "cli"
    main(["finetune", "--model", "deit_b16", "--tiny", "--input-size", "32", "--dataset", str(small),
          "--out", str(out), "--epochs", "1", "--batch-size", "32", "--n-boot", "20", "--device", "cpu",
          "--unfreeze-from", "1"])
    text = capsys.readouterr().out
    assert "epoch 1/1" in text and "auc" in text and "95% CI" in text
    assert (out / "model.safetensors").is_file() and (out / "state.pt").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--model", "unigradicon", "--tiny", "--dataset", str(small), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "2D image models" in capsys.readouterr().err

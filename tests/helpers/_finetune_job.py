"""A small fine-tune (tiny DeiT on a 24-image position task), shared by the kill-and-resume
test and the subprocess it kills."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medfeat.export.training.finetune import FinetuneConfig, ImageItems, finetune
from medfeat.export.training.loop import TrainSettings
from medfeat.probes.metrics import roc_auc


def job(manifest, out, on_epoch_end=None):
    """Fine-tune 3 epochs (study augmentation, CPU) into ``out``; returns (model, result)."""
    manifest = Path(manifest)
    df = pd.read_csv(manifest)

    def items(split: str) -> ImageItems:
        part = df[df["split"] == split]
        return ImageItems(part["item_id"].tolist(), [str(manifest.parent / p) for p in part["path"]],
                          part["label"].to_numpy())

    cfg = FinetuneConfig("deit_b16", tiny=True, input_size=32, seed=1,
                         settings=TrainSettings(lr=1e-3, batch_size=8, epochs=3, warmup_iters=5, device="cpu"))
    return finetune(cfg, items("train"), items("val"), task="binary", n_out=2, out=out,
                    score=lambda y, p: roc_auc(np.asarray(y), p[:, 1]), on_epoch_end=on_epoch_end)

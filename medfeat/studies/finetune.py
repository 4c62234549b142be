"""``medfeat finetune`` end to end: a 2D dataset's fixed split, the study's fine-tuning, and
the same metrics table with 95% CIs as the probes.

The dataset is a manifest CSV (``item_id``, ``path``, the target column(s), ``split`` with
``train``/``val``/``test``; ``subject`` optional) or ``NAME:ROOT`` for a local copy of a
public dataset (:data:`medfeat.cohorts.datasets2d.DATASETS`, the study's label and split
rules). Training runs on ``train``, the epoch is chosen on ``val`` by the task's headline
metric, and ``test`` is scored once with subject-bootstrap CIs (``score_predictions``).
``OUT`` gets the training state (resumable), ``model.safetensors``, ``finetune.json``
(config, per-epoch history and seconds) and ``results.json`` (input of ``probe report``).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfeat.errors import InputError, ManifestError
from medfeat.export.training.finetune import FinetuneConfig, ImageItems, finetune, predict_proba
from medfeat.probes.evaluate import ProbeResult, score_predictions
from medfeat.probes.metrics import headline_from_proba
from medfeat.probes.sweep import config_record, write_results

__all__ = ["dataset_frame", "run_finetune"]

Log = Callable[[str], None]


def dataset_frame(dataset: str | Path) -> tuple[pd.DataFrame, Path]:
    """The manifest of ``dataset`` (a CSV, or ``NAME:ROOT``) and the folder its paths are relative to."""
    text = str(dataset)
    name, sep, root = text.partition(":")
    from medfeat.cohorts.datasets2d import DATASETS

    if sep and name in DATASETS:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise InputError(f"{name}: no local copy at {root_path}")
        return DATASETS[name](root_path), root_path
    path = Path(text)
    if not path.is_file():
        raise ManifestError(f"{path}: dataset manifest not found (give a CSV or NAME:ROOT, NAME one of "
                            f"{', '.join(DATASETS)})")
    return pd.read_csv(path, dtype={"item_id": str, "subject": str}), path.parent


def _labels(df: pd.DataFrame, target: str, task: str | None) -> tuple[np.ndarray, str, list[Any]]:
    """Labels as class indices (or a 0/1 matrix), the task, and the class names."""
    cols = [c.strip() for c in target.split(",") if c.strip()]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ManifestError(f"target column(s) {', '.join(missing)} not in the dataset (columns: "
                            f"{', '.join(map(str, df.columns))})")
    if len(cols) > 1 or task == "multilabel":
        return (df[cols].astype(float).to_numpy() > 0).astype(np.int64), "multilabel", cols
    classes, y = np.unique(df[cols[0]].to_numpy(), return_inverse=True)
    if len(classes) < 2:
        raise InputError(f"the target {target!r} has a single class: nothing to learn")
    task = task or ("binary" if len(classes) == 2 else "multiclass")
    if task == "binary" and len(classes) != 2:
        raise InputError(f"task binary needs 2 classes, found {len(classes)}")
    return y.astype(np.int64), task, classes.tolist()


def _items(df: pd.DataFrame, base: Path, y: np.ndarray, mask: np.ndarray) -> ImageItems:
    paths = [p if Path(p).is_absolute() else str(base / p) for p in df.loc[mask, "path"].astype(str)]
    return ImageItems(df.loc[mask, "item_id"].astype(str).tolist(), paths, y[mask])


def run_finetune(cfg: FinetuneConfig, dataset: str | Path, out: str | Path, *, target: str = "label",
                 task: str | None = None, split_column: str = "split", n_boot: int = 1000,
                 log: Log = print) -> ProbeResult:
    """Fine-tune ``cfg`` on ``dataset``'s train split, select on val, score test; write ``out``."""
    out = Path(out)
    df, base = dataset_frame(dataset)
    for col in ("item_id", "path", split_column):
        if col not in df.columns:
            raise ManifestError(f"{dataset}: the dataset needs an {col!r} column")
    y, task, classes = _labels(df, target, task)
    split = df[split_column].astype(str).to_numpy()
    parts = {name: split == name for name in ("train", "val", "test")}
    empty = [name for name, m in parts.items() if not m.any()]
    if empty:
        raise InputError(f"{dataset}: no {empty[0]} rows in column {split_column!r} (fine-tuning needs train, "
                         "val and test)")
    train, val, test = (_items(df, base, y, parts[k]) for k in ("train", "val", "test"))
    n_out = y.shape[1] if task == "multilabel" else len(classes)
    log(f"fine-tuning {cfg.model} ({'all of it' if cfg.unfreeze_from is None else 'from ' + cfg.unfreeze_from})"
        f" on {len(train)} train / {len(val)} val / {len(test)} test images, {task}, {cfg.settings.epochs} epochs")

    def report(epoch: int, rec: dict[str, float]) -> None:
        log(f"epoch {epoch + 1}/{cfg.settings.epochs}: train loss {rec['train_loss']:.4f}, val "
            f"{rec['val_score']:.4f}, {rec['seconds']:.1f} s")

    t0 = time.perf_counter()
    model, result = finetune(cfg, train, val, task=task, n_out=n_out, out=out, on_epoch_end=report,
                             score=lambda yv, pv: headline_from_proba(task, yv, pv))
    multilabel = task == "multilabel"
    proba_val = predict_proba(model, val, cfg, multilabel=multilabel)
    proba_test = predict_proba(model, test, cfg, multilabel=multilabel)
    groups = df.loc[parts["test"], "subject"].astype(str).to_numpy() if "subject" in df else None
    res = score_predictions(test.labels, proba_test, groups, task=task, probe="finetune", n_boot=n_boot,
                            val=(val.labels, proba_val), item_ids=test.item_ids)
    res.classes = classes
    res.seconds = time.perf_counter() - t0
    spec = f"{cfg.model}:{model.tap}:finetune"
    record = config_record(spec, res, variant="finetune")
    record.update(setting="finetune", weights=cfg.weights or "random", best_epoch=result.best_epoch,
                  unfreeze_from=cfg.unfreeze_from)
    write_results([record], out / "results.json")
    seconds = [h["seconds"] for h in result.history]
    (out / "finetune.json").write_text(json.dumps({
        "config": cfg.to_dict(), "dataset": str(dataset), "target": target, "task": task, "classes": classes,
        "n_train": len(train), "n_val": len(val), "n_test": len(test), "tap": model.tap,
        "pooling": model.backbone.poolings[model.tap], "device": result.device, "precision": result.precision,
        "best_epoch": result.best_epoch, "best_val_score": result.best_score, "resumed_from": result.resumed_from,
        "seconds_per_epoch": float(np.median(seconds)) if seconds else None, "history": result.history,
    }, indent=1, default=float))
    return res

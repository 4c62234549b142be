"""The transfer study's three training settings per model and dataset, run from an experiment.

An experiment file's ``transfer:`` block (kind ``transfer2d``) adds, for every model of the
grid and every cohort with a fixed split, what the study compares:

* ``linear``: the linear probe on the frozen pooled features the grid extracted, at the tap
  named in ``linear.taps`` (default: the model's last listed tap), on the cohort's fixed
  split (``split_column``; the grid's own sweep keeps its cross-validation);
* ``transformer_head``: the study's DeiT head trained on the frozen token map of
  ``transformer_head.taps[model]`` (only the models named there when ``taps`` is given;
  else every model at its last listed tap), extracted unpooled into
  the cohort's store with ``views`` augmented views per item (the study's augmentation);
  ``head`` sets its size and DeiT checkpoint (looked up in ``--weights-dir``), ``train`` its
  optimiser settings (the study's by default);
* ``finetune``: the backbone fine-tuned end to end (``unfreeze_from``, ``cut_at``, epochs,
  batch size, ...), one output folder per model under ``<cohort>/finetune/``.

Every config it returns carries ``setting`` and ``table`` (the one shown in the report's
table for its cohort, model and setting). All three are scored on the same test rows.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfeat.engine.pipeline.config import ExtractConfig
from medfeat.engine.pipeline.extract import extract
from medfeat.engine.pipeline.tokens import array_tap
from medfeat.errors import InputError
from medfeat.export.training.finetune import FinetuneConfig
from medfeat.export.training.loop import TrainSettings
from medfeat.probes.features import array_meta, load_features
from medfeat.probes.sweep import config_record, evaluate_features
from medfeat.studies.finetune import run_finetune

__all__ = ["SETTING_KEYS", "check_block", "run_settings"]

Log = Callable[[str], None]
SETTING_KEYS = {"split_column", "linear", "transformer_head", "finetune", "n_boot"}
_TRAIN_KEYS = {"lr", "weight_decay", "batch_size", "epochs", "warmup_iters", "grad_clip", "patience",
               "mixed_precision", "device", "seed"}


def check_block(block: dict[str, Any], source: Path) -> dict[str, Any]:
    """The ``transfer:`` block, its keys checked."""
    unknown = set(block) - SETTING_KEYS
    if unknown:
        raise InputError(f"{source}: unknown transfer key(s) {', '.join(sorted(unknown))}; "
                         f"keys: {', '.join(sorted(SETTING_KEYS))}")
    for name in ("transformer_head", "finetune"):
        train = dict((block.get(name) or {}).get("train", {}))
        bad = set(train) - _TRAIN_KEYS
        if bad:
            raise InputError(f"{source}: transfer.{name}.train: unknown setting(s) {', '.join(sorted(bad))}")
    return block


def _tap_for(setting: dict[str, Any], model: str, taps: list[str]) -> str:
    return str((setting.get("taps") or {}).get(model, taps[-1]))


def run_settings(block: dict[str, Any], entry: Any, *, manifest: Path, store: Path, folder: Path, target: str,
                 weights: str | None, weights_dir: Path | None, extract_settings: dict[str, Any],
                 probe: dict[str, Any], log: Log) -> list[dict]:
    """The linear, transformer-head and fine-tuning configs of one model on one cohort
    (the settings the block names)."""
    out: list[dict] = []
    split_column = str(block.get("split_column", "split"))
    n_boot = int(block.get("n_boot", probe.get("n_boot", 1000)))
    if "linear" in block:
        tap = _tap_for(block.get("linear") or {}, entry.name, entry.taps)
        spec = f"{entry.name}:{tap}:none-whole"
        fs = load_features(store, spec, manifest, target)
        kw = {k: v for k, v in probe.items() if k in ("task", "ci_method", "probe_params")}
        res = evaluate_features(fs, labels=manifest, split_column=split_column, probe="linear", n_boot=n_boot, **kw)
        out.append({**config_record(spec, res), "setting": "linear", "table": True, "weights": weights or "random"})
    head = block.get("transformer_head")
    if head is not None and (not (head or {}).get("taps") or entry.name in head["taps"]):
        out.append(_transformer_head(dict(block["transformer_head"] or {}), entry, manifest, store, target, weights,
                                     weights_dir, extract_settings, split_column, n_boot, probe.get("task"), log))
    if block.get("finetune") is not None:
        out.append(_finetune(dict(block["finetune"] or {}), entry, manifest, folder, target, weights, split_column,
                             n_boot, probe.get("task"), log))
    return out


def _transformer_head(setting: dict[str, Any], entry: Any, manifest: Path, store: Path, target: str,
                      weights: str | None, weights_dir: Path | None, extract_settings: dict[str, Any],
                      split_column: str, n_boot: int, task: str | None, log: Log) -> dict:
    tap = _tap_for(setting, entry.name, entry.taps)
    views = int(setting.get("views", 0))
    augment = "study" if views else "none"
    cfg = ExtractConfig.from_settings(
        str(manifest), str(store), entry.name, (tap,), weights=weights, tiny=entry.tiny, pooling="tokens",
        views=views, augment=augment, input_size=tuple(entry.input_size) if entry.input_size else None,
        random_init=weights is None, **extract_settings)
    record = extract(cfg)
    log(f"{entry.name} {tap} tokens ({views} views): {record.items.done} extracted, {record.items.skipped} in the store")
    spec = f"{entry.name}:{array_tap(tap, 'tokens', views, augment)}:none-whole"
    head = dict(setting.get("head") or {})
    if head.get("weights"):
        head["weights"] = _find(head["weights"], weights_dir, log)
    meta = array_meta(store, spec)
    params = {**{k: v for k, v in head.items() if k in ("width", "depth", "heads", "weights")},
              **dict(setting.get("train") or {}), "prefix_tokens": meta["prefix_tokens"],
              "grid": meta["grid"] if meta["grid"] and len(meta["grid"]) == 2 else None}
    fs = load_features(store, spec, manifest, target)
    res = evaluate_features(fs, labels=manifest, split_column=split_column, probe="transformer", task=task,
                            probe_params=params, n_boot=n_boot)
    m = res.metrics[res.headline]
    log(f"{entry.name} transformer head: {res.headline} {m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]")
    return {**config_record(spec, res), "setting": "transformer_head", "table": True,
            "weights": weights or "random", "head_weights": params.get("weights") or "random"}


def _finetune(setting: dict[str, Any], entry: Any, manifest: Path, folder: Path, target: str, weights: str | None,
              split_column: str, n_boot: int, task: str | None, log: Log) -> dict:
    train = {k: v for k, v in setting.items() if k in _TRAIN_KEYS}
    train.update(dict(setting.get("train") or {}))
    size = entry.input_size[0] if entry.input_size else None
    cfg = FinetuneConfig(model=entry.name, weights=weights, tap=setting.get("cut_at"),
                         unfreeze_from=setting.get("unfreeze_from"), pooling=setting.get("pooling"), tiny=entry.tiny,
                         input_size=size, augment=str(setting.get("augment", "study")),
                         num_workers=int(setting.get("workers", 0)), seed=int(train.get("seed", 0)),
                         settings=TrainSettings(**train), build_config=dict(setting.get("build_config") or {}))
    res = run_finetune(cfg, manifest, folder / "finetune" / entry.name, target=target, task=task,
                       split_column=split_column, n_boot=n_boot, log=log)
    m = res.metrics[res.headline]
    log(f"{entry.name} fine-tuned: {res.headline} {m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]")
    from medfeat.probes.sweep import read_results

    record = read_results(folder / "finetune" / entry.name / "results.json")[0]
    return {**record, "table": True}


def _find(name: str, weights_dir: Path | None, log: Log) -> str | None:
    for base in (weights_dir, Path.cwd()):
        if base is not None and (base / name).is_file():
            return str((base / name).resolve())
    log(f"transformer head: DeiT weights {name} not found{f' in {weights_dir}' if weights_dir else ''}; "
        "the head starts from random weights")
    return None

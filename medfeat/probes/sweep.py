"""Probe every (model, tap, variant) array of a store, into one tidy table.

Results travel as one JSON document, ``{"configs": [...]}``, each config
holding its spec, model, tap, variant, pair mode, tap depth and the
:meth:`ProbeResult.to_dict` summary; the tidy table (one row per config and
metric) is derived from it and written as CSV and Parquet.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from medfeat.errors import InputError
from medfeat.probes.evaluate import ProbeResult, cross_validate_probe, holdout_probe
from medfeat.probes.features import FeatureSet, column_for_items, load_features, parse_spec, store_labels

__all__ = ["evaluate_features", "natural_key", "tap_depths", "config_record", "tidy_rows", "sweep_store",
           "write_results", "read_results"]


def natural_key(text: str) -> list:
    """Sort key that orders ``blocks.10`` after ``blocks.9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def tap_depths(keys: Sequence) -> dict[tuple[str, str], int]:
    """(model, tap) -> 0-based depth rank of the tap among the model's taps in the store.

    The order is the backbone registry's tap table (forward order) when the
    model is registered and knows all its stored taps; otherwise a natural
    sort of the names (``encoder.3``, ``blocks.6`` carry their depth).
    """
    by_model: dict[str, set[str]] = {}
    for k in keys:
        by_model.setdefault(k.model, set()).add(k.tap)
    out = {}
    for model, taps in by_model.items():
        order = _registry_order(model)
        base = {t: t.split("@")[0] for t in taps}  # TAP@tokens, TAP@norm-cls: the tap's own place
        if order is None or not set(base.values()) <= set(order):
            ranked = sorted(taps, key=natural_key)
        else:
            ranked = sorted(taps, key=lambda t: (order.index(base[t]), t))
        out.update({(model, t): i for i, t in enumerate(ranked)})
    return out


def _registry_order(model: str) -> list[str] | None:
    """Tap names of a registered backbone in forward order, or None."""
    try:
        from medfeat.export.backbones.registry import get_spec

        return [t.name for t in get_spec(model).tap_table()]
    except Exception:  # noqa: BLE001 - unregistered model or export deps missing: fall back
        return None


def config_record(spec: str, result: ProbeResult, *, pair_mode: str | None = None, depth: int | None = None,
                  variant: str | None = None, fs: FeatureSet | None = None, predictions: bool = False) -> dict:
    """One config of a results document (``fs``: the features it was fitted on, for the
    dropped-rows counts and the random-weights mark; with the out-of-fold predictions when
    ``predictions``)."""
    model, tap, v = parse_spec(spec)
    out = {"spec": spec, "model": model, "tap": tap, "variant": variant or v or "default",
           "pair_mode": pair_mode or "", "tap_depth": depth, "result": result.to_dict(predictions)}
    if fs is not None:
        out.update(random_weights=fs.random_weights, dropped=dict(fs.dropped))
    return out


def tidy_rows(configs: Sequence[dict]) -> pd.DataFrame:
    """One row per (config, metric)."""
    rows = []
    for c in configs:
        r = c["result"]
        for name, m in r["metrics"].items():
            model = f"{c['model']} (random weights)" if c.get("random_weights") else c["model"]
            rows.append({"spec": c["spec"], "model": model, "tap": c["tap"], "variant": c["variant"],
                         "pair_mode": c.get("pair_mode", ""), "tap_depth": c.get("tap_depth"),
                         "cohort": c.get("cohort", ""), "setting": c.get("setting", ""),
                         "weights": c.get("weights", ""),
                         "task": r["task"], "probe": r["probe"], "metric": name,
                         "headline": name == r["headline"], "value": m["value"], "ci_low": m["ci_low"],
                         "ci_high": m["ci_high"], "seed_std": m["seed_std"], "n_items": r["n_items"],
                         "n_subjects": r["n_subjects"], "seconds": r["seconds"]})
    df = pd.DataFrame(rows)
    for col in ("value", "ci_low", "ci_high", "seed_std", "tap_depth"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")  # nulls from JSON -> NaN
    return df


def evaluate_features(fs: FeatureSet, *, labels=None, split_column: str | None = None,
                      **cv_kwargs) -> ProbeResult:
    """Cross-validate on ``fs``; or, with ``split_column`` (a column of the ``labels``
    manifest, joined on item_id), fit on its train/val rows and test on its test rows."""
    if split_column:
        split = column_for_items(labels, fs.item_ids, split_column)
        kw = {k: v for k, v in cv_kwargs.items() if k not in ("n_splits", "seeds")}
        return holdout_probe(fs.X, fs.y, fs.groups, split, item_ids=fs.item_ids, **kw)
    return cross_validate_probe(fs.X, fs.y, fs.groups, item_ids=fs.item_ids, **cv_kwargs)


def sweep_store(store_path: str | Path, labels, target: str, *, specs: Sequence[str] | None = None,
                pair_modes: Sequence[str | None] = (None,), models: Sequence[str] | None = None,
                split_column: str | None = None, log=None, covariates: Sequence[str] = (),
                predictions: bool = False, **cv_kwargs) -> list[dict]:
    """Cross-validate a probe on each selected array (and pair mode) of a store.

    ``specs`` selects arrays (``MODEL:TAP[:VARIANT]``); by default all arrays,
    optionally only those of ``models``. ``cv_kwargs`` go to
    :func:`cross_validate_probe`; ``split_column`` switches to the manifest's fixed
    split (see :func:`evaluate_features`). ``log`` (callable) receives one line per config.
    ``labels``: a CSV path, a frame, or None for the store's items table; ``covariates``:
    label columns appended to the features; ``predictions`` keeps each config's out-of-fold
    predictions (for paired comparisons).
    """
    from medfeat.engine.store.feature_store import FeatureStore

    store = FeatureStore.open(store_path, mode="r")
    if labels is None:
        labels = store_labels(store_path)
    keys = list(store.arrays())
    depths = tap_depths(keys)
    if specs:
        chosen = [k for k in keys if any(_matches(k, s) for s in specs)]
    else:
        chosen = [k for k in keys if not models or k.model in models]
    if not chosen:
        raise InputError(f"{store_path}: no feature array matches the selection")
    configs = []
    for key in sorted(chosen, key=lambda k: (k.model, k.variant, natural_key(k.tap))):
        spec = f"{key.model}:{key.tap}:{key.variant}"
        for mode in pair_modes:
            fs: FeatureSet = load_features(store_path, spec, labels, target, mode, covariates)
            res = evaluate_features(fs, labels=labels, split_column=split_column, **cv_kwargs)
            configs.append(config_record(spec, res, pair_mode=mode, depth=depths[(key.model, key.tap)], fs=fs,
                                         predictions=predictions))
            if log is not None:
                m = res.metrics[res.headline]
                log(f"{spec} {mode or ''} {res.headline}={m['value']:.3f} "
                    f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}] ({res.seconds:.1f} s)")
    return configs


def _matches(key, spec: str) -> bool:
    model, tap, variant = parse_spec(spec)
    return key.model == model and key.tap == tap and (variant is None or key.variant == variant)


def write_results(configs: Sequence[dict], out: str | Path, *, tables: bool = False) -> list[Path]:
    """Write ``{"configs": ...}`` JSON at ``out`` (a .json file, or a folder that gets
    results.json); with ``tables`` also results.csv and results.parquet beside it."""
    out = Path(out)
    path = out if out.suffix == ".json" else out / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN (an undefined metric or CI) becomes null, so the file is strict JSON.
    path.write_text(json.dumps(_nan_to_none({"configs": list(configs)}), indent=1, default=_json_default,
                               allow_nan=False))
    written = [path]
    if tables:
        df = tidy_rows(configs)
        csv, parquet = path.with_suffix(".csv"), path.with_suffix(".parquet")
        df.to_csv(csv, index=False)
        df.to_parquet(parquet, index=False)
        written += [csv, parquet]
    return written


def _nan_to_none(v: object) -> object:
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan_to_none(x) for x in v]
    return v


def _json_default(v: object) -> object:
    if hasattr(v, "item"):
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def read_results(path: str | Path) -> list[dict]:
    """Configs of a results JSON, or of a folder holding results.json."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise InputError(f"{path}: no results file (run `medfeat probe train --out` or `probe sweep`)")
    doc = json.loads(path.read_text())
    if "configs" not in doc:
        raise InputError(f"{path}: not a medfeat probe results file (no 'configs')")
    return doc["configs"]

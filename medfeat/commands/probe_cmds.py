"""``medfeat probe train | compare | sweep | report``: linear probes on stored features."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

PAIR_MODES = ("concat", "diff", "absdiff", "concat+diff")
TASKS = ("binary", "multiclass", "ordinal", "multilabel")


def _cv_options(f: Callable) -> Callable:
    """Options shared by train, compare and sweep."""
    opts = [
        click.option("--store", "store_path", required=True, type=click.Path(exists=True, path_type=Path),
                     help="Feature store (Zarr v3 group)."),
        click.option("--labels", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Labels CSV: item_id, or subject [+ timepoint], plus the target column "
                          "[default: the store's items table, which carries the cohort manifest's columns]."),
        click.option("--covariates", default=None,
                     help="Comma-separated label columns appended to the features (age,sex,site; text one-hot)."),
        click.option("--target", required=True, help="Target column; several comma-separated for multi-label."),
        click.option("--task", type=click.Choice(TASKS), default=None,
                     help="Task [default: multilabel for several target columns, binary for 2 classes, "
                          "else multiclass]."),
        click.option("--folds", default=5, show_default=True, type=click.IntRange(min=2),
                     help="Outer cross-validation folds, grouped by subject."),
        click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1),
                     help="Repetitions of the cross-validation (seeds 0..N-1)."),
        click.option("--probe", "probe_kind", type=click.Choice(["linear", "knn"]), default="linear",
                     show_default=True),
        click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(min=0),
                     help="Bootstrap replicates (over subjects) for the 95% CIs."),
        click.option("--ci", "ci_method", type=click.Choice(["percentile", "bca"]), default="percentile",
                     show_default=True),
        click.option("--balanced", is_flag=True,
                     help="Linear probe: weight classes inversely to their frequency (helps macro recall)."),
        click.option("--split-column", default=None,
                     help="Use the labels manifest's fixed split in this column (train+val to fit, test to "
                          "evaluate; joined on item_id) instead of cross-validation."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _labels(labels, store_path):
    """The labels: the CSV given, else the store's items table."""
    if labels is not None:
        return labels
    from medfeat.probes.features import store_labels

    return store_labels(store_path)


def _covs(covariates: str | None) -> list[str]:
    return [c.strip() for c in (covariates or "").split(",") if c.strip()]


def _cv_kwargs(task, folds, seeds, probe_kind, n_boot, ci_method, balanced=False) -> dict:
    params = {"class_weight": "balanced"} if balanced and probe_kind == "linear" else None
    return dict(task=task, n_splits=folds, seeds=tuple(range(seeds)), probe=probe_kind,
                n_boot=n_boot, ci_method=ci_method, probe_params=params)


def _echo_features(fs) -> None:
    if fs.random_weights:
        click.echo("note: these features come from a backbone with RANDOM weights (extracted with --random-init)")
    if fs.describe_dropped():
        click.echo(f"note: items left out: {fs.describe_dropped()}")


def _echo_result(res, label: str = "") -> None:
    head = f"{label}: " if label else ""
    protocol = ("fixed split, test items" if res.n_splits == 0
                else f"{res.n_splits}-fold x {len(res.seeds)} seeds")
    click.echo(f"{head}{res.task} probe ({res.probe}), {len(res.y)} items, "
               f"{len(set(res.groups.tolist()))} subjects, {protocol}, {res.seconds:.1f} s")
    for name, m in res.metrics.items():
        click.echo(f"  {name:<18} {m['value']:.4f}  95% CI [{m['ci_low']:.4f}, {m['ci_high']:.4f}]  "
                   f"(seed sd {m['seed_std']:.4f})")


HEADS = ("linear", "mlp", "attention", "transformer")


def _head_options(f: Callable) -> Callable:
    """Options of trained heads (``probe train --head``); defaults are the transfer study's."""
    opts = [
        click.option("--head", type=click.Choice(HEADS), default=None,
                     help="linear: logistic regression on pooled features (--probe); mlp: an MLP on pooled "
                          "features; attention: an attentive-pooling probe on a token array (TAP@tokens); "
                          "transformer: the study's DeiT head on a token array."),
        click.option("--epochs", type=click.IntRange(1), default=100, show_default=True, help="Head training epochs."),
        click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True),
        click.option("--lr", type=float, default=1e-4, show_default=True, help="AdamW learning rate."),
        click.option("--weight-decay", type=float, default=1e-5, show_default=True),
        click.option("--warmup-iters", type=click.IntRange(0), default=1000, show_default=True,
                     help="Linear warm-up iterations."),
        click.option("--patience", type=click.IntRange(1), default=None,
                     help="Stop after this many epochs without a better validation score [default: run all "
                          "epochs, keep the best]."),
        click.option("--device", default="auto", show_default=True, help="auto (GPU if present), cpu, cuda, cuda:N."),
        click.option("--head-width", type=click.IntRange(1), default=768, show_default=True,
                     help="Transformer head width (DeiT-B: 768)."),
        click.option("--head-depth", type=click.IntRange(1), default=12, show_default=True,
                     help="Transformer head blocks (DeiT-B: 12)."),
        click.option("--head-heads", type=click.IntRange(1), default=12, show_default=True,
                     help="Attention heads of the transformer / attentive head."),
        click.option("--head-weights", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Local DeiT checkpoint (timm layout) initialising the transformer head [default: random]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _head_params(head: str, meta: dict, ndim: int, **opts) -> dict:
    """HeadProbe parameters for ``head`` on an array described by ``meta`` (features.array_meta)."""
    from medfeat.errors import InputError

    tokens = ndim > 2
    if head in ("attention", "transformer") and not tokens:
        raise InputError(f"head {head} takes a token array (extract with --pooling tokens: MODEL:TAP@tokens); "
                         "this one holds one vector per item")
    if head == "mlp" and tokens:
        raise InputError("head mlp takes pooled vectors; this array holds tokens (use --head attention|transformer)")
    params = {"epochs": opts["epochs"], "batch_size": opts["batch_size"], "lr": opts["lr"],
              "weight_decay": opts["weight_decay"], "warmup_iters": opts["warmup_iters"],
              "patience": opts["patience"], "device": opts["device"]}
    if head == "attention":
        params.update(prefix_tokens=meta["prefix_tokens"], heads=opts["head_heads"])
    if head == "transformer":
        grid = meta["grid"] if meta["grid"] and len(meta["grid"]) == 2 else None
        params.update(prefix_tokens=meta["prefix_tokens"], grid=grid, width=opts["head_width"],
                      depth=opts["head_depth"], heads=opts["head_heads"], weights=opts["head_weights"])
    return params


def _pair_option(f: Callable) -> Callable:
    return click.option("--pair-mode", type=click.Choice(PAIR_MODES), default=None,
                        help="Combine each subject's baseline and follow-up scan features; "
                             "pair items (registration models) pass through.")(f)


@click.command("train")
@_cv_options
@click.option("--features", "spec", required=True,
              help="Feature array MODEL:TAP[:VARIANT]; several taps joined by + make one multi-layer set "
                   "(MODEL:TAP+TAP[:VARIANT]).")
@_pair_option
@_head_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the results JSON here (input of `probe report`).")
def train(store_path, labels, covariates, target, task, folds, seeds, probe_kind, n_boot, ci_method, balanced,
          split_column, spec, pair_mode, head, out, **head_opts) -> None:
    """Cross-validate a probe (or a trained head) on one feature array; print metrics with 95% CIs.

    Trained heads with --split-column fit on the split's train rows and keep the epoch that
    scores best on its val rows; under cross-validation they hold out 15% of each training
    fold's subjects for that.
    """
    from medfeat.probes.features import array_meta, load_features
    from medfeat.probes.sweep import config_record, evaluate_features, write_results

    # without a labels CSV, load_features joins the store's items table it reads anyway
    fs = load_features(store_path, spec, labels, target, pair_mode, _covs(covariates))
    _echo_features(fs)
    kind = probe_kind if head in (None, "linear") else head
    if head == "linear" and fs.X.ndim > 2:
        from medfeat.errors import InputError

        raise InputError(f"{spec} holds tokens; the linear probe takes pooled features (or --head attention|transformer)")
    kw = _cv_kwargs(task, folds, seeds, kind, n_boot, ci_method, balanced)
    if kind not in ("linear", "knn"):
        kw["probe_params"] = _head_params(kind, array_meta(store_path, spec), fs.X.ndim, **head_opts)
    res = evaluate_features(fs, labels=_labels(labels, store_path) if split_column else None,
                            split_column=split_column, **kw)
    _echo_result(res, f"{spec}{' / ' + pair_mode if pair_mode else ''}")
    if out is not None:
        write_results([config_record(spec, res, pair_mode=pair_mode, fs=fs)], out)
        click.echo(f"wrote {out}")


@click.command("compare")
@_cv_options
@click.option("--features", "specs", required=True, nargs=2, metavar="SPEC_A SPEC_B",
              help="Two feature arrays MODEL:TAP[:VARIANT] to compare on the same items.")
@_pair_option
@click.option("--metric", default=None, help="Metric to compare [default: the task's headline metric].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write JSON here.")
def compare(store_path, labels, covariates, target, task, folds, seeds, probe_kind, n_boot, ci_method, balanced,
            split_column, specs, pair_mode, metric, out) -> None:
    """Compare two feature sets: paired subject bootstrap (and DeLong's test for binary AUC)."""
    import numpy as np

    from medfeat.errors import InputError
    from medfeat.probes.evaluate import compare_probes
    from medfeat.probes.features import FeatureSet, load_features
    from medfeat.probes.sweep import evaluate_features

    labels = _labels(labels, store_path)
    a, b = (load_features(store_path, s, labels, target, pair_mode, _covs(covariates)) for s in specs)
    common = sorted(set(a.item_ids) & set(b.item_ids))
    if len(common) < len(a.item_ids) or len(common) < len(b.item_ids):
        click.echo(f"comparing on the {len(common)} items both arrays have "
                   f"({len(a.item_ids)} and {len(b.item_ids)} available)")
    if not common:
        raise InputError(f"{specs[0]} and {specs[1]} share no items")
    kw = _cv_kwargs(task, folds, seeds, probe_kind, n_boot, ci_method, balanced)
    results = []
    for spec, fs in zip(specs, (a, b)):
        if fs.random_weights:
            click.echo(f"note: {spec} comes from a backbone with RANDOM weights")
        pos = {i: k for k, i in enumerate(fs.item_ids)}
        idx = np.array([pos[i] for i in common])
        sub = FeatureSet(fs.X[idx], fs.y[idx], fs.groups[idx], common, fs.dropped, fs.random_weights)
        res = evaluate_features(sub, labels=labels, split_column=split_column, **kw)
        _echo_result(res, spec)
        results.append(res)
    tests = compare_probes(results[0], results[1], metric=metric, n_boot=max(n_boot, 1000))
    for name, t in tests.items():
        click.echo(f"{name}: {t['metric']} A-B = {t['difference']:+.4f}  95% CI [{t['low']:+.4f}, "
                   f"{t['high']:+.4f}]  p = {t['p_value']:.4g}")
    if out is not None:
        doc = {"a": specs[0], "b": specs[1], "pair_mode": pair_mode, "tests": tests,
               "results": [r.to_dict() for r in results]}
        out.write_text(json.dumps(doc, indent=1, default=float))
        click.echo(f"wrote {out}")


@click.command("sweep")
@_cv_options
@click.option("--features", "specs", multiple=True, help="Arrays to probe (repeatable) [default: all].")
@click.option("--model", "models", multiple=True, help="Only arrays of these models (repeatable).")
@click.option("--pair-mode", "pair_modes", multiple=True, type=click.Choice(PAIR_MODES),
              help="Pair modes to try (repeatable) [default: none, rows as stored].")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results.json, results.csv and results.parquet.")
def sweep(store_path, labels, covariates, target, task, folds, seeds, probe_kind, n_boot, ci_method, balanced,
          split_column, specs, models, pair_modes, out) -> None:
    """Probe every selected (model, tap, variant) array; write a tidy results table."""
    from medfeat.probes.sweep import sweep_store, write_results

    configs = sweep_store(store_path, _labels(labels, store_path), target, specs=specs or None,
                          models=models or None, pair_modes=pair_modes or (None,), split_column=split_column,
                          log=click.echo, covariates=_covs(covariates),
                          **_cv_kwargs(task, folds, seeds, probe_kind, n_boot, ci_method, balanced))
    for path in write_results(configs, out, tables=True):
        click.echo(f"wrote {path}")


@click.command("report")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.md and its PNG figures.")
def report(results, out) -> None:
    """Markdown report with figures from RESULTS (a sweep folder or a results JSON)."""
    from medfeat.probes.report import write_report
    from medfeat.probes.sweep import read_results

    path = write_report(read_results(results), out)
    click.echo(f"wrote {path}")


def register(groups: dict[str, click.Group]) -> None:
    """Add the probe commands to ``groups['probe']``."""
    for cmd in (train, compare, sweep, report):
        groups["probe"].add_command(cmd)

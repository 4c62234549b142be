"""Markdown report with figures from probe results (``{"configs": [...]}``).

The results table follows the progression study's layout: one row per model and tap (and
pair mode), one column group per preprocessing variant (alignment x ROI), each with the
task's metrics and their 95% CIs. Arrays made with random weights are marked.

Figures (matplotlib, Agg backend, PNG; ``figures`` chooses among them):

* ``variants.png``: the headline metric (with its 95% CI) per model and tap, for every
  alignment x ROI variant;
* ``depth.png``: the headline metric against tap depth, one panel per model, one line per
  variant (and pair mode);
* ``roc.png``: ROC curves (seed 0 pooled out-of-fold) of the best
  configuration of each model, for binary tasks;
* ``settings.png`` with the transfer study's tables (one per dataset, rows models, columns
  training settings), when configs carry a ``setting`` (:mod:`.transfer_report`).
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medfeat.probes.sweep import natural_key, tidy_rows
from medfeat.probes.transfer_report import plot_settings, settings_tables

__all__ = ["write_report", "study_table", "plot_variants", "FIGURES"]

FIGURES = ("variants", "depth", "roc")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _headline(df: pd.DataFrame) -> pd.DataFrame:
    h = df[df["headline"]].copy()
    h["line"] = h["variant"] + np.where(h["pair_mode"].astype(str) != "", " / " + h["pair_mode"].astype(str), "")
    return h


def plot_depth(df: pd.DataFrame, path: Path) -> Path:
    """Headline metric vs tap depth, a panel per model."""
    plt = _plt()
    h = _headline(df)
    models = sorted(h["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models):
        sub = h[h["model"] == model]
        depth = {t: (0 if pd.isna(d) else int(d)) for t, d in zip(sub["tap"], sub["tap_depth"])}
        taps = sorted(depth, key=lambda t: (depth[t], natural_key(t)))  # registry order, else by name
        for line, g in sub.groupby("line"):
            g = g.assign(x=[taps.index(t) for t in g["tap"]]).sort_values("x")
            err = np.vstack([g["value"] - g["ci_low"], g["ci_high"] - g["value"]])
            ax.errorbar(g["x"], g["value"], yerr=np.nan_to_num(err), marker="o", capsize=3, label=line)
        ax.set_xticks(range(len(taps)), taps, rotation=30, ha="right", fontsize=8)
        ax.set_title(model)
        ax.set_xlabel("tap (shallow to deep)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"{h['metric'].iloc[0]} (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _best_per_model(configs: Sequence[dict]) -> list[dict]:
    best: dict[str, dict] = {}
    for c in configs:
        r = c["result"]
        v = r["metrics"][r["headline"]]["value"]
        if c["model"] not in best or v > best[c["model"]]["result"]["metrics"][r["headline"]]["value"]:
            best[c["model"]] = c
    return [best[m] for m in sorted(best)]


def plot_roc(configs: Sequence[dict], path: Path) -> Path | None:
    """ROC curves of the best binary configuration per model; None if none is binary."""
    chosen = [c for c in _best_per_model(configs) if c["result"].get("roc")]
    if not chosen:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for c in chosen:
        roc = c["result"]["roc"][0]
        auc = c["result"]["metrics"]["auc"]
        ax.plot(roc["fpr"], roc["tpr"], label=f"{c['spec']} {c.get('pair_mode') or ''} (AUC {auc['value']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


_EXTRA_KEYS = ("cohort", "setting", "probe")


def _row_keys(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(model, tap, pair mode) in the order the configs came (models, then taps by depth)."""
    return list(dict.fromkeys(zip(df["model"], df["tap"], df["pair_mode"].astype(str))))


def _extra_keys(df: pd.DataFrame) -> list[str]:
    """Cohort, setting and probe tell apart configs of one array (several cohorts; a linear
    probe and a trained head on one tap): they get a column only when they vary."""
    return [k for k in _EXTRA_KEYS if k in df and df[k].astype(str).nunique() > 1]


def study_table(df: pd.DataFrame) -> str:
    """Markdown: rows model / tap / pair mode (and cohort, setting, probe where they vary),
    columns variant x metric (the headline metric, and F1 where the task has it; the rest are
    in results.csv), cells ``value [low, high]``, rows in the order the configs came."""
    metrics = list(dict.fromkeys([*df.loc[df["headline"], "metric"], *df.loc[df["metric"] == "f1", "metric"]]))
    variants = list(dict.fromkeys(df["variant"]))
    random = set(df.loc[df["weights"].astype(str) == "random", "model"]) if "weights" in df else set()
    names = {"auc": "AUC", "f1": "F1"}
    keys = ["model", "tap", "pair_mode", *_extra_keys(df)]
    head = ["model", "tap", "pair mode", *keys[3:]] + [f"{v} {names.get(m, m)}" for v in variants for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    text = df[[*keys, "variant", "metric"]].astype(str)
    cells = {tuple(k): r for k, r in zip(text.itertuples(index=False, name=None), df.itertuples(index=False))}
    for row_key in dict.fromkeys(text[keys].itertuples(index=False, name=None)):
        model, tap, mode, *extra = row_key
        marked = model in random and "random weights" not in model
        row = [f"{model} (random weights)" if marked else model, tap, mode or "-", *[e or "-" for e in extra]]
        for v in variants:
            for m in metrics:
                r = cells.get((*row_key, v, m))
                row.append("" if r is None else f"{_fmt(r.value)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_variants(df: pd.DataFrame, path: Path) -> Path:
    """The headline metric with its 95% CI per variant (x), one series per model / tap / pair mode."""
    plt = _plt()
    h = df[df["headline"]]
    variants = list(dict.fromkeys(h["variant"]))
    series = _row_keys(h)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(variants) + 2.5), 4.0))
    width = 0.8 / max(len(series), 1)
    for k, (model, tap, mode) in enumerate(series):
        g = h[(h["model"] == model) & (h["tap"] == tap) & (h["pair_mode"].astype(str) == mode)]
        x = np.array([variants.index(v) for v in g["variant"]]) - 0.4 + width * (k + 0.5)
        err = np.nan_to_num(np.vstack([g["value"] - g["ci_low"], g["ci_high"] - g["value"]]))
        label = f"{model} {tap}" + (f" ({mode})" if mode else "")
        ax.errorbar(x, g["value"], yerr=err, marker="o", linestyle="none", capsize=3, label=label)
    if h["metric"].iloc[0] == "auc":
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(variants)), variants)
    ax.set_xlabel("alignment - ROI")
    ax.set_ylabel(f"{h['metric'].iloc[0].upper()} (95% CI)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _protocol(r: dict) -> str:
    if r["n_splits"] == 0:
        return (f"fitted on the training split, evaluated on the {r['n_items']} test items "
                f"({r['n_subjects']} subjects) of the given split;")
    return (f"{r['n_splits']}-fold cross-validation grouped by subject, seeds {r['seeds']}; {r['n_items']} items "
            f"from {r['n_subjects']} subjects. Values are means over seeds of metrics on pooled out-of-fold "
            "predictions;")


def write_report(configs: Sequence[dict], out_dir: str | Path, *, findings: Sequence[str] = (),
                 figures: Sequence[str] = FIGURES) -> Path:
    """Write ``report.md`` plus the chosen ``figures`` into ``out_dir``; returns the Markdown path.

    ``findings``: paragraphs for a "Findings" section (computed by the caller from the numbers).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = tidy_rows(configs)
    r0 = configs[0]["result"]
    parts = [
        "# Probe report", "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC from {len(configs)} configuration(s). "
        f"Task: {r0['task']}; probe: {r0['probe']}; " + _protocol(r0) + " brackets hold 95% "
        "bootstrap CIs over subjects.", "",
        "## Results", "", "Rows: models and taps; columns: preprocessing variants (alignment-ROI) with the "
        "headline metric and F1 where the task has one (every metric is in the results table beside "
        "this report's folder).", "", study_table(df), "",
    ]
    if findings:
        parts += ["## Findings", "", *[f"{line}\n" for line in findings]]
    if "variants" in figures and df["variant"].nunique() > 1:
        plot_variants(df, out / "variants.png")
        parts += ["## Metric per model and preprocessing variant", "", "![metric per variant](variants.png)", ""]
    if "depth" in figures and (df["tap_depth"].notna().any() or len(df["tap"].unique()) > 1):
        plot_depth(df, out / "depth.png")
        parts += ["## Metric against tap depth", "", "![metric against tap depth](depth.png)", ""]
    if any(c.get("setting") for c in configs):
        parts += ["## Training settings per dataset (the transfer study's layout)", "", settings_tables(configs)]
        if plot_settings(configs, out / "settings.png") is not None:
            parts += ["![metric per model and setting](settings.png)", ""]
    if "roc" in figures and plot_roc(configs, out / "roc.png") is not None:
        parts += ["## ROC curves of the best configuration per model", "", "![ROC curves](roc.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path

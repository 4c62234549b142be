"""Markdown report with figures from probe results (``{"configs": [...]}``).

Figures (matplotlib, Agg backend, PNG):

* ``depth.png``: the headline metric (with its 95% CI) against tap depth,
  one panel per model, one line per variant (and pair mode);
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

__all__ = ["write_report"]


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


def _table(df: pd.DataFrame) -> str:
    metrics = list(dict.fromkeys(df["metric"]))
    # cohort, setting and probe tell apart configs of one array (several cohorts; a linear
    # probe and a trained head on one tap); they get a column only when they vary
    extra = [k for k in ("cohort", "setting", "probe") if k in df and df[k].astype(str).nunique() > 1]
    head = "| model | tap | variant | pair mode | " + "".join(f"{k} | " for k in extra) + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (4 + len(extra) + len(metrics))]
    keys = ["model", "tap", "variant", "pair_mode"] + [k for k in ("cohort", "setting", "probe") if k in df]
    order = df[df["headline"]].sort_values("value", ascending=False)[keys].astype(str).itertuples(index=False)
    for key in order:
        sub = df[(df[keys].astype(str) == pd.Series(key._asdict())).all(axis=1)].drop_duplicates("metric")
        sub = sub.set_index("metric")
        cells = [f"{_fmt(sub.at[m, 'value'])} [{_fmt(sub.at[m, 'ci_low'])}, {_fmt(sub.at[m, 'ci_high'])}]"
                 if m in sub.index else "" for m in metrics]
        keyd = key._asdict()
        row = [keyd["model"], keyd["tap"], keyd["variant"], keyd["pair_mode"] or "-",
               *[keyd[k] or "-" for k in extra], *cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _protocol(r: dict) -> str:
    if r["n_splits"] == 0:
        return (f"fitted on the training split, evaluated on the {r['n_items']} test items "
                f"({r['n_subjects']} subjects) of the given split;")
    return (f"{r['n_splits']}-fold cross-validation grouped by subject, seeds {r['seeds']}; {r['n_items']} items "
            f"from {r['n_subjects']} subjects. Values are means over seeds of metrics on pooled out-of-fold "
            "predictions;")


def write_report(configs: Sequence[dict], out_dir: str | Path) -> Path:
    """Write ``report.md`` plus figures into ``out_dir``; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = tidy_rows(configs)
    r0 = configs[0]["result"]
    parts = [
        "# Probe report", "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC from {len(configs)} configuration(s). "
        f"Task: {r0['task']}; probe: {r0['probe']}; " + _protocol(r0) + " brackets hold 95% "
        "bootstrap CIs over subjects.", "",
        "## Results (best first)", "", _table(df), "",
    ]
    if df["tap_depth"].notna().any() or len(df["tap"].unique()) > 1:
        plot_depth(df, out / "depth.png")
        parts += ["## Metric against tap depth", "", "![metric against tap depth](depth.png)", ""]
    if any(c.get("setting") for c in configs):
        parts += ["## Training settings per dataset (the transfer study's layout)", "", settings_tables(configs)]
        if plot_settings(configs, out / "settings.png") is not None:
            parts += ["![metric per model and setting](settings.png)", ""]
    if plot_roc(configs, out / "roc.png") is not None:
        parts += ["## ROC curves of the best configuration per model", "", "![ROC curves](roc.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path

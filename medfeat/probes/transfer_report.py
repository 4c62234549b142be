"""The transfer study's tables: one per dataset, rows models, columns training settings.

Configs of a results document that carry a ``setting`` (``linear``, ``transformer_head``,
``finetune``) and a ``cohort`` fill the cells; where several configs share a cell (a linear
probe at several taps), the one marked ``"table": true`` by the experiment runner is shown,
else the best by the headline metric. Each cell is the headline metric with its 95% CI,
as the study's Table 2 lays it out, and a figure draws the same numbers as grouped bars.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["SETTINGS", "cells", "plot_settings", "settings_tables"]

SETTINGS = ("linear", "transformer_head", "finetune")
TITLES = {"linear": "linear (frozen features)", "transformer_head": "transformer head (frozen tokens)",
          "finetune": "fine-tuned"}


def cells(configs: Sequence[dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """dataset -> model -> setting -> the config shown in that cell."""
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for c in configs:
        setting = c.get("setting")
        if setting not in SETTINGS:
            continue
        cell = out.setdefault(str(c.get("cohort", "dataset")), {}).setdefault(c["model"], {})
        old = cell.get(setting)
        if old is None or _better(c, old):
            cell[setting] = c
    return out


def _value(c: dict) -> float:
    r = c["result"]
    v = r["metrics"][r["headline"]]["value"]
    return float("-inf") if v is None or not np.isfinite(v) else float(v)


def _better(new: dict, old: dict) -> bool:
    if bool(new.get("table")) != bool(old.get("table")):
        return bool(new.get("table"))
    return _value(new) > _value(old)


def _fmt(c: dict | None) -> str:
    if c is None:
        return "-"
    m = c["result"]["metrics"][c["result"]["headline"]]

    def f(v: float | None) -> str:
        return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"

    return f"{f(m['value'])} [{f(m['ci_low'])}, {f(m['ci_high'])}]"


def settings_tables(configs: Sequence[dict]) -> str:
    """Markdown: one table per dataset, rows models, columns settings (headline metric, 95% CI)."""
    parts = []
    for dataset, models in sorted(cells(configs).items()):
        any_cell = next(c for m in models.values() for c in m.values())
        metric = any_cell["result"]["headline"]
        present = [s for s in SETTINGS if any(s in m for m in models.values())]
        parts += [f"### {dataset} ({metric}, 95% CI)", "",
                  "| model | " + " | ".join(TITLES[s] for s in present) + " |",
                  "|---|" + "---|" * len(present)]
        for model in sorted(models):
            parts.append(f"| {model} | " + " | ".join(_fmt(models[model].get(s)) for s in present) + " |")
        parts.append("")
    return "\n".join(parts)


def plot_settings(configs: Sequence[dict], path: str | Path) -> Path | None:
    """Grouped bars (headline metric and 95% CI) per model and setting, a panel per dataset."""
    table = cells(configs)
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 3.8), squeeze=False)
    for ax, (dataset, models) in zip(axes[0], sorted(table.items())):
        names = sorted(models)
        width = 0.8 / len(SETTINGS)
        for k, setting in enumerate(SETTINGS):
            vals, lo, hi = [], [], []
            for model in names:
                c = models[model].get(setting)
                m = c["result"]["metrics"][c["result"]["headline"]] if c else None
                v = m["value"] if m and m["value"] is not None else np.nan
                vals.append(v)
                lo.append(v - m["ci_low"] if m and m["ci_low"] is not None else 0.0)
                hi.append(m["ci_high"] - v if m and m["ci_high"] is not None else 0.0)
            x = np.arange(len(names)) + (k - 1) * width
            ax.bar(x, vals, width, yerr=np.nan_to_num([lo, hi]), capsize=2, label=TITLES[setting])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        any_cell = next(c for m in models.values() for c in m.values())
        ax.set_title(dataset)
        ax.set_ylabel(f"{any_cell['result']['headline']} (95% CI)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""The progression study's findings, computed from probe results: paired effects and a verdict.

Effects are paired comparisons of one metric (AUC by default) between two configurations on
the same items and folds (:func:`medfeat.probes.evaluate.compare_probes`: a paired bootstrap
over subjects, A minus B, 95% CI):

* alignment: ``ALIGN-ROI`` minus ``none-ROI`` for every other alignment (e.g. rigid - none);
* ROI: ``none-crop`` minus ``none-whole``;
* training: a trained model minus its random-weight control (same backbone, tap, variant).

The study's two findings (Demir et al. 2025), and the rules that decide whether a run
reproduces them:

1. Registration features (the pair is the input) predict progression without alignment and
   are robust to misalignment: the unaligned AUC's CI lies above 0.5 and alignment adds
   nothing significant (the CI of rigid - none reaches 0 or below).
2. Segmentation features need alignment and an ROI crop: rigid - none (crop) and crop - whole
   (unaligned) are both significantly positive (CIs above 0).

The random-weight control separates the pair input's effect from what registration training
adds: when trained - random is not significant, the input explains the registration taps.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from medfeat.probes.evaluate import ProbeResult, compare_probes

ROLES = ("registration", "control", "segmentation")


@dataclass(frozen=True)
class Effect:
    """One paired difference ``a - b`` of ``metric`` for a (model, tap, pair mode)."""

    kind: str  # alignment | roi | training
    model: str
    tap: str
    pair_mode: str
    a: str  # the variant (or, for training, the model) on the left of the difference
    b: str
    metric: str
    value_a: float
    value_b: float
    difference: float
    low: float
    high: float
    p_value: float

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        return f"{self.difference:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def _key(c: dict) -> tuple[str, str, str]:
    return c["model"], c["tap"], c.get("pair_mode") or ""


def paired_effect(kind: str, a: dict, b: dict, left: str, right: str, metric: str = "auc",
                  n_boot: int = 2000) -> Effect | None:
    """The paired difference of two configs (None when their items differ or a metric is missing)."""
    ra, rb = ProbeResult.from_dict(a["result"]), ProbeResult.from_dict(b["result"])
    if metric not in ra.metrics or ra.task != rb.task or not np.array_equal(ra.groups, rb.groups):
        return None
    cmp = compare_probes(ra, rb, metric=metric, n_boot=n_boot)["paired_bootstrap"]
    model, tap, mode = _key(a)
    return Effect(kind, model, tap, mode, left, right, metric, cmp["value_a"], cmp["value_b"], cmp["difference"],
                  cmp["low"], cmp["high"], cmp["p_value"])


def study_effects(configs: Sequence[dict], roles: dict[str, list[str]], metric: str = "auc",
                  n_boot: int = 2000) -> list[Effect]:
    """Alignment and ROI effects of every (model, tap, pair mode), and trained - control effects."""
    by: dict[tuple[str, str, str], dict[str, dict]] = {}
    for c in configs:
        by.setdefault(_key(c), {})[c["variant"]] = c
    effects: list[Effect | None] = []
    for variants in by.values():
        for name, c in variants.items():
            align, _, roi = name.rpartition("-")
            if align != "none" and f"none-{roi}" in variants:
                effects.append(paired_effect("alignment", c, variants[f"none-{roi}"], name, f"none-{roi}",
                                             metric, n_boot))
        if "none-crop" in variants and "none-whole" in variants:
            effects.append(paired_effect("roi", variants["none-crop"], variants["none-whole"], "none-crop",
                                         "none-whole", metric, n_boot))
    for trained in roles.get("registration", []):
        for control in roles.get("control", []):
            for (model, tap, mode), variants in by.items():
                twin = by.get((control, tap, mode), {})
                if model != trained:
                    continue
                for name in ("none-crop", "rigid-crop"):
                    if name in variants and name in twin:
                        eff = paired_effect("training", variants[name], twin[name], trained, control, metric, n_boot)
                        effects.append(eff and Effect(**{**eff.to_dict(), "b": f"{control} ({name})"}))
    return [e for e in effects if e is not None]


def _find(effects: Sequence[Effect], kind: str, model: str, tap: str, a: str | None = None) -> Effect | None:
    return next((e for e in effects if e.kind == kind and e.model == model and e.tap == tap
                 and (a is None or e.a == a or e.a.startswith(a))), None)


def _auc(configs: Sequence[dict], model: str, tap: str, variant: str, metric: str) -> dict | None:
    c = next((c for c in configs if c["model"] == model and c["tap"] == tap and c["variant"] == variant), None)
    return None if c is None else c["result"]["metrics"].get(metric)


@dataclass(frozen=True)
class Findings:
    """The findings paragraph's lines, and the verdict on each finding: ``reproduced``,
    ``partly reproduced``, ``NOT reproduced`` or ``not tested`` (keys ``registration``,
    ``segmentation``)."""

    lines: list[str]
    verdicts: dict[str, str]


def findings_paragraph(configs: Sequence[dict], effects: Sequence[Effect], roles: dict[str, list[str]],
                       metric: str = "auc") -> Findings:
    """The effects of each role's taps, then the verdicts (see the module docstring)."""
    lines: list[str] = []
    name = metric.upper()
    taps = {m: list(dict.fromkeys(c["tap"] for c in configs if c["model"] == m)) for m in
            {m for ms in roles.values() for m in ms}}
    labels = {"registration": "Registration network", "control": "Random-weight control",
              "segmentation": "Segmentation network"}
    verdicts: dict[str, list[bool]] = {"registration": [], "segmentation": []}
    reasons: dict[str, list[str]] = {"registration": [], "segmentation": []}
    for role in ROLES:
        for model in roles.get(role, []):
            parts = []
            for tap in taps.get(model, []):
                align = _find(effects, "alignment", model, tap, "rigid-crop") or _find(effects, "alignment", model, tap)
                roi = _find(effects, "roi", model, tap)
                unaligned = _auc(configs, model, tap, "none-crop", metric)
                bits = []
                if unaligned is not None:
                    bits.append(f"{name} unaligned crop {unaligned['value']:.3f} "
                                f"[{unaligned['ci_low']:.3f}, {unaligned['ci_high']:.3f}]")
                if align is not None:
                    bits.append(f"{align.a.split('-')[0]} - none = {align.text()}")
                if roi is not None:
                    bits.append(f"crop - whole = {roi.text()}")
                for eff in (e for e in effects if e.kind == "training" and e.model == model and e.tap == tap):
                    bits.append(f"trained - random ({eff.b.split('(')[-1].rstrip(')')}) = {eff.text()}")
                parts.append(f"{tap}: " + "; ".join(bits))
                _judge(role, model, tap, unaligned, align, roi, verdicts, reasons)
            if parts:
                lines.append(f"{labels[role]} {model}: " + ". ".join(parts) + ".")
    summary = {role: _verdict(got) for role, got in verdicts.items()}
    return Findings(lines + _verdict_lines(summary, reasons, effects), summary)


def _verdict(got: list[bool]) -> str:
    if not got:
        return "not tested"
    return "reproduced" if all(got) else ("partly reproduced" if any(got) else "NOT reproduced")


def _judge(role: str, model: str, tap: str, unaligned: dict | None, align: Effect | None, roi: Effect | None,
           verdicts: dict[str, list[bool]], reasons: dict[str, list[str]]) -> None:
    if role == "registration" and unaligned is not None and align is not None:
        predictive, robust = unaligned["ci_low"] > 0.5, align.low <= 0.0
        verdicts[role].append(predictive and robust)
        if not predictive:
            reasons[role].append(f"{model} {tap} unaligned is not above chance (CI low {unaligned['ci_low']:.3f})")
        if not robust:
            reasons[role].append(f"{model} {tap} gains from alignment ({align.text()})")
    if role == "segmentation" and align is not None and roi is not None:
        ok = align.low > 0.0 and roi.low > 0.0
        verdicts[role].append(ok)
        if align.low <= 0.0:
            reasons[role].append(f"{model} {tap} alignment gain not significant ({align.text()})")
        if roi.low <= 0.0:
            reasons[role].append(f"{model} {tap} crop gain not significant ({roi.text()})")


def _verdict_lines(verdicts: dict[str, str], reasons: dict[str, list[str]], effects: Sequence[Effect]) -> list[str]:
    lines = []
    claims = {"registration": "Finding 1 (registration features predict progression without alignment and "
                              "gain nothing significant from it)",
              "segmentation": "Finding 2 (segmentation features need alignment and an ROI crop)"}
    for role, claim in claims.items():
        verdict = verdicts[role]
        if verdict == "not tested":
            lines.append(f"{claim}: not tested (no {role} model with the needed variants).")
        elif verdict == "reproduced":
            lines.append(f"{claim}: reproduced on this cohort.")
        else:
            lines.append(f"{claim}: {verdict} on this cohort: " + "; ".join(reasons[role]) + ".")
    training = [e for e in effects if e.kind == "training"]
    if training:
        better = [e for e in training if e.low > 0]
        worse = [e for e in training if e.high < 0]
        if better:
            lines.append("Trained vs random weights: training adds significantly for " + _list(better) + ".")
        if worse:
            lines.append("Trained vs random weights: the random-weight control does significantly better for "
                         + _list(worse) + ": its AUC comes from the pair input, and training here took it away.")
        if not better and not worse:
            lines.append("Trained vs random weights: no significant difference, so the pair input, not "
                         "registration training, explains the registration features' AUC here.")
    return lines


def _list(effects: Sequence[Effect]) -> str:
    return ", ".join(f"{e.tap} ({e.b.split('(')[-1].rstrip(')')}: {e.text()})" for e in effects)


def default_roles(configs: Sequence[dict], input_kinds: dict[str, str]) -> dict[str, list[str]]:
    """Roles by input kind and weights: trained pair models are registration networks, pair
    models with random weights the control, trained per-scan 3D models segmentation networks."""
    roles: dict[str, list[str]] = {r: [] for r in ROLES}
    for c in configs:
        kind, random = input_kinds.get(c["model"]), c.get("weights") in (None, "random")
        role = ("control" if random else "registration") if kind == "pair3d" else (
            "segmentation" if kind == "volume3d" and not random else None)
        if role and c["model"] not in roles[role]:
            roles[role].append(c["model"])
    return roles

"""The findings paragraph: paired effects computed from probe results, and the verdicts' rules."""
from __future__ import annotations

import numpy as np
import pytest

from medfeat.probes.evaluate import ProbeResult, compare_probes, cross_validate_probe
from medfeat.probes.sweep import config_record
from medfeat.studies.findings import default_roles, findings_paragraph, study_effects

N = 120
ROLES = {"registration": ["reg"], "control": ["reg_random"], "segmentation": ["seg"]}


def _config(model: str, tap: str, variant: str, strength: float, seed: int, weights: str = "w.safetensors") -> dict:
    """A probe result on one feature whose class separation is ``strength`` noise SDs."""
    rng = np.random.default_rng(seed)
    y = np.arange(N) % 2
    X = (strength * y + rng.normal(size=N))[:, None]
    groups = np.array([f"s{i:03d}" for i in range(N)])
    res = cross_validate_probe(X, y, groups, n_splits=4, seeds=(0,), n_boot=200, item_ids=list(groups))
    return {**config_record(f"{model}:{tap}:{variant}", res, pair_mode="diff", predictions=True),
            "weights": weights}


@pytest.fixture(scope="module")
def reproduced() -> list[dict]:
    """Registration taps as good unaligned as aligned; segmentation taps need both alignment and crop."""
    out = []
    for k, (variant, reg, seg) in enumerate((("none-whole", 1.5, 0.0), ("none-crop", 1.5, 1.2), ("rigid-crop", 1.5, 3.0))):
        out.append(_config("reg", "A.enc.2", variant, reg, 10 + k))
        out.append(_config("reg_random", "A.enc.2", variant, reg, 20 + k, weights="random"))
        out.append(_config("seg", "down.3", variant, seg, 30 + k))
    return out


def test_predictions_round_trip_for_paired_comparisons(reproduced):
    a, b = (ProbeResult.from_dict(c["result"]) for c in reproduced[:2])
    assert a.scores.shape == (1, N, 1) and list(a.groups[:2]) == ["s000", "s001"]
    cmp = compare_probes(a, b, n_boot=100)["paired_bootstrap"]
    assert cmp["value_a"] == pytest.approx(reproduced[0]["result"]["metrics"]["auc"]["value"])


def test_effects_and_verdicts_when_the_study_is_reproduced(reproduced):
    effects = study_effects(reproduced, ROLES, n_boot=500)
    kinds = {(e.kind, e.model, e.a) for e in effects}
    assert ("alignment", "seg", "rigid-crop") in kinds and ("roi", "seg", "none-crop") in kinds
    assert ("training", "reg", "reg") in kinds
    seg = next(e for e in effects if e.kind == "alignment" and e.model == "seg")
    assert seg.low > 0 and seg.difference == pytest.approx(seg.value_a - seg.value_b)
    found = findings_paragraph(reproduced, effects, ROLES)
    assert found.verdicts == {"registration": "reproduced", "segmentation": "reproduced"}
    text = "\n".join(found.lines)
    assert "Registration network reg: A.enc.2: AUC unaligned crop" in text
    assert "Finding 1 (registration features predict progression without alignment" in text
    assert "Finding 1" in text and ": reproduced on this cohort." in text
    assert "Finding 2 (segmentation features need alignment and an ROI crop): reproduced on this cohort." in text
    assert "the pair input, not registration training" in text


def test_verdict_says_why_a_finding_is_not_reproduced():
    configs = [_config("reg", "A.enc.2", "none-crop", 0.2, 1), _config("reg", "A.enc.2", "rigid-crop", 2.5, 2),
               _config("seg", "down.3", "none-whole", 1.0, 3), _config("seg", "down.3", "none-crop", 1.0, 4),
               _config("seg", "down.3", "rigid-crop", 1.0, 5)]
    configs += [_config("ctl", "A.enc.2", "none-crop", 2.5, 6, weights="random"),
                _config("ctl", "A.enc.2", "rigid-crop", 2.5, 7, weights="random")]
    roles = {"registration": ["reg"], "control": ["ctl"], "segmentation": ["seg"]}
    found = findings_paragraph(configs, study_effects(configs, roles, n_boot=500), roles)
    assert found.verdicts == {"registration": "NOT reproduced", "segmentation": "NOT reproduced"}
    text = "\n".join(found.lines)
    assert "Finding 1 (" in text and "NOT reproduced on this cohort: reg A.enc.2 unaligned is not above chance" in text
    assert "reg A.enc.2 gains from alignment (+" in text
    assert "Finding 2 (segmentation features need alignment and an ROI crop): NOT reproduced" in text
    assert "the random-weight control does significantly better for A.enc.2 (none-crop: -" in text


def test_default_roles_follow_input_kind_and_weights(reproduced):
    kinds = {"reg": "pair3d", "reg_random": "pair3d", "seg": "volume3d"}
    assert default_roles(reproduced, kinds) == ROLES

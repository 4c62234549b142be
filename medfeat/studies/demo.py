"""``medfeat demo``: the progression study in miniature, on a synthetic knee cohort.

Synthesise a longitudinal cohort; train the task UNet on the masks of some subjects and a
uniGradICON cascade (the tiny config, stages A and B, GradICON objective, no labels) on scan
pairs of some subjects; extract grid-pooled features of the whole volume, of a crop around
the cartilage, and of that crop after rigid alignment of the follow-up to its baseline, from

* the trained registration network (the pair is the input): an encoder tap and the
  log-Jacobian of its map (tensor-based morphometry, mean, percentiles and 2x2x2 cells);
* the same network with random weights, the control that separates the pair input's effect
  from what registration training adds;
* the trained UNet (one scan at a time, baseline and follow-up features subtracted);

and probe progression with subject-grouped cross-validation. The report's findings paragraph
says, from the numbers, whether the study's two findings hold on this cohort.

Every number repeats to the bit on machines of one kind: training runs with a fixed number of
torch threads (one), deterministic algorithms and fixed seeds; extraction and probes are seeded.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medfeat.studies.experiment import Experiment, ModelEntry

DEMO_SUBJECTS = 128  # the fewest at which the UNet's alignment effect is clear of zero
# Torch threads for training and extraction; the printed numbers depend on it (training's float
# sums are split by thread). One: on 2 cores the extraction's two task threads use both, and a
# two-thread OpenMP region stalls whenever another process takes a core (the whole demo took
# 171 s with one thread and 326 s with two on this 2-core machine at load 2; idle, 2 threads
# would train faster but not by enough to matter).
DEMO_THREADS = 1
# The registration network's grid (training and extraction): 48^3 keeps the demo within
# 3 minutes on 2 cores (the tiny config's 64^3 takes twice as long) and the cascade's
# held-out registration quality is alike at both (rigid error 6.1 mm vs 7.0 for the identity
# on a 48-subject cohort). Its 120 steps are needed: at 100 the recovered rigid misalignment
# did not beat the identity map's on the demo cohort (8.26 vs 7.97 mm).
REGISTRATION_SIZE = 48
REGISTRATION_TAPS = ["A.enc.2", "B.phi.logjac"]
# grid2 keeps coarse position; the log-Jacobian gets its mean and percentiles as well.
REGISTRATION_POOLING = "grid2,B.phi.logjac=stats+grid2"


def demo_experiment(subjects: int = DEMO_SUBJECTS, seed: int = 0, size: int = 64) -> Experiment:
    """The demo grid: three models x (none-whole, none-crop, rigid-crop)."""
    reg_size = min(REGISTRATION_SIZE, size)
    return Experiment(
        name="demo", kind="progression",
        cohorts=[{"name": "knee", "synth": {"subjects": subjects, "seed": seed, "shape": (size, size, size)}}],
        target="label",
        models=[
            ModelEntry("unigradicon", list(REGISTRATION_TAPS), train=True, input_size=[reg_size] * 3,
                       extra={"train_args": {"tiny": True, "size": reg_size, "threads": DEMO_THREADS,
                                             "max_subjects": 32}},
                       pooling=REGISTRATION_POOLING),
            # tiny: the trained cascade's widths (the tiny config's), random weights. Its maps
            # are the identity (every stage starts as one), so only its encoder is probed.
            ModelEntry("unigradicon", REGISTRATION_TAPS[:1], weights="random", tiny=True, input_size=[reg_size] * 3,
                       label="unigradicon_random", pooling="grid2"),
            ModelEntry("unet3d", ["down.3"], train=True,
                       extra={"train_args": {"epochs": 4, "size": size, "max_subjects": 32,
                                             "threads": DEMO_THREADS}}),
        ],
        variants=[("none", "whole"), ("none", "crop"), ("rigid", "crop")], pair_modes=["diff"],
        # the probes' defaults: 5 folds x 3 seeds, CIs from 1,000 bootstrap replicates over subjects
        probe={"n_splits": 5, "seeds": (0, 1, 2), "n_boot": 1000},
        # Threads: a LocalCluster's start-up (seconds) outweighs this small cohort's work.
        # grid2 pooling keeps coarse position, so aligned scans compare cell by cell;
        # the crop is the box around both cartilage plates (labels 3, 4) plus a margin.
        extract={"batch_size": 4, "scheduler_kind": "threads", "workers": 1, "pooling": "grid2",
                 "roi_labels": (3, 4)},
        source=Path.cwd() / "demo.yaml",
        threads=DEMO_THREADS,
        report={"figures": ["variants"]},
        findings={"registration": ["unigradicon"], "control": ["unigradicon_random"], "segmentation": ["unet3d"]},
    )


def summary_lines(configs: Sequence[dict], metric: str = "auc") -> list[str]:
    """The demo's table: one line per model and tap, ``metric [95% CI]`` per variant."""
    variants = list(dict.fromkeys(c["variant"] for c in configs))
    rows = list(dict.fromkeys((c["model"], c["tap"]) for c in configs))
    cells = {(c["model"], c["tap"], c["variant"]): c["result"]["metrics"][metric] for c in configs}
    width_model = max(len("model"), *(len(m) for m, _ in rows))
    width_tap = max(len("tap"), *(len(t) for _, t in rows))
    cell = 21
    lines = [f"{'model':<{width_model}}  {'tap':<{width_tap}}  " + "  ".join(f"{v:<{cell}}" for v in variants)]
    for model, tap in rows:
        values = [cells.get((model, tap, v)) for v in variants]
        text = ["-" if m is None else f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" for m in values]
        lines.append(f"{model:<{width_model}}  {tap:<{width_tap}}  " + "  ".join(f"{t:<{cell}}" for t in text))
    return [line.rstrip() for line in lines]

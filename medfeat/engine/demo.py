"""``medfeat demo``: the main job on the embedded default, a synthetic knee cohort.

Synthesise a longitudinal cohort, train the task UNet on its masks, extract pooled UNet
features of the whole volume and of an ROI crop around the joint, and probe progression
from the baseline/follow-up feature difference with subject-grouped cross-validation.
"""
from __future__ import annotations

from pathlib import Path

from medfeat.engine.experiment import Experiment, ModelEntry, run_experiment


def demo_experiment(subjects: int = 48, seed: int = 0, size: int = 64) -> Experiment:
    """The demo grid: task UNet x no alignment x {whole volume, ROI crop around the joint}.

    Alignment variants (rigid, affine, atlas) are in ``experiments/progression*.yaml``; they
    cost about 2 s per pair on 2 CPU cores, too slow for a three-minute demo."""
    return Experiment(
        name="demo", kind="progression",
        cohorts=[{"name": "knee", "synth": {"subjects": subjects, "seed": seed, "shape": (size, size, size)}}],
        target="label",
        models=[ModelEntry("unet3d", ["down.2", "bottom"], train=True,
                           extra={"train_args": {"epochs": 4, "size": size}})],
        align=["none"], roi=["whole", "crop"], pair_modes=["diff"],
        probe={"n_splits": 5, "seeds": (0, 1), "n_boot": 1000},
        # Threads: a LocalCluster's start-up (seconds) outweighs this small cohort's work.
        extract={"batch_size": 4, "scheduler_kind": "threads", "workers": 1},
        source=Path.cwd() / "demo.yaml",
    )

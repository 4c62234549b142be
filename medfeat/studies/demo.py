"""``medfeat demo``: the main job on the embedded default, a synthetic knee cohort.

Synthesise a longitudinal cohort, train the task UNet on its masks, extract grid-pooled UNet
features of the whole volume, of a crop around the cartilage, and of that crop after rigid
alignment of the follow-up to the baseline, and probe progression from the
baseline/follow-up feature difference with subject-grouped cross-validation.
"""
from __future__ import annotations

from pathlib import Path

from medfeat.studies.experiment import Experiment, ModelEntry

DEMO_SUBJECTS = 128  # the fewest at which the probe's CIs separate alignment from none


def demo_experiment(subjects: int = DEMO_SUBJECTS, seed: int = 0, size: int = 64) -> Experiment:
    """The demo grid: task UNet, no alignment (whole volume, cartilage crop) and rigid
    alignment of each follow-up to its baseline (cartilage crop)."""
    return Experiment(
        name="demo", kind="progression",
        cohorts=[{"name": "knee", "synth": {"subjects": subjects, "seed": seed, "shape": (size, size, size)}}],
        target="label",
        models=[ModelEntry("unet3d", ["down.3"], train=True,
                           extra={"train_args": {"epochs": 4, "size": size, "max_subjects": 32}})],
        variants=[("none", "whole"), ("none", "crop"), ("rigid", "crop")], pair_modes=["diff"],
        probe={"n_splits": 5, "seeds": (0, 1), "n_boot": 1000},
        # Threads: a LocalCluster's start-up (seconds) outweighs this small cohort's work.
        # grid2 pooling keeps coarse position, so aligned scans compare cell by cell;
        # the crop is the box around both cartilage plates (labels 3, 4) plus a margin.
        extract={"batch_size": 4, "scheduler_kind": "threads", "workers": 1, "pooling": "grid2",
                 "roi_labels": (3, 4)},
        source=Path.cwd() / "demo.yaml",
    )

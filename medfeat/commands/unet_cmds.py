"""``medfeat models train-unet``: train the task-specific 3D UNet on a cohort with masks."""
from __future__ import annotations

from pathlib import Path

import click


def register(groups: dict[str, click.Group]) -> None:
    """Add ``train-unet`` to the ``models`` group."""

    @groups["models"].command("train-unet")
    @click.option("--cohort", "manifest", required=True, type=click.Path(dir_okay=False),
                  help="Cohort manifest CSV with path and mask_path columns.")
    @click.option("--out", required=True, type=click.Path(dir_okay=False),
                  help="Weights file (.safetensors, or anything else for torch.save); a .json report goes beside it.")
    @click.option("--epochs", default=6, show_default=True, type=click.IntRange(1))
    @click.option("--size", default=64, show_default=True, type=click.IntRange(16),
                  help="Training grid, voxels per side (divisible by 16).")
    @click.option("--val-fraction", default=0.25, show_default=True, type=click.FloatRange(0, 1, min_open=True,
                                                                                          max_open=True),
                  help="Fraction of subjects held out for the Dice report.")
    @click.option("--patch", default=0, show_default=True, type=click.IntRange(0),
                  help="Train on random cubes of this side (0: whole scans); scoring uses whole scans.")
    @click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
    @click.option("--lr", default=1e-2, show_default=True, type=float)
    @click.option("--seed", default=0, show_default=True, type=int)
    @click.option("--max-subjects", default=0, show_default=True, type=click.IntRange(0),
                  help="Train and hold out within a seeded subset of this many subjects (0: all).")
    @click.option("--threads", default=None, type=click.IntRange(1),
                  help="Torch threads while training; fix it for runs that repeat to the bit.")
    def train_unet_cmd(manifest: str, out: str, epochs: int, size: int, val_fraction: float,
                       patch: int, batch_size: int, lr: float, seed: int, max_subjects: int,
                       threads: int | None) -> None:
        """Train the unet3d backbone (MONAI UNet, Dice+CE) and report held-out Dice per class."""
        from medfeat.export.training.train_unet import TrainConfig, train_unet

        cfg = TrainConfig(epochs=epochs, size=size, val_fraction=val_fraction, patch=patch, batch_size=batch_size,
                          lr=lr, seed=seed, max_subjects=max_subjects, threads=threads)
        report = train_unet(manifest, out, cfg, progress=lambda line: click.echo(line, err=True))
        click.echo(f"trained unet3d on {len(report['train_subjects'])} subjects in {report['seconds']} s; "
                   f"held-out {len(report['heldout_subjects'])} subjects ({report['heldout_scans']} scans)")
        for name, value in report["heldout_dice"].items():
            click.echo(f"  dice {name:<18} {'n/a' if value is None else f'{value:.3f}'}")
        click.echo(f"  mean foreground dice {report['heldout_mean_foreground_dice']}")
        click.echo(f"weights: {out} (sha256 {report['weights_sha256'][:12]}...); "
                   f"report: {Path(out).with_suffix('.json')}")

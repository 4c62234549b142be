"""``medfeat models train-gradicon``: train or fine-tune the uniGradICON cascade on a cohort."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

# literals, so --help needs no torch (medfeat.export.training.train_gradicon holds the same lists)
STAGE_CHOICES = ("A", "AB", "ABC", "ABCD")
SIMILARITY_CHOICES = ("lncc", "ncc", "mse")


def _quality_lines(heldout: dict[str, Any]) -> list[str]:
    lines = []
    for kind in ("intra", "inter"):
        q = heldout.get(kind)
        if q:
            lines.append(f"  {kind}-subject ({q['n']} pairs): {heldout['similarity']} loss "
                         f"{q['similarity_before']:.4f} -> {q['similarity_after']:.4f}, NCC {q['ncc_before']:.3f} -> "
                         f"{q['ncc_after']:.3f}, folded {100 * q['folded_fraction']:.3f}%, inverse consistency "
                         f"{q['inverse_consistency_vox']:.3f} voxels")
    rigid = heldout.get("rigid_recovery")
    if rigid:
        verdict = "beats" if rigid["beats_identity"] else "does NOT beat"
        lines.append(f"  rigid misalignment recovered to {rigid['error_mm']:.2f} mm vs {rigid['identity_error_mm']:.2f} mm "
                     f"for the identity map ({rigid['n']} pairs): {verdict} the identity")
    else:
        lines.append("  rigid recovery: no recorded transform in this cohort")
    return lines


def register(groups: dict[str, click.Group]) -> None:
    """Add ``train-gradicon`` to the ``models`` group."""

    @groups["models"].command("train-gradicon")
    @click.option("--cohort", "manifest", required=True, type=click.Path(dir_okay=False),
                  help="Cohort manifest CSV (subject, path[, timepoint, transform]); labels are never read.")
    @click.option("--out", required=True, type=click.Path(dir_okay=False),
                  help="Weights file (.safetensors, or anything else for torch.save); a .json report goes beside it.")
    @click.option("--init", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="Start from this checkpoint (e.g. the published Step_2_final.trch) instead of random weights.")
    @click.option("--stages", type=click.Choice(STAGE_CHOICES), default=None,
                  help="Stages trained; later ones stay the identity [default: ABCD; tiny: AB].")
    @click.option("--size", type=click.IntRange(17), default=None, help="Training grid, voxels per side [175; tiny: 64].")
    @click.option("--steps", type=click.IntRange(1), default=None, help="Optimiser steps [2000; tiny: 120].")
    @click.option("--similarity", type=click.Choice(SIMILARITY_CHOICES), default=None, help="Similarity [lncc].")
    @click.option("--lambda", "lmbda", type=click.FloatRange(0), default=None,
                  help="Weight of the gradient-inverse-consistency penalty [1.5].")
    @click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="Adam step size [5e-5; tiny: 5e-3].")
    @click.option("--batch-size", type=click.IntRange(1), default=None, help="Pairs per step [2].")
    @click.option("--inter-fraction", type=click.FloatRange(0, 1), default=None,
                  help="Share of inter-subject pairs; the rest pair a subject's own scans [0.5].")
    @click.option("--max-subjects", type=click.IntRange(0), default=None,
                  help="Train and hold out within a seeded subset of this many subjects (0: all) [0; tiny: 32].")
    @click.option("--threads", type=click.IntRange(1), default=None, help="Torch threads while training [2].")
    @click.option("--device", default=None, help="cpu (deterministic) or cuda [cpu].")
    @click.option("--seed", type=int, default=None, help="Seed of the init, the pairs and the augmentation [0].")
    @click.option("--tiny", is_flag=True,
                  help="The tiny config: the registry's tiny cascade (widths 4-16), stages AB, 64^3, 120 steps: "
                       "about a minute on 2 idle cores.")
    def train_gradicon_cmd(manifest: str, out: str, init: str | None, tiny: bool, **options: Any) -> None:
        """Train the unigradicon cascade with the GradICON objective; report held-out registration quality."""
        from medfeat.export.training.train_gradicon import GradiconConfig, train_gradicon

        given = {k: v for k, v in options.items() if v is not None}
        cfg = GradiconConfig.tiny(**given) if tiny else GradiconConfig(**given)
        report = train_gradicon(manifest, out, cfg, init=init, progress=lambda line: click.echo(line, err=True))
        click.echo(f"trained unigradicon stages {cfg.stages} on {len(report['train_subjects'])} subjects in "
                   f"{report['seconds']['train']} s; held out {len(report['heldout_subjects'])} subjects")
        for line in _quality_lines(report["heldout"]):
            click.echo(line)
        click.echo(f"weights: {out} (sha256 {report['weights_sha256'][:12]}...); "
                   f"report: {Path(out).with_suffix('.json')}")
        click.echo(f"extract with: medfeat extract --model unigradicon --weights {out} {report['extract_with']} ...")

"""``medfeat cohort synth2d`` and ``cohort dataset2d``: 2D classification manifests."""
from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("synth2d")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", default=100, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, byte-identical files.")
@click.option("--size", default=224, show_default=True, type=click.IntRange(min=32), help="Image side, pixels.")
@click.option("--task", type=click.Choice(["fundus", "where"]), default="fundus", show_default=True,
              help="fundus: DR-like grades 0..4; where: label 1 when a pattern lies in a central cell "
                   "(position, not appearance: pooled features are weak, token maps informative).")
def synth2d(out: Path, images: int, seed: int, size: int, task: str) -> None:
    """Write a synthetic 2D classification set (PNGs + manifest.csv) to OUT."""
    start = time.perf_counter()
    if task == "where":
        from medfeat.cohorts.synth_where import synth_where_cohort

        manifest = synth_where_cohort(out, images=images, seed=seed, size=size)
    else:
        from medfeat.cohorts.synth2d import synth2d_cohort

        manifest = synth2d_cohort(out, images=images, seed=seed, size=size)
    click.echo(f"wrote {images} images and {manifest} in {time.perf_counter() - start:.1f} s")


@click.command("dataset2d")
@click.argument("name", type=click.Choice(["aptos2019", "isic2019", "ddsm", "cbis_ddsm", "chexpert"]))
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Manifest CSV to write (item_id, subject, path, label(s), split).")
@click.option("--split", "split", default=None,
              help="aptos2019, isic2019: study (default; random.Random(42) or ROOT/val_ids.json) or grouped "
                   "(seeded, by patient/lesion); chexpert: study (default; train.csv as the study cuts it) "
                   "or official (valid.csv as test).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the grouped random splits.")
def dataset2d(name: str, root: Path, out: Path, split: str | None, seed: int) -> None:
    """Make a manifest for a local copy of a public 2D dataset, with the study's split and labels."""
    from medfeat.cohorts.datasets2d import DATASETS

    kwargs: dict[str, str | int] = {} if name in ("ddsm", "cbis_ddsm") else {"seed": seed}
    if split is not None:
        kwargs["split"] = split
    df = DATASETS[name](root, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    counts = df["split"].value_counts().to_dict()
    click.echo(f"wrote {len(df)} images of {name} to {out} ({df.attrs['task']}, metric {df.attrs['metric']}; "
               + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")")
    if "mean_std" in df.attrs:
        mean, std = (",".join(f"{v:g}" for v in part) for part in df.attrs["mean_std"])
        click.echo(f"the transfer study normalises {name} with its own statistics: --mean-std {mean}/{std}")


def register(groups: dict[str, click.Group]) -> None:
    """Add the 2D cohort commands to ``groups['cohort']``."""
    groups["cohort"].add_command(synth2d)
    groups["cohort"].add_command(dataset2d)

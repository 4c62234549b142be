"""``medfeat cohort synth`` (the synthetic longitudinal knee cohort) and ``medfeat cohort scan``
(a manifest from a BIDS tree or a DICOM export)."""
from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--subjects", default=48, show_default=True, type=click.IntRange(min=1),
              help="Number of subjects (each has a baseline and a follow-up scan).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Random seed; the same seed writes byte-identical files.")
@click.option("--shape", nargs=3, type=click.IntRange(min=8), default=(64, 64, 64),
              show_default=True, metavar="D H W", help="Voxel grid; axis 0 is medio-lateral.")
@click.option("--spacing", nargs=3, type=float, default=None, metavar="SD SH SW",
              help="Voxel size in mm [default: a 128 x 102.4 x 102.4 mm field of view / shape].")
@click.option("--misalign", type=click.Choice(["none", "rigid", "affine"]), default="rigid",
              show_default=True, help="Repositioning of the knee between the two scans.")
@click.option("--progressor-fraction", default=0.4, show_default=True,
              type=click.FloatRange(0.0, 1.0), help="Share of subjects labelled progressor (1).")
@click.option("--max-rotation", "max_rotation_deg", default=10.0, show_default=True,
              type=click.FloatRange(min=0.0), help="Largest misalignment rotation, degrees.")
@click.option("--max-translation", "max_translation_mm", default=8.0, show_default=True,
              type=click.FloatRange(min=0.0), help="Largest misalignment translation, mm.")
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="Threads rendering subjects [default: one per core, up to 4]; output is the same.")
def synth(out: Path, subjects: int, seed: int, shape: tuple[int, int, int],
          spacing: tuple[float, float, float] | None, misalign: str, progressor_fraction: float,
          max_rotation_deg: float, max_translation_mm: float, workers: int | None) -> None:
    """Write a synthetic longitudinal knee-MRI cohort (NIfTI scans, masks, atlas, manifest) to OUT."""
    from medfeat.cohorts.synth import synth_cohort

    start = time.perf_counter()
    manifest = synth_cohort(out, subjects=subjects, seed=seed, shape=shape, spacing=spacing or None,
                            misalign=misalign, progressor_fraction=progressor_fraction,
                            max_rotation_deg=max_rotation_deg,
                            max_translation_mm=max_translation_mm, workers=workers)
    click.echo(f"wrote {2 * subjects} scans of {subjects} subjects to {manifest} "
               f"in {time.perf_counter() - start:.1f} s")


@click.command("scan")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--layout", type=click.Choice(["bids", "dicom"]), required=True, help="How ROOT is laid out.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Manifest CSV to write.")
@click.option("--suffix", default="T1w", show_default=True, help="BIDS: image suffix (T1w, T2w, FLAIR, ...).")
@click.option("--acq", default=None, help="BIDS: keep images of this acquisition (acq-<label>) only.")
@click.option("--run", "run_label", default=None, help="BIDS: keep images of this run (run-<index>) only.")
@click.option("--series-description", default=None,
              help="DICOM: keep series whose SeriesDescription matches this regular expression (case-insensitive).")
def scan(root: Path, layout: str, out: Path, suffix: str, acq: str | None, run_label: str | None,
         series_description: str | None) -> None:
    """Write a manifest of the scans under ROOT: a BIDS tree (sub-*/ses-*/anat/*_SUFFIX.nii.gz,
    participants.tsv and sessions.tsv columns joined) or a DICOM export (one row per series;
    subject from PatientID, visit from StudyDate). Paths in it are relative to OUT's folder."""
    import os

    if layout == "bids":
        from medfeat.io.bids import scan_bids

        df = scan_bids(root, suffix=suffix, acquisition=acq, run=run_label)
        notes: list[str] = []
    else:
        from medfeat.io.dicom_scan import check_one_series_per_visit, scan_dicom

        found = scan_dicom(root, series_description=series_description)
        df = found.manifest
        check_one_series_per_visit(df, root)
        notes = [f"left out {uid}: {why}" for uid, why in found.skipped]
        if found.other_files:
            notes.append(f"{found.other_files} file(s) were not DICOM images")
    base = out.resolve().parent
    df["path"] = [os.path.relpath((root / p).resolve(), base) for p in df["path"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    visits = df["timepoint"].nunique() if "timepoint" in df else 0
    click.echo(f"wrote {out}: {len(df)} scans of {df['subject'].nunique()} subjects, {visits} visit label(s)")
    for note in notes:
        click.echo(f"  {note}")


def register(groups: dict[str, click.Group]) -> None:
    """Add the cohort commands to ``groups['cohort']``."""
    groups["cohort"].add_command(synth)
    groups["cohort"].add_command(scan)

"""``medfeat cohort ingest``: NIfTI / DICOM cohort -> Zarr v3 cohort store (OME-Zarr metadata)."""
from __future__ import annotations

import sys

import click

EXIT_ITEMS_FAILED = 3


@click.command("ingest")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Zarr cohort store to write.")
@click.option("--chunk", type=click.IntRange(8), default=64, show_default=True, help="Chunk edge in voxels.")
@click.option("--codec", type=click.Choice(["zstd", "blosc"]), default="zstd", show_default=True)
def ingest_cmd(manifest: str, out: str, chunk: int, codec: str) -> None:
    """Convert MANIFEST's scans and masks into a chunked, compressed Zarr v3 cohort.

    Writes OUT/manifest.csv pointing at the Zarr scans; `medfeat extract` reads it like any
    manifest. Unreadable scans are listed and left out (exit code 3).
    """
    from medfeat.cohorts.ingest import ingest_cohort

    new, failures = ingest_cohort(manifest, out, chunk=chunk, codec=codec)
    click.echo(f"wrote {out} and {new}")
    if failures:
        click.echo(f"{len(failures)} scan(s) left out:")
        for name, reason in failures:
            click.echo(f"  {name}: {reason}")
        sys.exit(EXIT_ITEMS_FAILED)


def register(groups: dict[str, click.Group]) -> None:
    groups["cohort"].add_command(ingest_cmd)

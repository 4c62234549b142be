"""``medfeat run EXPERIMENT`` and ``medfeat demo``."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click


def _print_outputs(paths: dict, start: float) -> None:
    click.echo("")
    click.echo(f"done in {time.perf_counter() - start:.0f} s")
    for name in ("manifest", "store", "results", "report"):
        click.echo(f"  {name:<9} {paths[name]}")
    if paths.get("failed"):
        click.echo(f"  {paths['failed']} items failed (see `medfeat store info {paths['store']}`)")


@click.command("run")
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: runs/<name>).")
@click.option("--weights-dir", type=click.Path(file_okay=False), help="Folder holding the models' checkpoints.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--plugin", "plugins", multiple=True,
              help="A .py file or module that registers backbones (repeatable; adds to the file's plugins:).")
def run(experiment: str, out: str | None, weights_dir: str | None, progress: bool, plugins: tuple[str, ...]) -> None:
    """Run a whole experiment grid: extraction (reusing the store), probes, report."""
    from medfeat.studies.experiment import load_experiment, run_experiment

    start = time.perf_counter()
    exp = load_experiment(experiment)
    paths = run_experiment(exp, out or Path("runs") / exp.name, weights_dir=weights_dir, log=click.echo,
                           progress=progress, plugins=list(plugins))
    _print_outputs(paths, start)
    if paths["failed"]:
        raise SystemExit(1)


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: a new temporary one).")
@click.option("--subjects", default=128, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=64, show_default=True, help="Cube size of the synthetic scans, voxels.")
def demo(out: str | None, subjects: int, seed: int, size: int) -> None:
    """Synthetic knee cohort -> trained UNet -> features -> progression probe, in a few minutes."""
    import json

    from medfeat.studies.demo import demo_experiment, summary_lines
    from medfeat.studies.experiment import run_experiment

    start = time.perf_counter()
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="medfeat-demo-"))
    click.echo(f"medfeat demo in {folder}")
    paths = run_experiment(demo_experiment(subjects, seed, size), folder, log=click.echo, progress=False)
    configs = json.loads(Path(paths["results"]).read_text())["configs"]
    click.echo("")
    click.echo(f"Progression probe AUC [95% CI], {subjects} subjects (baseline/follow-up pairs):")
    for line in summary_lines(configs):
        click.echo("  " + line)
    if paths.get("findings"):
        click.echo("")
        click.echo("Findings (paired bootstrap over subjects, AUC difference [95% CI]):")
        for line in paths["findings"]:
            click.echo("  " + line)
    _print_outputs(paths, start)


def register(groups: dict[str, click.Group]) -> None:
    groups["root"].add_command(run)
    groups["root"].add_command(demo)

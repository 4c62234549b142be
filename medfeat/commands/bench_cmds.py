"""``medfeat bench``: throughput of every stage against its peers and the machine's limits."""
from __future__ import annotations

import json
from pathlib import Path

import click

from medfeat.commands.model_opts import load_plugins, model_inputs, model_options, parse_model_args, parse_size


@click.command("bench")
@click.option("--grid", default="cpu", show_default=True, help="Preset (tiny, cpu, gpu) or a YAML grid file.")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results", show_default=True)
@click.option("--stages", help="Comma-separated stages of the grid to run (e.g. pipeline); default: all.")
@click.option("--quick-limits", is_flag=True, help="Measure the machine's ceilings on small buffers (fast).")
@click.option("--plan", is_flag=True, help="Estimate a cohort's extraction time and memory instead.")
@click.option("--cohort", type=click.Path(dir_okay=False), help="Manifest for --plan.")
@click.option("--model", help="Model for --plan.")
@click.option("--taps", help="Comma-separated taps for --plan (default: the model's last).")
@click.option("--sample", default=4, show_default=True, help="Subjects in the --plan sample run.")
@click.option("--tiny", is_flag=True, help="Tiny model config (tests).")
@click.option("--input-size", default=None, help="Generic models for --plan: input size, e.g. 64,64,64.")
@model_options
def bench(grid: str, out: str, stages: str | None, quick_limits: bool, plan: bool, cohort: str | None,
          model: str | None, taps: str | None, sample: int, tiny: bool, input_size: str | None,
          plugins: tuple[str, ...], input_kind: str | None, intensity: str | None, model_args: tuple[str, ...]) -> None:
    """Run a benchmark grid and write bench.json, bench.md and PNG plots to OUT.

    Stages: read, resample, fused, infer, store_write, probe_fit, and pipeline (the
    extraction pipeline against a sequential loop, with its efficiency: items/s over the
    items/s of its slowest stage alone)."""
    from medfeat.errors import InputError

    load_plugins(plugins)
    if plan:
        from medfeat.bench.run import plan_cohort
        from medfeat.export.backbones.registry import get_spec

        if not cohort or not model:
            raise InputError("--plan needs --cohort MANIFEST and --model NAME")
        size, args = parse_size(input_size), parse_model_args(model_args)
        spec = get_spec(model, model_inputs(input_kind, size, intensity), args or None)
        tap_list = taps.split(",") if taps else [spec.tap_table(**(spec.tiny_config if tiny else {}), **args)[-1].name]
        settings = {"plugins": plugins, "input_kind": input_kind, "input_size": size, "intensity": intensity,
                    "model_args": args}
        result = plan_cohort(cohort, model, tap_list, sample=sample, tiny=tiny, log=click.echo,
                             model_settings=settings)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "plan.json").write_text(json.dumps(result, indent=1))
        click.echo(f"plan written to {Path(out) / 'plan.json'}")
        return
    from medfeat.bench.run import load_grid, markdown_table, run_grid, validate_result, write_outputs

    cases = load_grid(grid)
    if stages:
        wanted = [s.strip() for s in stages.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {c.stage for c in cases})
        if unknown:
            raise InputError(f"--stages {stages}: grid {grid!r} has no stage {', '.join(unknown)}; "
                             f"it has {', '.join(dict.fromkeys(c.stage for c in cases))}")
        cases = [c for c in cases if c.stage in wanted]
    doc = run_grid(cases, quick_limits=quick_limits, log=click.echo)
    validate_result(doc)
    paths = write_outputs(doc, Path(out))
    click.echo(markdown_table(doc))
    click.echo("written: " + ", ".join(str(p) for p in paths))


def register(groups: dict[str, click.Group]) -> None:
    groups["root"].add_command(bench)

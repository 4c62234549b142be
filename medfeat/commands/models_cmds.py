"""``medfeat models list`` and ``medfeat models show NAME``: what the backbone registry offers."""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import click

from medfeat.commands.model_opts import load_plugins, model_inputs, model_options, parse_model_args, parse_size

if TYPE_CHECKING:  # the registry imports torch: only the commands that run need it
    from medfeat.export.backbones.spec import BackboneSpec, TapSpec


def raw_shape(tap: TapSpec, input_size: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one item's raw tap output at ``input_size`` (no batch axis).

    Maps: (C, *ceil(size / reduction)); tokens: (prefix + prod(ceil(size / reduction)), C);
    vectors: (C,). Strided convolutions with 'same' padding round up, hence ceil.
    """
    grid = tuple(math.ceil(s / tap.reduction) for s in input_size)
    if tap.kind == "map":
        return (tap.channels, *grid)
    if tap.kind == "tokens":
        return (tap.prefix_tokens + math.prod(grid), tap.channels)
    return (tap.channels,)


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def model_rows() -> list[dict[str, Any]]:
    """One summary row per registered backbone."""
    from medfeat.export.backbones.registry import get_spec, list_backbones

    rows = []
    for name in list_backbones():
        spec = get_spec(name)
        rows.append({"name": name, "input": spec.input_kind, "size": _fmt(spec.input_size),
                     "channels": spec.in_channels, "taps": len(spec.tap_table()),
                     "formats": ",".join(spec.weight_formats), "description": spec.description})
    return rows


def tap_rows(spec: BackboneSpec) -> list[dict[str, Any]]:
    """The tap table of ``spec`` at its real input size, with raw shapes and pooled dims."""
    from medfeat.export.backbones.pooling import pooled_dim

    return [{"tap": t.name, "kind": t.kind, "channels": t.channels, "reduction": t.reduction,
             "raw_shape": _fmt(raw_shape(t, spec.input_size)), "pooling": t.pooling,
             "dim": pooled_dim(t.channels, t.pooling)} for t in spec.tap_table()]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def register(groups: dict[str, click.Group]) -> None:
    """Add ``list`` and ``show`` to the ``models`` group."""
    models = groups["models"]

    @models.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @click.option("--plugin", "plugins", multiple=True, help="A .py file or module that registers backbones.")
    def list_cmd(as_json: bool, plugins: tuple[str, ...]) -> None:
        """List registered backbones: input kind and size, number of taps.

        Generic models need no registration: timm:NAME, hf:DIR, onnx:FILE, torchscript:FILE,
        module:PKG.MOD:FACTORY (see `medfeat models show`)."""
        load_plugins(plugins)
        rows = model_rows()
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for row in rows:  # keep the table one line per model; --json has the full text
            text = row["description"]
            row["description"] = text if len(text) <= 72 else text[:71] + "…"
        click.echo(_table(rows, ["name", "input", "size", "channels", "taps", "description"]))

    @models.command("show")
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @click.option("--input-size", default=None, help="Generic models: input size, e.g. 224,224 or 64,64,64.")
    @model_options
    def show_cmd(name: str, as_json: bool, input_size: str | None, plugins: tuple[str, ...],
                 input_kind: str | None, intensity: str | None, model_args: tuple[str, ...]) -> None:
        """Show NAME's taps with raw output shapes at its input size and pooled dims."""
        from medfeat.export.backbones.registry import get_spec

        load_plugins(plugins)
        spec = get_spec(name, model_inputs(input_kind, parse_size(input_size), intensity),
                        parse_model_args(model_args) or None)
        rows = tap_rows(spec)
        if as_json:
            click.echo(json.dumps({"name": name, "input": spec.input_kind, "input_size": list(spec.input_size),
                                   "in_channels": spec.in_channels, "preprocess": spec.preprocess.rule,
                                   "preprocess_params": spec.preprocess.params,
                                   "weight_formats": list(spec.weight_formats), "licence": spec.licence,
                                   "store_name": spec.store_key, "taps": rows}, indent=2, default=str))
            return
        click.echo(f"{name}: {spec.description}")
        if spec.store_key != name:
            click.echo(f"store name: {spec.store_key} (arrays are {spec.store_key}:TAP:VARIANT)")
        click.echo(f"input: {spec.input_kind} {_fmt(spec.input_size)}, {spec.in_channels} channel(s); "
                   f"preprocess: {spec.preprocess.rule} {spec.preprocess.params or ''}".rstrip())
        click.echo(f"weight formats: {', '.join(spec.weight_formats) or '-'}; licence: {spec.licence or '-'}")
        click.echo("raw shapes are per item, without the batch axis")
        click.echo(_table(rows, ["tap", "kind", "channels", "reduction", "raw_shape", "pooling", "dim"]))

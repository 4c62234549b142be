"""``medfeat store info | verify | repair | export``."""
from __future__ import annotations

import json
import sys

import click


@click.command("info")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--failures", "show_failures", is_flag=True, help="List the failed items.")
def info_cmd(store: str, as_json: bool, show_failures: bool) -> None:
    """Summarise a feature store: items, arrays, failures, runs."""
    from medfeat.engine.store.feature_store import FeatureStore

    fs = FeatureStore.open(store)
    info = fs.info()
    if as_json:
        click.echo(json.dumps({**info, "failure_list": fs.failures() if show_failures else None}, indent=2))
        return
    click.echo(f"{info['path']}: {info['items']} items, chunk {info['chunk_items']}, "
               f"{len(info['arrays'])} arrays, {info['failed_items']} failed items, {info['runs']} runs "
               f"(last {info['last_run']})")
    for a in info["arrays"]:
        shape = "x".join(str(v) for v in a["item_shape"])
        weights = "RANDOM WEIGHTS" if a["random_weights"] else f"weights {str(a['weights_sha256'])[:12]}"
        click.echo(f"  {a['array']:<48} item {shape:>12} {a['dtype']:<8}  done {a['done']:>6}  "
                   f"{_size(a['bytes']):>9} on disk  pooling {a['pooling']}  {weights}")
    if show_failures:
        for f in fs.failures():
            click.echo(f"  failed {f['array']} {f['item_id']}: {f['reason']}")


def _size(nbytes: int | None) -> str:
    """Bytes in binary units, e.g. ``1.5 MiB``."""
    if nbytes is None:
        return "?"
    size, unit = float(nbytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


@click.command("verify")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--no-sources", is_flag=True, help="Do not compare the source files with their recorded signatures.")
def verify_cmd(store: str, no_sources: bool) -> None:
    """Read every chunk (checksums), check done items have finite features, provenance, the
    weights file, and the source files against their signatures. Exit 1 on any problem."""
    from medfeat.engine.store.feature_store import FeatureStore
    from medfeat.engine.store.verify import verify_store

    report = verify_store(FeatureStore.open(store), check_sources=not no_sources)
    for note in report.notes:
        click.echo(f"note: {note}")
    for p in report.problems:
        click.echo(p)
    if report.problems:
        click.echo(f"{store}: {len(report.problems)} problem(s)", err=True)
        sys.exit(1)
    click.echo(f"{store}: ok")


@click.command("repair")
@click.argument("store", type=click.Path(file_okay=False))
def repair_cmd(store: str) -> None:
    """Remove what interrupted creations left, and un-mark items whose chunks are damaged
    (the next extract run redoes them)."""
    from medfeat.engine.store.feature_store import FeatureStore
    from medfeat.engine.store.lock import StoreLock
    from medfeat.engine.store.verify import repair_store

    with StoreLock(store):
        actions = repair_store(FeatureStore.open(store, mode="a"))
    for a in actions:
        click.echo(a)
    click.echo(f"{store}: {'repaired' if actions else 'nothing to repair'}")


@click.command("export")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["parquet", "hdf5"]), required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--array", "arrays", multiple=True, help="MODEL:TAP[:VARIANT] (repeatable; default all).")
def export_cmd(store: str, fmt: str, out: str, arrays: tuple[str, ...]) -> None:
    """Export arrays to Parquet, or to HDF5 bags (features/coords) for MIL tools."""
    from medfeat.engine.store.export import export_store
    from medfeat.engine.store.feature_store import ArrayKey, FeatureStore

    files = export_store(FeatureStore.open(store), out, fmt, [ArrayKey.parse(a) for a in arrays] or None)
    click.echo(f"wrote {len(files)} file(s) under {out}")


def register(groups: dict[str, click.Group]) -> None:
    for cmd in (info_cmd, verify_cmd, repair_cmd, export_cmd):
        groups["store"].add_command(cmd)

"""``medfeat export`` (ONNX / TensorRT artefacts with parity reports) and ``medfeat doctor``."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from medfeat.commands.model_opts import load_plugins, model_inputs, model_options, parse_model_args
from medfeat.errors import InputError

if TYPE_CHECKING:
    from medfeat.export.backbones.registry import Backbone


@dataclass(frozen=True)
class _ExportOptions:
    input_size: tuple[int, ...] | None
    opset: int
    precision: str
    cache_dir: str | None
    profile: tuple[int, ...] | None  # TensorRT min, opt, max batch


@dataclass(frozen=True)
class _Exported:
    artefact: str
    cache_key: str
    cache_hit: bool


def _split(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise InputError(f"{what} {text!r} is not a comma-separated list of integers") from None


def _copy_entry(src: Path, out: Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Copy ``names`` (default: every file, so ONNX external-data files of >2 GB models come
    along) from a cache entry to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names if names is not None else sorted(p.name for p in src.iterdir()):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            written.append(out / name)
    return written


def _export_onnx(backbone: Backbone, out: Path, opts: _ExportOptions) -> _Exported:
    from medfeat.export.runtimes.artefacts import ONNX_FILE, PARITY_FILE, onnx_artefact
    from medfeat.export.runtimes.parity import ParityError

    try:
        entry = onnx_artefact(backbone, input_size=opts.input_size, opset=opts.opset,
                              precision=opts.precision, cache_dir=opts.cache_dir)
    except ParityError as exc:
        if exc.report is not None:
            out.mkdir(parents=True, exist_ok=True)
            exc.report.write(out / PARITY_FILE)
        raise
    _copy_entry(entry.path, out)
    return _Exported(str(out / ONNX_FILE), entry.key, entry.hit)


def _export_tensorrt(backbone: Backbone, out: Path, opts: _ExportOptions) -> _Exported:
    from medfeat.export.runtimes.artefacts import PARITY_FILE, onnx_artefact
    from medfeat.export.runtimes.parity import check_parity
    from medfeat.export.runtimes.tensorrt import (
        DEFAULT_PROFILE,
        ENGINE_FILE,
        TensorRTRunner,
        engine_artefact,
        gpu_identity,
        require_tensorrt,
    )

    require_tensorrt()  # before the export: say what is missing first
    gpu_identity()
    profile = opts.profile or DEFAULT_PROFILE
    onnx_entry = onnx_artefact(backbone, input_size=opts.input_size, opset=opts.opset, precision="fp32",
                               cache_dir=opts.cache_dir)
    entry = engine_artefact(onnx_entry, precision=opts.precision, profile=profile, cache_dir=opts.cache_dir)
    meta = entry.meta()
    runner = TensorRTRunner(entry.path / ENGINE_FILE, meta["outputs"], input_name=meta["input"]["name"],
                            profile=profile)
    report = check_parity(backbone, runner, runtime="tensorrt", precision=opts.precision,
                          input_size=opts.input_size, device="cuda",
                          batches=[b for b in (1, 3) if profile[0] <= b <= profile[2]] or [profile[0]])
    _copy_entry(onnx_entry.path, out)  # the ONNX file the engine was built from
    _copy_entry(entry.path, out)  # engine, and its meta / key over the ONNX entry's
    (out / PARITY_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    report.raise_if_failed()
    return _Exported(str(out / ENGINE_FILE), entry.key, entry.hit)


def _print_parity(path: Path) -> None:
    data = json.loads(path.read_text())
    click.echo(f"parity vs eager fp32 ({data['runtime']}, {data['precision']}, rel tol {data['tolerance']:g}):")
    for tap, p in data["taps"].items():
        click.echo(f"  {tap:<24} max_abs {p['max_abs']:.3e}  rel {p['rel']:.3e}  cosine {p['cosine']:.7f}"
                   f"  {'ok' if p['passed'] else 'FAIL'}")


def _print_audit(rows: list[dict[str, Any]]) -> None:
    click.echo("precision audit (drift from eager fp32):")
    for row in rows:
        label = f"{row['runtime']} {row['precision']}"
        if row["status"] != "ok":
            click.echo(f"  {label:<18} unavailable: {row['reason']}")
            continue
        for tap, p in row["taps"].items():
            click.echo(f"  {label:<18} {tap:<24} rel {p['rel']:.3e}  cosine {p['cosine']:.6f}")


@click.command("export")
@click.argument("model")
@click.option("--taps", "taps", multiple=True, required=True, help="Tap names or indices (comma-separated or repeated).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--input-size", default=None, help="Spatial size, e.g. 224 or 96,96,96 (default: the model's).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output directory.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None, help="Local checkpoint file.")
@click.option("--pooling", default=None, help="Pooling for all taps (default: each tap's own).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 20: 5-D GridSample).")
@click.option("--batch-profile", default=None, help="TensorRT min,opt,max batch (default 1,8,32).")
@click.option("--tiny", is_flag=True, help="Use the model's tiny test config.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random init (no --weights).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Artefact cache (default $MEDFEAT_CACHE or ~/.cache/medfeat/artefacts).")
@click.option("--audit", is_flag=True, help="Also report per-tap drift of fp16 / bf16 / TensorRT from fp32.")
@click.option("--device", default=None, help="Device for the audit (default cuda if present, else cpu).")
@model_options
def export_cmd(model: str, taps: tuple[str, ...], fmt: str, precision: str, input_size: str | None, out: Path,
               weights: str | None, pooling: str | None, opset: int | None, batch_profile: str | None, tiny: bool,
               seed: int, cache_dir: str | None, audit: bool, device: str | None, plugins: tuple[str, ...],
               input_kind: str | None, intensity: str | None, model_args: tuple[str, ...]) -> None:
    """Export MODEL truncated at --taps to ONNX or a TensorRT engine, with a parity report.

    Fails (exit 2) when the artefact's features are outside the precision's tolerance
    against eager PyTorch; parity.json is written to --out either way.
    """
    import torch

    from medfeat.export.backbones.generic import is_generic
    from medfeat.export.backbones.registry import create_backbone
    from medfeat.export.runtimes.onnx_export import DEFAULT_OPSET

    load_plugins(plugins)
    size = _ints(input_size, "--input-size")
    # a generic model's --input-size is its size; a registered model's, the export size
    inputs = model_inputs(input_kind, size if is_generic(model) else None, intensity)
    backbone = create_backbone(model, _split(taps), weights, pooling=pooling, seed=seed, tiny=tiny,
                               config=parse_model_args(model_args) or None, inputs=inputs)
    profile = _ints(batch_profile, "--batch-profile")
    if profile is not None and len(profile) != 3:
        raise InputError(f"--batch-profile {batch_profile!r} needs three values: min,opt,max")
    opts = _ExportOptions(input_size=size, opset=opset or DEFAULT_OPSET, precision=precision,
                          cache_dir=cache_dir, profile=profile)
    result = (_export_onnx if fmt == "onnx" else _export_tensorrt)(backbone, out, opts)
    click.echo(f"wrote {result.artefact} (cache {'hit' if result.cache_hit else 'miss'}, "
               f"key {result.cache_key[:16]})")
    _print_parity(out / "parity.json")
    if audit:
        from medfeat.export.runtimes.audit import precision_audit

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        rows = precision_audit(backbone, device=dev, input_size=opts.input_size, cache_dir=cache_dir)
        (out / "audit.json").write_text(json.dumps(rows, indent=2) + "\n")
        _print_audit(rows)


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_cmd(as_json: bool) -> None:
    """What runtimes, providers, devices and optional packages this machine has, and how to get the rest."""
    from medfeat import doctor

    rows = doctor.run_checks() + doctor.auto_runtime_rows()
    click.echo(json.dumps(doctor.as_json(rows), indent=2) if as_json else doctor.report(rows))


def register(groups: dict[str, click.Group]) -> None:
    """Add ``export`` and ``doctor`` to the root group."""
    groups["root"].add_command(export_cmd)
    groups["root"].add_command(doctor_cmd)

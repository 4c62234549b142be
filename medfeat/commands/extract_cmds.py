"""``medfeat extract``: a manifest through a truncated backbone into a feature store.

Exit codes: 0 all items done, 3 some items failed (listed, and kept in the store's
failures table), 2 a user error (one line, no traceback).
"""
from __future__ import annotations

import sys

import click

# config holds only dataclasses and choice lists (no torch, no pandas): light enough for --help
from medfeat.commands.model_opts import model_options, parse_model_args, parse_size
from medfeat.engine.pipeline.config import (
    ALIGNMENTS,
    GRAY_MODES,
    MALLOC_MODES,
    RESIZE_MODES,
    ROIS,
    SCHEDULER_KINDS,
    RunRecord,
)
from medfeat.errors import InputError, UnknownNameError

EXIT_ITEMS_FAILED = 3


def _labels(text: str | None) -> tuple[int, ...] | None:
    """``--roi-labels 3,4`` -> (3, 4); None when not given."""
    if not text:
        return None
    try:
        labels = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        labels = ()
    if not labels or min(labels) < 1:
        raise InputError(f"--roi-labels {text!r}: expected positive integer labels, e.g. 3,4")
    return labels


@click.command("extract")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False), help="Cohort manifest CSV.")
@click.option("--store", required=True, type=click.Path(file_okay=False), help="Feature store (Zarr v3 directory).")
@click.option("--model", required=True,
              help="Registered backbone (medfeat models list), or a generic one: timm:NAME, hf:DIR, "
                   "onnx:FILE, torchscript:FILE, module:PKG.MOD:FACTORY.")
@click.option("--taps", required=True, help="Comma-separated tap names or indices.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local checkpoint (required unless --random-init).")
@click.option("--random-init", is_flag=True,
              help="Extract with seeded random weights (--seed); arrays are marked as random-weight features.")
@click.option("--align", type=click.Choice(ALIGNMENTS), default=None,
              help="Alignment: none (default), rigid/affine (to the baseline), oracle (recorded transform), atlas.")
@click.option("--variant", "variant_alias", type=click.Choice(ALIGNMENTS), default=None, hidden=True,
              help="Deprecated alias of --align.")
@click.option("--roi", type=click.Choice(ROIS), default="whole", show_default=True, help="Whole field of view or a crop around the mask.")
@click.option("--roi-labels", default=None,
              help="Comma-separated mask labels whose box is the crop ROI, e.g. 3,4 (default: every non-zero label).")
@click.option("--runtime", default="auto", show_default=True,
              help="auto (the fastest measured here for this model, export cost counted), eager, compiled, "
                   "onnxruntime, ort-tensorrt or tensorrt.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", default="fp32", show_default=True)
@click.option("--pooling", default=None,
              help="Pooling for every tap (default: each tap's own), or TAP=POOLING entries, comma-separated "
                   "(e.g. blocks.10=norm-cls,norm=cls+mean). 'tokens' keeps every token unpooled "
                   "(array TAP@tokens, (items, tokens, dim) in --token-dtype); 'norm-' first applies the final norm.")
@click.option("--views", type=click.IntRange(0), default=0, show_default=True,
              help="Token arrays: also store this many augmented views per item (view 0 stays the eval view).")
@click.option("--augment", type=click.Choice(["none", "study"]), default="none", show_default=True,
              help="Augmentation of the --views: the transfer study's train transform, seeded per item and view.")
@click.option("--token-dtype", type=click.Choice(["float16", "bfloat16"]), default="float16", show_default=True,
              help="Value type of token arrays.")
@click.option("--gray", type=click.Choice(GRAY_MODES), default=None,
              help="2D models: grey images repeated to every channel, or through the first channel's "
                   "weights only (the transfer study's choice). Default: the model's.")
@click.option("--resize", type=click.Choice(RESIZE_MODES), default="shorter", show_default=True,
              help="2D models: shorter side to 256/224 of the input size, or both sides (the transfer study's "
                   "Resize((256, 256))), then the centre crop.")
@click.option("--mean-std", default=None,
              help="2D models: a dataset's own per-channel MEAN/STD on [0, 1] pixels instead of the model's "
                   "(e.g. 0.503/0.292 for CheXpert, 0.415,0.221,0.073/0.275,0.150,0.081 for APTOS2019); "
                   "recorded in the provenance.")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--chunk-items", type=click.IntRange(1), default=None, help="Store chunk along items (new stores; default 64).")
@click.option("--workers", type=click.IntRange(1), default=None, help="Dask workers (local cluster) or threads x this.")
@click.option("--threads-per-worker", type=click.IntRange(1), default=2, show_default=True)
@click.option("--memory-limit", default=None, help="Per-worker memory limit, e.g. 2GB.")
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler, tcp://HOST:PORT.")
@click.option("--malloc", type=click.Choice(MALLOC_MODES), default="retain", show_default=True,
              help="retain: workers keep freed memory for the next batch (no page faults on large tensors; "
                   "memory stays at its peak); system: the C allocator's defaults. Existing clusters are left alone.")
@click.option("--scheduler-kind", type=click.Choice(SCHEDULER_KINDS), default="auto", show_default=True,
              help="auto: threads in this process on one machine, a Dask LocalCluster with --workers N, the "
                   "cluster at --scheduler ADDR; or local, threads, sync explicitly.")
@click.option("--retry-failed", is_flag=True, help="Take items recorded as failed again.")
@click.option("--refresh-changed", is_flag=True,
              help="Extract again the items whose source files changed since extraction (else such a rerun is refused).")
@click.option("--overwrite", default=None, metavar="all|ID,ID",
              help="Extract these items again (comma-separated item ids, or all), although done.")
@click.option("--tiny", is_flag=True, help="The model's tiny config (tests, demos).")
@click.option("--input-size", default=None, help="Override the model input size, e.g. 64,64,64.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--atlas", type=click.Path(exists=True), default=None, help="Atlas scan (default: atlas.nii.gz beside the manifest).")
@click.option("--atlas-mask", type=click.Path(exists=True), default=None, help="Atlas mask for --roi crop.")
@click.option("--quiet", is_flag=True, help="No progress line.")
@click.option("--baseline-visit", default=None,
              help="Visit label of the baseline (pairs, alignment); default: the visit named baseline.")
@click.option("--followup-visit", default=None, help="Visit label of the follow-up of the pair; default: followup.")
@click.option("--pairs", type=click.Choice(["consecutive", "all-to-baseline"]), default=None,
              help="Pair models: every consecutive pair of a subject's visits, or every visit with the baseline "
                   "(visits ordered by visit_order, else acquisition_date, else the label).")
@model_options
def extract_cmd(manifest: str, store: str, model: str, taps: str, weights: str | None, random_init: bool,
                align: str | None, variant_alias: str | None, roi: str,
                roi_labels: str | None, runtime: str, device: str, precision: str, pooling: str | None,
                views: int, augment: str, token_dtype: str, gray: str | None, resize: str, mean_std: str | None,
                batch_size: int,
                chunk_items: int | None, workers: int | None, threads_per_worker: int,
                memory_limit: str | None, scheduler: str | None, malloc: str, scheduler_kind: str,
                retry_failed: bool, refresh_changed: bool, overwrite: str | None, tiny: bool, input_size: str | None,
                seed: int, atlas: str | None, atlas_mask: str | None,
                quiet: bool, baseline_visit: str | None, followup_visit: str | None, pairs: str | None,
                plugins: tuple[str, ...], input_kind: str | None, intensity: str | None,
                model_args: tuple[str, ...]) -> None:
    """Extract pooled features of MODEL at TAPS for every item of a manifest into a store."""
    from medfeat.engine.pipeline.config import ExtractConfig
    from medfeat.engine.pipeline.extract import extract

    if variant_alias is not None:
        click.echo("--variant is deprecated and will be removed: use --align", err=True)
        if align is not None and align != variant_alias:
            raise InputError(f"--align {align} and --variant {variant_alias} disagree; give --align alone")
    tap_list = tuple(t.strip() for t in taps.split(",") if t.strip())
    if not tap_list:
        raise UnknownNameError("--taps: give at least one tap name")
    cfg = ExtractConfig.from_settings(
        manifest, store, model, tap_list, weights=weights, align=align or variant_alias or "none", roi=roi,
        roi_labels=_labels(roi_labels), runtime=runtime, device=device, precision=precision, pooling=pooling,
        gray=gray, resize=resize, mean_std=mean_std, views=views, augment=augment, token_dtype=token_dtype,
        seed=seed, tiny=tiny, input_size=parse_size(input_size, lengths=(2, 3)), batch_size=batch_size, chunk_items=chunk_items,
        scheduler_kind=scheduler_kind, scheduler=scheduler, workers=workers,
        threads_per_worker=threads_per_worker, memory_limit=memory_limit, malloc=malloc,
        retry_failed=retry_failed, random_init=random_init, refresh_changed=refresh_changed,
        overwrite=tuple(v.strip() for v in (overwrite or "").split(",") if v.strip()), atlas=atlas,
        atlas_mask=atlas_mask, progress=not quiet,
        baseline_visit=baseline_visit, followup_visit=followup_visit, pairs=pairs,
        plugins=plugins, input_kind=input_kind, intensity=intensity, model_args=parse_model_args(model_args))
    record = extract(cfg)
    _summary(record)
    if record.items.remain_failed:
        sys.exit(EXIT_ITEMS_FAILED)


def _summary(record: RunRecord) -> None:
    from medfeat.engine.pipeline.progress import StageTimes

    n = record.items
    for note in record.notes:
        click.echo(f"note: {note}")
    if record.refreshed:
        click.echo(f"extracted again: {len(record.refreshed)} item(s) ({', '.join(record.refreshed[:5])}"
                   f"{', ...' if len(record.refreshed) > 5 else ''})")
    click.echo(f"store: {record.store}  arrays: {', '.join(record.arrays)}")
    click.echo(f"items: {n.total} total, {n.done} done now, {n.skipped} skipped (done or failed "
               f"before), {n.failed} failed  |  {record.scheduler}")
    times = StageTimes(dict(record.timings))
    click.echo(times.table(record.timings["pipeline_wall"], max(n.done, 1)))
    if record.items_per_s:
        click.echo(f"throughput: {record.items_per_s:.2f} items/s")
    if record.failures:
        click.echo(f"{len(record.failures)} item(s) failed (kept in the store; --retry-failed takes them again):")
        for f in record.failures[:50]:
            click.echo(f"  {f['item_id']}: {f['reason']}")
    earlier = n.remain_failed - n.failed
    if earlier > 0:
        click.echo(f"{earlier} item(s) failed in an earlier run and remain failed (--retry-failed takes them "
                   "again; `medfeat store info --failures` lists them)")


def register(groups: dict[str, click.Group]) -> None:
    groups["root"].add_command(extract_cmd)

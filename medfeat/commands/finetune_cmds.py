"""``medfeat finetune``: fine-tune a 2D backbone with the transfer study's settings."""
from __future__ import annotations

from pathlib import Path

import click


def _block(text: str | None) -> str | None:
    """``6`` -> ``blocks.6``; a tap name stays as it is."""
    if text is None:
        return None
    return f"blocks.{int(text)}" if text.strip().lstrip("-").isdigit() else text.strip()


@click.command("finetune")
@click.option("--model", required=True, help="Registered 2D backbone (medfeat models list).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local checkpoint; seeded random weights when absent.")
@click.option("--dataset", required=True,
              help="Manifest CSV (item_id, path, target, split train/val/test) or NAME:ROOT of a public dataset's "
                   "local copy (aptos2019, isic2019, cbis_ddsm, chexpert).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the training state (rerun to resume), model.safetensors, finetune.json, results.json.")
@click.option("--target", default="label", show_default=True, help="Target column; several comma-separated for multi-label.")
@click.option("--task", type=click.Choice(["binary", "multiclass", "ordinal", "multilabel"]), default=None,
              help="[default: multilabel for several columns, binary for 2 classes, else multiclass]")
@click.option("--unfreeze-from", default=None,
              help="Train the backbone from this block on (a tap name, or N for blocks.N); default: all of it.")
@click.option("--cut-at", default=None,
              help="Cut the backbone after this block (tap name or N for blocks.N); default: its last tap.")
@click.option("--pooling", default=None, help="Pooling of the cut tap [default: ViT blocks norm-cls, else the tap's].")
@click.option("--epochs", type=click.IntRange(1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="AdamW learning rate.")
@click.option("--weight-decay", type=float, default=1e-5, show_default=True)
@click.option("--warmup-iters", type=click.IntRange(0), default=1000, show_default=True)
@click.option("--patience", type=click.IntRange(1), default=None, help="Stop after N epochs without improvement.")
@click.option("--augment", type=click.Choice(["study", "none"]), default="study", show_default=True,
              help="Training augmentation: the study's flips, colour jitter and resized crops, or none.")
@click.option("--device", default="auto", show_default=True, help="auto (GPU if present), cpu, cuda, cuda:N.")
@click.option("--no-amp", is_flag=True, help="No mixed precision on the GPU.")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="Image loading processes.")
@click.option("--split-column", default="split", show_default=True)
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tiny", is_flag=True, help="The model's tiny config (tests, demos).")
@click.option("--input-size", type=click.IntRange(8), default=None, help="Square input side [default: the model's].")
def finetune_cmd(model, weights, dataset, out, target, task, unfreeze_from, cut_at, pooling, epochs, batch_size, lr,
                 weight_decay, warmup_iters, patience, augment, device, no_amp, workers, split_column, n_boot,
                 seed, tiny, input_size) -> None:
    """Fine-tune MODEL on a dataset's train split, pick the epoch on val, score test with 95% CIs."""
    from medfeat.export.training.finetune import FinetuneConfig
    from medfeat.export.training.loop import TrainSettings
    from medfeat.studies.finetune import run_finetune

    settings = TrainSettings(lr=lr, weight_decay=weight_decay, batch_size=batch_size, epochs=epochs,
                             warmup_iters=warmup_iters, patience=patience, mixed_precision=not no_amp,
                             device=device, seed=seed)
    cfg = FinetuneConfig(model=model, weights=weights, tap=_block(cut_at), unfreeze_from=_block(unfreeze_from),
                         pooling=pooling, tiny=tiny, input_size=input_size, augment=augment, seed=seed,
                         num_workers=workers, settings=settings)
    res = run_finetune(cfg, dataset, out, target=target, task=task, split_column=split_column, n_boot=n_boot,
                       log=click.echo)
    click.echo(f"{model} fine-tuned: {res.task}, {len(res.y)} test items")
    for name, m in res.metrics.items():
        click.echo(f"  {name:<18} {m['value']:.4f}  95% CI [{m['ci_low']:.4f}, {m['ci_high']:.4f}]")
    click.echo(f"wrote {out / 'results.json'} and {out / 'model.safetensors'}")


def register(groups: dict[str, click.Group]) -> None:
    groups["root"].add_command(finetune_cmd)

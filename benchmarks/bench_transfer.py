"""Seconds per training epoch of the transfer study's two trained settings, per dataset size.

* ``finetune``: each model fine-tuned end to end (``run_finetune``: the study's settings,
  batch 64, augmentation, mixed precision on a GPU) on a synthetic 224 px image set of N
  training images (plus N/8 validation images scored every epoch), images streamed from
  PNG files through the same readers and transforms as extraction;
* ``transformer_head``: the study's DeiT-B head (width 768, 12 blocks) trained on N stored
  token maps (16 x 16 patch tokens of width 768, float16, 4 augmented views).

Each case runs ``--epochs`` epochs; the figure is the median epoch after the first (which
includes start-up). Random weights: time does not depend on them.

    PYTHONPATH=. python benchmarks/bench_transfer.py --device cuda \\
        --models dinov2_vitb14,deit_b16,sam_vit_b,resnet50 --sizes 1024,4096 --epochs 3
    PYTHONPATH=. python benchmarks/bench_transfer.py --tiny      # a quick check that it runs

Writes ``benchmarks/results/transfer_<device>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from medfeat.cohorts.synth2d import synth2d_cohort
from medfeat.export.training.finetune import FinetuneConfig
from medfeat.export.training.loop import TrainSettings
from medfeat.probes.headfit import HeadProbe
from medfeat.studies.finetune import run_finetune

HERE = Path(__file__).resolve().parent


def finetune_epoch(model: str, n: int, args: argparse.Namespace, folder: Path) -> dict:
    """Median seconds per epoch of fine-tuning ``model`` on ``n`` training images."""
    val = max(8, n // 8)
    total = n + 2 * val
    manifest = synth2d_cohort(folder / f"set{total}", images=total, size=args.size,
                              fractions=(n / total, val / total, val / total))
    cfg = FinetuneConfig(model, tiny=args.tiny, input_size=args.size if args.tiny else None,
                         num_workers=args.workers,
                         settings=TrainSettings(epochs=args.epochs, device=args.device, batch_size=args.batch))
    run_finetune(cfg, manifest, folder / f"ft-{model}-{n}", target="label", task="multiclass", n_boot=0,
                 log=lambda s: None)
    doc = json.loads((folder / f"ft-{model}-{n}" / "finetune.json").read_text())
    seconds = [h["seconds"] for h in doc["history"]]
    return {"setting": "finetune", "model": model, "train_images": n, "val_images": val,
            "seconds_per_epoch": statistics.median(seconds[1:] or seconds), "epochs": seconds,
            "device": doc["device"], "precision": doc["precision"]}


def head_epoch(n: int, args: argparse.Namespace) -> dict:
    """Median seconds per epoch of the DeiT-B head on ``n`` stored token maps (4 views)."""
    tokens, width, depth = (16, 32, 2) if args.tiny else (256, 768, 12)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 5, tokens + 1, width)).astype(np.float16)  # view 0 + 4 views, CLS first
    y = rng.integers(0, 5, n)
    probe = HeadProbe(head="transformer", epochs=args.epochs, batch_size=args.batch, device=args.device,
                      prefix_tokens=1, width=width, depth=depth, heads=2 if args.tiny else 12, val_fraction=0.1)
    probe.fit(X, y)
    seconds = [h["seconds"] for h in probe.history_]
    return {"setting": "transformer_head", "model": "deit_b16 head", "train_images": int(0.9 * n),
            "seconds_per_epoch": statistics.median(seconds[1:] or seconds), "epochs": seconds,
            "device": probe.device_, "precision": probe.precision_}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dinov2_vitb14,deit_b16,sam_vit_b,resnet50")
    parser.add_argument("--sizes", default="1024,4096", help="Training images per epoch.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--size", type=int, default=224, help="Image side of the synthetic set.")
    parser.add_argument("--tiny", action="store_true", help="Tiny configs and sizes: check the script runs.")
    args = parser.parse_args()
    if args.tiny:
        args.models, args.sizes, args.epochs, args.batch, args.size, args.workers = "deit_b16", "32", 2, 16, 32, 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            for model in args.models.split(","):
                rows.append(finetune_epoch(model, n, args, Path(tmp)))
                print(json.dumps(rows[-1]))
            rows.append(head_epoch(n, args))
            print(json.dumps(rows[-1]))
    device = rows[0]["device"] if rows else "cpu"
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "tiny": args.tiny,
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "load_average": os.getloadavg()[0], "rows": rows, "command": " ".join(sys.argv)}
    out = HERE / "results" / f"transfer_{device.split(':')[0]}{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    for r in rows:
        print(f"{r['setting']:<17} {r['model']:<16} {r['train_images']:>6} images  "
              f"{r['seconds_per_epoch']:.2f} s/epoch  ({r['device']}, {r['precision']})")


if __name__ == "__main__":
    main()

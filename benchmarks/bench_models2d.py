"""Throughput of the 2D backbones on the CPU: full depth vs a half-depth tap.

Grid: each model below, 224 x 224 RGB, batch 8 (random weights: throughput does not
depend on them), taps = the last tap of the table ("full") and the tap at the middle of
the block stack ("half": ``blocks.5`` of 12, ``layer2``, ``res3``), each built with
``create_backbone`` so the half-depth model holds no later layer. One warm-up batch, then
the median of ``--repeats`` timed batches under ``torch.inference_mode``.

    .venv/bin/python benchmarks/bench_models2d.py [--batch 8] [--repeats 3] [--models a,b]

Writes ``benchmarks/results/models2d_cpu.json`` and appends a table to
``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from medfeat.export.backbones.registry import create_backbone, get_spec

MODELS = ["dinov2_vits14", "dinov2_vitb14", "sam_vit_b", "openclip_vitb16", "blip_vitb16", "seem_focalt",
          "deit_b16", "resnet50", "resnet152"]
HERE = Path(__file__).resolve().parent


def half_tap(name: str) -> str:
    """The tap in the middle of the block stack (``blocks.5`` of 12, ``layer2`` of 4)."""
    table = get_spec(name).tap_table()
    return table[len(table) // 2 - 1].name


def time_backbone(name: str, tap: str, batch: int, repeats: int) -> dict:
    """Images/s of ``name`` truncated at ``tap`` (median of ``repeats`` batches)."""
    backbone = create_backbone(name, [tap])
    x = torch.randn(batch, 3, 224, 224)
    times = []
    with torch.inference_mode():
        out = backbone(x)  # warm-up: allocator, oneDNN primitives
        expected = backbone.output_dims()[tap]
        if out[tap].shape != (batch, expected):
            raise RuntimeError(f"{name}/{tap}: output {tuple(out[tap].shape)}, spec says {expected}")
        for _ in range(repeats):
            start = time.perf_counter()
            backbone(x)
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in backbone.parameters())
    return {"tap": tap, "images_per_s": batch / statistics.median(times), "seconds_per_batch": times,
            "params_m": params / 1e6}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    import open_clip
    import timm

    load_before = os.getloadavg()[0]
    rows = []
    for name in args.models.split(","):
        last = get_spec(name).tap_table()[-1].name
        full = time_backbone(name, last, args.batch, args.repeats)
        half = time_backbone(name, half_tap(name), args.batch, args.repeats)
        rows.append({"model": name, "full": full, "half": half})
        print(f"{name:16s} full {full['tap']:>8s} {full['images_per_s']:7.2f} img/s   "
              f"half {half['tap']:>8s} {half['images_per_s']:7.2f} img/s", flush=True)
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{cpu_name()}, {torch.get_num_threads()} torch threads",
        "batch": args.batch, "input": [3, 224, 224], "repeats": args.repeats, "dtype": "float32",
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "open_clip": open_clip.__version__,
                     "python": platform.python_version()},
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "rows": rows,
    }
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "models2d_cpu.json").write_text(json.dumps(record, indent=2))
    append_markdown(record)


def append_markdown(record: dict) -> None:
    lines = [
        "", f"## 2D backbones on the CPU: full depth vs half-depth tap ({record['date'][:10]})", "",
        "Command: `.venv/bin/python benchmarks/bench_models2d.py "
        f"--batch {record['batch']} --repeats {record['repeats']}`  ",
        f"Machine: {record['device']} (shared with other jobs); float32, 224 x 224, batch {record['batch']}, "
        "random weights, median of the timed batches after one warm-up; "
        f"torch {record['versions']['torch']}, timm {record['versions']['timm']}; 1-min load average "
        f"{record['load_average_1min'][0]:.1f} before, {record['load_average_1min'][1]:.1f} after. "
        "Raw figures: `benchmarks/results/models2d_cpu.json`.", "",
        "| model | full tap | img/s | params (M) | half tap | img/s | params (M) | speed-up |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for row in record["rows"]:
        full, half = row["full"], row["half"]
        lines.append(f"| {row['model']} | {full['tap']} | {full['images_per_s']:.2f} | {full['params_m']:.1f} | "
                     f"{half['tap']} | {half['images_per_s']:.2f} | {half['params_m']:.1f} | "
                     f"{half['images_per_s'] / full['images_per_s']:.2f}x |")
    with open(HERE / "RESULTS.md", "a") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""``medfeat bench``: run a declared grid of stages, write JSON + Markdown + PNG, and plan a cohort.

A grid is a list of :class:`~medfeat.bench.stages.StageCase` dicts; presets:
``tiny`` (seconds, for CI), ``cpu`` and ``gpu`` (real sizes). A YAML file with a ``cases``
list of the same dicts works too. The ``pipeline`` stage puts the extraction pipeline beside
a sequential loop on a small synthetic cohort and reports its efficiency (items/s over the
items/s of its slowest stage alone; :mod:`medfeat.bench.pipeline`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medfeat.bench.harness import environment, machine_limits
from medfeat.bench.stages import STAGES, StageCase
from medfeat.errors import InputError, UnknownNameError, one_line

PRESETS: dict[str, list[dict[str, Any]]] = {
    "tiny": [
        {"stage": "read", "size": [32, 32, 32]},
        {"stage": "resample", "size": [40, 40, 40], "out_size": [32, 32, 32]},
        {"stage": "fused", "size": [40, 40, 40], "out_size": [32, 32, 32], "batch": 2},
        {"stage": "infer", "model": "unet3d", "tiny": True, "size": [16, 16, 16], "batch": 2,
         "runtimes": ["eager", "onnxruntime"]},
        {"stage": "store_write", "size": [512, 64]},
        {"stage": "probe_fit", "size": [300, 16]},
        # 4 scans of 16^3, tiny UNet, threads, one repeat: the pipeline vs the sequential loop in seconds
        {"stage": "pipeline", "model": "unet3d", "tiny": True, "size": [16, 16, 16], "batch": 2,
         "subjects": 2, "schedulers": ["threads:1"], "repeats": 1},
    ],
    "cpu": [
        {"stage": "read", "size": [160, 160, 160]},
        {"stage": "resample", "size": [160, 160, 160], "out_size": [128, 128, 128]},
        {"stage": "resample", "size": [256, 256, 256], "out_size": [175, 175, 175], "repeats": 2},
        {"stage": "fused", "size": [160, 160, 160], "out_size": [128, 128, 128], "batch": 2},
        {"stage": "infer", "model": "swin_unetr", "size": [96, 96, 96], "batch": 2,
         "runtimes": ["eager", "onnxruntime"]},
        {"stage": "infer", "model": "dinov2_vitb14", "size": [224, 224], "batch": 8,
         "runtimes": ["eager", "onnxruntime"]},
        {"stage": "store_write", "size": [10000, 768]},
        {"stage": "probe_fit", "size": [5000, 256]},
        # the task UNet at 64^3 on 12 scans, as benchmarks/bench_pipeline.py's default study
        {"stage": "pipeline", "model": "unet3d", "taps": ["3"], "size": [64, 64, 64], "batch": 4,
         "subjects": 6, "schedulers": ["threads:1", "local:1"], "repeats": 3},
    ],
    "gpu": [
        {"stage": "resample", "size": [160, 160, 160], "out_size": [128, 128, 128], "device": "cuda", "repeats": 20},
        {"stage": "resample", "size": [256, 256, 256], "out_size": [175, 175, 175], "device": "cuda", "repeats": 20},
        {"stage": "fused", "size": [160, 160, 160], "out_size": [128, 128, 128], "batch": 8, "device": "cuda",
         "repeats": 20},
        {"stage": "infer", "model": "dinov2_vitb14", "size": [224, 224], "batch": 64, "device": "cuda",
         "precision": "bf16", "runtimes": ["eager", "compiled"], "repeats": 10},
        {"stage": "infer", "model": "swin_unetr", "size": [96, 96, 96], "batch": 8, "device": "cuda",
         "precision": "bf16", "runtimes": ["eager", "compiled"], "repeats": 10},
        # realistic sizes on one GPU worker: can the CPU stages keep the model busy?
        {"stage": "pipeline", "model": "unet3d", "taps": ["3"], "size": [128, 128, 128],
         "out_size": [128, 128, 128], "batch": 4, "device": "cuda", "subjects": 16, "threads": 4,
         "schedulers": ["local:1"], "repeats": 3},
        {"stage": "pipeline", "model": "sam_med3d", "size": [128, 128, 128], "batch": 4, "device": "cuda",
         "subjects": 16, "threads": 4, "schedulers": ["local:1"], "repeats": 3},
    ],
}


def load_grid(grid: str) -> list[StageCase]:
    """Cases of a preset name or a YAML file."""
    if grid in PRESETS:
        raw = PRESETS[grid]
    elif Path(grid).is_file():
        doc = yaml.safe_load(Path(grid).read_text())
        raw = doc.get("cases", []) if isinstance(doc, dict) else []
    else:
        raise UnknownNameError(f"unknown benchmark grid {grid!r}: a preset ({', '.join(PRESETS)}) or a YAML file")
    cases = []
    for i, c in enumerate(raw):
        if c.get("stage") not in STAGES:
            raise InputError(f"grid case {i}: unknown stage {c.get('stage')!r}; stages: {', '.join(STAGES)}")
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}  # YAML values
        extra = {k: fields.pop(k) for k in list(fields) if k not in StageCase.__dataclass_fields__}
        cases.append(StageCase(**fields, extra=extra))
    return cases


def run_grid(cases: list[StageCase], *, quick_limits: bool = False, log: Callable[[str], None] = print
             ) -> dict[str, Any]:
    """Measure the machine's limits once per device, then every case; errors become rows."""
    devices = sorted({c.device for c in cases})
    limits = {d: machine_limits(d, quick=quick_limits) for d in devices}
    rows: list[dict[str, Any]] = []
    for case in cases:
        start = time.perf_counter()
        try:
            new = STAGES[case.stage](case, limits[case.device])
        except Exception as exc:  # noqa: BLE001 - one failing stage must not lose the others
            new = [{"stage": case.stage, "impl": "-", "model": case.model or "", "error": f"{type(exc).__name__}: {one_line(exc)}"}]
        rows += new
        log(f"{case.stage:<12} {case.model or 'x'.join(map(str, case.size)):<16} {time.perf_counter() - start:6.1f} s")
    return {"environment": environment(devices[-1] if devices else "cpu"), "limits": limits, "rows": rows}


RESULT_SCHEMA_KEYS = ("environment", "limits", "rows")
ROW_REQUIRED = ("stage", "impl")
PIPELINE_STAGES = ("read", "preprocess", "infer", "write")


def validate_result(doc: dict[str, Any]) -> None:
    """Raise ValueError unless ``doc`` has the benchmark JSON's shape."""
    for key in RESULT_SCHEMA_KEYS:
        if key not in doc:
            raise ValueError(f"benchmark JSON lacks {key!r}")
    for i, row in enumerate(doc["rows"]):
        for key in ROW_REQUIRED:
            if key not in row:
                raise ValueError(f"row {i} lacks {key!r}")
        if "error" in row:
            continue
        for key in ("seconds", "items_per_s"):
            _check_positive(row.get(key), f"row {i} ({row['stage']}/{row['impl']}): bad {key}")
        if row["stage"] == "pipeline":
            _validate_pipeline_row(i, row)


def _check_positive(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{what} {value!r}")


def _validate_pipeline_row(i: int, row: dict[str, Any]) -> None:
    """Pipeline rows: a role; the pipeline's own rows carry a finite positive ratio and
    efficiency, and the items/s of every stage alone, the slowest of them named."""
    where = f"row {i} ({row['stage']}/{row['impl']})"
    role = row.get("role")
    if role not in ("sequential", "pipeline", "alone"):
        raise ValueError(f"{where}: bad role {role!r}")
    if role != "pipeline":
        return
    for key in ("ratio_to_sequential", "efficiency"):
        _check_positive(row.get(key), f"{where}: bad {key}")
    alone = row.get("alone_items_per_s")
    if not isinstance(alone, dict) or set(alone) != set(PIPELINE_STAGES):
        raise ValueError(f"{where}: alone_items_per_s needs {', '.join(PIPELINE_STAGES)}, has {alone!r}")
    for stage, rate in alone.items():
        _check_positive(rate, f"{where}: bad items/s of {stage} alone")
    if row.get("slowest_stage") != min(alone, key=alone.__getitem__):
        raise ValueError(f"{where}: slowest_stage {row.get('slowest_stage')!r} is not the slowest stage alone")


def markdown_table(doc: dict[str, Any]) -> str:
    """One Markdown table of all rows: stage, impl, case, time, throughput, ratio, fraction of
    limit, and notes (the pipeline's efficiency and slowest stage, model busy, peak RSS)."""
    lines = ["| stage | impl | case | batch | median s | spread | items/s | ratio | fraction of limit | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        case = _case_label(r)
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['impl']} | {case} | | | | error: {r['error'][:80]} | | | |")
            continue
        ratio = next((v for k, v in r.items() if k.startswith("ratio_to_")), None)
        frac = r.get("fraction")
        lines.append(f"| {r['stage']} | {r['impl']} | {case} | {r.get('batch', '')} | {r['seconds']:.4g} | "
                     f"{r['spread']:.2f} | {r['items_per_s']:.4g} | {'' if ratio is None else f'{ratio:.2f}'} | "
                     f"{'' if frac is None else f'{frac:.1%}'} | {_notes(r)} |")
    return "\n".join(lines)


def _case_label(r: dict[str, Any]) -> str:
    shape = f"{r.get('size', '')}" + (f"->{r['out_size']}" if r.get("out_size") else "")
    if r.get("stage") == "pipeline":  # the model and the scans' shape both matter here
        return f"{r.get('model', '')} {shape} ({r.get('scans', '?')} scans)"
    return r.get("model") or shape


def _notes(r: dict[str, Any]) -> str:
    if r.get("role") == "pipeline":
        return (f"efficiency {r['efficiency']:.2f} (slowest alone: {r['slowest_stage']}), model busy "
                f"{r.get('infer_busy_fraction', 0.0):.2f}, peak RSS {r.get('peak_rss_driver_mib', 0)} / "
                f"{r.get('peak_rss_worker_mib', 0)} MiB (driver / worker)")
    if r.get("role") == "alone" and r.get("slowest"):
        return "slowest stage alone"
    return ""


def write_outputs(doc: dict[str, Any], out: Path) -> list[Path]:
    """JSON, Markdown and PNG plots under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text(json.dumps(doc, indent=1, default=float))
    env = doc["environment"]
    head = (f"# medfeat bench\n\n{env['time']} on {env.get('gpu') or env['host_cpu']} "
            f"({env['cpu_count']} CPUs); limits: " +
            "; ".join(f"{d}: copy {v['copy_bytes_per_s'] / 1e9:.1f} GB/s, fp32 {v['matmul_fp32_flops'] / 1e12:.2f} "
                      f"TFLOP/s, bf16 {v['matmul_bf16_flops'] / 1e12:.2f} TFLOP/s" for d, v in doc["limits"].items()))
    paths[1].write_text(head + "\n\n" + markdown_table(doc) + "\n")
    paths += _plots(doc, out)
    return paths


def _plots(doc: dict[str, Any], out: Path) -> list[Path]:
    """Bar charts: items/s of every row (log), fraction of the machine's limit, and the
    pipeline's efficiency per scheduler and model (when the grid has a pipeline stage)."""
    rows = [r for r in doc["rows"] if "error" not in r]
    if not rows:
        return []
    labels = [f"{r['stage']}:{r['impl']}" + (f":{r['model']}" if r.get("model") else "") for r in rows]
    paths = [_bar(out / "throughput.png", "items/s per stage (log)", labels,
                  [r.get("items_per_s", 0.0) or 0.0 for r in rows], log=True),
             _bar(out / "fraction_of_limit.png", "fraction of the machine's limit", labels,
                  [r.get("fraction", 0.0) or 0.0 for r in rows])]
    pipe = [r for r in rows if "efficiency" in r]
    if pipe:
        paths.append(_bar(out / "pipeline_efficiency.png",
                          "pipeline items/s over its slowest stage's items/s alone",
                          [f"{r['impl']}:{_case_label(r)}" for r in pipe], [r["efficiency"] for r in pipe]))
    return paths


def _bar(path: Path, title: str, labels: list[str], values: list[float], log: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.3 * len(values) + 1.5))
    ax.barh(range(len(values)), values)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    if log:
        ax.set_xscale("log")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plan_cohort(manifest: str, model: str, taps: list[str], *, sample: int = 4, tiny: bool = False,
                runtime: str = "eager", batch_size: int = 2, log: Callable[[str], None] = print,
                model_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Estimate a whole cohort's extraction wall time and peak memory from a short sample run.

    ``model_settings``: further extract settings for the model (``plugins``, ``input_kind``,
    ``input_size``, ``intensity``, ``model_args``, ``weights``)."""
    import tempfile

    import pandas as pd
    import psutil

    from medfeat.engine.pipeline.config import ExtractConfig
    from medfeat.engine.pipeline.extract import extract

    df = pd.read_csv(manifest)
    if df.empty:
        raise InputError(f"{manifest}: empty manifest")
    subjects = df["subject"].astype(str).unique()[: max(1, sample)] if "subject" in df else None
    sample_df = df[df["subject"].astype(str).isin(subjects)] if subjects is not None else df.head(sample)
    with tempfile.TemporaryDirectory() as tmp:
        sample_manifest = Path(tmp) / "sample.csv"
        # Keep paths valid: make them absolute against the original manifest's folder.
        base = Path(manifest).resolve().parent
        for col in ("path", "mask_path"):
            if col in sample_df:
                sample_df = sample_df.assign(**{col: [str(base / p) if isinstance(p, str) and p else p
                                                      for p in sample_df[col]]})
        sample_df.to_csv(sample_manifest, index=False)
        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        cfg = ExtractConfig.from_settings(str(sample_manifest), str(Path(tmp) / "s.zarr"), model, taps,
                                          tiny=tiny, runtime=runtime, batch_size=batch_size,
                                          scheduler_kind="sync", progress=False, random_init=True,
                                          **(model_settings or {}))
        start = time.perf_counter()
        summary = extract(cfg)
        seconds = time.perf_counter() - start
        peak = max(proc.memory_info().rss, rss0)
    done = max(1, summary.items.done)
    per_item = seconds / done
    total_items = len(df) if done == len(sample_df) else round(len(df) * done / max(1, len(sample_df)))
    plan = {"model": model, "taps": taps, "sample_items": done, "sample_seconds": seconds,
            "seconds_per_item": per_item, "cohort_items": int(total_items),
            "estimated_seconds": per_item * total_items, "peak_rss_bytes": int(peak),
            "note": "single process, sync scheduler; includes model build and warm-up in the sample"}
    log(f"{done} sample items in {seconds:.1f} s -> {per_item:.2f} s/item; "
        f"{total_items} items -> about {per_item * total_items / 3600:.2f} h, peak RSS {peak / 2**30:.2f} GiB")
    return plan

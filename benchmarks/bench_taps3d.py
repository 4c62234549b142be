"""Half-depth tap against the full model for the 3D segmentation backbones, on the CPU, at real size.

For each model, batch 1 at its registry input size with seeded random weights (timing does not
depend on the weights):

* ``half``: ``create_backbone(name, [half_tap])``, pruned after the tap, pooled output;
* ``full``: the untruncated model's plain forward (SAM-Med3D: the neck; SwinUNETR and the
  UNet: the segmentation logits).

Each (model, variant) runs in its own process, so peak memory is its own: we report the peak
resident set size minus the resident size with the model and input built, before any
forward (the activations and workspaces), the parameter count held, and the median of ``--repeats`` timed runs after one
warm-up (min and median), all under ``torch.inference_mode()``. Results go to ``benchmarks/results/bench_taps3d.json``
and a section appended to ``benchmarks/RESULTS.md``.

    python benchmarks/bench_taps3d.py [--repeats 3] [--models sam_med3d,swin_unetr,unet3d]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

HALF_TAPS = {"sam_med3d": "blocks.5", "swin_unetr": "swinViT.2", "unet3d": "bottom"}
HERE = Path(__file__).resolve().parent


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _measure(name: str, variant: str, repeats: int, queue: mp.Queue) -> None:
    import torch

    from medfeat.export.backbones.registry import create_backbone, get_spec

    spec = get_spec(name)
    if variant == "half":
        model = create_backbone(name, [HALF_TAPS[name]], seed=0)
    else:
        torch.manual_seed(0)
        model = spec.build().eval()
    x = torch.rand(1, spec.in_channels, *spec.input_size, generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in model.parameters())
    times = []
    before = _rss_mib()  # model and input only: the peak above it is the forward's working memory
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queue.put({"model": name, "variant": variant, "tap": HALF_TAPS[name] if variant == "half" else "(plain forward)",
               "input": list(spec.input_size), "params_m": round(params / 1e6, 2),
               "min_s": round(min(times), 3),
               "median_s": round(statistics.median(times), 3), "times_s": [round(t, 3) for t in times],
               "peak_rss_mib": round(peak, 1), "forward_mem_mib": round(max(peak - before, 0.0), 1),
               "threads": torch.get_num_threads()})


def run(models: list[str], repeats: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for name in models:
        for variant in ("half", "full"):
            queue: mp.Queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(name, variant, repeats, queue))
            proc.start()
            rows.append(queue.get())
            proc.join()
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"\n## 3D taps: half-depth tap vs full model (CPU), {meta['date']}\n",
             f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}; torch {meta['torch']}, {rows[0]['threads']} threads; batch 1, "
             f"{meta['repeats']} timed runs after a warm-up (min is the robust figure on a shared machine); "
             "random weights. Memory: peak RSS minus RSS "
             "with model and input built, before any forward (activations), in a fresh process per row. The "
             "2 cores were shared with other jobs during the run, so times carry that noise.\n",
             "| model | input | variant | tap | params (M) | min (s) | median (s) | forward memory (MiB) "
             "| peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['variant']} | {r['tap']} | "
                     f"{r['params_m']} | {r['min_s']} | {r['median_s']} | {r['forward_mem_mib']} | {r['peak_rss_mib']} |")
    by = {(r["model"], r["variant"]): r for r in rows}
    for name in dict.fromkeys(r["model"] for r in rows):
        half, full = by.get((name, "half")), by.get((name, "full"))
        if half and full:
            lines.append(f"\n{name}: half-depth tap takes {half['min_s'] / full['min_s']:.0%} of the full "
                         f"model's time (best of runs) and {half['forward_mem_mib'] / max(full['forward_mem_mib'], 1e-9):.0%} "
                         "of its forward memory.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(HALF_TAPS))
    args = parser.parse_args()
    import torch

    models = [m for m in args.models.split(",") if m]
    rows = run(models, args.repeats)
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": f"python benchmarks/bench_taps3d.py --repeats {args.repeats} --models {','.join(models)}",
            "machine": f"{platform.processor() or platform.machine()}, {mp.cpu_count()} CPUs visible",
            "torch": torch.__version__, "repeats": args.repeats}
    out = HERE / "results" / "bench_taps3d.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(HERE / "RESULTS.md", "a") as fh:
        fh.write(_markdown(rows, meta))
    print(f"wrote {out} and appended to {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()

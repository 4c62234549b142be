"""Rigid alignment on the CPU: medfeat against SimpleITK, side by side in one run.

Run:  python benchmarks/bench_align.py [--subjects 4] [--shape 64] [--rounds 7] [--threads 2] [--quick]

Data: the synthetic knee cohort (``medfeat.cohorts.synth.synth_cohort``),
each subject's follow-up (moving) aligned to its baseline (fixed); the
manifest's ``transform`` column is the truth (``followup_world = T @
baseline_world``). T is exact for the tibia and soft tissue of stable
subjects (label 0); progressors' femurs sink by the joint-space narrowing,
so their rigid optimum legitimately differs from T: accuracy is reported
over all pairs and over the stable ones.

Methods, all on ``--threads`` threads:

* ``medfeat``: ``medfeat.kernels.align`` with its defaults (one batched call,
  Levenberg-Marquardt with early stopping per pair);
* ``medfeat_adam``: the same call with ``AlignConfig(optimizer='adam')``, the
  optimiser medfeat had before (the "before" figure);
* ``sitk``: SimpleITK pair by pair, the registration of
  ``tests/kernels/sitk_ref.py`` (correlation metric, 3-level pyramid
  4/2/1 with smoothing 2/1/0 mm, regular-step gradient descent, 25 % random
  sampling).

Timing is interleaved: after one warm-up call each, every one of
``--rounds`` rounds calls each method once, the order rotated by one from
round to round, so load drift on a shared machine hits all methods alike. A
method's time is the median of its rounds; "x SimpleITK" is SimpleITK's time
/ the method's within each round, median (min-max) over the rounds.
Accuracy: rotation error (angle of inv(T) @ T_est, degrees) and the largest
displacement error at the fixed scan's eight corners, in voxels of its
smallest spacing. Prints a Markdown table and writes JSON (``--out``,
default ``benchmarks/results/bench_align-<UTC time>.json``).
``--quick``: 2 subjects at 32^3, 2 rounds (a CI-sized check that it runs;
its figures are not measurements).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.kernels.sitk_ref


def load_pairs(subjects: int, shape: int, seed: int) -> list[dict]:
    """Follow-up/baseline pairs of a fresh synthetic cohort, with the recorded T and the label."""
    from medfeat.cohorts import synth
    from medfeat.io import nifti as volume_io
    from medfeat.io.manifest import parse_transform

    with tempfile.TemporaryDirectory() as tmp:
        path = synth.synth_cohort(tmp, subjects=subjects, seed=seed, shape=(shape,) * 3, workers=1)
        rows = list(csv.DictReader(open(path)))
        base = {r["subject"]: r for r in rows if r["timepoint"] == "baseline"}
        return [{"moving": volume_io.read_volume(Path(tmp) / r["path"]),
                 "fixed": volume_io.read_volume(Path(tmp) / base[r["subject"]]["path"]),
                 "T": parse_transform(r["transform"]), "label": int(r["label"]), "subject": r["subject"]}
                for r in rows if r["timepoint"] != "baseline"]


def errors(est: np.ndarray, pair: dict) -> tuple[float, float]:
    """(rotation error in degrees, worst corner displacement in voxels of the fixed scan's smallest spacing)."""
    from medfeat.cohorts.synth import rotation_angle_deg
    from medfeat.kernels import Grid

    f = pair["fixed"]
    corners = np.c_[Grid(f.data.shape, f.affine).world_corners(), np.ones(8)].T
    disp = np.linalg.norm((est @ corners - pair["T"] @ corners)[:3], axis=0).max()
    return rotation_angle_deg(np.linalg.inv(pair["T"]) @ est), float(disp / f.spacing.min())


def methods(pairs: list[dict]) -> dict:
    """name -> callable returning (B, 4, 4) fixed-world -> moving-world transforms."""
    from medfeat.kernels import AlignConfig, align
    from tests.kernels.sitk_ref import sitk_register

    mov = [p["moving"] for p in pairs]
    fix = [p["fixed"] for p in pairs]
    args = ([m.data for m in mov], [f.data for f in fix], [m.affine for m in mov], [f.affine for f in fix])
    return {
        "medfeat": lambda: align(*args),
        "medfeat_adam": lambda: align(*args, config=AlignConfig(optimizer="adam")),
        "sitk": lambda: np.stack([sitk_register(m.data, f.data, m.affine, f.affine) for m, f in zip(mov, fix)]),
    }


def interleaved(fns: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Per-method wall times (s) over ``rounds`` rotated rounds after one warm-up each; and each method's last result."""
    names = list(fns)
    results = {name: fns[name]() for name in names}  # warm-up: thread pools, Numba kernels, first touch
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            results[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times, results


def summarise(pairs: list[dict], times: dict, results: dict) -> dict:
    """Median times, per-round ratios against SimpleITK and accuracy per method."""
    out: dict = {}
    for name, ts in times.items():
        ratio = np.array(times["sitk"]) / np.array(ts)
        errs = [errors(e, p) for e, p in zip(results[name], pairs)]
        stable = [e for e, p in zip(errs, pairs) if p["label"] == 0]
        out[name] = {
            "median_s": float(np.median(ts)), "times_s": [float(t) for t in ts],
            "x_sitk": float(np.median(ratio)), "x_sitk_range": [float(ratio.min()), float(ratio.max())],
            "deg": [e[0] for e in errs], "vox": [e[1] for e in errs],
            "max_deg": max(e[0] for e in errs), "max_vox": max(e[1] for e in errs),
            "stable_max_deg": max((e[0] for e in stable), default=float("nan")),
            "stable_max_vox": max((e[1] for e in stable), default=float("nan")),
        }
    return out


def table(res: dict) -> str:
    names = {"medfeat": "medfeat (gauss-newton, default)", "medfeat_adam": "medfeat, adam (before)",
             "sitk": "SimpleITK, pair by pair"}
    lines = ["| method | median s | x SimpleITK, median (min-max) | max error deg | max error voxel | "
             "stable pairs: max deg | stable: max voxel |", "|---|---:|---|---:|---:|---:|---:|"]
    for key, r in res.items():
        lo, hi = r["x_sitk_range"]
        lines.append(f"| {names[key]} | {r['median_s']:.2f} | {r['x_sitk']:.2f} ({lo:.2f}-{hi:.2f}) | {r['max_deg']:.2f} | "
                     f"{r['max_vox']:.2f} | {r['stable_max_deg']:.2f} | {r['stable_max_vox']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=4, help="synthetic subjects = pairs aligned in one batch")
    ap.add_argument("--shape", type=int, default=64, help="scan grid, voxels per axis")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=2, help="torch, Numba and ITK threads")
    ap.add_argument("--quick", action="store_true", help="2 subjects at 32^3, 2 rounds: checks the script runs")
    ap.add_argument("--out", type=Path, default=None, help="JSON path")
    args = ap.parse_args()
    if args.quick:
        args.subjects, args.shape, args.rounds = 2, 32, 2
    import numba
    import SimpleITK as sitk
    import torch

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    pairs = load_pairs(args.subjects, args.shape, args.seed)
    load_start = os.getloadavg()[0]
    times, results = interleaved(methods(pairs), args.rounds)
    load_end = os.getloadavg()[0]
    res = summarise(pairs, times, results)
    print(f"{len(pairs)} pairs at {args.shape}^3 (labels {[p['label'] for p in pairs]}), {args.threads} threads, "
          f"{args.rounds} rounds, 1-min load average {load_start:.1f} -> {load_end:.1f}\n")
    print(table(res))
    now = dt.datetime.now(dt.timezone.utc)
    record = {
        "date": now.isoformat(timespec="seconds"), "quick": args.quick,
        "command": "python benchmarks/bench_align.py " + " ".join(sys.argv[1:]),
        "machine": {"nproc": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "loadavg_1min": load_start, "loadavg_1min_end": load_end},
        "threads": args.threads, "rounds": args.rounds, "subjects": args.subjects, "shape": args.shape,
        "seed": args.seed, "labels": [p["label"] for p in pairs],
        "versions": {"SimpleITK": sitk.Version_VersionString(), "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "methods": res,
    }
    out = args.out or HERE / "results" / f"bench_align-{now.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

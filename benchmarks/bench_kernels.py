"""CPU benchmark of medfeat.kernels against SciPy, SimpleITK and torch, in one run.

Run:  python benchmarks/bench_kernels.py [--reps 3] [--threads 2]

Declared grid: float32 volumes, order 1 (trilinear), an oblique rotation +
scaling about the centres; 160^3 -> 128^3 and 256^3 -> 175^3. Resamplers:
our Numba twin (``affine_transform`` on numpy), ``scipy.ndimage.
affine_transform``, SimpleITK's multi-threaded ``Resample`` (the strongest
CPU peer) and torch ``grid_sample``; all use ``--threads`` threads (SciPy is
single-threaded). Then the fused op (uniGradICON rule: clamp to [min, p99] of
the source, scale to [0, 1], float32 into a preallocated batch buffer) against
the unfused chain SimpleITK resample -> NumPy min/percentile, clip, scale,
cast. Each figure is the median of ``--reps`` timed calls after a warm-up.
Writes JSON to benchmarks/results/ and appends a section to
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

CASES = [((160, 160, 160), (128, 128, 128)), ((256, 256, 256), (175, 175, 175))]
HERE = Path(__file__).parent


def _time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def index_map(src_shape, out_shape):
    from medfeat.kernels import rigid_matrix

    r = rigid_matrix([0.1, 0.05, -0.08], [0, 0, 0])[:3, :3] * (np.array(src_shape) / np.array(out_shape))
    return r, (np.array(src_shape) - 1) / 2 - r @ ((np.array(out_shape) - 1) / 2)


def sitk_resampler(src, m, off, out_shape):
    """SimpleITK Resample of the same index map (ITK index order is reversed: x = axis 2)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(src)
    p = np.eye(3)[::-1]
    tx = sitk.AffineTransform(3)
    tx.SetMatrix((p @ m @ p).ravel().tolist())
    tx.SetTranslation((p @ off).tolist())
    ref = sitk.Image([int(s) for s in out_shape[::-1]], sitk.sitkFloat32)

    def run():
        return sitk.GetArrayViewFromImage(sitk.Resample(img, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))

    return run


def torch_resampler(src, m, off, out_shape):
    import torch

    def norm(shape):
        q = np.zeros((4, 4))
        for row, axis in enumerate((2, 1, 0)):
            q[row, axis] = 2.0 / (shape[axis] - 1)
            q[row, 3] = -1.0
        q[3, 3] = 1.0
        return q

    h = np.eye(4)
    h[:3, :3], h[:3, 3] = m, off
    theta = torch.tensor((norm(src.shape) @ h @ np.linalg.inv(norm(out_shape)))[:3], dtype=torch.float32)[None]
    ts = torch.from_numpy(src)[None, None]

    def run():
        g = torch.nn.functional.affine_grid(theta, [1, 1, *out_shape], align_corners=True)
        return torch.nn.functional.grid_sample(ts, g, mode="bilinear", padding_mode="zeros", align_corners=True)

    return run


def bench_case(src_shape, out_shape, reps):
    import scipy.ndimage as ndi

    from medfeat.kernels import Grid, IntensityRule, affine_transform, resample_normalise

    src = np.random.default_rng(0).gamma(2.0, 100.0, size=src_shape).astype(np.float32)
    m, off = index_map(src_shape, out_shape)
    nvox = int(np.prod(out_shape))
    out = np.empty(out_shape, np.float32)
    sitk_run = sitk_resampler(src, m, off, out_shape)
    r = {"source": list(src_shape), "output": list(out_shape)}
    r["ours_s"] = _time(lambda: affine_transform(src, m, off, output_shape=out_shape, output=out), reps)
    r["scipy_s"] = _time(lambda: ndi.affine_transform(src, m, off, output_shape=out_shape, output=out, order=1), max(1, reps // 2))
    r["sitk_s"] = _time(sitk_run, reps)
    r["torch_s"] = _time(torch_resampler(src, m, off, out_shape), reps)
    ours = affine_transform(src, m, off, output_shape=out_shape)
    inner = tuple(slice(8, -8) for _ in out_shape)
    r["max_rel_diff_vs_sitk_interior"] = float(np.abs(ours[inner] - sitk_run()[inner]).max() / np.ptp(src))
    # Fused: one scan, uniGradICON rule, into a preallocated (1, 1, D, H, W) float32 buffer.
    grid = Grid(out_shape, np.vstack([np.hstack([m, off[:, None]]), [0, 0, 0, 1]]))
    buf = np.empty((1, 1, *out_shape), np.float32)
    r["fused_s"] = _time(lambda: resample_normalise([src], [np.eye(4)], grid, buf, rule=IntensityRule()), reps)

    def unfused():
        lo, hi = float(src.min()), float(np.percentile(src, 99.0))
        res = sitk_run()
        buf[0, 0] = ((np.clip(res, lo, hi) - lo) / (hi - lo)).astype(np.float32)

    r["sitk_chain_s"] = _time(unfused, reps)
    for k in ("ours", "scipy", "sitk", "torch"):
        r[f"{k}_vox_per_s"] = nvox / r[f"{k}_s"]
    r["ours_vs_sitk"] = r["sitk_s"] / r["ours_s"]
    r["ours_vs_scipy"] = r["scipy_s"] / r["ours_s"]
    r["ours_vs_torch"] = r["torch_s"] / r["ours_s"]
    r["fused_vs_sitk_chain"] = r["sitk_chain_s"] / r["fused_s"]
    return r


def bench_align(subjects: int, shape: int) -> dict:
    """Batched rigid alignment of the synthetic cohort's follow-ups to their baselines vs SimpleITK.

    Errors against the recorded T: rotation angle (degrees) and the largest
    displacement at the fixed scan's corners, in voxels (smallest spacing).
    SimpleITK runs pair by pair (correlation metric, 3-level pyramid,
    regular-step gradient descent, 25 % random sampling).
    """
    import csv
    import sys
    import tempfile

    from medfeat.engine import synth, volume_io
    from medfeat.engine.manifest import parse_transform
    from medfeat.kernels import AlignConfig, Grid, align

    sys.path.insert(0, str(HERE.parent))
    from tests.kernels.sitk_ref import sitk_register

    with tempfile.TemporaryDirectory() as tmp:
        path = synth.synth_cohort(tmp, subjects=subjects, seed=3, shape=(shape,) * 3, workers=1)
        rows = list(csv.DictReader(open(path)))
        base = {r["subject"]: r for r in rows if r["timepoint"] == "baseline"}
        pairs = [(volume_io.read_volume(Path(tmp) / r["path"]), volume_io.read_volume(Path(tmp) / base[r["subject"]]["path"]),
                  parse_transform(r["transform"]), int(r["label"])) for r in rows if r["timepoint"] != "baseline"]
    mov, fix = [p[0] for p in pairs], [p[1] for p in pairs]
    t0 = time.perf_counter()
    ours = align([m.data for m in mov], [f.data for f in fix], [m.affine for m in mov], [f.affine for f in fix], config=AlignConfig(size=64))
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = [sitk_register(m.data, f.data, m.affine, f.affine) for m, f in zip(mov, fix)]
    t_sitk = time.perf_counter() - t0

    def err(est, true, f):
        corners = np.c_[Grid(f.data.shape, f.affine).world_corners(), np.ones(8)].T
        vox = np.linalg.norm((est @ corners - true @ corners)[:3], axis=0).max() / f.spacing.min()
        return synth.rotation_angle_deg(np.linalg.inv(true) @ est), vox

    e_ours = [err(e, p[2], p[1]) for e, p in zip(ours, pairs)]
    e_sitk = [err(e, p[2], p[1]) for e, p in zip(ref, pairs)]
    return {"pairs": len(pairs), "shape": shape, "labels": [p[3] for p in pairs], "ours_s": t_ours, "sitk_s": t_sitk,
            "ours_deg": [e[0] for e in e_ours], "ours_vox": [e[1] for e in e_ours],
            "sitk_deg": [e[0] for e in e_sitk], "sitk_vox": [e[1] for e in e_sitk]}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "loadavg_1min": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--align-subjects", type=int, default=4, help="synthetic pairs for the alignment comparison (0: skip)")
    args = ap.parse_args()
    import numba
    import scipy
    import SimpleITK as sitk
    import torch

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    rows = [bench_case(s, o, args.reps) for s, o in CASES]
    lines = [
        "| case | ours Mvox/s | SciPy | SimpleITK | torch | x SciPy | x SimpleITK | x torch | fused ms | SITK chain ms | fused x chain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['source'][0]}^3 -> {r['output'][0]}^3 | {r['ours_vox_per_s'] / 1e6:.0f} | {r['scipy_vox_per_s'] / 1e6:.0f} | "
            f"{r['sitk_vox_per_s'] / 1e6:.0f} | {r['torch_vox_per_s'] / 1e6:.0f} | {r['ours_vs_scipy']:.2f} | {r['ours_vs_sitk']:.2f} | "
            f"{r['ours_vs_torch']:.2f} | {r['fused_s'] * 1e3:.0f} | {r['sitk_chain_s'] * 1e3:.0f} | {r['fused_vs_sitk_chain']:.2f} |"
        )
    table = "\n".join(lines)
    al = bench_align(args.align_subjects, 64) if args.align_subjects else None
    if al:
        table += (
            f"\n\nRigid alignment, {al['pairs']} synthetic follow-up/baseline pairs at {al['shape']}^3 (labels {al['labels']}; "
            f"progressors' femurs move beyond T): ours (one batch, torch CPU) {al['ours_s']:.1f} s, "
            f"SimpleITK (pair by pair) {al['sitk_s']:.1f} s; max error vs recorded T: ours {max(al['ours_deg']):.2f} deg / "
            f"{max(al['ours_vox']):.2f} voxel, SimpleITK {max(al['sitk_deg']):.2f} deg / {max(al['sitk_vox']):.2f} voxel."
        )
    print(table)
    info = machine()
    now = dt.datetime.now(dt.timezone.utc)
    record = {
        "date": now.isoformat(timespec="seconds"),
        "machine": info,
        "threads": args.threads,
        "versions": {"numba": numba.__version__, "scipy": scipy.__version__, "SimpleITK": sitk.Version_VersionString(),
                     "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "cases": rows,
        "align": al,
    }
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / f"bench_kernels-{now.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    if not args.no_record:
        _append_results(table, record, args)


def _append_results(table: str, record: dict, args) -> None:
    results = HERE / "RESULTS.md"
    head = "" if results.exists() else "# Benchmark results\n"
    m = record["machine"]
    section = (
        f"{head}\n## Kernels, CPU: resampling and fused preprocessing ({record['date']})\n\n"
        f"Command: `python benchmarks/bench_kernels.py --reps {args.reps} --threads {args.threads}`  \n"
        f"Machine: {m['nproc']} cores ({m['cpu']}), 1-min load average at the start {m['loadavg_1min']:.1f} "
        f"(shared machine: absolute figures are depressed, ratios from one run).  \n"
        f"float32, order 1, oblique rotation + scaling; median of {args.reps} after warm-up; "
        f"SciPy single-threaded, the others {args.threads} threads; fused = stats (min, exact p99) + resample + clamp/scale + cast "
        f"into a preallocated buffer, chain = NumPy min/p99 + SimpleITK resample + NumPy clip/scale/cast.\n\n{table}\n"
    )
    with open(results, "a") as f:
        f.write(section)


if __name__ == "__main__":
    main()

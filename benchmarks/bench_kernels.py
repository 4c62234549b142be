"""CPU benchmark of medfeat.kernels against SciPy, SimpleITK and torch, in one run.

Run:  python benchmarks/bench_kernels.py [--reps 9] [--threads 2] [--no-record]

Declared grid: float32 volumes, order 1 (trilinear), an oblique rotation +
scaling about the centres; 160^3 -> 128^3 and 256^3 -> 175^3. Resamplers:
our Numba twin (``affine_transform`` on numpy), ``scipy.ndimage.
affine_transform``, SimpleITK's multi-threaded ``Resample`` (the strongest
CPU peer) and torch ``grid_sample``; all use ``--threads`` threads (SciPy is
single-threaded). Then the fused op (uniGradICON rule: clamp to [min, p99] of
the source, scale to [0, 1], float32 into a preallocated batch buffer) against
the unfused chain SimpleITK resample -> NumPy min/percentile, clip, scale,
cast. Extra rows: order 0 (nearest, as for masks and label maps), ours
against SciPy and SimpleITK's nearest-neighbour ``Resample``.

Timing is interleaved, because on a shared machine the load drifts within a
run: after one warm-up call each, every one of ``--reps`` rounds calls each
method of a case once, in an order rotated by one from round to round. A
method's figure is the median of its per-round times; a speed-up ("x
SimpleITK" = SimpleITK time / ours) is computed within each round, and the
median of those per-round ratios is reported with their min-max. Writes JSON
to benchmarks/results/ and, unless ``--no-record``, appends a section to
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


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Per-method wall times (s) over ``rounds`` rounds; each round calls every method once, rotated.

    Round r starts at method r mod n, so no method always runs first (right
    after another's cache-cold start) or last.
    """
    names = list(fns)
    for name in names:  # warm-up: JIT, thread pools, first-touch of buffers
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def summarise(r: dict, times: dict[str, list[float]], nvox: int, prefix: str = "") -> None:
    """Median time and voxel rate per method into ``r``; per-round speed-ups of the first method over the others.

    ``r[f"{a}_vs_{b}"]`` is the median over rounds of time_b / time_a (above 1:
    ``a`` is faster) and ``r[f"{a}_vs_{b}_range"]`` its [min, max].
    """
    first, *others = times
    for name, ts in times.items():
        r[f"{prefix}{name}_s"] = float(np.median(ts))
        r[f"{prefix}{name}_vox_per_s"] = nvox / r[f"{prefix}{name}_s"]
    r.setdefault(f"{prefix}times_s", {}).update({name: [float(t) for t in ts] for name, ts in times.items()})
    for name in others:
        ratio = np.array(times[name]) / np.array(times[first])
        r[f"{prefix}{first}_vs_{name}"] = float(np.median(ratio))
        r[f"{prefix}{first}_vs_{name}_range"] = [float(ratio.min()), float(ratio.max())]


def index_map(src_shape, out_shape):
    from medfeat.kernels import rigid_matrix

    r = rigid_matrix([0.1, 0.05, -0.08], [0, 0, 0])[:3, :3] * (np.array(src_shape) / np.array(out_shape))
    return r, (np.array(src_shape) - 1) / 2 - r @ ((np.array(out_shape) - 1) / 2)


def sitk_resampler(src, m, off, out_shape, order=1):
    """SimpleITK Resample of the same index map (ITK index order is reversed: x = axis 2)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(src)
    p = np.eye(3)[::-1]
    tx = sitk.AffineTransform(3)
    tx.SetMatrix((p @ m @ p).ravel().tolist())
    tx.SetTranslation((p @ off).tolist())
    ref = sitk.Image([int(s) for s in out_shape[::-1]], sitk.sitkFloat32)
    interp = sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor

    def run():
        return sitk.GetArrayViewFromImage(sitk.Resample(img, ref, tx, interp, 0.0, sitk.sitkFloat32))

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
    """Order-1 resamplers and fused vs chain, interleaved; then order 0 (ours, SciPy, SimpleITK), interleaved."""
    import scipy.ndimage as ndi

    from medfeat.kernels import Grid, IntensityRule, affine_transform, resample_normalise

    src = np.random.default_rng(0).gamma(2.0, 100.0, size=src_shape).astype(np.float32)
    m, off = index_map(src_shape, out_shape)
    nvox = int(np.prod(out_shape))
    out = np.empty(out_shape, np.float32)
    sitk_run = sitk_resampler(src, m, off, out_shape)
    # Fused: one scan, uniGradICON rule, into a preallocated (1, 1, D, H, W) float32 buffer.
    grid = Grid(out_shape, np.vstack([np.hstack([m, off[:, None]]), [0, 0, 0, 1]]))
    buf = np.empty((1, 1, *out_shape), np.float32)

    def unfused():
        lo, hi = float(src.min()), float(np.percentile(src, 99.0))
        res = sitk_run()
        buf[0, 0] = ((np.clip(res, lo, hi) - lo) / (hi - lo)).astype(np.float32)

    r = {"source": list(src_shape), "output": list(out_shape), "rounds": reps}
    times = interleaved({
        "ours": lambda: affine_transform(src, m, off, output_shape=out_shape, output=out),
        "scipy": lambda: ndi.affine_transform(src, m, off, output_shape=out_shape, output=out, order=1),
        "sitk": sitk_run,
        "torch": torch_resampler(src, m, off, out_shape),
        "fused": lambda: resample_normalise([src], [np.eye(4)], grid, buf, rule=IntensityRule()),
        "sitk_chain": unfused,
    }, reps)
    chain = {k: times.pop(k) for k in ("fused", "sitk_chain")}
    summarise(r, times, nvox)
    summarise(r, chain, nvox)
    ours = affine_transform(src, m, off, output_shape=out_shape)
    inner = tuple(slice(8, -8) for _ in out_shape)
    r["max_rel_diff_vs_sitk_interior"] = float(np.abs(ours[inner] - sitk_run()[inner]).max() / np.ptp(src))
    r.update(bench_nearest(src, m, off, out_shape, reps))
    return r


def bench_nearest(src, m, off, out_shape, reps):
    """Order 0 on the same source and map: ours vs SciPy vs SimpleITK nearest neighbour, interleaved."""
    import scipy.ndimage as ndi

    from medfeat.kernels import affine_transform

    out = np.empty(out_shape, np.float32)
    sitk_run = sitk_resampler(src, m, off, out_shape, order=0)
    times = interleaved({
        "ours": lambda: affine_transform(src, m, off, output_shape=out_shape, output=out, order=0),
        "scipy": lambda: ndi.affine_transform(src, m, off, output_shape=out_shape, output=out, order=0),
        "sitk": sitk_run,
    }, reps)
    r: dict = {}
    summarise(r, times, int(np.prod(out_shape)), prefix="nearest_")
    ours = affine_transform(src, m, off, output_shape=out_shape, order=0)
    # Not always 0: this centred map puts the centre voxel on an exact .5 tie, and SciPy (1.17) sums the
    # offset first, ((off + i*m0) + j*m1) + k*m2, ours (and the CUDA twin) last: the sums may differ by an ulp.
    ref = ndi.affine_transform(src, m, off, output_shape=out_shape, order=0)
    r["nearest_voxels_differ_from_scipy"] = int(np.count_nonzero(ours != ref))
    inner = tuple(slice(8, -8) for _ in out_shape)
    # ITK maps through physical space with other float rounding: voxels within rounding of a .5 tie
    # may pick the other neighbour, so a small fraction is expected, not zero.
    r["nearest_frac_differs_from_sitk_interior"] = float(np.mean(ours[inner] != sitk_run()[inner]))
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

    from medfeat.cohorts import synth
    from medfeat.io import nifti as volume_io
    from medfeat.io.manifest import parse_transform
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


def _ratio(r: dict, key: str) -> str:
    """'median (min-max)' of a per-round speed-up."""
    lo, hi = r[f"{key}_range"]
    return f"{r[key]:.2f} ({lo:.2f}-{hi:.2f})"


def format_table(rows: list[dict]) -> str:
    """Markdown: the order-1 table (same columns as earlier sections; ratios now 'median (min-max)' over rounds), then order 0."""
    lines = [
        "| case | ours Mvox/s | SciPy | SimpleITK | torch | x SciPy | x SimpleITK | x torch | fused ms | SITK chain ms | fused x chain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['source'][0]}^3 -> {r['output'][0]}^3 | {r['ours_vox_per_s'] / 1e6:.0f} | {r['scipy_vox_per_s'] / 1e6:.0f} | "
            f"{r['sitk_vox_per_s'] / 1e6:.0f} | {r['torch_vox_per_s'] / 1e6:.0f} | {_ratio(r, 'ours_vs_scipy')} | "
            f"{_ratio(r, 'ours_vs_sitk')} | {_ratio(r, 'ours_vs_torch')} | {r['fused_s'] * 1e3:.0f} | "
            f"{r['sitk_chain_s'] * 1e3:.0f} | {_ratio(r, 'fused_vs_sitk_chain')} |"
        )
    lines += [
        "",
        "| case, order 0 (nearest) | ours Mvox/s | SciPy | SimpleITK | x SciPy | x SimpleITK | voxels differing from SciPy | differing from SimpleITK (interior) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['source'][0]}^3 -> {r['output'][0]}^3 | {r['nearest_ours_vox_per_s'] / 1e6:.0f} | "
            f"{r['nearest_scipy_vox_per_s'] / 1e6:.0f} | {r['nearest_sitk_vox_per_s'] / 1e6:.0f} | "
            f"{_ratio(r, 'nearest_ours_vs_scipy')} | {_ratio(r, 'nearest_ours_vs_sitk')} | "
            f"{r['nearest_voxels_differ_from_scipy']} of {int(np.prod(r['output']))} | "
            f"{100 * r['nearest_frac_differs_from_sitk_interior']:.3f}% of voxels |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9, help="interleaved timing rounds")
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
    load_start = os.getloadavg()[0]
    rows = [bench_case(s, o, args.reps) for s, o in CASES]
    load_end = os.getloadavg()[0]
    table = format_table(rows)
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
    info.update(loadavg_1min=load_start, loadavg_1min_end=load_end)  # around the resampling cases
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
    record["file"] = path.name
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
        f"Machine: {m['nproc']} cores ({m['cpu']}), 1-min load average {m['loadavg_1min']:.1f} at the start, "
        f"{m['loadavg_1min_end']:.1f} at the end (shared machine: absolute figures are depressed).  \n"
        f"float32, oblique rotation + scaling; order 1 (first table) and order 0 (second); timed interleaved: "
        f"after a warm-up, {args.reps} rounds each calling every method of a case once, in a rotated order; "
        f"Mvox/s and ms from the median per-round time; speed-ups (x SciPy = SciPy time / ours) computed within "
        f"each round, median (min-max) over the rounds. "
        f"SciPy single-threaded, the others {args.threads} threads; fused = stats (min, exact p99) + resample + clamp/scale + cast "
        f"into a preallocated buffer, chain = NumPy min/p99 + SimpleITK resample + NumPy clip/scale/cast. "
        f"Raw: `benchmarks/results/{record['file']}`.\n\n{table}\n"
    )
    with open(results, "a") as f:
        f.write(section)


if __name__ == "__main__":
    main()

"""GPU benchmark of medfeat.kernels: CuPy kernel vs cupyx.scipy.ndimage and torch grid_sample.

Run on a CUDA machine:  python benchmarks/gpu_kernels.py [--reps 20] [--batch 8]

Declared grid: float32 volumes, order 1, an oblique rotation + scaling,
160^3 -> 128^3 and 256^3 -> 175^3. For each: our ``affine_transform`` on
cupy arrays, ``cupyx.scipy.ndimage.affine_transform`` and torch
``affine_grid`` + ``grid_sample`` (align_corners=True); then the fused op
(batch of scans, uniGradICON rule, bf16 output buffer) with and without its
statistics pass. Achieved bandwidth = (source bytes read once + output bytes
written) / time, as a fraction of the device copy bandwidth measured here
(device-to-device copy of 1 GiB: 2 bytes moved per byte copied).
Timings are CUDA-event timed after warm-up; prints a table, writes JSON to
benchmarks/results/gpu_kernels-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

import numpy as np

CASES = [((160, 160, 160), (128, 128, 128)), ((256, 256, 256), (175, 175, 175))]


def _time(fn, reps: int) -> float:
    """Median seconds per call, CUDA events, after 3 warm-up calls."""
    import cupy as cp

    for _ in range(3):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def copy_bandwidth(reps: int) -> float:
    """Device copy bandwidth, bytes/s (read + write of a 1 GiB buffer)."""
    import cupy as cp

    a = cp.empty(1 << 28, cp.float32)
    b = cp.empty_like(a)
    t = _time(lambda: cp.copyto(b, a), reps)
    return 2 * a.nbytes / t


def index_map(src_shape, out_shape):
    """Oblique rotation + scaling about the centres, in index space."""
    from medfeat.kernels import rigid_matrix

    r = rigid_matrix([0.1, 0.05, -0.08], [0, 0, 0])[:3, :3] * (np.array(src_shape) / np.array(out_shape))
    c_in = (np.array(src_shape) - 1) / 2
    c_out = (np.array(out_shape) - 1) / 2
    return r, c_in - r @ c_out


def torch_theta(m, off, src_shape, out_shape):
    """grid_sample theta (align_corners=True, xyz order) of an index map."""

    def norm(shape):
        p = np.zeros((4, 4))
        for row, axis in enumerate((2, 1, 0)):
            p[row, axis] = 2.0 / (shape[axis] - 1)
            p[row, 3] = -1.0
        p[3, 3] = 1.0
        return p

    h = np.eye(4)
    h[:3, :3], h[:3, 3] = m, off
    return (norm(src_shape) @ h @ np.linalg.inv(norm(out_shape)))[:3]


def bench_case(src_shape, out_shape, reps, batch, bw):
    import cupy as cp
    import torch
    from cupyx.scipy import ndimage as cndi

    from medfeat.kernels import Grid, IntensityRule, _gpu, affine_transform, resample_normalise
    from medfeat.kernels.fused import launch_gpu

    rng = np.random.default_rng(0)
    src = cp.asarray(rng.gamma(2.0, 100.0, size=src_shape).astype(np.float32))
    m, off = index_map(src_shape, out_shape)
    nvox = int(np.prod(out_shape))
    res = {"source": list(src_shape), "output": list(out_shape)}
    out = cp.empty(out_shape, cp.float32)
    res["ours_s"] = _time(lambda: affine_transform(src, m, off, output_shape=out_shape, output=out), reps)
    # The kernel alone: the public call adds argument checks, a NaN/Inf scan of the source and a sync.
    res["ours_kernel_s"] = _time(lambda: _gpu.affine3d(src, m, off, out, 1, 0, 0.0), reps)
    cm = cp.asarray(m)
    res["cupyx_s"] = _time(lambda: cndi.affine_transform(src, cm, off, output_shape=out_shape, output=out, order=1), reps)
    ts = torch.from_dlpack(src)[None, None]
    theta = torch.tensor(torch_theta(m, off, src_shape, out_shape), dtype=torch.float32, device="cuda")[None]

    def grid_sample():
        g = torch.nn.functional.affine_grid(theta, [1, 1, *out_shape], align_corners=True)
        return torch.nn.functional.grid_sample(ts, g, mode="bilinear", padding_mode="zeros", align_corners=True)

    res["torch_s"] = _time(grid_sample, reps)
    diff = float(cp.abs(affine_transform(src, m, off, output_shape=out_shape) - cndi.affine_transform(src, cm, off, output_shape=out_shape, order=1)).max())
    res["max_abs_diff_vs_cupyx"] = diff
    # Fused batch: B scans -> (B, 1, D, H, W) bf16, uniGradICON rule.
    vols = [src] * batch
    aff = np.eye(4)
    grid = Grid(out_shape, np.vstack([np.hstack([m, off[:, None]]), [0, 0, 0, 1]]))
    buf = torch.empty((batch, 1, *out_shape), dtype=torch.bfloat16, device="cuda")
    rule = IntensityRule()
    res["fused_total_s"] = _time(lambda: resample_normalise(vols, [aff] * batch, grid, buf, rule=rule), max(3, reps // 4))
    mats = np.tile(np.hstack([m, off[:, None]]).ravel(), (batch, 1))
    params = np.tile([0.0, 500.0, 0.0, 1 / 500.0, 0.0], (batch, 1))
    res["fused_kernel_s"] = _time(lambda: launch_gpu(vols, mats, params, buf, "bfloat16", tuple(buf.shape), 0, 1, 0), reps)
    bytes_plain = src.nbytes + nvox * 4
    bytes_fused = batch * (src.nbytes + nvox * 2)
    res["ours_vox_per_s"] = nvox / res["ours_s"]
    res["ours_kernel_vox_per_s"] = nvox / res["ours_kernel_s"]
    res["kernel_speedup_vs_cupyx"] = res["cupyx_s"] / res["ours_kernel_s"]
    res["ours_kernel_bw_fraction"] = bytes_plain / res["ours_kernel_s"] / bw
    res["cupyx_vox_per_s"] = nvox / res["cupyx_s"]
    res["torch_vox_per_s"] = nvox / res["torch_s"]
    res["speedup_vs_cupyx"] = res["cupyx_s"] / res["ours_s"]
    res["speedup_vs_torch"] = res["torch_s"] / res["ours_s"]
    res["ours_bw_fraction"] = bytes_plain / res["ours_s"] / bw
    res["fused_kernel_bw_fraction"] = bytes_fused / res["fused_kernel_s"] / bw
    res["fused_vs_cupyx_per_volume"] = res["cupyx_s"] / (res["fused_kernel_s"] / batch)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    import cupy as cp
    import torch

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    bw = copy_bandwidth(args.reps)
    rows = [bench_case(s, o, args.reps, args.batch, bw) for s, o in CASES]
    print(f"device: {props['name'].decode()}  copy bandwidth: {bw / 1e9:.0f} GB/s")
    print(f"{'case':>18} {'ours Mvox/s':>12} {'kernel':>9} {'cupyx':>9} {'torch':>9} {'x cupyx':>8} {'kern x cupyx':>12} {'x torch':>8} {'BW kernel':>9} {'fused ms/B':>10} {'BW fused':>9} {'fused x cupyx':>13} {'fused+stats ms/B':>17}")
    for r in rows:
        case = f"{r['source'][0]}^3->{r['output'][0]}^3"
        print(
            f"{case:>18} {r['ours_vox_per_s'] / 1e6:12.0f} {r['ours_kernel_vox_per_s'] / 1e6:9.0f} {r['cupyx_vox_per_s'] / 1e6:9.0f} "
            f"{r['torch_vox_per_s'] / 1e6:9.0f} {r['speedup_vs_cupyx']:8.2f} {r['kernel_speedup_vs_cupyx']:12.2f} {r['speedup_vs_torch']:8.2f} "
            f"{r['ours_kernel_bw_fraction']:9.0%} {r['fused_kernel_s'] / args.batch * 1e3:10.3f} {r['fused_kernel_bw_fraction']:9.0%} "
            f"{r['fused_vs_cupyx_per_volume']:13.2f} {r['fused_total_s'] / args.batch * 1e3:17.3f}"
        )
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": props["name"].decode(),
        "copy_bandwidth_bytes_per_s": bw,
        "batch": args.batch,
        "versions": {"cupy": cp.__version__, "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "cases": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_kernels-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

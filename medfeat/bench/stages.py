"""Benchmark stages: each times one stage of the pipeline and its peers on one input.

A stage function takes a :class:`StageCase` and the machine limits, and returns rows
(dicts): ``stage``, ``impl`` (the implementation or peer), ``case`` (size, model, batch),
``seconds`` (median), ``spread``, ``items_per_s``, and, where they apply, ``bytes`` moved
(each input read once, each output written once) and counted ``flops``, with
``fraction`` = achieved rate over the machine's limit for that resource.
"""
from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import numpy as np
import torch

from medfeat.bench.harness import Timing, time_call, timing_of

Row = dict[str, Any]


@dataclass(frozen=True)
class StageCase:
    """One cell of the grid: a stage with its sizes, model, batch, runtime and precision."""

    stage: str
    size: tuple[int, ...] = ()
    out_size: tuple[int, ...] = ()
    model: str | None = None
    batch: int = 1
    runtimes: tuple[str, ...] = ("eager",)
    precision: str = "fp32"
    tiny: bool = False
    repeats: int = 3
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


def _row(case: StageCase, impl: str, timing: Timing, items: int, *, nbytes: float | None = None,
         flops: float | None = None, limits: dict[str, float] | None = None, **extra: Any) -> Row:
    row: Row = {"stage": case.stage, "impl": impl, "size": "x".join(map(str, case.size)),
                "out_size": "x".join(map(str, case.out_size)), "model": case.model or "",
                "batch": case.batch, "precision": case.precision, "device": case.device,
                "seconds": timing.median_s, "spread": timing.spread, "repeats": timing.repeats,
                "items_per_s": items / timing.median_s, **extra}
    limits = limits or {}
    if nbytes is not None:
        row["bytes_per_s"] = nbytes / timing.median_s
        if "copy_bytes_per_s" in limits:
            row["fraction"] = row["bytes_per_s"] / limits["copy_bytes_per_s"]
    if flops is not None:
        row["flops"] = flops
        row["flops_per_s"] = flops / timing.median_s
        rate = limits.get("matmul_bf16_flops" if case.precision in ("bf16", "fp16") else "matmul_fp32_flops")
        if rate:
            row["fraction"] = row["flops_per_s"] / rate
    return row


def _shape3(size: tuple[int, ...]) -> tuple[int, int, int]:
    """A case's 3D size as the three ints it is."""
    d, h, w = size
    return d, h, w


def _random_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random(shape, dtype=np.float32) * 1000.0


def _oblique_matrix(src: tuple[int, ...], dst: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Index map dst -> src: scale to cover the source, a 5 degree rotation about its centre."""
    scale = np.array(src, float) / np.array(dst, float)
    a = np.deg2rad(5.0)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    m = rot @ np.diag(scale)
    centre_src = (np.array(src) - 1) / 2
    centre_dst = (np.array(dst) - 1) / 2
    return m, centre_src - m @ centre_dst


def stage_resample(case: StageCase, limits: dict[str, float]) -> list[Row]:
    """Order-1 affine resampling: medfeat kernel vs scipy, torch grid_sample, SimpleITK (cupyx on GPU)."""
    from medfeat.kernels import affine_transform

    src = _random_volume(case.size)
    m, off = _oblique_matrix(case.size, case.out_size)
    nbytes = 4.0 * (np.prod(case.size) + np.prod(case.out_size))
    vox = float(np.prod(case.out_size))
    impls: dict[str, Callable[[], object]] = {}
    device = case.device
    if device == "cpu":
        import scipy.ndimage as ndi

        impls["medfeat"] = lambda: affine_transform(src, m, off, case.out_size, order=1)
        impls["scipy"] = lambda: ndi.affine_transform(src, m, off, case.out_size, order=1)
        if importlib.util.find_spec("SimpleITK"):
            impls["simpleitk"] = _sitk_resampler(src, m, off, case.out_size)
    else:
        import cupy as cp
        import cupyx.scipy.ndimage as cndi

        src_d = cp.asarray(src)
        impls["medfeat"] = lambda: affine_transform(src_d, m, off, case.out_size, order=1)
        impls["cupyx"] = lambda: cndi.affine_transform(src_d, cp.asarray(m), cp.asarray(off), case.out_size, order=1)
    impls["torch_grid_sample"] = _grid_sample_call(src, m, off, case.out_size, device)
    rows = []
    for name, fn in impls.items():
        t = time_call(fn, warmup=1, repeats=case.repeats, device=device)
        rows.append(_row(case, name, t, 1, nbytes=nbytes, limits=limits, mvox_per_s=vox / t.median_s / 1e6))
    return _ratios(rows, "medfeat")


def _grid_sample_call(src: np.ndarray, m: np.ndarray, off: np.ndarray, out_shape: tuple[int, ...],
                      device: str) -> Callable[[], torch.Tensor]:
    """torch grid_sample with the same index map (align_corners=True normalised coordinates)."""
    import torch.nn.functional as F

    x = torch.from_numpy(src)[None, None].to(device)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), -1).reshape(-1, 3)
    coords = idx @ m.T + off  # source index (d, h, w)
    norm = 2 * coords / (np.array(src.shape) - 1) - 1
    grid = torch.from_numpy(norm[:, ::-1].copy().astype(np.float32)).reshape(1, *out_shape, 3).to(device)
    return lambda: F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _sitk_resampler(src: np.ndarray, m: np.ndarray, off: np.ndarray, out_shape: tuple[int, ...]
                    ) -> Callable[[], np.ndarray]:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(src)  # SimpleITK index order is (x, y, z) = reversed numpy axes
    tf = sitk.AffineTransform(3)
    tf.SetMatrix(m[::-1, ::-1].ravel().tolist())
    tf.SetTranslation(off[::-1].tolist())
    ref = sitk.Image([int(s) for s in out_shape[::-1]], sitk.sitkFloat32)

    def run() -> np.ndarray:
        return sitk.GetArrayViewFromImage(sitk.Resample(image, ref, tf, sitk.sitkLinear, 0.0))

    return run


def stage_fused(case: StageCase, limits: dict[str, float]) -> list[Row]:
    """Fused resample + percentile clamp + scale + cast into a batch buffer, vs the unfused chain
    (SciPy on the CPU, cupyx on CUDA: resample, then min / p99, clamp, scale, cast)."""
    from medfeat.kernels import Grid, IntensityRule, resample_normalise

    cpu = case.device == "cpu"
    xp: ModuleType  # numpy or cupy
    if cpu:
        import scipy.ndimage as ndi
        xp = np
    else:
        import cupy
        import cupyx.scipy.ndimage as ndi
        xp = cupy
    vols = [xp.asarray(_random_volume(case.size, seed=i)) for i in range(case.batch)]
    grid = Grid(_shape3(case.out_size), np.diag([*(np.array(case.size) / np.array(case.out_size)), 1.0]))
    out = xp.empty((case.batch, 1, *case.out_size), xp.float32)
    rule = IntensityRule()
    fused = time_call(lambda: resample_normalise(vols, [np.eye(4)] * case.batch, grid, out, rule=rule),
                      warmup=1, repeats=case.repeats, device=case.device)
    nbytes = 4.0 * case.batch * (np.prod(case.size) * 2 + np.prod(case.out_size))  # percentile pass + sample
    m = xp.asarray(np.diag(np.array(case.size) / np.array(case.out_size)))

    def chain() -> None:
        for b, v in enumerate(vols):
            r = ndi.affine_transform(v, m, 0.0, tuple(case.out_size), order=1)
            lo, hi = v.min(), xp.percentile(v, 99.0)
            out[b, 0] = ((xp.clip(r, lo, hi) - lo) / (hi - lo)).astype(xp.float32)

    chained = time_call(chain, warmup=1, repeats=case.repeats, device=case.device)
    rows = [_row(case, "medfeat_fused", fused, case.batch, nbytes=nbytes, limits=limits),
            _row(case, "scipy_chain" if cpu else "cupyx_chain", chained, case.batch, nbytes=nbytes, limits=limits)]
    return _ratios(rows, "medfeat_fused")


def stage_infer(case: StageCase, limits: dict[str, float]) -> list[Row]:
    """Model inference per runtime on one batch; counted FLOPs over the matrix rate."""
    from medfeat.export.backbones.flops import model_flops
    from medfeat.export.backbones.registry import create_backbone, get_spec
    from medfeat.export.runtimes.factory import make_runtime

    spec = get_spec(case.model or "")
    taps = case.extra.get("taps") or [spec.tap_table(**(spec.tiny_config if case.tiny else {}))[-1].name]
    rows = []
    for runtime in case.runtimes:
        backbone = create_backbone(case.model or "", taps, tiny=case.tiny)
        size = tuple(case.size) or tuple(spec.input_size)
        x = torch.randn(case.batch, spec.in_channels, *size)
        flops = model_flops(backbone, x)
        try:
            run = make_runtime(backbone, runtime, device=case.device, precision=case.precision, input_size=size)
        except Exception as exc:  # noqa: BLE001 - a missing runtime is a row, not a crash
            rows.append({"stage": case.stage, "impl": runtime, "model": case.model, "error": str(exc)[:200]})
            continue
        t = time_call(partial(run, x), warmup=1, repeats=case.repeats, device=case.device)
        rows.append(_row(case, runtime, t, case.batch, flops=flops, limits=limits, taps=",".join(taps)))
    return _ratios(rows, "eager")


def stage_store_write(case: StageCase, limits: dict[str, float]) -> list[Row]:
    """Feature store writes of (items, dim) float32 rows in whole chunks."""
    from medfeat.engine.store.feature_store import ArrayKey, FeatureStore

    n, dim = case.size
    rows_data = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        counter = [0]

        def write() -> None:
            counter[0] += 1
            store = FeatureStore.create(Path(tmp) / f"s{counter[0]}.zarr", chunk_items=min(n, 256))
            idx = store.add_items([{"item_id": f"i{i}"} for i in range(n)])
            key = ArrayKey("bench", "tap", "v")
            store.ensure_array(key, dim, {"model": "bench"})
            store.write(key, idx, rows_data)

        t = time_call(write, warmup=0, repeats=case.repeats)
    return [_row(case, "zarr_store", t, n, nbytes=float(rows_data.nbytes), limits=limits)]


def stage_read(case: StageCase, limits: dict[str, float]) -> list[Row]:
    """Reading one scan: NIfTI (gzip decode) vs a Zarr v3 array (zstd chunks)."""
    import nibabel as nib
    import zarr

    vol = _random_volume(case.size).astype(np.int16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        nii = Path(tmp) / "v.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.eye(4)), nii)
        arr = zarr.create_array(str(Path(tmp) / "v.zarr"), shape=vol.shape, dtype=vol.dtype,
                                chunks=tuple(min(64, s) for s in vol.shape))
        arr[:] = vol
        readers = {"nifti_gz": lambda: np.asanyarray(cast(nib.Nifti1Image, nib.load(nii)).dataobj),
                   "zarr_v3": lambda: zarr.open_array(str(Path(tmp) / "v.zarr"), mode="r")[:]}
        for name, fn in readers.items():
            t = time_call(fn, warmup=1, repeats=case.repeats)
            rows.append(_row(case, name, t, 1, nbytes=float(vol.nbytes), limits=limits))
    return rows


def stage_probe_fit(case: StageCase, limits: dict[str, float]) -> list[Row]:
    """Linear-probe cross-validation on (n, dim) features."""
    from medfeat.probes.evaluate import cross_validate_probe

    n, dim = case.size
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, dim)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.standard_normal(n) > 0).astype(int)
    t = time_call(lambda: cross_validate_probe(X, y, n_splits=case.extra.get("folds", 3), seeds=(0,), n_boot=0),
                  warmup=0, repeats=1)
    return [_row(case, "linear_probe_cv", t, n)]


def stage_pipeline(case: StageCase, limits: dict[str, float]) -> list[Row]:
    """The extraction pipeline against a sequential loop on a small synthetic cohort.

    ``size`` is the scans' (D, H, W), ``out_size`` the model input (empty: the model's own);
    extras: ``subjects`` (2 scans each), ``taps``, ``schedulers`` (``kind:workers``),
    ``threads`` per worker, ``memory_limit`` per Dask worker. Rows: ``sequential`` (batch 1,
    nothing overlapped); per scheduler ``pipeline[s]`` with ``ratio_to_sequential``, the
    ``efficiency`` (items/s over the slowest stage's items/s alone), ``slowest_stage`` and
    ``alone_items_per_s``; and one ``<stage> alone[s]`` row per stage (read, preprocess,
    infer, write), each run alone on the pipeline's own executor (see
    :mod:`medfeat.bench.pipeline`).
    """
    from medfeat.bench import pipeline as bp
    from medfeat.cohorts.synth import synth_cohort
    from medfeat.engine.pipeline.worker import clear_models
    from medfeat.export.backbones.registry import get_spec

    spec = get_spec(case.model or "unet3d")
    taps = tuple(case.extra.get("taps") or (spec.tap_table(**(spec.tiny_config if case.tiny else {}))[-1].name,))
    kinds = bp.parse_kinds(case.extra.get("schedulers") or ("threads:1",))
    cfg = bp.PipelineBenchConfig(model=spec.name, taps=taps, tiny=case.tiny, device=case.device,
                                 input_size=tuple(case.out_size) or None, batch=case.batch,
                                 threads=int(case.extra.get("threads", 2)),
                                 memory_limit=case.extra.get("memory_limit"), repeats=case.repeats)
    with tempfile.TemporaryDirectory(prefix="medfeat_bench_pipeline_") as tmp:
        manifest = synth_cohort(Path(tmp) / "cohort", subjects=int(case.extra.get("subjects", 6)), seed=0,
                                shape=_shape3(case.size) if case.size else (64, 64, 64))
        try:
            result = bp.compare(manifest, Path(tmp), cfg, kinds)
        finally:
            clear_models()  # the benchmark's models are not needed after it (GPU memory)
    return _pipeline_rows(case, result, taps)


def _pipeline_rows(case: StageCase, result: dict[str, Any], taps: tuple[str, ...]) -> list[Row]:
    seq = result["sequential"]
    common = {"taps": ",".join(taps), "scans": seq["items"]}
    rows = [_row(case, "sequential", timing_of([seq["wall_s"]]), seq["items"], role="sequential",
                 ratio_to_sequential=1.0, stage_s=seq["stage_s"], torch_threads=seq["torch_threads"], **common)]
    rows[0]["batch"] = 1  # the loop's model calls take one item each
    for p in result["pipeline"]:
        sched = f"{p['kind']}:{p['workers']}"
        n = p["items"]
        keep = ("efficiency", "slowest_stage", "alone_items_per_s", "time_sharing_items_per_s",
                "infer_busy_fraction", "peak_rss_driver_mib", "peak_rss_worker_mib", "threads_per_worker",
                "torch_threads", "failed")
        rows.append(_row(case, f"pipeline[{sched}]", timing_of([n / r for r in p["items_per_s_samples"]]), n,
                         role="pipeline", scheduler=sched, ratio_to_sequential=p["ratio_vs_sequential"],
                         **{k: p[k] for k in keep}, **common))
        # items/s: the median of the rates, the figure efficiency is computed from (with an even
        # number of repeats it differs a little from items over the median seconds)
        rows[-1]["items_per_s"] = p["items_per_s"]
        for stage, samples in p["alone_samples"].items():
            rows.append(_row(case, f"{stage} alone[{sched}]", timing_of([n / r for r in samples]), n,
                             role="alone", scheduler=sched, slowest=stage == p["slowest_stage"], **common))
            rows[-1]["items_per_s"] = p["alone_items_per_s"][stage]
    return rows


STAGES: dict[str, Callable[[StageCase, dict[str, float]], list[Row]]] = {
    "read": stage_read,
    "resample": stage_resample,
    "fused": stage_fused,
    "infer": stage_infer,
    "store_write": stage_store_write,
    "probe_fit": stage_probe_fit,
    "pipeline": stage_pipeline,
}


def _ratios(rows: list[Row], base: str) -> list[Row]:
    """Add ``speedup_vs_<base>``-style ratio: every row's throughput over the base's."""
    ref = next((r for r in rows if r.get("impl") == base and "items_per_s" in r), None)
    if ref is None:
        return rows
    for r in rows:
        if "items_per_s" in r:
            r["ratio_to_" + base] = r["items_per_s"] / ref["items_per_s"]
    return rows

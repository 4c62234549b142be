"""medfeat side by side with the tools a researcher would otherwise use, in one run.

* **pipeline**: ``medfeat extract`` with its defaults (scheduler ``auto``, runtime ``auto``)
  against the script a researcher writes from MONAI's tutorials: ``LoadImaged``,
  ``EnsureChannelFirstd``, ``Orientationd("RAS")``, ``ScaleIntensityRangePercentilesd(0, 99,
  0, 1, clip)``, ``Resized(trilinear)``, a ``monai.data.DataLoader`` with 2 workers, the same
  backbone built through medfeat's registry, the backbone's own pooling, Zarr writes. Both
  run as fresh processes (imports, model build and all), in rotated order, ``--repeats``
  times; the wall time and the peak RSS of each process tree (summed over its processes,
  sampled every 0.1 s) are reported, and the two feature matrices are compared (they must
  agree to float32 rounding: the synthetic scans are near-RAS, so both resample the same
  voxel grid). Models: the task UNet (cheap, 64^3) and the SwinUNETR encoder (96^3).
* **probe**: ``cross_validate_probe`` (5-fold grouped CV, C tuned by inner grouped CV)
  against scikit-learn's ``LogisticRegressionCV`` (same folds, same C grid, lbfgs), on
  ``--probe-items`` x ``--probe-dim`` learnable random features; time ratio and AUC of both.
* **align**: ``benchmarks/bench_align.py`` covers medfeat against SimpleITK.

    python benchmarks/bench_peers.py                 # full sizes (JSON in benchmarks/results/)
    python benchmarks/bench_peers.py --quick         # tiny sizes: checks that it runs
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = {  # model -> (tap, input edge, tiny config)
    "unet3d": ("bottom", 64, False),
    "swin_unetr_encoder": ("swinViT.4", 96, False),
}


# -- the MONAI tutorial script (run in its own process) -------------------------------------
def monai_script(manifest: str, out: str, model: str, tap: str, size: int, tiny: bool, batch: int) -> None:
    """Extract ``model``'s pooled ``tap`` for every scan of ``manifest`` the MONAI way."""
    import pandas as pd
    import torch
    import zarr
    from monai.data import DataLoader, Dataset
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        Resized,
        ScaleIntensityRangePercentilesd,
    )

    from medfeat.export.backbones.registry import create_backbone

    root = Path(manifest).parent
    rows = pd.read_csv(manifest)
    files = [{"image": str(root / p), "id": f"{s}/{t}"} for s, t, p in zip(rows["subject"], rows["timepoint"], rows["path"])]
    transform = Compose([
        LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        ScaleIntensityRangePercentilesd(keys="image", lower=0, upper=99, b_min=0.0, b_max=1.0, clip=True),
        Resized(keys="image", spatial_size=(size,) * 3, mode="trilinear", align_corners=False),
    ])
    loader = DataLoader(Dataset(files, transform), batch_size=batch, num_workers=2)
    backbone = create_backbone(model, [tap], tiny=tiny).eval()
    dim = backbone.output_dims()[tap]
    store = zarr.open_group(out, mode="w", zarr_format=3)
    feats = store.create_array("features", shape=(len(files), dim), chunks=(64, dim), dtype="float32")
    ids: list[str] = []
    with torch.inference_mode():
        for batch_data in loader:
            x = batch_data["image"].as_tensor().float()
            feats[len(ids): len(ids) + len(x)] = backbone(x)[tap].numpy()
            ids += list(batch_data["id"])
    store.attrs["ids"] = ids


# -- timing whole processes -----------------------------------------------------------------
def _tree_rss(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**30


def run_process(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall seconds and peak RSS (GiB, summed over the process tree) of ``cmd``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{out[-2000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss_gib": peak[0]}


def _features_medfeat(store: Path, model: str, tap: str) -> tuple[list[str], np.ndarray]:
    from medfeat.engine.store.feature_store import FeatureStore

    return FeatureStore.open(store).read(f"{model}:{tap}:none-whole")


def _features_monai(store: Path) -> tuple[list[str], np.ndarray]:
    import zarr

    group = zarr.open_group(str(store), mode="r")
    return list(group.attrs["ids"]), np.asarray(group["features"][:])


def pipeline(manifest: Path, work: Path, model: str, repeats: int, batch: int) -> dict:
    tap, size, tiny = MODELS[model]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "MEDFEAT_CACHE": str(work / "cache")}
    common = ["--manifest", str(manifest), "--model", model, "--taps", tap, "--random-init", "--quiet",
              "--input-size", f"{size},{size},{size}", "--batch-size", str(batch)] + (["--tiny"] if tiny else [])

    def medfeat_cmd(store: Path) -> list[str]:
        return [sys.executable, "-m", "medfeat", "extract", "--store", str(store), *common]

    def monai_cmd(store: Path) -> list[str]:
        return [sys.executable, str(Path(__file__)), "--role", "monai", "--manifest", str(manifest), "--out",
                str(store), "--model", model, "--batch", str(batch)]

    # one untimed medfeat run measures the runtimes once (cached, as a user's first run would)
    run_process(medfeat_cmd(work / f"warm_{model}.zarr"), env)
    runs: dict[str, list[dict]] = {"medfeat": [], "monai": []}
    for rep in range(repeats):
        order = ["medfeat", "monai"] if rep % 2 == 0 else ["monai", "medfeat"]
        for who in order:
            store = work / f"{who}_{model}_{rep}.zarr"
            runs[who].append(run_process(medfeat_cmd(store) if who == "medfeat" else monai_cmd(store), env))
    ids_a, a = _features_medfeat(work / f"medfeat_{model}_0.zarr", model, tap)
    ids_b, b = _features_monai(work / f"monai_{model}_0.zarr")
    b = b[[ids_b.index(i) for i in ids_a]]
    rel = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
    med = {w: {k: median(r[k] for r in rs) for k in ("wall_s", "peak_rss_gib")} for w, rs in runs.items()}
    return {"model": model, "tap": tap, "input": size, "items": len(ids_a), "runs": runs, "median": med,
            "speedup_vs_monai": med["monai"]["wall_s"] / med["medfeat"]["wall_s"],
            "memory_vs_monai": med["medfeat"]["peak_rss_gib"] / med["monai"]["peak_rss_gib"],
            "features_max_rel_diff": rel}


# -- probes ---------------------------------------------------------------------------------
def probe(items: int, dim: int, repeats: int) -> dict:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medfeat.probes.evaluate import cross_validate_probe
    from medfeat.probes.splits import C_GRID, grouped_kfold

    sys.path.insert(0, str(HERE))
    from bench_probe import make_data

    X, y, groups = make_data(items, dim)
    folds = grouped_kfold(y, groups, 5, 0)

    def ours() -> float:
        res = cross_validate_probe(X, y, groups, n_splits=5, seeds=(0,), n_boot=0)
        return float(res.metrics["auc"]["value"])

    def sklearn() -> float:
        import warnings

        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.8's notices of 1.10's changes
        scores = np.zeros(len(y))
        for train, test in folds:
            inner = list(grouped_kfold(y[train], groups[train], 3, 0))
            cv = LogisticRegressionCV(Cs=list(C_GRID), cv=inner, max_iter=1000, scoring="neg_log_loss")
            model = make_pipeline(StandardScaler(), cv).fit(X[train], y[train])
            scores[test] = model.predict_proba(X[test])[:, 1]
        return float(roc_auc_score(y, scores))

    times: dict[str, list[float]] = {"medfeat": [], "sklearn": []}
    aucs: dict[str, float] = {}
    for rep in range(repeats):
        for who in (["medfeat", "sklearn"] if rep % 2 == 0 else ["sklearn", "medfeat"]):
            t0 = time.perf_counter()
            aucs[who] = ours() if who == "medfeat" else sklearn()
            times[who].append(time.perf_counter() - t0)
    med = {k: median(v) for k, v in times.items()}
    return {"items": items, "dim": dim, "seconds": times, "median_s": med, "auc": aucs,
            "speedup_vs_sklearn": med["sklearn"] / med["medfeat"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["driver", "monai"], default="driver")
    ap.add_argument("--manifest")
    ap.add_argument("--out")
    ap.add_argument("--model", default="unet3d")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--scans", type=int, default=48, help="scans of the cheap model's cohort (2 per subject)")
    ap.add_argument("--swin-scans", type=int, default=12)
    ap.add_argument("--shape", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--probe-items", type=int, default=100_000)
    ap.add_argument("--probe-dim", type=int, default=1024)
    ap.add_argument("--parts", default="pipeline,probe")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that everything runs")
    ap.add_argument("--json", default=str(HERE / "results" / "bench_peers.json"))
    args = ap.parse_args()
    if args.role == "monai":
        tap, size, tiny = MODELS[args.model]
        monai_script(args.manifest, args.out, args.model, tap, size, tiny, args.batch)
        return
    if args.quick:
        args.scans, args.swin_scans, args.shape, args.repeats = 4, 2, 48, 1
        args.probe_items, args.probe_dim = 2000, 32
    result: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "load_average_start": os.getloadavg(), "args": vars(args)}
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "pipeline" in parts:
            from medfeat.cohorts.synth import synth_cohort

            result["pipeline"] = []
            for model, n in (("unet3d", args.scans), ("swin_unetr_encoder", args.swin_scans)):
                manifest = synth_cohort(work / f"cohort_{n}", subjects=max(1, n // 2), seed=0,
                                        shape=(args.shape,) * 3)
                result["pipeline"].append(pipeline(manifest, work, model, args.repeats, args.batch))
        if "probe" in parts:
            result["probe"] = probe(args.probe_items, args.probe_dim, max(1, args.repeats // 2 + 1))
    result["load_average_end"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = []
    for p in r.get("pipeline", []):
        m = p["median"]
        lines.append(f"| {p['model']} @{p['input']}^3, {p['items']} scans | {m['medfeat']['wall_s']:.1f} s, "
                     f"{m['medfeat']['peak_rss_gib']:.2f} GiB | {m['monai']['wall_s']:.1f} s, "
                     f"{m['monai']['peak_rss_gib']:.2f} GiB | {p['speedup_vs_monai']:.2f}x | "
                     f"{p['memory_vs_monai']:.2f}x | {p['features_max_rel_diff']:.1e} |")
    out = []
    if lines:
        out += ["| pipeline | medfeat defaults | MONAI script | speed-up | memory | features rel. diff |",
                "|---|---|---|---|---|---|", *lines, ""]
    if "probe" in r:
        p = r["probe"]
        out += [f"probe {p['items']} x {p['dim']}, 5-fold grouped CV with C tuning: medfeat "
                f"{p['median_s']['medfeat']:.1f} s (AUC {p['auc']['medfeat']:.4f}), scikit-learn LogisticRegressionCV "
                f"{p['median_s']['sklearn']:.1f} s (AUC {p['auc']['sklearn']:.4f}): "
                f"{p['speedup_vs_sklearn']:.2f}x"]
    return "\n".join(out)


if __name__ == "__main__":
    main()

"""Benchmark: linear-probe cross-validation on a 100,000 x 1,024 feature matrix.

Random but learnable features: y ~ Bernoulli(sigmoid(X @ w)) with a dense
random w scaled so the Bayes AUC is about 0.85; two items per subject so the
splits are really grouped. Times the full :func:`cross_validate_probe`
(5-fold grouped CV, C tuned on the default 9-point log grid by inner grouped
3-fold CV, lbfgs) and, separately, the bootstrap CIs. BLAS threads are
limited to ``--threads`` (2 = the development machine).

    python benchmarks/bench_probe.py                      # full size, prints JSON
    python benchmarks/bench_probe.py --items 20000 --dim 256   # quick look
    python benchmarks/bench_probe.py --append-results     # also append to benchmarks/RESULTS.md
    python benchmarks/bench_probe.py --cli                # `medfeat probe train` with its defaults

``--cli`` writes the same matrix into a feature store (one item per row, the labels in its
items table) and times ``medfeat probe train`` as a fresh process with every default (5 folds
x 3 seeds, C tuned, 1,000 bootstrap replicates): the whole command, reading included.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def make_data(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X (n, dim) float32, y (n,) 0/1, groups (n,) with two items per subject."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dim), dtype=np.float32)
    w = rng.standard_normal(dim).astype(np.float32) * (1.6 / np.sqrt(dim))
    logit = X @ w
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    groups = np.arange(n) // 2
    return X, y, groups


def run(items: int, dim: int, folds: int, threads: int, n_boot: int) -> dict:
    import sklearn
    from threadpoolctl import threadpool_limits

    from medfeat.probes.evaluate import cross_validate_probe
    from medfeat.probes.linear import LinearProbe

    X, y, groups = make_data(items, dim)
    with threadpool_limits(limits=threads):
        # Warm-up on a small slice so imports and BLAS start-up are not timed.
        cross_validate_probe(X[:2000, :64], y[:2000], groups[:2000], n_splits=3, seeds=(0,), n_boot=0)
        t0, c0 = time.perf_counter(), time.process_time()
        res = cross_validate_probe(X, y, groups, n_splits=folds, seeds=(0,), n_boot=0)
        t_cv, c_cv = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        res_ci = _bootstrap_only(res, n_boot)
        t_boot = time.perf_counter() - t0
    defaults = LinearProbe().get_params()
    return {
        "benchmark": "probe_cv",
        "items": items, "dim": dim, "folds": folds, "seeds": 1, "threads": threads,
        "probe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()},
        "seconds_cv": round(t_cv, 2), "cpu_seconds_cv": round(c_cv, 2), "seconds_per_fold": round(t_cv / folds, 2),
        "seconds_bootstrap": round(t_boot, 2), "n_boot": n_boot,
        "auc": round(res.metrics["auc"]["value"], 4), "auc_ci": res_ci,
        "chosen_C": [f["C"] for f in res.folds],
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "versions": {"numpy": np.__version__, "sklearn": sklearn.__version__},
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_cli(items: int, dim: int) -> dict:
    """Wall time of ``medfeat probe train`` with its defaults on an ``items`` x ``dim`` store."""
    import subprocess
    import sys
    import tempfile

    from medfeat.engine.store.feature_store import ArrayKey, FeatureStore

    X, y, groups = make_data(items, dim)
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore.create(Path(tmp) / "store.zarr", chunk_items=4096)
        idx = store.add_items([{"item_id": f"i{k}", "subject": f"s{g}", "kind": "scan", "label": str(int(v))}
                               for k, (g, v) in enumerate(zip(groups, y))])
        key = ArrayKey("bench", "features", "none")
        store.ensure_array(key, dim, {"model": "bench", "tap": "features"})
        store.write(key, idx, X)
        cmd = [sys.executable, "-m", "medfeat", "probe", "train", "--store", str(Path(tmp) / "store.zarr"),
               "--features", "bench:features", "--target", "label"]
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(run.stderr[-2000:])
    return {"benchmark": "probe_train_cli", "items": items, "dim": dim, "seconds": round(seconds, 2),
            "output": run.stdout.strip().splitlines()[-6:], "load_avg_1m": round(os.getloadavg()[0], 2),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _bootstrap_only(res, n_boot: int) -> list[float]:
    from medfeat.probes.metrics import prepared_auc
    from medfeat.probes.stats import bootstrap_ci

    ci = bootstrap_ci(prepared_auc(res.y, res.scores[0, :, 0]), len(res.y), groups=res.groups, n_boot=n_boot)
    return [round(ci.low, 4), round(ci.high, 4)]


def append_results(r: dict, path: Path, command: str = "python benchmarks/bench_probe.py --append-results") -> None:
    """Append a Markdown section with the figures of ``r`` to ``path`` (created if missing)."""
    cpu = f" (process CPU time {r['cpu_seconds_cv']} s)" if "cpu_seconds_cv" in r else ""
    text = (
        f"\n## Linear probe cross-validation ({r['date']})\n\n"
        f"Command: `{command}` "
        f"(items {r['items']}, dim {r['dim']}, {r['folds']}-fold grouped CV, 1 seed, {r['threads']} BLAS threads)\n\n"
        f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs (shared; 1-min load "
        f"{r['machine']['load_avg_1m']} at the end), numpy {r['versions']['numpy']}, "
        f"scikit-learn {r['versions']['sklearn']}.\n\n"
        f"| what | seconds |\n|---|---|\n"
        f"| 5-fold CV incl. C tuning (9 C values x 3 inner folds on <=20k rows) and refit on all train rows | "
        f"{r['seconds_cv']}{cpu} |\n| per outer fold | {r['seconds_per_fold']} |\n"
        f"| bootstrap CI of AUC over subjects ({r['n_boot']} replicates) | {r['seconds_bootstrap']} |\n\n"
        f"Out-of-fold AUC {r['auc']} (95% CI {r['auc_ci'][0]}-{r['auc_ci'][1]}); chosen C per fold {r['chosen_C']}.\n"
    )
    if not path.exists():
        text = "# Benchmark results\n" + text
    with path.open("a") as fh:
        fh.write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None, help="Also write the JSON record here.")
    ap.add_argument("--append-results", action="store_true", help="Append a section to benchmarks/RESULTS.md.")
    ap.add_argument("--cli", action="store_true", help="Time `medfeat probe train` with its defaults instead.")
    args = ap.parse_args()
    if args.cli:
        print(json.dumps(run_cli(args.items, args.dim), indent=1))
        return
    r = run(args.items, args.dim, args.folds, args.threads, args.n_boot)
    print(json.dumps(r, indent=1))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    if args.append_results:
        append_results(r, Path(__file__).with_name("RESULTS.md"))


if __name__ == "__main__":
    main()

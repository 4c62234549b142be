"""Reading a scan: the cohort's .nii.gz against the same scan after ``medfeat cohort ingest``.

Writes a synthetic cohort (``medfeat cohort synth``, 160^3 scans), ingests it to Zarr v3
(``medfeat cohort ingest``: 64^3 zstd chunks), and times ``medfeat.io.readers.read_scan`` on
each form of the same scans, alternating, ``--rounds`` times; prints the medians and the
ratio. ``read_scan`` is what the pipeline calls (.nii.gz inflated by ISA-L's igzip where
installed).

    python benchmarks/bench_read.py [--scans 8] [--shape 160] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=8)
    ap.add_argument("--shape", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from medfeat.io.readers import read_scan

    with tempfile.TemporaryDirectory() as tmp:
        cli = [sys.executable, "-m", "medfeat", "cohort"]
        subprocess.run([*cli, "synth", f"{tmp}/c", "--subjects", str(max(1, args.scans // 2)), "--seed", "0",
                        "--shape", *[str(args.shape)] * 3], check=True, capture_output=True)
        subprocess.run([*cli, "ingest", f"{tmp}/c/manifest.csv", "--out", f"{tmp}/c.zarr"], check=True,
                       capture_output=True)
        nifti = pd.read_csv(f"{tmp}/c/manifest.csv")["path"].tolist()[: args.scans]
        zarr_paths = pd.read_csv(f"{tmp}/c.zarr/manifest.csv")["path"].tolist()[: args.scans]
        base = Path(f"{tmp}/c")
        times: dict[str, list[float]] = {"nifti_gz": [], "zarr": []}
        cases = [("nifti_gz", nifti, base), ("zarr", zarr_paths, Path(f"{tmp}/c.zarr"))]
        for _, paths, root in cases:  # warm-up: imports and the OS file cache
            read_scan(paths[0] if Path(paths[0]).is_absolute() else root / paths[0])
        for r in range(args.rounds):
            for name, paths, root in cases[:: 1 - 2 * (r % 2)]:  # alternate which goes first
                t0 = time.perf_counter()
                for p in paths:
                    read_scan(p if Path(p).is_absolute() else root / p)
                times[name].append((time.perf_counter() - t0) / len(paths))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(nifti)} scans of {args.shape}^3, {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    print(f"read_scan per scan: .nii.gz {med['nifti_gz'] * 1000:.0f} ms, ingested Zarr {med['zarr'] * 1000:.0f} ms, "
          f"{med['nifti_gz'] / med['zarr']:.2f}x")


if __name__ == "__main__":
    main()

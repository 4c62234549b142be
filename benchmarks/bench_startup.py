"""Start-up of ``medfeat extract``: from process start until the first batch is submitted.

Each sample is a fresh process, so nothing is warm but the OS file cache (the first,
unrecorded round warms it):

* **python**: ``python -c pass``, the interpreter alone;
* **torch**: ``python -c "import torch"``, the floor any torch-based run pays;
* **cli**: ``python -m medfeat --help``;
* **extract**: ``medfeat extract --random-init --model unet3d --tiny --taps bottom`` on a tiny
  synthetic cohort into a new store with the default scheduler (``auto``: threads in this
  process); the figure is the time from just before the process is spawned until the
  pipeline submits its first batch to its thread pool (``first_submit_s``), and until the
  process exits (``exit_s``).

The extract child runs ``medfeat``'s CLI through a small bootstrap that only wraps
``concurrent.futures.ThreadPoolExecutor.submit`` to note (on ``time.monotonic``, the
system-wide clock the parent also reads) when the first ``run_batch`` task goes in; nothing
of medfeat is imported before the CLI imports it. Cases run in rotated order, ``--repeats``
times; medians and ranges are reported. ``--importtime`` adds one ``-X importtime`` run of
the extract command and lists the imports on its path that take longest.

Example::

    PYTHONPATH=. python benchmarks/bench_startup.py --repeats 7 --record
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent

# Runs in the extract child: note the first run_batch submit, then run the CLI as `python -m medfeat`.
_BOOT = """
import concurrent.futures as cf, runpy, sys, time
_mark, _submit = sys.argv[1], cf.ThreadPoolExecutor.submit
def _noting(self, fn, *args, **kwargs):
    if getattr(fn, "__name__", "") == "run_batch" and _mark:
        open(_mark, "w").write(repr(time.monotonic()))
        globals()["_mark"] = ""
    return _submit(self, fn, *args, **kwargs)
cf.ThreadPoolExecutor.submit = _noting
sys.argv = ["medfeat", *sys.argv[2:]]
runpy.run_module("medfeat", run_name="__main__", alter_sys=True)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {proc.stderr[-2000:]}")
    return time.monotonic() - t0


def _extract_args(manifest: Path, store: Path) -> list[str]:
    return ["extract", "--random-init", "--model", "unet3d", "--tiny", "--taps", "bottom",
            "--manifest", str(manifest), "--store", str(store), "--quiet"]


def _extract(manifest: Path, work: Path, run: int, env: dict[str, str]) -> dict[str, float]:
    mark = work / f"first_submit_{run}.txt"
    cmd = [sys.executable, "-c", _BOOT, str(mark), *_extract_args(manifest, work / f"store_{run}")]
    t0 = time.monotonic()
    exit_s = _timed(cmd, env)
    if not mark.exists():
        raise SystemExit("the extract run submitted no run_batch task to a thread pool "
                         "(is the default scheduler still threads in this process?)")
    return {"first_submit_s": float(mark.read_text()) - t0, "exit_s": exit_s}


def _cohort(work: Path, env: dict[str, str]) -> Path:
    _timed([sys.executable, "-m", "medfeat", "cohort", "synth", str(work / "cohort"), "--subjects", "2",
            "--shape", "32", "32", "32"], env)
    return work / "cohort" / "manifest.csv"


def _import_profile(manifest: Path, work: Path, env: dict[str, str], floor_ms: float = 20.0) -> list[str]:
    """Imports of one extract run, slowest first: top-level and second-level entries over
    ``floor_ms`` (cumulative, ms)."""
    cmd = [sys.executable, "-X", "importtime", "-c", _BOOT, "", *_extract_args(manifest, work / "store_prof")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum, name = line.split(":", 1)[1].split("|")
        depth = (len(name) - len(name.lstrip())) // 2
        if depth <= 1 and int(cum) / 1000 >= floor_ms:
            rows.append((int(cum) / 1000, f"{'  ' * depth}{name.strip()}"))
    return [f"{ms:8.0f} ms  {name}" for ms, name in sorted(rows, reverse=True)]


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def measure(repeats: int, work: Path) -> dict[str, object]:
    env = _env()
    manifest = _cohort(work, env)
    cases = {
        "python": lambda i: {"exit_s": _timed([sys.executable, "-c", "pass"], env)},
        "torch": lambda i: {"exit_s": _timed([sys.executable, "-c", "import torch"], env)},
        "cli": lambda i: {"exit_s": _timed([sys.executable, "-m", "medfeat", "--help"], env)},
        "extract": lambda i: _extract(manifest, work, i, env),
    }
    names = list(cases)
    samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for n in names:  # warm the file cache; not recorded
        cases[n](-1)
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            samples[n].append(cases[n](r))
    return {case: {key: _summary([s[key] for s in runs]) for key in runs[0]} for case, runs in samples.items()}


def markdown(result: dict) -> str:
    fig = result["figures"]
    rows = [("interpreter (`python -c pass`), exit", fig["python"]["exit_s"]),
            ("`import torch`, exit", fig["torch"]["exit_s"]),
            ("`medfeat --help`, exit", fig["cli"]["exit_s"]),
            ("`medfeat extract ...`, **first batch submitted**", fig["extract"]["first_submit_s"]),
            ("`medfeat extract ...`, exit (4 items done)", fig["extract"]["exit_s"])]
    lines = [f"## CLI start-up: `medfeat extract` to its first batch ({result['date']})", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}, load average {result['load_start']} at the start, "
             f"{result['load_end']} at the end. {result['repeats']} fresh processes per case, rotated order; "
             "seconds from spawning the process.", "",
             "| case | median s | min | max |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} |" for name, s in rows]
    lines += ["", "Extract: `medfeat extract --random-init --model unet3d --tiny --taps bottom` on a synthetic "
              "cohort of 2 subjects (4 scans of 32^3), default scheduler (auto: threads in-process), a new "
              "store each run.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="fresh processes per case (medians)")
    ap.add_argument("--importtime", action="store_true", help="also list the slowest imports of one extract run")
    ap.add_argument("--record", action="store_true",
                    help="write benchmarks/results/startup.json and append a section to benchmarks/RESULTS.md")
    ap.add_argument("--work", default=None, help="folder for the cohort and stores (default: temp)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_startup_"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    figures = measure(args.repeats, work)
    result = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python benchmarks/bench_startup.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "load_start": " ".join(f"{v:.2f}" for v in load_start),
              "load_end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
              "repeats": args.repeats, "figures": figures}
    print(json.dumps(figures, indent=1))
    if args.importtime:
        rows = _import_profile(work / "cohort" / "manifest.csv", work, _env())
        print("\n".join(["slowest imports of one extract run (cumulative):", *rows]))
    section = markdown(result)
    print(section)
    if args.record:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "startup.json").write_text(json.dumps(result, indent=1) + "\n")
        with open(HERE / "RESULTS.md", "a") as fh:
            fh.write("\n" + section)


if __name__ == "__main__":
    main()

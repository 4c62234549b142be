"""CPU inference under the two allocator modes of medfeat.engine.pipeline.malloc, side by side.

Each mode runs in a fresh process (mallopt is process-wide): build the model, one warm-up
call in a new thread (as the pipeline's task threads), then ``--calls`` timed calls; prints
seconds per call, kernel (sys) seconds per call, minor page faults per call and peak RSS.

    python benchmarks/bench_malloc.py --model sam_med3d --tap blocks.5 --calls 3
"""
from __future__ import annotations

import argparse
import subprocess
import sys

_CHILD = """
import resource, sys, threading, time
import torch
from medfeat.engine.pipeline.malloc import apply_malloc_mode
from medfeat.export.backbones.registry import create_backbone
mode, model, tap, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
apply_malloc_mode(mode)
torch.set_num_threads(2)
bb = create_backbone(model, [tap], seed=0)
x = torch.randn(1, bb.spec.in_channels, *bb.spec.input_size)
def run():
    with torch.inference_mode():
        bb(x)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(calls):
            bb(x)
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    print(f"{dt / calls:.3f} {(r1.ru_stime - r0.ru_stime) / calls:.3f} {(r1.ru_minflt - r0.ru_minflt) / calls:.0f} "
          f"{r1.ru_maxrss / 1024:.0f}")
t = threading.Thread(target=run)
t.start()
t.join()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sam_med3d")
    ap.add_argument("--tap", default="blocks.5")
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    print("| malloc | s/call | sys s/call | page faults/call | peak RSS MiB |\n|---|---:|---:|---:|---:|")
    for mode in ("system", "retain"):
        out = subprocess.run([sys.executable, "-c", _CHILD, mode, args.model, args.tap, str(args.calls)],
                             capture_output=True, text=True, check=True).stdout.split()
        print(f"| {mode} | {' | '.join(out)} |")


if __name__ == "__main__":
    main()

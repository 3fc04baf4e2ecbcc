#!/usr/bin/env python3
"""Time each instruction-set build of the CPU kernels that this machine runs, and measure how far
their results lie from the baseline build's (README, "Instruction sets").

The variants run in one process on the workloads of bench.py, their calls interleaved round by
round so that a change of machine load hits them alike. Times are the median and the minimum of
the CPU time the process spent in each call (all its threads; with --threads 1 the time the call
ran, which other processes sharing the cores disturb less than the wall time), and the median
wall time; ratios are the baseline's time over the variant's.

    python benchmarks/simd.py                                  # box, mask, backward; 1 thread
    python benchmarks/simd.py --workloads box,rotated --threads 2 --repeat 15
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (benchmarks/bench.py: workloads and their inputs)

roialign_cy = bench._import_ours()
from roialign_cy import _cpu  # noqa: E402
from roialign_cy._cpu import _variants  # noqa: E402


def _call(w, features, boxes, grad, n_threads, reuse_out):
    kw = dict(spatial_scale=w.spatial_scale, sampling_ratio=w.sampling_ratio, aligned=w.aligned,
              n_threads=n_threads)
    fn = getattr(roialign_cy, bench._OUR_FUNCTION[w.op])
    if w.op in ("forward", "rotated"):
        if reuse_out:  # no fresh pages for the kernel to fault in: its own time
            kw["out"] = fn(features, boxes, w.output_size, **kw)
        return lambda: fn(features, boxes, w.output_size, **kw)
    return lambda: fn(grad, features, boxes, w.output_size, wrt=w.wrt, **kw)


def _use(variant):
    _cpu._roi_align, _cpu._roi_align_rotated = _variants.modules(variant)


def differences(a, b):
    """(max |a - b| / max |b|, max |a - b| / |b| over the elements of b with |b| >= 1e-3 max|b|)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) or 1.0
    d = np.abs(a - b)
    big = np.abs(b) >= 1e-3 * scale
    elementwise = float(np.max(d[big] / np.abs(b[big]))) if big.any() else 0.0
    return float(np.max(d)) / scale, elementwise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="box,mask,backward")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=9, help="timed rounds (default: %(default)s)")
    ap.add_argument("--dtypes", default="float32,float64",
                    help="dtypes whose cross-variant differences are measured (timing: the first)")
    ap.add_argument("--reuse-out", action="store_true",
                    help="forward workloads write into one preallocated out= array")
    a = ap.parse_args(argv)
    variants = _variants.runnable()
    print(f"variants this machine runs: {', '.join(variants)} (in use by default: "
          f"{_variants.active}); threads {a.threads}; medians of {a.repeat} interleaved rounds"
          + ("; forward calls reuse their out= array" if a.reuse_out else ""))
    for name in a.workloads.split(","):
        w = bench.WORKLOADS[name]
        features, boxes, grad = bench.make_inputs(w)
        for i, dtype in enumerate(a.dtypes.split(",")):
            f, bx = features.astype(dtype), boxes.astype(dtype)
            g = None if grad is None else grad.astype(dtype)
            call = _call(w, f, bx, g, a.threads, a.reuse_out)
            outs, cpu, wall = {}, {v: [] for v in variants}, {v: [] for v in variants}
            for v in variants:
                _use(v)
                outs[v] = call()  # warm-up, and the result compared
            for _ in range(a.repeat if i == 0 else 0):
                for v in variants:
                    _use(v)
                    t0, c0 = time.perf_counter(), time.process_time()
                    call()
                    cpu[v].append(time.process_time() - c0)
                    wall[v].append(time.perf_counter() - t0)
            base = outs["baseline"]
            for v in variants:
                rel_max, rel_el = differences(outs[v], base)
                line = f"{name:10s} {dtype:8s} {v:10s}"
                if cpu[v]:
                    for what, stat in (("cpu", statistics.median), ("cpu min", min),
                                       ("wall", statistics.median)):
                        series = cpu if what.startswith("cpu") else wall
                        t = stat(series[v])
                        line += f"  {what} {1e3 * t:6.1f} ms x{stat(series['baseline']) / t:4.2f}"
                print(f"{line}  vs baseline: max|d|/max|b| {rel_max:.2e}, max elementwise {rel_el:.2e}")
    _use(_variants.active)
    return 0


if __name__ == "__main__":
    sys.exit(main())

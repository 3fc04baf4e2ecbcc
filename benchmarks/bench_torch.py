#!/usr/bin/env python3
"""Time roialign_cy.torch against torchvision through PyTorch, side by side in one process.

Two workloads, float32 on the CPU at the default thread counts (ours: OpenMP's; torchvision:
torch.get_num_threads()) or both at ``--threads N``, each forward and backward through autograd:

- fpn: ``MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)`` over the levels (2, 256, 200, 304),
  (2, 256, 100, 152), (2, 256, 50, 76), (2, 256, 25, 38) of an 800 x 1216 image, 2000 boxes of
  log-uniform size (8 to 512 px a side), torchvision's level rule and aligned=False.
- box: ``roi_align`` on features (2, 256, 200, 304), 2000 boxes, 7x7, spatial_scale 0.25,
  sampling_ratio 2, aligned=True (the box head of a one-level detector).

"backward" is the time of ``out.backward(grad)`` alone (the forward that builds the graph is not
timed). Before timing, each pair of outputs and input gradients is compared (max abs difference).

    python benchmarks/bench_torch.py [--repeat N] [--threads N] [--wait-quiet S]

Needs torch and torchvision (``pip install "roialign_cy[bench-torch]"``) and roialign_cy built for
the same interpreter.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (benchmarks/bench.py: timing and machine-load helpers)

FPN_LEVELS = [(2, 256, 200, 304), (2, 256, 100, 152), (2, 256, 50, 76), (2, 256, 25, 38)]
IMAGE = (800, 1216)  # (height, width) of the input image
N_BOXES = 2000


def make_boxes(rng, n_images, k, size_range=(8.0, 512.0)):
    """Per-image (L, 4) proposals over IMAGE: centres uniform, sides log-uniform, clipped."""
    per_image = []
    for count in np.bincount(rng.integers(0, n_images, k), minlength=n_images):
        w, h = np.exp(rng.uniform(*np.log(size_range), (2, count)))
        cx, cy = rng.uniform(0, IMAGE[1], count), rng.uniform(0, IMAGE[0], count)
        x1, x2 = np.clip(cx - w / 2, 0, IMAGE[1]), np.clip(cx + w / 2, 0, IMAGE[1])
        y1, y2 = np.clip(cy - h / 2, 0, IMAGE[0]), np.clip(cy + h / 2, 0, IMAGE[0])
        per_image.append(np.stack([x1, y1, x2, y2], 1).astype(np.float32))
    return per_image


def time_backward(forward, grad, repeat):
    """Median ms of ``out.backward(grad)`` over ``repeat`` fresh graphs (after one warm-up)."""
    forward().backward(grad)
    times = []
    for _ in range(repeat):
        out = forward()
        t0 = time.perf_counter()
        out.backward(grad)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _max_diff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def compare(name, ours, theirs, inputs, grad, repeat, wait_quiet):
    """Time ``ours()`` and ``theirs()`` (each returns the pooled tensor, reading ``inputs``, the
    leaf tensors that require grad); return the table rows."""
    import torch

    def grads(fn):
        for t in inputs:
            t.grad = None
        fn().backward(grad)
        return [t.grad.clone() for t in inputs]

    out_diff = _max_diff(ours(), theirs())
    grad_diff = max(_max_diff(a, b) for a, b in zip(grads(ours), grads(theirs)))
    rows = []
    for phase in ("forward", "backward"):
        if wait_quiet:
            bench.wait_for_quiet(wait_quiet)
        busy = bench._cpu_seconds()
        if phase == "forward":
            with torch.no_grad():
                t_ours = bench.time_call(ours, bench._no_sync, repeat, 0, 0, 0)[0].median_ms
                t_theirs = bench.time_call(theirs, bench._no_sync, repeat, 0, 0, 0)[0].median_ms
            diff = out_diff
        else:
            t_ours = time_backward(ours, grad, repeat)
            t_theirs = time_backward(theirs, grad, repeat)
            diff = grad_diff
        others = bench._other_cores(busy, bench._cpu_seconds())
        rows.append((name, phase, t_ours, t_theirs, t_theirs / t_ours, diff, others))
    return rows


def fpn_workload(rng, torch, tv_ops, rt, n_threads):
    levels = {str(i): torch.from_numpy(rng.standard_normal(s, dtype=np.float32)).requires_grad_()
              for i, s in enumerate(FPN_LEVELS)}
    boxes = [torch.from_numpy(b) for b in make_boxes(rng, 2, N_BOXES)]
    shapes = [IMAGE] * 2
    names = list(levels)
    ours_m = rt.MultiScaleRoIAlign(names, 7, 2, n_threads=n_threads)
    theirs_m = tv_ops.MultiScaleRoIAlign(names, 7, 2)
    grad = torch.from_numpy(rng.standard_normal((N_BOXES, 256, 7, 7), dtype=np.float32))
    return (lambda: ours_m(levels, boxes, shapes), lambda: theirs_m(levels, boxes, shapes),
            list(levels.values()), grad)


def box_workload(rng, torch, tv_ops, rt, n_threads):
    features = torch.from_numpy(rng.standard_normal(FPN_LEVELS[0], dtype=np.float32)).requires_grad_()
    per_image = make_boxes(rng, 2, N_BOXES)
    rois = torch.from_numpy(np.concatenate(
        [np.column_stack([np.full(len(b), i, np.float32), b]) for i, b in enumerate(per_image)]))
    grad = torch.from_numpy(rng.standard_normal((N_BOXES, 256, 7, 7), dtype=np.float32))
    args = (7, 0.25, 2, True)
    return (lambda: rt.roi_align(features, rois, *args, n_threads=n_threads),
            lambda: tv_ops.roi_align(features, rois, *args),
            [features], grad)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7, help="timed calls per cell (median)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of both (default: OpenMP's for ours, torch's for torchvision)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each pair of rows wait up to S seconds for other processes to go quiet")
    args = ap.parse_args(argv)
    import torch
    import torchvision
    import torchvision.ops as tv_ops

    if args.threads:
        torch.set_num_threads(args.threads)
    ours = bench._import_ours()
    import roialign_cy.torch as rt
    from roialign_cy._cpu import _openmp

    print(f"roialign_cy {ours.__version__} | torch {torch.__version__} | torchvision "
          f"{torchvision.__version__} | numpy {np.__version__} | Python {platform.python_version()}")
    print(f"CPU: {bench._cpu_model()}, {os.cpu_count()} cores | OpenMP threads (ours): "
          f"{_openmp.effective_n_threads(args.threads)} | torch threads: {torch.get_num_threads()} | load "
          f"average (1, 5, 15 min) at start: {bench._loadavg()}")
    print(f"median ms of {args.repeat} calls after a warm-up; ratio = torchvision / ours; others: "
          "cores kept busy by other processes while the pair of rows ran (near 0: a clean figure)\n")
    rng = np.random.default_rng(0)
    rows = []
    for name, make in (("fpn MultiScaleRoIAlign", fpn_workload), ("box roi_align", box_workload)):
        rows += compare(name, *make(rng, torch, tv_ops, rt, args.threads), args.repeat,
                        args.wait_quiet)
    header = ("workload", "phase", "ours ms", "torchvision ms", "tv/ours", "max|d|", "others")
    print(f"{header[0]:<24}{header[1]:<10}{header[2]:>9}{header[3]:>16}{header[4]:>9}"
          f"{header[5]:>10}{header[6]:>8}")
    print("-" * 86)
    for name, phase, t_ours, t_tv, ratio, diff, others in rows:
        busy = "?" if others is None else f"{others:.2f}"
        print(f"{name:<24}{phase:<10}{t_ours:>9.1f}{t_tv:>16.1f}{ratio:>9.1f}{diff:>10.1e}{busy:>8}")
    print(f"\nload average (1, 5, 15 min) at the end: {bench._loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

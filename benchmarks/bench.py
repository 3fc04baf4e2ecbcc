#!/usr/bin/env python3
"""Time roialign_cy side by side with onnxruntime (RoiAlign, MaxRoiPool) and torchvision.ops.

roi_align, roi_pool, ps_roi_align and ps_roi_pool, forward and (torchvision, by autograd) backward.

Every workload runs our kernel and each installed peer in the same process, on the same seeded
synthetic data, at each thread setting; each peer's output is checked against ours before it is
timed, so a mismatch is reported instead of a meaningless speed-up. Missing peers, and operators
roialign_cy does not have yet, are reported as "n/a" / skipped rows, never as errors. A peer that
computes something else on purpose (a known difference, peers.py) is checked against that rule
instead and flagged with "*" and a note.

    python benchmarks/bench.py                      # all CPU workloads, threads 1 and all cores
    python benchmarks/bench.py --quick              # fewer repeats (a smoke run)
    python benchmarks/bench.py --workloads box,mask --threads 2 --repeat 20 --json out.json
    python benchmarks/bench.py --workloads roi-pool-box,ps-roi-align-box-backward --repeat 5

GPU workloads (names starting with "gpu-") run when CuPy and a CUDA device are present: ours with
backend="cuda" on cupy arrays against torchvision on CUDA tensors, both timed with a device-wide
synchronize around each call.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

try:
    import resource  # POSIX only: the system time column is n/a elsewhere
except ImportError:
    resource = None

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers as peer_adapters  # noqa: E402  (benchmarks/peers.py, next to this file)


def _import_ours():
    """Import roialign_cy, falling back to the checkout this script lives in (in-place build)."""
    try:
        import roialign_cy
    except ImportError:
        sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import roialign_cy
    return roialign_cy


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    op: str  # a key of _OPS: "forward" (roi_align), "backward", "roi_pool", "ps_roi_align_backward", ...
    features: tuple  # (N, C, H, W)
    n_boxes: int
    output_size: tuple
    sampling_ratio: int
    spatial_scale: float = 0.25
    aligned: bool = True
    device: str = "cpu"
    wrt: str = "features"  # backward ops: the gradient timed (no peer has one for "boxes")
    box_px: tuple = (8.0, 400.0)  # box sides, log-uniform, in input-image pixels
    edge: str = "torchvision"  # ps_roi_pool only (conventions section 9.2)
    # roi_pool only: the forward also returns the arg-max pixels (as torchvision's always does),
    # and the backward takes them (as torchvision's does) instead of searching the features again
    argmax: bool = False


_FPN_P2 = (2, 256, 200, 304)  # stride-4 level of a 1216 x 800 image, batch of 2
# R-FCN position-sensitive score maps: stride 8 of the same image, C = 10 classes x 7 x 7 bins
_RFCN = (2, 10 * 7 * 7, 100, 152)
_CPU_WORKLOADS = [
    Workload("box", "forward", _FPN_P2, 2000, (7, 7), 2),
    Workload("mask", "forward", _FPN_P2, 200, (14, 14), 2),
    Workload("adaptive", "forward", _FPN_P2, 2000, (7, 7), 0),
    Workload("small", "forward", (1, 64, 64, 64), 100, (7, 7), 2),
    Workload("backward", "backward", _FPN_P2, 2000, (7, 7), 2),
    Workload("rotated", "rotated", _FPN_P2, 2000, (7, 7), 2),
    Workload("rotated-backward", "rotated_backward", _FPN_P2, 2000, (7, 7), 2),
    Workload("backward-boxes", "backward", _FPN_P2, 2000, (7, 7), 2, wrt="boxes"),
    Workload("rotated-backward-boxes", "rotated_backward", _FPN_P2, 2000, (7, 7), 2, wrt="boxes"),
]
# The call-size sweep (issue #9): per-call overhead up to bulk, boxes of 16-256 px
_SWEEP = [((1, 3, 96, 128), (1, 10, 100)), ((1, 256, 50, 68), (1, 10)),
          ((2, 256, 100, 152), (1, 100, 1000))]
_CPU_WORKLOADS += [
    Workload(f"sweep-{'x'.join(map(str, f))}-{k}", "forward", f, k, (7, 7), 2, box_px=(16.0, 256.0))
    for f, ks in _SWEEP for k in ks
] + [Workload("mask-inference", "forward", (1, 256, 200, 304), 100, (14, 14), 2)]
# The rest of the family on the CPU box head: RoIPool on the FPN level, the position-sensitive
# operators on R-FCN maps (sampling_ratio does not apply to the pooling ops: 0 there).
_CPU_WORKLOADS += [
    Workload("roi-pool-box", "roi_pool", _FPN_P2, 2000, (7, 7), 0),
    Workload("roi-pool-box-backward", "roi_pool_backward", _FPN_P2, 2000, (7, 7), 0),
    Workload("roi-pool-box-argmax", "roi_pool", _FPN_P2, 2000, (7, 7), 0, argmax=True),
    Workload("roi-pool-box-backward-argmax", "roi_pool_backward", _FPN_P2, 2000, (7, 7), 0, argmax=True),
    Workload("ps-roi-align-box", "ps_roi_align", _RFCN, 2000, (7, 7), 2, spatial_scale=0.125),
    Workload("ps-roi-align-box-backward", "ps_roi_align_backward", _RFCN, 2000, (7, 7), 2, spatial_scale=0.125),
    Workload("ps-roi-pool-box", "ps_roi_pool", _RFCN, 2000, (7, 7), 0, spatial_scale=0.125),
    # torchvision's ps_roi_pool backward clips bins to the whole map while its forward leaves out the
    # last row and column (conventions 9.2): it is the gradient of edge="image", so that is what runs.
    Workload("ps-roi-pool-box-backward", "ps_roi_pool_backward", _RFCN, 2000, (7, 7), 0, spatial_scale=0.125,
             edge="image"),
]
# Per-call overhead of the new operators: 1 and 10 boxes of 16-256 px on a small map
_CALL_WORKLOADS = [
    Workload(f"{name}-call-{k}", op, features, k, (7, 7), sr, spatial_scale=scale, box_px=(16.0, 256.0))
    for name, op, features, sr, scale in [("roi-pool", "roi_pool", (1, 256, 50, 68), 0, 0.25),
                                          ("ps-roi-align", "ps_roi_align", (1, 490, 50, 68), 2, 0.125),
                                          ("ps-roi-pool", "ps_roi_pool", (1, 490, 50, 68), 0, 0.125)]
    for k in (1, 10)
]
_GPU_WORKLOADS = [dataclasses.replace(w, name="gpu-" + w.name, device="cuda") for w in _CPU_WORKLOADS
                  if w.name != "small" and not w.name.startswith(("sweep", "mask-inference"))]
_CPU_WORKLOADS += _CALL_WORKLOADS
WORKLOADS = {w.name: w for w in _CPU_WORKLOADS + _GPU_WORKLOADS}

# op -> (roialign_cy operator, is a backward); ours is roialign_cy.<operator>[_backward], and rows
# whose function is missing are skipped with a note.
_OPS = {
    "forward": ("roi_align", False),
    "backward": ("roi_align", True),
    "rotated": ("roi_align_rotated", False),
    "rotated_backward": ("roi_align_rotated", True),
    "roi_pool": ("roi_pool", False),
    "roi_pool_backward": ("roi_pool", True),
    "ps_roi_align": ("ps_roi_align", False),
    "ps_roi_align_backward": ("ps_roi_align", True),
    "ps_roi_pool": ("ps_roi_pool", False),
    "ps_roi_pool_backward": ("ps_roi_pool", True),
}
# The Workload fields each operator takes as keywords (besides output_size, and n_threads/backend)
_OUR_KWARGS = {
    "roi_align": ("spatial_scale", "sampling_ratio", "aligned"),
    "roi_align_rotated": ("spatial_scale", "sampling_ratio", "aligned"),
    "roi_pool": ("spatial_scale",),
    "ps_roi_align": ("spatial_scale", "sampling_ratio"),
    "ps_roi_pool": ("spatial_scale", "edge"),
}


def describe(w):
    """One line saying what workload ``w`` computes (printed under the table)."""
    operator, backward = _OPS[w.op]
    kw = ", ".join(f"{k} {getattr(w, k)}" for k in _OUR_KWARGS[operator])
    kind = "rotated boxes" if operator == "roi_align_rotated" else "boxes"
    return (f"{w.name}: {operator}{'_backward (wrt ' + w.wrt + ')' if backward else ''}, features "
            f"{w.features}, {w.n_boxes} {kind} of {w.box_px[0]:g}-{w.box_px[1]:g} px, "
            f"{w.output_size[0]}x{w.output_size[1]}, {kw}")


# ---------------------------------------------------------------------------------------------
# Synthetic data
def make_inputs(w, seed=0):
    """Seeded features, boxes and (for backward ops) an upstream gradient for workload ``w``.

    Boxes are proposals on the input image (feature size / spatial_scale, 1216 x 800 for the FPN
    level): centres uniform, widths and heights log-uniform in 8..400 px (capped by the image),
    batch indices sorted as a detector emits them. Axis-aligned boxes are clipped to the image,
    rotated ones (random angles in [-180, 180)) are not.
    """
    rng = np.random.default_rng(seed)
    n, c, h, wd = w.features
    features = rng.standard_normal(w.features, dtype=np.float32)
    img_w, img_h = wd / w.spatial_scale, h / w.spatial_scale
    k = w.n_boxes
    lo, hi = w.box_px[0], min(w.box_px[1], img_w, img_h)
    bw = np.exp(rng.uniform(math.log(lo), math.log(hi), k))
    bh = np.exp(rng.uniform(math.log(lo), math.log(hi), k))
    cx = rng.uniform(0, img_w, k)
    cy = rng.uniform(0, img_h, k)
    batch = np.sort(rng.integers(0, n, k)).astype(np.float64)
    if w.op.startswith("rotated"):
        angle = rng.uniform(-180.0, 180.0, k)
        boxes = np.stack([batch, cx, cy, bw, bh, angle], axis=1)
    else:
        x1 = np.clip(cx - bw / 2, 0, img_w)
        x2 = np.clip(cx + bw / 2, 0, img_w)
        y1 = np.clip(cy - bh / 2, 0, img_h)
        y2 = np.clip(cy + bh / 2, 0, img_h)
        boxes = np.stack([batch, x1, y1, x2, y2], axis=1)
    boxes = boxes.astype(np.float32)
    grad = None
    operator, backward = _OPS[w.op]
    if backward:
        # position-sensitive ops: C / (PH * PW) output channels
        c_out = c // (w.output_size[0] * w.output_size[1]) if operator.startswith("ps_") else c
        grad = rng.standard_normal((k, c_out) + tuple(w.output_size), dtype=np.float32)
    return features, boxes, grad


# ---------------------------------------------------------------------------------------------
# Timing
@dataclasses.dataclass
class Timing:
    median_ms: float
    min_ms: float
    repeats: int
    # this process's kernel (system) CPU time per timed call: mostly faulting in fresh pages
    sys_ms: float = float("nan")


def time_call(fn, sync, repeat, budget_s, min_repeat, max_repeat):
    """Median wall time of ``fn()`` after warm-up; the repeat count adapts to ``budget_s`` unless
    ``repeat`` is given. The first warm-up call's result is returned for the agreement check."""
    sync()
    result = fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    estimate = time.perf_counter() - t0
    n = repeat if repeat else int(min(max_repeat, max(min_repeat, budget_s / max(estimate, 1e-6))))
    times = []
    sys0 = _system_seconds()
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    sys_ms = 1e3 * (_system_seconds() - sys0) / n
    return Timing(1e3 * statistics.median(times), 1e3 * min(times), n, sys_ms), result


def _system_seconds():
    """CPU time this process has spent in the kernel (page faults of fresh arrays, mostly)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime if resource else float("nan")


def _no_sync():
    pass


# ---------------------------------------------------------------------------------------------
# One workload
class Skip(Exception):
    """The row cannot run (operator not in this roialign_cy yet, no GPU, ...): print the note."""


class Runner:
    def __init__(self, ours, peers, args):
        self.ours = ours
        self.peers = peers
        self.args = args
        self.cp = None
        if any(WORKLOADS[name].device == "cuda" for name in args.workloads):
            self.cp = _cupy_with_device()

    # -- our callables -------------------------------------------------------------------------
    def our_call(self, w, features, boxes, grad, n_threads):
        operator, backward = _OPS[w.op]
        fname = operator + ("_backward" if backward else "")
        fn = getattr(self.ours, fname, None)
        if fn is None:
            raise Skip(f"roialign_cy.{fname} is not available yet")
        kw = {k: getattr(w, k) for k in _OUR_KWARGS[operator]}
        if w.device == "cuda":
            kw["backend"] = "cuda"
        else:
            kw["n_threads"] = n_threads
        if w.argmax and not backward:
            return lambda: fn(features, boxes, w.output_size, return_argmax=True, **kw)[0]
        if not backward:
            return lambda: fn(features, boxes, w.output_size, **kw)
        if w.argmax:  # the arg-max of one forward, outside the timed call
            _, arg = self.ours.roi_pool(features, boxes, w.output_size, return_argmax=True, **kw)
            return lambda: fn(grad, features.shape, boxes, w.output_size, wrt=w.wrt, argmax=arg, **kw)
        return lambda: fn(grad, features, boxes, w.output_size, wrt=w.wrt, **kw)

    # -- peers' callables (None: this peer has nothing for the op) -----------------------------
    def peer_call(self, name, w, features, boxes, grad, n_threads):
        operator, backward = _OPS[w.op]
        p = self.peers.get(name)
        if p is None or operator not in p.OPERATORS or w.wrt != "features":
            return None
        args = (w.output_size, w.spatial_scale, w.sampling_ratio, w.aligned)
        if name == "onnxruntime":
            if backward or w.device != "cpu":
                return None
            if operator == "roi_pool":
                return p.roi_pool(features, boxes, w.output_size, w.spatial_scale, n_threads=n_threads)
            return p.forward(features, boxes, *args, n_threads=n_threads)
        if w.device == "cuda" and not p.cuda_available():
            return None
        if n_threads is not None:  # None: a GPU row
            p.set_threads(n_threads)
        if not backward:
            return p.forward(features, boxes, *args, device=w.device, operator=operator)
        return p.backward_features(grad, features, boxes, *args, device=w.device, operator=operator)

    def to_numpy(self, name, x):
        if name == "torchvision":
            return self.peers[name].to_numpy(x)
        if self.cp is not None and isinstance(x, self.cp.ndarray):
            return self.cp.asnumpy(x)
        return np.asarray(x)

    def sync_for(self, name, w):
        if w.device != "cuda":
            return _no_sync
        if name == "torchvision":
            return self.peers[name].synchronize
        return self.cp.cuda.Device().synchronize

    # -- a table row ---------------------------------------------------------------------------
    def run(self, w, n_threads, data):
        """Time ours and each peer for (w, n_threads); returns a dict (one table row)."""
        features, boxes, grad = data
        if w.device == "cuda":
            if self.cp is None:
                raise Skip("no CuPy with a CUDA device")
            features, boxes = self.cp.asarray(features), self.cp.asarray(boxes)
            grad = None if grad is None else self.cp.asarray(grad)
        a = self.args
        timing = dict(repeat=a.repeat, budget_s=a.budget, min_repeat=a.min_repeat, max_repeat=a.max_repeat)
        row = {"workload": w.name, "device": w.device, "threads": n_threads if w.device == "cpu" else "gpu"}
        try:
            our_fn = self.our_call(w, features, boxes, grad, n_threads)
            t, ref = time_call(our_fn, self.sync_for("ours", w), **timing)
        except NotImplementedError as exc:
            raise Skip(f"roialign_cy raised NotImplementedError: {exc}") from None
        row["ours"] = dataclasses.asdict(t)
        ref = self.to_numpy("ours", ref)
        # Tolerance on the max abs difference: float32 sums in a different order; the backward
        # accumulates many more terms per element than the forward.
        operator, backward = _OPS[w.op]
        tol = (1e-3 if backward else 2e-4) * max(1.0, float(np.abs(ref).max()))
        for name in ("onnxruntime", "torchvision"):
            fn = self.peer_call(name, w, data[0], data[1], data[2], n_threads)
            if fn is None:
                why = "not installed" if self.peers.get(name) is None else "no such operator on this device"
                row[name] = {"note": why}
                continue
            t, out = time_call(fn, self.sync_for(name, w), **timing)
            out = self.to_numpy(name, out).astype(np.float64)
            row[name] = dict(dataclasses.asdict(t), **agreement(out, ref, tol,
                                                                self.peers[name].KNOWN_DIFFERENCES.get(operator)))
        return row


def agreement(peer, ours, tol, known=None):
    """Compare a peer's output with ours: max abs difference, whether it is within ``tol``, and
    otherwise where the largest difference is. ``known``: (rule, why) from peers.py, where the peer
    computes ``rule(ours)`` on purpose; a difference that the rule accounts for is ``explained``."""
    d = np.abs(peer - ours)
    diff = float(d.max()) if d.size else 0.0
    cell = {"max_abs_diff": diff, "agrees": bool(diff <= tol)}
    if not cell["agrees"]:
        i = np.unravel_index(int(np.argmax(d)), d.shape)
        cell["worst"] = {"index": [int(j) for j in i], "ours": float(ours[i]), "peer": float(peer[i]),
                         "elements_beyond_tol": int((d > tol).sum()), "elements": int(d.size)}
        if known is not None:
            rule, why = known
            d_rule = float(np.abs(peer - rule(ours)).max())
            if d_rule <= tol:
                cell["explained"] = why
                cell["max_abs_diff_after_rule"] = d_rule
    return cell


def _cupy_with_device():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Report
_PEERS = ("onnxruntime", "torchvision")


def _fmt_ms(cell):
    # three significant digits: the small calls take microseconds
    return f"{cell['median_ms']:.3g}" if cell and "median_ms" in cell else "n/a"


def _fmt_sys(cell):
    sys_ms = cell.get("sys_ms", float("nan")) if cell else float("nan")
    return "n/a" if sys_ms != sys_ms else f"{sys_ms:.3g}"


def _fmt_ratio(row, name):
    cell = row.get(name, {})
    if "median_ms" not in cell:
        return "n/a"
    ratio = cell["median_ms"] / row["ours"]["median_ms"]
    return f"{ratio:.2f}" + ("" if cell["agrees"] else " *" if "explained" in cell else " MISMATCH")


def _unexplained(cell):
    return not cell.get("agrees", True) and "explained" not in cell


def format_notes(rows):
    """Lines under the table for every peer output that is not ours: where it differs most, and
    the known difference that accounts for it (once per peer and operator), or MISMATCH."""
    lines, said = [], set()
    for r in rows:
        for name in _PEERS:
            cell = r.get(name, {})
            if cell.get("agrees", True):
                continue
            wst = cell["worst"]
            where = (f"max|d| {cell['max_abs_diff']:.3g} at index {tuple(wst['index'])} (ours "
                     f"{wst['ours']:.6g}, {name} {wst['peer']:.6g}); {wst['elements_beyond_tol']} of "
                     f"{wst['elements']} elements beyond tolerance")
            if "explained" in cell:
                lines.append(f"* {r['workload']} threads {r['threads']}, {name}: {where}; after the known "
                             f"difference, max|d| {cell['max_abs_diff_after_rule']:.1e}")
                key = (name, _OPS[WORKLOADS[r['workload']].op][0])
                if key not in said:
                    said.add(key)
                    lines.append(f"  known difference ({name} {key[1]}): {cell['explained']}")
            else:
                lines.append(f"MISMATCH {r['workload']} threads {r['threads']}, {name}: {where}")
    return lines


def format_table(rows):
    head = ["workload", "threads", "ours ms", "onnxruntime ms", "torchvision ms", "ort/ours", "tv/ours",
            "max|d| ort", "max|d| tv", "others", "ours sys ms"]
    lines = [head]
    for r in rows:
        if "skipped" in r or "error" in r:
            note = "skipped: " + r["skipped"] if "skipped" in r else "ERROR " + r["error"]
            lines.append([r["workload"], str(r["threads"]), note])
            continue
        diffs = [f"{r[n]['max_abs_diff']:.1e}" if "max_abs_diff" in r.get(n, {}) else "n/a" for n in _PEERS]
        lines.append([r["workload"], str(r["threads"]), _fmt_ms(r["ours"]), _fmt_ms(r.get("onnxruntime")),
                      _fmt_ms(r.get("torchvision")), _fmt_ratio(r, "onnxruntime"),
                      _fmt_ratio(r, "torchvision"), *diffs,
                      "n/a" if r.get("other_cores") is None else f"{r['other_cores']:.2f}",
                      _fmt_sys(r["ours"])])
    # Skipped rows hold a note instead of the numeric columns: they size the first two columns only.
    widths = [max(len(l[i]) for l in lines if len(l) == len(head) or (i < 2 and len(l) > i)) for i in range(len(head))]
    out = []
    for l in lines:
        if len(l) != len(head):  # a skipped or failed row: the note runs on past the columns
            out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(l[:2])) + "  " + l[2])
        else:
            out.append("  ".join(c.rjust(widths[i]) if i > 0 else c.ljust(widths[i]) for i, c in enumerate(l)))
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _cpu_seconds():
    """(wall clock, CPU seconds used by the whole machine, CPU seconds used by this process), or
    None where /proc/stat is missing (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy time.
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def _other_cores(before, after):
    """Cores other processes kept busy on average between two ``_cpu_seconds`` readings: a row
    timed while the machine was shared (well above 0) has unreliable multi-thread figures."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    other = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, other / (after[0] - before[0]))


def wait_for_quiet(max_wait_s, threshold=0.05, window_s=2.0):
    """Sleep until other processes use less than ``threshold`` of a core over ``window_s``, for at
    most ``max_wait_s``; returns the seconds waited (shared machines: CI, a busy workstation)."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        before = _cpu_seconds()
        time.sleep(window_s)
        others = _other_cores(before, _cpu_seconds())
        if others is None or others < threshold:
            break
    return time.perf_counter() - start


def _loadavg():
    # Other processes on the machine distort multi-thread timings most: say how busy it was.
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _meta(ours, peers, missing):
    from_openmp = None
    try:
        from roialign_cy._cpu import _openmp

        from_openmp = {"openmp": _openmp.openmp_enabled(), "default_threads": _openmp.effective_n_threads()}
    except Exception:
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": _loadavg(),
        "numpy": np.__version__,
        "roialign_cy": getattr(ours, "__version__", "?"),
        "roialign_cy_openmp": from_openmp,
        "peers": {n: (p.version if p is not None else f"n/a ({missing[n]})") for n, p in peers.items()},
    }


def run_row(runner, w, n_threads, data, wait_quiet):
    """One table row; with ``wait_quiet`` it starts on an idle machine and is redone (at most
    twice more) when other processes took more than a tenth of a core meanwhile."""
    best = None
    for _ in range(3 if wait_quiet else 1):
        if wait_quiet:
            waited = wait_for_quiet(wait_quiet)
            if waited > 5:
                print(f"(waited {waited:.0f} s for other processes to go quiet)", flush=True)
        row = {"workload": w.name, "device": w.device, "threads": n_threads or "gpu"}
        busy0 = _cpu_seconds()
        try:
            row = runner.run(w, n_threads, data)
            row["other_cores"] = _other_cores(busy0, _cpu_seconds())
        except Skip as exc:
            row["skipped"] = str(exc)
            return row
        except Exception as exc:  # one broken row must not cost the rest of a long run
            row["error"] = f"{type(exc).__name__}: {exc}"
            return row
        if best is None or (row["other_cores"] or 0) < (best["other_cores"] or 0):
            best = row
        if (best["other_cores"] or 0) <= 0.1:
            break
    return best


# ---------------------------------------------------------------------------------------------
def parse_args(argv, prog=None):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small time budget per cell (a smoke run)")
    ap.add_argument("--workloads", default=None,
                    help="comma-separated names (default: all CPU ones, plus the gpu- ones when a GPU is "
                         f"there); known: {', '.join(WORKLOADS)}")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and os.cpu_count())")
    ap.add_argument("--repeat", type=int, default=0, help="timed calls per cell (default: adaptive)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed calls per cell when adaptive")
    ap.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON to OUT")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each row, wait up to S seconds until other processes leave the CPUs idle")
    a = ap.parse_args(argv)
    if a.workloads is None:
        names = [w.name for w in _CPU_WORKLOADS]
        if _cupy_with_device() is not None:
            names += [w.name for w in _GPU_WORKLOADS]
    else:
        names = [s.strip() for s in a.workloads.split(",") if s.strip()]
        unknown = [s for s in names if s not in WORKLOADS]
        if unknown:
            ap.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    a.workloads = names
    if a.threads is None:
        a.threads = sorted({1, os.cpu_count() or 1})
    else:
        a.threads = [int(s) for s in a.threads.split(",")]
        if any(t < 1 for t in a.threads):
            ap.error(f"--threads must be positive integers, got {a.threads}")
    if a.budget is None:
        a.budget = 0.3 if a.quick else 2.0
    a.min_repeat, a.max_repeat = (3, 20) if a.quick else (5, 200)
    return a


def main(argv=None, prog=None):
    """Run the benchmark; ``prog`` names the command in --help (``python -m roialign_cy bench``)."""
    a = parse_args(argv, prog)
    ours = _import_ours()
    peers, missing = peer_adapters.available_peers()
    meta = _meta(ours, peers, missing)
    print(f"roialign_cy {meta['roialign_cy']} | numpy {meta['numpy']} | Python {meta['python']}")
    print(f"CPU: {meta['cpu']}, {meta['cpu_count']} cores | OpenMP: {meta['roialign_cy_openmp']} | "
          f"load average (1, 5, 15 min) at start: {meta['loadavg_at_start']}")
    for name, v in meta["peers"].items():
        print(f"peer {name}: {v}")
    print("times: median ms per call after warm-up; ratio = peer / ours (> 1: roialign_cy is faster); "
          "others: cores kept busy by other processes while the row ran (near 0: a clean figure); "
          "ours sys ms: kernel (system) CPU time per call of ours, mostly faulting in fresh output "
          "pages (all threads)\n", flush=True)

    runner = Runner(ours, peers, a)
    rows, mismatches, errors = [], 0, 0
    for name in a.workloads:
        w = WORKLOADS[name]
        data = make_inputs(w, a.seed)
        for t in (a.threads if w.device == "cpu" else [None]):
            row = {"workload": w.name, "device": w.device, "threads": t or "gpu"}
            row = run_row(runner, w, t, data, a.wait_quiet)
            if "error" in row:
                errors += 1
            else:
                mismatches += sum(_unexplained(row.get(n, {})) for n in _PEERS)
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
    print("\nfloat32 NCHW; each workload:")
    for name in a.workloads:
        print("  " + describe(WORKLOADS[name]))
    print()
    print(format_table(rows))
    notes = format_notes(rows)
    if notes:
        print("\n" + "\n".join(notes))
    meta["loadavg_at_end"] = _loadavg()
    print(f"\nload average at end: {meta['loadavg_at_end']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "workloads": {n: dataclasses.asdict(WORKLOADS[n]) for n in a.workloads},
                       "results": rows}, f, indent=1)
    if mismatches:
        print(f"\n{mismatches} peer output(s) disagree with roialign_cy beyond tolerance: see MISMATCH", file=sys.stderr)
    if errors:
        print(f"\n{errors} row(s) failed with an error: see ERROR", file=sys.stderr)
    return 1 if mismatches or errors else 0


if __name__ == "__main__":
    sys.exit(main())

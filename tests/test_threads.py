"""Threads: the kernels release the GIL, concurrent calls from Python threads give exactly the
sequential results, any n_threads gives bit-identical results, and repeated calls do not leak."""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import roialign_cy

from conftest import random_boxes, random_rotated_boxes, to_nhwc
from roialign_cy import roi_align, roi_align_backward, roi_align_rotated, roi_align_rotated_backward


def _inputs(seed, N=2, C=20, H=24, W=20, K=30, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    boxes = random_boxes(rng, K, N, H, W).astype(dtype)
    rboxes = random_rotated_boxes(rng, K, N, H, W).astype(dtype)
    return x, boxes, rboxes


def _task(kind, seed, n_threads=2):
    """One operator call on its own inputs; returns a tuple of arrays."""
    x, boxes, rboxes = _inputs(seed, dtype=np.float32 if seed % 2 else np.float64)
    layout = "NHWC" if seed % 3 == 0 else "NCHW"
    if layout == "NHWC":
        x = to_nhwc(x)
    kw = dict(layout=layout, n_threads=n_threads)
    if kind == "forward":
        return (roi_align(x, boxes, (5, 4), 1.0, -1, True, mode="avg", **kw),
                roi_align(x, boxes, (3, 3), 1.0, 2, False, mode="max", **kw))
    if kind == "backward":
        out = roi_align(x, boxes, (5, 4), 1.0, -1, True, **kw)
        g = np.cos(np.arange(out.size, dtype=out.dtype)).reshape(out.shape)
        return roi_align_backward(g, x, boxes, (5, 4), 1.0, -1, True, wrt="both", **kw)
    if kind == "backward_max":
        out = roi_align(x, boxes, 3, 1.0, 2, True, mode="max", **kw)
        g = np.sin(np.arange(out.size, dtype=out.dtype)).reshape(out.shape)
        return roi_align_backward(g, x, boxes, 3, 1.0, 2, True, mode="max", wrt="both", **kw)
    if kind == "rotated":
        out = roi_align_rotated(x, rboxes, (4, 5), 1.0, -1, True, **kw)
        g = np.cos(np.arange(out.size, dtype=out.dtype)).reshape(out.shape)
        return (out,) + roi_align_rotated_backward(g, x, rboxes, (4, 5), 1.0, -1, True,
                                                   wrt="both", **kw)
    raise AssertionError(kind)


KINDS = ["forward", "backward", "backward_max", "rotated"]


def test_concurrent_calls_match_sequential():
    jobs = [(kind, seed) for seed in range(4) for kind in KINDS] * 2
    expected = {job: _task(*job) for job in set(jobs)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: _task(*job), jobs))
    for job, got in zip(jobs, results):
        for g, e in zip(got, expected[job]):
            np.testing.assert_array_equal(g, e, err_msg=str(job))


def test_concurrent_calls_share_read_only_inputs():
    # the same features and boxes read by 4 threads at once, each with other scalar arguments
    x, boxes, rboxes = _inputs(11)
    args = [((2, 3), 1.0, -1, True), ((4, 4), 0.5, 2, False), ((1, 6), 2.0, 1, True),
            ((3, 2), 1.0, 0, False)]
    expected = [roi_align(x, boxes, *a) for a in args] + [roi_align_rotated(x, rboxes, *a) for a in args]
    calls = [(roi_align, boxes, a) for a in args] + [(roi_align_rotated, rboxes, a) for a in args]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda c: c[0](x, c[1], *c[2], n_threads=2), calls * 3))
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, expected[i % len(expected)])


# ---------------------------------------------------------------------------------------------
# the GIL is released while a kernel runs

def _gil_workload(kind):
    """A single-threaded call lasting a few tenths of a second on this kind of machine."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 64, 96, 96)).astype(np.float32)
    K = {"forward": 1500, "backward_features": 800, "backward_boxes": 1500, "rotated": 700,
         "rotated_backward": 200}[kind]
    boxes = random_boxes(rng, K, 1, 96, 96).astype(np.float32)
    rboxes = random_rotated_boxes(rng, K, 1, 96, 96).astype(np.float32)
    g = np.ones((K, 64, 7, 7), np.float32)
    kw = dict(output_size=7, aligned=True, n_threads=1)
    return {
        "forward": lambda: roi_align(x, boxes, **kw),
        "backward_features": lambda: roi_align_backward(g, x, boxes, **kw),
        "backward_boxes": lambda: roi_align_backward(g, x, boxes, wrt="boxes", **kw),
        "rotated": lambda: roi_align_rotated(x, rboxes, **kw),
        "rotated_backward": lambda: roi_align_rotated_backward(g, x, rboxes, wrt="both", **kw),
    }[kind]


@pytest.mark.parametrize("kind", ["forward", "backward_features", "backward_boxes", "rotated",
                                  "rotated_backward"])
def test_kernels_release_the_gil(kind):
    """While a kernel runs in a worker thread the main thread keeps executing Python bytecode.

    The main thread timestamps a busy Python loop. A kernel holding the GIL would freeze that loop
    for the kernel's whole duration; released, the loop's longest pause stays far below it (the
    Python-level validation and table set-up between kernels take the GIL only briefly).
    """
    fn = _gil_workload(kind)
    fn()  # warm up (imports, first-touch of pages)
    longest_pause, call = _longest_main_thread_pause(fn)
    assert call > 0.05, f"workload too small to tell ({call:.3f} s)"
    assert longest_pause < 0.3 * call, (
        f"main thread paused {longest_pause:.3f} s during a {call:.3f} s call: GIL held"
    )


def _longest_main_thread_pause(fn):
    """Run fn in a thread; return (longest pause of the main thread's Python loop while fn ran,
    fn's duration). The call's start and end bound the series, so a thread that takes the GIL
    at once and keeps it shows one pause as long as the call."""
    stamps = []
    span = []
    done = threading.Event()

    def worker():
        span.append(time.perf_counter())
        fn()
        span.append(time.perf_counter())
        done.set()

    th = threading.Thread(target=worker)
    th.start()
    while not done.is_set():
        stamps.append(time.perf_counter())
        sum(range(50))  # Python work that needs the GIL
    th.join()
    t0, t1 = span
    series = [t0] + [s for s in stamps if t0 < s < t1] + [t1]
    return float(np.max(np.diff(series))), t1 - t0


def test_gil_probe_detects_a_held_gil():
    # the probe itself: a foreign call made through ctypes.PyDLL keeps the GIL while it sleeps
    import ctypes

    try:
        usleep = ctypes.PyDLL(None).usleep
    except (OSError, AttributeError):
        pytest.skip("no usleep in the C library")
    pause, call = _longest_main_thread_pause(lambda: usleep(200_000))
    assert pause > 0.9 * call


# ---------------------------------------------------------------------------------------------
# results do not depend on the thread count

def _all_operators(x, boxes, rboxes, layout, sampling_ratio, n_threads):
    out = []
    kw = dict(layout=layout, n_threads=n_threads)
    for mode in ["avg", "max", "onnx_max"]:
        o = roi_align(x, boxes, (3, 4), 0.5, sampling_ratio, True, mode=mode, **kw)
        out.append(o)
        if mode != "onnx_max":
            g = np.cos(np.arange(o.size, dtype=o.dtype)).reshape(o.shape)
            out += roi_align_backward(g, x, boxes, (3, 4), 0.5, sampling_ratio, True, mode=mode,
                                      wrt="both", **kw)
    o = roi_align_rotated(x, rboxes, (4, 3), 0.5, sampling_ratio, False, **kw)
    g = np.sin(np.arange(o.size, dtype=o.dtype)).reshape(o.shape)
    out.append(o)
    out += roi_align_rotated_backward(g, x, rboxes, (4, 3), 0.5, sampling_ratio, False,
                                      wrt="both", **kw)
    o = roialign_cy.roi_pool(x, boxes, (3, 4), 0.5, **kw)
    out += [o, roialign_cy.roi_pool_backward(np.cos(o), x, boxes, (3, 4), 0.5, **kw)]
    if x.shape[3 if layout == "NHWC" else 1] % 4 == 0:  # position-sensitive: C_out x 2 x 2
        o = roialign_cy.ps_roi_align(x, boxes, 2, 0.5, sampling_ratio, **kw)
        out += [o, roialign_cy.ps_roi_align_backward(np.cos(o), x, boxes, 2, 0.5, sampling_ratio,
                                                     **kw)]
        for edge in ("torchvision", "image"):
            o = roialign_cy.ps_roi_pool(x, boxes, 2, 0.5, edge=edge, **kw)
            out += [o, roialign_cy.ps_roi_pool_backward(np.cos(o), x, boxes, 2, 0.5, edge=edge,
                                                        **kw)]
    return out


# shapes that steer the CPU backend down each of its loop orders: few planes and many samples
# per pixel (blocks of planes copied to channels-last scratch), many planes (split over planes),
# one image with few channels (boxes split over threads)
LOOP_ORDER_SHAPES = [(1, 16, 6, 7, 40), (2, 20, 5, 5, 60), (1, 3, 30, 30, 5), (3, 40, 12, 10, 50)]


def loop_order_inputs(N, C, H, W, K, layout, dtype):
    """(features in ``layout``, boxes, rotated boxes) of one of LOOP_ORDER_SHAPES."""
    rng = np.random.default_rng(N * 1000 + C)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    boxes = random_boxes(rng, K, N, H, W, 0.5).astype(dtype)
    rboxes = random_rotated_boxes(rng, K, N, H, W, 0.5).astype(dtype)
    return (to_nhwc(x) if layout == "NHWC" else x), boxes, rboxes


@pytest.mark.parametrize("N,C,H,W,K", LOOP_ORDER_SHAPES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_does_not_change_results(N, C, H, W, K, layout, dtype):
    x, boxes, rboxes = loop_order_inputs(N, C, H, W, K, layout, dtype)
    for sampling_ratio in [-1, 2]:
        ref = _all_operators(x, boxes, rboxes, layout, sampling_ratio, 1)
        for n_threads in [2, 3, 4]:
            got = _all_operators(x, boxes, rboxes, layout, sampling_ratio, n_threads)
            for i, (g, e) in enumerate(zip(got, ref)):
                np.testing.assert_array_equal(g, e, err_msg=f"output {i}, n_threads={n_threads}")


# ---------------------------------------------------------------------------------------------
# no leak over many calls

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_memory_flat_over_many_calls():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 5))
    xi = rng.standard_normal((1, 3, 3, 3))  # tiny map: the NCHW kernels take the scratch path
    boxes = np.array([[0, 0.5, 0.7, 4.2, 5.1], [1, 1.1, 0.2, 3.3, 4.4]])
    rboxes = np.array([[0, 2.5, 3.1, 3.2, 2.1, 25.0], [1, 2.0, 2.2, 2.5, 3.5, -60.0]])
    whole = np.array([[0, 0.0, 0.0, 3.0, 3.0]])
    g = np.ones((2, 3, 2, 2))
    kw = dict(output_size=2, n_threads=1)
    calls = [
        lambda: roi_align(x, boxes, **kw),
        lambda: roi_align(x, boxes, mode="max", layout="NHWC", **kw),
        lambda: roi_align(xi, whole, sampling_ratio=2, **kw),
        lambda: roi_align_backward(g, x, boxes, wrt="both", **kw),
        lambda: roi_align_backward(g[:1], xi, whole, sampling_ratio=2, mode="max", **kw),
        lambda: roi_align_rotated(x, rboxes, **kw),
        lambda: roi_align_rotated(xi, rboxes[:1], sampling_ratio=3, **kw),
        lambda: roi_align_rotated_backward(g, x, rboxes, wrt="both", **kw),
    ]

    def bad_call():
        with pytest.raises(ValueError):
            roi_align(x, boxes, n_threads=0, output_size=2)

    def run(n):
        for i in range(n):
            calls[i % len(calls)]()
            if i % 16 == 0:
                bad_call()

    run(500)  # warm up: allocator pools, caches
    before = _rss_bytes()
    run(10_000)
    growth = _rss_bytes() - before
    assert growth < 5 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 10^4 calls"

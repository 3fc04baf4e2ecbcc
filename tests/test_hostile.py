"""Hostile but fair use (issue #10): fork children, grids past a raised guard, NaN at the map's
edge, NaN in max pooling, ``out=`` aliasing an input, bounded tables, ordered ``output_size``,
messages for the natural mistakes, and a source checkout run with ``python -m``."""
import multiprocessing
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

from conftest import make_features, to_nhwc

import roialign_cy
from roialign_cy import (roi_align, roi_align_backward, roi_align_rotated,
                         roi_align_rotated_backward)
from roialign_cy import _cpu

REPO = pathlib.Path(__file__).resolve().parent.parent
BOX = np.array([[0, 1.3, 1.6, 6.2, 5.7]])
RBOX = np.array([[0, 4.1, 3.7, 5.2, 3.3, 25.0]])


def _child_env():
    """The environment of a child that imports the roialign_cy this process imported."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(roialign_cy.__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])), root


# ---------------------------------------------------------------------------------------------
# 1. fork children


def _pool_in_child(seed):
    # enough work (100 boxes x 64 channels x 49 bins x 4 samples) for two threads to start
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((2, 64, 40, 40)).astype(np.float32)
    b = np.concatenate([rng.integers(0, 2, (100, 1)), rng.uniform(0, 15, (100, 2)),
                        rng.uniform(20, 39, (100, 2))], axis=1).astype(np.float32)
    return roi_align(f, b, 7, 1.0, 2, n_threads=2).sum(dtype=np.float64)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_calls_in_fork_children_after_a_parallel_call_do_not_hang():
    # a multi-threaded call in the parent leaves GNU OpenMP's pool behind; the children of a fork
    # pool must run on one thread instead of waiting for it (and give the same numbers)
    want = [_pool_in_child(s) for s in range(4)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        got = pool.map_async(_pool_in_child, range(4)).get(timeout=60)
    assert got == want


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_child_uses_one_thread():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the thread count and leave without running pytest's teardown
        os.write(w, str(_cpu.effective_n_threads(4)).encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.read(r, 16) == b"1" and status == 0
    assert _cpu.effective_n_threads(4) in (4, 1)  # the parent is unaffected (1: serial build)


# ---------------------------------------------------------------------------------------------
# 2. grids past a raised guard: an answer, a ValueError or a MemoryError saying what was too large

_OVERFLOW_CASES = [
    "roi_align_rotated(ones((1,1,8,8)), array([[0,4,4,4,4,0.]]), 2, sampling_ratio=2**31, max_samples_per_bin=M)",
    "roi_align_rotated(ones((1,1,8,8)), array([[0,4,4,2.**40,2.**40,0]]), 2, max_samples_per_bin=M)",
    "roi_align_rotated(ones((1,1,8,8)), array([[0,4,4,2.**40,1,0]]), 2, max_samples_per_bin=M)",
    "roi_align(ones((1,1,8,8)), array([[0,0,0,1e30,4]]), 2, max_samples_per_bin=M)",
    "roi_align(ones((1,1,8,8)), array([[0,0,0,1e30,4]]), 2, sampling_ratio=2, max_samples_per_bin=M)",
    "roi_align(ones((1,1,8,8)), array([[0,0,0,3e19,3e19]]), 2, max_samples_per_bin=M)",
    "roi_align(ones((1,1,8,8)), array([[0,0,0,1e18,1]]), 1, max_samples_per_bin=M)",
    "roi_align(ones((1,1,8,8)), array([[0,0,0,4e18,1]]), (1, 2), max_samples_per_bin=M)",
    "roi_align(ones((1,1,8,8), float32), array([[0,0,0,3e38,3e38]]), 2, 1e30, max_samples_per_bin=M)",
    "roi_align(ones((1,1,8,8)), array([[0,0,0,4,4.]]), (2**40, 2**40), sampling_ratio=1)",
    "roi_align_backward(ones((1,1,2,2)), ones((1,1,8,8)), array([[0,0,0,1e18,1]]), 2, max_samples_per_bin=M, wrt='both')",
    "roi_align_rotated_backward(ones((1,1,2,2)), ones((1,1,8,8)), array([[0,4,4,4,4,0.]]), 2, sampling_ratio=2**31, max_samples_per_bin=M, wrt='both')",
]


def test_raised_guard_never_crashes():
    # one child runs every case: a crash there is the failure this test exists to catch
    script = textwrap.dedent("""
        import sys
        from numpy import array, float32, ones, isfinite
        from roialign_cy import *
        M = sys.maxsize
        for call in sys.argv[1:]:
            try:
                out = eval(call)
                outs = out if isinstance(out, tuple) else (out,)
                print("finite" if all(isfinite(o).all() for o in outs) else "NOT FINITE")
            except (ValueError, MemoryError) as exc:
                print(type(exc).__name__, str(exc).splitlines()[0][:200])
            sys.stdout.flush()
    """)
    env, root = _child_env()
    proc = subprocess.run([sys.executable, "-c", script, *_OVERFLOW_CASES], env=env, cwd=root,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, f"crashed after {len(lines)} cases: {proc.stderr[-1500:]}"
    assert len(lines) == len(_OVERFLOW_CASES)
    for call, line in zip(_OVERFLOW_CASES, lines):
        assert line == "finite" or line.startswith(("ValueError", "MemoryError")), (call, line)
        if line.startswith("MemoryError"):
            assert "table" in line or "allocate" in line, (call, line)


# ---------------------------------------------------------------------------------------------
# 3. samples outside the image never read the map

# pixels whose value outside samples used to read with weight 0 (0 * NaN = NaN)
EDGE_PIXELS = [(0, 0), (0, 5), (4, 0), (7, 7)]


def _nan_at(pixel, layout, C=1, dtype=np.float64, H=8, W=8):
    x = np.ones((1, C, H, W), dtype)
    x[0, :, pixel[0], pixel[1]] = np.nan
    return x if layout == "NCHW" else to_nhwc(x)


OUTSIDE_BOXES = np.array([
    [0, 20.0, 20.0, 30.0, 30.0],    # below and right of the image
    [0, -30.0, -30.0, -20.0, -20.0],  # above and left
    [0, 2.0, -30.0, 5.0, -20.0],    # above, over the columns
    [0, -30.0, 2.0, -20.0, 5.0],    # left, over the rows
])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("mode", ["avg", "max", "onnx_max"])
@pytest.mark.parametrize("pixel", EDGE_PIXELS)
@pytest.mark.parametrize("C, K", [(1, 4), (16, 400)])  # direct planes / channels-last blocks
def test_nan_pixel_does_not_leak_into_boxes_outside_the_image(layout, mode, pixel, C, K):
    x = _nan_at(pixel, layout, C)
    boxes = np.tile(OUTSIDE_BOXES, (K // 4, 1))
    out = roi_align(x, boxes, 3, 1.0, 2, layout=layout, mode=mode)
    assert np.array_equal(out, np.zeros_like(out))
    if mode == "onnx_max":
        return
    g = np.ones_like(out)
    gf, gb = roi_align_backward(g, x, boxes, 3, 1.0, 2, layout=layout, mode=mode, wrt="both")
    assert np.array_equal(gf, np.zeros_like(gf)) and np.array_equal(gb, np.zeros_like(gb))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("pixel", EDGE_PIXELS)
@pytest.mark.parametrize("C, K", [(1, 4), (16, 400)])
def test_nan_pixel_does_not_leak_into_rotated_boxes_outside_the_image(layout, pixel, C, K):
    x = _nan_at(pixel, layout, C)
    boxes = np.tile(np.array([[0, 25, 25, 4, 4, 30.0], [0, -20, -20, 6, 3, -60.0],
                              [0, 4, -20, 3, 3, 45.0], [0, -20, 4, 3, 3, 10.0]]), (K // 4, 1))
    out = roi_align_rotated(x, boxes, 3, 1.0, 2, layout=layout)
    assert np.array_equal(out, np.zeros_like(out))
    gf, gb = roi_align_rotated_backward(np.ones_like(out), x, boxes, 3, 1.0, 2, layout=layout,
                                        wrt="both")
    assert np.array_equal(gf, np.zeros_like(gf)) and np.array_equal(gb, np.zeros_like(gb))


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_box_straddling_the_edge_reads_only_inside_samples(mode):
    # half the samples of each bin lie left of x = -1: they count (as 0) but read nothing, while
    # the inside half reads finite pixels of a map whose far column is NaN
    x = np.ones((1, 1, 8, 8))
    x[0, 0, :, 0] = np.nan  # column 0 is read only by samples clamped to it (x in [-1, 0])
    boxes = np.array([[0, -6.0, 2.0, 0.5, 6.0]])  # x from -6 to 0.5; samples at x < -1 read nothing
    out = roi_align(x, boxes, (1, 2), 1.0, 2, aligned=True, mode=mode)
    assert np.isnan(out[0, 0, 0, 1])  # this bin's inside samples do read column 0
    assert out[0, 0, 0, 0] == 0  # ... and this one's lie wholly left of x = -1


# ---------------------------------------------------------------------------------------------
# 4. max pooling and NaN: numpy.max's rule, in the forward and the gradient


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_max_mode_propagates_nan_wherever_it_is_sampled(layout, where):
    # one bin of 2 x 2 samples over a 4 x 4 map; the NaN pixel is read by one corner sample only
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    x[0, 0, 0 if where == "first" else 3, 0 if where == "first" else 3] = np.nan
    xl = x if layout == "NCHW" else to_nhwc(x)
    boxes = np.array([[0, 0.0, 0.0, 4.0, 4.0]])  # samples at 1 and 3 (aligned): taps 1..3 / 3
    boxes = np.array([[0, -1.0, -1.0, 7.0, 7.0]]) if where == "first" else boxes
    out = roi_align(xl, boxes, 1, 1.0, 2, aligned=True, mode="max", layout=layout)
    assert np.isnan(out).all()
    g = roi_align_backward(np.ones_like(out), xl, boxes, 1, 1.0, 2, aligned=True, mode="max",
                           layout=layout)
    g = g if layout == "NCHW" else np.moveaxis(g, -1, 1)
    # the gradient goes to the taps of the sample that read the NaN (the arg-max)
    assert g[0, 0, 0 if where == "first" else 3, 0 if where == "first" else 3] > 0


def test_max_mode_nan_rule_matches_the_reference(rng):
    import reference

    x = make_features(rng, 1, 3, 9, 9)
    x[0, 0, 2, 3] = x[0, 2, 8, 8] = np.nan
    boxes = np.array([[0, 0.3, 0.6, 8.7, 8.2], [0, 2.2, 1.1, 5.3, 4.4]])
    for mode in ["max", "onnx_max"]:
        want = reference.roi_align_ref(x, boxes[:, 1:], boxes[:, 0].astype(int), 3, 3, 1.0, 2,
                                       True, mode=mode)
        got = roi_align(x, boxes, 3, 1.0, 2, aligned=True, mode=mode)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# 5. out= overlapping an input


@pytest.mark.parametrize("which", ["features", "features_view", "boxes", "batch_indices"])
def test_out_sharing_memory_with_an_input_is_refused(which):
    x = np.random.default_rng(0).standard_normal((1, 2, 8, 8))
    boxes = np.array([[1.0, 1, 6, 6], [2, 2, 5, 7]])
    idx = np.zeros(2, np.int64)
    shape = (2, 2, 2, 2)
    if which == "features":
        out = x.reshape(-1)[:16].reshape(shape)
    elif which == "features_view":
        out = x[0, 1].reshape(-1)[8:24].reshape(shape)
    elif which == "boxes":
        boxes = np.zeros(16)
        boxes[:8] = [1.0, 1, 6, 6, 2, 2, 5, 7]
        out, boxes = boxes.reshape(shape), boxes[:8].reshape(2, 4)
    else:
        buf = np.zeros(16)
        out, idx = buf.reshape(shape), buf[:2].view(np.int64)
    with pytest.raises(ValueError, match="out must not share memory with"):
        roi_align(x, boxes, 2, batch_indices=idx, out=out)


def test_out_beside_an_input_in_one_buffer_is_fine():
    buf = np.zeros(32)
    x = buf[:16].reshape(1, 1, 4, 4)
    x[:] = 1
    out = buf[16:20].reshape(1, 1, 2, 2)
    roi_align(x, np.array([[0, 0, 0, 3, 3.0]]), 2, out=out)
    assert np.allclose(out, 1)


# ---------------------------------------------------------------------------------------------
# 6. tables stay bounded for one huge rotated box (scratch bounds: test_large.py)


def test_one_huge_rotated_box_is_built_in_pieces(monkeypatch):
    # 10 x 10 bins of 256 x 256 samples: 26 M table entries (about 300 MB) in one piece before
    x = make_features(np.random.default_rng(3), 1, 2, 40, 40, np.float32)
    boxes = np.array([[0, 20.3, 19.6, 30.5, 24.1, 33.0]], np.float32)
    tracemalloc.start()
    got = roi_align_rotated(x, boxes, 10, 1.0, 256, n_threads=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100 << 20, f"peak {peak / 2**20:.0f} MiB"
    monkeypatch.setattr(_cpu, "TABLE_ENTRIES_PER_CHUNK", 1 << 30)  # one piece: the old tables
    np.testing.assert_array_equal(got, roi_align_rotated(x, boxes, 10, 1.0, 256, n_threads=2))
    g = np.random.default_rng(4).standard_normal(got.shape).astype(np.float32)
    whole = roi_align_rotated_backward(g, x, boxes, 10, 1.0, 256)
    monkeypatch.setattr(_cpu, "TABLE_ENTRIES_PER_CHUNK", 1 << 12)  # many pieces per box
    np.testing.assert_array_equal(whole, roi_align_rotated_backward(g, x, boxes, 10, 1.0, 256))
    np.testing.assert_array_equal(got, roi_align_rotated(x, boxes, 10, 1.0, 256))


# ---------------------------------------------------------------------------------------------
# 7. output_size: an int or an ordered pair


@pytest.mark.parametrize("size", [{7, 3}, {7: 1, 3: 2}, (s for s in (7, 3)), iter([7, 3]),
                                  range(7, 9), "73", np.array([[7, 3]])])
def test_output_size_unordered_or_odd_containers_are_refused(size):
    with pytest.raises((TypeError, ValueError), match="output_size"):
        roi_align(np.ones((1, 1, 8, 8)), BOX, size)


@pytest.mark.parametrize("size", [(7, 3), [7, 3], np.array([7, 3]), np.array([7, 3], np.int32)])
def test_output_size_ordered_pairs_are_taken_in_order(size):
    assert roi_align(np.ones((1, 1, 8, 8)), BOX, size).shape == (1, 1, 7, 3)


# ---------------------------------------------------------------------------------------------
# 8. messages for the natural mistakes


def test_list_of_box_rows_says_what_a_list_means():
    with pytest.raises(ValueError, match=r"one \(L, 4\) array of boxes per image.*np\.asarray"):
        roi_align(np.ones((1, 1, 8, 8)), [[0, 1, 1, 9, 9]], 2)


@pytest.mark.parametrize("features", [None, 3.0, "features"])
def test_features_that_are_not_an_array_say_so(features):
    with pytest.raises(TypeError, match="features must be a float array"):
        roi_align(features, BOX, 2)


@pytest.mark.parametrize("wrt", ["boxes", "both"])
def test_shape_only_features_for_the_box_gradient_blame_the_box_gradient(wrt):
    with pytest.raises(ValueError) as info:
        roi_align_backward(np.ones((1, 1, 2, 2)), (1, 1, 8, 8), BOX, 2, wrt=wrt)
    assert "box gradient reads the feature values" in str(info.value)
    assert "mode='avg'" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# 9. a source checkout run with python -m says what to do


def test_python_m_from_an_unbuilt_checkout_says_what_to_do(tmp_path):
    # what a fresh clone sees: the package's sources without built extensions, first on sys.path
    src = tmp_path / "roialign_cy"
    shutil.copytree(REPO / "roialign_cy", src,
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__"))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-m", "roialign_cy", "demo", "--out",
                           str(tmp_path / "demo.png")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "not built" in text and "roialign-cy demo" in text and "build_ext --inplace" in text

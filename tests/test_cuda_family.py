"""The CUDA kernels of roi_pool, ps_roi_align and ps_roi_pool (cuda/roi_family.cu; docs/conventions.md
sections 8 and 9).

The levels of test_cuda.py, which also compiles this source with nvcc and NVRTC (it compiles every
module of ``_cuda.SOURCES``):
1. host emulation: the kernels compiled as C++ and driven by the backend's own launch code
   (``_cuda._Ops``), against the numpy reference of tests/reference.py; the deterministic
   gradients checked to be independent of the order threads and blocks run in;
2. on a GPU (marked ``gpu``; skipped with the reason when CuPy or a device is missing): the public
   operators on cupy arrays against the same calls on numpy arrays.
"""
import dataclasses

import numpy as np
import pytest

import reference as ref
from conftest import edge_case_boxes, random_boxes, to_nchw, to_nhwc
from cuda_host import emulator
from test_cuda import DTYPES, assert_close, cp, emu, emu_lib, gpu_vs_cpu_inputs  # noqa: F401 (fixtures)

import roialign_cy
from roialign_cy import _cuda
from roialign_cy._params import LAYOUTS, OpParams

FAMILY = ("roi_pool", "ps_roi_align", "ps_roi_pool")
# (op, the options that op has): ps_roi_align's sampling ratio, ps_roi_pool's clipping rule
VARIANTS = [("roi_pool", {}), ("ps_roi_align", {"sampling_ratio": -1}), ("ps_roi_align", {"sampling_ratio": 2}),
            ("ps_roi_pool", {"edge": "torchvision"}), ("ps_roi_pool", {"edge": "image"})]
VARIANT_IDS = ["-".join([op, *map(str, kw.values())]) for op, kw in VARIANTS]
# (N, H, W), spatial_scale, (PH, PW). The one-row map has bins finer than its pixels, which overlap,
# and ps_roi_pool's "torchvision" edge pools nothing from it (its last row is never pooled).
CASES = [((2, 13, 11), 1.0, (3, 2)), ((1, 1, 7), 0.5, (2, 3)), ((2, 20, 17), 0.25, (4, 3))]
CASE_IDS = ["2x13x11-s1", "1x1x7-s0.5", "2x20x17-s0.25"]


def params(op, pooled, scale, layout="NCHW", deterministic=True, sampling_ratio=-1, edge="torchvision"):
    # aligned=True is what the API passes for ps_roi_align; the integer-bin ops ignore it
    return OpParams(*pooled, scale, sampling_ratio, True, channels_last=layout == "NHWC",
                    deterministic=deterministic, op=op, edge=edge)


def channels(op, pooled, c_out=None):
    """Input channels for ``c_out`` output channels (default 3 for roi_pool, 2 for the others): roi_pool
    keeps them, the position-sensitive ops take C_out * PH * PW."""
    if op == "roi_pool":
        return c_out or 3
    return (c_out or 2) * pooled[0] * pooled[1]


def out_channels(op, c, pooled):
    return c if op == "roi_pool" else c // (pooled[0] * pooled[1])


def tie_boxes(N, scale):
    """Boxes whose scaled corners end in .5 exactly: C's round takes them away from zero (2.5 -> 3,
    -0.5 -> -1), where numpy's round would take them to the even neighbour."""
    return np.array([[0, 2.5, 0.5, 6.5, 3.5], [N - 1, -0.5, -1.5, 4.5, 5.5], [0, 1.5, 2.5, 2.5, 4.5]]) / [
        1, scale, scale, scale, scale]


def family_boxes(rng, N, H, W, scale):
    return np.concatenate([edge_case_boxes(rng, N, H, W, scale), random_boxes(rng, 6, N, H, W, scale),
                           tie_boxes(N, scale)])


def kernel_inputs(rng, x, boxes, pooled, c_out, dtype, layout):
    """(features, rois, batch_idx, grad_out) as the kernels take them, and the NCHW float64 features
    and gradient holding the same values, for the reference."""
    g = rng.standard_normal((len(boxes), c_out, *pooled)).astype(dtype)
    x = x.astype(dtype)
    rois = np.ascontiguousarray(boxes[:, 1:], dtype=np.float32 if dtype == np.float16 else dtype)
    batch_idx = boxes[:, 0].astype(np.int64)
    kernel = (to_nhwc(x), rois, batch_idx, to_nhwc(g)) if layout == "NHWC" else (x, rois, batch_idx, g)
    return kernel, (x.astype(np.float64), g.astype(np.float64))


def run_kernels(ops, arrays, p):
    """forward and feature gradient, NCHW; the position-sensitive gradients get no features."""
    x, rois, batch_idx, g = arrays
    out = np.empty(g.shape, x.dtype)
    ops.forward(x, rois, batch_idx, out, p)
    grad = np.zeros_like(x)
    ops.backward_features(g, x if p.op == "roi_pool" else None, rois, batch_idx, grad, p)
    return (to_nchw(out), to_nchw(grad)) if p.channels_last else (out, grad)


def reference(op, x, rois, batch_idx, g, pooled, scale, dtype, sampling_ratio=-1, edge="torchvision"):
    """(forward, feature gradient) of tests/reference.py, NCHW float64; the integer bins formed in the
    kernels' arithmetic (float32 for float16 features)."""
    PH, PW = pooled
    t = np.float64 if dtype == np.float64 else np.float32
    if op == "roi_pool":
        return (ref.roi_pool_ref(x, rois, batch_idx, PH, PW, scale, t)[0],
                ref.roi_pool_backward_ref(g, x, rois, batch_idx, PH, PW, scale, t))
    if op == "ps_roi_pool":
        return (ref.ps_roi_pool_ref(x, rois, batch_idx, PH, PW, scale, t, edge),
                ref.ps_roi_pool_backward_ref(g, x.shape, rois, batch_idx, PH, PW, scale, t, edge))
    return (ref.ps_roi_align_ref(x, rois, batch_idx, PH, PW, scale, sampling_ratio),
            ref.ps_roi_align_backward_ref(g, x.shape, rois, batch_idx, PH, PW, scale, sampling_ratio))


def check_against_reference(ops, op, x, boxes, rng, pooled, scale, dtype, layout, **kw):
    """Both gradients (deterministic gather and atomic scatter) and the forward against the reference;
    returns the kernels' NCHW forward."""
    kernel, (x64, g64) = kernel_inputs(rng, x, boxes, pooled, out_channels(op, x.shape[1], pooled), dtype, layout)
    want_out, want_grad = reference(op, x64, kernel[1], kernel[2], g64, pooled, scale, dtype, **kw)
    for deterministic in (True, False):
        out, grad = run_kernels(ops, kernel, params(op, pooled, scale, layout, deterministic, **kw))
        assert_close(out, want_out, dtype, "forward")
        if op == "roi_pool":  # a max is one of the pixels: exact in every dtype
            assert np.array_equal(out, want_out.astype(dtype), equal_nan=True)
        assert_close(grad, want_grad, dtype, f"grad_features deterministic={deterministic}")
    return out


# ---------------------------------------------------------------------------------------------
# 1. host emulation against the reference


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, kw", VARIANTS, ids=VARIANT_IDS)
def test_emulated_family_matches_reference(emu, rng, op, kw, dtype, layout, case):
    (N, H, W), scale, pooled = case
    x = rng.standard_normal((N, channels(op, pooled), H, W))
    out = check_against_reference(emu.ops, op, x, family_boxes(rng, N, H, W, scale), rng, pooled, scale, dtype,
                                  layout, **kw)
    if op == "ps_roi_pool" and kw["edge"] == "torchvision" and H == 1:
        assert not out.any()  # the last (only) row is never pooled


@pytest.mark.parametrize("op", ["roi_pool", "ps_roi_pool"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_emulated_integer_bins_of_huge_and_far_boxes(emu, rng, op, dtype):
    # corners past 2**31 and bins of a billion pixels: the bin arithmetic is 64-bit
    N, H, W = 1, 9, 8
    boxes = np.array([[0, -3e9, -3e9, 3e9, 3e9], [0, -1e7, 2, 5, 1e7], [0, 4e9, 4e9, 5e9, 5e9],
                      [0, -5e9, 1, -4e9, 6], [0, 3, -2e6, 4, 7.5]])
    pooled = (3, 2)
    for edge in ("torchvision", "image") if op == "ps_roi_pool" else ("torchvision",):
        x = rng.standard_normal((N, channels(op, pooled), H, W))
        kw = {"edge": edge} if op == "ps_roi_pool" else {}
        check_against_reference(emu.ops, op, x, boxes, rng, pooled, 1.0, dtype, "NCHW", **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_roi_pool_ties_go_to_the_first_maximum(emu, rng, dtype, layout):
    # few distinct values: most bins hold their maximum several times (docs/conventions.md 8.5)
    N, H, W = 2, 11, 9
    x = rng.integers(0, 3, (N, 3, H, W)).astype(np.float64)
    check_against_reference(emu.ops, "roi_pool", x, family_boxes(rng, N, H, W, 1.0), rng, (3, 3), 1.0, dtype,
                            layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_roi_pool_nan_wins_and_takes_the_gradient(emu, rng, dtype, layout):
    # numpy's rule (docs/conventions.md 8.4, 8.5): a NaN pixel wins over a larger number found later,
    # and the first NaN in row-major order is the arg-max
    x = np.arange(20.0).reshape(1, 1, 4, 5)
    x[0, 0, 1, 3] = x[0, 0, 2, 1] = np.nan
    x[0, 0, 3, 4] = 100.0
    # one bin each: the whole map, rows 2-3, row 3
    boxes = np.array([[0, 0, 0, 4, 3], [0, 0, 2, 4, 3], [0, 0, 3, 4, 3]], np.float64)
    kernel, _ = kernel_inputs(rng, x, boxes, (1, 1), 1, dtype, layout)
    kernel = (*kernel[:3], np.ones_like(kernel[3]))
    for deterministic in (True, False):
        out, grad = run_kernels(emu.ops, kernel, params("roi_pool", (1, 1), 1.0, layout, deterministic))
        assert np.isnan(out[:2]).all() and out[2, 0, 0, 0] == 100
        want = np.zeros((4, 5))
        want[1, 3] = want[2, 1] = want[3, 4] = 1
        assert np.array_equal(grad[0, 0], want), deterministic
    check_against_reference(emu.ops, "roi_pool", x, boxes, rng, (1, 1), 1.0, dtype, layout)


@pytest.mark.parametrize("op", FAMILY)
def test_emulated_parameters_that_do_not_apply_change_nothing(emu, rng, op):
    # roi_pool and ps_roi_pool have no sampling ratio, aligned flag or mode; ps_roi_align always
    # samples with the half-pixel offset (docs/conventions.md 9.3); only ps_roi_pool has an edge rule
    N, H, W, pooled = 2, 10, 9, (2, 2)
    x = rng.standard_normal((N, channels(op, pooled), H, W))
    kernel, _ = kernel_inputs(rng, x, family_boxes(rng, N, H, W, 1.0), pooled, out_channels(op, x.shape[1], pooled),
                              np.float32, "NCHW")
    base = params(op, pooled, 1.0, sampling_ratio=2)
    changes = [{"aligned": False}, {"mode": "max"}]
    if op != "ps_roi_align":
        changes.append({"sampling_ratio": 5})
    if op != "ps_roi_pool":
        changes.append({"edge": "image"})
    want = [a.tobytes() for a in run_kernels(emu.ops, kernel, base)]
    for change in changes:
        got = [a.tobytes() for a in run_kernels(emu.ops, kernel, dataclasses.replace(base, **change))]
        assert got == want, change


@pytest.mark.parametrize("op", FAMILY)
def test_emulated_empty_inputs_launch_nothing(emu, op):
    p = params(op, (2, 2), 1.0)
    c = channels(op, (2, 2))
    x = np.ones((1, c, 5, 5), np.float32)
    rois, batch_idx = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    g = np.empty((0, out_channels(op, c, (2, 2)), 2, 2), np.float32)
    emu.ops.forward(x, rois, batch_idx, np.empty_like(g), p)
    grad_x = np.zeros_like(x)
    emu.ops.backward_features(g, x, rois, batch_idx, grad_x, p)
    assert emu.launches == [] and not grad_x.any()


@pytest.mark.parametrize("op", FAMILY)
def test_box_gradient_is_refused(op):
    def launch(*args):
        raise AssertionError("nothing may be launched")

    ops = _cuda._Ops(np, launch)
    x, rois = np.ones((1, 4, 5, 5), np.float32), np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match=f"{op} has no gradient with respect to the boxes"):
        ops.backward_boxes(np.ones((1, 1, 2, 2), np.float32), x, rois, np.zeros(1, np.int64), np.zeros_like(rois),
                           params(op, (2, 2), 1.0))


def test_roi_pool_gradient_without_features_is_refused():
    ops = _cuda._Ops(np, lambda *args: None)
    with pytest.raises(ValueError, match="needs the features"):
        ops.backward_features(np.ones((1, 1, 2, 2), np.float32), None, np.array([[0, 0, 3, 3]], np.float32),
                              np.zeros(1, np.int64), np.zeros((1, 1, 5, 5), np.float32), params("roi_pool", (2, 2), 1.0))


def test_family_kernels_are_compiled_into_one_module():
    source = _cuda.SOURCES["roi_family"]
    for scalar in _cuda.SCALARS.values():
        names = set(_cuda.name_expressions(source, scalar))
        for op in FAMILY:
            assert f"{op}_forward<{scalar}, true>" in names and f"{op}_footprint<{scalar}>" in names
            assert not any(n.startswith(f"{op}_backward_boxes") for n in names)
    # only the tile-list kernels are in every module
    shared = set(_cuda.name_expressions(source, "float")) & set(_cuda.name_expressions("roi_align.cu", "float"))
    assert shared == {"roi_tiles_count", "roi_tiles_fill", "roi_tiles_count_levels", "roi_tiles_fill_levels"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", FAMILY)
def test_emulated_deterministic_gradients_ignore_scheduling(emu_lib, rng, monkeypatch, op, layout):
    # Large overlapping boxes: many terms per gradient element. Shuffling the order of blocks and
    # threads, or looping everything through one block, must not change a bit.
    N, H, W, pooled = 2, 20, 17, (4, 3)
    boxes = random_boxes(rng, 12, N, H, W)
    boxes[:, 3:] += 0.5 * boxes[:, 3:] - 0.5 * boxes[:, 1:3]  # grow to the bottom right
    x = rng.standard_normal((N, channels(op, pooled), H, W))
    (x, rois, batch_idx, g), _ = kernel_inputs(rng, x, boxes, pooled, out_channels(op, x.shape[1], pooled),
                                               np.float32, layout)
    p = params(op, pooled, 1.0, layout, sampling_ratio=2)

    def gradients(seed):
        grad_x = np.zeros_like(x)
        emulator.Emulator(emu_lib, seed).ops.backward_features(g, x, rois, batch_idx, grad_x, p)
        return grad_x.tobytes()

    first = gradients(0)
    assert all(gradients(seed) == first for seed in (1, 2))
    monkeypatch.setattr(_cuda, "MAX_BLOCKS", 1)
    assert gradients(3) == first


# ---------------------------------------------------------------------------------------------
# 2. on a GPU: cupy arrays through the public API against numpy arrays


def public(op):
    """The public forward and gradient of ``op``."""
    return getattr(roialign_cy, op), getattr(roialign_cy, f"{op}_backward")


def gpu_family_vs_cpu(cp, op, x, boxes, g, dtype, layout, output_size, spatial_scale, **kw):
    """[(what, gpu result, cpu result)]: the forward and both feature gradients (deterministic and
    atomic) of the public operator ``op`` on the same values."""
    if layout == "NHWC":
        x, g = to_nhwc(x), to_nhwc(g)
    gpu, cpu = gpu_vs_cpu_inputs(cp, x, boxes, g, dtype)
    forward, backward = public(op)
    kw.update(output_size=output_size, spatial_scale=spatial_scale, layout=layout, allow_inverted=True)
    got = forward(gpu[0], gpu[1], **kw)
    assert isinstance(got, cp.ndarray) and got.dtype == dtype
    results = [("forward", cp.asnumpy(got), forward(cpu[0], cpu[1], **kw))]
    want = backward(cpu[2], cpu[0], cpu[1], **kw)
    for deterministic in (True, False):
        got = backward(gpu[2], gpu[0], gpu[1], deterministic=deterministic, **kw)
        results.append((f"grad_features deterministic={deterministic}", cp.asnumpy(got), want))
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + [((3, 40, 33), 0.25, (7, 7))], ids=CASE_IDS + ["3x40x33-s0.25"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, kw", VARIANTS, ids=VARIANT_IDS)
def test_gpu_family_matches_cpu(cp, rng, op, kw, dtype, layout, case):
    (N, H, W), scale, pooled = case
    boxes = family_boxes(rng, N, H, W, scale)
    x = rng.standard_normal((N, channels(op, pooled), H, W))
    g = rng.standard_normal((len(boxes), out_channels(op, x.shape[1], pooled), *pooled))
    for what, got, want in gpu_family_vs_cpu(cp, op, x, boxes, g, dtype, layout, pooled, scale, **kw):
        assert_close(got, want, dtype, what)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_roi_pool_nan_wins_and_takes_the_gradient(cp, dtype, layout):
    x = np.arange(20.0).reshape(1, 1, 4, 5)
    x[0, 0, 1, 3] = x[0, 0, 2, 1] = np.nan
    boxes = np.array([[0, 0, 0, 4, 3], [0, 0, 2, 4, 3]], np.float64)
    for what, got, want in gpu_family_vs_cpu(cp, "roi_pool", x, boxes, np.ones((2, 1, 1, 1)), dtype, layout, 1, 1.0):
        assert_close(got, want, dtype, what)
        if what == "forward":
            assert np.isnan(got).all()
        else:
            got = to_nchw(got) if layout == "NHWC" else got
            assert got[0, 0, 1, 3] == 1 and got[0, 0, 2, 1] == 1 and np.nansum(got) == 2, what


@pytest.mark.gpu
@pytest.mark.parametrize("op", FAMILY)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_family_deterministic_gradients_are_bit_identical(cp, rng, monkeypatch, op, layout):
    N, H, W, pooled = 2, 48, 40, (7, 7)
    boxes = random_boxes(rng, 64, N, H, W).astype(np.float32)
    x = rng.standard_normal((N, channels(op, pooled, 8 if op == "roi_pool" else 2), H, W)).astype(np.float32)
    g = rng.standard_normal((len(boxes), out_channels(op, x.shape[1], pooled), *pooled)).astype(np.float32)
    if layout == "NHWC":
        x, g = to_nhwc(x), to_nhwc(g)
    x, g, b = cp.asarray(x), cp.asarray(g), cp.asarray(boxes)
    backward = public(op)[1]

    def bits():
        return cp.asnumpy(backward(g, x, b, output_size=pooled, spatial_scale=1.0, layout=layout)).tobytes()

    first = bits()
    assert bits() == first
    monkeypatch.setattr(_cuda, "MAX_BLOCKS", 3)  # another launch configuration: same bits
    assert bits() == first


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_roi_pool_arg_max_round_trip(emu, rng, dtype, layout):
    """forward(..., argmax=) returns the forward's values and the int32 arg-max pixels the CPU
    returns; the gradient from them equals the one that searches again; entries outside the map
    are refused."""
    N, H, W, pooled = 2, 9, 11, (3, 2)
    x = rng.standard_normal((N, 3, H, W))
    kernel, _ = kernel_inputs(rng, x, family_boxes(rng, N, H, W, 0.5), pooled, 3, dtype, layout)
    xk, rois, batch_idx, g = kernel
    for deterministic in (True, False):
        p = params("roi_pool", pooled, 0.5, layout, deterministic)
        out, arg = np.empty(g.shape, xk.dtype), np.empty(g.shape, np.int32)
        emu.launches.clear()
        emu.ops.forward(xk, rois, batch_idx, out, p, argmax=arg)
        # the values and their arg-max in one pass over the bins
        assert [name.split("<")[0] for name, _, _ in emu.launches] == ["roi_pool_forward_argmax"]
        np.testing.assert_array_equal(out, run_kernels(emu.ops, kernel, p)[0] if layout == "NCHW"
                                      else to_nhwc(run_kernels(emu.ops, kernel, p)[0]))
        if dtype != np.float16:
            want = np.empty_like(arg)
            roialign_cy._cpu.forward(xk, rois, batch_idx, np.empty_like(out), p, argmax=want)
            np.testing.assert_array_equal(arg, want)
        searched, given = np.zeros_like(xk), np.zeros_like(xk)
        emu.ops.backward_features(g, xk, rois, batch_idx, searched, p)
        emu.ops.backward_features(g, None, rois, batch_idx, given, p, argmax=arg)
        np.testing.assert_array_equal(searched, given)
    arg.reshape(-1)[0] = H * W
    with pytest.raises(ValueError, match="outside"):
        emu.ops.backward_features(g, None, rois, batch_idx, np.zeros_like(xk), p, argmax=arg)

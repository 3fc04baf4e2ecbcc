"""RoIPool, ps_roi_align and ps_roi_pool on the CPU (docs/conventions.md, sections 8 and 9):
values and feature gradients against the numpy reference, every box form and layout, the NaN and
edge rules, the adjoint identity of the gradients, plans, and the arguments they refuse."""
import numpy as np
import pytest

import roialign_cy
from conftest import (box_forms, edge_case_boxes, make_features, random_boxes, sort_by_image,
                      split_batch, to_nchw, to_nhwc)
import reference as ref

OPS = ("roi_pool", "ps_roi_align", "ps_roi_pool")
TOL = {np.float32: 2e-5, np.float64: 1e-12}
# (N, C_out, H, W), output size, spatial_scale: PS maps get C_out * PH * PW channels
CASES = [((2, 3, 11, 13), (3, 2), 0.5), ((1, 2, 7, 5), (2, 2), 1.0), ((3, 1, 16, 9), (4, 3), 0.25),
         ((1, 2, 1, 6), (1, 3), 1.0)]


def channels(op, c_out, pooled):
    return c_out * pooled[0] * pooled[1] if op != "roi_pool" else c_out


def call(op, x, boxes, pooled, scale, sr, layout="NCHW", **kw):
    if op == "ps_roi_align":
        return roialign_cy.ps_roi_align(x, boxes, pooled, scale, sr, layout=layout, **kw)
    return getattr(roialign_cy, op)(x, boxes, pooled, scale, layout=layout, **kw)


def call_backward(op, g, x, boxes, pooled, scale, sr, layout="NCHW", **kw):
    fn = getattr(roialign_cy, op + "_backward")
    if op == "ps_roi_align":
        return fn(g, x, boxes, pooled, scale, sr, layout=layout, **kw)
    return fn(g, x, boxes, pooled, scale, layout=layout, **kw)


def reference(op, x, boxes, pooled, scale, sr, dtype, edge="torchvision"):
    rois, b = split_batch(boxes)
    if op == "roi_pool":
        return ref.roi_pool_ref(x, rois, b, *pooled, scale, dtype)[0]
    if op == "ps_roi_pool":
        return ref.ps_roi_pool_ref(x, rois, b, *pooled, scale, dtype, edge)
    return ref.ps_roi_align_ref(x, rois, b, *pooled, scale, sr)


def reference_backward(op, g, x, boxes, pooled, scale, sr, dtype, edge="torchvision"):
    rois, b = split_batch(boxes)
    if op == "roi_pool":
        return ref.roi_pool_backward_ref(g, x, rois, b, *pooled, scale, dtype)
    if op == "ps_roi_pool":
        return ref.ps_roi_pool_backward_ref(g, x.shape, rois, b, *pooled, scale, dtype, edge)
    return ref.ps_roi_align_backward_ref(g, x.shape, rois, b, *pooled, scale, sr)


def assert_close(got, want, dtype, what):
    err = np.max(np.abs(got - want), initial=0) / max(1.0, np.max(np.abs(want), initial=0))
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g}"


def problem(rng, op, shape, pooled, scale, dtype, edge_cases=False):
    n, c_out, h, w = shape
    x = make_features(rng, n, channels(op, c_out, pooled), h, w, dtype)
    boxes = random_boxes(rng, 9, n, h, w, scale)
    if edge_cases:
        boxes = np.concatenate([boxes, edge_case_boxes(rng, n, h, w, scale)])
    return x, sort_by_image(boxes).astype(dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,pooled,scale", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_matches_reference(rng, op, shape, pooled, scale, dtype, layout):
    x, boxes = problem(rng, op, shape, pooled, scale, dtype, edge_cases=True)
    srs = (-1, 2) if op == "ps_roi_align" else (0,)
    edges = ("torchvision", "image") if op == "ps_roi_pool" else ("torchvision",)
    xin = to_nhwc(x) if layout == "NHWC" else x
    for sr in srs:
        for edge in edges:
            kw = {"edge": edge} if op == "ps_roi_pool" else {}
            out = call(op, xin, boxes, pooled, scale, sr, layout, allow_inverted=True, **kw)
            out = to_nchw(out) if layout == "NHWC" else out
            want = reference(op, x, boxes, pooled, scale, sr, dtype, edge)
            assert out.dtype == dtype and out.shape == want.shape
            assert_close(out, want, dtype, f"{op} forward sr={sr} edge={edge}")
            g = rng.standard_normal(want.shape).astype(dtype)
            gin = to_nhwc(g) if layout == "NHWC" else g
            grad = call_backward(op, gin, xin, boxes, pooled, scale, sr, layout,
                                 allow_inverted=True, **kw)
            grad = to_nchw(grad) if layout == "NHWC" else grad
            assert_close(grad, reference_backward(op, g, x, boxes, pooled, scale, sr, dtype, edge),
                         dtype, f"{op} gradient sr={sr} edge={edge}")


@pytest.mark.parametrize("op", OPS)
def test_every_box_form_gives_the_same_result(rng, op):
    pooled = (2, 3)
    x, boxes = problem(rng, op, (3, 2, 9, 8), pooled, 0.5, np.float64)
    results = [call(op, x, b, pooled, 0.5, 2, batch_indices=idx) for b, idx in box_forms(boxes, 3)]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_is_the_adjoint_of_the_forward(rng, op, dtype):
    """ps_roi_align and ps_roi_pool are linear in the features, roi_pool is where the arg-max
    does not move: <g, F(x + d)> - <g, F(x)> = <grad, d> for a small d (exact up to rounding)."""
    pooled = (3, 3)
    x, boxes = problem(rng, op, (2, 2, 10, 12), pooled, 0.5, dtype)
    g = rng.standard_normal(call(op, x, boxes, pooled, 0.5, 2).shape).astype(dtype)
    grad = call_backward(op, g, x, boxes, pooled, 0.5, 2)
    d = (rng.standard_normal(x.shape) * (1e-3 if op == "roi_pool" else 1.0)).astype(dtype)
    if op == "roi_pool":  # keep every arg-max in place: well separated values, tiny step
        x = (np.argsort(rng.permutation(x.size)).reshape(x.shape) * 0.01).astype(dtype)
        grad = call_backward(op, g, x, boxes, pooled, 0.5, 2)
    lhs = np.sum(g.astype(np.float64) * (call(op, x + d, boxes, pooled, 0.5, 2).astype(np.float64)
                                         - call(op, x, boxes, pooled, 0.5, 2)))
    rhs = np.sum(grad.astype(np.float64) * d)
    assert lhs == pytest.approx(rhs, rel=1e-4 if dtype == np.float32 else 1e-10, abs=1e-6)


def test_roi_pool_nan_wins_and_takes_the_gradient():
    x = np.arange(2 * 6 * 6, dtype=np.float64).reshape(1, 2, 6, 6)
    x[0, 0, 1, 1] = np.nan  # inside bin (0, 0) of channel 0, not its largest pixel
    boxes = np.array([[0, 0, 0, 5, 5]], np.float64)
    out = roialign_cy.roi_pool(x, boxes, 2)
    assert np.isnan(out[0, 0, 0, 0]) and np.isfinite(out[0, 0, 0, 1]) and np.isfinite(out[0, 1]).all()
    grad = roialign_cy.roi_pool_backward(np.ones_like(out), x, boxes, 2)
    assert grad[0, 0, 1, 1] == 1 and grad[0, 0, 2, 2] == 0  # (2, 2) would win without the NaN
    want, arg = ref.roi_pool_ref(x, boxes[:, 1:], [0], 2, 2, 1.0)
    np.testing.assert_array_equal(out, want)


def test_roi_pool_first_maximum_takes_the_gradient():
    x = np.zeros((1, 1, 4, 4))
    boxes = np.array([[0, 0, 0, 3, 3]], np.float64)
    grad = roialign_cy.roi_pool_backward(np.ones((1, 1, 1, 1)), x, boxes, 1)
    assert grad[0, 0, 0, 0] == 1 and grad.sum() == 1


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_ps_roi_pool_torchvision_edge_never_reads_the_last_row_and_column(layout):
    pooled = (2, 2)
    x = np.ones((1, 4, 6, 7))
    x[:, :, -1, :] = np.nan
    x[:, :, :, -1] = np.nan
    boxes = np.array([[0, 0, 0, 7, 6], [0, 3, 3, 9, 9]], np.float64)
    xin = to_nhwc(x) if layout == "NHWC" else x
    out = roialign_cy.ps_roi_pool(xin, boxes, pooled, layout=layout)
    # the first box's bins end before the last row and column; the second's are cut to empty (0)
    assert np.all(out[0] == 1) and np.all(np.isin(out[1], [0, 1]))
    image = roialign_cy.ps_roi_pool(xin, boxes, pooled, layout=layout, edge="image")
    assert np.isnan(image).any()


@pytest.mark.parametrize("op", OPS)
def test_nan_outside_every_box_never_leaks(rng, op):
    pooled = (2, 2)
    x = make_features(rng, 1, channels(op, 1, pooled), 12, 12)
    x[:, :, 8:, :] = np.nan
    x[:, :, :, 8:] = np.nan
    boxes = np.array([[0, 0.5, 0.5, 6.2, 6.4], [0, 2, 1, 5, 7]], np.float64)
    out = call(op, x, boxes, pooled, 1.0, 2)
    assert np.isfinite(out).all()
    grad = call_backward(op, np.ones_like(out), x, boxes, pooled, 1.0, 2)
    assert np.isfinite(grad).all() and not grad[:, :, 8:, :].any()


def test_ps_roi_align_empty_grid_gives_zero_where_torchvision_gives_nan():
    x = np.ones((1, 4, 5, 5))
    boxes = np.array([[0, 2, 2, 2, 4]], np.float64)  # zero width, adaptive sampling
    np.testing.assert_array_equal(roialign_cy.ps_roi_align(x, boxes, 2), 0)
    assert np.all(roialign_cy.ps_roi_align(x, boxes, 2, sampling_ratio=2) == 1)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("coordinate", [1e30, -1e30, 3e9, -3e9, 2.0 ** 62])
def test_huge_coordinates_saturate_without_reading_outside(rng, op, coordinate):
    pooled = (2, 3)
    x = make_features(rng, 1, channels(op, 1, pooled), 5, 6)
    boxes = np.array([[0, coordinate, 1, 3, 4], [0, 1, coordinate, 3, 4], [0, 0, 0, 3, abs(coordinate)]])
    out = call(op, x, boxes, pooled, 1.0, 2, allow_inverted=True)
    assert np.isfinite(out).all()
    grad = call_backward(op, np.ones_like(out), x, boxes, pooled, 1.0, 2, allow_inverted=True)
    assert np.isfinite(grad).all()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_empty_boxes_and_empty_maps(op, layout):
    pooled = (2, 2)
    c = channels(op, 3, pooled)
    x = np.zeros((2, c, 4, 5) if layout == "NCHW" else (2, 4, 5, c), np.float32)
    out = call(op, x, np.zeros((0, 5), np.float32), pooled, 1.0, 2, layout)
    assert out.shape == ((0, 3, 2, 2) if layout == "NCHW" else (0, 2, 2, 3))
    grad = call_backward(op, out, x, np.zeros((0, 5), np.float32), pooled, 1.0, 2, layout)
    assert grad.shape == x.shape and not grad.any()


@pytest.mark.parametrize("op", ["ps_roi_align", "ps_roi_pool"])
def test_position_sensitive_channels_must_divide(op):
    x = np.zeros((1, 10, 5, 5))
    with pytest.raises(ValueError, match=r"features must have a multiple of .* = 4 channels.*got 10"):
        call(op, x, np.array([[0, 1, 1, 3, 3.0]]), 2, 1.0, 2)
    with pytest.raises(ValueError, match="multiple of"):
        roialign_cy.plan(np.array([[0, 1, 1, 3, 3.0]]), (1, 10, 5, 5), 2, op=op)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("wrt", ["boxes", "both"])
def test_no_box_gradient(op, wrt):
    x = np.zeros((1, 4, 5, 5))
    boxes = np.array([[0, 1, 1, 3, 3.0]])
    g = np.zeros(call(op, x, boxes, 2, 1.0, 2).shape)
    why = "feature gradient of ps_roi_align" if op == "ps_roi_align" else "piecewise constant"
    with pytest.raises(ValueError, match=f"wrt='{wrt}' is not available: .*{why}"):
        call_backward(op, g, x, boxes, 2, 1.0, 2, wrt=wrt)
    with pytest.raises(ValueError, match="not available"):
        roialign_cy.plan(boxes, x.shape, 2, op=op).backward(g, x, wrt=wrt)


def test_roi_pool_gradient_needs_the_features():
    boxes = np.array([[0, 1, 1, 3, 3.0]])
    with pytest.raises(ValueError, match="roi_pool: the max-mode gradient reads the feature values"):
        roialign_cy.roi_pool_backward(np.zeros((1, 4, 2, 2)), (1, 4, 5, 5), boxes, 2)
    with pytest.raises(ValueError, match="roi_pool"):
        roialign_cy.plan(boxes, (1, 4, 5, 5), 2, op="roi_pool").backward(np.zeros((1, 4, 2, 2)))


@pytest.mark.parametrize("op", OPS)
def test_inverted_boxes_are_refused_by_default(op):
    x = np.zeros((1, 4, 5, 5))
    with pytest.raises(ValueError, match="inverted|x2 < x1"):
        call(op, x, np.array([[0, 3, 1, 1, 3.0]]), 2, 1.0, 2)


def test_edge_must_be_known():
    with pytest.raises(ValueError, match="edge must be one of"):
        roialign_cy.ps_roi_pool(np.zeros((1, 4, 5, 5)), np.array([[0, 1, 1, 3, 3.0]]), 2, edge="crop")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_plan_reproduces_the_one_shot_calls(rng, op, layout):
    pooled = (3, 2)
    x, boxes = problem(rng, op, (2, 2, 9, 10), pooled, 0.5, np.float32)
    xin = to_nhwc(x) if layout == "NHWC" else x
    kw = {"sampling_ratio": 2} if op == "ps_roi_align" else {}
    made = roialign_cy.plan(boxes, xin.shape, pooled, 0.5, layout=layout, op=op, **kw)
    assert op in repr(made)
    out = made.forward(xin)
    np.testing.assert_array_equal(out, call(op, xin, boxes, pooled, 0.5, 2, layout))
    assert made.output_shape() == out.shape
    g = np.cos(np.arange(out.size, dtype=np.float32)).reshape(out.shape)
    np.testing.assert_array_equal(made.backward(g, xin),
                                  call_backward(op, g, xin, boxes, pooled, 0.5, 2, layout))
    # a second call reuses the tables
    np.testing.assert_array_equal(made.forward(xin), out)


@pytest.mark.parametrize("op,kw,match", [
    ("roi_pool", {"mode": "avg", "aligned": True}, "aligned and sampling_ratio do not apply"),
    ("roi_pool", {"sampling_ratio": 2}, "do not apply"),
    ("ps_roi_pool", {"mode": "max"}, "does not apply"),
    ("ps_roi_align", {"aligned": False}, "always samples with the half-pixel offset"),
    ("roi_align", {"rotated": True, "op": "roi_pool"}, "rotated=True"),
    ("roi_align", {"op": "roi_unpool"}, "op must be one of"),
])
def test_plan_refuses_arguments_that_do_not_apply(op, kw, match):
    kw = dict({"op": op}, **kw)
    with pytest.raises(ValueError, match=match):
        roialign_cy.plan(np.array([[0, 1, 1, 3, 3.0]]), (1, 4, 5, 5), 2, **kw)


@pytest.mark.parametrize("op", OPS)
def test_out_argument(rng, op):
    pooled = (2, 2)
    x, boxes = problem(rng, op, (1, 2, 8, 8), pooled, 1.0, np.float64)
    want = call(op, x, boxes, pooled, 1.0, 2)
    out = np.full_like(want, np.nan)
    assert call(op, x, boxes, pooled, 1.0, 2, out=out) is out
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="out"):
        call(op, x, boxes, pooled, 1.0, 2, out=x.reshape(-1)[:want.size].reshape(want.shape))


def test_registry_lists_the_new_operators():
    for op in OPS:
        assert roialign_cy.gradient_of(op) == op + "_backward"
        assert roialign_cy.devices_of(op) == ("cpu", "cuda")


@pytest.fixture(params=["blocks", "planes"])
def roi_pool_loops(request, monkeypatch):
    """roi_pool's NCHW block loops (channels-last scratch) or its plane loops, forced."""
    from roialign_cy import _cpu

    taken = []
    original = _cpu.Run.pool_blocks

    def forced(self, windows, forward, channels, n_threads):
        taken.append(original(self, windows, forward, channels, n_threads))
        return request.param == "blocks" and not self.p.channels_last

    monkeypatch.setattr(_cpu.Run, "pool_blocks", forced)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [16, 20, 35])
def test_roi_pool_loops_match_the_reference_and_the_arg_max_path(rng, roi_pool_loops, dtype,
                                                                  channels):
    """Both NCHW loop orders (whole blocks of 16 planes and a partial one), with NaN pixels,
    against the reference; the gradient from a forward's arg-max equals the searched one."""
    pooled = (3, 4)
    x = make_features(rng, 2, channels, 9, 13, dtype)
    x[0, 3, 4, 5] = x[1, channels - 1, 0, 0] = np.nan
    boxes = sort_by_image(np.concatenate([random_boxes(rng, 30, 2, 9, 13, 0.5),
                                          edge_case_boxes(rng, 2, 9, 13, 0.5)])).astype(dtype)
    out = roialign_cy.roi_pool(x, boxes, pooled, 0.5, allow_inverted=True)
    rois, b = split_batch(boxes)
    want, want_arg = ref.roi_pool_ref(x, rois, b, *pooled, 0.5, dtype)
    np.testing.assert_array_equal(out, want.astype(dtype))
    out2, arg = roialign_cy.roi_pool(x, boxes, pooled, 0.5, allow_inverted=True, return_argmax=True)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(arg, want_arg)
    g = rng.standard_normal(out.shape).astype(dtype)
    searched = roialign_cy.roi_pool_backward(g, x, boxes, pooled, 0.5, allow_inverted=True)
    given = roialign_cy.roi_pool_backward(g, x.shape, boxes, pooled, 0.5, allow_inverted=True,
                                          argmax=arg)
    np.testing.assert_array_equal(searched, given)
    assert_close(searched, ref.roi_pool_backward_ref(g, x, rois, b, *pooled, 0.5, dtype), dtype,
                 "gradient")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_plan_keeps_roi_pool_arg_max_between_forward_and_backward(rng, layout):
    x, boxes = problem(rng, "roi_pool", (2, 3, 8, 9), (2, 2), 0.5, np.float32)
    xin = to_nhwc(x) if layout == "NHWC" else x
    made = roialign_cy.plan(boxes, xin.shape, 2, 0.5, op="roi_pool", layout=layout)
    out, arg = made.forward(xin, return_argmax=True)
    assert arg.shape == out.shape and arg.dtype == np.int32
    g = np.cos(np.arange(out.size, dtype=np.float32)).reshape(out.shape)
    np.testing.assert_array_equal(made.backward(g, argmax=arg), made.backward(g, xin))


@pytest.mark.parametrize("bad,error,match", [
    (lambda a: np.where(a == a.max(), 10 ** 6, a), ValueError, r"outside \[-1, H \* W\)"),
    (lambda a: np.full_like(a, -3), ValueError, "outside"),
    (lambda a: a[:1], ValueError, "argmax must have the output's shape"),
    (lambda a: a.astype(np.float64), TypeError, "argmax must be the int32 array"),
    (lambda a: a.astype(np.int64), TypeError, "argmax must be the int32 array"),
    (lambda a: a.tolist(), TypeError, "argmax must be a numpy array"),
])
def test_roi_pool_refuses_a_foreign_arg_max(rng, bad, error, match):
    x, boxes = problem(rng, "roi_pool", (1, 2, 8, 9), (2, 2), 0.5, np.float64)
    out, arg = roialign_cy.roi_pool(x, boxes, 2, 0.5, return_argmax=True)
    before = arg.copy()
    with pytest.raises(error, match=match):
        roialign_cy.roi_pool_backward(np.ones_like(out), x.shape, boxes, 2, 0.5, argmax=bad(arg))
    np.testing.assert_array_equal(arg, before)


def test_arg_max_is_roi_pool_only():
    x, boxes = np.zeros((1, 4, 5, 5), np.float32), np.array([[0, 1, 1, 3, 3.0]])
    with pytest.raises(ValueError, match="return_argmax is roi_pool's"):
        roialign_cy.plan(boxes, x.shape, 2, op="ps_roi_pool").forward(x, return_argmax=True)
    with pytest.raises(ValueError, match="argmax is roi_pool's"):
        roialign_cy.plan(boxes, x.shape, 2, op="ps_roi_pool").backward(
            np.zeros((1, 1, 2, 2)), argmax=np.zeros((1, 1, 2, 2), np.int64))


# mmcv's hand-computed RoIPool cases (tests/test_ops/test_roi_pool.py there): 2 x 2 bins at scale
# 1, the output and the gradient of sum(output); (features, box, output, gradient)
MMCV_ROI_POOL = [
    ([[[[1, 2], [3, 4]]]], [0, 0, 0, 1, 1], [[[[1, 2], [3, 4]]]], [[[[1, 1], [1, 1]]]]),
    ([[[[1, 2], [3, 4]], [[4, 3], [2, 1]]]], [0, 0, 0, 1, 1], [[[[1, 2], [3, 4]], [[4, 3], [2, 1]]]],
     [[[[1, 1], [1, 1]], [[1, 1], [1, 1]]]]),
    ([[[[1, 2, 5, 6], [3, 4, 7, 8], [9, 10, 13, 14], [11, 12, 15, 16]]]], [0, 0, 0, 3, 3],
     [[[[4, 8], [12, 16]]]], [[[[0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]]]]),
]


@pytest.mark.parametrize("features,box,output,gradient", MMCV_ROI_POOL)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roi_pool_matches_mmcv_tables(features, box, output, gradient, dtype):
    x = np.array(features, dtype)
    boxes = np.array([box], dtype)
    out = roialign_cy.roi_pool(x, boxes, 2)
    np.testing.assert_array_equal(out, np.array(output, dtype))
    np.testing.assert_array_equal(roialign_cy.roi_pool_backward(np.ones_like(out), x, boxes, 2),
                                  np.array(gradient, dtype))


@pytest.mark.parametrize("first", [-0.0, 0.0])
def test_roi_pool_zero_maximum_is_the_first_zero(roi_pool_loops, first):
    """+0 and -0 are equal maxima: the output is the first in row-major order, bit for bit, in
    either loop order (the plane loops keep four running maxima)."""
    x = np.full((1, 17, 4, 9), -first)
    x[:, :, 0, 0] = first
    x[:, 3] = -1.0
    x[:, 3, 2, 5] = first
    # the first zero is read by the second of four running maxima, a later one by the first
    x[:, 5] = -1.0
    x[:, 5, 0, 1] = first
    x[:, 5, 0, 4] = -first
    out = roialign_cy.roi_pool(x, np.array([[0, 0, 0, 8, 3.0]]), 1)
    assert np.all(out == 0)
    np.testing.assert_array_equal(np.signbit(out), np.full(out.shape, np.signbit(first)))


@pytest.mark.parametrize("op", ["roi_pool", "ps_roi_pool"])
def test_zero_corner_times_a_scale_past_float32(op):
    """float32 corners are scaled in float32: 0 x 1e39 is 0 x inf = NaN there, which is the
    pixel 0 (and a positive corner saturates), never an undefined cast: bin (0, 0) covers the
    whole map and the other bins are empty."""
    x = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    boxes = np.array([[1, 0, 0, 1, 1]], np.float32)
    fn = getattr(roialign_cy, op)
    kwargs = {"edge": "image"} if op == "ps_roi_pool" else {}
    for n_threads in (1, 2):
        out = fn(x, boxes, 2, 1e39, n_threads=n_threads, **kwargs)
        general = fn(x, boxes, 2, 1e39, n_threads=n_threads, out=np.empty_like(out), **kwargs)
        np.testing.assert_array_equal(out, general)
    if op == "roi_pool":
        np.testing.assert_array_equal(out[0, :, 0, 0], x[1].max(axis=(1, 2)))
        assert not out[0, :, 0, 1:].any() and not out[0, :, 1, :].any()
    else:  # channel (c * 2 + ph) * 2 + pw of the one output channel; bin (0, 0) reads channel 0
        np.testing.assert_array_equal(out[0, 0, 0, 0], x[1, 0].mean())
        assert not out[0, 0].ravel()[1:].any()


@pytest.fixture(params=["blocks", "planes"])
def ps_loops(request):
    """The position-sensitive operators' NCHW block loops (channels-last copies of the planes a
    bin reads) or their plane loops, forced in the kernel modules."""
    from roialign_cy import _cpu

    before = _cpu.force_ps_blocks(request.param == "blocks")
    yield request.param
    _cpu.force_ps_blocks(before)


@pytest.mark.parametrize("op", ["ps_roi_align", "ps_roi_pool"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c_out", [1, 16, 21])
@pytest.mark.parametrize("chunk", [None, 300])
def test_ps_loops_match_the_reference_and_each_other(rng, ps_loops, op, dtype, c_out, chunk,
                                                     monkeypatch):
    """Both NCHW loop orders (a block of 1 channel, a full one, a full and a partial one), with
    edge boxes, an image without boxes and, with ``chunk``, tables built in several runs of boxes:
    values and gradients against the reference, and bit for bit against the NHWC kernels, which
    the forcing does not touch."""
    from roialign_cy import _cpu

    if chunk:
        monkeypatch.setattr(_cpu, "TABLE_ENTRIES_PER_CHUNK", chunk)
    pooled, scale, sr = (3, 2), 0.5, (2 if c_out != 16 else -1)
    x = make_features(rng, 3, c_out * 6, 9, 13, dtype)
    boxes = np.concatenate([random_boxes(rng, 40, 2, 9, 13, scale),
                            edge_case_boxes(rng, 2, 9, 13, scale)])  # image 2 has none
    boxes = sort_by_image(boxes).astype(dtype)
    kw = dict(allow_inverted=True)
    out = call(op, x, boxes, pooled, scale, sr, **kw)
    assert_close(out, reference(op, x, boxes, pooled, scale, sr, dtype), dtype, "forward")
    np.testing.assert_array_equal(out, to_nchw(call(op, to_nhwc(x), boxes, pooled, scale, sr,
                                                    layout="NHWC", **kw)))
    g = rng.standard_normal(out.shape).astype(dtype)
    grad = call_backward(op, g, x, boxes, pooled, scale, sr, **kw)
    assert_close(grad, reference_backward(op, g, x, boxes, pooled, scale, sr, dtype), dtype,
                 "gradient")
    assert not grad[2].any()
    nhwc = call_backward(op, to_nhwc(g), to_nhwc(x), boxes, pooled, scale, sr, layout="NHWC", **kw)
    np.testing.assert_array_equal(grad, to_nchw(nhwc))

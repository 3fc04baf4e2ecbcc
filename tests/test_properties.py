"""Property-based checks (hypothesis): random shapes, boxes and flags against tests/reference.py,
and invariants that hold whatever the inputs: shape and dtype, finiteness, linearity in the
features, translation equivariance, the adjoint identity of the feature gradient, and rotated
boxes at angle 0 equal to axis-aligned ones."""
import os

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import peers_convention, to_nchw, to_nhwc  # noqa: E402
from reference import (roi_align_backward_ref, roi_align_ref, roi_align_rotated_backward_ref,  # noqa: E402
                       roi_align_rotated_ref)
import roialign_cy  # noqa: E402

# hypothesis draws corners in any order: inverted boxes follow the peers' convention here
roi_align = peers_convention(roialign_cy.roi_align)
roi_align_backward = peers_convention(roialign_cy.roi_align_backward)
roi_align_rotated = peers_convention(roialign_cy.roi_align_rotated)
roi_align_rotated_backward = peers_convention(roialign_cy.roi_align_rotated_backward)

# bounded so that the whole file runs in well under a minute (the reference is python loops)
# CI replays a fixed set of examples (a red CI must mean a regression, not a new random draw);
# local runs explore, HYPOTHESIS_EXAMPLES=1000 for a longer search
SETTINGS = settings(max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 60)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow], print_blob=True,
                    derandomize=bool(os.environ.get("CI")))
TOL64 = dict(rtol=1e-10, atol=1e-10)

# float32-exact coordinates: every dtype and the float64 reference see the same boxes
coord = st.floats(-3.0, 11.0, width=32)
scales = st.sampled_from([0.5, 1.0, 2.0])
sampling_ratios = st.sampled_from([-1, 0, 1, 2, 3])
output_sizes = st.tuples(st.integers(1, 3), st.integers(1, 3))


def on_grid(lo, hi, step):
    """Multiples of ``step`` (a power of two) in [lo, hi]: sums and halves of them stay exact."""
    return st.integers(int(np.ceil(lo / step)), int(np.floor(hi / step))).map(lambda v: v * step)


@st.composite
def problems(draw, rotated=False, max_k=3):
    """(features NCHW float64, boxes (K, 5 or 6) with the batch column, N)."""
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 3))
    h = draw(st.integers(1, 7))
    w = draw(st.integers(1, 7))
    k = draw(st.integers(0, max_k))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32).astype(np.float64)
    rows = []
    for _ in range(k):
        b = draw(st.integers(0, n - 1))
        if rotated:
            size = st.floats(-2.0, 9.0, width=32)
            angle = st.floats(-360.0, 360.0, width=32)
            rows.append([b, draw(coord), draw(coord), draw(size), draw(size), draw(angle)])
        else:
            rows.append([b, draw(coord), draw(coord), draw(coord), draw(coord)])
    boxes = np.array(rows, dtype=np.float64).reshape(k, 6 if rotated else 5)
    return x, boxes


def _split(boxes):
    return boxes[:, 1:], boxes[:, 0].astype(np.int64)


def _in_layout(x, layout):
    return to_nhwc(x) if layout == "NHWC" else x


def _from_layout(y, layout):
    return to_nchw(y) if layout == "NHWC" else y


# ---------------------------------------------------------------------------------------------
# against the reference

@SETTINGS
@given(problems(), output_sizes, scales, sampling_ratios, st.booleans(),
       st.sampled_from(["avg", "max", "onnx_max"]), st.sampled_from(["NCHW", "NHWC"]))
def test_forward_matches_reference(prob, output_size, scale, sampling_ratio, aligned, mode, layout):
    x, boxes = prob
    out = roi_align(_in_layout(x, layout), boxes, output_size, scale, sampling_ratio, aligned,
                    mode=mode, layout=layout)
    k, c = len(boxes), x.shape[1]
    ph, pw = output_size
    assert out.shape == ((k, c, ph, pw) if layout == "NCHW" else (k, ph, pw, c))
    assert out.dtype == np.float64
    rois, bidx = _split(boxes)
    expected = roi_align_ref(x, rois, bidx, ph, pw, scale, sampling_ratio, aligned, mode)
    np.testing.assert_allclose(_from_layout(out, layout), expected, **TOL64)


@SETTINGS
@given(problems(), output_sizes, scales, sampling_ratios, st.booleans(),
       st.sampled_from(["avg", "max"]), st.sampled_from(["NCHW", "NHWC"]), st.integers(0, 2**32 - 1))
def test_feature_grad_matches_reference(prob, output_size, scale, sampling_ratio, aligned, mode,
                                        layout, seed):
    x, boxes = prob
    ph, pw = output_size
    g = np.random.default_rng(seed).standard_normal((len(boxes), x.shape[1], ph, pw))
    got = roi_align_backward(_in_layout(g, layout), _in_layout(x, layout), boxes, output_size,
                             scale, sampling_ratio, aligned, mode=mode, layout=layout)
    assert got.shape == _in_layout(x, layout).shape
    rois, bidx = _split(boxes)
    expected = roi_align_backward_ref(g, x, rois, bidx, ph, pw, scale, sampling_ratio, aligned, mode)
    np.testing.assert_allclose(_from_layout(got, layout), expected, **TOL64)


@SETTINGS
@given(problems(rotated=True), output_sizes, scales, sampling_ratios, st.booleans(), st.booleans(),
       st.sampled_from(["NCHW", "NHWC"]), st.integers(0, 2**32 - 1))
def test_rotated_matches_reference(prob, output_size, scale, sampling_ratio, aligned, clockwise,
                                   layout, seed):
    x, boxes = prob
    ph, pw = output_size
    rois, bidx = _split(boxes)
    out = roi_align_rotated(_in_layout(x, layout), boxes, output_size, scale, sampling_ratio,
                            aligned, clockwise=clockwise, layout=layout)
    expected = roi_align_rotated_ref(x, rois, bidx, ph, pw, scale, sampling_ratio, aligned, clockwise)
    # float64 kernels place samples with the reference's formulas and operand order, so even
    # samples a few ulp from the -1 / H edges fall on the same side
    np.testing.assert_allclose(_from_layout(out, layout), expected, **TOL64)
    g = np.random.default_rng(seed).standard_normal(expected.shape)
    got = roi_align_rotated_backward(_in_layout(g, layout), _in_layout(x, layout), boxes,
                                     output_size, scale, sampling_ratio, aligned,
                                     clockwise=clockwise, layout=layout)
    np.testing.assert_allclose(
        _from_layout(got, layout),
        roi_align_rotated_backward_ref(g, x.shape, rois, bidx, ph, pw, scale, sampling_ratio,
                                       aligned, clockwise), **TOL64)


# ---------------------------------------------------------------------------------------------
# invariants

@SETTINGS
@given(problems(), problems(rotated=True), output_sizes, scales, sampling_ratios, st.booleans(),
       st.sampled_from(["avg", "max"]), st.sampled_from([np.float32, np.float64]))
def test_finite_input_gives_finite_output(prob, rprob, output_size, scale, sampling_ratio, aligned,
                                          mode, dtype):
    x, boxes = prob
    x = (x * 1e3).astype(dtype)
    out = roi_align(x, boxes, output_size, scale, sampling_ratio, aligned, mode=mode)
    assert out.dtype == dtype and np.all(np.isfinite(out))
    gf, gb = roi_align_backward(np.ones_like(out), x, boxes, output_size, scale, sampling_ratio,
                                aligned, mode=mode, wrt="both")
    assert gf.dtype == dtype and gb.dtype == dtype and gb.shape == boxes.shape
    assert np.all(np.isfinite(gf)) and np.all(np.isfinite(gb))
    assert not np.any(gb[:, 0])  # the batch column has no gradient
    xr, rboxes = rprob
    xr = xr.astype(dtype)
    out = roi_align_rotated(xr, rboxes, output_size, scale, sampling_ratio, aligned)
    assert out.dtype == dtype and np.all(np.isfinite(out))
    gf, gb = roi_align_rotated_backward(np.ones_like(out), xr, rboxes, output_size, scale,
                                        sampling_ratio, aligned, wrt="both")
    assert np.all(np.isfinite(gf)) and np.all(np.isfinite(gb))


@SETTINGS
@given(problems(), output_sizes, scales, sampling_ratios, st.booleans(), st.booleans(),
       st.floats(-3, 3), st.floats(-3, 3), st.integers(0, 2**32 - 1))
def test_linear_in_the_features(prob, output_size, scale, sampling_ratio, aligned, rotated, a, b,
                                seed):
    x, boxes = prob
    if rotated:
        # reuse the corners as (cx, cy, w, h) and add an angle
        boxes = np.column_stack([boxes, np.full(len(boxes), 30.0)])
        op = roi_align_rotated
    else:
        op = roi_align
    y = np.random.default_rng(seed).standard_normal(x.shape)
    args = (boxes, output_size, scale, sampling_ratio, aligned)
    lhs = op(a * x + b * y, *args)
    rhs = a * op(x, *args) + b * op(y, *args)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-10)


@st.composite
def interior_boxes(draw, hb, wb, margin_y, margin_x, scale, rotated):
    """Boxes whose samples (aligned=True) stay in [0, H - 2 - margin] x [0, W - 2 - margin] of
    an (hb, wb) map, on a 1/8 grid so that shifting them is exact."""
    def eighth(lo, hi):
        return on_grid(lo, hi, 1 / 8)

    rows = []
    for _ in range(draw(st.integers(1, 3))):
        if rotated:
            # the rotated box's circumcircle (radius r) must fit the room left by the shift
            room = min(wb - 2 - margin_x, hb - 2 - margin_y)
            cap = min(3.0, np.floor(room / np.sqrt(2) * 8) / 8)
            w, h = draw(eighth(0.125, cap)), draw(eighth(0.125, cap))
            r = np.hypot(w, h) / 2
            cx = draw(eighth(r, wb - 2 - margin_x - r))
            cy = draw(eighth(r, hb - 2 - margin_y - r))
            angle = draw(st.sampled_from([0.0, 30.0, -45.0, 90.0, 127.5]))
            # feature-map centre (cx, cy) is image coordinate (c + 0.5) / scale
            rows.append([0, (cx + 0.5) / scale, (cy + 0.5) / scale, w / scale, h / scale, angle])
        else:
            x0, y0 = draw(eighth(0, wb - 2.5 - margin_x)), draw(eighth(0, hb - 2.5 - margin_y))
            x1 = draw(eighth(x0, wb - 2 - margin_x))
            y1 = draw(eighth(y0, hb - 2 - margin_y))
            rows.append([0] + [(v + 0.5) / scale for v in (x0, y0, x1, y1)])
    return np.array(rows)


@SETTINGS
@given(st.data(), st.integers(0, 3), st.integers(0, 3), st.sampled_from([0.5, 1.0, 2.0]),
       output_sizes, sampling_ratios, st.sampled_from(["avg", "max", "onnx_max", "rotated"]))
def test_translation_equivariance(data, sy, sx, scale, output_size, sampling_ratio, mode):
    """Shift the map content by (sy, sx) pixels and the boxes by (sy, sx) / spatial_scale: boxes
    away from the borders pool exactly the same values."""
    hb, wb, c = 9, 10, 2
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    f = rng.standard_normal((1, c, hb, wb))
    g = np.zeros_like(f)
    g[:, :, sy:, sx:] = f[:, :, :hb - sy, :wb - sx]
    rotated = mode == "rotated"
    boxes = data.draw(interior_boxes(hb, wb, sy, sx, scale, rotated))
    moved = boxes.copy()
    if rotated:
        moved[:, 1] += sx / scale
        moved[:, 2] += sy / scale
        a = roi_align_rotated(f, boxes, output_size, scale, sampling_ratio, True)
        b = roi_align_rotated(g, moved, output_size, scale, sampling_ratio, True)
    else:
        moved[:, [1, 3]] += sx / scale
        moved[:, [2, 4]] += sy / scale
        a = roi_align(f, boxes, output_size, scale, sampling_ratio, True, mode=mode)
        b = roi_align(g, moved, output_size, scale, sampling_ratio, True, mode=mode)
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(problems(), problems(rotated=True), output_sizes, scales, sampling_ratios, st.booleans(),
       st.sampled_from(["NCHW", "NHWC"]), st.integers(0, 2**32 - 1))
def test_adjoint_identity(prob, rprob, output_size, scale, sampling_ratio, aligned, layout, seed):
    """Average pooling is linear in the features, so its feature gradient is its adjoint:
    <G, f(X)> = <f^T(G), X> for every G and X."""
    rng = np.random.default_rng(seed)
    for (x, boxes), fwd, bwd in [(prob, roi_align, roi_align_backward),
                                 (rprob, roi_align_rotated, roi_align_rotated_backward)]:
        x = _in_layout(x, layout)
        args = (boxes, output_size, scale, sampling_ratio, aligned)
        out = fwd(x, *args, layout=layout)
        g = rng.standard_normal(out.shape)
        lhs = float(np.sum(g * out))
        rhs = float(np.sum(bwd(g, x, *args, layout=layout) * x))
        assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)
        # the shape-only form gives the same gradient
        np.testing.assert_array_equal(bwd(g, x.shape, *args, layout=layout),
                                      bwd(g, x, *args, layout=layout))


@SETTINGS
@given(st.data(), scales, output_sizes, sampling_ratios, st.booleans(), st.booleans())
def test_rotated_at_angle_zero_is_axis_aligned(data, scale, output_size, sampling_ratio, aligned,
                                               clockwise):
    h, w = 7, 8
    x = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).standard_normal((2, 2, h, w))
    # boxes on a 1/16 grid inside the map (no sample near the -1 / H edges where a last-bit
    # difference would switch a sample off), sizes >= 1 px: aligned=False raises smaller sizes
    # to 1 about the centre (rotated) or the first corner (axis-aligned)
    def sixteenth(lo, hi):
        return on_grid(lo, hi, 1 / 16)

    rows = []
    for _ in range(data.draw(st.integers(1, 3))):
        bw, bh = data.draw(sixteenth(1, w - 1)), data.draw(sixteenth(1, h - 1))
        cx = data.draw(sixteenth(bw / 2, w - 1 - bw / 2))
        cy = data.draw(sixteenth(bh / 2, h - 1 - bh / 2))
        rows.append([data.draw(st.integers(0, 1)), cx, cy, bw, bh])
    r = np.array(rows) / np.array([1, scale, scale, scale, scale])
    rot = np.column_stack([r, np.zeros(len(r))])
    axis = np.column_stack([r[:, 0], r[:, 1] - r[:, 3] / 2, r[:, 2] - r[:, 4] / 2,
                            r[:, 1] + r[:, 3] / 2, r[:, 2] + r[:, 4] / 2])
    args = (output_size, scale, sampling_ratio, aligned)
    a = roi_align_rotated(x, rot, *args, clockwise=clockwise)
    b = roi_align(x, axis, *args)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    g = np.random.default_rng(1).standard_normal(a.shape)
    np.testing.assert_allclose(roi_align_rotated_backward(g, x, rot, *args, clockwise=clockwise),
                               roi_align_backward(g, x, axis, *args), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(problems(), output_sizes, scales, sampling_ratios, st.booleans(), st.sampled_from(["avg", "max"]))
def test_box_forms_and_wrt_agree(prob, output_size, scale, sampling_ratio, aligned, mode):
    """(K, 5), (K, 4) + batch_indices and wrt='both' vs separate calls: the same numbers."""
    x, boxes = prob
    args = (output_size, scale, sampling_ratio, aligned)
    out = roi_align(x, boxes, *args, mode=mode)
    rois, bidx = _split(boxes)
    np.testing.assert_array_equal(roi_align(x, rois, *args, mode=mode, batch_indices=bidx), out)
    g = np.cos(np.arange(out.size)).reshape(out.shape)
    gf, gb = roi_align_backward(g, x, boxes, *args, mode=mode, wrt="both")
    np.testing.assert_array_equal(gf, roi_align_backward(g, x, boxes, *args, mode=mode))
    np.testing.assert_array_equal(gb, roi_align_backward(g, x, boxes, *args, mode=mode, wrt="boxes"))
    np.testing.assert_array_equal(
        gb[:, 1:], roi_align_backward(g, x, rois, *args, mode=mode, wrt="boxes", batch_indices=bidx))

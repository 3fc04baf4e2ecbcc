"""roi_align_rotated and its gradients: the reference, exact geometric equivalences, finite differences."""
import functools

import numpy as np
import pytest

from conftest import (box_forms, f32_exact, make_features, random_rotated_boxes, sort_by_image, split_batch,
                      to_nchw, to_nhwc)
from reference import numerical_box_grad, roi_align_rotated_backward_ref, roi_align_rotated_ref, rotated_samples
import roialign_cy
from conftest import peers_convention

roi_align = peers_convention(roialign_cy.roi_align)
roi_align_rotated = peers_convention(roialign_cy.roi_align_rotated)
roi_align_rotated_backward = peers_convention(roialign_cy.roi_align_rotated_backward)

N, C, H, W = 2, 3, 9, 11
SCALE = 0.5
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def _pooled(output_size):
    return (output_size, output_size) if isinstance(output_size, int) else output_size


def _dataset():
    rng = np.random.default_rng(7)
    feats = make_features(rng, N, C, H, W)
    boxes = random_rotated_boxes(rng, 8, N, H, W, SCALE)
    hi, wi = H / SCALE, W / SCALE
    edge = f32_exact([
        [0, 0.31 * wi, 0.42 * hi, 0.13, 0.21, 33.3],  # tiny
        [1, 0.52 * wi, 0.47 * hi, 0.0, 0.37 * hi, -61.7],  # zero width
        [1, 0.45 * wi, 0.55 * hi, 0.0, 0.0, 12.0],  # a point
        [0, 1.6 * wi, 0.5 * hi, 0.3 * wi, 0.2 * hi, 45.0],  # wholly outside
        [0, -0.05 * wi, 1.02 * hi, 0.4 * wi, 0.3 * hi, 127.9],  # centre outside, partly inside
        [1, 0.5 * wi, 0.5 * hi, 1.3 * wi, 1.2 * hi, -171.3],  # larger than the image
    ])
    return feats, np.concatenate([boxes, edge])


FEATURES, BOXES = _dataset()


@functools.lru_cache(maxsize=None)
def _reference(output_size, sampling_ratio, aligned, clockwise):
    rois, bidx = split_batch(BOXES)
    return roi_align_rotated_ref(FEATURES, rois, bidx, *_pooled(output_size), SCALE, sampling_ratio, aligned,
                                 clockwise)


@pytest.mark.parametrize("output_size", [(3, 2), 2])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("clockwise", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_reference(dtype, layout, aligned, clockwise, sampling_ratio, output_size):
    feats = FEATURES.astype(dtype)
    if layout == "NHWC":
        feats = to_nhwc(feats)
    out = roi_align_rotated(feats, BOXES.astype(dtype), output_size, SCALE, sampling_ratio, aligned,
                            clockwise=clockwise, layout=layout)
    assert out.dtype == dtype
    if layout == "NHWC":
        out = to_nchw(out)
    assert out.shape == (len(BOXES), C) + _pooled(output_size)
    np.testing.assert_allclose(out, _reference(output_size, sampling_ratio, aligned, clockwise), **TOL[dtype])


def _dyadic_rotated_boxes(rng, K, min_size):
    # Centres and sizes on a 1/16 grid: the corner form cx -+ w/2 is then exact, so the two operators
    # see the same boxes to the last bit (including the adaptive grid size).
    cx = np.round(rng.uniform(0.1, 0.9, K) * W * 16) / 16
    cy = np.round(rng.uniform(0.1, 0.9, K) * H * 16) / 16
    w = np.round(rng.uniform(min_size, 0.8 * W, K) * 16) / 16
    h = np.round(rng.uniform(min_size, 0.8 * H, K) * 16) / 16
    return np.column_stack([rng.integers(N, size=K), cx, cy, w, h, np.zeros(K)])


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_angle_zero_equals_axis_aligned(rng, sampling_ratio, aligned):
    feats = make_features(rng, N, C, H, W)
    # aligned=False raises sizes below 1 about different anchors (centre vs corner): use sizes >= 1.
    rot = _dyadic_rotated_boxes(rng, 8, 0.05 if aligned else 1.0)
    b, cx, cy, w, h = rot[:, :5].T
    corners = np.column_stack([b, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    got = roi_align_rotated(feats, rot, (3, 2), 1.0, sampling_ratio, aligned)
    expected = roi_align(feats, corners, (3, 2), 1.0, sampling_ratio, aligned)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


# Rotating a box by a multiple of 90 degrees about its centre equals rotating the feature map the other
# way and sampling the unrotated box at the image of the centre (spatial_scale 1, aligned=True, where
# the centre in pixel coordinates is (cx - 0.5, cy - 0.5)). Bilinear sampling, the [-1, H] range test
# and the clamps are all symmetric under these flips, so the identity is exact, boundary cases included.
ROTATIONS = {
    90: (lambda x: x[..., ::-1, :].swapaxes(-1, -2), lambda cx, cy: (H - cy, cx)),
    180: (lambda x: x[..., ::-1, ::-1], lambda cx, cy: (W - cx, H - cy)),
    -90: (lambda x: x[..., :, ::-1].swapaxes(-1, -2), lambda cx, cy: (cy, W - cx)),
}


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("angle", [90, 180, -90])
def test_quarter_turns_are_map_rotations(rng, angle, sampling_ratio):
    feats = make_features(rng, N, C, H, W)
    boxes = random_rotated_boxes(rng, 8, N, H, W)
    boxes[:, 5] = angle
    turn_map, turn_centre = ROTATIONS[angle]
    turned = boxes.copy()
    turned[:, 1], turned[:, 2] = turn_centre(boxes[:, 1], boxes[:, 2])
    turned[:, 5] = 0.0
    got = roi_align_rotated(feats, boxes, (3, 2), 1.0, sampling_ratio, True)
    expected = roi_align_rotated(np.ascontiguousarray(turn_map(feats)), turned, (3, 2), 1.0, sampling_ratio, True)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # 180 degrees also equals the unrotated box read backwards (the same sample points): both bin
    # axes reversed.
    if angle == 180:
        upright = boxes.copy()
        upright[:, 5] = 0.0
        flipped = roi_align_rotated(feats, upright, (3, 2), 1.0, sampling_ratio, True)[..., ::-1, ::-1]
        np.testing.assert_allclose(got, flipped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aligned", [True, False])
def test_clockwise_is_negated_angle(rng, aligned):
    feats = make_features(rng, N, C, H, W)
    boxes = random_rotated_boxes(rng, 10, N, H, W)
    negated = boxes.copy()
    negated[:, 5] *= -1
    got = roi_align_rotated(feats, boxes, (2, 3), 1.0, -1, aligned, clockwise=True)
    np.testing.assert_allclose(got, roi_align_rotated(feats, negated, (2, 3), 1.0, -1, aligned), rtol=1e-13,
                               atol=1e-13)
    assert not np.allclose(got, roi_align_rotated(feats, boxes, (2, 3), 1.0, -1, aligned))


def test_angles_wrap_modulo_360(rng):
    feats = make_features(rng, N, C, H, W)
    boxes = random_rotated_boxes(rng, 10, N, H, W)
    expected = roi_align_rotated(feats, boxes, (2, 3), 1.0, 2, True)
    for turns in (1, -1, 2, -3):
        shifted = boxes.copy()
        shifted[:, 5] += 360.0 * turns
        np.testing.assert_allclose(roi_align_rotated(feats, shifted, (2, 3), 1.0, 2, True), expected,
                                   rtol=1e-10, atol=1e-10)


def test_box_forms_and_empty(rng):
    n = 3
    feats = make_features(rng, n, C, H, W)
    boxes = sort_by_image(random_rotated_boxes(rng, 6, n, H, W))
    boxes[:, 0] = [0, 0, 2, 2, 2, 2]
    results = [roi_align_rotated(feats, bx, 2, batch_indices=bi) for bx, bi in box_forms(boxes, n)]
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    out = np.full_like(results[0], np.nan)
    assert roi_align_rotated(feats, boxes, 2, out=out) is out
    np.testing.assert_array_equal(out, results[0])
    for layout, shape in (("NCHW", (0, C, 2, 3)), ("NHWC", (0, 2, 3, C))):
        f = feats if layout == "NCHW" else to_nhwc(feats)
        empty = roi_align_rotated(f.astype(np.float32), np.zeros((0, 6), np.float32), (2, 3), layout=layout)
        assert empty.shape == shape and empty.dtype == np.float32


# ---- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("clockwise", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_feature_grad_matches_reference(rng, layout, aligned, clockwise, sampling_ratio):
    PH, PW = 2, 3
    g = rng.standard_normal((len(BOXES), C, PH, PW))
    rois, bidx = split_batch(BOXES)
    expected = roi_align_rotated_backward_ref(g, FEATURES.shape, rois, bidx, PH, PW, SCALE, sampling_ratio, aligned,
                                              clockwise)
    f = FEATURES if layout == "NCHW" else to_nhwc(FEATURES)
    g_in = g if layout == "NCHW" else to_nhwc(g)
    got = roi_align_rotated_backward(g_in, f, BOXES, (PH, PW), SCALE, sampling_ratio, aligned, clockwise=clockwise,
                                     layout=layout)
    if layout == "NHWC":
        got = to_nchw(got)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # Only the shape of the features is needed.
    with_shape = roi_align_rotated_backward(g_in, f.shape, BOXES, (PH, PW), SCALE, sampling_ratio, aligned,
                                            clockwise=clockwise, layout=layout)
    np.testing.assert_array_equal(with_shape if layout == "NCHW" else to_nchw(with_shape), got)


EPS = 1e-6
MARGIN = 1e-4


def _fd_safe(box, PH, PW, scale, sampling_ratio, aligned, clockwise):
    """No kink of the interpolant, grid-size change or size clamp within the FD step (see test_backward)."""
    ys, xs, _ = rotated_samples(box, PH, PW, scale, sampling_ratio, aligned, clockwise)
    coords = np.concatenate([ys.ravel(), xs.ravel()])
    if coords.size and np.min(np.abs(coords - np.round(coords))) < MARGIN:
        return False
    sizes = np.array([box[3] * scale / PH, box[2] * scale / PW])
    if sampling_ratio <= 0 and np.min(np.abs(sizes - np.round(sizes))) < MARGIN:
        return False
    return aligned or min(abs(box[2] * scale - 1), abs(box[3] * scale - 1)) >= MARGIN


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("clockwise", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
def test_box_grad_finite_differences(rng, aligned, clockwise, sampling_ratio):
    scale, PH, PW = 0.5, 2, 3
    feats = make_features(rng, 1, C, H, W)
    rois = []
    while len(rois) < 5:
        box = random_rotated_boxes(rng, 1, 1, H, W, scale)[0, 1:].astype(np.float64)
        box[2:4] = np.maximum(box[2:4], 0.3)  # sizes stay positive under the step
        if _fd_safe(box, PH, PW, scale, sampling_ratio, aligned, clockwise):
            rois.append(box)
    rois = np.array(rois)
    bidx = np.zeros(len(rois), np.int64)
    g = rng.standard_normal((len(rois), C, PH, PW))

    def objective(r):
        return float(np.sum(g * roi_align_rotated(feats, r, (PH, PW), scale, sampling_ratio, aligned,
                                                  clockwise=clockwise, batch_indices=bidx)))

    got = roi_align_rotated_backward(g, feats, rois, (PH, PW), scale, sampling_ratio, aligned, clockwise=clockwise,
                                     batch_indices=bidx, wrt="boxes")
    assert got.shape == rois.shape
    numeric = numerical_box_grad(objective, rois, EPS)
    np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-6 * np.abs(numeric).max())
    for _ in range(3):
        d = rng.standard_normal(rois.shape)
        directional = (objective(rois + EPS * d) - objective(rois - EPS * d)) / (2 * EPS)
        assert abs(np.sum(got * d) - directional) <= 1e-6 * max(abs(directional), np.abs(numeric).max())


def test_box_grad_forms(rng):
    feats = make_features(rng, N, C, H, W)
    boxes = sort_by_image(random_rotated_boxes(rng, 6, N, H, W))
    g = rng.standard_normal((len(boxes), C, 2, 2))
    (b6, _), (b5, bidx), (blist, _) = box_forms(boxes, N)
    grad6 = roi_align_rotated_backward(g, feats, b6, 2, wrt="boxes")
    grad5 = roi_align_rotated_backward(g, feats, b5, 2, batch_indices=bidx, wrt="boxes")
    grad_list = roi_align_rotated_backward(g, feats, blist, 2, wrt="boxes")
    assert grad6.shape == (6, 6) and np.all(grad6[:, 0] == 0)
    np.testing.assert_array_equal(grad6[:, 1:], grad5)
    assert isinstance(grad_list, list)
    np.testing.assert_array_equal(np.concatenate(grad_list), grad5)
    gf, gb = roi_align_rotated_backward(g, feats, b6, 2, wrt="both")
    np.testing.assert_array_equal(gb, grad6)
    np.testing.assert_array_equal(gf, roi_align_rotated_backward(g, feats, b6, 2))


@pytest.mark.parametrize("wrt", ["features", "boxes"])
def test_deterministic_across_threads(rng, wrt):
    feats = make_features(rng, 1, C, H, W)
    boxes = random_rotated_boxes(rng, 40, 1, H, W)
    g = rng.standard_normal((len(boxes), C, 3, 3))
    runs = [roi_align_rotated_backward(g, feats, boxes, 3, 1.0, -1, True, wrt=wrt, n_threads=t)
            for t in (1, 2, 3, 2, None)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other, runs[0])
    fwd = [roi_align_rotated(feats, boxes, 3, n_threads=t) for t in (1, 2, None)]
    for other in fwd[1:]:
        np.testing.assert_array_equal(other, fwd[0])

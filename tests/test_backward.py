"""roi_align_backward: feature gradients against the reference scatter, box gradients against
central finite differences of our own forward, determinism and the return conventions."""
import numpy as np
import pytest

from conftest import (box_forms, edge_case_boxes, make_features, random_boxes, sort_by_image, split_batch,
                      to_nchw, to_nhwc)
from reference import aligned_samples, numerical_box_grad, roi_align_backward_ref, sample_values
import roialign_cy
from conftest import peers_convention

roi_align = peers_convention(roialign_cy.roi_align)
roi_align_backward = peers_convention(roialign_cy.roi_align_backward)

N, C, H, W = 2, 3, 9, 11
# float32 kernels place samples with ~1 ulp(10) ~ 1e-6 px of error and the N(0, 1) features have
# slopes of a few units per pixel: hence atol 5e-6 against the float64 reference.
TOL = {np.float32: dict(rtol=1e-5, atol=5e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


def _grad_output(rng, K, PH, PW, layout="NCHW", dtype=np.float64):
    g = rng.standard_normal((K, C, PH, PW)).astype(dtype)
    return g if layout == "NCHW" else to_nhwc(g)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_feature_grad_matches_reference(rng, dtype, mode, layout, aligned, sampling_ratio):
    scale = 0.5
    feats = make_features(rng, N, C, H, W)
    boxes = np.concatenate([edge_case_boxes(rng, N, H, W, scale), random_boxes(rng, 4, N, H, W, scale)])
    PH, PW = 3, 2
    grad_out = rng.standard_normal((len(boxes), C, PH, PW))
    rois, bidx = split_batch(boxes)
    expected = roi_align_backward_ref(grad_out, feats, rois, bidx, PH, PW, scale, sampling_ratio, aligned, mode)

    f, g = feats.astype(dtype), grad_out.astype(dtype)
    if layout == "NHWC":
        f, g = to_nhwc(f), to_nhwc(g)
    got = roi_align_backward(g, f, boxes.astype(dtype), (PH, PW), scale, sampling_ratio, aligned, mode=mode,
                             layout=layout)
    assert got.shape == f.shape
    assert got.dtype == dtype
    if layout == "NHWC":
        got = to_nchw(got)
    np.testing.assert_allclose(got, expected, **TOL[dtype])


def test_max_grad_ties_go_to_first_sample():
    # On a constant map the 4 samples (rows and cols 0.5 and 1.5) all read exactly 1: the first in
    # iy-major / ix-minor order, at (0.5, 0.5), takes the whole gradient.
    x = np.ones((1, 1, 4, 4))
    got = roi_align_backward(np.ones((1, 1, 1, 1)), x, np.array([[0, 0.0, 0.0, 2.0, 2.0]]), 1, 1.0, 2, False,
                             mode="max")
    expected = np.zeros((4, 4))
    expected[:2, :2] = 0.25
    np.testing.assert_array_equal(got[0, 0], expected)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_shape_only_features(rng, layout):
    feats = make_features(rng, N, C, H, W)
    boxes = np.concatenate([edge_case_boxes(rng, N, H, W), random_boxes(rng, 4, N, H, W)])
    g = _grad_output(rng, len(boxes), 2, 3, layout)
    if layout == "NHWC":
        feats = to_nhwc(feats)
    for sr in (-1, 2):
        with_array = roi_align_backward(g, feats, boxes, (2, 3), 1.0, sr, True, layout=layout)
        with_shape = roi_align_backward(g, feats.shape, boxes, (2, 3), 1.0, sr, True, layout=layout)
        np.testing.assert_array_equal(with_shape, with_array)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("wrt", ["features", "boxes"])
def test_deterministic_across_threads(rng, wrt, mode):
    # Many overlapping boxes on one image: every pixel receives scatters from several boxes, which
    # is where an unordered parallel accumulation would show.
    feats = make_features(rng, 1, C, H, W)
    boxes = random_boxes(rng, 40, 1, H, W)
    g = _grad_output(rng, len(boxes), 3, 3)
    runs = [roi_align_backward(g, feats, boxes, (3, 3), 1.0, -1, True, mode=mode, wrt=wrt, n_threads=t)
            for t in (1, 2, 3, 2, None)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other, runs[0])


# ---- box gradients -----------------------------------------------------------------------------

EPS = 1e-6
MARGIN = 1e-4  # the FD step moves every sample by at most ~2 * EPS * scale, far below this


def _distance_to_integer(v):
    v = np.asarray(v, dtype=np.float64)
    return np.abs(v - np.round(v)) if v.size else np.array([np.inf])


def fd_safe_aligned(feats, box, PH, PW, scale, sampling_ratio, aligned, mode):
    """True when no kink of out(box) lies within the finite-difference step around ``box``.

    The interpolant's kinks and jumps (pixel edges, the 0 and H-1 clamps, the -1 and H range test)
    all sit at integer sample coordinates; the adaptive grid size and the aligned=False size clamp
    must not change; in max mode the arg-max must not switch.
    """
    ys, xs, _ = aligned_samples(box, PH, PW, scale, sampling_ratio, aligned)
    if min(_distance_to_integer(ys).min(), _distance_to_integer(xs).min()) < MARGIN:
        return False
    roi_w = (box[2] - box[0]) * scale
    roi_h = (box[3] - box[1]) * scale
    if not aligned and min(abs(roi_w - 1), abs(roi_h - 1)) < MARGIN:
        return False
    if sampling_ratio <= 0 and min(_distance_to_integer(roi_h / PH), _distance_to_integer(roi_w / PW)) < MARGIN:
        return False
    if mode == "max":
        plane = np.asarray(feats[0], dtype=np.float64)
        for ph in range(PH):
            for pw in range(PW):
                s = sample_values(plane, ys[ph, pw], xs[ph, pw], "max")
                if not len(s):
                    continue
                # The max must beat every sample value that is not exactly equal to it (exact ties,
                # e.g. two samples clamped to the same pixels, move together).
                gap = s.max(axis=0)[None, :] - s
                if np.any((gap > 0) & (gap < MARGIN)):
                    return False
    return True


def _draw_safe_boxes(rng, feats, K, PH, PW, scale, sampling_ratio, aligned, mode, inverted=False):
    img_h, img_w = H / scale, W / scale
    boxes = []
    while len(boxes) < K:
        x1, y1 = rng.uniform(-0.2 * img_w, 0.8 * img_w), rng.uniform(-0.2 * img_h, 0.8 * img_h)
        w, h = rng.uniform(0.05 * img_w, 0.6 * img_w), rng.uniform(0.05 * img_h, 0.6 * img_h)
        if inverted and len(boxes) % 2:
            w = -w
        box = np.array([x1, y1, x1 + w, y1 + h])
        if fd_safe_aligned(feats, box, PH, PW, scale, sampling_ratio, aligned, mode):
            boxes.append(box)
    return np.array(boxes)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_box_grad_finite_differences(rng, mode, aligned, sampling_ratio):
    scale, PH, PW = 0.5, 2, 3
    feats = make_features(rng, 1, C, H, W)
    # aligned=True keeps a negative size: exercise inverted boxes where the grid is fixed.
    inverted = aligned and sampling_ratio > 0
    rois = _draw_safe_boxes(rng, feats, 5, PH, PW, scale, sampling_ratio, aligned, mode, inverted)
    bidx = np.zeros(len(rois), np.int64)
    g = _grad_output(rng, len(rois), PH, PW)

    def objective(r):
        return float(np.sum(g * roi_align(feats, r, (PH, PW), scale, sampling_ratio, aligned, mode=mode,
                                          batch_indices=bidx)))

    got = roi_align_backward(g, feats, rois, (PH, PW), scale, sampling_ratio, aligned, mode=mode,
                             batch_indices=bidx, wrt="boxes")
    assert got.shape == rois.shape
    numeric = numerical_box_grad(objective, rois, EPS)
    np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-6 * np.abs(numeric).max())
    for _ in range(3):
        d = rng.standard_normal(rois.shape)
        directional = (objective(rois + EPS * d) - objective(rois - EPS * d)) / (2 * EPS)
        assert abs(np.sum(got * d) - directional) <= 1e-6 * max(abs(directional), np.abs(numeric).max())


def test_box_grad_clamped_sizes_are_zero(rng):
    # aligned=False raises a size below 1 to 1: the far corner then has no influence.
    feats = make_features(rng, 1, C, H, W)
    rois = np.array([[2.3, 3.1, 2.6, 3.45], [5.2, 1.3, 4.1, 6.7]])  # tiny; inverted in x
    g = _grad_output(rng, 2, 2, 2)
    got = roi_align_backward(g, feats, rois, 2, 1.0, 2, False, batch_indices=[0, 0], wrt="boxes")
    assert got[0, 2] == 0 and got[0, 3] == 0 and got[1, 2] == 0
    assert np.all(got[0, :2] != 0) and got[1, 3] != 0


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_box_grad_layouts_agree(rng, mode):
    feats = make_features(rng, N, C, H, W)
    boxes = np.concatenate([edge_case_boxes(rng, N, H, W), random_boxes(rng, 4, N, H, W)])
    g = _grad_output(rng, len(boxes), 2, 3)
    nchw = roi_align_backward(g, feats, boxes, (2, 3), 1.0, 2, True, mode=mode, wrt="boxes")
    nhwc = roi_align_backward(to_nhwc(g), to_nhwc(feats), boxes, (2, 3), 1.0, 2, True, mode=mode,
                              layout="NHWC", wrt="boxes")
    np.testing.assert_allclose(nhwc, nchw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_wrt_both(rng, mode):
    feats = make_features(rng, N, C, H, W)
    boxes = np.concatenate([edge_case_boxes(rng, N, H, W), random_boxes(rng, 4, N, H, W)])
    g = _grad_output(rng, len(boxes), 2, 3)
    args = (g, feats, boxes, (2, 3), 1.0, -1, True)
    both = roi_align_backward(*args, mode=mode, wrt="both")
    assert isinstance(both, tuple) and len(both) == 2
    np.testing.assert_array_equal(both[0], roi_align_backward(*args, mode=mode, wrt="features"))
    np.testing.assert_array_equal(both[1], roi_align_backward(*args, mode=mode, wrt="boxes"))


def test_box_grad_forms(rng):
    n = 3
    feats = make_features(rng, n, C, H, W)
    boxes = sort_by_image(random_boxes(rng, 6, n, H, W))
    boxes[:, 0] = [0, 0, 2, 2, 2, 2]  # image 1 has no boxes
    g = _grad_output(rng, len(boxes), 2, 2)
    (b5, _), (b4, bidx), (blist, _) = box_forms(boxes, n)
    grad5 = roi_align_backward(g, feats, b5, 2, 1.0, 2, True, wrt="boxes")
    grad4 = roi_align_backward(g, feats, b4, 2, 1.0, 2, True, batch_indices=bidx, wrt="boxes")
    grad_list = roi_align_backward(g, feats, blist, 2, 1.0, 2, True, wrt="boxes")
    assert grad5.shape == (6, 5) and grad4.shape == (6, 4)
    assert np.all(grad5[:, 0] == 0)
    assert np.all(grad4 != 0)
    np.testing.assert_array_equal(grad5[:, 1:], grad4)
    assert isinstance(grad_list, list) and [a.shape for a in grad_list] == [a.shape for a in blist]
    np.testing.assert_array_equal(np.concatenate(grad_list), grad4)
    gf_list, gb_list = roi_align_backward(g, feats, blist, 2, 1.0, 2, True, wrt="both")
    assert isinstance(gb_list, list)
    np.testing.assert_array_equal(gf_list, roi_align_backward(g, feats, b5, 2, 1.0, 2, True))

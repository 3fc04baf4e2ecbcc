"""Axis-aligned roi_align forward against the numpy reference, and the API's input handling."""
import functools

import numpy as np
import pytest

from conftest import (box_forms, edge_case_boxes, make_features, random_boxes, sort_by_image, split_batch,
                      to_nchw, to_nhwc)
from reference import roi_align_ref
import roialign_cy
from conftest import peers_convention

roi_align = peers_convention(roialign_cy.roi_align)

N, C, H, W = 2, 3, 9, 11
SCALE = 0.5
# float32 kernels place samples with ~1 ulp(10) ~ 1e-6 px of error and the N(0, 1) features have
# slopes of a few units per pixel: hence atol 5e-6 against the float64 reference.
TOL = {np.float32: dict(rtol=1e-5, atol=5e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


def _pooled(output_size):
    return (output_size, output_size) if isinstance(output_size, int) else output_size


def _dataset():
    # Fixed data shared by the parametrized grid so that each reference result is computed once.
    rng = np.random.default_rng(20240611)
    feats = make_features(rng, N, C, H, W)
    boxes = np.concatenate([edge_case_boxes(rng, N, H, W, SCALE), random_boxes(rng, 4, N, H, W, SCALE)])
    return feats, boxes


FEATURES, BOXES = _dataset()


@functools.lru_cache(maxsize=None)
def _reference(output_size, spatial_scale, sampling_ratio, aligned, mode):
    rois, bidx = split_batch(BOXES)
    return roi_align_ref(FEATURES, rois, bidx, *_pooled(output_size), spatial_scale, sampling_ratio, aligned, mode)


@pytest.mark.parametrize("mode", ["avg", "max", "onnx_max"])
@pytest.mark.parametrize("output_size", [(3, 5), 2, (1, 4)])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_reference(dtype, layout, aligned, sampling_ratio, output_size, mode):
    feats = FEATURES.astype(dtype)
    if layout == "NHWC":
        feats = to_nhwc(feats)
    out = roi_align(feats, BOXES.astype(dtype), output_size, SCALE, sampling_ratio, aligned, mode=mode,
                    layout=layout)
    PH, PW = _pooled(output_size)
    expected_shape = (len(BOXES), C, PH, PW) if layout == "NCHW" else (len(BOXES), PH, PW, C)
    assert out.shape == expected_shape
    assert out.dtype == dtype
    if layout == "NHWC":
        out = to_nchw(out)
    np.testing.assert_allclose(out, _reference(output_size, SCALE, sampling_ratio, aligned, mode), **TOL[dtype])


@pytest.mark.parametrize("mode", ["avg", "max", "onnx_max"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25, 0.3])
def test_spatial_scale(rng, spatial_scale, aligned, mode):
    feats = make_features(rng, N, C, H, W)
    boxes = np.concatenate([random_boxes(rng, 5, N, H, W, spatial_scale),
                            edge_case_boxes(rng, N, H, W, spatial_scale)[:8]])
    rois, bidx = split_batch(boxes)
    for sr in (-1, 2):
        out = roi_align(feats, boxes, (2, 3), spatial_scale, sr, aligned, mode=mode)
        ref = roi_align_ref(feats, rois, bidx, 2, 3, spatial_scale, sr, aligned, mode)
        np.testing.assert_allclose(out, ref, **TOL[np.float64])


def test_known_values():
    # Hand-computed cases that pin the conventions independently of the reference.
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)  # x[r, c] = 4 r + c: bilinear is exact
    # aligned=True, one sample at the box centre (1.5 - 0.5, 2.5 - 0.5) = (row 2, col 1) -> 9.
    out = roi_align(x, np.array([[0, 0.0, 1.0, 3.0, 4.0]]), 1, 1.0, 1, True)
    assert out[0, 0, 0, 0] == 9.0
    # aligned=False: the same box is not shifted: centre (row 2.5, col 1.5) -> 11.5.
    out = roi_align(x, np.array([[0, 0.0, 1.0, 3.0, 4.0]]), 1, 1.0, 1, False)
    assert out[0, 0, 0, 0] == 11.5
    # Beyond the last row the sample is clamped to it: row 3.5 -> row 3, col 0.5 -> 12.5.
    out = roi_align(x, np.array([[0, 0.0, 3.0, 1.0, 4.0]]), 1, 1.0, 1, False)
    assert out[0, 0, 0, 0] == 12.5
    # 2 x 2 samples at rows (-2, 0) and cols (2.25, 2.75): the two below row -1 read 0 but count.
    box = np.array([[0, 2.0, -3.0, 3.0, 1.0]])
    assert roi_align(x, box, 1, 1.0, 2, False)[0, 0, 0, 0] == (2.25 + 2.75) / 4
    assert roi_align(x, box, 1, 1.0, 2, False, mode="max")[0, 0, 0, 0] == 2.75
    # onnx_max: the largest weighted tap, 0.75 * x[0, 3] of the sample at col 2.75.
    assert roi_align(x, box, 1, 1.0, 2, False, mode="onnx_max")[0, 0, 0, 0] == 2.25
    # On negative features the out-of-range samples' zeros win both maxima.
    assert roi_align(-x, box, 1, 1.0, 2, False, mode="max")[0, 0, 0, 0] == 0.0
    assert roi_align(-x, box, 1, 1.0, 2, False, mode="onnx_max")[0, 0, 0, 0] == 0.0


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("aligned", [False, True])
def test_box_forms_identical(rng, aligned, mode):
    n = 3
    feats = make_features(rng, n, C, H, W)
    boxes = random_boxes(rng, 7, n, H, W)
    boxes[:, 0] = [0, 0, 0, 2, 2, 2, 2]  # image 1 has no boxes: an empty list entry
    results = [roi_align(feats, bx, (2, 3), 1.0, -1, aligned, mode=mode, batch_indices=bi)
               for bx, bi in box_forms(sort_by_image(boxes), n)]
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def _strided_copy(a):
    """A view of ``a``'s values whose memory has gaps (every other element of a bigger array)."""
    big = np.zeros(tuple(2 * s for s in a.shape), dtype=a.dtype)
    big[tuple(slice(None, None, 2) for _ in a.shape)] = a
    view = big[tuple(slice(None, None, 2) for _ in a.shape)]
    assert not view.flags.c_contiguous
    return view


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noncontiguous_inputs(rng, dtype, layout):
    feats = make_features(rng, N, C, H, W, dtype)
    if layout == "NHWC":
        feats = to_nhwc(feats)
    boxes = np.concatenate([random_boxes(rng, 4, N, H, W), edge_case_boxes(rng, N, H, W)[:6]]).astype(dtype)
    expected = roi_align(feats, boxes, (3, 2), 1.0, 2, True, layout=layout)

    transposed = np.moveaxis(np.ascontiguousarray(np.moveaxis(feats, 1, -1)), -1, 1)  # a transposed view
    for f in (transposed, _strided_copy(feats), np.asfortranarray(feats)):
        np.testing.assert_array_equal(f, feats)
        np.testing.assert_array_equal(roi_align(f, boxes, (3, 2), 1.0, 2, True, layout=layout), expected)
    for b in (_strided_copy(boxes), np.asfortranarray(boxes)):
        np.testing.assert_array_equal(roi_align(feats, b, (3, 2), 1.0, 2, True, layout=layout), expected)
    # Reversed rows (negative strides) give the reversed output.
    np.testing.assert_array_equal(roi_align(feats, boxes[::-1], (3, 2), 1.0, 2, True, layout=layout),
                                  expected[::-1])
    # Separate coordinates and batch indices that are themselves strided views.
    coords, bidx = boxes[:, 1:], boxes[:, 0].astype(np.int64)
    np.testing.assert_array_equal(
        roi_align(feats, coords, (3, 2), 1.0, 2, True, layout=layout, batch_indices=_strided_copy(bidx)),
        expected)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_argument(rng, dtype, layout):
    feats = make_features(rng, N, C, H, W, dtype)
    if layout == "NHWC":
        feats = to_nhwc(feats)
    boxes = random_boxes(rng, 5, N, H, W).astype(dtype)
    expected = roi_align(feats, boxes, (2, 3), layout=layout)
    out = np.full(expected.shape, np.nan, dtype=dtype)  # every element must be written
    result = roi_align(feats, boxes, (2, 3), layout=layout, out=out)
    assert result is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mode", ["avg", "max", "onnx_max"])
def test_thread_counts_bit_identical(rng, mode):
    feats = make_features(rng, N, C, H, W)
    boxes = np.concatenate([random_boxes(rng, 12, N, H, W), edge_case_boxes(rng, N, H, W)])
    results = [roi_align(feats, boxes, (3, 3), 1.0, -1, False, mode=mode, n_threads=t) for t in (1, 2, None)]
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_boxes(rng, dtype, layout):
    feats = make_features(rng, N, C, H, W, dtype)
    if layout == "NHWC":
        feats = to_nhwc(feats)
    expected = (0, C, 3, 4) if layout == "NCHW" else (0, 3, 4, C)
    for boxes, bidx in [(np.zeros((0, 5), dtype), None), (np.zeros((0, 4), dtype), np.zeros(0, np.int64)),
                        ([np.zeros((0, 4), dtype)] * N, None)]:
        out = roi_align(feats, boxes, (3, 4), layout=layout, batch_indices=bidx)
        assert out.shape == expected
        assert out.dtype == dtype

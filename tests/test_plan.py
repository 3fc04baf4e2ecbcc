"""roialign_cy.plan: boxes validated once, tables kept, and every call equal to the one-shot
functions bit for bit."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import make_features, random_boxes, random_rotated_boxes, to_nhwc

import roialign_cy
from roialign_cy import (plan, roi_align, roi_align_backward, roi_align_rotated,
                         roi_align_rotated_backward)
from roialign_cy import _cpu

N, C, H, W = 2, 5, 12, 14


def _case(rng, rotated, layout, dtype):
    x = make_features(rng, N, C, H, W, dtype)
    boxes = (random_rotated_boxes if rotated else random_boxes)(rng, 9, N, H, W, 0.5)
    return (x if layout == "NCHW" else to_nhwc(x)), boxes.astype(dtype)


def _functions(rotated):
    return (roi_align_rotated, roi_align_rotated_backward) if rotated else (roi_align, roi_align_backward)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("rotated, mode", [(False, "avg"), (False, "max"), (True, "avg")])
@pytest.mark.parametrize("sampling_ratio, aligned", [(2, True), (-1, False)])
def test_plan_equals_the_functions(rng, dtype, layout, rotated, mode, sampling_ratio, aligned):
    x, boxes = _case(rng, rotated, layout, dtype)
    fwd, bwd = _functions(rotated)
    kw = dict(layout=layout) if rotated else dict(layout=layout, mode=mode)
    args = ((3, 2), 0.5, sampling_ratio, aligned)
    p = plan(boxes, x.shape, *args, rotated=rotated, dtype=dtype, **kw)
    want = fwd(x, boxes, *args, **kw)
    np.testing.assert_array_equal(p.forward(x), want)
    g = rng.standard_normal(want.shape).astype(dtype)
    for wrt in ["features", "boxes", "both"]:
        got, ref = p.backward(g, x, wrt=wrt), bwd(g, x, boxes, *args, wrt=wrt, **kw)
        for a, b in zip(got if wrt == "both" else [got], ref if wrt == "both" else [ref]):
            np.testing.assert_array_equal(a, b)
    if mode == "avg":  # the feature gradient in avg mode needs no feature values
        np.testing.assert_array_equal(p.backward(g), bwd(g, x, boxes, *args, **kw))


def test_plan_is_reused_across_maps_and_channel_counts(rng):
    boxes = random_boxes(rng, 20, N, H, W).astype(np.float32)
    p = plan(boxes, (N, C, H, W), 4, 1.0, 2, True)
    for channels in [C, 1, 17, C]:  # video frames, channel groups, other heads
        x = make_features(rng, N, channels, H, W, np.float32)
        want = roi_align(x, boxes, 4, 1.0, 2, True)
        np.testing.assert_array_equal(p.forward(x), want)
        out = np.empty_like(want)
        assert p.forward(x, out=out) is out
        np.testing.assert_array_equal(out, want)
        assert p.output_shape(channels) == want.shape
    assert p._run is not None  # the tables were built once and kept


def test_plan_shared_by_threads(rng):
    boxes = random_boxes(rng, 40, N, H, W).astype(np.float32)
    maps = [make_features(rng, N, 8, H, W, np.float32) for _ in range(6)]
    want = [roi_align(x, boxes, 3, 1.0, 2, True) for x in maps]
    p = plan(boxes, maps[0].shape, 3, 1.0, 2, True, n_threads=2)  # tables built by the first call
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda i: p.forward(maps[i % 6]), range(36)))
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, want[i % 6])


def test_plan_in_several_chunks_equals_one(rng, monkeypatch):
    x, boxes = _case(rng, False, "NCHW", np.float64)
    want = roi_align(x, boxes, 3, 0.5, 2)
    monkeypatch.setattr(_cpu, "TABLE_ENTRIES_PER_CHUNK", 16)  # tables rebuilt per chunk, not kept
    p = plan(boxes, x.shape, 3, 0.5, 2, dtype=np.float64)
    np.testing.assert_array_equal(p.forward(x), want)
    np.testing.assert_array_equal(p.forward(x), want)


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((N, C, H + 1, W), np.float32), ValueError, "plan's N, H, W"),
    (np.zeros((N + 1, C, H, W), np.float32), ValueError, "plan's N, H, W"),
    (np.zeros((N, C, H, W), np.float64), TypeError, "plan's dtype float32"),
    (None, TypeError, "features must be a float array"),
])
def test_plan_refuses_other_maps(bad, error, match):
    p = plan(np.array([[0, 1, 1, 5, 5.0]]), (N, C, H, W), 2)
    with pytest.raises(error, match=match):
        p.forward(bad)


def test_plan_validates_like_the_functions():
    with pytest.raises(ValueError, match="batch index out of range"):
        plan(np.array([[3, 1, 1, 5, 5.0]]), (N, C, H, W), 2)
    with pytest.raises(TypeError, match="dtype must be one of"):
        plan(np.array([[0, 1, 1, 5, 5.0]]), (N, C, H, W), 2, dtype=np.int32)
    with pytest.raises(TypeError, match="rotated must be a bool"):
        plan(np.array([[0, 1, 1, 5, 5.0]]), (N, C, H, W), 2, rotated=1)
    p = plan(np.array([[0, 1, 1, 5, 5.0]]), (N, C, H, W), 2, mode="max")
    with pytest.raises(ValueError, match="features are needed"):
        p.backward(np.ones((1, C, 2, 2), np.float32))
    with pytest.raises(ValueError, match="grad_output must have shape"):
        p.backward(np.ones((1, C, 3, 3), np.float32), np.ones((N, C, H, W), np.float32))


def test_plan_defaults_follow_each_operator():
    assert plan(np.array([[0, 1, 1, 5, 5.0]]), (1, 1, 8, 8), 2).params.aligned is False
    assert plan(np.array([[0, 4, 4, 3, 3, 10.0]]), (1, 1, 8, 8), 2, rotated=True).params.aligned
    assert "plan: 1 boxes" in repr(plan(np.array([[0, 1, 1, 5, 5.0]]), (1, 1, 8, 8), 2))
    assert roialign_cy.Plan is type(plan(np.array([[0, 1, 1, 5, 5.0]]), (1, 1, 8, 8), 2))


@pytest.mark.parametrize("form", ["batched", "onnx"])
def test_plan_keeps_its_own_copy_of_the_boxes(rng, form):
    x = make_features(rng, 1, 3, H, W, np.float32)
    rows = np.array([[0, 1.5, 2.0, 9.0, 8.0]], np.float32)
    boxes = rows.copy() if form == "batched" else rows[:, 1:].copy()
    want = roi_align(x, boxes, 2)
    p = plan(boxes, x.shape, 2)
    boxes[:] = 0  # the caller reuses its buffer before the plan's first call
    np.testing.assert_array_equal(p.forward(x), want)
    g = np.ones_like(want)
    np.testing.assert_array_equal(p.backward(g, x, wrt="boxes")[..., -4:],
                                  roi_align_backward(g, x, rows if form == "batched" else rows[:, 1:],
                                                     2, wrt="boxes")[..., -4:])

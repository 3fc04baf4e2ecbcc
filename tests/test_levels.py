"""The CPU kernels' multi-level entry points (one parallel region over the levels of a feature
pyramid) against one single-level call per level."""
import numpy as np
import pytest

from conftest import make_features, random_boxes, to_nhwc

from roialign_cy import _cpu, roi_align, roi_align_backward
from roialign_cy._params import OpParams

# (N, C, H_l, W_l) per level, scales 1/4 .. 1/16: a small pyramid over a 96 x 128 image
LEVELS = [(2, 16, 24, 32), (2, 16, 12, 16), (2, 16, 6, 8)]
SCALES = [0.25, 0.125, 0.0625]


def _pyramid(rng, dtype, layout, channels=16):
    maps = [make_features(rng, n, channels, h, w, dtype) for n, _, h, w in LEVELS]
    return maps if layout == "NCHW" else [to_nhwc(m) for m in maps]


def _boxes(rng, k, dtype):
    boxes = random_boxes(rng, k, 2, 96, 128)
    return boxes.astype(dtype), rng.integers(0, len(LEVELS), k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("k", [7, 300])  # direct planes / channels-last blocks on some levels
def test_levels_in_one_call_equal_one_call_per_level(rng, dtype, layout, mode, k):
    maps = _pyramid(rng, dtype, layout)
    boxes, level = _boxes(rng, k, dtype)
    p = OpParams(pooled_h=3, pooled_w=2, spatial_scale=1.0, sampling_ratio=2, aligned=True,
                 mode=mode, channels_last=layout == "NHWC")
    rois, batch_idx = np.ascontiguousarray(boxes[:, 1:]), boxes[:, 0].astype(np.int64)
    shape = (k, 3, 2, 16) if layout == "NHWC" else (k, 16, 3, 2)
    out = np.full(shape, np.nan, dtype)
    _cpu.forward_levels(maps, rois, batch_idx, level, SCALES, out, p)
    g = rng.standard_normal(shape).astype(dtype)
    grads = [np.zeros_like(m) for m in maps]
    _cpu.backward_features_levels(g, maps, rois, batch_idx, level, SCALES, grads, p)
    grad_rois = np.zeros_like(rois)
    _cpu.backward_boxes_levels(g, maps, rois, batch_idx, level, SCALES, grad_rois, p)
    for l, (m, s) in enumerate(zip(maps, SCALES)):
        sel = level == l
        kw = dict(layout=layout, mode=mode)
        np.testing.assert_array_equal(out[sel], roi_align(m, boxes[sel], (3, 2), s, 2, True, **kw))
        gf, gb = roi_align_backward(g[sel], m, boxes[sel], (3, 2), s, 2, True, wrt="both", **kw)
        # each level's gradient gets its boxes' terms in the same order as a call of its own
        np.testing.assert_array_equal(grads[l], gf)
        np.testing.assert_array_equal(grad_rois[sel], gb[:, 1:])


def test_levels_results_do_not_depend_on_the_thread_count(rng):
    maps = _pyramid(rng, np.float32, "NCHW")
    boxes, level = _boxes(rng, 400, np.float32)
    rois, batch_idx = np.ascontiguousarray(boxes[:, 1:]), boxes[:, 0].astype(np.int64)
    results = []
    for n_threads in [1, 2, 3]:
        p = OpParams(pooled_h=7, pooled_w=7, spatial_scale=1.0, sampling_ratio=2, aligned=True,
                     n_threads=n_threads)
        out = np.empty((400, 16, 7, 7), np.float32)
        _cpu.forward_levels(maps, rois, batch_idx, level, SCALES, out, p)
        grads = [np.zeros_like(m) for m in maps]
        _cpu.backward_features_levels(np.ones_like(out), maps, rois, batch_idx, level, SCALES,
                                      grads, p)
        results.append([out] + grads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)

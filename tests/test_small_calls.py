"""The one-pass path of small forward calls (``forward_small`` of roialign_cy._cpu._roi_align:
roi_align, ps_roi_align; of _roi_align_rotated: roi_align_rotated; of _roi_pool: roi_pool,
ps_roi_pool).

A plain call with few boxes is checked, planned and pooled in one compiled pass. It must give the
general path's bits for every parameter and loop order, take the plain calls (and only them), and
leave every other call, valid or not, to the general path and its messages. ``out=`` forces the
general path here: the one-pass call never takes it.
"""
import numpy as np
import pytest

import roialign_cy
from conftest import (edge_case_boxes, make_features, random_boxes, random_rotated_boxes,
                      split_batch, to_nhwc)
from reference import roi_align_ref
from roialign_cy import _api
from roialign_cy._cpu import _roi_align, _roi_align_rotated, _roi_pool


def _general(features, boxes, *args, **kwargs):
    """roi_align through the general path (out= is never taken by the one-pass call)."""
    probe = roialign_cy.plan(boxes, features.shape, *args, dtype=features.dtype,
                             **{k: v for k, v in kwargs.items() if k != "n_threads"})
    out = np.full(probe.output_shape(), np.nan, features.dtype)
    return roialign_cy.roi_align(features, boxes, *args, out=out, **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("mode", ["avg", "max", "onnx_max"])
@pytest.mark.parametrize("aligned, sampling_ratio", [(True, 2), (False, -1), (True, 0), (False, 3)])
@pytest.mark.parametrize("N, C, K", [(1, 3, 1), (3, 20, 9), (2, 1, 40), (1, 17, 300)])
def test_same_bits_as_the_general_path(rng, one_pass, dtype, layout, mode, aligned,
                                       sampling_ratio, N, C, K):
    """Every parameter, box order and NCHW loop order (C >= 16 on a small map: blocks of planes;
    fewer channels or boxes: direct planes): the general path's bits, at 1 and 3 threads."""
    H, W = 11, 14
    x = make_features(rng, N, C, H, W, dtype)
    boxes = random_boxes(rng, K, N, H, W, 0.5).astype(dtype)
    if layout == "NHWC":
        x = to_nhwc(x)
    args = ((5, 4), 0.5, sampling_ratio, aligned)
    for n_threads in (1, 3):
        got = roialign_cy.roi_align(x, boxes, *args, mode=mode, layout=layout,
                                    n_threads=n_threads)
        want = _general(x, boxes, *args, mode=mode, layout=layout, n_threads=n_threads)
        np.testing.assert_array_equal(got, want)
    assert one_pass == [True, True]


@pytest.mark.parametrize("aligned", [True, False])
def test_edge_boxes_match_the_reference(rng, one_pass, aligned):
    """Boxes partly and wholly outside, tiny, degenerate and (allow_inverted) inverted ones."""
    N, C, H, W = 2, 3, 9, 12
    x = make_features(rng, N, C, H, W)
    boxes = edge_case_boxes(rng, N, H, W, 0.5)
    got = roialign_cy.roi_align(x, boxes, (3, 4), 0.5, -1, aligned, allow_inverted=True)
    rois, batch = split_batch(boxes)
    want = roi_align_ref(x, rois, batch, 3, 4, 0.5, -1, aligned)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got, _general(x, boxes, (3, 4), 0.5, -1, aligned,
                                                allow_inverted=True))
    assert one_pass == [True]


def test_strided_boxes_and_read_only_features(rng, one_pass):
    x = make_features(rng, 2, 4, 10, 10, np.float32)
    x.flags.writeable = False
    table = np.asfortranarray(np.repeat(random_boxes(rng, 6, 2, 10, 10), 2, axis=1))
    boxes = table[:, ::2].astype(np.float32)[::-1]  # a reversed view
    got = roialign_cy.roi_align(x, boxes, 3, 1.0, 2, True)
    np.testing.assert_array_equal(got, _general(x, np.ascontiguousarray(boxes), 3, 1.0, 2, True))
    assert one_pass == [True]


def _plain(rng):
    x = make_features(rng, 2, 3, 8, 8, np.float32)
    return x, random_boxes(rng, 4, 2, 8, 8).astype(np.float32)


@pytest.mark.parametrize("change", [
    "list boxes", "batch_indices", "float64 boxes", "non-contiguous features", "output_size list",
    "numpy scalar", "numpy bool", "more boxes than the one-pass call takes", "no boxes",
    "max_samples_per_bin past the one-pass bound",
])
def test_other_valid_calls_take_the_general_path(rng, one_pass, change):
    """Calls outside the plain form still work, with the same numbers, by the general path."""
    x, boxes = _plain(rng)
    args, kwargs = [x, boxes, (3, 3), 1.0, 2, True], {}
    if change == "list boxes":
        args[1] = [boxes[boxes[:, 0] == i, 1:] for i in range(2)]
        boxes = np.concatenate([boxes[boxes[:, 0] == i] for i in range(2)])
    elif change == "batch_indices":
        args[1], kwargs["batch_indices"] = boxes[:, 1:], boxes[:, 0].astype(np.int64)
    elif change == "float64 boxes":
        args[1] = boxes.astype(np.float64)
    elif change == "non-contiguous features":
        args[0] = np.repeat(x, 2, axis=3)[..., ::2]
    elif change == "output_size list":
        args[2] = [3, 3]
    elif change == "numpy scalar":
        args[3] = np.float32(1.0)
    elif change == "numpy bool":
        args[5] = np.bool_(True)
    elif change == "more boxes than the one-pass call takes":
        boxes = np.repeat(boxes, 300, axis=0)
        args[1] = boxes
    elif change == "no boxes":
        boxes = boxes[:0]
        args[1] = boxes
    else:
        kwargs["max_samples_per_bin"] = 1 << 40
    got = roialign_cy.roi_align(*args, **kwargs)
    np.testing.assert_array_equal(got, _general(x, boxes, (3, 3), 1.0, 2, True))
    assert one_pass == [False] or (one_pass == [] and change in ("list boxes", "batch_indices"))


@pytest.mark.parametrize("bad, message", [
    ({"box": [0, 1, np.nan, 4, 4]}, "boxes must be finite"),
    ({"box": [2, 1, 1, 4, 4]}, "batch index out of range"),
    ({"box": [0.5, 1, 1, 4, 4]}, "whole numbers"),
    ({"box": [0, 4, 1, 1, 4]}, "x2 >= x1"),
    ({"max_samples_per_bin": 3}, "sampling grid too large"),
    ({"output_size": 0}, "output_size must be >= 1"),
    ({"spatial_scale": -1.0}, "spatial_scale must be finite and > 0"),
    ({"sampling_ratio": -2}, "sampling_ratio must be >= -1"),
    ({"mode": "mean"}, "mode must be one of"),
    ({"layout": "CHW"}, "layout must be one of"),
    ({"n_threads": 0}, "n_threads must be >= 1"),
    ({"aligned": 1}, "aligned must be a bool"),
    ({"allow_inverted": "no"}, "allow_inverted must be a bool"),
])
def test_bad_input_gets_the_general_paths_message(rng, one_pass, bad, message):
    x, boxes = _plain(rng)
    kwargs = dict(output_size=(3, 3), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    if "box" in bad:
        boxes[1] = bad.pop("box")
    kwargs.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        roialign_cy.roi_align(x, boxes, **kwargs)
    assert one_pass == [False]  # declined, then refused with the general path's words


def test_huge_grids_are_refused_not_run(rng):
    """An adaptive grid past max_samples_per_bin: the bound of the general path, not a long run
    (the one-pass call declines grids past its bound before building anything)."""
    x, boxes = _plain(rng)
    boxes[0, 1:] = [0, 0, 3e9, 3e9]
    with pytest.raises(ValueError, match="sampling grid too large"):
        roialign_cy.roi_align(x, boxes, 2, 1.0, -1, True)


def test_direct_entries_decline_what_they_do_not_take():
    x = np.zeros((1, 8, 4, 4), np.float32)
    boxes = np.array([[0, 0, 0, 2, 2]], np.float32)
    plain = ("roi_align", x, boxes, 2, 1.0, 2, True, "avg", "NCHW", None, 64, False)
    assert _roi_align.forward_small(*plain).shape == (1, 8, 2, 2)
    for i, other in [(0, "roi_pool"), (1, x.astype(">f4")), (2, boxes[:, 1:]), (3, (2, 2, 2)),
                     (4, float("inf")), (5, 1 << 41), (7, "AVG"), (9, 1 << 31), (10, 0),
                     (11, None), (1, x[:, :3])]:
        call = list(plain)
        call[i] = other
        if i == 1 and other.shape[1] == 3:
            call[0] = "ps_roi_align"  # 3 channels are not a multiple of 2 x 2
        assert _roi_align.forward_small(*call) is None, i
    plain = ("ps_roi_pool", x, boxes, 2, 1.0, "NCHW", None, False, "image")
    assert _roi_pool.forward_small(*plain).shape == (1, 2, 2, 2)
    for i, other in [(0, "roi_align"), (1, x.astype(np.float64)), (3, [2, 2]), (4, -1.0),
                     (5, "nchw"), (6, 0), (7, 1), (8, "edge"), (1, x[:, :3])]:
        call = list(plain)
        call[i] = other
        assert _roi_pool.forward_small(*call) is None, i


def test_calls_from_python_threads_share_nothing(rng):
    """The one-pass call keeps no state between calls: threads calling it at once get their own
    answers."""
    from concurrent.futures import ThreadPoolExecutor

    cases = []
    for i in range(8):
        x = make_features(rng, 1, 5, 12, 12, np.float32)
        boxes = random_boxes(rng, 3 + i, 1, 12, 12).astype(np.float32)
        cases.append((x, boxes, _general(x, boxes, 4, 1.0, 2, True)))
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            results = list(pool.map(lambda c: roialign_cy.roi_align(c[0], c[1], 4, 1.0, 2, True),
                                    cases))
            for (_, _, want), got in zip(cases, results):
                np.testing.assert_array_equal(got, want)


def test_the_api_takes_the_one_pass_call_first(rng, monkeypatch):
    x, boxes = _plain(rng)

    def general(*args, **kwargs):
        raise AssertionError("the plain call reached the general path")

    monkeypatch.setattr(_api, "_forward", general)
    assert roialign_cy.roi_align(x, boxes, 3, 1.0, 2, True).shape == (4, 3, 3, 3)


# ---------------------------------------------------------------------------------------------
# the rest of the family

FAMILY = {
    # name: (function, positional arguments after (features, boxes), keywords, channels)
    "roi_pool": (roialign_cy.roi_pool, ((3, 2), 0.5), {}, 5),
    "roi_pool many channels": (roialign_cy.roi_pool, ((3, 2), 0.5), {}, 20),
    "ps_roi_align": (roialign_cy.ps_roi_align, ((3, 2), 0.5, 2), {}, 12),
    "ps_roi_align adaptive": (roialign_cy.ps_roi_align, ((3, 2), 0.5, -1), {}, 12),
    "ps_roi_pool": (roialign_cy.ps_roi_pool, ((3, 2), 0.5), {}, 12),
    "ps_roi_pool image edge": (roialign_cy.ps_roi_pool, ((3, 2), 0.5), {"edge": "image"}, 12),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("K", [1, 6, 200])
@pytest.mark.parametrize("name", list(FAMILY))
def test_family_same_bits_as_the_general_path(rng, one_pass, name, K, layout, dtype):
    fn, args, kwargs, C = FAMILY[name]
    N, H, W = 2, 10, 13
    x = make_features(rng, N, C, H, W, dtype)
    boxes = np.concatenate([random_boxes(rng, K, N, H, W, 0.5),
                            edge_case_boxes(rng, N, H, W, 0.5)]).astype(dtype)
    if layout == "NHWC":
        x = to_nhwc(x)
    kwargs = dict(kwargs, layout=layout, allow_inverted=True)
    for n_threads in (1, 3):
        got = fn(x, boxes, *args, n_threads=n_threads, **kwargs)
        probe = fn(x, boxes[:1], *args, **kwargs)  # the output's channels
        out = np.full((len(boxes),) + probe.shape[1:], np.nan, dtype)
        want = fn(x, boxes, *args, n_threads=n_threads, out=out, **kwargs)
        np.testing.assert_array_equal(got, want)
    # roi_pool on many NCHW channels whose boxes cover the map is the block loops': the general
    # path's (test_roi_pool_block_loops_are_the_general_paths)
    assert one_pass[1::2] == [True, True]
    if name != "roi_pool many channels" or layout == "NHWC":
        assert one_pass == [True] * 4


@pytest.mark.parametrize("K, side, blocks", [(1, 1, False), (3, 11, True)])
def test_roi_pool_block_loops_are_the_general_paths(rng, one_pass, K, side, blocks):
    """The one-pass call declines the roi_pool calls that the cost model sends to the block loops
    (bins covering a fifth of the map's pixels or more, 16 channels or more)."""
    x = make_features(rng, 1, 32, 12, 12, np.float32)
    boxes = np.tile(np.array([[0, 0, 0, side, side]], np.float32), (K, 1))
    got = roialign_cy.roi_pool(x, boxes, 3)
    np.testing.assert_array_equal(got, _general_pool(x, boxes, 3))
    assert one_pass == [not blocks]


def _general_pool(x, boxes, size):
    out = np.empty((len(boxes), x.shape[1], size, size), x.dtype)
    return roialign_cy.roi_pool(x, boxes, size, out=out)


def test_roi_pool_with_argmax_takes_the_general_path(rng, one_pass):
    x = make_features(rng, 1, 3, 8, 8, np.float32)
    boxes = random_boxes(rng, 3, 1, 8, 8).astype(np.float32)
    out, argmax = roialign_cy.roi_pool(x, boxes, 2, return_argmax=True)
    np.testing.assert_array_equal(out, roialign_cy.roi_pool(x, boxes, 2))
    assert one_pass == [True] and argmax.dtype == np.int32


@pytest.mark.parametrize("fn, args", [(roialign_cy.roi_pool, (2,)),
                                      (roialign_cy.ps_roi_align, (2, 1.0, 2)),
                                      (roialign_cy.ps_roi_pool, (2,))])
@pytest.mark.parametrize("bad, message", [
    ({"box": [0, 1, np.nan, 4, 4]}, "boxes must be finite"),
    ({"box": [3, 1, 1, 4, 4]}, "batch index out of range"),
    ({"box": [0, 4, 1, 1, 4]}, "x2 >= x1"),
    ({"channels": 6}, "multiple of output_size"),
    ({"layout": "CHW"}, "layout must be one of"),
])
def test_family_bad_input_gets_the_general_paths_message(rng, one_pass, fn, args, bad, message):
    if "channels" in bad and fn is roialign_cy.roi_pool:
        pytest.skip("roi_pool takes any number of channels")
    x = make_features(rng, 2, bad.get("channels", 8), 8, 8, np.float32)
    boxes = random_boxes(rng, 4, 2, 8, 8).astype(np.float32)
    if "box" in bad:
        boxes[1] = bad["box"]
    with pytest.raises((ValueError, TypeError), match=message):
        fn(x, boxes, *args, **({"layout": bad["layout"]} if "layout" in bad else {}))
    assert one_pass == [False]


# ---------------------------------------------------------------------------------------------
# rotated boxes

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("aligned, clockwise, sampling_ratio", [(True, False, 2), (False, True, -1),
                                                                (True, True, 0)])
@pytest.mark.parametrize("N, C, K", [(1, 3, 1), (2, 20, 40), (3, 2, 7)])
def test_rotated_same_bits_as_the_general_path(rng, one_pass, dtype, layout, aligned, clockwise,
                                               sampling_ratio, N, C, K):
    """Rotated boxes partly outside the map, on every loop order (C = 20 on a small map with 40
    boxes: blocks of planes), at 1 and 3 threads: the general path's bits."""
    H, W = 9, 12
    x = make_features(rng, N, C, H, W, dtype)
    boxes = random_rotated_boxes(rng, K, N, H, W, 0.5).astype(dtype)
    if layout == "NHWC":
        x = to_nhwc(x)
    args = ((3, 2), 0.5, sampling_ratio, aligned)
    for n_threads in (1, 3):
        got = roialign_cy.roi_align_rotated(x, boxes, *args, clockwise=clockwise, layout=layout,
                                            n_threads=n_threads)
        out = np.full(got.shape, np.nan, dtype)
        want = roialign_cy.roi_align_rotated(x, boxes, *args, clockwise=clockwise,
                                             layout=layout, n_threads=n_threads, out=out)
        np.testing.assert_array_equal(got, want)
    assert one_pass == [True, True]  # (out= never reaches the one-pass call)


@pytest.mark.parametrize("bad, message", [
    ({"box": [0, 3, 3, 2, np.inf, 10]}, "boxes must be finite"),
    ({"box": [1.5, 3, 3, 2, 2, 10]}, "whole numbers"),
    ({"box": [0, 3, 3, -2, 2, 10]}, "w >= 0 and h >= 0"),
    ({"clockwise": 1}, "clockwise must be a bool"),
    ({"max_samples_per_bin": 2}, "sampling grid too large"),
])
def test_rotated_bad_input_gets_the_general_paths_message(rng, one_pass, bad, message):
    x = make_features(rng, 1, 2, 8, 8, np.float32)
    boxes = random_rotated_boxes(rng, 3, 1, 8, 8).astype(np.float32)
    kwargs = {k: v for k, v in bad.items() if k != "box"}
    if "box" in bad:
        boxes[1] = bad["box"]
    with pytest.raises((ValueError, TypeError), match=message):
        roialign_cy.roi_align_rotated(x, boxes, 2, 1.0, 2, **kwargs)
    assert one_pass == [False]


def test_rotated_inverted_boxes_with_allow_inverted(rng, one_pass):
    x = make_features(rng, 1, 2, 8, 8)
    boxes = np.array([[0, 4, 4, -3, 2, 30], [0, 4, 4, 3, -2, -60]], np.float64)
    got = roialign_cy.roi_align_rotated(x, boxes, 2, 1.0, -1, False, allow_inverted=True)
    want = roialign_cy.roi_align_rotated(x, boxes, 2, 1.0, -1, False, allow_inverted=True,
                                         out=np.empty_like(got))
    np.testing.assert_array_equal(got, want)
    assert one_pass == [True]

"""roialign_cy.dask against the in-memory calls and tests/reference.py: random chunkings along every
axis, both layouts, axis-aligned and rotated boxes (edge cases, chunk-straddling, outside the
map), errors at call time, what is read, a 2-process LocalCluster, zarr on disk, and a lazily
generated map of 1.28 TB."""
import functools
import pickle
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="roialign_cy.dask needs dask: pip install 'roialign_cy[dask]'")
import dask  # noqa: E402
from dask.core import flatten  # noqa: E402
from dask.optimization import cull  # noqa: E402

import roialign_cy  # noqa: E402
import roialign_cy.dask as rd  # noqa: E402
from conftest import (edge_case_boxes, make_features, random_boxes, random_rotated_boxes,  # noqa: E402
                      split_batch, to_nchw, to_nhwc, box_forms, sort_by_image)
from reference import roi_align_ref, roi_align_rotated_ref  # noqa: E402

N, C, H, W = 3, 5, 61, 83
SCALE = 0.5
# Both calls place samples with ~1 ulp of the map coordinates of error (the region's sums round
# more finely than the whole map's), times feature slopes of a few units per pixel.
TOL = {np.float32: dict(rtol=1e-5, atol=16 * np.spacing(np.float32(max(H, W)))),
       np.float64: dict(rtol=1e-12, atol=1e-12)}
SYNC = dict(scheduler="synchronous")


def random_chunks(rng, shape):
    """A random chunking of every axis (1 to 4 chunks each)."""
    out = []
    for n in shape:
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, 4))),
                                  replace=False)) if n > 1 else []
        out.append(tuple(np.diff(np.concatenate([[0], cuts, [n]])).tolist()))
    return tuple(out)


def straddling_boxes(rng, chunks_hw, n_images, scale, count=8):
    """(count, 5) boxes centred on chunk borders (image units), so that they span several chunks."""
    ey, ex = (np.cumsum(c)[:-1] for c in chunks_hw)
    ey = ey if len(ey) else np.array([chunks_hw[0][0] // 2])
    ex = ex if len(ex) else np.array([chunks_hw[1][0] // 2])
    rows = []
    for _ in range(count):
        cy, cx = rng.choice(ey) + rng.uniform(-2, 2), rng.choice(ex) + rng.uniform(-2, 2)
        hh, hw = rng.uniform(1, 12, size=2)
        rows.append([rng.integers(n_images), (cx - hw) / scale, (cy - hh) / scale,
                     (cx + hw) / scale, (cy + hh) / scale])
    return np.array(rows)


def _dataset():
    rng = np.random.default_rng(20261129)
    feats = make_features(rng, N, C, H, W)
    boxes = np.concatenate([edge_case_boxes(rng, N, H, W, SCALE),
                            random_boxes(rng, 12, N, H, W, SCALE)])
    rboxes = random_rotated_boxes(rng, 16, N, H, W, SCALE)
    return feats, boxes, rboxes


FEATURES, BOXES, RBOXES = _dataset()


@functools.lru_cache(maxsize=None)
def _reference(sampling_ratio, aligned, mode):
    rois, bidx = split_batch(BOXES)
    return roi_align_ref(FEATURES, rois, bidx, 3, 4, SCALE, sampling_ratio, aligned, mode)


@functools.lru_cache(maxsize=None)
def _rotated_reference(aligned, clockwise):
    rois, bidx = split_batch(RBOXES)
    return roi_align_rotated_ref(FEATURES, rois, bidx, 2, 3, SCALE, 2, aligned, clockwise)


def _lazy(feats, layout, chunks):
    x = to_nhwc(feats) if layout == "NHWC" else feats
    if layout == "NHWC":
        chunks = (chunks[0], chunks[2], chunks[3], chunks[1])
    return x, da.from_array(x, chunks=chunks)


def _nchw(out, layout):
    return to_nchw(out) if layout == "NHWC" else out


@pytest.mark.parametrize("chunk_seed", range(3))
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_in_memory(dtype, layout, aligned, sampling_ratio, mode, chunk_seed):
    rng = np.random.default_rng(chunk_seed)
    chunks = random_chunks(rng, FEATURES.shape)
    boxes = np.concatenate([BOXES, straddling_boxes(rng, chunks[2:], N, SCALE)])
    x, lazy = _lazy(FEATURES.astype(dtype), layout, chunks)
    kw = dict(mode=mode, layout=layout, allow_inverted=True)
    # small tasks and regions: many groups, split unions and sparse boxes on a small map
    out = rd.roi_align(lazy, boxes, (3, 4), SCALE, sampling_ratio, aligned, boxes_per_task=5,
                       max_region_pixels=400, **kw)
    assert isinstance(out, da.Array) and out.dtype == dtype
    assert out.chunks[0][0] == 5 and out.chunks[3 if layout == "NHWC" else 1] == chunks[1]
    got = out.compute(**SYNC)
    expected = roialign_cy.roi_align(x, boxes, (3, 4), SCALE, sampling_ratio, aligned, **kw)
    np.testing.assert_allclose(got, expected, **TOL[dtype])
    ref = _reference(sampling_ratio, aligned, mode)
    np.testing.assert_allclose(_nchw(got, layout)[:len(BOXES)], ref,
                               **TOL[dtype] if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("chunk_seed", range(2))
@pytest.mark.parametrize("clockwise", [False, True])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rotated_matches_in_memory(dtype, layout, aligned, clockwise, chunk_seed):
    rng = np.random.default_rng(100 + chunk_seed)
    chunks = random_chunks(rng, FEATURES.shape)
    x, lazy = _lazy(FEATURES.astype(dtype), layout, chunks)
    kw = dict(clockwise=clockwise, layout=layout)
    out = rd.roi_align_rotated(lazy, RBOXES, (2, 3), SCALE, 2, aligned, boxes_per_task=3,
                               max_region_pixels=300, **kw)
    got = out.compute(**SYNC)
    expected = roialign_cy.roi_align_rotated(x, RBOXES, (2, 3), SCALE, 2, aligned, **kw)
    np.testing.assert_allclose(got, expected, **TOL[dtype])
    if dtype == np.float64:
        np.testing.assert_allclose(_nchw(got, layout), _rotated_reference(aligned, clockwise),
                                   **TOL[dtype])


def test_rotated_adaptive_and_unaligned_tiny(rng):
    """Adaptive grids and sub-pixel rotated boxes (aligned=True: they take the aligned path)."""
    feats = make_features(rng, 1, 2, 40, 50)
    boxes = random_rotated_boxes(rng, 10, 1, 40, 50)
    boxes[:3, 3:5] = rng.uniform(0.05, 0.9, size=(3, 2))
    lazy = da.from_array(feats, chunks=(1, 1, 13, 17))
    for aligned in (True, False):
        got = rd.roi_align_rotated(lazy, boxes, 3, 1.0, -1, aligned).compute(**SYNC)
        np.testing.assert_allclose(
            got, roialign_cy.roi_align_rotated(feats, boxes, 3, 1.0, -1, aligned), **TOL[np.float64])


def test_box_forms_and_empty():
    lazy = da.from_array(FEATURES, chunks=(2, 3, 30, 40))
    sorted_boxes = sort_by_image(BOXES[:14])
    expected = roialign_cy.roi_align(FEATURES, sorted_boxes, 2, SCALE, 2, True, allow_inverted=True)
    for boxes, batch_indices in box_forms(sorted_boxes, N):
        got = rd.roi_align(lazy, boxes, 2, SCALE, 2, True, batch_indices=batch_indices,
                           allow_inverted=True)
        np.testing.assert_allclose(got.compute(**SYNC), expected, **TOL[np.float64])
    empty = rd.roi_align(lazy, np.zeros((0, 5)), 2)
    assert empty.shape == (0, C, 2, 2) and empty.compute(**SYNC).shape == (0, C, 2, 2)


def _feature_keys(out, features):
    """The feature chunks that computing ``out`` needs (its culled graph)."""
    graph, _ = cull(dict(out.__dask_graph__()), list(flatten(out.__dask_keys__())))
    return {k for k in graph if isinstance(k, tuple) and k[0] == features.name}


def test_boxes_outside_read_nothing():
    lazy = da.from_array(FEATURES, chunks=(1, 2, 20, 20))
    outside = np.array([[0, -90.0, -90.0, -10.0, -10.0], [2, 400.0, 10.0, 500.0, 30.0],
                        [1, 20.0, 300.0, 40.0, 350.0]])
    out = rd.roi_align(lazy, outside, 3, SCALE, 2, True)
    assert not _feature_keys(out, lazy)
    np.testing.assert_array_equal(out.compute(**SYNC), 0)


def test_reads_only_the_chunks_under_the_boxes():
    feats = np.zeros((2, 4, 400, 400))
    lazy = da.from_array(feats, chunks=(1, 2, 100, 100))
    boxes = np.array([[1, 110.0, 120.0, 150.0, 170.0],    # inside chunk (1, 1) of image 1
                      [0, 290.0, 180.0, 310.0, 230.0]])   # straddles columns 2 and 3, rows 1 and 2
    keys = _feature_keys(rd.roi_align(lazy, boxes, 7, 1.0, 2, True), lazy)
    expected = {(lazy.name, 1, c, 1, 1) for c in range(2)}
    expected |= {(lazy.name, 0, c, r, q) for c in range(2) for r in (1, 2) for q in (2, 3)}
    assert keys == expected


def test_huge_box_reads_only_its_sample_chunks(rng):
    """A box beyond max_region_pixels is pooled alone from the chunks its taps lie in."""
    feats = make_features(rng, 1, 2, 300, 300)
    lazy = da.from_array(feats, chunks=(1, 2, 25, 25))
    boxes = np.array([[0, 10.3, 12.7, 290.1, 281.9]])  # 2 x 2 samples in 2 x 2 bins: 4 rows, 4 cols
    out = rd.roi_align(lazy, boxes, 2, 1.0, 2, False, max_region_pixels=10_000)
    # 4 sample rows and columns, their taps and margin in at most 5 chunks each: not the 144
    # chunks under the footprint
    assert len(_feature_keys(out, lazy)) <= 25
    np.testing.assert_allclose(out.compute(**SYNC), roialign_cy.roi_align(feats, boxes, 2, 1.0, 2),
                               **TOL[np.float64])
    rot = np.array([[0, 150.2, 149.7, 250.3, 230.1, 33.0]])
    out = rd.roi_align_rotated(lazy, rot, 2, 1.0, 1, max_region_pixels=10_000)
    assert len(_feature_keys(out, lazy)) <= 16  # 4 samples, their taps in 4 chunks at most
    np.testing.assert_allclose(out.compute(**SYNC),
                               roialign_cy.roi_align_rotated(feats, rot, 2, 1.0, 1), **TOL[np.float64])


def test_tasks_carry_only_their_boxes(rng):
    lazy = da.from_array(FEATURES, chunks=(1, 5, 30, 40))
    boxes = random_boxes(rng, 200, N, H, W, SCALE)
    out = rd.roi_align(lazy, boxes, 2, SCALE, boxes_per_task=16)
    graph = dict(out.__dask_graph__())
    ours = [k for k in graph if isinstance(k, tuple) and "regions" in k[0]]
    assert len(ours) > 200 // 16
    biggest = max(len(pickle.dumps(graph[k], protocol=5)) for k in ours)
    assert biggest < 4000, biggest  # 16 boxes and a few slices, not the 200 boxes


@pytest.mark.parametrize("bad, message", [
    (dict(boxes=np.array([[0, 1.0, 2.0, np.nan, 4.0]])), "boxes must be finite"),
    (dict(boxes=np.array([[0, 5.0, 2.0, 1.0, 4.0]])), "boxes must have x2 >= x1"),
    (dict(boxes=np.array([[7, 1.0, 2.0, 3.0, 4.0]])), "batch index out of range"),
    (dict(boxes=np.zeros((2, 3))), "boxes must have shape"),
    (dict(output_size=0), "output_size must be >= 1"),
    (dict(spatial_scale=-1.0), "spatial_scale must be finite and > 0"),
    (dict(layout="CHW"), "layout must be one of"),
    (dict(mode="median"), "mode must be one of"),
    (dict(max_samples_per_bin=1, sampling_ratio=2), "sampling grid too large"),
    (dict(boxes_per_task=0), "boxes_per_task must be >= 1"),
])
def test_errors_at_call_time(bad, message):
    lazy = da.from_array(FEATURES, chunks=(1, 5, 30, 40))
    kw = dict(boxes=BOXES[:3], output_size=2)
    kw.update(bad)
    with pytest.raises(ValueError, match=message):
        rd.roi_align(lazy, **kw)
    if "boxes_per_task" not in bad:  # the same message as the in-memory call
        with pytest.raises(ValueError, match=message):
            roialign_cy.roi_align(FEATURES, **kw)


def test_type_errors():
    with pytest.raises(TypeError, match="features must be a dask.array.Array"):
        rd.roi_align(FEATURES, BOXES, 2)
    with pytest.raises(TypeError, match="features must have a floating dtype"):
        rd.roi_align(da.zeros((1, 1, 4, 4), dtype=np.int32), np.zeros((0, 4)), 2)
    with pytest.raises(ValueError, match="features must have rank 4"):
        rd.roi_align(da.zeros((1, 4, 4)), np.zeros((0, 4)), 2)
    with pytest.raises(TypeError, match="cannot serve numpy"):
        rd.roi_align(da.zeros((1, 1, 4, 4)), np.zeros((0, 4)), 2, backend="cuda")


def test_import_does_not_need_dask():
    code = "import sys, roialign_cy; assert 'dask' not in sys.modules, 'dask imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_local_cluster(rng):
    distributed = pytest.importorskip("distributed")
    feats = make_features(rng, 2, 4, 120, 150).astype(np.float32)
    boxes = np.concatenate([random_boxes(rng, 300, 2, 120, 150), random_boxes(rng, 20, 2, 120, 150)])
    rboxes = random_rotated_boxes(rng, 50, 2, 120, 150)
    lazy = da.from_array(feats, chunks=(1, 2, 50, 60))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        out, rot = client.compute([rd.roi_align(lazy, boxes, 7, 1.0, 2, True, boxes_per_task=64),
                                   rd.roi_align_rotated(lazy, rboxes, 5, 1.0, 2)], sync=True)
        assert len(client.scheduler_info()["workers"]) == 2
    np.testing.assert_allclose(out, roialign_cy.roi_align(feats, boxes, 7, 1.0, 2, True),
                               rtol=1e-5, atol=16 * np.spacing(np.float32(150)))
    np.testing.assert_allclose(rot, roialign_cy.roi_align_rotated(feats, rboxes, 5, 1.0, 2),
                               rtol=1e-5, atol=16 * np.spacing(np.float32(150)))


def test_zarr_on_disk(tmp_path, rng):
    zarr = pytest.importorskip("zarr")
    feats = make_features(rng, 1, 3, 200, 180).astype(np.float32)
    store = zarr.create_array(str(tmp_path / "features.zarr"), shape=feats.shape, chunks=(1, 3, 64, 64),
                              dtype=feats.dtype)
    store[...] = feats
    lazy = da.from_zarr(str(tmp_path / "features.zarr"))
    boxes = random_boxes(rng, 60, 1, 200, 180)
    got = rd.roi_align(lazy, boxes, 5, 1.0, -1, True, layout="NCHW").compute(**SYNC)
    np.testing.assert_allclose(got, roialign_cy.roi_align(feats, boxes, 5, 1.0, -1, True),
                               rtol=1e-5, atol=16 * np.spacing(np.float32(200)))

"""roialign_cy.dask against the in-memory calls and tests/reference.py: random chunkings along every
axis, both layouts, axis-aligned and rotated boxes (edge cases, chunk-straddling, outside the
map), errors at call time, what is read, a 2-process LocalCluster, zarr on disk, and a lazily
generated map of 1.28 TB."""
import functools
import os
import pickle
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="roialign_cy.dask needs dask: pip install 'roialign_cy[dask]'")
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
@pytest.mark.parametrize("mode", ["avg", "max", "onnx_max"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_in_memory(dtype, layout, aligned, sampling_ratio, mode, chunk_seed):
    rng = np.random.default_rng(chunk_seed)
    chunks = random_chunks(rng, FEATURES.shape)
    boxes = np.concatenate([BOXES, straddling_boxes(rng, chunks[2:], N, SCALE)])
    x, lazy = _lazy(FEATURES.astype(dtype), layout, chunks)
    if chunk_seed % 2:  # blocks of their own, as read from a store: tasks pool from the block
        lazy = lazy.map_blocks(np.ascontiguousarray)
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



@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_float32_bit_identical_where_rounding_agrees(rng, aligned, sampling_ratio):
    """The shift is exact: boxes whose regions start at the map's origin give bit-identical
    float32 results (same arithmetic), and so do boxes anywhere whose sample coordinates are
    exactly representable (multiples of 1/16 here), whatever region origin they get."""
    feats = make_features(rng, 1, 3, 96, 96).astype(np.float32)
    lazy = da.from_array(feats, chunks=(1, 3, 40, 40)).map_blocks(np.ascontiguousarray)
    near_origin = random_boxes(rng, 30, 1, 30, 30)
    corner = np.round(rng.uniform(0, 80, size=(30, 2)) * 16) / 16
    size = 4 * rng.integers(1, 4, size=(30, 2))  # bins of 1 to 3 px: every step dyadic
    dyadic = np.column_stack([np.zeros(30), corner, corner + size]).astype(np.float32)
    for boxes in (near_origin, dyadic):
        got = rd.roi_align(lazy, boxes, 4, 1.0, sampling_ratio, aligned, boxes_per_task=7)
        np.testing.assert_array_equal(
            got.compute(**SYNC), roialign_cy.roi_align(feats, boxes, 4, 1.0, sampling_ratio, aligned))

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



def test_sparse_rotated_box_on_pixel_chunks():
    """One-pixel chunks: a sparse box must read every row x column of its taps (found by
    hypothesis: the tap rows and columns were paired, not crossed)."""
    feats = make_features(np.random.default_rng(1), 1, 1, 7, 10)
    boxes = np.array([[0, 17.0, 9.0, 25.0, 17.0, 0.0]])
    lazy = da.from_array(feats, chunks=1)
    got = rd.roi_align_rotated(lazy, boxes, (2, 3), 0.25, -1, False, max_region_pixels=16)
    np.testing.assert_allclose(got.compute(**SYNC), roialign_cy.roi_align_rotated(
        feats, boxes, (2, 3), 0.25, -1, False), **TOL[np.float64])

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



@pytest.mark.gpu
def test_cupy_blocks(rng):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install roialign_cy[cuda12] or [cuda13])")
    from roialign_cy import _cuda

    if not _cuda.is_available():
        pytest.skip("CuPy is installed but sees no CUDA device")
    feats = make_features(rng, 2, 3, 50, 60)
    boxes = np.concatenate([random_boxes(rng, 40, 2, 50, 60), edge_case_boxes(rng, 2, 50, 60)])
    lazy = da.from_array(feats, chunks=(1, 2, 20, 25)).map_blocks(cupy.asarray)
    got = rd.roi_align(lazy, cupy.asarray(boxes), 3, 1.0, 2, True, allow_inverted=True,
                       boxes_per_task=8)
    assert type(got._meta).__module__.startswith("cupy")
    expected = roialign_cy.roi_align(cupy.asarray(feats), cupy.asarray(boxes), 3, 1.0, 2, True,
                                     allow_inverted=True)
    np.testing.assert_allclose(cupy.asnumpy(got.compute(**SYNC)), cupy.asnumpy(expected),
                               **TOL[np.float64])

# ------------------------------------------------------------------------------------------------
# A map far larger than memory: 1 x 8 x 200000 x 200000 float32 (1.28 TB), generated chunk by chunk

GIANT = (1, 8, 200_000, 200_000)
GIANT_CHUNKS = (1, 4, 2048, 2048)  # 64 MiB chunks


def _giant_values(c0, c1, y0, y1, x0, x1):
    """The giant map's pixels [c0:c1, y0:y1, x0:x1] (float32): smooth, different per channel."""
    c = np.arange(c0, c1, dtype=np.float64)[:, None, None]
    ys = np.sin(np.arange(y0, y1)[None, :, None] * 0.05 + c).astype(np.float32)
    xs = np.cos(np.arange(x0, x1)[None, None, :] * 0.03 - c).astype(np.float32)
    return (ys + xs)[None]


def _giant_boxes(rng):
    """(K, 5) boxes in image units (spatial_scale 0.5): clusters around chunk corners, one at the
    map's bottom-right corner (partly outside), and a few wholly outside. Coordinates are
    multiples of 1/8, so that their float32 starts are exact and the float64 truth is the same
    computation."""
    centres = [(2048 * 10, 2048 * 20), (2048 * 50 + 1000, 2048 * 70), (2048 * 90, 2048 * 5 + 300),
               (199_950, 199_900)]
    rows = []
    for cy, cx in centres:
        for _ in range(75):
            y, x = cy + rng.uniform(-700, 700), cx + rng.uniform(-700, 700)
            h, w = rng.uniform(4, 300, size=2)
            rows.append([0, x - w / 2, y - h / 2, x + w / 2, y + h / 2])
    rows += [[0, -900.0, -800.0, -500.0, -300.0], [0, 450_000.0, 100.0, 460_000.0, 400.0]]
    boxes = np.array(rows)
    boxes[:, 1:] = np.round(boxes[:, 1:] * 2 * 8) / 8  # feature coordinates -> image units
    return boxes.astype(np.float32)


def _touched_chunks(boxes, scale, sampling_ratio, pooled):
    """(row chunk, column chunk) pairs holding a tap of some in-map sample (reference geometry;
    the axis-aligned taps are separable: rows of the in-map sample rows x their columns)."""
    from reference import aligned_samples

    touched = set()
    for roi in boxes[:, 1:].astype(np.float64):
        ys, xs, _ = aligned_samples(roi, pooled, pooled, scale, sampling_ratio, True)
        taps = []
        for c, n, size in ((np.unique(ys), GIANT[2], GIANT_CHUNKS[2]),
                           (np.unique(xs), GIANT[3], GIANT_CHUNKS[3])):
            c = np.maximum(c[(c >= -1) & (c <= n)], 0)
            low = np.minimum(np.floor(c), n - 1).astype(np.int64)
            taps.append(np.unique(np.concatenate([low, np.minimum(low + 1, n - 1)]) // size))
        touched |= {(a, b) for a in taps[0].tolist() for b in taps[1].tolist()}
    return touched


def test_giant_map_reads_only_what_the_boxes_need(rng):
    generated = []

    def block(block_info=None):
        (n0, _), (c0, c1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        generated.append((c0 // GIANT_CHUNKS[1], y0 // GIANT_CHUNKS[2], x0 // GIANT_CHUNKS[3]))
        return _giant_values(c0, c1, y0, y1, x0, x1)

    chunks = tuple(tuple(min(c, n - a) for a in range(0, n, c)) for n, c in zip(GIANT, GIANT_CHUNKS))
    lazy = da.map_blocks(block, chunks=chunks, dtype=np.float32)
    assert lazy.nbytes > 1e12
    boxes = _giant_boxes(rng)
    scale, sr, pooled = 0.5, 2, 7
    out = rd.roi_align(lazy, boxes, pooled, scale, sr, True)

    tracemalloc.start()
    try:
        got = out.compute(**SYNC)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    chunk_bytes = np.prod(GIANT_CHUNKS) * 4
    touched = _touched_chunks(boxes, scale, sr, pooled)
    read = {(y, x) for _, y, x in generated}
    print(f"\ngiant map: {len(generated)} chunks generated ({len(read)} locations x 2 channel "
          f"chunks), {len(touched)} locations hold a tap; peak {peak / chunk_bytes:.1f} chunks "
          f"({peak / 2**20:.0f} MiB)")
    assert len(generated) == len(set(generated)) == 2 * len(read)  # each chunk made once
    assert touched <= read and len(read) <= len(touched) + 2  # the margin may reach a neighbour
    assert peak < 6 * chunk_bytes

    # every box against the in-memory call on the materialised local patch, in float64
    for k, box in enumerate(boxes.astype(np.float64)):
        y0, x0 = (max(0, int(np.floor(v * scale)) - 4) for v in box[[2, 1]])
        y1, x1 = (min(n, int(np.ceil(v * scale)) + 5) for v, n in zip(box[[4, 3]], GIANT[2:]))
        if y0 >= y1 or x0 >= x1:  # wholly outside
            np.testing.assert_array_equal(got[k], 0)
            continue
        patch = _giant_values(0, GIANT[1], y0, y1, x0, x1).astype(np.float64)
        local = box[1:] - np.array([x0, y0, x0, y0]) / scale
        expected = roialign_cy.roi_align(patch, local[None], pooled, scale, sr, True)
        np.testing.assert_allclose(got[k], expected[0], rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# random problems (hypothesis); CI replays a fixed set of examples, as in test_properties.py

try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # only this test needs it: the rest of the file still runs
    st = None


if st is not None:
    @settings(max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 15)), deadline=None,
              suppress_health_check=[HealthCheck.too_slow], print_blob=True,
              derandomize=bool(os.environ.get("CI")))
    @given(st.data(), st.booleans(), st.sampled_from(["NCHW", "NHWC"]), st.booleans(),
           st.sampled_from([-1, 1, 2]), st.sampled_from([0.5, 1.0]))
    def _random_problems(data, rotated, layout, aligned, sampling_ratio, scale):
        n, c = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
        h, w = data.draw(st.integers(2, 30)), data.draw(st.integers(2, 30))
        chunks = tuple(data.draw(st.integers(1, s)) for s in (n, c, h, w))
        coord = st.floats(-6.0, 36.0, width=32)
        k = data.draw(st.integers(0, 6))
        if rotated:
            rows = [[data.draw(st.integers(0, n - 1)), data.draw(coord), data.draw(coord),
                     data.draw(st.floats(0, 30, width=32)), data.draw(st.floats(0, 30, width=32)),
                     data.draw(st.floats(-180, 180, width=32))] for _ in range(k)]
        else:
            rows = []
            for _ in range(k):
                (x1, x2), (y1, y2) = (sorted(data.draw(st.tuples(coord, coord))) for _ in range(2))
                rows.append([data.draw(st.integers(0, n - 1)), x1, y1, x2, y2])
        boxes = np.array(rows, dtype=np.float64).reshape(k, 6 if rotated else 5)
        feats = make_features(np.random.default_rng(k), n, c, h, w)
        x, lazy = _lazy(feats, layout, tuple((s,) * (d // s) + ((d % s,) if d % s else ())
                                            for s, d in zip(chunks, (n, c, h, w))))
        fn, lazy_fn = ((roialign_cy.roi_align_rotated, rd.roi_align_rotated) if rotated
                       else (roialign_cy.roi_align, rd.roi_align))
        args = (boxes, (2, 3), scale / 2 if rotated else scale, sampling_ratio, aligned)
        got = lazy_fn(lazy, *args, layout=layout, boxes_per_task=2, max_region_pixels=64)
        np.testing.assert_allclose(got.compute(**SYNC), fn(x, *args, layout=layout), **TOL[np.float64])


@pytest.mark.skipif(st is None, reason="hypothesis is not installed (pip install 'roialign_cy[test]')")
def test_random_problems():
    _random_problems()

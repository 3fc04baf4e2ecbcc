"""RoIAlign over dask arrays: feature maps larger than memory, on one machine or a cluster.

``pip install "roialign_cy[dask]"``. The functions here take a lazy ``dask.array.Array`` of
features and in-memory boxes and return a lazy array equal to the in-memory call
(:func:`roialign_cy.roi_align`, :func:`roialign_cy.roi_align_rotated`). Dask schedules the work;
every task pools one group of boxes from the region of one image their samples touch, so only the
input chunks under the boxes are ever read or computed.

Plan (at call time, on the host, in numpy):

1. Validate exactly as the in-memory call (same checks, same messages): bad boxes raise now.
2. For every box, the pixel region its bilinear samples may read plus one pixel of margin
   (``roialign_cy._regions``); boxes with no sample inside the map read nothing and give 0.
3. Group boxes by image and by the tiles of the map their regions start and end in (tiles are
   runs of chunks at least ``_MIN_TILE`` pixels wide): a group's region is the union of its boxes'
   regions, so a task reads the few chunks its boxes need, and a chunk is read by the tasks of
   the groups over it and of the boxes that straddle its borders (dask computes or reads each
   chunk once and hands it to all of them). Groups hold at most ``boxes_per_task`` boxes and a
   region of at most ``max_region_pixels`` pixels (split further when the union grows past it).
4. A box whose own region exceeds ``max_region_pixels`` is pooled alone, from the chunks that hold
   the taps of its samples only. Such boxes have sparse samples (a dense grid of that size is
   refused by ``max_samples_per_bin``): their region is zero-filled through calloc, so the pages
   that no chunk is copied into are never committed (a CuPy region is really allocated).
5. Each task assembles its region (one image, one channel chunk): a region inside one chunk is
   the block itself when the block is C-contiguous (no copy; any rectangle that holds a valid
   region is valid); otherwise the pieces are copied, only the boxes' own regions when they cover
   less than half of the union (boxes along a chunk border). It calls the in-memory kernel with
   the boxes shifted into the region exactly (see ``roialign_cy._regions``): results equal the
   whole-map call to a few ulps of the map coordinates. A second layer of tasks puts the rows
   back in box order, in output chunks of ``boxes_per_task`` consecutive boxes.
"""
from types import SimpleNamespace

import numpy as np
import dask.array as da
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from . import _api, _backends, _regions
from . import _validate as v
from ._params import DEFAULT_MAX_SAMPLES_PER_BIN
from ._plan import output_shape

# Chunk boundaries closer than this are merged into one tile when grouping boxes, so that small
# chunks do not scatter the boxes over many tiny tasks.
_MIN_TILE = 1024
# The region calls were validated as a whole at call time; their own bound check would only see
# float64 re-estimates of the same grids.
_NO_BOUND = np.iinfo(np.int64).max


def roi_align(features, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
              *, mode="avg", layout="NCHW", batch_indices=None, backend="auto", n_threads=None,
              max_samples_per_bin=DEFAULT_MAX_SAMPLES_PER_BIN, allow_inverted=False,
              boxes_per_task=4096, max_region_pixels=1 << 24):
    """Lazy :func:`roialign_cy.roi_align` over a dask array of features.

    Parameters
    ----------
    features : dask.array.Array (N, C, H, W), or (N, H, W, C) with layout="NHWC"
        float32 or float64 (float16 too with CuPy blocks), any chunking along any axis, known
        chunk sizes. Blocks are numpy (CPU kernels) or CuPy (CUDA kernels).
    boxes : array or list of arrays, in memory
        As :func:`roialign_cy.roi_align`: (K, 5) [batch_index, x1, y1, x2, y2], (K, 4) with
        ``batch_indices`` (or alone when N == 1), or a list of per-image (L_i, 4) arrays.
    output_size, spatial_scale, sampling_ratio, aligned, mode, layout, batch_indices,
    max_samples_per_bin, allow_inverted
        As :func:`roialign_cy.roi_align`; checked now, with the same errors.
    backend : "auto" | "cpu" | "cuda"
        "auto" follows the blocks' array type (``features._meta``).
    n_threads : int, optional
        Kernel threads per task. None means 1: dask runs the tasks in parallel already.
    boxes_per_task : int
        At most this many boxes per task, and the output's chunk size along K.
    max_region_pixels : int
        Bound on the pixels (rows x columns) of the region a task assembles, for one channel
        chunk: at most max_region_pixels x channels per chunk x itemsize bytes besides its input
        blocks (a region inside one block is that block, not a copy). A box whose own region is
        larger is pooled alone from the chunks its samples touch (see the module docstring).

    Returns
    -------
    dask.array.Array (K, C, PH, PW), or (K, PH, PW, C) for NHWC, in box order, of the features'
    dtype, chunked along K by ``boxes_per_task`` and along C as the features.
    """
    return _lazy("roi_align", features, boxes, batch_indices, backend, boxes_per_task,
                 max_region_pixels, output_size=output_size, spatial_scale=spatial_scale,
                 sampling_ratio=sampling_ratio, aligned=aligned, mode=mode, layout=layout,
                 n_threads=n_threads, max_samples_per_bin=max_samples_per_bin,
                 allow_inverted=allow_inverted)


def roi_align_rotated(features, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
                      aligned=True, *, clockwise=False, layout="NCHW", batch_indices=None,
                      backend="auto", n_threads=None,
                      max_samples_per_bin=DEFAULT_MAX_SAMPLES_PER_BIN, allow_inverted=False,
                      boxes_per_task=4096, max_region_pixels=1 << 24):
    """Lazy :func:`roialign_cy.roi_align_rotated` over a dask array of features.

    boxes : (K, 6) [batch_index, cx, cy, w, h, angle_degrees], (K, 5) with ``batch_indices``, or
        a list of per-image (L_i, 5) arrays, in memory. A box's region is the bounding rectangle
        of its rotated sample grid.

    Other arguments and the result are as in :func:`roi_align` (average pooling) and
    :func:`roialign_cy.roi_align_rotated`.
    """
    return _lazy("roi_align_rotated", features, boxes, batch_indices, backend, boxes_per_task,
                 max_region_pixels, output_size=output_size, spatial_scale=spatial_scale,
                 sampling_ratio=sampling_ratio, aligned=aligned, mode="avg", layout=layout,
                 n_threads=n_threads, max_samples_per_bin=max_samples_per_bin,
                 allow_inverted=allow_inverted, clockwise=clockwise)


def _host(x):
    """Boxes or batch indices as host arrays (CuPy arrays are copied: planning runs on the host)."""
    if isinstance(x, (list, tuple)):
        return [_host(part) for part in x]
    return x.get() if _backends._is_cupy(x) else x


def _lazy(op, features, boxes, batch_indices, backend, boxes_per_task, max_region_pixels,
          **kw):
    if not isinstance(features, da.Array):
        raise TypeError(f"features must be a dask.array.Array, got {type(features).__name__} "
                        "(use roialign_cy.roi_align for in-memory arrays)")
    if any(np.isnan(c) for c in features.shape):
        raise ValueError(f"features must have known chunk sizes, got shape {features.shape} "
                         "(call features.compute_chunk_sizes() first)")
    backend = _backends.select(op, {"features": features._meta}, backend)
    v.features(features._meta, kw["layout"], backend)  # dtype and rank, the in-memory messages
    boxes_per_task = v.check_int("boxes_per_task", boxes_per_task, minimum=1)
    max_region_pixels = v.check_int("max_region_pixels", max_region_pixels, minimum=1)
    # the in-memory validation, on the host (float16 features, CuPy only, have float32 boxes)
    checked, _ = _api._prepare(
        op, features.shape, _host(boxes), _host(batch_indices), kw["output_size"],
        kw["spatial_scale"], kw["sampling_ratio"], kw["aligned"], kw["mode"], kw["layout"],
        "cpu", kw["n_threads"], kw["max_samples_per_bin"], clockwise=kw.get("clockwise", False),
        shape_only_dtype=np.float32 if features.dtype == np.float16 else features.dtype,
        allow_inverted=kw["allow_inverted"])
    plan = _Plan(features, checked._rois, checked._batch_idx, checked.params, backend,
                 boxes_per_task, max_region_pixels)
    return plan.array(op)


class _Plan:
    """Groups, regions and the task graph of one call."""

    def __init__(self, features, rois, batch_idx, p, backend, boxes_per_task, max_pixels):
        self.features, self.p, self.backend = features, p, backend
        self.rois, self.batch_idx = rois, batch_idx
        self.boxes_per_task, self.max_pixels = boxes_per_task, max_pixels
        axes = (0, 3, 1, 2) if p.channels_last else (0, 1, 2, 3)  # n, c, h, w
        self.axes = axes
        self.edges = [np.cumsum((0,) + features.chunks[a]) for a in axes]
        self.height, self.width = features.shape[axes[2]], features.shape[axes[3]]
        self.geom = _regions.geometry(rois, p)
        self.regions, self.live = self.geom.regions(self.height, self.width)
        self.groups, self.sparse = self._group()

    # ------------------------------------------------------------------ grouping

    def _group(self):
        """Index arrays of the boxes of each task, and whether each reads sparsely (one box)."""
        idx = np.flatnonzero(self.live)
        r = self.regions[idx]
        big = (r[:, 1] - r[:, 0]) * (r[:, 3] - r[:, 2]) > self.max_pixels
        groups = [idx[big][i:i + 1] for i in range(int(big.sum()))]
        sparse = [True] * len(groups)
        idx, r = idx[~big], r[~big]
        ty = _tiles(self.edges[2], _MIN_TILE)
        tx = _tiles(self.edges[3], _MIN_TILE)
        keys = np.stack([self.batch_idx[idx],
                         np.searchsorted(ty, r[:, 0], "right"),
                         np.searchsorted(ty, r[:, 1] - 1, "right"),
                         np.searchsorted(tx, r[:, 2], "right"),
                         np.searchsorted(tx, r[:, 3] - 1, "right")], axis=1)
        # by key, then top to bottom and left to right inside a run (tight unions when split)
        order = np.lexsort((r[:, 2], r[:, 0]) + tuple(keys.T[::-1]))
        keys = keys[order]
        breaks = np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1
        for run in np.split(idx[order], breaks):
            if not run.size:
                continue
            for piece in np.array_split(run, -(-run.size // self.boxes_per_task)):
                dense = self._within_bound(piece)
                groups += dense
                sparse += [False] * len(dense)
        return groups, sparse

    def _union(self, boxes):
        r = self.regions[boxes]
        return r[:, 0].min(), r[:, 1].max(), r[:, 2].min(), r[:, 3].max()

    def _single_chunk(self, g, y0, y1, x0, x1):
        """The pixel extent [y0, y1, x0, x1] of the chunk that holds a dense group's region, or
        None when the region spans several chunks."""
        rows, cols = self._chunk_span(2, y0, y1), self._chunk_span(3, x0, x1)
        if self.sparse[g] or len(rows) > 1 or len(cols) > 1:
            return None
        ey, ex = self.edges[2], self.edges[3]
        return int(ey[rows[0]]), int(ey[rows[0] + 1]), int(ex[cols[0]]), int(ex[cols[0] + 1])

    def _within_bound(self, boxes):
        """Split ``boxes`` (each within the bound) into runs whose union region is within it."""
        y0, y1, x0, x1 = self._union(boxes)
        if (y1 - y0) * (x1 - x0) <= self.max_pixels:
            return [boxes]
        out, first = [], 0
        y0, y1, x0, x1 = self.regions[boxes[0]]
        for j in range(1, boxes.size):
            b0, b1, a0, a1 = self.regions[boxes[j]]
            u = min(y0, b0), max(y1, b1), min(x0, a0), max(x1, a1)
            if (u[1] - u[0]) * (u[3] - u[2]) > self.max_pixels:
                out.append(boxes[first:j])
                first, u = j, (b0, b1, a0, a1)
            y0, y1, x0, x1 = u
        out.append(boxes[first:])
        return out

    # ------------------------------------------------------------------ graph

    def _chunk_span(self, axis, lo, hi):
        e = self.edges[axis]
        return range(np.searchsorted(e, lo, "right") - 1, np.searchsorted(e, hi - 1, "right"))

    def _needed_chunks(self, box):
        """(row chunk, column chunk) pairs holding the taps of one sparse box's samples."""
        taps = self.geom.sample_taps(box, self.height, self.width)
        ey, ex = self.edges[2], self.edges[3]
        if self.p.rotated:
            pairs = np.stack([np.searchsorted(ey, taps[:, 0], "right") - 1,
                              np.searchsorted(ex, taps[:, 1], "right") - 1], axis=1)
            return [tuple(t) for t in np.unique(pairs, axis=0).tolist()]
        cy = np.unique(np.searchsorted(ey, taps[0], "right") - 1).tolist()
        cx = np.unique(np.searchsorted(ex, taps[1], "right") - 1).tolist()
        return [(a, b) for a in cy for b in cx]

    def _image(self, members):
        """The batch chunk holding the image of a group, and that image's index in its blocks."""
        n = int(self.batch_idx[members[0]])
        bi = int(np.searchsorted(self.edges[0], n, "right") - 1)
        return bi, slice(n - self.edges[0][bi], n - self.edges[0][bi] + 1)

    def _pieces(self, g, members, region):
        """What to copy into one region: the (row, column) chunk of each piece, its index in the
        block and in the region, and whether the pieces leave parts of the region unwritten.

        A dense group copies its region; a group whose boxes cover under half of it (boxes along
        a chunk border, say) copies their own regions only; a sparse box the chunks holding its
        taps only. Nothing reads the pixels left unwritten (see ``_pool_region``)."""
        y0, y1, x0, x1 = region
        image = self._image(members)[1]
        ey, ex = self.edges[2], self.edges[3]
        if self.sparse[g]:
            rects = [(a, b, region) for a, b in self._needed_chunks(int(members[0]))]
        else:
            boxes = np.unique(self.regions[members], axis=0)
            covered = np.sum((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]))
            if 2 * covered >= (y1 - y0) * (x1 - x0):
                boxes = [region]
            rects = [(a, b, r) for r in boxes for a in self._chunk_span(2, r[0], r[1])
                     for b in self._chunk_span(3, r[2], r[3])]
        chunks, srcs, dsts, area = [], [], [], 0
        for a, b, (r0, r1, c0, c1) in rects:
            ys = slice(max(r0, ey[a]), min(r1, ey[a + 1]))
            xs = slice(max(c0, ex[b]), min(c1, ex[b + 1]))
            area += (ys.stop - ys.start) * (xs.stop - xs.start)
            src_y, src_x = _offset(ys, ey[a]), _offset(xs, ex[b])
            dst_y, dst_x = _offset(ys, y0), _offset(xs, x0)
            chunks.append((a, b))
            if self.p.channels_last:
                srcs.append((image, src_y, src_x))
                dsts.append((slice(None), dst_y, dst_x))
            else:
                srcs.append((image, slice(None), src_y, src_x))
                dsts.append((slice(None), slice(None), dst_y, dst_x))
        return chunks, srcs, dsts, area != (y1 - y0) * (x1 - x0)

    def _key(self, bi, a, b, ci):
        if self.p.channels_last:
            return (self.features.name, bi, a, b, ci)
        return (self.features.name, bi, ci, a, b)

    def array(self, op):
        p, features = self.p, self.features
        n_chan = features.chunks[self.axes[1]]
        token = tokenize(features.name, self.rois, self.batch_idx, p, self.boxes_per_task,
                         self.max_pixels, self.backend)
        pool_name, name = f"{op}-regions-{token}", f"{op}-{token}"
        cut_name = f"{op}-pieces-{token}"
        call = _Call(op, p, self.backend, features.dtype)
        dsk, where = {}, np.full((len(self.batch_idx), 2), -1, np.int64)  # box -> (group, row)
        for g, members in enumerate(self.groups):
            where[members, 0], where[members, 1] = g, np.arange(members.size)
            y0, y1, x0, x1 = (int(c) for c in self._union(members))
            chunks, srcs, dsts, partial = self._pieces(g, members, (y0, y1, x0, x1))
            # task arguments in one opaque object: dask need not walk them looking for keys
            task = SimpleNamespace(srcs=srcs, dsts=dsts, extent=(y1 - y0, x1 - x0),
                                   partial=partial, rois=self.geom.shifted(members, y0, x0),
                                   exact=self.geom.exact[members], whole=None, call=call)
            chunk = self._single_chunk(g, y0, y1, x0, x1)
            bi, image = self._image(members)
            if chunk is not None:  # any rectangle holding a valid region is valid
                task.whole = ((image,), self.geom.moved(y0 - chunk[0], x0 - chunk[2]))
                for ci, c in enumerate(n_chan):
                    dsk[(pool_name, g, ci)] = (_pool_region, [self._key(bi, *chunks[0], ci)],
                                               task, c)
                continue
            # pieces are cut where their chunk lives: a cluster moves the pieces, not the chunks
            by_chunk = {}
            for i, ab in enumerate(chunks):
                by_chunk.setdefault(ab, []).append(i)
            task.dsts = [dsts[i] for ab in by_chunk for i in by_chunk[ab]]
            cuts = [SimpleNamespace(srcs=[srcs[i] for i in by_chunk[ab]]) for ab in by_chunk]
            for ci, c in enumerate(n_chan):
                deps = []
                for j, (ab, cut) in enumerate(zip(by_chunk, cuts)):
                    deps.append((cut_name, g, j, ci))
                    dsk[deps[-1]] = (_cut, self._key(bi, *ab, ci), cut)
                dsk[(pool_name, g, ci)] = (_pool_region, deps, task, c)
        k = len(self.batch_idx)
        k_chunks = tuple(min(self.boxes_per_task, k - a)
                         for a in range(0, k, self.boxes_per_task)) or (0,)
        starts = np.cumsum((0,) + k_chunks)
        for j in range(len(k_chunks)):
            w = where[starts[j]:starts[j + 1]]
            parts = np.unique(w[w[:, 0] >= 0, 0]).tolist()
            task = SimpleNamespace(rows=[w[w[:, 0] == g, 1] for g in parts],
                                   dsts=[np.flatnonzero(w[:, 0] == g) for g in parts],
                                   size=k_chunks[j], call=call)
            for ci, c in enumerate(n_chan):
                dsk[(name,) + _out_index(j, ci, p)] = (
                    _gather, [(pool_name, g, ci) for g in parts], task, c)
        chunks = ((k_chunks, (p.pooled_h,), (p.pooled_w,), n_chan) if p.channels_last
                  else (k_chunks, n_chan, (p.pooled_h,), (p.pooled_w,)))
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=[features])
        meta = v.xp_of(self.backend).empty((0, 0, 0, 0), features.dtype)
        return da.Array(graph, name, chunks, meta=meta)


def _tiles(edges, min_tile):
    """Tile starts along one axis: chunk starts, consecutive chunks merged until a tile spans at
    least ``min_tile`` pixels (the last tile may be shorter)."""
    starts = [edges[0]]
    for e in edges[1:-1]:
        if e - starts[-1] >= min_tile:
            starts.append(e)
    return np.array(starts)


def _offset(s, origin):
    return slice(int(s.start - origin), int(s.stop - origin))


def _out_index(j, ci, p):
    return (j, 0, 0, ci) if p.channels_last else (j, ci, 0, 0)


class _Call:
    """The in-memory call each task makes (small and picklable: shipped with every task)."""

    def __init__(self, op, p, backend, dtype):
        self.op, self.backend, self.dtype, self.p = op, backend, np.dtype(dtype), p

    def __call__(self, region, rois, aligned):
        p = self.p
        kw = dict(layout="NHWC" if p.channels_last else "NCHW", backend=self.backend,
                  n_threads=p.n_threads or 1, max_samples_per_bin=_NO_BOUND,
                  allow_inverted=True)
        if p.rotated:
            return _api.roi_align_rotated(region, rois, (p.pooled_h, p.pooled_w), 1.0,
                                         p.sampling_ratio, aligned, clockwise=p.clockwise, **kw)
        return _api.roi_align(region, rois, (p.pooled_h, p.pooled_w), 1.0, p.sampling_ratio,
                             aligned, mode=p.mode, **kw)


def _cut(block, cut):
    """Task: the pieces ``cut.srcs`` of one block (views: nothing is copied on one machine)."""
    return [block[src] for src in cut.srcs]


def _pool_region(blocks, task, channels):
    """Task: assemble one region of ``channels`` channels and pool the group's boxes from it.

    ``blocks``: the block holding the region when ``task.whole`` is set (a region inside one
    chunk), else the lists of pieces cut from each block (``_cut``). ``task.whole``: (index of the
    whole chunk in the block, what to add to the boxes for that origin); when that view is
    C-contiguous, as blocks read from a store are, the kernel pools from the block itself and
    nothing is copied. Otherwise the pieces are copied into a new region; a ``partial`` one
    (pieces that do not cover it) is zero-filled first: numpy's zeros come from calloc, so the
    large pages never written are never committed, and the kernels' reads with weight 0 (row 0
    and column 0, for samples outside the map along one axis) see zeros. ``task.exact`` rows go
    through aligned=False (their coordinates are the kernel's starts, exact), the others through
    aligned=True (see ``roialign_cy._regions``)."""
    call, rois = task.call, task.rois
    xp = v.xp_of(call.backend)
    view = blocks[0][task.whole[0]] if task.whole is not None else None
    if view is not None and view.flags.c_contiguous:
        region, rois = view, rois + task.whole[1]
    else:
        pieces = ([blocks[0][src] for src in task.srcs] if view is not None
                  else [piece for cut in blocks for piece in cut])
        shape = (1,) + task.extent + (channels,) if call.p.channels_last else \
            (1, channels) + task.extent
        region = (xp.zeros if task.partial else xp.empty)(shape, call.dtype)
        for piece, dst in zip(pieces, task.dsts):
            region[dst] = piece
    rois, exact = xp.asarray(rois), task.exact
    if exact.all() or not exact.any():
        return call(region, rois, not bool(exact.all()))
    out = xp.empty(output_shape(len(exact), channels, call.p), call.dtype)
    for flag in (True, False):
        sel = xp.asarray(np.flatnonzero(exact == flag))
        out[sel] = call(region, rois[sel], not flag)
    return out


def _gather(parts, task, channels):
    """Task: the output rows of ``task.size`` consecutive boxes from the group results (0 for
    boxes that read nothing)."""
    xp = v.xp_of(task.call.backend)
    if len(parts) == 1 and len(task.rows[0]) == task.size == parts[0].shape[0] and \
            np.array_equal(task.rows[0], task.dsts[0]):
        return parts[0]  # the group is these boxes, in order
    out = xp.zeros(output_shape(task.size, channels, task.call.p), task.call.dtype)
    for part, r, d in zip(parts, task.rows, task.dsts):
        out[xp.asarray(d)] = part[xp.asarray(r)]
    return out


__all__ = ["roi_align", "roi_align_rotated"]

"""CPU backend: drives the Cython kernels (contract in ``roialign_cy._backends``).

Memory. Besides the output, a call holds
- sampling tables of at most ``TABLE_ENTRIES_PER_CHUNK`` entries at once (boxes are processed in
  chunks; a rotated box whose own table is larger is split into pieces of whole bins, so only a
  single bin of more samples than that exceeds it). An axis-aligned box's tables are its samples
  along each axis (gh * PH + gw * PW entries, not gh * gw * PH * PW); one box needing more than
  ``TABLE_ENTRIES_PER_BOX`` of them, or a rotated bin of more samples than that, is a MemoryError
  before anything is allocated;
- for NCHW with the channels-last block strategy, per thread one block of LANES planes of one
  image (at most ``SCRATCH_BYTES_PER_THREAD``; beyond that, or with fewer than LANES channels, the
  kernels read the planes directly instead).

Fork. GNU OpenMP's thread pool does not survive ``fork()``: a forked child runs the kernels on one
thread (``_openmp.effective_n_threads``); results do not depend on the thread count, so only the
speed differs.
"""
import os
import threading

import numpy as np

try:
    from ._openmp import effective_n_threads, openmp_enabled
    from ._variants import kernels as _kernels

    # the build for the best instruction set this CPU runs (or $ROIALIGN_CY_SIMD): _variants
    _roi_align, _roi_align_rotated, _roi_pool = _kernels()
except ImportError as exc:
    _here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(os.path.join(_here, "_roi_align.pyx")):
        raise
    # a source checkout first on sys.path (python -m, or python run from the checkout) shadows the
    # installed package and has no compiled kernels: say so, and what to do
    raise ImportError(
        f"the CPU kernels of roialign_cy are not built in {os.path.dirname(_here)}, a source "
        "checkout that Python imported instead of the installed package because the current "
        "directory comes first on sys.path (python -m or python run from the checkout). Use the "
        "installed command (e.g. `roialign-cy demo`), run Python from another directory, or "
        "build the checkout in place: `python setup.py build_ext --inplace` (or "
        f"`pip install -e .`). ({exc})"
    ) from exc

# table entries (one sample along one axis, or one rotated sample's 4 taps) built at once
TABLE_ENTRIES_PER_CHUNK = 1 << 22
# the largest table one axis-aligned box, or one rotated bin, may need (about 5 GB): past it the
# call could not run in any reasonable time either
TABLE_ENTRIES_PER_BOX = 1 << 27
# the cost model (thread counts, NCHW loop order) is stated once, in _roi_align.pyx
SCRATCH_BYTES_PER_THREAD = _roi_align.SCRATCH_BYTES_PER_THREAD
_INTERLEAVE_MIN_SAMPLES_PER_PIXEL = _roi_align.INTERLEAVE_MIN_SAMPLES_PER_PIXEL


def _n_threads(p, n_outputs):
    return _roi_align.work_threads(effective_n_threads(p.n_threads), n_outputs, p.sampling_ratio)


def _shape(array, p):
    if p.channels_last:
        n, h, w, c = array.shape
    else:
        n, c, h, w = array.shape
    return n, c, h, w


def grid_sizes(rois, p, level=None, scales=None):
    """Samples per bin (gh, gw) of every box, int64 (saturated at ``_params.GRID_SATURATE``): the
    one statement of the grid rule that the bound checks and the kernels share. Axis-aligned boxes
    may lie on several levels: box k at scale ``scales[level[k]]``."""
    if p.rotated:
        return _roi_align_rotated.grid_sizes(rois, p.pooled_h, p.pooled_w, p.spatial_scale,
                                             p.sampling_ratio, p.aligned)
    if p.integer_bins:  # roi_pool / ps_roi_pool pool whole pixels: no sampling grid
        none = np.zeros(len(rois), np.int64)
        return none, none
    level, scales = _levels(len(rois), level, scales, p)
    return _roi_align.grid_sizes(rois, level, scales, p.pooled_h, p.pooled_w, p.sampling_ratio,
                                 p.aligned)


def _levels(k, level, scales, p):
    if level is None:
        return np.zeros(k, np.int64), np.array([p.spatial_scale])
    return level, np.asarray(scales, np.float64)


def check_table_sizes(gh, gw, p):
    """MemoryError, before any allocation, for a box whose tables alone cannot be built."""
    if not len(gh):
        return
    if p.rotated:
        bound = int(gh.max()) * int(gw.max()) * 4
    else:
        bound = int(gh.max()) * p.pooled_h + int(gw.max()) * p.pooled_w
    if bound <= TABLE_ENTRIES_PER_BOX:  # exact Python integers: the usual call ends here
        return
    gh, gw = gh.astype(np.float64), gw.astype(np.float64)
    if p.rotated:
        need = gh * gw * 4  # one bin: its samples' 4 taps
        what = "one bin of rotated box {k} takes {n:.4g} table entries (its samples' taps)"
    else:
        need = gh * p.pooled_h + gw * p.pooled_w
        what = "box {k} takes {n:.4g} sampling-table entries (gh * PH + gw * PW)"
    k = int(np.argmax(need))
    if need[k] > TABLE_ENTRIES_PER_BOX:
        raise MemoryError(
            what.format(k=k, n=need[k]) + f", more than the {TABLE_ENTRIES_PER_BOX} the CPU "
            "backend builds at once; pass a smaller sampling_ratio or output_size"
        )


def _group_by_image(batch_idx, n_images):
    """Positions of the boxes sorted by image (stable, so the visiting order is fixed) and where
    each image's run starts."""
    if n_images == 1:  # the usual inference call: nothing to sort
        return np.arange(len(batch_idx), dtype=np.int64), np.array([0, len(batch_idx)], np.int64)
    order = np.argsort(batch_idx, kind="stable").astype(np.int64)
    img_start = np.searchsorted(batch_idx[order], np.arange(n_images + 1)).astype(np.int64)
    return order, img_start


def _chunks(sizes):
    """Split a sequence of table sizes into runs of at most TABLE_ENTRIES_PER_CHUNK entries (a
    single larger item makes a run of its own)."""
    if sizes.sum() <= TABLE_ENTRIES_PER_CHUNK:  # the usual case: one chunk, no Python loop
        if len(sizes):
            yield 0, len(sizes)
        return
    j0, acc = 0, 0
    for j, s in enumerate(sizes.tolist()):
        if acc and acc + s > TABLE_ENTRIES_PER_CHUNK:
            yield j0, j
            j0, acc = j, 0
        acc += s
    if j0 < len(sizes):
        yield j0, len(sizes)


_ps_forced = None


def force_ps_blocks(value):
    """Force the NCHW loop order of ps_roi_align and ps_roi_pool (True: blocks, False: planes,
    None: the cost model's choice, _cost.pxd), for the tests and benchmarks that compare both;
    returns the previous setting."""
    global _ps_forced
    previous, _ps_forced = _ps_forced, value
    for module in (_roi_align, _roi_pool):
        module._set_ps_forced(-1 if value is None else int(bool(value)))
    return previous


def _use_blocks(samples, c, h, w, n, itemsize, tasks, n_threads, forward):
    """Whether the NCHW kernels copy blocks of planes to channels-last scratch (see
    ``_roi_align.use_blocks``)."""
    return _roi_align.use_blocks(samples, c, h, w, n, itemsize, tasks, n_threads, forward)


class Run:
    """The boxes of a call, sorted by (level,) image, with their grid sizes and sampling tables:
    what every kernel of the call shares, and what a plan keeps between calls (the tables of a
    single chunk are built once, under a lock, then only read). ``shapes`` are the maps' (N, C, H,
    W); ``chunks()`` yields (j0, j1, tables) over positions of ``order`` (rotated: of the pieces
    ``order``/``bin0``/``bin1``); ``where()`` gives the kernels' leading arguments, ``blocks()``
    the NCHW strategy of each level."""

    def __init__(self, shapes, itemsize, rois, batch_idx, p, n_threads, level=None, scales=None,
                 grid=None):
        self.rois, self.p, self.n_threads = rois, p, n_threads
        self.shapes, self.itemsize = list(shapes), itemsize
        self._cached, self._lock, self._blocks, self._visits = None, threading.Lock(), {}, {}
        n_images = self.shapes[0][0]
        if p.rotated:
            self.gh, self.gw = grid or grid_sizes(rois, p)
            key, n_keys = batch_idx, n_images
        else:
            self.level, self.scales = _levels(len(rois), level, scales, p)
            self.gh, self.gw = grid or grid_sizes(rois, p, self.level, self.scales)
            key = batch_idx if level is None else self.level * n_images + batch_idx
            n_keys = len(self.shapes) * n_images
        check_table_sizes(self.gh, self.gw, p)
        self.order, self.img_start = _group_by_image(key, n_keys)
        if p.rotated:
            self._pieces(p.pooled_h * p.pooled_w)

    def _pieces(self, n_bins):
        """Split rotated boxes whose table exceeds the chunk bound into runs of whole bins."""
        per_bin = (self.gh * self.gw * 4)[self.order]
        bins_per_piece = np.clip(TABLE_ENTRIES_PER_CHUNK // np.maximum(per_bin, 1), 1, n_bins)
        n_pieces = -(-n_bins // bins_per_piece)
        if (n_pieces == 1).all():
            self.bin0 = np.zeros(len(self.order), np.int64)
            self.bin1 = np.full(len(self.order), n_bins, np.int64)
            return
        box = np.repeat(self.order, n_pieces)
        first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        self.bin0 = (np.arange(len(box)) - first) * np.repeat(bins_per_piece, n_pieces)
        self.bin1 = np.minimum(self.bin0 + np.repeat(bins_per_piece, n_pieces), n_bins)
        # piece positions where each image's run starts
        self.img_start = np.concatenate([[0], np.cumsum(n_pieces)])[self.img_start]
        self.order = box

    def chunks(self):
        if self._cached is not None:
            return self._cached
        p = self.p
        if p.rotated:
            sizes = self.gh[self.order] * self.gw[self.order] * (self.bin1 - self.bin0) * 4
            runs = list(_chunks(sizes))
        elif int(self.gh.sum()) * p.pooled_h + int(self.gw.sum()) * p.pooled_w <= TABLE_ENTRIES_PER_CHUNK:
            runs = [(0, len(self.order))] if len(self.order) else []
        else:
            runs = list(_chunks((self.gh * p.pooled_h + self.gw * p.pooled_w)[self.order]))
        if len(runs) > 1:  # tables of several chunks are never held at once
            return self._build(runs)
        with self._lock:
            if self._cached is None:
                self._cached = list(self._build(runs))
        return self._cached

    def _build(self, runs):
        p = self.p
        for j0, j1 in runs:
            n_threads = _roi_align.table_threads(self.n_threads, j1 - j0)
            if p.integer_bins:
                _, _, h, w = self.shapes[0]
                t = _roi_pool.windows(self.rois, self.order, h, w, p.pooled_h, p.pooled_w,
                                      p.spatial_scale, _roi_pool.OPS[p.op], p.edge == "image",
                                      n_threads)
            elif p.rotated:
                _, _, h, w = self.shapes[0]
                t = _roi_align_rotated.make_tables(
                    self.rois, self.order, self.bin0, self.bin1, j0, j1, self.gh, self.gw, h, w,
                    p.pooled_h, p.pooled_w, p.spatial_scale, p.aligned, p.clockwise, n_threads)
            else:
                heights = np.array([s[2] for s in self.shapes], np.int64)
                widths = np.array([s[3] for s in self.shapes], np.int64)
                t = _roi_align.make_tables(
                    self.rois, self.order, j0, j1, self.gh, self.gw, self.level, heights, widths,
                    self.scales, p.pooled_h, p.pooled_w, p.aligned, n_threads)
            yield j0, j1, t

    def visit(self, j0, j1):
        """The order in which a forward visits positions j0..j1 (``_roi_align.row_visit``: each
        (level,) image's boxes by the y of their centres), kept for a plan's next forward. None
        (position order: the same outputs) for rotated boxes, whose pieces keep ``order``, or
        when there was no memory for it."""
        if self.p.rotated:
            return None
        with self._lock:
            if (j0, j1) not in self._visits:
                self._visits[(j0, j1)] = _roi_align.row_visit(self.rois, self.order,
                                                              self.img_start, j0, j1)
            return self._visits[(j0, j1)]

    def blocks(self, j0, j1, forward, channels, n_threads):
        """Per level, whether the NCHW kernels copy blocks of planes of maps of ``channels``
        channels, for a call on ``n_threads`` threads (uint8 array; a plan's calls reuse it)."""
        key = (j0, j1, forward, channels, n_threads)
        if key not in self._blocks:
            self._blocks[key] = self._strategy(j0, j1, forward, channels, n_threads)
        return self._blocks[key]

    def _strategy(self, j0, j1, forward, channels, n_threads):
        p, lanes = self.p, _roi_align.BLOCK_CHANNELS
        if p.channels_last:
            return np.zeros(len(self.shapes), np.uint8)
        sel = self.order[j0:j1]
        if p.rotated:
            samples = [float(np.sum(self.gh[sel] * self.gw[sel] * (self.bin1[j0:j1] - self.bin0[j0:j1])))]
        elif len(self.shapes) == 1:
            samples = [float(np.dot(self.gh[sel], self.gw[sel])) * p.pooled_h * p.pooled_w]
        else:
            per_box = (self.gh[sel] * self.gw[sel]).astype(np.float64) * (p.pooled_h * p.pooled_w)
            samples = np.bincount(self.level[sel], per_box, minlength=len(self.shapes))
        tasks = len(self.shapes) * self.shapes[0][0] * -(-channels // lanes)
        return np.array([not p.channels_last and
                         _use_blocks(samples[l], channels, h, w, n, self.itemsize, tasks,
                                     n_threads, forward)
                         for l, (n, _, h, w) in enumerate(self.shapes)], np.uint8)

    def pool_blocks(self, windows, forward, channels, n_threads):
        """Whether roi_pool on NCHW maps of ``channels`` channels takes the channels-last block
        loops (``_roi_pool.use_blocks``), given the pixels its bins cover."""
        p = self.p
        if p.op != "roi_pool" or p.channels_last:
            return False
        key = ("pool", forward, channels, n_threads)
        if key not in self._blocks:
            n, _, h, w = self.shapes[0]
            ph = 2 * p.pooled_h
            rows = (windows[:, 1:ph:2] - windows[:, 0:ph:2]).clip(0).sum(axis=1)
            cols = (windows[:, ph + 1::2] - windows[:, ph::2]).clip(0).sum(axis=1)
            pixels = float(np.dot(rows.astype(np.float64), cols))
            self._blocks[key] = _roi_pool.use_blocks(pixels, channels, n, h, w, self.itemsize,
                                                     n_threads, forward)
        return self._blocks[key]

    def where(self):
        """The kernels' arguments that say which boxes (or pieces) run, in which order."""
        if self.p.rotated:
            return self.order, self.bin0, self.bin1, self.img_start
        return self.order, self.img_start


def prepare(shapes, dtype, rois, batch_idx, p, level=None, scales=None, grid=None):
    """The Run of boxes on maps of these shapes and dtype, for a plan to keep (``grid``: their
    (gh, gw) when already computed)."""
    return Run(shapes, np.dtype(dtype).itemsize, rois, batch_idx, p,
               effective_n_threads(p.n_threads), level, scales, grid)


def _run_of(run, maps, rois, batch_idx, p, n_work, level, scales):
    """(the given Run (a plan's) or one for this call, the thread count for this call's work)."""
    n_threads = _n_threads(p, n_work)
    if run is None:
        run = Run([_shape(m, p) for m in maps], maps[0].itemsize, rois, batch_idx, p, n_threads,
                  level, scales)
    return run, n_threads


def forward(features, rois, batch_idx, out, p, run=None, argmax=None):
    forward_levels([features], rois, batch_idx, None, None, out, p, run, argmax)


def forward_levels(maps, rois, batch_idx, level, scales, out, p, run=None, argmax=None):
    """Pool each box from its level's map (``maps[level[k]]`` at scale ``scales[level[k]]``;
    level None: one map at ``p.spatial_scale``) into ``out``, all levels in one parallel
    region. ``argmax`` (roi_pool only, int64 shaped like ``out``) receives the arg-max pixels."""
    if out.size == 0:
        return
    run, n_threads = _run_of(run, maps, rois, batch_idx, p, out.size, level, scales)
    for j0, j1, t in run.chunks():
        visit = run.visit(j0, j1)
        if p.op == "ps_roi_align":
            _roi_align.ps_forward(maps[0], *run.where(), j0, j1, run.gh, run.gw, t, out,
                                  p.channels_last, n_threads, visit)
            continue
        if p.integer_bins:
            if run.pool_blocks(t, True, _shape(maps[0], p)[1], n_threads):
                _roi_pool.forward_blocks(maps[0], out, t, *run.where(), n_threads, argmax, visit)
            else:
                _roi_pool.forward(maps[0], out, t, *run.where(), _roi_pool.OPS[p.op],
                                  p.channels_last, n_threads, argmax, visit)
            continue
        blocks = run.blocks(j0, j1, True, _shape(maps[0], p)[1], n_threads)
        if p.rotated:
            _roi_align_rotated.forward(maps[0], batch_idx, *run.where(), j0, j1, run.gh, run.gw,
                                       t, out, p.channels_last, bool(blocks[0]), n_threads)
        else:
            _roi_align.forward(maps, run.level, batch_idx, *run.where(), j0, j1, run.gh, run.gw,
                               t, out, _roi_align.MODES[p.mode], p.channels_last, blocks,
                               n_threads, visit)


def backward_features(grad_out, features, rois, batch_idx, grad_features, p, run=None,
                      argmax=None, overwrite=False):
    """The feature gradient added into ``grad_features`` (zeroed by the caller), or with
    ``overwrite`` written over whatever it holds."""
    if argmax is not None:  # roi_pool, from the arg-max pixels of a forward
        n, _, h, w = _shape(grad_features, p)
        if overwrite and (p.channels_last or grad_out.size == 0
                          or not _roi_pool.argmax_assigns(h, w, grad_features.itemsize)):
            _zero(grad_features)
            overwrite = False
        run, n_threads = _run_of(run, [grad_features], rois, batch_idx, p, grad_out.size, None,
                                 None)
        bad = _roi_pool.backward_argmax(grad_out, argmax, grad_features, *run.where(),
                                        p.channels_last, n_threads, overwrite)
        if bad:
            raise ValueError(f"argmax holds {bad} entries outside [-1, H * W) = [-1, {h * w}): "
                             "pass the arg-max that roi_pool(..., return_argmax=True) returned "
                             "for these boxes and features")
        return
    backward_features_levels(grad_out, [features], rois, batch_idx, None, None, [grad_features],
                             p, run, overwrite)


# backward_features(..., overwrite=True) writes every element of a gradient it is handed
OVERWRITES_GRADIENTS = True


def _zero(*arrays):
    """Zero-fill gradients handed over with ``overwrite`` that a loop only adds into."""
    from .._buffers import zero

    for a in arrays:
        zero(a)


def backward_features_levels(grad_out, maps, rois, batch_idx, level, scales, grads, p, run=None,
                             overwrite=False):
    """Add the feature gradient of every level into ``grads`` (shaped like ``maps``, zeroed by
    the caller; with ``overwrite``, written over whatever they hold); a map may be None in avg
    mode, which reads no feature value. roi_pool, ps_roi_align and ps_roi_pool (``p.op``) take
    one level."""
    # RoIAlign's NCHW loops and the position-sensitive ones write the gradient over (their first
    # chunk of boxes: assign); the other loops add, into gradients zeroed here
    assigns = not (p.channels_last or p.rotated or p.op == "roi_pool")
    if overwrite and (not assigns or grad_out.size == 0):
        _zero(*grads)
        overwrite = False
    if grad_out.size == 0:
        return
    # avg mode reads no feature value; any array of the shape will do
    maps = [g if m is None else m for m, g in zip(maps, grads)]
    run, n_threads = _run_of(run, maps, rois, batch_idx, p, grad_out.size, level, scales)
    for j0, j1, t in run.chunks():
        assign = overwrite and j0 == 0
        if p.op == "ps_roi_align":
            _roi_align.ps_backward(grad_out, grads[0], *run.where(), j0, j1, run.gh, run.gw, t,
                                   p.channels_last, n_threads, assign)
            continue
        if p.integer_bins:
            if run.pool_blocks(t, False, _shape(maps[0], p)[1], n_threads):
                _roi_pool.backward_blocks(grad_out, maps[0], grads[0], t, *run.where(), n_threads)
            else:
                _roi_pool.backward(grad_out, maps[0], grads[0], t, *run.where(),
                                   _roi_pool.OPS[p.op], p.channels_last, n_threads, assign)
            continue
        blocks = run.blocks(j0, j1, False, _shape(maps[0], p)[1], n_threads)
        if p.rotated:
            _roi_align_rotated.backward_features(grad_out, batch_idx, *run.where(), j0, j1,
                                                 run.gh, run.gw, t, grads[0], p.channels_last,
                                                 bool(blocks[0]), n_threads)
        else:
            _roi_align.backward_features(grad_out, maps, grads, run.level, batch_idx,
                                         *run.where(), j0, j1, run.gh, run.gw, t,
                                         _roi_align.MODES[p.mode], p.channels_last, blocks,
                                         n_threads, assign)


def backward_boxes(grad_out, features, rois, batch_idx, grad_rois, p, run=None):
    backward_boxes_levels(grad_out, [features], rois, batch_idx, None, None, grad_rois, p, run)


def backward_boxes_levels(grad_out, maps, rois, batch_idx, level, scales, grad_rois, p,
                          run=None):
    """Add d(sum(grad_out * out)) / d(rois) into ``grad_rois`` (zeroed by the caller)."""
    if grad_out.size == 0:
        return
    n_threads = _n_threads(p, grad_out.size)
    if p.rotated:
        # computes its samples on the fly (no tables), box by box
        features = maps[0]
        n, c, h, w = _shape(features, p)
        gh, gw = grid_sizes(rois, p)
        check_table_sizes(gh, gw, p)
        order, img_start = _group_by_image(batch_idx, n)
        samples = float(np.sum(gh * gw)) * p.pooled_h * p.pooled_w
        blocks = not p.channels_last and _use_blocks(samples, c, h, w, n, features.itemsize,
                                                     n * -(-c // _roi_align.BLOCK_CHANNELS),
                                                     n_threads, False)
        _roi_align_rotated.backward_boxes(grad_out, features, rois, batch_idx, order, img_start,
                                          gh, gw, grad_rois, p.spatial_scale, p.aligned,
                                          p.clockwise, p.channels_last, blocks, n_threads)
        return
    run, n_threads = _run_of(run, maps, rois, batch_idx, p, grad_out.size, level, scales)
    for j0, j1, t in run.chunks():
        _roi_align.backward_boxes(grad_out, maps, rois, run.level, run.scales, batch_idx,
                                  *run.where(), j0, j1, run.gh, run.gw, t, grad_rois, p.aligned,
                                  _roi_align.MODES[p.mode], p.channels_last,
                                  run.blocks(j0, j1, False, _shape(maps[0], p)[1], n_threads),
                                  n_threads)


__all__ = ["prepare", "Run", "forward", "backward_features", "backward_boxes", "forward_levels",
           "backward_features_levels", "backward_boxes_levels", "effective_n_threads",
           "openmp_enabled", "grid_sizes", "check_table_sizes"]

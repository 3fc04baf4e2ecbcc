"""Axis-aligned RoIAlign on the CPU: forward (avg, max, onnx_max), feature and box gradients.

Average mode is separable (docs/conventions.md, section 1), so a box is described by two small
per-axis tables (taps and weights of every sample row and column) instead of one table per sample,
filled once per box and reused over all channels. Per bin, the tables also hold the run of samples
that lie inside the image: samples outside it count as 0 and never read the map (a NaN there must
not leak into boxes that do not cover it).

Loop orders, chosen for memory traffic:
- NCHW, many samples per pixel: one task per (image, block of LANES planes), copied once to
  channels-last scratch, from which every box of the image is pooled with vector code over the
  LANES channels. The gradients use the same split: each thread owns the planes it writes and
  visits boxes in a fixed order, hence bit-identical results for any thread count.
- NCHW, few samples per pixel (or few channels, or planes too large for scratch): the forward
  splits the boxes over threads, the gradients give each thread whole planes, read directly.
- NHWC: one task per box; every tap is a contiguous run of C channels (vectorised inner loop).
  The feature gradient splits channels into blocks owned by one thread each.

Every entry point takes a list of feature maps (the levels of a feature pyramid) and the level of
each box: a single map is the one-level case, and a multi-level call visits all levels' boxes in
one parallel region. Boxes arrive sorted by (level, image); ``key_start[level * N + n]`` is where
the run of image n of that level starts.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

import numpy as np

from .._buffers import host_array

from ._openmp import effective_n_threads, zero_fill
from ._geometry cimport bilinear_axis, grid_size, sample_coord, sample_fraction, takes_max, valid_run
from ._lanes cimport (LANES, STREAM_PIXELS, BlockTask, PsTask, Scratch, add_deinterleaved,
                      block_task, check_scratch, deinterleave_bins, interleave_planes, ps_begin,
                      ps_copy_back, ps_task, ps_tasks, roialign_bin_lanes_double,
                      roialign_bin_lanes_float, scratch_close, scratch_open,
                      stream_deinterleaved)
from ._planes cimport Shape, out_index, plane_offset, shape_of
from ._cost cimport INTERLEAVE_MIN_SAMPLES_PER_PIXEL as _INTERLEAVE_MIN, SCRATCH_BYTES
from ._cost cimport (PS_ALIGN_MIN_READS_PER_PIXEL, blocks_pay, ps_blocks_pay, streams_output,
                     threads_for_tables, threads_for_work)
from ._calls cimport (Plain, Sizes, plain_call, plain_flag, plain_int, positions, scan_boxes,
                      row_order, small_block, small_output, small_sizes, sort_by_image,
                      visited_at)

cdef enum:
    MODE_AVG = 0
    MODE_MAX = 1
    MODE_ONNX_MAX = 2
    # channels per task of the NHWC feature gradient (and stack buffers of its max mode)
    CHANNEL_BLOCK = 64
    # NCHW planes pooled together by one box-split task in average mode (when too few boxes pay
    # for the channels-last copy): the table reads and index arithmetic of a sample are shared
    # by this many planes
    PLANE_BLOCK = 4

# the pooling modes' kernel codes (the one map from names to codes)
MODES = {"avg": MODE_AVG, "max": MODE_MAX, "onnx_max": MODE_ONNX_MAX}
# channels of one block of the NCHW block loops, for the Python driver's cost model
BLOCK_CHANNELS = LANES


cdef inline floating roi_axis(floating lo_corner, floating hi_corner, double scale, bint aligned,
                              Py_ssize_t pooled, floating* start, floating* bin_size,
                              bint* clamped) noexcept nogil:
    """Start, bin size and roi size along one axis (conventions section 1, steps 1-3); same
    rounding as the reference kernels: the scaled corner is computed in double, then stored in
    the dtype."""
    cdef double offset = 0.5 if aligned else 0.0
    cdef floating s = <floating>(<double>lo_corner * scale - offset)
    cdef floating e = <floating>(<double>hi_corner * scale - offset)
    cdef floating size = e - s
    clamped[0] = False
    if not aligned and size < 1:
        # legacy convention: malformed boxes become 1 pixel wide
        size = 1
        clamped[0] = True
    start[0] = s
    bin_size[0] = size / <floating>pooled
    return size


cdef inline floating bilerp(floating a0, floating a1, floating b0, floating b1, floating v00,
                            floating v01, floating v10, floating v11) noexcept nogil:
    # a: weights of the low/high row, b: of the low/high column; summed in the peers' order
    return a0 * b0 * v00 + a0 * b1 * v01 + a1 * b0 * v10 + a1 * b1 * v11


cdef inline floating tap_max(floating a0, floating a1, floating b0, floating b1, floating v00,
                             floating v01, floating v10, floating v11) noexcept nogil:
    # onnxruntime's max mode: the largest weighted tap, not their sum (conventions section 3);
    # a NaN tap propagates, as in mode "max"
    cdef floating m = a0 * b0 * v00
    cdef floating t = a0 * b1 * v01
    if t > m or t != t:
        m = t
    t = a1 * b0 * v10
    if (t > m or t != t) and m == m:
        m = t
    t = a1 * b1 * v11
    if (t > m or t != t) and m == m:
        m = t
    return m


# ---------------------------------------------------------------------------------------------
# per-axis sample tables

cdef struct Axes:
    # One box's tables. Row sample a (bin a // gh) has taps ylo[a], yhi[a], weights wy0[a],
    # wy1[a] and slope sy[a] = d(wy1)/dy; bin ph's samples inside the image are
    # yr[2 ph] <= iy < yr[2 ph + 1]. Likewise for the columns. Weights have the kernel's dtype.
    Py_ssize_t gh, gw
    const Py_ssize_t* ylo
    const Py_ssize_t* yhi
    const Py_ssize_t* yr
    const Py_ssize_t* xlo
    const Py_ssize_t* xhi
    const Py_ssize_t* xr
    const char* wy0
    const char* wy1
    const char* sy
    const char* wx0
    const char* wx1
    const char* sx


cdef struct TableSet:
    # the tables of a run of boxes: ``base`` points at the start of each table (its gh, gw are
    # unused); box q of the run starts at yoff[q] / xoff[q] (samples) and 2 PH q / 2 PW q (runs)
    Axes base
    const Py_ssize_t* yoff
    const Py_ssize_t* xoff
    Py_ssize_t PH, PW, itemsize


cdef inline Axes axes_at(const TableSet* t, Py_ssize_t q, Py_ssize_t gh, Py_ssize_t gw) noexcept nogil:
    cdef Axes A = t.base
    cdef Py_ssize_t oy = t.yoff[q], ox = t.xoff[q], by = oy * t.itemsize, bx = ox * t.itemsize
    A.gh, A.gw = gh, gw
    A.ylo, A.yhi, A.yr = A.ylo + oy, A.yhi + oy, A.yr + 2 * t.PH * q
    A.xlo, A.xhi, A.xr = A.xlo + ox, A.xhi + ox, A.xr + 2 * t.PW * q
    A.wy0, A.wy1, A.sy = A.wy0 + by, A.wy1 + by, A.sy + by
    A.wx0, A.wx1, A.sx = A.wx0 + bx, A.wx1 + bx, A.sx + bx
    return A


cdef inline bint inside(const Axes* A, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t iy,
                        Py_ssize_t ix) noexcept nogil:
    """Whether sample (iy, ix) of bin (ph, pw) lies inside the image."""
    return (A.yr[2 * ph] <= iy < A.yr[2 * ph + 1]) and (A.xr[2 * pw] <= ix < A.xr[2 * pw + 1])


cdef struct Map:
    # one level of the feature pyramid: its features, its gradient (feature gradient only), size
    const char* x
    char* g
    Py_ssize_t H, W


cdef object collect_maps(list arrays, list grads, bint channels_last, floating* witness):
    """The Map of each level (``witness`` only selects the dtype), in a buffer the caller keeps
    alive; empty arrays get NULL data (no box reads them)."""
    cdef Py_ssize_t l, L = len(arrays)
    cdef const floating[:, :, :, ::1] x
    cdef floating[:, :, :, ::1] g
    buf = np.zeros(max(L, 1) * sizeof(Map), np.uint8)
    cdef uint8_t[::1] view = buf
    cdef Map* m = <Map*>&view[0]
    for l in range(L):
        x = arrays[l]
        m[l].x = <const char*>&x[0, 0, 0, 0] if x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] else NULL
        m[l].g = NULL
        if grads is not None:
            g = grads[l]
            m[l].g = <char*>&g[0, 0, 0, 0] if m[l].x != NULL else NULL
        if channels_last:
            m[l].H, m[l].W = x.shape[1], x.shape[2]
        else:
            m[l].H, m[l].W = x.shape[2], x.shape[3]
    return buf


cdef inline const Map* maps_of(object buf):
    cdef uint8_t[::1] view = buf
    return <const Map*>&view[0]


cdef class _Tables:
    """Per-axis sample tables of a run of boxes (positions j0..j1 of the image-sorted order)."""
    cdef object arrays  # owns the buffers the TableSet points into
    cdef TableSet ts


def grid_sizes(const floating[:, ::1] rois, const int64_t[::1] level, const double[::1] scales,
               Py_ssize_t pooled_h, Py_ssize_t pooled_w, Py_ssize_t sampling_ratio, bint aligned):
    """Samples per bin (gh, gw) of every box (box k at scale scales[level[k]]), as int64 arrays
    (saturated at GRID_SATURATE)."""
    cdef Py_ssize_t K = rois.shape[0], k
    cdef floating start = 0, bin_size = 0, size
    cdef double scale
    cdef bint clamped = False
    gh_arr = np.empty(K, dtype=np.int64)
    gw_arr = np.empty(K, dtype=np.int64)
    cdef int64_t[::1] gh = gh_arr, gw = gw_arr
    with nogil:
        for k in range(K):
            scale = scales[level[k]]
            size = roi_axis(rois[k, 1], rois[k, 3], scale, aligned, pooled_h, &start, &bin_size, &clamped)
            gh[k] = grid_size(sampling_ratio, size, pooled_h)
            size = roi_axis(rois[k, 0], rois[k, 2], scale, aligned, pooled_w, &start, &bin_size, &clamped)
            gw[k] = grid_size(sampling_ratio, size, pooled_w)
    return gh_arr, gw_arr


cdef void fill_axis(floating start, floating bin_size, Py_ssize_t pooled, Py_ssize_t g,
                    Py_ssize_t size, Py_ssize_t* lo, Py_ssize_t* hi, floating* w0, floating* w1,
                    floating* slope, Py_ssize_t* runs) noexcept nogil:
    cdef Py_ssize_t p, i, t = 0
    cdef bint ok
    for p in range(pooled):
        runs[2 * p] = runs[2 * p + 1] = 0
        for i in range(g):
            ok = bilinear_axis(sample_coord(start, bin_size, p, i, g), size, lo + t, hi + t,
                               w0 + t, w1 + t, slope + t)
            valid_run(ok, i, runs + 2 * p)
            t += 1


cdef void fill_box(floating lo_corner, floating hi_corner, double scale, bint aligned,
                   Py_ssize_t pooled, Py_ssize_t g, Py_ssize_t size, Py_ssize_t* lo,
                   Py_ssize_t* hi, floating* w0, floating* w1, floating* slope,
                   Py_ssize_t* runs) noexcept nogil:
    # a function of its own so that start and bin_size are private to each OpenMP thread
    cdef floating start = 0, bin_size = 0
    cdef bint clamped = False
    roi_axis(lo_corner, hi_corner, scale, aligned, pooled, &start, &bin_size, &clamped)
    fill_axis(start, bin_size, pooled, g, size, lo, hi, w0, w1, slope, runs)


cdef inline Py_ssize_t table_ints(Py_ssize_t ny, Py_ssize_t nx, Py_ssize_t n, Py_ssize_t PH,
                                  Py_ssize_t PW) noexcept nogil:
    """Integer entries of the tables of n boxes of ny row and nx column samples in all (one slack
    element per table, so that &table[offset] is valid for boxes with no samples)."""
    return 2 * (ny + 1) + 2 * (nx + 1) + 2 * PH * n + 2 * PW * n + 2


cdef inline Py_ssize_t table_weights(Py_ssize_t ny, Py_ssize_t nx) noexcept nogil:
    return 3 * (ny + 1) + 3 * (nx + 1)


cdef void lay_out_tables(TableSet* t, Py_ssize_t* ints, char* weights, Py_ssize_t* yoff,
                         Py_ssize_t* xoff, Py_ssize_t n, Py_ssize_t PH, Py_ssize_t PW,
                         Py_ssize_t itemsize) noexcept nogil:
    """Point ``t`` into two buffers of table_ints / table_weights entries, for boxes whose
    samples start at yoff[q], xoff[q] (yoff[n], xoff[n]: the totals)."""
    cdef Py_ssize_t ny = yoff[n], nx = xoff[n]
    t.base.ylo = ints
    t.base.yhi = ints + ny + 1
    t.base.xlo = ints + 2 * (ny + 1)
    t.base.xhi = t.base.xlo + nx + 1
    t.base.yr = t.base.xhi + nx + 1
    t.base.xr = t.base.yr + 2 * PH * n + 1
    t.base.wy0 = weights
    t.base.wy1 = weights + (ny + 1) * itemsize
    t.base.sy = weights + 2 * (ny + 1) * itemsize
    t.base.wx0 = weights + 3 * (ny + 1) * itemsize
    t.base.wx1 = t.base.wx0 + (nx + 1) * itemsize
    t.base.sx = t.base.wx0 + 2 * (nx + 1) * itemsize
    t.yoff, t.xoff, t.PH, t.PW, t.itemsize = yoff, xoff, PH, PW, itemsize


cdef void fill_tables(const floating* rois, const int64_t* order, Py_ssize_t j0, Py_ssize_t n,
                      const int64_t* gh, const int64_t* gw, const int64_t* level,
                      const int64_t* heights, const int64_t* widths, const double* scales,
                      bint aligned, const TableSet* t, int n_threads) noexcept nogil:
    """Fill the tables ``t`` of the boxes at sorted positions j0..j0+n (rois: (K, 4) rows), in
    parallel."""
    cdef Py_ssize_t j, k, l, PH = t.PH, PW = t.PW
    cdef Axes A
    for j in prange(n, schedule="static", num_threads=n_threads):
        k = order[j0 + j]
        l = level[k]
        A = axes_at(t, j, gh[k], gw[k])
        fill_box(rois[4 * k + 1], rois[4 * k + 3], scales[l], aligned, PH, gh[k], heights[l],
                 <Py_ssize_t*>A.ylo, <Py_ssize_t*>A.yhi, <floating*>A.wy0, <floating*>A.wy1,
                 <floating*>A.sy, <Py_ssize_t*>A.yr)
        fill_box(rois[4 * k], rois[4 * k + 2], scales[l], aligned, PW, gw[k], widths[l],
                 <Py_ssize_t*>A.xlo, <Py_ssize_t*>A.xhi, <floating*>A.wx0, <floating*>A.wx1,
                 <floating*>A.sx, <Py_ssize_t*>A.xr)


def make_tables(const floating[:, ::1] rois, const int64_t[::1] order, Py_ssize_t j0,
                Py_ssize_t j1, const int64_t[::1] gh, const int64_t[::1] gw,
                const int64_t[::1] level, const int64_t[::1] heights, const int64_t[::1] widths,
                const double[::1] scales, Py_ssize_t pooled_h, Py_ssize_t pooled_w, bint aligned,
                int n_threads):
    """Fill the per-axis tables of the boxes at sorted positions j0..j1 (in parallel); box k lies
    on level level[k], of heights[l] x widths[l] pixels at scale scales[l]. All tables live in
    two buffers (integers and weights): a small call pays for two allocations, not fourteen."""
    cdef Py_ssize_t n = j1 - j0, j, ny = 0, nx = 0, PH = pooled_h, PW = pooled_w
    offsets = np.empty(2 * (n + 1), np.intp)
    cdef Py_ssize_t[::1] off = offsets
    cdef Py_ssize_t* yoff = &off[0]
    cdef Py_ssize_t* xoff = &off[n + 1]
    for j in range(n):
        yoff[j], xoff[j] = ny, nx
        ny += gh[order[j0 + j]] * PH
        nx += gw[order[j0 + j]] * PW
    yoff[n], xoff[n] = ny, nx
    ints = np.zeros(table_ints(ny, nx, n, PH, PW), np.intp)
    weights = np.zeros(table_weights(ny, nx), np.float32 if floating is float else np.float64)
    cdef Py_ssize_t[::1] iv = ints
    cdef floating[::1] fv = weights
    t = _Tables()
    t.arrays = (ints, weights, offsets)
    lay_out_tables(&t.ts, &iv[0], <char*>&fv[0], yoff, xoff, n, PH, PW, sizeof(floating))
    with nogil:
        fill_tables(&rois[0, 0], &order[0], j0, n, &gh[0], &gw[0], &level[0], &heights[0],
                    &widths[0], &scales[0], aligned, &t.ts, n_threads)
    return t


# ---------------------------------------------------------------------------------------------
# forward

cdef inline floating sample_value(const floating* plane, Py_ssize_t cs, Py_ssize_t W,
                                  const Axes* A, Py_ssize_t a, Py_ssize_t b,
                                  int mode) noexcept nogil:
    """Value of row sample a, column sample b in a max mode; ``cs`` is the distance between
    horizontally adjacent pixels."""
    cdef const floating* wy0 = <const floating*>A.wy0
    cdef const floating* wy1 = <const floating*>A.wy1
    cdef const floating* wx0 = <const floating*>A.wx0
    cdef const floating* wx1 = <const floating*>A.wx1
    cdef floating v00 = plane[(A.ylo[a] * W + A.xlo[b]) * cs]
    cdef floating v01 = plane[(A.ylo[a] * W + A.xhi[b]) * cs]
    cdef floating v10 = plane[(A.yhi[a] * W + A.xlo[b]) * cs]
    cdef floating v11 = plane[(A.yhi[a] * W + A.xhi[b]) * cs]
    if mode == MODE_MAX:
        return bilerp(wy0[a], wy1[a], wx0[b], wx1[b], v00, v01, v10, v11)
    return tap_max(wy0[a], wy1[a], wx0[b], wx1[b], v00, v01, v10, v11)


cdef Py_ssize_t argmax_sample(const floating* plane, Py_ssize_t cs, Py_ssize_t W,
                              const Axes* A, Py_ssize_t ph, Py_ssize_t pw, int mode,
                              floating* best) noexcept nogil:
    """Index iy * gw + ix of the largest sample of bin (ph, pw) (the first of equal ones, as
    mmcv; a NaN wins), its value in best. Samples outside the image are 0 and read nothing."""
    cdef Py_ssize_t iy, ix, arg = 0, gh = A.gh, gw = A.gw
    cdef floating v
    best[0] = 0
    for iy in range(gh):
        for ix in range(gw):
            v = 0
            if inside(A, ph, pw, iy, ix):
                v = sample_value(plane, cs, W, A, ph * gh + iy, pw * gw + ix, mode)
            if takes_max(v, best[0], iy == 0 and ix == 0):
                best[0] = v
                arg = iy * gw + ix
    return arg


cdef void pool_plane(const floating* plane, Py_ssize_t W, floating* o, Py_ssize_t PH,
                     Py_ssize_t PW, const Axes* A, int mode) noexcept nogil:
    """Max modes: pool one box on one (H, W) plane into o (PH x PW contiguous)."""
    cdef Py_ssize_t ph, pw, a
    if A.gh == 0 or A.gw == 0:
        for a in range(PH * PW):
            o[a] = 0
        return
    for ph in range(PH):
        for pw in range(PW):
            argmax_sample(plane, 1, W, A, ph, pw, mode, &o[ph * PW + pw])


cdef void average_planes(const floating* plane, Py_ssize_t plane_stride, Py_ssize_t n_planes,
                         Py_ssize_t W, floating* o, Py_ssize_t o_stride, Py_ssize_t PH,
                         Py_ssize_t PW, const Axes* A) noexcept nogil:
    """Average-pool one box on n_planes <= PLANE_BLOCK planes (plane_stride apart) into o
    (o_stride apart). Lanes past n_planes re-read the last plane and are not stored, so that the
    lane loop has a constant trip count the compiler unrolls."""
    cdef Py_ssize_t ph, pw, iy, ix, a, b, cc, i00, i01, i10, i11, gh = A.gh, gw = A.gw
    cdef const floating* p[PLANE_BLOCK]
    cdef floating acc[PLANE_BLOCK]
    cdef floating w00, w01, w10, w11, inv_count
    cdef const floating* wy0 = <const floating*>A.wy0
    cdef const floating* wy1 = <const floating*>A.wy1
    cdef const floating* wx0 = <const floating*>A.wx0
    cdef const floating* wx1 = <const floating*>A.wx1
    for cc in range(PLANE_BLOCK):
        p[cc] = plane + (cc if cc < n_planes else n_planes - 1) * plane_stride
    inv_count = 1 / <floating>(gh * gw) if gh * gw > 0 else 0
    for ph in range(PH):
        for pw in range(PW):
            for cc in range(PLANE_BLOCK):
                acc[cc] = 0
            for iy in range(A.yr[2 * ph], A.yr[2 * ph + 1]):
                a = ph * gh + iy
                for ix in range(A.xr[2 * pw], A.xr[2 * pw + 1]):
                    b = pw * gw + ix
                    w00 = wy0[a] * wx0[b]
                    w01 = wy0[a] * wx1[b]
                    w10 = wy1[a] * wx0[b]
                    w11 = wy1[a] * wx1[b]
                    i00 = A.ylo[a] * W + A.xlo[b]
                    i01 = A.ylo[a] * W + A.xhi[b]
                    i10 = A.yhi[a] * W + A.xlo[b]
                    i11 = A.yhi[a] * W + A.xhi[b]
                    for cc in range(PLANE_BLOCK):
                        acc[cc] += w00 * p[cc][i00] + w01 * p[cc][i01] + w10 * p[cc][i10] + w11 * p[cc][i11]
            for cc in range(n_planes):
                o[cc * o_stride + ph * PW + pw] = acc[cc] * inv_count


cdef inline void sum_bin(const floating* image, Py_ssize_t W, Py_ssize_t C, const Axes* A,
                         Py_ssize_t ph, Py_ssize_t pw, floating* acc) noexcept nogil:
    """acc[c] += each sample of bin (ph, pw) inside the image, on channel c of a channels-last
    (H, W, C) image, in the peers' order."""
    cdef Py_ssize_t iy, ix, a, b, c
    cdef const floating* p00
    cdef const floating* p01
    cdef const floating* p10
    cdef const floating* p11
    cdef const floating* wy0 = <const floating*>A.wy0
    cdef const floating* wy1 = <const floating*>A.wy1
    cdef const floating* wx0 = <const floating*>A.wx0
    cdef const floating* wx1 = <const floating*>A.wx1
    for iy in range(A.yr[2 * ph], A.yr[2 * ph + 1]):
        a = ph * A.gh + iy
        for ix in range(A.xr[2 * pw], A.xr[2 * pw + 1]):
            b = pw * A.gw + ix
            p00 = image + (A.ylo[a] * W + A.xlo[b]) * C
            p01 = image + (A.ylo[a] * W + A.xhi[b]) * C
            p10 = image + (A.yhi[a] * W + A.xlo[b]) * C
            p11 = image + (A.yhi[a] * W + A.xhi[b]) * C
            for c in range(C):
                acc[c] += bilerp(wy0[a], wy1[a], wx0[b], wx1[b], p00[c], p01[c], p10[c], p11[c])


cdef inline void sum_bin_lanes(const floating* block, Py_ssize_t W, const Axes* A, Py_ssize_t ph,
                               Py_ssize_t pw, floating* acc) noexcept nogil:
    """acc[c] = the sum of bin (ph, pw)'s samples inside the image on lane c of a channels-last
    block of LANES lanes: sum_bin's sums, the same bits, in vector registers
    (roialign_bin_lanes)."""
    cdef Py_ssize_t a = ph * A.gh, b = pw * A.gw
    if floating is float:
        roialign_bin_lanes_float(block, W, A.yr[2 * ph], A.yr[2 * ph + 1], A.xr[2 * pw],
                                 A.xr[2 * pw + 1], A.ylo + a, A.yhi + a, A.xlo + b, A.xhi + b,
                                 <const float*>A.wy0 + a, <const float*>A.wy1 + a,
                                 <const float*>A.wx0 + b, <const float*>A.wx1 + b, acc)
    else:
        roialign_bin_lanes_double(block, W, A.yr[2 * ph], A.yr[2 * ph + 1], A.xr[2 * pw],
                                  A.xr[2 * pw + 1], A.ylo + a, A.yhi + a, A.xlo + b, A.xhi + b,
                                  <const double*>A.wy0 + a, <const double*>A.wy1 + a,
                                  <const double*>A.wx0 + b, <const double*>A.wx1 + b, acc)


cdef void pool_box_nhwc(const floating* image, Py_ssize_t W, Py_ssize_t C, floating* o,
                        Py_ssize_t PH, Py_ssize_t PW, const Axes* A, int mode) noexcept nogil:
    """Pool one box of a channels-last (H, W, C) image into o (PH x PW x C contiguous)."""
    cdef Py_ssize_t ph, pw, iy, ix, a, b, c, gh = A.gh, gw = A.gw
    cdef const floating* p00
    cdef const floating* p01
    cdef const floating* p10
    cdef const floating* p11
    cdef floating* ob
    cdef floating v, inv_count
    cdef floating acc[LANES]
    cdef bint first
    cdef const floating* wy0 = <const floating*>A.wy0
    cdef const floating* wy1 = <const floating*>A.wy1
    cdef const floating* wx0 = <const floating*>A.wx0
    cdef const floating* wx1 = <const floating*>A.wx1
    if gh == 0 or gw == 0:
        for a in range(PH * PW * C):
            o[a] = 0
        return
    inv_count = 1 / <floating>(gh * gw)
    for ph in range(PH):
        for pw in range(PW):
            ob = o + (ph * PW + pw) * C
            if mode == MODE_AVG and C == LANES:
                # the NCHW block loops: the sums in vector registers (sum_bin_lanes; summed into
                # ob, which may alias the image for all the compiler knows, they were stored and
                # reloaded at every sample), the same bits. (NHWC images of 16k channels walking
                # the bin once per LANES channels: slower, 33-58 against 31 ms on the box head.)
                sum_bin_lanes(image, W, A, ph, pw, acc)
                for c in range(LANES):
                    ob[c] = acc[c] * inv_count
                continue
            for c in range(C):
                ob[c] = 0
            if mode == MODE_AVG:
                sum_bin(image, W, C, A, ph, pw, ob)
                for c in range(C):
                    ob[c] *= inv_count
                continue
            first = True
            for iy in range(gh):
                a = ph * gh + iy
                for ix in range(gw):
                    b = pw * gw + ix
                    if not inside(A, ph, pw, iy, ix):
                        for c in range(C):  # a sample outside the image is 0 in every channel
                            if takes_max(<floating>0, ob[c], first):
                                ob[c] = 0
                        first = False
                        continue
                    p00 = image + (A.ylo[a] * W + A.xlo[b]) * C
                    p01 = image + (A.ylo[a] * W + A.xhi[b]) * C
                    p10 = image + (A.yhi[a] * W + A.xlo[b]) * C
                    p11 = image + (A.yhi[a] * W + A.xhi[b]) * C
                    for c in range(C):
                        if mode == MODE_MAX:
                            v = bilerp(wy0[a], wy1[a], wx0[b], wx1[b], p00[c], p01[c], p10[c], p11[c])
                        else:
                            v = tap_max(wy0[a], wy1[a], wx0[b], wx1[b], p00[c], p01[c], p10[c], p11[c])
                        if takes_max(v, ob[c], first):
                            ob[c] = v
                    first = False


cdef inline void pool_box_planes(const floating* plane, Py_ssize_t plane_stride,
                                 Py_ssize_t n_planes, Py_ssize_t W, floating* o, Py_ssize_t PH,
                                 Py_ssize_t PW, const Axes* A, int mode) noexcept nogil:
    cdef Py_ssize_t cc
    if mode == MODE_AVG:
        average_planes(plane, plane_stride, n_planes, W, o, PH * PW, PH, PW, A)
    else:
        for cc in range(n_planes):
            pool_plane(plane + cc * plane_stride, W, o + cc * PH * PW, PH, PW, A, mode)


cdef struct BoxRun:
    # The boxes of a call sorted by (level, image): positions j0..j1 of ``order`` run. Box k lies
    # on level level[k], image batch_idx[k], and takes gh[k] x gw[k] samples per bin;
    # key_start[l * N + n] is where the run of image n of level l starts.
    const int64_t* level
    const int64_t* batch_idx
    const int64_t* order
    const int64_t* key_start
    const int64_t* gh
    const int64_t* gw
    Py_ssize_t j0, j1
    # a forward visits position visit[j - j0] at its step j (NULL: position j), see row_order
    const int64_t* visit


def row_visit(const floating[:, ::1] rois, const int64_t[::1] order, const int64_t[::1] starts,
              Py_ssize_t j0, Py_ssize_t j1):
    """The order in which a forward visits positions j0..j1 (row_order of _calls.pxd), as an
    int64 array, or None when there is no memory for it (then they run in position order: the
    same outputs)."""
    visit = np.empty(j1 - j0, np.int64)
    cdef int64_t[::1] v = visit
    cdef bint ok
    if j1 <= j0:
        return visit
    with nogil:
        ok = row_order(&order[0], &starts[0], starts.shape[0] - 1, j0, j1, &rois[0, 0], &v[0])
    return visit if ok else None


def forward(list maps, const int64_t[::1] level, const int64_t[::1] batch_idx,
            const int64_t[::1] order, const int64_t[::1] key_start, Py_ssize_t j0, Py_ssize_t j1,
            const int64_t[::1] gh, const int64_t[::1] gw, _Tables t, floating[:, :, :, ::1] out,
            int mode, bint channels_last, const uint8_t[::1] blocks, int n_threads,
            const int64_t[::1] visit=None):
    """Pool the boxes at sorted positions j0..j1 (tables ``t``) into ``out`` (see pool_boxes),
    visiting them in the order ``visit`` (positions; None: j0..j1)."""
    cdef BoxRun R
    R.level, R.batch_idx, R.order, R.key_start = &level[0], &batch_idx[0], &order[0], &key_start[0]
    R.gh, R.gw, R.j0, R.j1 = &gh[0], &gw[0], j0, j1
    R.visit = positions(visit, j0, j1)
    keep = collect_maps(maps, None, channels_last, <floating*>NULL)
    cdef Py_ssize_t N = (<object>maps[0]).shape[0]
    cdef Py_ssize_t C = out.shape[3] if channels_last else out.shape[1]
    cdef Py_ssize_t PH = out.shape[1] if channels_last else out.shape[2]
    cdef Py_ssize_t PW = out.shape[2] if channels_last else out.shape[3]
    cdef Py_ssize_t failed, L = len(maps)
    cdef const Map* M = maps_of(keep)
    with nogil:
        failed = pool_boxes(M, L, N, C, PH, PW, &R, &t.ts, &out[0, 0, 0, 0], mode, channels_last,
                            &blocks[0], n_threads)
    check_scratch(failed)


cdef Py_ssize_t pool_boxes(const Map* M, Py_ssize_t L, Py_ssize_t N, Py_ssize_t C, Py_ssize_t PH,
                           Py_ssize_t PW, const BoxRun* R, const TableSet* T, floating* O,
                           int mode, bint channels_last, const uint8_t* blocks,
                           int n_threads) noexcept nogil:
    """Pool the boxes of ``R`` into ``O``. NCHW levels with ``blocks[l]`` pool from channels-last
    copies of blocks of planes (worth it from about a fifth of a sample per feature pixel,
    _cost.pxd); when no level does, the boxes are split over the threads. Returns 0, or the
    bytes of per-thread scratch that could not be allocated."""
    cdef Py_ssize_t H, W, n, c, j, k, v, lo, hi, task, l, nb, cc, i, nblocks, scratch_px = 0
    cdef Py_ssize_t j0 = R.j0, j1 = R.j1
    cdef Axes A
    cdef const floating* X
    cdef floating* scratch
    cdef floating* obuf
    cdef floating* staging
    cdef bint stream_out = streams_output((j1 - j0) * C * PH * PW, sizeof(floating))
    cdef Scratch s
    cdef size_t failed = 0
    cdef BlockTask bt
    if channels_last:
        for v in prange(j0, j1, schedule="dynamic", num_threads=n_threads):
            j = visited_at(R.visit, j0, v)
            k = R.order[j]
            l = R.level[k]
            A = axes_at(T, j - j0, R.gh[k], R.gw[k])
            pool_box_nhwc(<const floating*>M[l].x + R.batch_idx[k] * M[l].H * M[l].W * C, M[l].W,
                          C, O + k * PH * PW * C, PH, PW, &A, mode)
        return 0
    for l in range(L):
        if blocks[l] and M[l].H * M[l].W > scratch_px:
            scratch_px = M[l].H * M[l].W
    if scratch_px == 0:
        # no level pays for the channels-last copy: split (box, PLANE_BLOCK planes) pairs over
        # the threads, so that even one box on many channels keeps them all busy
        nblocks = (C + PLANE_BLOCK - 1) // PLANE_BLOCK
        for task in prange((j1 - j0) * nblocks, schedule="dynamic", num_threads=n_threads):
            j = visited_at(R.visit, j0, j0 + task // nblocks)
            c = (task % nblocks) * PLANE_BLOCK
            k = R.order[j]
            l = R.level[k]
            A = axes_at(T, j - j0, R.gh[k], R.gw[k])
            pool_box_planes(<const floating*>M[l].x + (R.batch_idx[k] * C + c) * M[l].H * M[l].W,
                            M[l].H * M[l].W, C - c if C - c < PLANE_BLOCK else PLANE_BLOCK,
                            M[l].W, O + (k * C + c) * PH * PW, PH, PW, &A, mode)
        return 0
    # one task per (level, image, block of LANES channels): levels with blocks interleave the
    # block into a channels-last scratch once and pool all its boxes from it with vector code;
    # the others pool straight from the planes
    nblocks = (C + LANES - 1) // LANES
    with parallel(num_threads=n_threads):
        s = scratch_open(&failed, scratch_px * LANES * sizeof(floating),
                         (2 if stream_out else 1) * PH * PW * LANES * sizeof(floating))
        scratch, obuf = <floating*>s.a, <floating*>s.b
        staging = obuf + PH * PW * LANES if stream_out else NULL
        for task in prange(L * N * nblocks, schedule="dynamic"):
            if not s.ok:
                continue  # reported after the parallel region
            bt = block_task(task, nblocks, C, R.key_start, j0, j1)
            l, n, c, nb, lo, hi = bt.n // N, bt.n % N, bt.c, bt.nb, bt.lo, bt.hi
            H, W = M[l].H, M[l].W
            X = <const floating*>M[l].x + (n * C + c) * H * W
            if lo < hi and blocks[l]:
                interleave_planes(X, H * W, nb, scratch)
            for v in range(lo, hi):
                j = visited_at(R.visit, j0, v)
                k = R.order[j]
                A = axes_at(T, j - j0, R.gh[k], R.gw[k])
                if blocks[l]:
                    pool_box_nhwc(scratch, W, LANES, obuf, PH, PW, &A, mode)
                    deinterleave_bins(obuf, PH * PW, nb, O + (k * C + c) * PH * PW, PH * PW, staging)
                    continue
                for i in range((nb + PLANE_BLOCK - 1) // PLANE_BLOCK):
                    cc = i * PLANE_BLOCK
                    pool_box_planes(X + cc * H * W, H * W,
                                    nb - cc if nb - cc < PLANE_BLOCK else PLANE_BLOCK, W,
                                    O + (k * C + c + cc) * PH * PW, PH, PW, &A, mode)
        scratch_close(&s)
    return failed


# ---------------------------------------------------------------------------------------------
# gradient with respect to the features

cdef void scatter_box_nhwc(floating* gimage, const floating* image, Py_ssize_t W, Py_ssize_t C,
                           Py_ssize_t nc, const floating* g, Py_ssize_t PH, Py_ssize_t PW,
                           const Axes* A, int mode) noexcept nogil:
    """Add the feature gradient of one box for nc <= CHANNEL_BLOCK channels of a channels-last
    image: pixel (y, x) starts at (y * W + x) * C, and g holds bin (ph, pw) at (ph * PW + pw) * C.
    A plane is the case C = nc = 1."""
    cdef Py_ssize_t ph, pw, iy, ix, a, b, c, gh = A.gh, gw = A.gw
    cdef floating* q00
    cdef floating* q01
    cdef floating* q10
    cdef floating* q11
    cdef const floating* gb
    cdef floating w00, w01, w10, w11, inv_count
    cdef floating best[CHANNEL_BLOCK]
    cdef Py_ssize_t arg[CHANNEL_BLOCK]
    cdef const floating* wy0 = <const floating*>A.wy0
    cdef const floating* wy1 = <const floating*>A.wy1
    cdef const floating* wx0 = <const floating*>A.wx0
    cdef const floating* wx1 = <const floating*>A.wx1
    if gh == 0 or gw == 0:
        return
    inv_count = 1 / <floating>(gh * gw)
    for ph in range(PH):
        for pw in range(PW):
            gb = g + (ph * PW + pw) * C
            if mode == MODE_AVG:
                for iy in range(A.yr[2 * ph], A.yr[2 * ph + 1]):
                    a = ph * gh + iy
                    for ix in range(A.xr[2 * pw], A.xr[2 * pw + 1]):
                        b = pw * gw + ix
                        w00 = wy0[a] * wx0[b] * inv_count
                        w01 = wy0[a] * wx1[b] * inv_count
                        w10 = wy1[a] * wx0[b] * inv_count
                        w11 = wy1[a] * wx1[b] * inv_count
                        q00 = gimage + (A.ylo[a] * W + A.xlo[b]) * C
                        q01 = gimage + (A.ylo[a] * W + A.xhi[b]) * C
                        q10 = gimage + (A.yhi[a] * W + A.xlo[b]) * C
                        q11 = gimage + (A.yhi[a] * W + A.xhi[b]) * C
                        for c in range(nc):
                            q00[c] += gb[c] * w00
                            q01[c] += gb[c] * w01
                            q10[c] += gb[c] * w10
                            q11[c] += gb[c] * w11
            else:
                for c in range(nc):
                    arg[c] = argmax_sample(image + c, C, W, A, ph, pw, mode, &best[c])
                for c in range(nc):
                    iy, ix = arg[c] // gw, arg[c] % gw
                    if not inside(A, ph, pw, iy, ix):
                        continue  # the maximum is a sample outside the image: no gradient
                    a, b = ph * gh + iy, pw * gw + ix
                    gimage[(A.ylo[a] * W + A.xlo[b]) * C + c] += gb[c] * wy0[a] * wx0[b]
                    gimage[(A.ylo[a] * W + A.xhi[b]) * C + c] += gb[c] * wy0[a] * wx1[b]
                    gimage[(A.yhi[a] * W + A.xlo[b]) * C + c] += gb[c] * wy1[a] * wx0[b]
                    gimage[(A.yhi[a] * W + A.xhi[b]) * C + c] += gb[c] * wy1[a] * wx1[b]


def backward_features(const floating[:, :, :, ::1] grad_out, list maps, list grads,
                      const int64_t[::1] level, const int64_t[::1] batch_idx,
                      const int64_t[::1] order, const int64_t[::1] key_start, Py_ssize_t j0,
                      Py_ssize_t j1, const int64_t[::1] gh, const int64_t[::1] gw, _Tables t,
                      int mode, bint channels_last, const uint8_t[::1] blocks, int n_threads,
                      bint assign=False):
    """Add the feature gradient of the boxes at sorted positions j0..j1 into ``grads`` (one per
    level, shaped like ``maps``). Every gradient element is owned by one thread and receives its
    terms in the fixed sorted-box order. NCHW: one task per (level, image, block of LANES planes),
    accumulated in channels-last scratch for levels with ``blocks[l]``, else scattered straight
    into the planes (no scratch: few samples, few channels or huge planes). ``assign`` (NCHW):
    ``grads`` hold anything and every element is written, not added to: a block's planes are
    streamed out of its scratch (no zero-fill pass before the call, and no read of the planes)."""
    cdef Py_ssize_t L = len(maps), N, C, H, W, PH, PW, n, c, c0, j, k, lo, hi, task, l, nb, cc
    cdef Py_ssize_t nblocks, scratch_px = 0
    cdef const floating* GO = &grad_out[0, 0, 0, 0]
    cdef const TableSet* T = &t.ts
    cdef Axes A
    cdef const floating* X
    cdef floating* G
    keep = collect_maps(maps, grads, channels_last, <floating*>NULL)
    cdef const Map* M = maps_of(keep)
    N = (<object>maps[0]).shape[0]
    if channels_last:
        if assign:
            raise ValueError("assign is for NCHW gradients")
        C, PH, PW = grad_out.shape[3], grad_out.shape[1], grad_out.shape[2]
        for task in prange((C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK, nogil=True,
                           schedule="static", num_threads=n_threads):
            c0 = task * CHANNEL_BLOCK
            for j in range(j0, j1):
                k = order[j]
                l = level[k]
                lo = batch_idx[k] * M[l].H * M[l].W * C + c0  # the box's image, channel c0
                A = axes_at(T, j - j0, gh[k], gw[k])
                scatter_box_nhwc(<floating*>M[l].g + lo, <const floating*>M[l].x + lo, M[l].W, C,
                                 C - c0 if C - c0 < CHANNEL_BLOCK else CHANNEL_BLOCK,
                                 GO + k * PH * PW * C + c0, PH, PW, &A, mode)
        return
    C, PH, PW = grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]
    for l in range(L):
        if blocks[l] and M[l].H * M[l].W > scratch_px:
            scratch_px = M[l].H * M[l].W
    nblocks = (C + LANES - 1) // LANES
    cdef floating* gscratch
    cdef floating* fscratch
    cdef floating* gbuf
    cdef Scratch s
    cdef size_t failed = 0
    cdef BlockTask bt
    with nogil, parallel(num_threads=n_threads):
        s = scratch_open(&failed, (scratch_px * LANES + 1) * sizeof(floating),
                         ((scratch_px * LANES if mode != MODE_AVG else 0) + 1) * sizeof(floating),
                         (PH * PW + (STREAM_PIXELS if assign else 0)) * LANES * sizeof(floating))
        gscratch, fscratch, gbuf = <floating*>s.a, <floating*>s.b, <floating*>s.c
        for task in prange(L * N * nblocks, schedule="dynamic"):
            if not s.ok:
                continue  # reported after the parallel region
            bt = block_task(task, nblocks, C, &key_start[0], j0, j1)
            l, n, c, nb, lo, hi = bt.n // N, bt.n % N, bt.c, bt.nb, bt.lo, bt.hi
            H, W = M[l].H, M[l].W
            G = <floating*>M[l].g + (n * C + c) * H * W
            if assign and (lo >= hi or not blocks[l]) and M[l].g != NULL:
                memset(G, 0, nb * H * W * sizeof(floating))  # then added to as usual
            if lo >= hi:
                continue
            X = <const floating*>M[l].x + (n * C + c) * H * W
            if not blocks[l]:
                for j in range(lo, hi):
                    k = order[j]
                    A = axes_at(T, j - j0, gh[k], gw[k])
                    for cc in range(nb):
                        scatter_box_nhwc(G + cc * H * W, X + cc * H * W, W, 1, 1,
                                         GO + (k * C + c + cc) * PH * PW, PH, PW, &A, mode)
                continue
            memset(gscratch, 0, H * W * LANES * sizeof(floating))
            if mode != MODE_AVG:
                interleave_planes(X, H * W, nb, fscratch)
            for j in range(lo, hi):
                k = order[j]
                A = axes_at(T, j - j0, gh[k], gw[k])
                interleave_planes(GO + (k * C + c) * PH * PW, PH * PW, nb, gbuf)
                scatter_box_nhwc(gscratch, fscratch, W, LANES, LANES, gbuf, PH, PW, &A, mode)
            if assign:
                stream_deinterleaved(gscratch, H * W, nb, G, gbuf + PH * PW * LANES)
            else:
                add_deinterleaved(gscratch, H * W, nb, G)
        scratch_close(&s)
    check_scratch(failed)


# ---------------------------------------------------------------------------------------------
# gradient with respect to the boxes

cdef void box_grad_channel(const floating* plane, Py_ssize_t cs, Py_ssize_t W, const floating* g,
                           Py_ssize_t gs, Py_ssize_t PH, Py_ssize_t PW, const Axes* A, int mode,
                           double* acc) noexcept nogil:
    """Accumulate, for one channel, sum g * dv/dy, sum g * dv/dy * t_y and the same for x, where
    t is the sample's fraction across the roi (d coordinate / d roi size). ``cs``: distance between
    horizontally adjacent pixels; ``gs``: between consecutive bins of g."""
    cdef Py_ssize_t ph, pw, iy, ix, a, b, arg, iy0, iy1, ix0, ix1, gh = A.gh, gw = A.gw
    cdef double gv, v00, v01, v10, v11, dy, dx, inv_count
    cdef floating best = 0
    cdef const floating* wy0 = <const floating*>A.wy0
    cdef const floating* wy1 = <const floating*>A.wy1
    cdef const floating* wx0 = <const floating*>A.wx0
    cdef const floating* wx1 = <const floating*>A.wx1
    cdef const floating* sy = <const floating*>A.sy
    cdef const floating* sx = <const floating*>A.sx
    if gh == 0 or gw == 0:
        return
    inv_count = 1.0 / <double>(gh * gw)
    for ph in range(PH):
        for pw in range(PW):
            gv = g[(ph * PW + pw) * gs]
            if mode == MODE_AVG:
                gv = gv * inv_count
                iy0, iy1, ix0, ix1 = A.yr[2 * ph], A.yr[2 * ph + 1], A.xr[2 * pw], A.xr[2 * pw + 1]
            else:
                arg = argmax_sample(plane, cs, W, A, ph, pw, mode, &best)
                iy0, ix0 = arg // gw, arg % gw
                iy1, ix1 = iy0 + 1, ix0 + 1
                if not inside(A, ph, pw, iy0, ix0):
                    continue
            for iy in range(iy0, iy1):
                a = ph * gh + iy
                for ix in range(ix0, ix1):
                    b = pw * gw + ix
                    v00 = plane[(A.ylo[a] * W + A.xlo[b]) * cs]
                    v01 = plane[(A.ylo[a] * W + A.xhi[b]) * cs]
                    v10 = plane[(A.yhi[a] * W + A.xlo[b]) * cs]
                    v11 = plane[(A.yhi[a] * W + A.xhi[b]) * cs]
                    dy = gv * sy[a] * ((wx0[b] * v10 + wx1[b] * v11) - (wx0[b] * v00 + wx1[b] * v01))
                    dx = gv * sx[b] * (wy0[a] * (v01 - v00) + wy1[a] * (v11 - v10))
                    acc[0] += dy
                    acc[1] += dy * sample_fraction(ph, iy, gh, PH)
                    acc[2] += dx
                    acc[3] += dx * sample_fraction(pw, ix, gw, PW)


cdef void box_grad_lanes(const floating* block, Py_ssize_t W, const floating* g, Py_ssize_t PH,
                         Py_ssize_t PW, const Axes* A, double* acc) noexcept nogil:
    """Average mode box_grad_channel for LANES interleaved channels at once (vector code): block
    holds pixel (y, x) at (y * W + x) * LANES, g bin b at b * LANES."""
    cdef Py_ssize_t ph, pw, iy, ix, a, b, cc, gh = A.gh, gw = A.gw
    cdef const floating* p00
    cdef const floating* p01
    cdef const floating* p10
    cdef const floating* p11
    cdef const floating* gb
    cdef double dy, dx, ty, tx, fy, fx, inv_count
    cdef double ay[LANES]
    cdef double aty[LANES]
    cdef double ax[LANES]
    cdef double atx[LANES]
    cdef const floating* wy0 = <const floating*>A.wy0
    cdef const floating* wy1 = <const floating*>A.wy1
    cdef const floating* wx0 = <const floating*>A.wx0
    cdef const floating* wx1 = <const floating*>A.wx1
    cdef const floating* sy = <const floating*>A.sy
    cdef const floating* sx = <const floating*>A.sx
    if gh == 0 or gw == 0:
        return
    inv_count = 1.0 / <double>(gh * gw)
    for cc in range(LANES):
        ay[cc] = aty[cc] = ax[cc] = atx[cc] = 0
    for ph in range(PH):
        for pw in range(PW):
            gb = g + (ph * PW + pw) * LANES
            for iy in range(A.yr[2 * ph], A.yr[2 * ph + 1]):
                a = ph * gh + iy
                ty = sample_fraction(ph, iy, gh, PH)
                for ix in range(A.xr[2 * pw], A.xr[2 * pw + 1]):
                    b = pw * gw + ix
                    tx = sample_fraction(pw, ix, gw, PW)
                    fy = sy[a] * inv_count
                    fx = sx[b] * inv_count
                    p00 = block + (A.ylo[a] * W + A.xlo[b]) * LANES
                    p01 = block + (A.ylo[a] * W + A.xhi[b]) * LANES
                    p10 = block + (A.yhi[a] * W + A.xlo[b]) * LANES
                    p11 = block + (A.yhi[a] * W + A.xhi[b]) * LANES
                    for cc in range(LANES):
                        dy = gb[cc] * fy * ((wx0[b] * p10[cc] + wx1[b] * p11[cc]) - (wx0[b] * p00[cc] + wx1[b] * p01[cc]))
                        dx = gb[cc] * fx * (wy0[a] * (p01[cc] - p00[cc]) + wy1[a] * (p11[cc] - p10[cc]))
                        ay[cc] += dy
                        aty[cc] += dy * ty
                        ax[cc] += dx
                        atx[cc] += dx * tx
    for cc in range(LANES):
        acc[0] += ay[cc]
        acc[1] += aty[cc]
        acc[2] += ax[cc]
        acc[3] += atx[cc]


cdef void finish_box_grad(const floating[:, ::1] rois, floating[:, ::1] grad_rois, Py_ssize_t k,
                          const double* acc, Py_ssize_t PH, Py_ssize_t PW, double scale,
                          bint aligned) noexcept nogil:
    """Chain rule from the sample sums of box_grad_channel to (x1, y1, x2, y2) (conventions
    section 5). A sample at start + t * roi_size moves by scale * (1 - t) with the low corner and
    scale * t with the high one, unless the roi size was clamped to 1 (then only the low corner
    moves it)."""
    cdef floating start = 0, bin_size = 0
    cdef bint clamped_y = False, clamped_x = False
    roi_axis(rois[k, 1], rois[k, 3], scale, aligned, PH, &start, &bin_size, &clamped_y)
    roi_axis(rois[k, 0], rois[k, 2], scale, aligned, PW, &start, &bin_size, &clamped_x)
    if clamped_x:
        grad_rois[k, 0] += <floating>(scale * acc[2])
    else:
        grad_rois[k, 0] += <floating>(scale * (acc[2] - acc[3]))
        grad_rois[k, 2] += <floating>(scale * acc[3])
    if clamped_y:
        grad_rois[k, 1] += <floating>(scale * acc[0])
    else:
        grad_rois[k, 1] += <floating>(scale * (acc[0] - acc[1]))
        grad_rois[k, 3] += <floating>(scale * acc[1])


cdef void box_grad_nhwc(const floating[:, ::1] rois, floating[:, ::1] grad_rois, Py_ssize_t k,
                        const floating* image, Py_ssize_t C, Py_ssize_t W, const floating* g,
                        Py_ssize_t PH, Py_ssize_t PW, const Axes* A, double scale, bint aligned,
                        int mode) noexcept nogil:
    cdef double acc[4]
    cdef Py_ssize_t c
    acc[0] = acc[1] = acc[2] = acc[3] = 0
    for c in range(C):
        box_grad_channel(image + c, C, W, g + c, C, PH, PW, A, mode, acc)
    finish_box_grad(rois, grad_rois, k, acc, PH, PW, scale, aligned)


def backward_boxes(const floating[:, :, :, ::1] grad_out, list maps, const floating[:, ::1] rois,
                   const int64_t[::1] level, const double[::1] scales,
                   const int64_t[::1] batch_idx, const int64_t[::1] order,
                   const int64_t[::1] key_start, Py_ssize_t j0, Py_ssize_t j1,
                   const int64_t[::1] gh, const int64_t[::1] gw, _Tables t,
                   floating[:, ::1] grad_rois, bint aligned, int mode, bint channels_last,
                   const uint8_t[::1] blocks, int n_threads):
    """Add d(sum(grad_out * out)) / d(x1, y1, x2, y2) of the boxes at sorted positions j0..j1.
    NHWC: one thread per box. NCHW: one task per (level, image, block of LANES planes), read from
    channels-last scratch (``blocks[l]``) or straight from the planes, each writing its own
    partial sums per box, then added up per box in block order. Either way the result does not
    depend on the thread count."""
    cdef Py_ssize_t L = len(maps), N, C, H, W, PH, PW, j, k, q, n, c, nb, cc, lo, hi, task, l, i
    cdef Py_ssize_t nblocks, scratch_px = 0
    cdef const floating* GO = &grad_out[0, 0, 0, 0]
    cdef const TableSet* T = &t.ts
    cdef Axes A
    cdef const floating* X
    cdef double* acc
    keep = collect_maps(maps, None, channels_last, <floating*>NULL)
    cdef const Map* M = maps_of(keep)
    N = (<object>maps[0]).shape[0]
    if channels_last:
        C, PH, PW = grad_out.shape[3], grad_out.shape[1], grad_out.shape[2]
        for j in prange(j0, j1, nogil=True, schedule="dynamic", num_threads=n_threads):
            k = order[j]
            l = level[k]
            A = axes_at(T, j - j0, gh[k], gw[k])
            box_grad_nhwc(rois, grad_rois, k, <const floating*>M[l].x + batch_idx[k] * M[l].H * M[l].W * C,
                          C, M[l].W, GO + k * PH * PW * C, PH, PW, &A, scales[l], aligned, mode)
        return
    C, PH, PW = grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]
    for l in range(L):
        if blocks[l] and M[l].H * M[l].W > scratch_px:
            scratch_px = M[l].H * M[l].W
    nblocks = (C + LANES - 1) // LANES
    cdef double[::1] partial = np.zeros((j1 - j0) * nblocks * 4 + 1)
    cdef floating* scratch
    cdef floating* gbuf
    cdef Scratch s
    cdef size_t failed = 0
    cdef BlockTask bt
    with nogil, parallel(num_threads=n_threads):
        s = scratch_open(&failed, (scratch_px * LANES + 1) * sizeof(floating),
                         PH * PW * LANES * sizeof(floating))
        scratch, gbuf = <floating*>s.a, <floating*>s.b
        for task in prange(L * N * nblocks, schedule="dynamic"):
            if not s.ok:
                continue  # reported after the parallel region
            bt = block_task(task, nblocks, C, &key_start[0], j0, j1)
            l, n, c, nb, lo, hi = bt.n // N, bt.n % N, bt.c, bt.nb, bt.lo, bt.hi
            if lo >= hi:
                continue
            H, W = M[l].H, M[l].W
            X = <const floating*>M[l].x + (n * C + c) * H * W
            if blocks[l]:
                interleave_planes(X, H * W, nb, scratch)
            for j in range(lo, hi):
                k = order[j]
                q = j - j0
                A = axes_at(T, q, gh[k], gw[k])
                acc = &partial[(q * nblocks + task % nblocks) * 4]
                if mode == MODE_AVG and blocks[l]:
                    interleave_planes(GO + (k * C + c) * PH * PW, PH * PW, nb, gbuf)
                    box_grad_lanes(scratch, W, gbuf, PH, PW, &A, acc)
                    continue
                for cc in range(nb):
                    if blocks[l]:
                        box_grad_channel(scratch + cc, LANES, W, GO + (k * C + c + cc) * PH * PW,
                                         1, PH, PW, &A, mode, acc)
                    else:
                        box_grad_channel(X + cc * H * W, 1, W, GO + (k * C + c + cc) * PH * PW, 1,
                                         PH, PW, &A, mode, acc)
        scratch_close(&s)
    check_scratch(failed)
    for j in prange(j0, j1, nogil=True, schedule="static", num_threads=n_threads):
        q = j - j0
        for i in range(1, nblocks):
            for cc in range(4):
                partial[q * nblocks * 4 + cc] += partial[(q * nblocks + i) * 4 + cc]
        k = order[j]
        finish_box_grad(rois, grad_rois, k, &partial[q * nblocks * 4], PH, PW, scales[level[k]],
                        aligned)


# ---------------------------------------------------------------------------------------------
# position-sensitive RoIAlign (conventions 9.3): bin (ph, pw) of output channel c reads input
# channel (c * PH + ph) * PW + pw. Tasks own the PW input planes of one bin row of one output
# channel of one image, as in _roi_pool.pyx: those planes stay in cache across the image's boxes,
# and each gradient plane is written by one thread in box order.

cdef inline floating ps_average(const floating* plane, Py_ssize_t cs, Py_ssize_t W, const Axes* A,
                                Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    """Mean of bin (ph, pw)'s samples on one plane, summed sample by sample in the peers' order
    (samples outside the image are 0 and read nothing); an empty grid gives 0."""
    cdef Py_ssize_t iy, ix, a, b
    cdef floating s = 0
    cdef const floating* wy0 = <const floating*>A.wy0
    cdef const floating* wy1 = <const floating*>A.wy1
    cdef const floating* wx0 = <const floating*>A.wx0
    cdef const floating* wx1 = <const floating*>A.wx1
    if A.gh == 0 or A.gw == 0:
        return 0
    for iy in range(A.yr[2 * ph], A.yr[2 * ph + 1]):
        a = ph * A.gh + iy
        for ix in range(A.xr[2 * pw], A.xr[2 * pw + 1]):
            b = pw * A.gw + ix
            s = s + bilerp(wy0[a], wy1[a], wx0[b], wx1[b],
                           plane[(A.ylo[a] * W + A.xlo[b]) * cs], plane[(A.ylo[a] * W + A.xhi[b]) * cs],
                           plane[(A.yhi[a] * W + A.xlo[b]) * cs], plane[(A.yhi[a] * W + A.xhi[b]) * cs])
    return s / <floating>(A.gh * A.gw)


cdef inline void ps_scatter(floating* gplane, Py_ssize_t cs, Py_ssize_t W, const Axes* A,
                            Py_ssize_t ph, Py_ssize_t pw, floating g) noexcept nogil:
    """Each sample of bin (ph, pw) inside the image sends g * weight / count to its 4 taps."""
    cdef Py_ssize_t iy, ix, a, b
    cdef floating count
    cdef const floating* wy0 = <const floating*>A.wy0
    cdef const floating* wy1 = <const floating*>A.wy1
    cdef const floating* wx0 = <const floating*>A.wx0
    cdef const floating* wx1 = <const floating*>A.wx1
    if A.gh == 0 or A.gw == 0:
        return
    count = <floating>(A.gh * A.gw)
    for iy in range(A.yr[2 * ph], A.yr[2 * ph + 1]):
        a = ph * A.gh + iy
        for ix in range(A.xr[2 * pw], A.xr[2 * pw + 1]):
            b = pw * A.gw + ix
            gplane[(A.ylo[a] * W + A.xlo[b]) * cs] += g * (wy0[a] * wx0[b]) / count
            gplane[(A.ylo[a] * W + A.xhi[b]) * cs] += g * (wy0[a] * wx1[b]) / count
            gplane[(A.yhi[a] * W + A.xlo[b]) * cs] += g * (wy1[a] * wx0[b]) / count
            gplane[(A.yhi[a] * W + A.xhi[b]) * cs] += g * (wy1[a] * wx1[b]) / count


def ps_forward(const floating[:, :, :, ::1] x, const int64_t[::1] order,
               const int64_t[::1] img_start, Py_ssize_t j0, Py_ssize_t j1,
               const int64_t[::1] gh, const int64_t[::1] gw, _Tables t,
               floating[:, :, :, ::1] out, bint channels_last, int n_threads,
               const int64_t[::1] visit=None):
    """Position-sensitive pooling of the boxes at sorted positions j0..j1 into ``out`` (see
    ps_pool), visiting them in the order ``visit`` (as forward)."""
    cdef Shape s = shape_of(x.shape, out.shape, channels_last)
    cdef BoxRun R
    cdef Py_ssize_t failed
    R.order, R.key_start, R.gh, R.gw, R.j0, R.j1 = &order[0], &img_start[0], &gh[0], &gw[0], j0, j1
    R.visit = positions(visit, j0, j1)
    with nogil:
        failed = ps_pool(&x[0, 0, 0, 0], &out[0, 0, 0, 0], &s, &R, &t.ts, n_threads)
    check_scratch(failed)


# the position-sensitive NCHW loop order: -1 by the cost model, 0 planes, 1 blocks (set by
# roialign_cy._cpu.force_ps_blocks)
cdef int _ps_forced = -1


def _set_ps_forced(int value):
    global _ps_forced
    _ps_forced = value


cdef inline double ps_reads(const BoxRun* R, const Shape* s) noexcept nogil:
    """Reads of ps_roi_align's plane loops: a sample per output channel and bin."""
    cdef double samples = 0
    cdef Py_ssize_t j, k
    for j in range(R.j0, R.j1):
        k = R.order[j]
        samples += <double>R.gh[k] * R.gw[k]
    return samples * s.PH * s.PW * s.Co


cdef Py_ssize_t ps_pool(const floating* X, floating* O, const Shape* s, const BoxRun* R,
                        const TableSet* T, int n_threads) noexcept nogil:
    """Pool the boxes of ``R``: the plane loops, or on NCHW maps the block loops when they pay
    (ps_blocks_pay). Returns 0, or the bytes of per-thread scratch that could not be allocated."""
    if not s.channels_last and ps_blocks_pay(_ps_forced, ps_reads(R, s),
                                             PS_ALIGN_MIN_READS_PER_PIXEL, s.N, s.C, s.H, s.W,
                                             sizeof(floating)):
        return ps_blocks(<floating*>X, O, s, R, T, n_threads, False)
    ps_pool_planes(X, O, s, R, T, n_threads)
    return 0


cdef void ps_pool_planes(const floating* X, floating* O, const Shape* s, const BoxRun* R,
                         const TableSet* T, int n_threads) noexcept nogil:
    """One task per (image, output channel c, bin row ph, run of the image's boxes), which owns
    the PW input planes of that row: few enough to stay in cache, and a box's tables and outputs
    are visited once per PW bins. (R's level and batch_idx are not read.)"""
    cdef Py_ssize_t N = s.N, Co = s.Co, PH = s.PH, PW = s.PW, cs = s.C if s.channels_last else 1
    cdef Py_ssize_t runs, task, n, co, r, lo, hi, j, k, v, ph, pw, a, b, j0 = R.j0, j1 = R.j1
    cdef Axes A
    # split each image's boxes into runs when there are fewer groups than 4 tasks per thread
    runs = max(1, min(j1 - j0, (4 * n_threads + N * Co * PH - 1) // (N * Co * PH)))
    for task in prange(N * Co * PH * runs, schedule="dynamic", num_threads=n_threads):
        n = task // (Co * PH * runs)
        co = (task // (PH * runs)) % Co
        ph = (task // runs) % PH
        r = task % runs
        lo = max(R.key_start[n], j0)
        hi = min(R.key_start[n + 1], j1)
        if hi <= lo:
            continue
        a = lo + (hi - lo) * r // runs
        b = lo + (hi - lo) * (r + 1) // runs
        for v in range(a, b):
            j = visited_at(R.visit, j0, v)
            k = R.order[j]
            A = axes_at(T, j - j0, R.gh[k], R.gw[k])
            for pw in range(PW):
                O[out_index(s, k, co, ph, pw)] = ps_average(
                    X + plane_offset(s, n, (co * PH + ph) * PW + pw), cs, s.W, &A, ph, pw)


cdef void ps_bin_lanes(const floating* block, Py_ssize_t W, const Axes* A, Py_ssize_t ph,
                       Py_ssize_t pw, Py_ssize_t n_lanes, floating* o,
                       Py_ssize_t o_stride) noexcept nogil:
    """ps_average of bin (ph, pw) on each lane of a channels-last block (the same operations in
    the same order, lane by lane), into o[c * o_stride] for c < n_lanes."""
    cdef Py_ssize_t c
    cdef floating acc[LANES]
    if A.gh == 0 or A.gw == 0:
        for c in range(n_lanes):
            o[c * o_stride] = 0
        return
    sum_bin_lanes(block, W, A, ph, pw, acc)
    for c in range(n_lanes):
        o[c * o_stride] = acc[c] / <floating>(A.gh * A.gw)


cdef void ps_spread_lanes(floating* gblock, Py_ssize_t W, const Axes* A, Py_ssize_t ph,
                          Py_ssize_t pw, Py_ssize_t n_lanes, const floating* g,
                          Py_ssize_t g_stride) noexcept nogil:
    """ps_scatter of bin (ph, pw) on each lane of a channels-last gradient block, lane c sending
    g[c * g_stride] (the same operations in the same order, lane by lane)."""
    cdef Py_ssize_t iy, ix, a, b, c
    cdef floating gl[LANES]
    cdef floating count, w00, w01, w10, w11
    cdef floating* p00
    cdef floating* p01
    cdef floating* p10
    cdef floating* p11
    cdef const floating* wy0 = <const floating*>A.wy0
    cdef const floating* wy1 = <const floating*>A.wy1
    cdef const floating* wx0 = <const floating*>A.wx0
    cdef const floating* wx1 = <const floating*>A.wx1
    if A.gh == 0 or A.gw == 0:
        return
    for c in range(LANES):
        gl[c] = g[c * g_stride] if c < n_lanes else 0
    count = <floating>(A.gh * A.gw)
    for iy in range(A.yr[2 * ph], A.yr[2 * ph + 1]):
        a = ph * A.gh + iy
        for ix in range(A.xr[2 * pw], A.xr[2 * pw + 1]):
            b = pw * A.gw + ix
            w00, w01 = wy0[a] * wx0[b], wy0[a] * wx1[b]
            w10, w11 = wy1[a] * wx0[b], wy1[a] * wx1[b]
            p00 = gblock + (A.ylo[a] * W + A.xlo[b]) * LANES
            p01 = gblock + (A.ylo[a] * W + A.xhi[b]) * LANES
            p10 = gblock + (A.yhi[a] * W + A.xlo[b]) * LANES
            p11 = gblock + (A.yhi[a] * W + A.xhi[b]) * LANES
            for c in range(LANES):
                p00[c] += gl[c] * w00 / count
            for c in range(LANES):
                p01[c] += gl[c] * w01 / count
            for c in range(LANES):
                p10[c] += gl[c] * w10 / count
            for c in range(LANES):
                p11[c] += gl[c] * w11 / count


cdef Py_ssize_t ps_blocks(floating* maps, floating* outs, const Shape* s, const BoxRun* R,
                          const TableSet* T, int n_threads, bint backward,
                          bint assign=False) noexcept nogil:
    """NCHW: one task per (image, bin, block of LANES output channels). Bin (ph, pw) of output
    channels c..c+LANES reads planes PH * PW apart: the task copies them to channels-last scratch
    (about 1 MB on an R-FCN map, which stays in L2). The forward (``maps``: the features, read
    only; ``outs``: the output) pools that bin of every box of the image from it with vector code
    over the channels. The gradient (``maps``: the feature gradient; ``outs``: the output
    gradient, read only) adds the bin's terms of the image's boxes, in box order, to the copy of
    its gradient planes and copies it back: each pixel gets the additions of the plane loops in
    their order (the same bits, also when the boxes come in several runs). Returns 0, or the
    bytes of per-thread scratch that could not be allocated. ``assign`` (gradient): the
    gradient holds anything and is written over, the copy starting from zero and streamed back
    (no zero-fill before the call, no read of the gradient); an image with no box zeroes its
    planes."""
    cdef Py_ssize_t Co = s.Co, PW = s.PW, H = s.H, W = s.W, bins = s.PH * s.PW
    cdef Py_ssize_t task, v, j, k
    cdef floating* scratch = NULL  # (assigned per thread in the parallel region)
    cdef floating* staging = NULL
    cdef Axes A
    cdef Scratch sc
    cdef PsTask b
    cdef size_t failed = 0
    with parallel(num_threads=n_threads):
        sc = scratch_open(&failed, H * W * LANES * sizeof(floating),
                          STREAM_PIXELS * LANES * sizeof(floating) if assign else 0)
        scratch, staging = <floating*>sc.a, <floating*>sc.b
        for task in prange(ps_tasks(s), schedule="dynamic"):
            b = ps_task(task, s, R.key_start, R.j0, R.j1)
            if not sc.ok or not ps_begin(&b, s, maps, scratch, assign):
                continue  # (a failed scratch is reported after the parallel region)
            for v in range(b.lo, b.hi):
                # the gradient keeps the image order, which its sums follow
                j = v if backward else visited_at(R.visit, R.j0, v)
                k = R.order[j]
                A = axes_at(T, j - R.j0, R.gh[k], R.gw[k])
                if backward:
                    ps_spread_lanes(scratch, W, &A, b.q // PW, b.q % PW, b.nb,
                                    outs + (k * Co + b.c0) * bins + b.q, bins)
                else:
                    ps_bin_lanes(scratch, W, &A, b.q // PW, b.q % PW, b.nb,
                                 outs + (k * Co + b.c0) * bins + b.q, bins)
            if backward:
                ps_copy_back(scratch, &b, s, maps, staging)
        scratch_close(&sc)
    return failed


def ps_backward(const floating[:, :, :, ::1] grad_out, floating[:, :, :, ::1] grad,
                const int64_t[::1] order, const int64_t[::1] img_start, Py_ssize_t j0,
                Py_ssize_t j1, const int64_t[::1] gh, const int64_t[::1] gw, _Tables t,
                bint channels_last, int n_threads, bint assign=False):
    """Add the feature gradient of the boxes at sorted positions j0..j1 into ``grad``: one task
    per (image, output channel, bin row), owning its PW input planes; each plane receives its
    terms in box order (bit-identical for any thread count). ``assign``: ``grad`` holds anything
    and is written over (the block loops write it; the plane loops zero it first)."""
    cdef Shape s = shape_of(grad.shape, grad_out.shape, channels_last)
    cdef Py_ssize_t N = s.N, Co = s.Co, PH = s.PH, PW = s.PW, cs = s.C if channels_last else 1
    cdef Py_ssize_t task, n, co, j, k, ph, pw, failed
    cdef const TableSet* T = &t.ts
    cdef Axes A
    cdef BoxRun R
    cdef const floating* G = &grad_out[0, 0, 0, 0]
    cdef floating* GX = &grad[0, 0, 0, 0]
    R.order, R.key_start, R.gh, R.gw, R.j0, R.j1 = &order[0], &img_start[0], &gh[0], &gw[0], j0, j1
    R.visit = NULL
    if not channels_last and ps_blocks_pay(_ps_forced, ps_reads(&R, &s),
                                           PS_ALIGN_MIN_READS_PER_PIXEL, s.N, s.C, s.H, s.W,
                                           sizeof(floating)):
        with nogil:
            failed = ps_blocks(GX, <floating*>G, &s, &R, T, n_threads, True, assign)
        check_scratch(failed)
        return
    if assign:
        zero_fill(np.asarray(grad).reshape(-1).view(np.uint8), n_threads)
    for task in prange(N * Co * PH, nogil=True, schedule="dynamic", num_threads=n_threads):
        n = task // (Co * PH)
        co = (task // PH) % Co
        ph = task % PH
        for j in range(max(img_start[n], j0), min(img_start[n + 1], j1)):
            k = order[j]
            A = axes_at(T, j - j0, gh[k], gw[k])
            for pw in range(PW):
                ps_scatter(GX + plane_offset(&s, n, (co * PH + ph) * PW + pw), cs, s.W, &A, ph, pw,
                           G[out_index(&s, k, co, ph, pw)])


# ---------------------------------------------------------------------------------------------
# the cost model (_cost.pxd), for the Python driver

INTERLEAVE_MIN_SAMPLES_PER_PIXEL = _INTERLEAVE_MIN
SCRATCH_BYTES_PER_THREAD = SCRATCH_BYTES


def work_threads(int wanted, double n_outputs, double sampling_ratio):
    return threads_for_work(wanted, n_outputs, sampling_ratio)


def table_threads(int n_threads, Py_ssize_t n_boxes):
    return threads_for_tables(n_threads, n_boxes)


def use_blocks(double samples, Py_ssize_t c, Py_ssize_t h, Py_ssize_t w, Py_ssize_t n,
               Py_ssize_t itemsize, Py_ssize_t tasks, int n_threads, bint forward):
    """RoIAlign's NCHW loop order (blocks_pay): the scratch holds one block of the map."""
    return blocks_pay(samples, c, h, w, n, h * w * LANES * itemsize, tasks, n_threads, forward)


# ---------------------------------------------------------------------------------------------
# one-pass small calls: the arguments of a plain call with few boxes checked (_calls.pxd), its
# boxes planned and pooled in one compiled pass, with no Python-level step (the general path
# costs tens of microseconds of small numpy operations per call, more than a small call's
# kernels)

cdef enum:
    # the one-pass call builds at most this many table entries, and takes grids of at most
    # this many samples per bin (sums of them stay exact in int64)
    SMALL_TABLE_ENTRIES = 1 << 20
    SMALL_SAMPLES = 1 << 30

cdef object _NDARRAY = np.ndarray
cdef object _F32 = np.dtype(np.float32)
cdef object _F64 = np.dtype(np.float64)


def forward_small(op, features, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                  mode, layout, n_threads, max_samples_per_bin, allow_inverted):
    """``roi_align`` (op "roi_align") or ``ps_roi_align`` ("ps_roi_align"; aligned and mode as it
    fixes them) of a plain call, or None for any other.

    The plain call: C-contiguous numpy features of a native float dtype, (K, 5) boxes of the same
    dtype (any strides), no batch_indices or out, every scalar of its plain Python type and valid
    (_calls.pxd), every box valid, at most SMALL_BOXES boxes. Anything else, valid or not, returns
    None: the general path then checks it, with its messages, and runs it. The result is the
    general path's, bit for bit: the same grid rule, tables, cost model and kernels."""
    # (written through the pointers of the checks: zero first for Cython's flow analysis)
    cdef Py_ssize_t sr = 0, limit = 0
    cdef Plain c
    # only the dtype's pair is assigned; None so that Cython's flow analysis sees both assigned
    cdef const float[:, :, :, ::1] xf = None
    cdef const float[:, :] bf = None
    cdef const double[:, :, :, ::1] xd = None
    cdef const double[:, :] bd = None
    if (not plain_call(&c, features, boxes, output_size, spatial_scale, layout, n_threads,
                       allow_inverted, _NDARRAY, _F32, _F64)
            or not plain_int(sampling_ratio, -1, SMALL_SAMPLES, &sr)
            or not plain_int(max_samples_per_bin, 1, SMALL_SAMPLES, &limit)
            or not plain_flag(aligned)
            or type(mode) is not str or (op != "roi_align" and op != "ps_roi_align")):
        return None
    code = MODES.get(mode)
    if code is None:
        return None
    cdef int mode_code = code, wanted = effective_n_threads(n_threads)
    cdef bint is_aligned = aligned is True, position_sensitive = op == "ps_roi_align"
    try:  # C-contiguous rank-4 features, rank-2 boxes (what the memoryviews accept)
        if c.size == 4:
            xf, bf = features, boxes
        else:
            xd, bd = features, boxes
    except (ValueError, BufferError):
        return None
    if c.size == 4:
        return small_forward(xf, bf, &c, sr, is_aligned, mode_code, wanted, <double>limit,
                             position_sensitive)
    return small_forward(xd, bd, &c, sr, is_aligned, mode_code, wanted, <double>limit,
                         position_sensitive)


cdef object small_forward(const floating[:, :, :, ::1] x, const floating[:, :] b, const Plain* c,
                          Py_ssize_t sr, bint aligned, int mode, int wanted, double limit,
                          bint position_sensitive):
    cdef Py_ssize_t PH = c.ph, PW = c.pw
    cdef double scale = c.scale
    cdef bint channels_last = c.channels_last, check_order = c.check_order
    cdef Sizes z
    if not small_sizes(&z, b.shape, 4, x.shape, channels_last):
        return None
    cdef Py_ssize_t K = z.K, N = z.N, C = z.C, H = z.H, W = z.W, k
    cdef Py_ssize_t Co = C // (PH * PW) if position_sensitive else C
    if <double>K * C * PH * PW > <double>SMALL_TABLE_ENTRIES * SMALL_TABLE_ENTRIES:
        return None  # (an output that large is the general path's MemoryError)
    if position_sensitive and C % (PH * PW):
        return None
    # per-box arrays in one block: batch, gh, gw, level (0), order, key_start (N + 1), offsets
    # (2 (K + 1)), the visiting order, then the (K, 4) coordinates
    cdef int64_t* block = small_block(8 * K + N + 3 + 4 * K)
    cdef int64_t* batch = block
    cdef int64_t* gh = block + K
    cdef int64_t* gw = block + 2 * K
    cdef int64_t* level = block + 3 * K
    cdef int64_t* order = block + 4 * K
    cdef int64_t* key_start = block + 5 * K
    cdef Py_ssize_t* yoff = <Py_ssize_t*>(key_start + N + 1)
    cdef Py_ssize_t* xoff = yoff + K + 1
    cdef int64_t* visit = <int64_t*>(xoff + K + 1)
    cdef floating* rois = <floating*>(visit + K)
    cdef Py_ssize_t* ints = NULL
    cdef char* weights = NULL
    cdef int64_t ny = 0, nx = 0, grid_samples = 0
    cdef floating start = 0, bin_size = 0, size
    cdef bint clamped = False, ok
    with nogil:
        ok = scan_boxes(b, N, check_order, rois, batch)
        for k in range(K if ok else 0):
            size = roi_axis(rois[4 * k + 1], rois[4 * k + 3], scale, aligned, PH, &start,
                            &bin_size, &clamped)
            gh[k] = grid_size(sr, size, PH)
            size = roi_axis(rois[4 * k], rois[4 * k + 2], scale, aligned, PW, &start, &bin_size,
                            &clamped)
            gw[k] = grid_size(sr, size, PW)
            if <double>gh[k] * gw[k] > limit or gh[k] > limit or gw[k] > limit:
                ok = False  # the general path's bound check says which box and why
                break
            if <double>ny + <double>gh[k] * PH + <double>nx + <double>gw[k] * PW > SMALL_TABLE_ENTRIES:
                ok = False
                break
            ny += gh[k] * PH
            nx += gw[k] * PW
            grid_samples += gh[k] * gw[k]
        if ok:
            sort_by_image(batch, K, N, order, key_start)
            if not row_order(order, key_start, N, 0, K, rois, visit):
                visit = NULL  # (position order: the same outputs)
            for k in range(K):
                yoff[k + 1] = yoff[k] + gh[order[k]] * PH
                xoff[k + 1] = xoff[k] + gw[order[k]] * PW
            ints = <Py_ssize_t*>calloc(table_ints(ny, nx, K, PH, PW), sizeof(Py_ssize_t))
            weights = <char*>calloc(table_weights(ny, nx), sizeof(floating))
    out = None
    if ok and ints != NULL and weights != NULL:
        out = small_output(K, Co, PH, PW, channels_last,
                           np.float32 if floating is float else np.float64,
                           sizeof(floating), np.empty, host_array)
    if out is None:  # declined, or past memory: the general path checks it, or says so
        free(block)
        free(ints)
        free(weights)
        return None
    cdef int n_threads = threads_for_work(wanted, <double>K * Co * PH * PW, sr)
    cdef uint8_t blocks = not channels_last and not position_sensitive and blocks_pay(
        <double>grid_samples * PH * PW, C, H, W, N, H * W * LANES * sizeof(floating),
        N * ((C + LANES - 1) // LANES), n_threads, True)
    cdef floating[:, :, :, ::1] o = out
    cdef TableSet T
    cdef Map M
    cdef BoxRun R
    cdef Shape shape = shape_of(x.shape, o.shape, channels_last)
    cdef double scales[1]
    cdef int64_t extent[2]
    cdef Py_ssize_t failed = 0
    M.x, M.g, M.H, M.W = <const char*>&x[0, 0, 0, 0], NULL, H, W
    R.level, R.batch_idx, R.order, R.key_start = level, batch, order, key_start
    R.gh, R.gw, R.j0, R.j1, R.visit = gh, gw, 0, K, visit
    scales[0], extent[0], extent[1] = scale, H, W
    with nogil:
        lay_out_tables(&T, ints, weights, yoff, xoff, K, PH, PW, sizeof(floating))
        fill_tables(rois, order, 0, K, gh, gw, level, &extent[0], &extent[1], scales, aligned,
                    &T, threads_for_tables(n_threads, K))
        if position_sensitive:
            failed = ps_pool(&x[0, 0, 0, 0], &o[0, 0, 0, 0], &shape, &R, &T, n_threads)
        else:
            failed = pool_boxes(&M, 1, N, C, PH, PW, &R, &T, &o[0, 0, 0, 0], mode,
                                channels_last, &blocks, n_threads)
    free(block)
    free(ints)
    free(weights)
    check_scratch(failed)
    return out

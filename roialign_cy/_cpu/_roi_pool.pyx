"""RoIPool and position-sensitive RoIPool on the CPU: forward and feature gradient over integer
pixel bins (docs/conventions.md, sections 8 and 9.2).

A box is described by the pixel windows of its bins, rows [wy[2 ph], wy[2 ph + 1]) and columns
[wx[2 pw], wx[2 pw + 1]) (``windows``), computed once per box and shared by every channel, the
forward and the gradient.

Tasks own input planes: a task holds one plane of image n (roi_pool) or the PW planes of one bin
row of one output channel (ps_roi_pool) and visits the boxes of image n in their fixed order, so the planes
stay in cache across the boxes, and each gradient plane is written by one thread in one order:
bit-identical for any thread count. The forward may also split an image's boxes into runs (its
outputs are disjoint), so that few planes still keep every thread busy. Layouts differ only in
strides: a plane's pixels are ``cs`` elements apart (1 in NCHW, C in NHWC). roi_pool on NCHW maps
with many boxes takes the block loops at the end of this file instead.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport ceil, floor, round
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

import numpy as np

from .._buffers import host_array

from ._geometry cimport takes_max
from ._lanes cimport (LANES, STREAM_PIXELS, BlockTask, PsTask, Scratch, add_deinterleaved,
                      block_task, check_scratch, deinterleave_bins, interleave_planes, ps_begin,
                      ps_copy_back, ps_task, ps_tasks, scratch_close, scratch_open, stream)
from ._planes cimport Shape, out_index, plane_offset, shape_of
from ._cost cimport (PS_POOL_GRAD_MIN_READS_PER_PIXEL, PS_POOL_MIN_READS_PER_PIXEL, SCRATCH_BYTES,
                     blocks_pay, ps_blocks_pay, streams_output, threads_for_tables,
                     threads_for_work)
from ._calls cimport (Plain, Sizes, plain_call, positions, row_order, scan_boxes, small_block,
                      small_output, small_sizes, sort_by_image, visited_at)
from ._openmp import effective_n_threads, zero_fill

cdef enum:
    OP_ROI_POOL = 0
    OP_PS_ROI_POOL = 1
    # forward tasks wanted per thread (runs of boxes split an image's planes when too few)
    TASKS_PER_THREAD = 4
    # ps_roi_pool bins summed side by side (mean_row)
    ROW_CHAINS = 8

OPS = {"roi_pool": OP_ROI_POOL, "ps_roi_pool": OP_PS_ROI_POOL}
# channels of one block of the NCHW roi_pool block loops, for the driver's cost model
BLOCK_CHANNELS = LANES

cdef extern from *:
    """
    /* corners and bin ends saturate this far out: no map is that large, and the integer
       arithmetic of a window can then never overflow */
    #define ROIALIGN_PIXEL_LIMIT ((int64_t)1 << 60)
    """
    int64_t PIXEL_LIMIT "ROIALIGN_PIXEL_LIMIT"


cdef inline int64_t to_pixel(double v) noexcept nogil:
    # a float-to-integer cast out of range is undefined: saturate first (inf included); NaN is
    # a zero corner times a scale past the dtype's range (0 x inf), which is 0
    if v != v:
        return 0
    if v >= PIXEL_LIMIT:
        return PIXEL_LIMIT
    if v <= -PIXEL_LIMIT:
        return -PIXEL_LIMIT
    return <int64_t>v


cdef inline int64_t clip(int64_t v, int64_t top) noexcept nogil:
    return 0 if v < 0 else (top if v > top else v)


cdef void axis_windows(floating lo_corner, floating hi_corner, floating scale, Py_ssize_t pooled,
                       int64_t grow, int64_t top, int64_t* win) noexcept nogil:
    """Bin windows along one axis (conventions 8.1-8.3): corners rounded half away from zero from
    a product in the dtype, size at least 1, bin ends floor / ceil in the dtype, clipped to
    [0, top]."""
    cdef int64_t start = to_pixel(round(lo_corner * scale))
    cdef int64_t size = to_pixel(round(hi_corner * scale)) - start + grow
    cdef floating bin_size
    cdef Py_ssize_t p
    if size < 1:
        size = 1
    bin_size = <floating>size / <floating>pooled
    for p in range(pooled):
        win[2 * p] = clip(to_pixel(floor(<floating>p * bin_size)) + start, top)
        win[2 * p + 1] = clip(to_pixel(ceil(<floating>(p + 1) * bin_size)) + start, top)


def windows(const floating[:, ::1] rois, const int64_t[::1] order, Py_ssize_t H, Py_ssize_t W,
            Py_ssize_t PH, Py_ssize_t PW, double spatial_scale, int op, bint image_edge,
            int n_threads):
    """The bin windows of every box, row j for the box at sorted position j: (K, 2 PH + 2 PW)
    int64, the PH row windows then the PW column windows. ps_roi_pool clips to [0, H - 1] unless
    ``image_edge`` (torchvision's forward, conventions 9.2)."""
    cdef Py_ssize_t K = order.shape[0], j, k
    cdef int64_t grow = 1 if op == OP_ROI_POOL else 0
    cdef int64_t top_h = H if op == OP_ROI_POOL or image_edge else H - 1
    cdef int64_t top_w = W if op == OP_ROI_POOL or image_edge else W - 1
    # torchvision casts spatial_scale to the dtype: the corner product is formed there
    cdef floating scale = <floating>spatial_scale
    table = np.empty((K, 2 * (PH + PW)), np.int64)
    cdef int64_t[:, ::1] win = table
    if K == 0:
        return table
    for j in prange(K, nogil=True, schedule="static", num_threads=n_threads):
        k = order[j]
        axis_windows(rois[k, 1], rois[k, 3], scale, PH, grow, top_h, &win[j, 0])
        axis_windows(rois[k, 0], rois[k, 2], scale, PW, grow, top_w, &win[j, 2 * PH])
    return table


cdef extern from *:
    """
    /* The largest pixel of a window, in C with four running maxima: one running maximum is a
       chain of dependent compares (several cycles per pixel), four overlap. Each keeps the first
       of equal values, but +0 and -0 are equal and the four could end on another one than a
       single scan: a zero maximum is scanned again in order, so the bits are a single scan's.
       NaN is kept aside: a window with one is NaN (numpy.max). */
    #define ROI_POOL_MAX_WINDOW(T)                                                              \
    static inline T roi_pool_max_window_##T(const T* plane, Py_ssize_t cs, Py_ssize_t W,       \
                                            int64_t y0, int64_t y1, int64_t x0, int64_t x1) {  \
        T m0 = plane[(y0 * W + x0) * cs], m1 = m0, m2 = m0, m3 = m0;                           \
        int nan = 0;                                                                           \
        for (int64_t y = y0; y < y1; y++) {                                                    \
            const T* r = plane + y * W * cs;                                                   \
            int64_t x = x0;                                                                    \
            for (; x + 4 <= x1; x += 4) {                                                      \
                T a = r[x * cs], b = r[(x + 1) * cs], c = r[(x + 2) * cs], d = r[(x + 3) * cs]; \
                m0 = a > m0 ? a : m0; m1 = b > m1 ? b : m1;                                    \
                m2 = c > m2 ? c : m2; m3 = d > m3 ? d : m3;                                    \
                nan |= (a != a) | (b != b) | (c != c) | (d != d);                              \
            }                                                                                  \
            for (; x < x1; x++) { T a = r[x * cs]; m0 = a > m0 ? a : m0; nan |= a != a; }      \
        }                                                                                      \
        if (nan) return (T)NAN;                                                                \
        m0 = m1 > m0 ? m1 : m0; m0 = m2 > m0 ? m2 : m0; m0 = m3 > m0 ? m3 : m0;                \
        if (m0 == 0) {  /* which zero: the first one in row-major order */                    \
            for (int64_t y = y0; y < y1; y++)                                                  \
                for (int64_t x = x0; x < x1; x++)                                              \
                    if (plane[(y * W + x) * cs] == 0) return plane[(y * W + x) * cs];          \
        }                                                                                      \
        return m0;                                                                             \
    }
    ROI_POOL_MAX_WINDOW(float)
    ROI_POOL_MAX_WINDOW(double)
    """
    float max_window_f "roi_pool_max_window_float"(const float*, Py_ssize_t, Py_ssize_t, int64_t,
                                                   int64_t, int64_t, int64_t) noexcept nogil
    double max_window_d "roi_pool_max_window_double"(const double*, Py_ssize_t, Py_ssize_t,
                                                     int64_t, int64_t, int64_t,
                                                     int64_t) noexcept nogil


cdef inline floating max_window(const floating* plane, Py_ssize_t cs, Py_ssize_t W, int64_t y0,
                                int64_t y1, int64_t x0, int64_t x1) noexcept nogil:
    """Largest pixel of a non-empty window; NaN if it has one (numpy.max)."""
    if floating is float:
        return max_window_f(plane, cs, W, y0, y1, x0, x1)
    else:
        return max_window_d(plane, cs, W, y0, y1, x0, x1)


cdef inline Py_ssize_t argmax_window(const floating* plane, Py_ssize_t cs, Py_ssize_t W,
                                     int64_t y0, int64_t y1, int64_t x0,
                                     int64_t x1) noexcept nogil:
    """Pixel offset y * W + x of the first maximum of a non-empty window (the first NaN)."""
    cdef Py_ssize_t y, x, arg = y0 * W + x0
    cdef floating v, m = plane[arg * cs]
    for y in range(y0, y1):
        for x in range(x0, x1):
            v = plane[(y * W + x) * cs]
            if takes_max(v, m, False):
                m = v
                arg = y * W + x
    return arg


cdef inline floating mean_window(const floating* plane, Py_ssize_t cs, Py_ssize_t W, int64_t y0,
                                 int64_t y1, int64_t x0, int64_t x1) noexcept nogil:
    """Mean of a non-empty window, summed in row-major order as the peers sum."""
    cdef Py_ssize_t y, x
    cdef floating s = 0
    for y in range(y0, y1):
        for x in range(x0, x1):
            s = s + plane[(y * W + x) * cs]
    return s / <floating>((y1 - y0) * (x1 - x0))


cdef inline void pool_box(const floating* plane, Py_ssize_t cs, floating* O, int32_t* AM,
                          const Shape* s, Py_ssize_t k, Py_ssize_t ci, const int64_t* wy,
                          const int64_t* wx, int op, Py_ssize_t c, Py_ssize_t ph,
                          Py_ssize_t pw) noexcept nogil:
    """Every output of box k that reads plane ci: PH x PW maxima (roi_pool; with their arg-max
    pixels into AM unless NULL), or the one bin (ph, pw) of output channel c that ci holds
    (ps_roi_pool)."""
    cdef floating v
    cdef Py_ssize_t i
    cdef int64_t arg
    if op == OP_ROI_POOL:
        for ph in range(s.PH):
            for pw in range(s.PW):
                v, arg = 0, -1  # an empty bin gives 0 and sends no gradient
                if wy[2 * ph + 1] > wy[2 * ph] and wx[2 * pw + 1] > wx[2 * pw]:
                    if AM == NULL:
                        v = max_window(plane, cs, s.W, wy[2 * ph], wy[2 * ph + 1], wx[2 * pw],
                                       wx[2 * pw + 1])
                    else:
                        arg = argmax_window(plane, cs, s.W, wy[2 * ph], wy[2 * ph + 1],
                                            wx[2 * pw], wx[2 * pw + 1])
                        v = plane[arg * cs]
                i = out_index(s, k, ci, ph, pw)
                O[i] = v
                if AM != NULL:
                    AM[i] = <int32_t>arg
        return
    v = 0
    if wy[2 * ph + 1] > wy[2 * ph] and wx[2 * pw + 1] > wx[2 * pw]:
        v = mean_window(plane, cs, s.W, wy[2 * ph], wy[2 * ph + 1], wx[2 * pw], wx[2 * pw + 1])
    O[out_index(s, k, c, ph, pw)] = v


def forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
            const int64_t[:, ::1] win, const int64_t[::1] order, const int64_t[::1] img_start,
            int op, bint channels_last, int n_threads, int32_t[:, :, :, ::1] argmax=None,
            const int64_t[::1] visit=None):
    """Pool every box (windows ``win``, sorted by image: ``img_start``) into ``out`` (see
    pool_planes), visiting them in the order ``visit`` (positions, as _roi_align.forward; None:
    in position order); ``argmax`` (roi_pool, optional, shaped like ``out``) receives each
    bin's arg-max pixel y * W + x, -1 for an empty bin."""
    cdef Shape s = shape_of(x.shape, out.shape, channels_last)
    cdef int32_t* AM = NULL if argmax is None else &argmax[0, 0, 0, 0]
    cdef const int64_t* V = positions(visit, 0, order.shape[0])
    cdef Py_ssize_t failed
    with nogil:
        failed = pool_planes(&x[0, 0, 0, 0], &out[0, 0, 0, 0], AM, &s, &win[0, 0], win.shape[1],
                             &order[0], V, &img_start[0], order.shape[0], op, n_threads)
    check_scratch(failed)


# ps_roi_pool's NCHW loop order: -1 by the cost model, 0 planes, 1 blocks (set by
# roialign_cy._cpu.force_ps_blocks)
cdef int _ps_forced = -1


def _set_ps_forced(int value):
    global _ps_forced
    _ps_forced = value


cdef inline bint takes_ps_blocks(const Shape* s, const int64_t* wt, Py_ssize_t row,
                                 Py_ssize_t K, Py_ssize_t itemsize, bint forward) noexcept nogil:
    """Whether ps_roi_pool (``forward``, or its gradient) on these windows takes the block loops
    (ps_blocks_pay, counting a read per window pixel and output channel)."""
    cdef double reads = 0
    cdef Py_ssize_t q
    if s.channels_last:
        return False
    for q in range(K):
        reads += (<double>window_extent(wt + q * row, s.PH)
                  * window_extent(wt + q * row + 2 * s.PH, s.PW))
    return ps_blocks_pay(_ps_forced, reads * s.Co, PS_POOL_MIN_READS_PER_PIXEL if forward
                         else PS_POOL_GRAD_MIN_READS_PER_PIXEL, s.N, s.C, s.H, s.W, itemsize)


cdef Py_ssize_t pool_planes(const floating* X, floating* O, int32_t* AM, const Shape* s,
                            const int64_t* wt, Py_ssize_t row, const int64_t* order,
                            const int64_t* visit, const int64_t* img_start, Py_ssize_t K, int op,
                            int n_threads) noexcept nogil:
    """A task owns a group of planes of one image: one plane (roi_pool), or the PW planes of one
    bin row of an output channel (ps_roi_pool: they stay in L2, and a box's outputs of the row
    are written together), and a run of the image's boxes (``row``: entries per box of the
    windows table ``wt``). ps_roi_pool on NCHW maps takes the block loops when they pay
    (ps_blocks). Returns 0, or the bytes of per-thread scratch that could not be
    allocated."""
    cdef Py_ssize_t cs = s.C if s.channels_last else 1
    cdef Py_ssize_t groups = s.C if op == OP_ROI_POOL else s.Co * s.PH
    cdef Py_ssize_t runs, task, n, g, r, lo, hi, j, v, a, b, pw, chunk, PH = s.PH
    if op == OP_PS_ROI_POOL and takes_ps_blocks(s, wt, row, K, sizeof(floating), True):
        return ps_blocks(<floating*>X, O, s, wt, row, order, visit, img_start, n_threads, False)
    # split each image's boxes into runs when there are fewer groups than tasks wanted
    runs = max(1, min(K, (TASKS_PER_THREAD * n_threads + s.N * groups - 1) // (s.N * groups)))
    for task in prange(s.N * groups * runs, schedule="dynamic", num_threads=n_threads):
        n = task // (groups * runs)
        g = (task // runs) % groups
        r = task % runs
        lo, hi = img_start[n], img_start[n + 1]
        a = lo + (hi - lo) * r // runs
        b = lo + (hi - lo) * (r + 1) // runs
        for v in range(a, b):
            j = visited_at(visit, 0, v)
            if op == OP_ROI_POOL:
                pool_box(X + plane_offset(s, n, g), cs, O, AM, s, order[j], g, wt + j * row,
                         wt + j * row + 2 * PH, op, 0, 0, 0)
                continue
            for chunk in range((s.PW + ROW_CHAINS - 1) // ROW_CHAINS):
                pw = chunk * ROW_CHAINS
                mean_row(X + plane_offset(s, n, g * s.PW + pw), plane_offset(s, 0, 1), cs, s.W,
                         wt + j * row + 2 * (g % PH), wt + j * row + 2 * PH + 2 * pw,
                         s.PW - pw if s.PW - pw < ROW_CHAINS else ROW_CHAINS,
                         O + out_index(s, order[j], g // PH, g % PH, pw),
                         out_index(s, 0, 0, 0, 1))
    return 0


cdef Py_ssize_t ps_blocks(floating* maps, floating* outs, const Shape* s, const int64_t* wt,
                          Py_ssize_t row, const int64_t* order, const int64_t* visit,
                          const int64_t* img_start, int n_threads, bint backward,
                          bint assign=False) noexcept nogil:
    """ps_roi_pool on NCHW maps: one task per (image, bin, block of LANES output channels), which
    copies the planes that bin reads (PH * PW apart) to channels-last scratch. The forward
    (``maps``: the features, read only; ``outs``: the output) averages that bin of every box of
    the image from it, over the channels with vector code (each lane sums its window in
    mean_window's order: the same bits). The gradient (``maps``: the feature gradient; ``outs``:
    the output gradient, read only) adds the bin's shares of the image's boxes, in box order, to
    the copy of its gradient planes and copies it back (spread_row's additions in its order).
    Returns 0, or the bytes of per-thread scratch that could not be allocated. ``assign`` (gradient): the
    gradient holds anything and is written over, the copy starting from zero and streamed back
    (no zero-fill before the call, no read of the gradient); an image with no box zeroes its
    planes."""
    cdef Py_ssize_t Co = s.Co, PH = s.PH, PW = s.PW, H = s.H, W = s.W, bins = PH * PW
    cdef Py_ssize_t task, v, j
    cdef floating* scratch = NULL  # (assigned per thread in the parallel region)
    cdef floating* staging = NULL
    cdef Scratch sc
    cdef PsTask b
    cdef size_t failed = 0
    with parallel(num_threads=n_threads):
        sc = scratch_open(&failed, H * W * LANES * sizeof(floating),
                          STREAM_PIXELS * LANES * sizeof(floating) if assign else 0)
        scratch, staging = <floating*>sc.a, <floating*>sc.b
        for task in prange(ps_tasks(s), schedule="dynamic"):
            b = ps_task(task, s, img_start, 0, img_start[s.N])
            if not sc.ok or not ps_begin(&b, s, maps, scratch, assign):
                continue  # (a failed scratch is reported after the parallel region)
            for v in range(b.lo, b.hi):
                j = v if backward else visited_at(visit, 0, v)  # (the gradient: box order)
                if backward:
                    spread_lanes(scratch, W, wt + j * row + 2 * (b.q // PW),
                                 wt + j * row + 2 * PH + 2 * (b.q % PW), b.nb,
                                 outs + (order[j] * Co + b.c0) * bins + b.q, bins)
                else:
                    mean_lanes(scratch, W, wt + j * row + 2 * (b.q // PW),
                               wt + j * row + 2 * PH + 2 * (b.q % PW), b.nb,
                               outs + (order[j] * Co + b.c0) * bins + b.q, bins)
            if backward:
                ps_copy_back(scratch, &b, s, maps, staging)
        scratch_close(&sc)
    return failed


cdef void mean_lanes(const floating* block, Py_ssize_t W, const int64_t* wy, const int64_t* wx,
                     Py_ssize_t n_lanes, floating* o, Py_ssize_t o_stride) noexcept nogil:
    """mean_window of the window rows wy[0]..wy[1], columns wx[0]..wx[1] on each lane of a
    channels-last block, into o[c * o_stride] for c < n_lanes; an empty window gives 0."""
    cdef floating acc[LANES]
    cdef floating area
    cdef Py_ssize_t y, x, c
    cdef const floating* p
    if wy[1] <= wy[0] or wx[1] <= wx[0]:
        for c in range(n_lanes):
            o[c * o_stride] = 0
        return
    for c in range(LANES):
        acc[c] = 0
    for y in range(wy[0], wy[1]):
        for x in range(wx[0], wx[1]):
            p = block + (y * W + x) * LANES
            for c in range(LANES):
                acc[c] = acc[c] + p[c]
    area = <floating>((wy[1] - wy[0]) * (wx[1] - wx[0]))
    for c in range(n_lanes):
        o[c * o_stride] = acc[c] / area


cdef void spread_lanes(floating* gblock, Py_ssize_t W, const int64_t* wy, const int64_t* wx,
                       Py_ssize_t n_lanes, const floating* g, Py_ssize_t g_stride) noexcept nogil:
    """The gradient of mean_lanes: lane c's g[c * g_stride] / area added to every pixel of the
    window (as spread_row adds it)."""
    cdef floating share[LANES]
    cdef floating area
    cdef Py_ssize_t y, x, c
    cdef floating* p
    if wy[1] <= wy[0] or wx[1] <= wx[0]:
        return
    area = <floating>((wy[1] - wy[0]) * (wx[1] - wx[0]))
    for c in range(LANES):
        share[c] = g[c * g_stride] / area if c < n_lanes else 0
    for y in range(wy[0], wy[1]):
        for x in range(wx[0], wx[1]):
            p = gblock + (y * W + x) * LANES
            for c in range(LANES):
                p[c] += share[c]


cdef inline void mean_row(const floating* plane, Py_ssize_t plane_stride, Py_ssize_t cs,
                          Py_ssize_t W, const int64_t* wy, const int64_t* wx, Py_ssize_t count,
                          floating* o, Py_ssize_t o_stride) noexcept nogil:
    """ps_roi_pool's ``count`` <= ROW_CHAINS adjacent bins of one bin row of a box: bin i
    averages its window (rows wy[0]..wy[1], columns wx[2 i]..wx[2 i + 1]) of the i-th plane
    (plane_stride apart) into o[i * o_stride]; an empty bin gives 0. Each bin is summed in
    row-major order as mean_window sums (the peers' order), but the bins' rows are visited in
    turn, so that their independent chains of additions overlap instead of waiting for each
    other."""
    cdef floating acc[ROW_CHAINS]
    cdef Py_ssize_t i, y, x
    cdef const floating* p
    for i in range(count):
        acc[i] = 0
    for y in range(wy[0], wy[1]):
        for i in range(count):
            p = plane + i * plane_stride + y * W * cs
            for x in range(wx[2 * i], wx[2 * i + 1]):
                acc[i] = acc[i] + p[x * cs]
    for i in range(count):
        if wy[1] > wy[0] and wx[2 * i + 1] > wx[2 * i]:
            o[i * o_stride] = acc[i] / <floating>((wy[1] - wy[0]) * (wx[2 * i + 1] - wx[2 * i]))
        else:
            o[i * o_stride] = 0


cdef inline void spread_row(floating* gplane, Py_ssize_t plane_stride, Py_ssize_t cs,
                            Py_ssize_t W, const int64_t* wy, const int64_t* wx, Py_ssize_t count,
                            const floating* g, Py_ssize_t g_stride) noexcept nogil:
    """The gradient of mean_row: bin i's g[i * g_stride] / area added to every pixel of its
    window of the i-th gradient plane. Each plane gets one bin's terms per box, so visiting the
    bins' rows in turn changes no pixel's order of additions."""
    cdef floating share[ROW_CHAINS]
    cdef Py_ssize_t i, y, x
    cdef floating* p
    if wy[1] <= wy[0]:
        return
    for i in range(count):
        share[i] = 0
        if wx[2 * i + 1] > wx[2 * i]:
            share[i] = g[i * g_stride] / <floating>((wy[1] - wy[0]) * (wx[2 * i + 1] - wx[2 * i]))
    for y in range(wy[0], wy[1]):
        for i in range(count):
            p = gplane + i * plane_stride + y * W * cs
            for x in range(wx[2 * i], wx[2 * i + 1]):
                p[x * cs] += share[i]


cdef inline void scatter_box(const floating* plane, floating* gplane, Py_ssize_t cs,
                             const floating* G, const Shape* s, Py_ssize_t k, Py_ssize_t ci,
                             const int64_t* wy, const int64_t* wx, int op, Py_ssize_t c,
                             Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    """Add box k's gradient terms on plane ci (conventions 8.5, 9.2)."""
    cdef Py_ssize_t y, x, arg
    cdef floating g
    if op == OP_ROI_POOL:
        for ph in range(s.PH):
            for pw in range(s.PW):
                if wy[2 * ph + 1] > wy[2 * ph] and wx[2 * pw + 1] > wx[2 * pw]:
                    arg = argmax_window(plane, cs, s.W, wy[2 * ph], wy[2 * ph + 1], wx[2 * pw],
                                        wx[2 * pw + 1])
                    gplane[arg * cs] += G[out_index(s, k, ci, ph, pw)]
        return
    if wy[2 * ph + 1] <= wy[2 * ph] or wx[2 * pw + 1] <= wx[2 * pw]:
        return
    g = G[out_index(s, k, c, ph, pw)] / <floating>((wy[2 * ph + 1] - wy[2 * ph]) *
                                                  (wx[2 * pw + 1] - wx[2 * pw]))
    for y in range(wy[2 * ph], wy[2 * ph + 1]):
        for x in range(wx[2 * pw], wx[2 * pw + 1]):
            gplane[(y * s.W + x) * cs] += g


def backward(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] x,
             floating[:, :, :, ::1] grad, const int64_t[:, ::1] win, const int64_t[::1] order,
             const int64_t[::1] img_start, int op, bint channels_last, int n_threads,
             bint assign=False):
    """Add the feature gradient into ``grad`` (zeroed by the caller; with ``assign``, holding
    anything: ps_roi_pool's block loops write it over, the other loops zero it first). ``x``: the features
    (roi_pool finds each bin's arg-max there); any array of their shape for ps_roi_pool. A task
    owns one plane (roi_pool), or the PW planes of one bin row of an output channel (ps_roi_pool:
    few enough for the gradient planes to stay in L2; the PH x PW planes of a channel measured
    60% slower on one thread), for all of the image's boxes, which it visits in order."""
    cdef Shape s = shape_of(grad.shape, grad_out.shape, channels_last)
    cdef Py_ssize_t cs = s.C if channels_last else 1
    cdef Py_ssize_t groups = s.C if op == OP_ROI_POOL else s.Co * s.PH
    cdef Py_ssize_t task, n, g, j, off, pw, chunk
    cdef const floating* X = &x[0, 0, 0, 0]
    cdef const floating* G = &grad_out[0, 0, 0, 0]
    cdef floating* GX = &grad[0, 0, 0, 0]
    cdef const int64_t* wt = &win[0, 0]
    cdef Py_ssize_t row = win.shape[1], PH = s.PH, failed
    if op == OP_PS_ROI_POOL and takes_ps_blocks(&s, wt, row, order.shape[0], sizeof(floating),
                                                False):
        with nogil:
            failed = ps_blocks(GX, <floating*>G, &s, wt, row, &order[0], NULL, &img_start[0],
                               n_threads, True, assign)
        check_scratch(failed)
        return
    if assign:
        zero_fill(np.asarray(grad).reshape(-1).view(np.uint8), n_threads)
    for task in prange(s.N * groups, nogil=True, schedule="dynamic", num_threads=n_threads):
        n = task // groups
        g = task % groups
        for j in range(img_start[n], img_start[n + 1]):
            if op == OP_ROI_POOL:
                off = plane_offset(&s, n, g)
                scatter_box(X + off, GX + off, cs, G, &s, order[j], g, wt + j * row,
                            wt + j * row + 2 * PH, op, 0, 0, 0)
                continue
            for chunk in range((s.PW + ROW_CHAINS - 1) // ROW_CHAINS):
                pw = chunk * ROW_CHAINS
                spread_row(GX + plane_offset(&s, n, g * s.PW + pw), plane_offset(&s, 0, 1), cs,
                           s.W, wt + j * row + 2 * (g % PH), wt + j * row + 2 * PH + 2 * pw,
                           s.PW - pw if s.PW - pw < ROW_CHAINS else ROW_CHAINS,
                           G + out_index(&s, order[j], g // PH, g % PH, pw),
                           out_index(&s, 0, 0, 0, 1))


# ---------------------------------------------------------------------------------------------
# roi_pool on NCHW maps with many boxes: blocks of LANES planes of one image are copied once to
# channels-last scratch, and every box of the image is pooled from it with vector code over the
# LANES channels (one compare-and-select per pixel for all of them). The gradient uses the same
# tasks and adds each block's terms in the same order as the plane loops: the same bits.

cdef extern from *:
    """
    /* The lane loops of the block kernels, in C: with GCC or Clang as vector-extension code over
       the 16 lanes (LANES of _lanes.pxd), compares and bit selects that the compiler maps to the
       target's vector registers (scalar compares with branches otherwise: several times slower);
       plain loops elsewhere. The max keeps NaN aside: a window with one is NaN (numpy.max); the
       arg-max takes the first maximum, or the first NaN. */
    #include <math.h>
    #include <string.h>
    #define ROI_POOL_LANES 16
    #if defined(__GNUC__) || defined(__clang__)
    /* vectors of the target's native width (GCC splits wider ones element by element) */
    #ifdef __AVX__
    #define ROI_POOL_VBYTES 32
    #else
    #define ROI_POOL_VBYTES 16
    #endif
    #define ROI_POOL_LANE_KERNELS(T, I)                                                         \
    typedef T roi_##T##_v __attribute__((vector_size(ROI_POOL_VBYTES)));                       \
    typedef I roi_##T##_m __attribute__((vector_size(ROI_POOL_VBYTES)));                       \
    enum { roi_##T##_w = ROI_POOL_VBYTES / sizeof(T),                                          \
           roi_##T##_n = ROI_POOL_LANES * sizeof(T) / ROI_POOL_VBYTES };                       \
    static inline roi_##T##_v roi_##T##_load(const T* p) {                                     \
        roi_##T##_v v; memcpy(&v, p, sizeof v); return v; }                                    \
    static inline roi_##T##_v roi_##T##_sel(roi_##T##_m mask, roi_##T##_v a, roi_##T##_v b) { \
        return (roi_##T##_v)(((roi_##T##_m)a & mask) | ((roi_##T##_m)b & ~mask)); }           \
    static inline void roi_pool_max_lanes_##T(const T* block, Py_ssize_t W, int64_t y0,        \
                                              int64_t y1, int64_t x0, int64_t x1, T* o) {      \
        roi_##T##_v m[roi_##T##_n];                                                            \
        roi_##T##_m nan[roi_##T##_n];                                                          \
        const T* p = block + (y0 * W + x0) * ROI_POOL_LANES;                                   \
        for (int q = 0; q < roi_##T##_n; q++) {                                                \
            m[q] = roi_##T##_load(p + q * roi_##T##_w); nan[q] = (roi_##T##_m){0}; }           \
        for (int64_t y = y0; y < y1; y++) {                                                    \
            p = block + (y * W + x0) * ROI_POOL_LANES;                                         \
            for (int64_t x = x0; x < x1; x++, p += ROI_POOL_LANES) {                           \
                for (int q = 0; q < roi_##T##_n; q++) {                                        \
                    roi_##T##_v v = roi_##T##_load(p + q * roi_##T##_w);                       \
                    m[q] = roi_##T##_sel(v > m[q], v, m[q]);                                   \
                    nan[q] |= v != v;                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int q = 0; q < roi_##T##_n; q++) {                                                \
            roi_##T##_v r = (roi_##T##_v)((roi_##T##_m)m[q] | nan[q]);  /* all ones: NaN */    \
            memcpy(o + q * roi_##T##_w, &r, sizeof r);                                         \
        }                                                                                      \
    }                                                                                          \
    static inline void roi_pool_argmax_lanes_##T(const T* block, Py_ssize_t W, int64_t y0,     \
                                                 int64_t y1, int64_t x0, int64_t x1,           \
                                                 int64_t* arg) {                               \
        roi_##T##_v m[roi_##T##_n];                                                            \
        roi_##T##_m a[roi_##T##_n];                                                            \
        const T* p = block + (y0 * W + x0) * ROI_POOL_LANES;                                   \
        for (int q = 0; q < roi_##T##_n; q++) {                                                \
            m[q] = roi_##T##_load(p + q * roi_##T##_w);                                        \
            a[q] = (roi_##T##_m){0} + (I)(y0 * W + x0); }                                      \
        for (int64_t y = y0; y < y1; y++) {                                                    \
            p = block + (y * W + x0) * ROI_POOL_LANES;                                         \
            for (int64_t x = x0; x < x1; x++, p += ROI_POOL_LANES) {                           \
                I i = (I)(y * W + x);                                                          \
                for (int q = 0; q < roi_##T##_n; q++) {                                        \
                    roi_##T##_v v = roi_##T##_load(p + q * roi_##T##_w);                       \
                    roi_##T##_m take = (v > m[q]) | ((v != v) & (m[q] == m[q]));               \
                    m[q] = roi_##T##_sel(take, v, m[q]);                                       \
                    a[q] = (a[q] & ~take) | (take & i);                                        \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (int q = 0; q < roi_##T##_n; q++)                                                  \
            for (int l = 0; l < roi_##T##_w; l++) arg[q * roi_##T##_w + l] = a[q][l];          \
    }
    #else
    #define ROI_POOL_LANE_KERNELS(T, I)                                                         \
    static inline void roi_pool_max_lanes_##T(const T* block, Py_ssize_t W, int64_t y0,        \
                                              int64_t y1, int64_t x0, int64_t x1, T* o) {      \
        const T* p = block + (y0 * W + x0) * ROI_POOL_LANES;                                   \
        for (int l = 0; l < ROI_POOL_LANES; l++) o[l] = p[l];                                  \
        for (int64_t y = y0; y < y1; y++)                                                      \
            for (int64_t x = x0; x < x1; x++)                                                  \
                for (int l = 0; l < ROI_POOL_LANES; l++) {                                     \
                    T v = block[(y * W + x) * ROI_POOL_LANES + l];                             \
                    if (v > o[l] || v != v) o[l] = v;                                          \
                }                                                                              \
    }                                                                                          \
    static inline void roi_pool_argmax_lanes_##T(const T* block, Py_ssize_t W, int64_t y0,     \
                                                 int64_t y1, int64_t x0, int64_t x1,           \
                                                 int64_t* arg) {                               \
        T m[ROI_POOL_LANES];                                                                   \
        for (int l = 0; l < ROI_POOL_LANES; l++) {                                             \
            m[l] = block[(y0 * W + x0) * ROI_POOL_LANES + l]; arg[l] = y0 * W + x0; }         \
        for (int64_t y = y0; y < y1; y++)                                                      \
            for (int64_t x = x0; x < x1; x++)                                                  \
                for (int l = 0; l < ROI_POOL_LANES; l++) {                                     \
                    T v = block[(y * W + x) * ROI_POOL_LANES + l];                             \
                    if (v > m[l] || (v != v && m[l] == m[l])) { m[l] = v; arg[l] = y * W + x; } \
                }                                                                              \
    }
    #endif
    ROI_POOL_LANE_KERNELS(float, int32_t)
    ROI_POOL_LANE_KERNELS(double, int64_t)
    """
    const int ROI_POOL_LANES
    void max_lanes_f "roi_pool_max_lanes_float"(const float*, Py_ssize_t, int64_t, int64_t,
                                                int64_t, int64_t, float*) noexcept nogil
    void max_lanes_d "roi_pool_max_lanes_double"(const double*, Py_ssize_t, int64_t, int64_t,
                                                 int64_t, int64_t, double*) noexcept nogil
    void argmax_lanes_f "roi_pool_argmax_lanes_float"(const float*, Py_ssize_t, int64_t, int64_t,
                                                      int64_t, int64_t, int64_t*) noexcept nogil
    void argmax_lanes_d "roi_pool_argmax_lanes_double"(const double*, Py_ssize_t, int64_t,
                                                       int64_t, int64_t, int64_t,
                                                       int64_t*) noexcept nogil

if ROI_POOL_LANES != LANES:
    raise ImportError("_roi_pool's C lane loops and _lanes.pxd disagree on LANES")


cdef inline void max_lanes(const floating* block, Py_ssize_t W, int64_t y0, int64_t y1,
                           int64_t x0, int64_t x1, floating* o) noexcept nogil:
    """o[l] = the largest pixel of the window in lane l (NaN if the lane has one)."""
    if floating is float:
        max_lanes_f(block, W, y0, y1, x0, x1, o)
    else:
        max_lanes_d(block, W, y0, y1, x0, x1, o)


cdef inline void argmax_lanes(const floating* block, Py_ssize_t W, int64_t y0, int64_t y1,
                              int64_t x0, int64_t x1, int64_t* arg) noexcept nogil:
    """arg[l] = y * W + x of the first maximum of the window in lane l (the first NaN)."""
    if floating is float:
        argmax_lanes_f(block, W, y0, y1, x0, x1, arg)
    else:
        argmax_lanes_d(block, W, y0, y1, x0, x1, arg)


def forward_blocks(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                   const int64_t[:, ::1] win, const int64_t[::1] order,
                   const int64_t[::1] img_start, int n_threads,
                   int32_t[:, :, :, ::1] argmax=None, const int64_t[::1] visit=None):
    """roi_pool of every box of NCHW ``x``, one task per (image, block of LANES planes), in the
    order ``visit``; with ``argmax``, each bin's arg-max pixel too (as ``forward``)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t PH = out.shape[2], PW = out.shape[3], row = win.shape[1]
    cdef Py_ssize_t nblocks = (C + LANES - 1) // LANES, task, n, c, nb, j, k, v, ph, pw, l
    cdef const int64_t* V = positions(visit, 0, order.shape[0])
    cdef const floating* X = &x[0, 0, 0, 0]
    cdef floating* O = &out[0, 0, 0, 0]
    cdef const int64_t* wt = &win[0, 0]
    cdef const int64_t* wy
    cdef const int64_t* wx
    cdef floating* scratch
    cdef floating* obuf
    cdef floating* staging
    cdef bint stream_out = streams_output(out.shape[0] * C * PH * PW, sizeof(floating))
    cdef floating* o
    cdef int64_t* abuf
    cdef int32_t* AM = NULL if argmax is None else &argmax[0, 0, 0, 0]
    cdef BlockTask bt
    cdef Scratch s
    cdef size_t failed = 0
    with nogil, parallel(num_threads=n_threads):
        s = scratch_open(&failed, H * W * LANES * sizeof(floating),
                         (2 if stream_out else 1) * PH * PW * LANES * sizeof(floating),
                         LANES * sizeof(int64_t))
        scratch, obuf, abuf = <floating*>s.a, <floating*>s.b, <int64_t*>s.c
        staging = obuf + PH * PW * LANES if stream_out else NULL
        for task in prange(N * nblocks, schedule="dynamic"):
            if not s.ok:
                continue  # reported after the parallel region
            bt = block_task(task, nblocks, C, &img_start[0], 0, order.shape[0])
            n, c, nb = bt.n, bt.c, bt.nb
            if bt.lo == bt.hi:
                continue
            interleave_planes(X + (n * C + c) * H * W, H * W, nb, scratch)
            for v in range(bt.lo, bt.hi):
                j = visited_at(V, 0, v)
                k = order[j]
                wy = wt + j * row
                wx = wy + 2 * PH
                for ph in range(PH):
                    for pw in range(PW):
                        o = obuf + (ph * PW + pw) * LANES
                        if wy[2 * ph + 1] <= wy[2 * ph] or wx[2 * pw + 1] <= wx[2 * pw]:
                            for l in range(LANES):
                                o[l] = 0
                            if AM != NULL:
                                for l in range(nb):
                                    AM[((k * C + c + l) * PH + ph) * PW + pw] = -1
                        elif AM == NULL:
                            max_lanes(scratch, W, wy[2 * ph], wy[2 * ph + 1], wx[2 * pw],
                                      wx[2 * pw + 1], o)
                        else:
                            argmax_lanes(scratch, W, wy[2 * ph], wy[2 * ph + 1], wx[2 * pw],
                                         wx[2 * pw + 1], abuf)
                            for l in range(nb):
                                o[l] = scratch[abuf[l] * LANES + l]
                                AM[((k * C + c + l) * PH + ph) * PW + pw] = <int32_t>abuf[l]
                deinterleave_bins(obuf, PH * PW, nb, O + (k * C + c) * PH * PW, PH * PW, staging)
        scratch_close(&s)
    check_scratch(failed)


def backward_blocks(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] x,
                    floating[:, :, :, ::1] grad, const int64_t[:, ::1] win,
                    const int64_t[::1] order, const int64_t[::1] img_start, int n_threads):
    """roi_pool's feature gradient on NCHW maps, one task per (image, block of LANES planes):
    arg-maxima found in the channels-last copy, gradients added there, then to the planes."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t PH = grad_out.shape[2], PW = grad_out.shape[3], row = win.shape[1]
    cdef Py_ssize_t nblocks = (C + LANES - 1) // LANES, task, n, c, nb, j, k, ph, pw, l
    cdef const floating* X = &x[0, 0, 0, 0]
    cdef const floating* G = &grad_out[0, 0, 0, 0]
    cdef floating* GX = &grad[0, 0, 0, 0]
    cdef const int64_t* wt = &win[0, 0]
    cdef const int64_t* wy
    cdef const int64_t* wx
    cdef const floating* g
    cdef floating* scratch
    cdef floating* gblock
    cdef int64_t* arg
    cdef BlockTask bt
    cdef Scratch s
    cdef size_t failed = 0
    with nogil, parallel(num_threads=n_threads):
        s = scratch_open(&failed, H * W * LANES * sizeof(floating),
                         H * W * LANES * sizeof(floating), LANES * sizeof(int64_t))
        scratch, gblock, arg = <floating*>s.a, <floating*>s.b, <int64_t*>s.c
        for task in prange(N * nblocks, schedule="dynamic"):
            if not s.ok:
                continue  # reported after the parallel region
            bt = block_task(task, nblocks, C, &img_start[0], 0, order.shape[0])
            n, c, nb = bt.n, bt.c, bt.nb
            if bt.lo == bt.hi:
                continue
            interleave_planes(X + (n * C + c) * H * W, H * W, nb, scratch)
            memset(gblock, 0, H * W * LANES * sizeof(floating))
            for j in range(bt.lo, bt.hi):
                k = order[j]
                wy = wt + j * row
                wx = wy + 2 * PH
                g = G + (k * C + c) * PH * PW
                for ph in range(PH):
                    for pw in range(PW):
                        if wy[2 * ph + 1] > wy[2 * ph] and wx[2 * pw + 1] > wx[2 * pw]:
                            argmax_lanes(scratch, W, wy[2 * ph], wy[2 * ph + 1], wx[2 * pw],
                                         wx[2 * pw + 1], arg)
                            for l in range(nb):
                                gblock[arg[l] * LANES + l] += g[l * PH * PW + ph * PW + pw]
            add_deinterleaved(gblock, H * W, nb, GX + (n * C + c) * H * W)
        scratch_close(&s)
    check_scratch(failed)


def backward_argmax(const floating[:, :, :, ::1] grad_out, const int32_t[:, :, :, ::1] argmax,
                    floating[:, :, :, ::1] grad, const int64_t[::1] order,
                    const int64_t[::1] img_start, bint channels_last, int n_threads,
                    bint assign=False):
    """roi_pool's feature gradient from the arg-max pixels a forward returned: each bin's
    gradient added to its pixel. One task per (image, block of LANES planes) visits the boxes in
    order, reading each box's gradient and arg-max of the block in one run (one plane at a time
    would read them LANES times further apart): every plane receives the additions of
    ``backward``, in its order, hence the same bits. Returns how many arg-max entries lie outside
    [-1, H * W) (the caller raises; nothing is written for them). ``assign`` (NCHW): ``grad``
    holds anything and is written over: each task adds into zeroed scratch planes and streams
    them out (no zero-fill pass before the call, and no read of the gradient)."""
    if assign and channels_last:
        raise ValueError("assign is for NCHW gradients")
    cdef Shape s = shape_of(grad.shape, grad_out.shape, channels_last)
    cdef Py_ssize_t cs = s.C if channels_last else 1
    cdef Py_ssize_t nblocks = (s.C + LANES - 1) // LANES
    # bin q = ph * PW + pw of (k, c) is at base + q * step of grad_out and argmax
    cdef Py_ssize_t step = s.C if channels_last else 1, bins = s.PH * s.PW
    cdef Py_ssize_t task, n, c, c0, c1, j, q, base, off, first, bad = 0
    cdef int64_t a
    cdef const floating* G = &grad_out[0, 0, 0, 0]
    cdef const int32_t* AM = &argmax[0, 0, 0, 0]
    cdef floating* GX = &grad[0, 0, 0, 0]
    cdef int64_t pixels = s.H * s.W
    cdef Scratch sc
    cdef size_t failed = 0
    cdef floating* planes
    cdef floating* dst
    with nogil, parallel(num_threads=n_threads):
        sc = scratch_open(&failed, LANES * pixels * sizeof(floating) if assign else 0, 0)
        planes = <floating*>sc.a
        for task in prange(s.N * nblocks, schedule="dynamic"):
            if not sc.ok:
                continue  # reported after the parallel region
            n = task // nblocks
            c0 = (task % nblocks) * LANES
            c1 = min(c0 + LANES, s.C)
            # the gradient, or with assign the task's zeroed scratch planes (plane c at
            # (c - c0) * pixels, as the gradient's NCHW planes from plane c0 on)
            dst, first = GX, 0
            if assign:
                dst, first = planes, plane_offset(&s, n, c0)
                memset(planes, 0, (c1 - c0) * pixels * sizeof(floating))
            for j in range(img_start[n], img_start[n + 1]):
                for c in range(c0, c1):
                    base = out_index(&s, order[j], c, 0, 0)
                    off = plane_offset(&s, n, c) - first
                    for q in range(bins):
                        a = AM[base + q * step]
                        if <uint64_t>a < <uint64_t>pixels:  # 0 <= a < H * W
                            dst[off + a * cs] += G[base + q * step]
                        elif a != -1:
                            bad += 1
            if assign:
                stream(GX + plane_offset(&s, n, c0), planes, (c1 - c0) * pixels)
        scratch_close(&sc)
    check_scratch(failed)
    return bad


def argmax_assigns(Py_ssize_t h, Py_ssize_t w, Py_ssize_t itemsize):
    """Whether backward_argmax can write an NCHW gradient of h x w planes over (assign): its
    scratch planes fit SCRATCH_BYTES."""
    return LANES * h * w * itemsize <= SCRATCH_BYTES


# ---------------------------------------------------------------------------------------------
# the cost model (_cost.pxd) of roi_pool's NCHW loop order, and the one-pass small calls

def use_blocks(double pixels, Py_ssize_t c, Py_ssize_t h, Py_ssize_t w, Py_ssize_t n,
               Py_ssize_t itemsize, int n_threads, bint forward):
    """Whether roi_pool on NCHW maps takes the block loops: as RoIAlign's rule, with the pixels
    the bins cover (summed over boxes) for the samples; the gradient holds two blocks per
    thread."""
    return blocks_pay(pixels, c, h, w, n, h * w * LANES * itemsize * (1 if forward else 2),
                      n * ((c + LANES - 1) // LANES), n_threads, forward)


cdef object _NDARRAY = np.ndarray
cdef object _F32 = np.dtype(np.float32)
cdef object _F64 = np.dtype(np.float64)


def forward_small(op, features, boxes, output_size, spatial_scale, layout, n_threads,
                  allow_inverted, edge):
    """``roi_pool`` (op "roi_pool", without arg-max) or ``ps_roi_pool`` ("ps_roi_pool") of a
    plain call (as _roi_align.forward_small says), checked, windowed and pooled in one compiled
    pass; None for any other call, which the general path then checks and runs. A roi_pool that
    the cost model sends to the block loops is left to the general path too. The result is the
    general path's, bit for bit."""
    cdef Plain c
    cdef const float[:, :, :, ::1] xf = None
    cdef const float[:, :] bf = None
    cdef const double[:, :, :, ::1] xd = None
    cdef const double[:, :] bd = None
    if (not plain_call(&c, features, boxes, output_size, spatial_scale, layout, n_threads,
                       allow_inverted, _NDARRAY, _F32, _F64)
            or op not in OPS or type(edge) is not str
            or (edge != "torchvision" and edge != "image")):
        return None
    cdef int code = OPS[op], wanted = effective_n_threads(n_threads)
    cdef bint image_edge = edge == "image"
    try:  # C-contiguous rank-4 features, rank-2 boxes (what the memoryviews accept)
        if c.size == 4:
            xf, bf = features, boxes
        else:
            xd, bd = features, boxes
    except (ValueError, BufferError):
        return None
    if c.size == 4:
        return small_forward(xf, bf, &c, code, wanted, image_edge)
    return small_forward(xd, bd, &c, code, wanted, image_edge)


cdef object small_forward(const floating[:, :, :, ::1] x, const floating[:, :] b, const Plain* c,
                          int op, int wanted, bint image_edge):
    cdef Py_ssize_t PH = c.ph, PW = c.pw
    cdef double spatial_scale = c.scale
    cdef bint channels_last = c.channels_last, check_order = c.check_order
    cdef Sizes z
    if not small_sizes(&z, b.shape, 4, x.shape, channels_last):
        return None
    cdef Py_ssize_t K = z.K, N = z.N, C = z.C, H = z.H, W = z.W, k, q, row = 2 * (PH + PW)
    cdef Py_ssize_t Co = C if op == OP_ROI_POOL else C // (PH * PW)
    if <double>K * row > 1 << 24 or <double>K * C * PH * PW > 1 << 40:
        return None  # (an output that large is the general path's MemoryError)
    if op == OP_PS_ROI_POOL and C % (PH * PW):
        return None
    # as ``windows``: roi_pool covers the end pixel; ps_roi_pool clips to H - 1 unless image_edge
    cdef int64_t grow = 1 if op == OP_ROI_POOL else 0
    cdef int64_t top_h = H if op == OP_ROI_POOL or image_edge else H - 1
    cdef int64_t top_w = W if op == OP_ROI_POOL or image_edge else W - 1
    cdef floating scale = <floating>spatial_scale
    # batch, order, image starts (N + 1), the (K, row) windows, the visiting order, then the
    # (K, 4) coordinates
    cdef int64_t* block = small_block(3 * K + N + 1 + K * row + 4 * K)
    cdef int64_t* batch = block
    cdef int64_t* order = block + K
    cdef int64_t* img_start = block + 2 * K
    cdef int64_t* wt = img_start + N + 1
    cdef int64_t* visit = wt + K * row
    cdef floating* rois = <floating*>(visit + K)
    cdef double pixels = 0
    cdef bint ok
    cdef int n_threads = threads_for_work(wanted, <double>K * Co * PH * PW, 0)
    with nogil:
        ok = scan_boxes(b, N, check_order, rois, batch)
        if ok:
            sort_by_image(batch, K, N, order, img_start)
            if not row_order(order, img_start, N, 0, K, rois, visit):
                visit = NULL  # (position order: the same outputs)
            for q in range(K):
                k = order[q]
                axis_windows(rois[4 * k + 1], rois[4 * k + 3], scale, PH, grow, top_h, wt + q * row)
                axis_windows(rois[4 * k], rois[4 * k + 2], scale, PW, grow, top_w,
                             wt + q * row + 2 * PH)
                if op == OP_ROI_POOL and not channels_last:
                    pixels += <double>window_extent(wt + q * row, PH) * window_extent(wt + q * row + 2 * PH, PW)
    if ok and op == OP_ROI_POOL and not channels_last and blocks_pay(
            pixels, C, H, W, N, H * W * LANES * sizeof(floating), N * ((C + LANES - 1) // LANES),
            n_threads, True):
        ok = False  # the block loops: the general path's (bit-identical, faster in bulk)
    out = None
    if ok:
        out = small_output(K, Co, PH, PW, channels_last,
                           np.float32 if floating is float else np.float64,
                           sizeof(floating), np.empty, host_array)
    if out is None:  # declined, or past memory: the general path checks it, or says so
        free(block)
        return None
    cdef floating[:, :, :, ::1] o = out
    cdef Shape shape = shape_of(x.shape, o.shape, channels_last)
    cdef Py_ssize_t failed
    with nogil:
        failed = pool_planes(&x[0, 0, 0, 0], &o[0, 0, 0, 0], NULL, &shape, wt, row, order, visit,
                             img_start, K, op, n_threads)
    free(block)
    check_scratch(failed)
    return out


cdef inline int64_t window_extent(const int64_t* win, Py_ssize_t pooled) noexcept nogil:
    """Pixels the bins of one axis cover, summed over bins (empty bins count 0)."""
    cdef int64_t total = 0
    cdef Py_ssize_t p
    for p in range(pooled):
        if win[2 * p + 1] > win[2 * p]:
            total += win[2 * p + 1] - win[2 * p]
    return total

"""RoIPool and position-sensitive RoIPool on the CPU: forward and feature gradient over integer
pixel bins (docs/conventions.md, sections 8 and 9.2).

A box is described by the pixel windows of its bins, rows [wy[2 ph], wy[2 ph + 1]) and columns
[wx[2 pw], wx[2 pw + 1]) (``windows``), computed once per box and shared by every channel, the
forward and the gradient.

Tasks own input planes: task (image n, input channel ci) visits the boxes of image n in their
fixed order, so the plane stays in cache across the boxes, and each gradient plane is written by
one thread in one order: bit-identical for any thread count. The forward may also split an image's
boxes into runs (its outputs are disjoint), so that few planes still keep every thread busy.
Layouts differ only in strides: a plane's pixels are ``cs`` elements apart (1 in NCHW, C in NHWC).
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport ceil, floor, round
from libc.stdint cimport int64_t

import numpy as np

from ._geometry cimport takes_max

cdef enum:
    OP_ROI_POOL = 0
    OP_PS_ROI_POOL = 1
    # forward tasks wanted per thread (runs of boxes split an image's planes when too few)
    TASKS_PER_THREAD = 4

OPS = {"roi_pool": OP_ROI_POOL, "ps_roi_pool": OP_PS_ROI_POOL}

cdef extern from *:
    """
    /* corners and bin ends saturate this far out: no map is that large, and the integer
       arithmetic of a window can then never overflow */
    #define ROIALIGN_PIXEL_LIMIT ((int64_t)1 << 60)
    """
    int64_t PIXEL_LIMIT "ROIALIGN_PIXEL_LIMIT"


cdef inline int64_t to_pixel(double v) noexcept nogil:
    # a float-to-integer cast out of range is undefined: saturate first (inf included)
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


cdef inline floating max_window(const floating* plane, Py_ssize_t cs, Py_ssize_t W, int64_t y0,
                                int64_t y1, int64_t x0, int64_t x1) noexcept nogil:
    """Largest pixel of a non-empty window; a NaN wins and stays (numpy.max)."""
    cdef Py_ssize_t y, x
    cdef const floating* row
    cdef floating v, m = plane[(y0 * W + x0) * cs]
    for y in range(y0, y1):
        row = plane + y * W * cs
        for x in range(x0, x1):
            v = row[x * cs]
            if v > m or v != v:
                m = v
    return m


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


cdef struct Shape:
    Py_ssize_t N, C, H, W, PH, PW, Co
    bint channels_last


cdef inline Shape shape_of(const Py_ssize_t* fs, const Py_ssize_t* os, bint channels_last) noexcept:
    cdef Shape s
    s.channels_last = channels_last
    if channels_last:
        s.N, s.H, s.W, s.C = fs[0], fs[1], fs[2], fs[3]
        s.PH, s.PW, s.Co = os[1], os[2], os[3]
    else:
        s.N, s.C, s.H, s.W = fs[0], fs[1], fs[2], fs[3]
        s.Co, s.PH, s.PW = os[1], os[2], os[3]
    return s


cdef inline Py_ssize_t plane_offset(const Shape* s, Py_ssize_t n, Py_ssize_t ci) noexcept nogil:
    """Where plane (n, ci) starts; its pixels are ``cs`` apart."""
    if s.channels_last:
        return n * s.H * s.W * s.C + ci
    return (n * s.C + ci) * s.H * s.W


cdef inline Py_ssize_t out_index(const Shape* s, Py_ssize_t k, Py_ssize_t c, Py_ssize_t ph,
                                 Py_ssize_t pw) noexcept nogil:
    if s.channels_last:
        return ((k * s.PH + ph) * s.PW + pw) * s.Co + c
    return ((k * s.Co + c) * s.PH + ph) * s.PW + pw


cdef inline void pool_box(const floating* plane, Py_ssize_t cs, floating* O, const Shape* s,
                          Py_ssize_t k, Py_ssize_t ci, const int64_t* wy, const int64_t* wx,
                          int op) noexcept nogil:
    """Every output of box k that reads plane ci: PH x PW maxima (roi_pool), or the one bin of
    ci's position (ps_roi_pool)."""
    cdef Py_ssize_t ph, pw, c
    cdef floating v
    if op == OP_ROI_POOL:
        for ph in range(s.PH):
            for pw in range(s.PW):
                v = 0  # an empty bin gives 0
                if wy[2 * ph + 1] > wy[2 * ph] and wx[2 * pw + 1] > wx[2 * pw]:
                    v = max_window(plane, cs, s.W, wy[2 * ph], wy[2 * ph + 1], wx[2 * pw],
                                   wx[2 * pw + 1])
                O[out_index(s, k, ci, ph, pw)] = v
        return
    c, ph, pw = ci // (s.PH * s.PW), (ci // s.PW) % s.PH, ci % s.PW
    v = 0
    if wy[2 * ph + 1] > wy[2 * ph] and wx[2 * pw + 1] > wx[2 * pw]:
        v = mean_window(plane, cs, s.W, wy[2 * ph], wy[2 * ph + 1], wx[2 * pw], wx[2 * pw + 1])
    O[out_index(s, k, c, ph, pw)] = v


def forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
            const int64_t[:, ::1] win, const int64_t[::1] order, const int64_t[::1] img_start,
            int op, bint channels_last, int n_threads):
    """Pool every box (windows ``win``, sorted by image: ``img_start``) into ``out``."""
    cdef Shape s = shape_of(x.shape, out.shape, channels_last)
    cdef Py_ssize_t cs = s.C if channels_last else 1
    cdef Py_ssize_t runs, task, n, ci, r, lo, hi, j, a, b
    cdef const floating* X = &x[0, 0, 0, 0]
    cdef floating* O = &out[0, 0, 0, 0]
    cdef const int64_t* wt = &win[0, 0]
    cdef Py_ssize_t row = win.shape[1], PH = s.PH
    # split each image's boxes into runs when there are fewer planes than tasks wanted
    runs = max(1, min(order.shape[0], (TASKS_PER_THREAD * n_threads + s.N * s.C - 1) // (s.N * s.C)))
    for task in prange(s.N * s.C * runs, nogil=True, schedule="dynamic", num_threads=n_threads):
        n = task // (s.C * runs)
        ci = (task // runs) % s.C
        r = task % runs
        lo, hi = img_start[n], img_start[n + 1]
        a = lo + (hi - lo) * r // runs
        b = lo + (hi - lo) * (r + 1) // runs
        for j in range(a, b):
            pool_box(X + plane_offset(&s, n, ci), cs, O, &s, order[j], ci, wt + j * row,
                     wt + j * row + 2 * PH, op)


cdef inline void scatter_box(const floating* plane, floating* gplane, Py_ssize_t cs,
                             const floating* G, const Shape* s, Py_ssize_t k, Py_ssize_t ci,
                             const int64_t* wy, const int64_t* wx, int op) noexcept nogil:
    """Add box k's gradient terms on plane ci (conventions 8.5, 9.2)."""
    cdef Py_ssize_t ph, pw, c, y, x, arg
    cdef floating g
    if op == OP_ROI_POOL:
        for ph in range(s.PH):
            for pw in range(s.PW):
                if wy[2 * ph + 1] > wy[2 * ph] and wx[2 * pw + 1] > wx[2 * pw]:
                    arg = argmax_window(plane, cs, s.W, wy[2 * ph], wy[2 * ph + 1], wx[2 * pw],
                                        wx[2 * pw + 1])
                    gplane[arg * cs] += G[out_index(s, k, ci, ph, pw)]
        return
    c, ph, pw = ci // (s.PH * s.PW), (ci // s.PW) % s.PH, ci % s.PW
    if wy[2 * ph + 1] <= wy[2 * ph] or wx[2 * pw + 1] <= wx[2 * pw]:
        return
    g = G[out_index(s, k, c, ph, pw)] / <floating>((wy[2 * ph + 1] - wy[2 * ph]) *
                                                  (wx[2 * pw + 1] - wx[2 * pw]))
    for y in range(wy[2 * ph], wy[2 * ph + 1]):
        for x in range(wx[2 * pw], wx[2 * pw + 1]):
            gplane[(y * s.W + x) * cs] += g


def backward(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] x,
             floating[:, :, :, ::1] grad, const int64_t[:, ::1] win, const int64_t[::1] order,
             const int64_t[::1] img_start, int op, bint channels_last, int n_threads):
    """Add the feature gradient into ``grad`` (zeroed by the caller). ``x``: the features
    (roi_pool finds each bin's arg-max there); any array of their shape for ps_roi_pool."""
    cdef Shape s = shape_of(grad.shape, grad_out.shape, channels_last)
    cdef Py_ssize_t cs = s.C if channels_last else 1
    cdef Py_ssize_t task, n, ci, j, off
    cdef const floating* X = &x[0, 0, 0, 0]
    cdef const floating* G = &grad_out[0, 0, 0, 0]
    cdef floating* GX = &grad[0, 0, 0, 0]
    cdef const int64_t* wt = &win[0, 0]
    cdef Py_ssize_t row = win.shape[1], PH = s.PH
    for task in prange(s.N * s.C, nogil=True, schedule="dynamic", num_threads=n_threads):
        n = task // s.C
        ci = task % s.C
        off = plane_offset(&s, n, ci)
        for j in range(img_start[n], img_start[n + 1]):
            scatter_box(X + off, GX + off, cs, G, &s, order[j], ci, wt + j * row,
                        wt + j * row + 2 * PH, op)

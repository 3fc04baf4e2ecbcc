"""Axis-aligned RoIAlign on the CPU: forward (avg, max, onnx_max), feature and box gradients.

Average mode is separable (spec section 1, notes), so a box is described by two small per-axis
tables (taps and weights of every sample row and column) instead of one table per sample, filled
once per box and reused over all channels.

Loop orders, chosen for memory traffic:
- NCHW: one task per feature plane (n, c), looping over the boxes of image n. The plane stays in
  L2 while every box samples it, so the feature map is read from memory about once. The feature
  gradient uses the same split: each thread owns the planes it writes and visits boxes in a fixed
  order, hence bit-identical results for any thread count.
- NHWC: one task per box; every tap is a contiguous run of C channels (vectorised inner loop).
  The feature gradient splits channels into blocks owned by one thread each.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

import numpy as np

from ._geometry cimport bilinear_axis, grid_size, sample_coord, sample_fraction
from ._lanes cimport LANES, BlockTask, block_task, add_deinterleaved, deinterleave_bins, interleave_planes

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


cdef inline floating roi_axis(floating lo_corner, floating hi_corner, double scale, bint aligned,
                              Py_ssize_t pooled, floating* start, floating* bin_size,
                              bint* clamped) noexcept nogil:
    """Start, bin size and roi size along one axis (spec section 1, steps 1-3); same rounding as
    the reference kernels: the scaled corner is computed in double, then stored in the dtype."""
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
    # onnxruntime's max mode: the largest weighted tap, not their sum (spec section 3)
    cdef floating m = a0 * b0 * v00
    cdef floating t = a0 * b1 * v01
    if t > m:
        m = t
    t = a1 * b0 * v10
    if t > m:
        m = t
    t = a1 * b1 * v11
    if t > m:
        m = t
    return m


# channels of one block of the NCHW block loops, for the Python driver's work estimate
BLOCK_CHANNELS = LANES


cdef class _Tables:
    """Per-axis sample tables of a run of boxes (positions j0..j1 of the image-sorted order)."""
    cdef public object ylo, yhi, wy0, wy1, sy, xlo, xhi, wx0, wx1, sx, yoff, xoff


def grid_sizes(const floating[:, ::1] rois, Py_ssize_t pooled_h, Py_ssize_t pooled_w,
               double scale, Py_ssize_t sampling_ratio, bint aligned):
    """Samples per bin (gh, gw) of every box, as int64 arrays."""
    cdef Py_ssize_t K = rois.shape[0], k
    cdef floating start, bin_size, size
    cdef bint clamped
    gh_arr = np.empty(K, dtype=np.int64)
    gw_arr = np.empty(K, dtype=np.int64)
    cdef int64_t[::1] gh = gh_arr, gw = gw_arr
    with nogil:
        for k in range(K):
            size = roi_axis(rois[k, 1], rois[k, 3], scale, aligned, pooled_h, &start, &bin_size, &clamped)
            gh[k] = grid_size(sampling_ratio, size, pooled_h)
            size = roi_axis(rois[k, 0], rois[k, 2], scale, aligned, pooled_w, &start, &bin_size, &clamped)
            gw[k] = grid_size(sampling_ratio, size, pooled_w)
    return gh_arr, gw_arr


cdef void fill_axis(floating start, floating bin_size, Py_ssize_t pooled, Py_ssize_t g,
                    Py_ssize_t size, Py_ssize_t* lo, Py_ssize_t* hi, floating* w0, floating* w1,
                    floating* slope) noexcept nogil:
    cdef Py_ssize_t p, i, t = 0
    for p in range(pooled):
        for i in range(g):
            bilinear_axis(sample_coord(start, bin_size, p, i, g), size, lo + t, hi + t, w0 + t,
                          w1 + t, slope + t)
            t += 1


cdef void fill_box(floating lo_corner, floating hi_corner, double scale, bint aligned,
                   Py_ssize_t pooled, Py_ssize_t g, Py_ssize_t size, Py_ssize_t* lo,
                   Py_ssize_t* hi, floating* w0, floating* w1, floating* slope) noexcept nogil:
    # a function of its own so that start and bin_size are private to each OpenMP thread
    cdef floating start, bin_size
    cdef bint clamped
    roi_axis(lo_corner, hi_corner, scale, aligned, pooled, &start, &bin_size, &clamped)
    fill_axis(start, bin_size, pooled, g, size, lo, hi, w0, w1, slope)


def make_tables(const floating[:, ::1] rois, const int64_t[::1] order, Py_ssize_t j0,
                Py_ssize_t j1, const int64_t[::1] gh, const int64_t[::1] gw, Py_ssize_t height,
                Py_ssize_t width, Py_ssize_t pooled_h, Py_ssize_t pooled_w, double scale,
                bint aligned, int n_threads):
    """Fill the per-axis tables of the boxes at sorted positions j0..j1 (in parallel)."""
    dtype = np.float32 if floating is float else np.float64
    cdef Py_ssize_t n = j1 - j0, j, k
    t = _Tables()
    yoff_arr = np.zeros(n + 1, dtype=np.intp)
    xoff_arr = np.zeros(n + 1, dtype=np.intp)
    sel = np.asarray(order[j0:j1])
    np.cumsum(np.asarray(gh)[sel] * pooled_h, out=yoff_arr[1:])
    np.cumsum(np.asarray(gw)[sel] * pooled_w, out=xoff_arr[1:])
    ny, nx = int(yoff_arr[n]), int(xoff_arr[n])
    t.yoff, t.xoff = yoff_arr, xoff_arr
    # one slack element so that &table[offset] is valid for boxes with no samples
    t.ylo, t.yhi = np.zeros(ny + 1, np.intp), np.zeros(ny + 1, np.intp)
    t.xlo, t.xhi = np.zeros(nx + 1, np.intp), np.zeros(nx + 1, np.intp)
    t.wy0, t.wy1, t.sy = np.zeros(ny + 1, dtype), np.zeros(ny + 1, dtype), np.zeros(ny + 1, dtype)
    t.wx0, t.wx1, t.sx = np.zeros(nx + 1, dtype), np.zeros(nx + 1, dtype), np.zeros(nx + 1, dtype)
    cdef Py_ssize_t[::1] ylo = t.ylo, yhi = t.yhi, xlo = t.xlo, xhi = t.xhi
    cdef floating[::1] wy0 = t.wy0, wy1 = t.wy1, sy = t.sy, wx0 = t.wx0, wx1 = t.wx1, sx = t.sx
    cdef Py_ssize_t[::1] yoff = yoff_arr, xoff = xoff_arr
    for j in prange(n, nogil=True, schedule="static", num_threads=n_threads):
        k = order[j0 + j]
        fill_box(rois[k, 1], rois[k, 3], scale, aligned, pooled_h, gh[k], height, &ylo[yoff[j]],
                 &yhi[yoff[j]], &wy0[yoff[j]], &wy1[yoff[j]], &sy[yoff[j]])
        fill_box(rois[k, 0], rois[k, 2], scale, aligned, pooled_w, gw[k], width, &xlo[xoff[j]],
                 &xhi[xoff[j]], &wx0[xoff[j]], &wx1[xoff[j]], &sx[xoff[j]])
    return t


# ---------------------------------------------------------------------------------------------
# forward

cdef void pool_plane(const floating* plane, Py_ssize_t W, floating* o, Py_ssize_t PH,
                     Py_ssize_t PW, Py_ssize_t gh, Py_ssize_t gw, const Py_ssize_t* ylo,
                     const Py_ssize_t* yhi, const floating* wy0, const floating* wy1,
                     const Py_ssize_t* xlo, const Py_ssize_t* xhi, const floating* wx0,
                     const floating* wx1, int mode) noexcept nogil:
    """Max modes: pool one box on one (H, W) plane into o (PH x PW contiguous)."""
    cdef Py_ssize_t ph, pw, a
    if gh == 0 or gw == 0:
        for a in range(PH * PW):
            o[a] = 0
        return
    for ph in range(PH):
        for pw in range(PW):
            argmax_sample(plane, 1, W, ph, pw, gh, gw, ylo, yhi, wy0, wy1, xlo, xhi, wx0, wx1,
                          mode, &o[ph * PW + pw])


cdef void average_planes(const floating* plane, Py_ssize_t plane_stride, Py_ssize_t n_planes,
                         Py_ssize_t W, floating* o, Py_ssize_t o_stride, Py_ssize_t PH,
                         Py_ssize_t PW, Py_ssize_t gh, Py_ssize_t gw, const Py_ssize_t* ylo,
                         const Py_ssize_t* yhi, const floating* wy0, const floating* wy1,
                         const Py_ssize_t* xlo, const Py_ssize_t* xhi, const floating* wx0,
                         const floating* wx1) noexcept nogil:
    """Average-pool one box on n_planes <= PLANE_BLOCK planes (plane_stride apart) into o
    (o_stride apart). Lanes past n_planes re-read the last plane and are not stored, so that the
    lane loop has a constant trip count the compiler unrolls."""
    cdef Py_ssize_t ph, pw, iy, ix, a, b, cc, i00, i01, i10, i11
    cdef const floating* p[PLANE_BLOCK]
    cdef floating acc[PLANE_BLOCK]
    cdef floating w00, w01, w10, w11, inv_count
    for cc in range(PLANE_BLOCK):
        p[cc] = plane + (cc if cc < n_planes else n_planes - 1) * plane_stride
    if gh == 0 or gw == 0:
        for cc in range(n_planes):
            for a in range(PH * PW):
                o[cc * o_stride + a] = 0
        return
    inv_count = 1 / <floating>(gh * gw)
    for ph in range(PH):
        for pw in range(PW):
            for cc in range(PLANE_BLOCK):
                acc[cc] = 0
            for iy in range(gh):
                a = ph * gh + iy
                for ix in range(gw):
                    b = pw * gw + ix
                    w00 = wy0[a] * wx0[b]
                    w01 = wy0[a] * wx1[b]
                    w10 = wy1[a] * wx0[b]
                    w11 = wy1[a] * wx1[b]
                    i00 = ylo[a] * W + xlo[b]
                    i01 = ylo[a] * W + xhi[b]
                    i10 = yhi[a] * W + xlo[b]
                    i11 = yhi[a] * W + xhi[b]
                    for cc in range(PLANE_BLOCK):
                        acc[cc] += w00 * p[cc][i00] + w01 * p[cc][i01] + w10 * p[cc][i10] + w11 * p[cc][i11]
            for cc in range(n_planes):
                o[cc * o_stride + ph * PW + pw] = acc[cc] * inv_count


cdef Py_ssize_t argmax_sample(const floating* plane, Py_ssize_t cs, Py_ssize_t W, Py_ssize_t ph,
                              Py_ssize_t pw, Py_ssize_t gh, Py_ssize_t gw, const Py_ssize_t* ylo,
                              const Py_ssize_t* yhi, const floating* wy0, const floating* wy1,
                              const Py_ssize_t* xlo, const Py_ssize_t* xhi, const floating* wx0,
                              const floating* wx1, int mode, floating* best) noexcept nogil:
    """Index iy * gw + ix of the first largest sample of bin (ph, pw) (mmcv keeps the first on
    ties), its value in best. ``cs`` is the distance between horizontally adjacent pixels."""
    cdef Py_ssize_t iy, ix, a, b, arg = 0
    cdef floating v
    for iy in range(gh):
        a = ph * gh + iy
        for ix in range(gw):
            b = pw * gw + ix
            if mode == MODE_MAX:
                v = bilerp(wy0[a], wy1[a], wx0[b], wx1[b], plane[(ylo[a] * W + xlo[b]) * cs],
                           plane[(ylo[a] * W + xhi[b]) * cs], plane[(yhi[a] * W + xlo[b]) * cs],
                           plane[(yhi[a] * W + xhi[b]) * cs])
            else:
                v = tap_max(wy0[a], wy1[a], wx0[b], wx1[b], plane[(ylo[a] * W + xlo[b]) * cs],
                            plane[(ylo[a] * W + xhi[b]) * cs], plane[(yhi[a] * W + xlo[b]) * cs],
                            plane[(yhi[a] * W + xhi[b]) * cs])
            if (iy == 0 and ix == 0) or v > best[0]:
                best[0] = v
                arg = iy * gw + ix
    return arg


cdef void pool_box_nhwc(const floating* image, Py_ssize_t W, Py_ssize_t C, floating* o,
                        Py_ssize_t PH, Py_ssize_t PW, Py_ssize_t gh, Py_ssize_t gw,
                        const Py_ssize_t* ylo, const Py_ssize_t* yhi, const floating* wy0,
                        const floating* wy1, const Py_ssize_t* xlo, const Py_ssize_t* xhi,
                        const floating* wx0, const floating* wx1, int mode) noexcept nogil:
    """Pool one box of a channels-last (H, W, C) image into o (PH x PW x C contiguous)."""
    cdef Py_ssize_t ph, pw, iy, ix, a, b, c
    cdef const floating* p00
    cdef const floating* p01
    cdef const floating* p10
    cdef const floating* p11
    cdef floating* ob
    cdef floating v, inv_count
    cdef bint first
    if gh == 0 or gw == 0:
        for a in range(PH * PW * C):
            o[a] = 0
        return
    inv_count = 1 / <floating>(gh * gw)
    for ph in range(PH):
        for pw in range(PW):
            ob = o + (ph * PW + pw) * C
            for c in range(C):
                ob[c] = 0
            first = True
            for iy in range(gh):
                a = ph * gh + iy
                for ix in range(gw):
                    b = pw * gw + ix
                    p00 = image + (ylo[a] * W + xlo[b]) * C
                    p01 = image + (ylo[a] * W + xhi[b]) * C
                    p10 = image + (yhi[a] * W + xlo[b]) * C
                    p11 = image + (yhi[a] * W + xhi[b]) * C
                    if mode == MODE_AVG:
                        for c in range(C):
                            ob[c] += bilerp(wy0[a], wy1[a], wx0[b], wx1[b], p00[c], p01[c],
                                            p10[c], p11[c])
                    elif mode == MODE_MAX:
                        for c in range(C):
                            v = bilerp(wy0[a], wy1[a], wx0[b], wx1[b], p00[c], p01[c], p10[c], p11[c])
                            if first or v > ob[c]:
                                ob[c] = v
                    else:
                        for c in range(C):
                            v = tap_max(wy0[a], wy1[a], wx0[b], wx1[b], p00[c], p01[c], p10[c], p11[c])
                            if first or v > ob[c]:
                                ob[c] = v
                    first = False
            if mode == MODE_AVG:
                for c in range(C):
                    ob[c] *= inv_count


def forward(const floating[:, :, :, ::1] features, const int64_t[::1] batch_idx,
            const int64_t[::1] order, const int64_t[::1] img_start, Py_ssize_t j0, Py_ssize_t j1,
            const int64_t[::1] gh, const int64_t[::1] gw, _Tables t, floating[:, :, :, ::1] out,
            int mode, bint channels_last, bint interleave, int n_threads):
    """Pool the boxes at sorted positions j0..j1 (tables ``t``) into ``out``. ``interleave``
    (NCHW) pools from channels-last copies of blocks of planes: worth it when the boxes take
    several samples per feature pixel, otherwise the boxes are split over the threads."""
    cdef Py_ssize_t N, C, H, W, PH, PW, n, c, j, k, q, lo, hi, task
    cdef const floating* X = &features[0, 0, 0, 0]
    cdef floating* O = &out[0, 0, 0, 0]
    cdef const Py_ssize_t[::1] ylo = t.ylo, yhi = t.yhi, xlo = t.xlo, xhi = t.xhi
    cdef const Py_ssize_t[::1] yoff = t.yoff, xoff = t.xoff
    cdef const floating[::1] wy0 = t.wy0, wy1 = t.wy1, wx0 = t.wx0, wx1 = t.wx1
    if channels_last:
        N, H, W, C = features.shape[0], features.shape[1], features.shape[2], features.shape[3]
        PH, PW = out.shape[1], out.shape[2]
        for j in prange(j0, j1, nogil=True, schedule="dynamic", num_threads=n_threads):
            k = order[j]
            q = j - j0
            pool_box_nhwc(X + batch_idx[k] * H * W * C, W, C, O + k * PH * PW * C, PH, PW, gh[k],
                          gw[k], &ylo[yoff[q]], &yhi[yoff[q]], &wy0[yoff[q]], &wy1[yoff[q]],
                          &xlo[xoff[q]], &xhi[xoff[q]], &wx0[xoff[q]], &wx1[xoff[q]], mode)
        return
    N, C, H, W = features.shape[0], features.shape[1], features.shape[2], features.shape[3]
    PH, PW = out.shape[2], out.shape[3]
    cdef Py_ssize_t blocks = (C + PLANE_BLOCK - 1) // PLANE_BLOCK, nb
    cdef floating* scratch
    cdef int alloc_failed[1]
    cdef BlockTask bt
    cdef floating* obuf
    if interleave:
        # one task per (image, block of LANES channels): interleave the block into a
        # channels-last scratch once, then pool all the image's boxes from it with vector code
        blocks = (C + LANES - 1) // LANES
        alloc_failed[0] = 0
        with nogil, parallel(num_threads=n_threads):
            scratch = <floating*>malloc(H * W * LANES * sizeof(floating))
            obuf = <floating*>malloc(PH * PW * LANES * sizeof(floating))
            for task in prange(N * blocks, schedule="dynamic"):
                if scratch == NULL or obuf == NULL:
                    alloc_failed[0] = 1  # reported after the parallel region
                    continue
                bt = block_task(task, blocks, C, &img_start[0], j0, j1)
                n, c, nb, lo, hi = bt.n, bt.c, bt.nb, bt.lo, bt.hi
                interleave_planes(X + (n * C + c) * H * W, H * W, nb, scratch)
                for j in range(lo, hi):
                    k = order[j]
                    q = j - j0
                    pool_box_nhwc(scratch, W, LANES, obuf, PH, PW, gh[k], gw[k], &ylo[yoff[q]],
                                  &yhi[yoff[q]], &wy0[yoff[q]], &wy1[yoff[q]], &xlo[xoff[q]],
                                  &xhi[xoff[q]], &wx0[xoff[q]], &wx1[xoff[q]], mode)
                    deinterleave_bins(obuf, PH * PW, nb, O + (k * C + c) * PH * PW)
            free(scratch)
            free(obuf)
        if alloc_failed[0]:
            raise MemoryError(f"cannot allocate {H * W * LANES * sizeof(floating)} bytes "
                              "of per-thread scratch")
    else:
        # too few planes to keep the threads busy: split the boxes instead
        for j in prange(j0, j1, nogil=True, schedule="dynamic", num_threads=n_threads):
            k = order[j]
            q = j - j0
            for nb in range(blocks):
                c = nb * PLANE_BLOCK
                pool_box_planes(X + (batch_idx[k] * C + c) * H * W, H * W,
                                C - c if C - c < PLANE_BLOCK else PLANE_BLOCK, W,
                                O + (k * C + c) * PH * PW, PH, PW, gh[k], gw[k], &ylo[yoff[q]],
                                &yhi[yoff[q]], &wy0[yoff[q]], &wy1[yoff[q]], &xlo[xoff[q]],
                                &xhi[xoff[q]], &wx0[xoff[q]], &wx1[xoff[q]], mode)


cdef inline void pool_box_planes(const floating* plane, Py_ssize_t plane_stride,
                                 Py_ssize_t n_planes, Py_ssize_t W, floating* o, Py_ssize_t PH,
                                 Py_ssize_t PW, Py_ssize_t gh, Py_ssize_t gw,
                                 const Py_ssize_t* ylo, const Py_ssize_t* yhi,
                                 const floating* wy0, const floating* wy1, const Py_ssize_t* xlo,
                                 const Py_ssize_t* xhi, const floating* wx0, const floating* wx1,
                                 int mode) noexcept nogil:
    cdef Py_ssize_t cc
    if mode == MODE_AVG:
        average_planes(plane, plane_stride, n_planes, W, o, PH * PW, PH, PW, gh, gw, ylo, yhi,
                       wy0, wy1, xlo, xhi, wx0, wx1)
    else:
        for cc in range(n_planes):
            pool_plane(plane + cc * plane_stride, W, o + cc * PH * PW, PH, PW, gh, gw, ylo, yhi,
                       wy0, wy1, xlo, xhi, wx0, wx1, mode)


# ---------------------------------------------------------------------------------------------
# gradient with respect to the features

cdef void scatter_box_nhwc(floating* gimage, const floating* image, Py_ssize_t W, Py_ssize_t C,
                           Py_ssize_t nc, const floating* g, Py_ssize_t PH, Py_ssize_t PW,
                           Py_ssize_t gh, Py_ssize_t gw, const Py_ssize_t* ylo,
                           const Py_ssize_t* yhi, const floating* wy0, const floating* wy1,
                           const Py_ssize_t* xlo, const Py_ssize_t* xhi, const floating* wx0,
                           const floating* wx1, int mode) noexcept nogil:
    """Channels-last twin of scatter_plane for a block of nc <= CHANNEL_BLOCK channels; pixel
    (y, x) of the block starts at (y * W + x) * C, and g holds bin (ph, pw) at (ph * PW + pw) * C."""
    cdef Py_ssize_t ph, pw, iy, ix, a, b, c, s
    cdef floating* q00
    cdef floating* q01
    cdef floating* q10
    cdef floating* q11
    cdef const floating* gb
    cdef floating w00, w01, w10, w11, inv_count, v
    cdef floating best[CHANNEL_BLOCK]
    cdef Py_ssize_t arg[CHANNEL_BLOCK]
    if gh == 0 or gw == 0:
        return
    inv_count = 1 / <floating>(gh * gw)
    for ph in range(PH):
        for pw in range(PW):
            gb = g + (ph * PW + pw) * C
            if mode == MODE_AVG:
                for iy in range(gh):
                    a = ph * gh + iy
                    for ix in range(gw):
                        b = pw * gw + ix
                        w00 = wy0[a] * wx0[b] * inv_count
                        w01 = wy0[a] * wx1[b] * inv_count
                        w10 = wy1[a] * wx0[b] * inv_count
                        w11 = wy1[a] * wx1[b] * inv_count
                        q00 = gimage + (ylo[a] * W + xlo[b]) * C
                        q01 = gimage + (ylo[a] * W + xhi[b]) * C
                        q10 = gimage + (yhi[a] * W + xlo[b]) * C
                        q11 = gimage + (yhi[a] * W + xhi[b]) * C
                        for c in range(nc):
                            q00[c] += gb[c] * w00
                            q01[c] += gb[c] * w01
                            q10[c] += gb[c] * w10
                            q11[c] += gb[c] * w11
            else:
                for c in range(nc):
                    arg[c] = argmax_sample(image + c, C, W, ph, pw, gh, gw, ylo, yhi, wy0, wy1,
                                           xlo, xhi, wx0, wx1, mode, &best[c])
                for c in range(nc):
                    a = ph * gh + arg[c] // gw
                    b = pw * gw + arg[c] % gw
                    gimage[(ylo[a] * W + xlo[b]) * C + c] += gb[c] * wy0[a] * wx0[b]
                    gimage[(ylo[a] * W + xhi[b]) * C + c] += gb[c] * wy0[a] * wx1[b]
                    gimage[(yhi[a] * W + xlo[b]) * C + c] += gb[c] * wy1[a] * wx0[b]
                    gimage[(yhi[a] * W + xhi[b]) * C + c] += gb[c] * wy1[a] * wx1[b]


def backward_features(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] features,
                      const int64_t[::1] batch_idx, const int64_t[::1] order,
                      const int64_t[::1] img_start, Py_ssize_t j0, Py_ssize_t j1,
                      const int64_t[::1] gh, const int64_t[::1] gw, _Tables t,
                      floating[:, :, :, ::1] grad_features, int mode, bint channels_last,
                      int n_threads):
    """Add the feature gradient of the boxes at sorted positions j0..j1. Every gradient element
    is owned by one thread and receives its terms in the fixed sorted-box order."""
    cdef Py_ssize_t N, C, H, W, PH, PW, n, c, c0, j, k, q, lo, hi, task
    cdef const floating* GO = &grad_out[0, 0, 0, 0]
    cdef const floating* X = &features[0, 0, 0, 0]
    cdef floating* G = &grad_features[0, 0, 0, 0]
    cdef const Py_ssize_t[::1] ylo = t.ylo, yhi = t.yhi, xlo = t.xlo, xhi = t.xhi
    cdef const Py_ssize_t[::1] yoff = t.yoff, xoff = t.xoff
    cdef const floating[::1] wy0 = t.wy0, wy1 = t.wy1, wx0 = t.wx0, wx1 = t.wx1
    if channels_last:
        N, H, W, C = grad_features.shape[0], grad_features.shape[1], grad_features.shape[2], grad_features.shape[3]
        PH, PW = grad_out.shape[1], grad_out.shape[2]
        for task in prange((C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK, nogil=True,
                           schedule="static", num_threads=n_threads):
            c0 = task * CHANNEL_BLOCK
            for j in range(j0, j1):
                k = order[j]
                q = j - j0
                n = batch_idx[k]
                scatter_box_nhwc(G + n * H * W * C + c0, X + n * H * W * C + c0, W, C,
                                 C - c0 if C - c0 < CHANNEL_BLOCK else CHANNEL_BLOCK,
                                 GO + k * PH * PW * C + c0, PH, PW, gh[k], gw[k], &ylo[yoff[q]],
                                 &yhi[yoff[q]], &wy0[yoff[q]], &wy1[yoff[q]], &xlo[xoff[q]],
                                 &xhi[xoff[q]], &wx0[xoff[q]], &wx1[xoff[q]], mode)
        return
    N, C, H, W = grad_features.shape[0], grad_features.shape[1], grad_features.shape[2], grad_features.shape[3]
    PH, PW = grad_out.shape[2], grad_out.shape[3]
    # one task per (image, block of LANES channels), accumulated in channels-last scratch (vector
    # code, as in the forward) and added back to the planes the task owns
    cdef Py_ssize_t blocks = (C + LANES - 1) // LANES, nb, cc, i
    cdef floating* gscratch
    cdef floating* fscratch
    cdef int alloc_failed[1]
    cdef BlockTask bt
    cdef floating* gbuf
    alloc_failed[0] = 0
    with nogil, parallel(num_threads=n_threads):
        gscratch = <floating*>malloc(H * W * LANES * sizeof(floating))
        fscratch = <floating*>malloc((H * W * LANES if mode != MODE_AVG else 1) * sizeof(floating))
        gbuf = <floating*>malloc(PH * PW * LANES * sizeof(floating))
        for task in prange(N * blocks, schedule="dynamic"):
            if gscratch == NULL or fscratch == NULL or gbuf == NULL:
                alloc_failed[0] = 1  # reported after the parallel region
                continue
            bt = block_task(task, blocks, C, &img_start[0], j0, j1)
            n, c, nb, lo, hi = bt.n, bt.c, bt.nb, bt.lo, bt.hi
            memset(gscratch, 0, H * W * LANES * sizeof(floating))
            if mode != MODE_AVG:
                interleave_planes(X + (n * C + c) * H * W, H * W, nb, fscratch)
            for j in range(lo, hi):
                k = order[j]
                q = j - j0
                interleave_planes(GO + (k * C + c) * PH * PW, PH * PW, nb, gbuf)
                scatter_box_nhwc(gscratch, fscratch, W, LANES, LANES, gbuf, PH, PW, gh[k], gw[k],
                                 &ylo[yoff[q]], &yhi[yoff[q]], &wy0[yoff[q]], &wy1[yoff[q]],
                                 &xlo[xoff[q]], &xhi[xoff[q]], &wx0[xoff[q]], &wx1[xoff[q]], mode)
            add_deinterleaved(gscratch, H * W, nb, G + (n * C + c) * H * W)
        free(gscratch)
        free(fscratch)
        free(gbuf)
    if alloc_failed[0]:
        raise MemoryError(f"cannot allocate {H * W * LANES * sizeof(floating)} bytes "
                          "of per-thread scratch")


# ---------------------------------------------------------------------------------------------
# gradient with respect to the boxes

cdef void box_grad_channel(const floating* plane, Py_ssize_t cs, Py_ssize_t W, const floating* g,
                           Py_ssize_t gs, Py_ssize_t PH, Py_ssize_t PW, Py_ssize_t gh,
                           Py_ssize_t gw, const Py_ssize_t* ylo, const Py_ssize_t* yhi,
                           const floating* wy0, const floating* wy1, const floating* sy,
                           const Py_ssize_t* xlo, const Py_ssize_t* xhi, const floating* wx0,
                           const floating* wx1, const floating* sx, int mode,
                           double* acc) noexcept nogil:
    """Accumulate, for one channel, sum g * dv/dy, sum g * dv/dy * t_y and the same for x, where
    t is the sample's fraction across the roi (d coordinate / d roi size). ``cs``: distance between
    horizontally adjacent pixels; ``gs``: between consecutive bins of g."""
    cdef Py_ssize_t ph, pw, iy, ix, a, b, arg, iy0, iy1, ix0, ix1
    cdef double gv, v00, v01, v10, v11, dy, dx, inv_count
    cdef floating best
    if gh == 0 or gw == 0:
        return
    inv_count = 1.0 / <double>(gh * gw)
    for ph in range(PH):
        for pw in range(PW):
            gv = g[(ph * PW + pw) * gs]
            if mode == MODE_AVG:
                gv = gv * inv_count
                iy0, iy1, ix0, ix1 = 0, gh, 0, gw
            else:
                arg = argmax_sample(plane, cs, W, ph, pw, gh, gw, ylo, yhi, wy0, wy1, xlo, xhi,
                                    wx0, wx1, mode, &best)
                iy0, ix0 = arg // gw, arg % gw
                iy1, ix1 = iy0 + 1, ix0 + 1
            for iy in range(iy0, iy1):
                a = ph * gh + iy
                for ix in range(ix0, ix1):
                    b = pw * gw + ix
                    v00 = plane[(ylo[a] * W + xlo[b]) * cs]
                    v01 = plane[(ylo[a] * W + xhi[b]) * cs]
                    v10 = plane[(yhi[a] * W + xlo[b]) * cs]
                    v11 = plane[(yhi[a] * W + xhi[b]) * cs]
                    dy = gv * sy[a] * ((wx0[b] * v10 + wx1[b] * v11) - (wx0[b] * v00 + wx1[b] * v01))
                    dx = gv * sx[b] * (wy0[a] * (v01 - v00) + wy1[a] * (v11 - v10))
                    acc[0] += dy
                    acc[1] += dy * sample_fraction(ph, iy, gh, PH)
                    acc[2] += dx
                    acc[3] += dx * sample_fraction(pw, ix, gw, PW)


cdef void box_grad_lanes(const floating* block, Py_ssize_t W, const floating* g, Py_ssize_t PH,
                         Py_ssize_t PW, Py_ssize_t gh, Py_ssize_t gw, const Py_ssize_t* ylo,
                         const Py_ssize_t* yhi, const floating* wy0, const floating* wy1,
                         const floating* sy, const Py_ssize_t* xlo, const Py_ssize_t* xhi,
                         const floating* wx0, const floating* wx1, const floating* sx,
                         double* acc) noexcept nogil:
    """Average mode box_grad_channel for LANES interleaved channels at once (vector code): block
    holds pixel (y, x) at (y * W + x) * LANES, g bin b at b * LANES."""
    cdef Py_ssize_t ph, pw, iy, ix, a, b, cc
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
    if gh == 0 or gw == 0:
        return
    inv_count = 1.0 / <double>(gh * gw)
    for cc in range(LANES):
        ay[cc] = aty[cc] = ax[cc] = atx[cc] = 0
    for ph in range(PH):
        for pw in range(PW):
            gb = g + (ph * PW + pw) * LANES
            for iy in range(gh):
                a = ph * gh + iy
                ty = sample_fraction(ph, iy, gh, PH)
                for ix in range(gw):
                    b = pw * gw + ix
                    tx = sample_fraction(pw, ix, gw, PW)
                    fy = sy[a] * inv_count
                    fx = sx[b] * inv_count
                    p00 = block + (ylo[a] * W + xlo[b]) * LANES
                    p01 = block + (ylo[a] * W + xhi[b]) * LANES
                    p10 = block + (yhi[a] * W + xlo[b]) * LANES
                    p11 = block + (yhi[a] * W + xhi[b]) * LANES
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
    """Chain rule from the sample sums of box_grad_channel to (x1, y1, x2, y2) (spec section 5).
    A sample at start + t * roi_size moves by scale * (1 - t) with the low corner and scale * t
    with the high one, unless the roi size was clamped to 1 (then only the low corner moves it)."""
    cdef floating start, bin_size
    cdef bint clamped_y, clamped_x
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
                        Py_ssize_t PH, Py_ssize_t PW, Py_ssize_t gh, Py_ssize_t gw,
                        const Py_ssize_t* ylo, const Py_ssize_t* yhi, const floating* wy0,
                        const floating* wy1, const floating* sy, const Py_ssize_t* xlo,
                        const Py_ssize_t* xhi, const floating* wx0, const floating* wx1,
                        const floating* sx, double scale, bint aligned, int mode) noexcept nogil:
    cdef double acc[4]
    cdef Py_ssize_t c
    acc[0] = acc[1] = acc[2] = acc[3] = 0
    for c in range(C):
        box_grad_channel(image + c, C, W, g + c, C, PH, PW, gh, gw, ylo, yhi, wy0, wy1, sy, xlo,
                         xhi, wx0, wx1, sx, mode, acc)
    finish_box_grad(rois, grad_rois, k, acc, PH, PW, scale, aligned)


def backward_boxes(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] features,
                   const floating[:, ::1] rois, const int64_t[::1] batch_idx,
                   const int64_t[::1] order, const int64_t[::1] img_start, Py_ssize_t j0,
                   Py_ssize_t j1, const int64_t[::1] gh, const int64_t[::1] gw, _Tables t,
                   floating[:, ::1] grad_rois, double scale, bint aligned, int mode,
                   bint channels_last, int n_threads):
    """Add d(sum(grad_out * out)) / d(x1, y1, x2, y2) of the boxes at sorted positions j0..j1.
    NHWC: one thread per box. NCHW: one task per (image, block of LANES planes) from
    channels-last scratch, each writing its own partial sums per box, then added up per box in
    block order. Either way the result does not depend on the thread count."""
    cdef Py_ssize_t N, C, H, W, PH, PW, j, k, q, n, c, nb, cc, lo, hi, task, blocks, i
    cdef const floating* GO = &grad_out[0, 0, 0, 0]
    cdef const floating* X = &features[0, 0, 0, 0]
    cdef const Py_ssize_t[::1] ylo = t.ylo, yhi = t.yhi, xlo = t.xlo, xhi = t.xhi
    cdef const Py_ssize_t[::1] yoff = t.yoff, xoff = t.xoff
    cdef const floating[::1] wy0 = t.wy0, wy1 = t.wy1, wx0 = t.wx0, wx1 = t.wx1
    cdef const floating[::1] sy = t.sy, sx = t.sx
    cdef floating* scratch
    cdef floating* gbuf
    cdef int alloc_failed[1]
    cdef BlockTask bt
    cdef double[::1] partial
    if channels_last:
        N, H, W, C = features.shape[0], features.shape[1], features.shape[2], features.shape[3]
        PH, PW = grad_out.shape[1], grad_out.shape[2]
        for j in prange(j0, j1, nogil=True, schedule="dynamic", num_threads=n_threads):
            k = order[j]
            q = j - j0
            box_grad_nhwc(rois, grad_rois, k, X + batch_idx[k] * H * W * C, C, W,
                          GO + k * PH * PW * C, PH, PW, gh[k], gw[k], &ylo[yoff[q]],
                          &yhi[yoff[q]], &wy0[yoff[q]], &wy1[yoff[q]], &sy[yoff[q]],
                          &xlo[xoff[q]], &xhi[xoff[q]], &wx0[xoff[q]], &wx1[xoff[q]],
                          &sx[xoff[q]], scale, aligned, mode)
        return
    N, C, H, W = features.shape[0], features.shape[1], features.shape[2], features.shape[3]
    PH, PW = grad_out.shape[2], grad_out.shape[3]
    blocks = (C + LANES - 1) // LANES
    partial = np.zeros((j1 - j0) * blocks * 4 + 1)
    alloc_failed[0] = 0
    with nogil, parallel(num_threads=n_threads):
        scratch = <floating*>malloc(H * W * LANES * sizeof(floating))
        gbuf = <floating*>malloc(PH * PW * LANES * sizeof(floating))
        for task in prange(N * blocks, schedule="dynamic"):
            if scratch == NULL or gbuf == NULL:
                alloc_failed[0] = 1  # reported after the parallel region
                continue
            bt = block_task(task, blocks, C, &img_start[0], j0, j1)
            n, c, nb, lo, hi = bt.n, bt.c, bt.nb, bt.lo, bt.hi
            interleave_planes(X + (n * C + c) * H * W, H * W, nb, scratch)
            for j in range(lo, hi):
                k = order[j]
                q = j - j0
                if mode == MODE_AVG:
                    interleave_planes(GO + (k * C + c) * PH * PW, PH * PW, nb, gbuf)
                    box_grad_lanes(scratch, W, gbuf, PH, PW, gh[k], gw[k], &ylo[yoff[q]],
                                   &yhi[yoff[q]], &wy0[yoff[q]], &wy1[yoff[q]], &sy[yoff[q]],
                                   &xlo[xoff[q]], &xhi[xoff[q]], &wx0[xoff[q]], &wx1[xoff[q]],
                                   &sx[xoff[q]], &partial[(q * blocks + task % blocks) * 4])
                    continue
                for cc in range(nb):
                    box_grad_channel(scratch + cc, LANES, W, GO + (k * C + c + cc) * PH * PW, 1,
                                     PH, PW, gh[k], gw[k], &ylo[yoff[q]], &yhi[yoff[q]],
                                     &wy0[yoff[q]], &wy1[yoff[q]], &sy[yoff[q]], &xlo[xoff[q]],
                                     &xhi[xoff[q]], &wx0[xoff[q]], &wx1[xoff[q]], &sx[xoff[q]],
                                     mode, &partial[(q * blocks + task % blocks) * 4])
        free(scratch)
        free(gbuf)
    if alloc_failed[0]:
        raise MemoryError(f"cannot allocate {H * W * LANES * sizeof(floating)} bytes "
                          "of per-thread scratch")
    for j in prange(j0, j1, nogil=True, schedule="static", num_threads=n_threads):
        q = j - j0
        for i in range(1, blocks):
            for cc in range(4):
                partial[q * blocks * 4 + cc] += partial[(q * blocks + i) * 4 + cc]
        finish_box_grad(rois, grad_rois, order[j], &partial[q * blocks * 4], PH, PW, scale,
                        aligned)

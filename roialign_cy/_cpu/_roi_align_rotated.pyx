"""Rotated RoIAlign on the CPU: forward (average), feature and box gradients (docs/conventions.md,
section 4).

A rotated box is not separable, so each box gets a table of its samples (4 pixel indices and 4
bilinear weights each), filled once and reused over all channels. Per bin the table holds only the
samples inside the image (they count as 0 otherwise and never read the map), with their number.
The kernels work on *pieces*: runs of bins of one box (usually the whole box), so that the tables
of one huge box are built a piece at a time and memory stays bounded.

The loops are those of the axis-aligned kernels: NHWC splits the pieces over threads with vector
code over channels; NCHW copies blocks of LANES planes to channels-last scratch (one task per image
and block) when the boxes take enough samples to pay for it, and otherwise splits the pieces (the
forward) or gives each thread whole planes read directly (the gradients). The feature gradient lets
each thread own the channels it writes, so it is bit-identical for any thread count.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport M_PI, cos, sin
from libc.stdint cimport int64_t
from libc.string cimport memset

import numpy as np

from .._buffers import host_array

from ._geometry cimport bilinear_axis, grid_size, sample_coord, sample_fraction
from ._lanes cimport (LANES, BlockTask, Scratch, add_deinterleaved, block_task, check_scratch,
                      deinterleave_bins, interleave_planes, scratch_close, scratch_open)
from ._cost cimport blocks_pay, streams_output, threads_for_tables, threads_for_work
from ._calls cimport (Plain, Sizes, plain_call, plain_flag, plain_int, scan_boxes, small_block,
                      small_output, small_sizes, sort_by_image)
from libc.stdlib cimport calloc, free

from ._openmp import effective_n_threads


cdef struct Frame:
    # a box in feature-map coordinates: centre, size (after the legacy clamp), rotation
    double cy, cx, roi_h, roi_w, cos_t, sin_t
    bint clamped_h, clamped_w


cdef inline Frame box_frame(const floating* roi, double scale, bint aligned,
                            bint clockwise) noexcept nogil:
    """(cx, cy, w, h, angle_degrees) -> Frame. Counter-clockwise angles (detectron2, Caffe2);
    clockwise=True negates them (mmcv)."""
    cdef Frame f
    cdef double offset = 0.5 if aligned else 0.0
    cdef double theta = roi[4] * M_PI / 180.0
    if clockwise:
        theta = -theta
    f.cx = <floating>(roi[0] * scale - offset)
    f.cy = <floating>(roi[1] * scale - offset)
    f.roi_w = <floating>(roi[2] * scale)
    f.roi_h = <floating>(roi[3] * scale)
    f.clamped_w = f.clamped_h = False
    if not aligned:
        # legacy convention (Caffe2, mmcv): boxes below one pixel grow to one pixel
        if f.roi_w < 1:
            f.roi_w = 1
            f.clamped_w = True
        if f.roi_h < 1:
            f.roi_h = 1
            f.clamped_h = True
    f.cos_t = <floating>cos(theta)
    f.sin_t = <floating>sin(theta)
    return f


def grid_sizes(const floating[:, ::1] rois, Py_ssize_t pooled_h, Py_ssize_t pooled_w,
               double scale, Py_ssize_t sampling_ratio, bint aligned):
    """Samples per bin (gh, gw) of every rotated box, as int64 arrays."""
    cdef Py_ssize_t K = rois.shape[0], k
    cdef Frame f
    gh_arr = np.empty(K, dtype=np.int64)
    gw_arr = np.empty(K, dtype=np.int64)
    cdef int64_t[::1] gh = gh_arr, gw = gw_arr
    with nogil:
        for k in range(K):
            f = box_frame(&rois[k, 0], scale, aligned, False)
            gh[k] = grid_size(sampling_ratio, <floating>f.roi_h, pooled_h)
            gw[k] = grid_size(sampling_ratio, <floating>f.roi_w, pooled_w)
    return gh_arr, gw_arr


cdef inline void sample_point(Frame* f, Py_ssize_t ph, Py_ssize_t pw, Py_ssize_t iy,
                              Py_ssize_t ix, Py_ssize_t gh, Py_ssize_t gw, Py_ssize_t PH,
                              Py_ssize_t PW, floating* y, floating* x, floating* yy,
                              floating* xx) noexcept nogil:
    """Sample (iy, ix) of bin (ph, pw): its offset (yy, xx) from the centre in the box frame and
    its position (y, x) on the map, y = yy cos - xx sin + cy, x = yy sin + xx cos + cx."""
    cdef floating roi_h = <floating>f.roi_h, roi_w = <floating>f.roi_w
    cdef floating c = <floating>f.cos_t, s = <floating>f.sin_t
    yy[0] = sample_coord(-roi_h / 2, roi_h / <floating>PH, ph, iy, gh)
    xx[0] = sample_coord(-roi_w / 2, roi_w / <floating>PW, pw, ix, gw)
    y[0] = yy[0] * c - xx[0] * s + <floating>f.cy
    x[0] = yy[0] * s + xx[0] * c + <floating>f.cx


cdef void fill_samples(const floating* roi, double scale, bint aligned, bint clockwise,
                       Py_ssize_t PH, Py_ssize_t PW, Py_ssize_t bin0, Py_ssize_t bin1,
                       Py_ssize_t gh, Py_ssize_t gw, Py_ssize_t H, Py_ssize_t W, Py_ssize_t* nv,
                       Py_ssize_t* idx, floating* w) noexcept nogil:
    """Table of bins bin0..bin1 of one box: bin b's samples inside the image (in iy, ix order)
    take slots t = (b - bin0) * gh * gw + s, s < nv[b - bin0], with the pixel indices y * W + x
    of their 4 taps in idx[4t..4t+3] and their weights in w[4t..4t+3]."""
    cdef Frame f = box_frame(roi, scale, aligned, clockwise)
    # out-parameters of sample_point and bilinear_axis, zeroed for Cython's flow analysis
    cdef Py_ssize_t b, ph, pw, iy, ix, t, y0 = 0, y1 = 0, x0 = 0, x1 = 0
    cdef floating y = 0, x = 0, yy = 0, xx = 0, a0 = 0, a1 = 0, b0 = 0, b1 = 0, sy = 0, sx = 0
    for b in range(bin0, bin1):
        ph, pw = b // PW, b % PW
        t = (b - bin0) * gh * gw
        nv[b - bin0] = 0
        for iy in range(gh):
            for ix in range(gw):
                sample_point(&f, ph, pw, iy, ix, gh, gw, PH, PW, &y, &x, &yy, &xx)
                # the sample is 0 when either coordinate leaves [-1, size]
                if not (bilinear_axis(y, H, &y0, &y1, &a0, &a1, &sy) and
                        bilinear_axis(x, W, &x0, &x1, &b0, &b1, &sx)):
                    continue
                idx[4 * t] = y0 * W + x0
                idx[4 * t + 1] = y0 * W + x1
                idx[4 * t + 2] = y1 * W + x0
                idx[4 * t + 3] = y1 * W + x1
                w[4 * t] = a0 * b0
                w[4 * t + 1] = a0 * b1
                w[4 * t + 2] = a1 * b0
                w[4 * t + 3] = a1 * b1
                t += 1
                nv[b - bin0] += 1


cdef class _Samples:
    """Sample tables of the pieces at sorted positions j0..j1: piece q's samples start at slot
    off[q], its bins' valid counts at nv[boff[q]]."""
    cdef public object idx, w, off, nv, boff


def make_tables(const floating[:, ::1] rois, const int64_t[::1] order, const int64_t[::1] bin0,
                const int64_t[::1] bin1, Py_ssize_t j0, Py_ssize_t j1, const int64_t[::1] gh,
                const int64_t[::1] gw, Py_ssize_t H, Py_ssize_t W, Py_ssize_t PH, Py_ssize_t PW,
                double scale, bint aligned, bint clockwise, int n_threads):
    dtype = np.float32 if floating is float else np.float64
    cdef Py_ssize_t n = j1 - j0, j, k
    t = _Samples()
    off_arr = np.zeros(n + 1, dtype=np.intp)
    boff_arr = np.zeros(n + 1, dtype=np.intp)
    sel = np.asarray(order[j0:j1])
    bins = np.asarray(bin1[j0:j1]) - np.asarray(bin0[j0:j1])
    np.cumsum(np.asarray(gh)[sel] * np.asarray(gw)[sel] * bins, out=off_arr[1:])
    np.cumsum(bins, out=boff_arr[1:])
    total = int(off_arr[n])
    # one slack sample so that &table[offset] is valid for boxes with no samples
    t.idx = np.zeros(4 * (total + 1), np.intp)
    t.w = np.zeros(4 * (total + 1), dtype)
    t.nv = np.zeros(int(boff_arr[n]) + 1, np.intp)
    t.off, t.boff = off_arr, boff_arr
    cdef Py_ssize_t[::1] idx = t.idx, off = off_arr, nv = t.nv, boff = boff_arr
    cdef floating[::1] w = t.w
    for j in prange(n, nogil=True, schedule="dynamic", num_threads=n_threads):
        k = order[j0 + j]
        fill_samples(&rois[k, 0], scale, aligned, clockwise, PH, PW, bin0[j0 + j], bin1[j0 + j],
                     gh[k], gw[k], H, W, &nv[boff[j]], &idx[4 * off[j]], &w[4 * off[j]])
    return t


# ---------------------------------------------------------------------------------------------
# forward and feature gradient: sample tables over channels-last data (pixel stride cs)

cdef void pool_samples(const floating* image, Py_ssize_t cs, Py_ssize_t nc, floating* o,
                       Py_ssize_t ob, Py_ssize_t n_bins, Py_ssize_t count, const Py_ssize_t* nv,
                       const Py_ssize_t* idx, const floating* w) noexcept nogil:
    """o[bin * ob + c] = mean over the bin's ``count`` samples of the bilinear value of channel
    c < nc; only the nv[bin] samples inside the image are read (the others are 0)."""
    cdef Py_ssize_t b, s, t, c
    cdef floating* ob_ptr
    cdef const floating* p00
    cdef const floating* p01
    cdef const floating* p10
    cdef const floating* p11
    cdef floating w00, w01, w10, w11, inv_count
    inv_count = 1 / <floating>count if count > 0 else 0
    for b in range(n_bins):
        ob_ptr = o + b * ob
        for c in range(nc):
            ob_ptr[c] = 0
        for s in range(nv[b]):
            t = 4 * (b * count + s)
            p00 = image + idx[t] * cs
            p01 = image + idx[t + 1] * cs
            p10 = image + idx[t + 2] * cs
            p11 = image + idx[t + 3] * cs
            w00, w01, w10, w11 = w[t], w[t + 1], w[t + 2], w[t + 3]
            for c in range(nc):
                ob_ptr[c] += w00 * p00[c] + w01 * p01[c] + w10 * p10[c] + w11 * p11[c]
        for c in range(nc):
            ob_ptr[c] *= inv_count


cdef void scatter_samples(floating* gimage, Py_ssize_t cs, Py_ssize_t nc, const floating* g,
                          Py_ssize_t gb, Py_ssize_t n_bins, Py_ssize_t count,
                          const Py_ssize_t* nv, const Py_ssize_t* idx,
                          const floating* w) noexcept nogil:
    """Each sample inside the image sends g[bin * gb + c] * weight / count to its 4 taps."""
    cdef Py_ssize_t b, s, t, c
    cdef const floating* gp
    cdef floating* q00
    cdef floating* q01
    cdef floating* q10
    cdef floating* q11
    cdef floating w00, w01, w10, w11, inv_count
    if count == 0:
        return
    inv_count = 1 / <floating>count
    for b in range(n_bins):
        gp = g + b * gb
        for s in range(nv[b]):
            t = 4 * (b * count + s)
            q00 = gimage + idx[t] * cs
            q01 = gimage + idx[t + 1] * cs
            q10 = gimage + idx[t + 2] * cs
            q11 = gimage + idx[t + 3] * cs
            w00, w01 = w[t] * inv_count, w[t + 1] * inv_count
            w10, w11 = w[t + 2] * inv_count, w[t + 3] * inv_count
            for c in range(nc):
                q00[c] += gp[c] * w00
                q01[c] += gp[c] * w01
                q10[c] += gp[c] * w10
                q11[c] += gp[c] * w11


cdef struct Pieces:
    # The pieces of a call sorted by image: piece j (j0 <= j < j1) is bins bin0[j]..bin1[j] of
    # box order[j]; image n's pieces start at img_start[n]. Their sample tables (make_tables):
    # piece q = j - j0 has its samples from slot off[q] and its bins' valid counts at nv[boff[q]];
    # w holds the weights in the kernel's dtype.
    const int64_t* batch_idx
    const int64_t* order
    const int64_t* bin0
    const int64_t* bin1
    const int64_t* img_start
    const int64_t* gh
    const int64_t* gw
    Py_ssize_t j0, j1
    const Py_ssize_t* idx
    const Py_ssize_t* off
    const Py_ssize_t* nv
    const Py_ssize_t* boff
    const char* w


def forward(const floating[:, :, :, ::1] features, const int64_t[::1] batch_idx,
            const int64_t[::1] order, const int64_t[::1] bin0, const int64_t[::1] bin1,
            const int64_t[::1] img_start, Py_ssize_t j0, Py_ssize_t j1, const int64_t[::1] gh,
            const int64_t[::1] gw, _Samples t, floating[:, :, :, ::1] out, bint channels_last,
            bint interleave, int n_threads):
    """Pool the pieces at sorted positions j0..j1 (box order[j], bins bin0[j]..bin1[j]); see
    pool_pieces."""
    cdef const Py_ssize_t[::1] idx = t.idx, off = t.off, nv = t.nv, boff = t.boff
    cdef const floating[::1] w = t.w
    cdef Pieces P
    P.batch_idx, P.order, P.bin0, P.bin1 = &batch_idx[0], &order[0], &bin0[0], &bin1[0]
    P.img_start, P.gh, P.gw, P.j0, P.j1 = &img_start[0], &gh[0], &gw[0], j0, j1
    P.idx, P.off, P.nv, P.boff, P.w = &idx[0], &off[0], &nv[0], &boff[0], <const char*>&w[0]
    cdef size_t failed
    with nogil:
        failed = pool_pieces(&features[0, 0, 0, 0], &out[0, 0, 0, 0], features.shape,
                             out.shape, &P, channels_last, interleave, n_threads)
    check_scratch(failed)


cdef size_t pool_pieces(const floating* X, floating* O, const Py_ssize_t* fshape,
                        const Py_ssize_t* oshape, const Pieces* P, bint channels_last,
                        bint interleave, int n_threads) noexcept nogil:
    """NHWC: one task per piece, vector code over the channels. NCHW with ``interleave``: one
    task per (image, block of LANES planes) copied to channels-last scratch; otherwise pieces
    split over the threads, reading the planes. Returns 0, or the bytes of per-thread scratch
    that could not be allocated."""
    cdef Py_ssize_t N, C, H, W, PH, PW, n, c, nb, j, k, q, lo, hi, task, blocks, b0, nbins
    cdef Py_ssize_t j0 = P.j0, j1 = P.j1
    cdef const floating* w = <const floating*>P.w
    cdef floating* scratch
    cdef floating* obuf
    cdef floating* staging
    cdef bint stream_out
    cdef Scratch s
    cdef size_t failed = 0
    cdef BlockTask bt
    if channels_last:
        N, H, W, C = fshape[0], fshape[1], fshape[2], fshape[3]
        PH, PW = oshape[1], oshape[2]
        for j in prange(j0, j1, schedule="dynamic", num_threads=n_threads):
            k, q, b0 = P.order[j], j - j0, P.bin0[j]
            pool_samples(X + P.batch_idx[k] * H * W * C, C, C, O + (k * PH * PW + b0) * C, C,
                         P.bin1[j] - b0, P.gh[k] * P.gw[k], P.nv + P.boff[q],
                         P.idx + 4 * P.off[q], w + 4 * P.off[q])
        return 0
    N, C, H, W = fshape[0], fshape[1], fshape[2], fshape[3]
    PH, PW = oshape[2], oshape[3]
    if interleave:
        stream_out = streams_output(oshape[0] * C * PH * PW, sizeof(floating))
        blocks = (C + LANES - 1) // LANES
        with parallel(num_threads=n_threads):
            s = scratch_open(&failed, H * W * LANES * sizeof(floating),
                             (2 if stream_out else 1) * PH * PW * LANES * sizeof(floating))
            scratch, obuf = <floating*>s.a, <floating*>s.b
            staging = obuf + PH * PW * LANES if stream_out else NULL
            for task in prange(N * blocks, schedule="dynamic"):
                if not s.ok:
                    continue  # reported after the parallel region
                bt = block_task(task, blocks, C, P.img_start, j0, j1)
                n, c, nb, lo, hi = bt.n, bt.c, bt.nb, bt.lo, bt.hi
                interleave_planes(X + (n * C + c) * H * W, H * W, nb, scratch)
                for j in range(lo, hi):
                    k, q, b0 = P.order[j], j - j0, P.bin0[j]
                    nbins = P.bin1[j] - b0
                    pool_samples(scratch, LANES, LANES, obuf, LANES, nbins, P.gh[k] * P.gw[k],
                                 P.nv + P.boff[q], P.idx + 4 * P.off[q], w + 4 * P.off[q])
                    deinterleave_bins(obuf, nbins, nb, O + (k * C + c) * PH * PW + b0, PH * PW,
                                      staging)
            scratch_close(&s)
        return failed
    for j in prange(j0, j1, schedule="dynamic", num_threads=n_threads):
        k, q, b0 = P.order[j], j - j0, P.bin0[j]
        for c in range(C):
            pool_samples(X + (P.batch_idx[k] * C + c) * H * W, 1, 1,
                         O + (k * C + c) * PH * PW + b0, 1, P.bin1[j] - b0, P.gh[k] * P.gw[k],
                         P.nv + P.boff[q], P.idx + 4 * P.off[q], w + 4 * P.off[q])
    return 0


def backward_features(const floating[:, :, :, ::1] grad_out, const int64_t[::1] batch_idx,
                      const int64_t[::1] order, const int64_t[::1] bin0, const int64_t[::1] bin1,
                      const int64_t[::1] img_start, Py_ssize_t j0, Py_ssize_t j1,
                      const int64_t[::1] gh, const int64_t[::1] gw, _Samples t,
                      floating[:, :, :, ::1] grad_features, bint channels_last, bint interleave,
                      int n_threads):
    """Add the feature gradient of the pieces at sorted positions j0..j1; every element is owned
    by one thread and receives its terms in the fixed sorted order. NCHW without ``interleave``:
    one task per plane, scattering straight into it (no scratch)."""
    cdef Py_ssize_t N, C, H, W, PH, PW, n, c, c0, nb, j, k, q, lo, hi, task, blocks, b0, nbins
    cdef const floating* GO = &grad_out[0, 0, 0, 0]
    cdef floating* G = &grad_features[0, 0, 0, 0]
    cdef const Py_ssize_t[::1] idx = t.idx, off = t.off, nv = t.nv, boff = t.boff
    cdef const floating[::1] w = t.w
    cdef floating* gscratch
    cdef floating* gbuf
    cdef Scratch s
    cdef size_t failed = 0
    cdef BlockTask bt
    if channels_last:
        N, H, W, C = grad_features.shape[0], grad_features.shape[1], grad_features.shape[2], grad_features.shape[3]
        PH, PW = grad_out.shape[1], grad_out.shape[2]
        blocks = (C + LANES - 1) // LANES
        for task in prange(blocks, nogil=True, schedule="static", num_threads=n_threads):
            c0 = task * LANES
            for j in range(j0, j1):
                k, q, b0 = order[j], j - j0, bin0[j]
                scatter_samples(G + batch_idx[k] * H * W * C + c0, C,
                                C - c0 if C - c0 < LANES else LANES,
                                GO + (k * PH * PW + b0) * C + c0, C, bin1[j] - b0,
                                gh[k] * gw[k], &nv[boff[q]], &idx[4 * off[q]], &w[4 * off[q]])
        return
    N, C, H, W = grad_features.shape[0], grad_features.shape[1], grad_features.shape[2], grad_features.shape[3]
    PH, PW = grad_out.shape[2], grad_out.shape[3]
    if not interleave:
        for task in prange(N * C, nogil=True, schedule="dynamic", num_threads=n_threads):
            bt = block_task(task, C, C, &img_start[0], j0, j1, 1)
            for j in range(bt.lo, bt.hi):
                k, q, b0 = order[j], j - j0, bin0[j]
                scatter_samples(G + (bt.n * C + bt.c) * H * W, 1, 1,
                                GO + (k * C + bt.c) * PH * PW + b0, 1, bin1[j] - b0,
                                gh[k] * gw[k], &nv[boff[q]], &idx[4 * off[q]], &w[4 * off[q]])
        return
    blocks = (C + LANES - 1) // LANES
    with nogil, parallel(num_threads=n_threads):
        s = scratch_open(&failed, H * W * LANES * sizeof(floating),
                         PH * PW * LANES * sizeof(floating))
        gscratch, gbuf = <floating*>s.a, <floating*>s.b
        for task in prange(N * blocks, schedule="dynamic"):
            if not s.ok:
                continue  # reported after the parallel region
            bt = block_task(task, blocks, C, &img_start[0], j0, j1)
            n, c, nb, lo, hi = bt.n, bt.c, bt.nb, bt.lo, bt.hi
            memset(gscratch, 0, H * W * LANES * sizeof(floating))
            for j in range(lo, hi):
                k, q, b0 = order[j], j - j0, bin0[j]
                nbins = bin1[j] - b0
                interleave_planes(GO + (k * C + c) * PH * PW + b0, PH * PW, nb, gbuf, nbins)
                scatter_samples(gscratch, LANES, LANES, gbuf, LANES, nbins, gh[k] * gw[k],
                                &nv[boff[q]], &idx[4 * off[q]], &w[4 * off[q]])
            add_deinterleaved(gscratch, H * W, nb, G + (n * C + c) * H * W)
        scratch_close(&s)
    check_scratch(failed)


# ---------------------------------------------------------------------------------------------
# gradient with respect to the boxes

cdef inline void channel_sums(const floating* image, Py_ssize_t cs, Py_ssize_t chs, Py_ssize_t C,
                              Py_ssize_t W, const floating* g, Py_ssize_t gc, Py_ssize_t y0,
                              Py_ssize_t y1, Py_ssize_t x0, Py_ssize_t x1, floating a0,
                              floating a1, floating b0, floating b1, double* dvy,
                              double* dvx) noexcept nogil:
    """Sum over channels of g * dv/d(ly) and g * dv/d(lx) of one sample. Pixel (y, x) of
    channel c is image[(y * W + x) * cs + c * chs]; its bin's gradient is g[c * gc]."""
    cdef Py_ssize_t c
    cdef const floating* p00 = image + (y0 * W + x0) * cs
    cdef const floating* p01 = image + (y0 * W + x1) * cs
    cdef const floating* p10 = image + (y1 * W + x0) * cs
    cdef const floating* p11 = image + (y1 * W + x1) * cs
    cdef double sy = 0, sx = 0
    for c in range(C):
        sy += g[c * gc] * ((b0 * p10[c * chs] + b1 * p11[c * chs]) - (b0 * p00[c * chs] + b1 * p01[c * chs]))
        sx += g[c * gc] * (a0 * (p01[c * chs] - p00[c * chs]) + a1 * (p11[c * chs] - p10[c * chs]))
    dvy[0] = sy
    dvx[0] = sx


cdef inline void lane_sums(const floating* block, Py_ssize_t W, const floating* g, Py_ssize_t y0,
                           Py_ssize_t y1, Py_ssize_t x0, Py_ssize_t x1, floating a0, floating a1,
                           floating b0, floating b1, double* dvy, double* dvx) noexcept nogil:
    """channel_sums over the LANES channels of an interleaved block (vector code)."""
    cdef Py_ssize_t c
    cdef const floating* p00 = block + (y0 * W + x0) * LANES
    cdef const floating* p01 = block + (y0 * W + x1) * LANES
    cdef const floating* p10 = block + (y1 * W + x0) * LANES
    cdef const floating* p11 = block + (y1 * W + x1) * LANES
    cdef floating sy[LANES]
    cdef floating sx[LANES]
    cdef double ty = 0, tx = 0
    for c in range(LANES):
        sy[c] = g[c] * ((b0 * p10[c] + b1 * p11[c]) - (b0 * p00[c] + b1 * p01[c]))
        sx[c] = g[c] * (a0 * (p01[c] - p00[c]) + a1 * (p11[c] - p10[c]))
    for c in range(LANES):
        ty += sy[c]
        tx += sx[c]
    dvy[0] = ty
    dvx[0] = tx


cdef void box_grad(const floating* roi, double* acc, const floating* image, Py_ssize_t cs,
                   Py_ssize_t chs, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, const floating* g,
                   Py_ssize_t gb, Py_ssize_t gc, bint lanes, Py_ssize_t PH, Py_ssize_t PW,
                   Py_ssize_t gh, Py_ssize_t gw, double scale, bint aligned,
                   bint clockwise) noexcept nogil:
    """Add to acc[0..4] the gradient of sum g * out with respect to (cx, cy, w, h, angle) of one
    box. ``lanes``: image is an interleaved block of LANES channels and g holds bin b at
    b * LANES; otherwise channel c of pixel (y, x) is image[(y * W + x) * cs + c * chs] and of
    bin b is g[b * gb + c * gc].

    Per sample: S = sum over channels of g * dv/d(y, x); then the chain rule through
    y = yy cos - xx sin + cy, x = yy sin + xx cos + cx, with yy = roi_h * (t_y - 1/2) and
    xx = roi_w * (t_x - 1/2)."""
    cdef Frame f = box_frame(roi, scale, aligned, clockwise)
    # out-parameters (sample_point, bilinear_axis, *_sums), zeroed for Cython's flow analysis
    cdef Py_ssize_t ph, pw, iy, ix, y0 = 0, y1 = 0, x0 = 0, x1 = 0, count = gh * gw
    cdef floating y = 0, x = 0, yy = 0, xx = 0, a0 = 0, a1 = 0, b0 = 0, b1 = 0, sy = 0, sx = 0
    cdef double dvy = 0, dvx = 0, ty, tx, inv_count
    cdef double acc_cx = 0, acc_cy = 0, acc_w = 0, acc_h = 0, acc_t = 0
    cdef double dtheta = (M_PI / 180.0) * (-1.0 if clockwise else 1.0)
    if count == 0:
        return
    inv_count = 1.0 / count
    for ph in range(PH):
        for pw in range(PW):
            for iy in range(gh):
                for ix in range(gw):
                    sample_point(&f, ph, pw, iy, ix, gh, gw, PH, PW, &y, &x, &yy, &xx)
                    if not (bilinear_axis(y, H, &y0, &y1, &a0, &a1, &sy) and
                            bilinear_axis(x, W, &x0, &x1, &b0, &b1, &sx)):
                        continue
                    if sy == 0 and sx == 0:
                        continue
                    if lanes:
                        lane_sums(image, W, g + (ph * PW + pw) * LANES, y0, y1, x0, x1, a0, a1,
                                  b0, b1, &dvy, &dvx)
                    else:
                        channel_sums(image, cs, chs, C, W, g + (ph * PW + pw) * gb, gc, y0, y1,
                                     x0, x1, a0, a1, b0, b1, &dvy, &dvx)
                    dvy *= sy * inv_count
                    dvx *= sx * inv_count
                    ty = sample_fraction(ph, iy, gh, PH) - 0.5
                    tx = sample_fraction(pw, ix, gw, PW) - 0.5
                    acc_cy += dvy
                    acc_cx += dvx
                    acc_h += ty * (dvy * f.cos_t + dvx * f.sin_t)
                    acc_w += tx * (-dvy * f.sin_t + dvx * f.cos_t)
                    acc_t += dvy * (-yy * f.sin_t - xx * f.cos_t) + dvx * (yy * f.cos_t - xx * f.sin_t)
    acc[0] += scale * acc_cx
    acc[1] += scale * acc_cy
    if not f.clamped_w:
        acc[2] += scale * acc_w
    if not f.clamped_h:
        acc[3] += scale * acc_h
    acc[4] += dtheta * acc_t


def backward_boxes(const floating[:, :, :, ::1] grad_out, const floating[:, :, :, ::1] features,
                   const floating[:, ::1] rois, const int64_t[::1] batch_idx,
                   const int64_t[::1] order, const int64_t[::1] img_start,
                   const int64_t[::1] gh, const int64_t[::1] gw, floating[:, ::1] grad_rois,
                   double scale, bint aligned, bint clockwise, bint channels_last,
                   bint interleave, int n_threads):
    """NHWC: one thread per box. NCHW: one task per (image, block of LANES planes), read from
    channels-last scratch (``interleave``) or straight from the planes, each writing its own
    partial sums per box, then added up per box in block order. Either way the result does not
    depend on the thread count."""
    cdef Py_ssize_t N, C, H, W, PH, PW, j, k, K = rois.shape[0], n, c, nb, task, blocks, lo, hi
    cdef const floating* GO = &grad_out[0, 0, 0, 0]
    cdef const floating* X = &features[0, 0, 0, 0]
    cdef floating* scratch
    cdef floating* gbuf
    cdef Scratch s
    cdef size_t failed = 0
    cdef BlockTask bt
    cdef double[:, ::1] partial
    if channels_last:
        N, H, W, C = features.shape[0], features.shape[1], features.shape[2], features.shape[3]
        PH, PW = grad_out.shape[1], grad_out.shape[2]
        blocks = 1
        partial = np.zeros((K, 5))
        for k in prange(K, nogil=True, schedule="dynamic", num_threads=n_threads):
            box_grad(&rois[k, 0], &partial[k, 0], X + batch_idx[k] * H * W * C, C, 1, C, H, W,
                     GO + k * PH * PW * C, C, 1, False, PH, PW, gh[k], gw[k], scale, aligned,
                     clockwise)
    else:
        N, C, H, W = features.shape[0], features.shape[1], features.shape[2], features.shape[3]
        PH, PW = grad_out.shape[2], grad_out.shape[3]
        blocks = (C + LANES - 1) // LANES
        partial = np.zeros((K * blocks, 5))
        with nogil, parallel(num_threads=n_threads):
            s = scratch_open(&failed, (H * W * LANES if interleave else 1) * sizeof(floating),
                             PH * PW * LANES * sizeof(floating))
            scratch, gbuf = <floating*>s.a, <floating*>s.b
            for task in prange(N * blocks, schedule="dynamic"):
                if not s.ok:
                    continue  # reported after the parallel region
                bt = block_task(task, blocks, C, &img_start[0], 0, K)
                n, c, nb, lo, hi = bt.n, bt.c, bt.nb, bt.lo, bt.hi
                if interleave:
                    interleave_planes(X + (n * C + c) * H * W, H * W, nb, scratch)
                for j in range(lo, hi):
                    k = order[j]
                    if interleave:
                        interleave_planes(GO + (k * C + c) * PH * PW, PH * PW, nb, gbuf)
                        box_grad(&rois[k, 0], &partial[k * blocks + task % blocks, 0], scratch, 0,
                                 0, LANES, H, W, gbuf, 0, 0, True, PH, PW, gh[k], gw[k], scale,
                                 aligned, clockwise)
                    else:
                        box_grad(&rois[k, 0], &partial[k * blocks + task % blocks, 0],
                                 X + (n * C + c) * H * W, 1, H * W, nb, H, W,
                                 GO + (k * C + c) * PH * PW, 1, PH * PW, False, PH, PW, gh[k],
                                 gw[k], scale, aligned, clockwise)
            scratch_close(&s)
        check_scratch(failed)
    for k in prange(K, nogil=True, schedule="static", num_threads=n_threads):
        add_partials(&grad_rois[k, 0], &partial[k * blocks, 0], blocks)


cdef void add_partials(floating* groi, const double* partial, Py_ssize_t blocks) noexcept nogil:
    """groi[i] += sum over blocks of partial[b, i], in block order."""
    cdef Py_ssize_t i, b
    cdef double acc
    for i in range(5):
        acc = 0
        for b in range(blocks):
            acc += partial[b * 5 + i]
        groi[i] += <floating>acc


# ---------------------------------------------------------------------------------------------
# the one-pass small call (as _roi_align.forward_small; its checks in _calls.pxd)

cdef enum:
    # the one-pass call builds at most this many sample slots (4 taps each), and takes grids of
    # at most this many samples per bin
    SMALL_SLOTS = 1 << 18
    SMALL_SAMPLES = 1 << 30

cdef object _NDARRAY = np.ndarray
cdef object _F32 = np.dtype(np.float32)
cdef object _F64 = np.dtype(np.float64)


def forward_small(features, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                  clockwise, layout, n_threads, max_samples_per_bin, allow_inverted):
    """``roi_align_rotated`` of a plain call ((K, 6) boxes of the features' dtype, the rest as
    _roi_align.forward_small says), checked, planned and pooled in one compiled pass; None for
    any other call, which the general path then checks and runs. The result is the general
    path's, bit for bit."""
    # (written through the pointers of the checks: zero first for Cython's flow analysis)
    cdef Py_ssize_t sr = 0, limit = 0
    cdef Plain c
    cdef const float[:, :, :, ::1] xf = None
    cdef const float[:, :] bf = None
    cdef const double[:, :, :, ::1] xd = None
    cdef const double[:, :] bd = None
    if (not plain_call(&c, features, boxes, output_size, spatial_scale, layout, n_threads,
                       allow_inverted, _NDARRAY, _F32, _F64)
            or not plain_int(sampling_ratio, -1, SMALL_SAMPLES, &sr)
            or not plain_int(max_samples_per_bin, 1, SMALL_SAMPLES, &limit)
            or not plain_flag(aligned) or not plain_flag(clockwise)):
        return None
    cdef int wanted = effective_n_threads(n_threads)
    cdef bint is_aligned = aligned is True, is_clockwise = clockwise is True
    try:  # C-contiguous rank-4 features, rank-2 boxes (what the memoryviews accept)
        if c.size == 4:
            xf, bf = features, boxes
        else:
            xd, bd = features, boxes
    except (ValueError, BufferError):
        return None
    if c.size == 4:
        return small_forward(xf, bf, &c, sr, is_aligned, is_clockwise, wanted, <double>limit)
    return small_forward(xd, bd, &c, sr, is_aligned, is_clockwise, wanted, <double>limit)


cdef object small_forward(const floating[:, :, :, ::1] x, const floating[:, :] b, const Plain* c,
                          Py_ssize_t sr, bint aligned, bint clockwise, int wanted, double limit):
    cdef Py_ssize_t PH = c.ph, PW = c.pw
    cdef double scale = c.scale
    cdef bint channels_last = c.channels_last, check_order = c.check_order
    cdef Sizes z
    if not small_sizes(&z, b.shape, 5, x.shape, channels_last):
        return None
    cdef Py_ssize_t K = z.K, N = z.N, C = z.C, H = z.H, W = z.W, k, q, bins = PH * PW
    if <double>K * bins > SMALL_SLOTS or <double>K * C * bins > 1 << 40:
        return None  # (an output that large is the general path's MemoryError)
    # batch, gh, gw, order, bin0 (0), bin1 (PH * PW), image starts (N + 1), off and boff
    # (K + 1 each), then the (K, 5) coordinates
    cdef int64_t* block = small_block(9 * K + N + 3 + 5 * K)
    cdef int64_t* batch = block
    cdef int64_t* gh = block + K
    cdef int64_t* gw = block + 2 * K
    cdef int64_t* order = block + 3 * K
    cdef int64_t* bin0 = block + 4 * K
    cdef int64_t* bin1 = block + 5 * K
    cdef int64_t* img_start = block + 6 * K
    cdef Py_ssize_t* off = <Py_ssize_t*>(img_start + N + 1)
    cdef Py_ssize_t* boff = off + K + 1
    cdef floating* rois = <floating*>(boff + K + 1)
    cdef Py_ssize_t* idx = NULL
    cdef Py_ssize_t* nv = NULL
    cdef floating* w = NULL
    cdef double samples = 0
    cdef bint ok
    cdef Frame f
    with nogil:
        ok = scan_boxes(b, N, check_order, rois, batch, True)
        for k in range(K if ok else 0):
            f = box_frame(rois + 5 * k, scale, aligned, False)
            gh[k] = grid_size(sr, <floating>f.roi_h, PH)
            gw[k] = grid_size(sr, <floating>f.roi_w, PW)
            if <double>gh[k] * gw[k] > limit or gh[k] > limit or gw[k] > limit:
                ok = False  # the general path's bound check says which box and why
                break
            samples += <double>gh[k] * gw[k] * bins
            if samples > SMALL_SLOTS:
                ok = False
                break
            bin1[k] = bins
        if ok:
            sort_by_image(batch, K, N, order, img_start)
            for q in range(K):
                off[q + 1] = off[q] + gh[order[q]] * gw[order[q]] * bins
                boff[q + 1] = boff[q] + bins
            # one slack sample so that &table[offset] is valid for boxes with no samples
            idx = <Py_ssize_t*>calloc(4 * (off[K] + 1), sizeof(Py_ssize_t))
            w = <floating*>calloc(4 * (off[K] + 1), sizeof(floating))
            nv = <Py_ssize_t*>calloc(boff[K] + 1, sizeof(Py_ssize_t))
    out = None
    if ok and idx != NULL and w != NULL and nv != NULL:
        out = small_output(K, C, PH, PW, channels_last,
                           np.float32 if floating is float else np.float64,
                           sizeof(floating), np.empty, host_array)
    if out is None:  # declined, or past memory: the general path checks it, or says so
        free(block)
        free(idx)
        free(w)
        free(nv)
        return None
    cdef int n_threads = threads_for_work(wanted, <double>K * C * bins, sr)
    cdef bint interleave = not channels_last and blocks_pay(
        samples, C, H, W, N, H * W * LANES * sizeof(floating), N * ((C + LANES - 1) // LANES),
        n_threads, True)
    cdef floating[:, :, :, ::1] o = out
    cdef Pieces P
    cdef size_t failed
    P.batch_idx, P.order, P.bin0, P.bin1 = batch, order, bin0, bin1
    P.img_start, P.gh, P.gw, P.j0, P.j1 = img_start, gh, gw, 0, K
    P.idx, P.off, P.nv, P.boff, P.w = idx, off, nv, boff, <const char*>w
    with nogil:
        for q in prange(K, schedule="dynamic", num_threads=threads_for_tables(n_threads, K)):
            k = order[q]
            fill_samples(rois + 5 * k, scale, aligned, clockwise, PH, PW, 0, bins, gh[k], gw[k],
                         H, W, nv + boff[q], idx + 4 * off[q], w + 4 * off[q])
        failed = pool_pieces(&x[0, 0, 0, 0], &o[0, 0, 0, 0], x.shape, o.shape, &P,
                             channels_last, interleave, n_threads)
    free(block)
    free(idx)
    free(w)
    free(nv)
    check_scratch(failed)
    return out

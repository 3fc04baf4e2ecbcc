# NCHW kernels work on blocks of LANES planes copied to channels-last scratch, so that the inner
# loops run over contiguous channels (vector code) as in the NHWC kernels.
from cython cimport floating
from libc.stdint cimport int64_t

cdef enum:
    LANES = 16


cdef struct BlockTask:
    # one task of the NCHW loops: image n, its planes c..c+nb (nb <= width), and the run lo..hi of
    # its boxes within positions j0..j1 of the image-sorted box order
    Py_ssize_t n, c, nb, lo, hi


cdef inline BlockTask block_task(Py_ssize_t task, Py_ssize_t blocks, Py_ssize_t C,
                                 const int64_t* img_start, Py_ssize_t j0, Py_ssize_t j1,
                                 Py_ssize_t width=LANES) noexcept nogil:
    """Task number -> BlockTask, for ``blocks`` blocks of ``width`` planes per image."""
    cdef BlockTask b
    b.n = task // blocks
    b.c = (task % blocks) * width
    b.nb = C - b.c if C - b.c < width else width
    b.lo = img_start[b.n] if img_start[b.n] > j0 else j0
    b.hi = img_start[b.n + 1] if img_start[b.n + 1] < j1 else j1
    return b


cdef inline void interleave_planes(const floating* planes, Py_ssize_t plane_size, Py_ssize_t n_planes,
                            floating* block, Py_ssize_t n_pixels=-1) noexcept nogil:
    """block[i * LANES + c] = planes[c * plane_size + i] for i < n_pixels (default: plane_size);
    lanes past n_planes are zero. Done in runs of pixels so that reads and writes both stay in
    L1."""
    cdef Py_ssize_t i0, i1, i, c
    cdef const floating* src
    if n_pixels < 0:
        n_pixels = plane_size
    for i0 in range(0, n_pixels, 512):
        i1 = i0 + 512 if i0 + 512 < n_pixels else n_pixels
        for c in range(LANES):
            if c < n_planes:
                src = planes + c * plane_size
                for i in range(i0, i1):
                    block[i * LANES + c] = src[i]
            else:
                for i in range(i0, i1):
                    block[i * LANES + c] = 0


cdef inline void deinterleave_bins(const floating* block, Py_ssize_t n_bins, Py_ssize_t n_planes,
                            floating* planes, Py_ssize_t plane_stride) noexcept nogil:
    """planes[c * plane_stride + i] = block[i * LANES + c] for the first n_planes lanes."""
    cdef Py_ssize_t i, c
    for c in range(n_planes):
        for i in range(n_bins):
            planes[c * plane_stride + i] = block[i * LANES + c]


cdef inline void add_deinterleaved(const floating* block, Py_ssize_t plane_size,
                                   Py_ssize_t n_planes, floating* planes) noexcept nogil:
    """planes[c * plane_size + i] += block[i * LANES + c] for the first n_planes lanes, in runs
    of pixels so that reads and writes both stay in L1 (as interleave_planes)."""
    cdef Py_ssize_t i0, i1, i, c
    for i0 in range(0, plane_size, 512):
        i1 = i0 + 512 if i0 + 512 < plane_size else plane_size
        for c in range(n_planes):
            for i in range(i0, i1):
                planes[c * plane_size + i] += block[i * LANES + c]

# The cost model of the CPU kernels: how many threads a call uses and which NCHW loop order it
# takes. Stated once, here: the kernel modules' one-pass small calls ask it in C, and the Python
# driver (roialign_cy._cpu) through their wrappers (_roi_align.work_threads, ...). Results never
# depend on these choices, only the speed (benchmarks/README.md, "Cost model").
from ._lanes cimport LANES

cdef enum:
    # Starting an OpenMP team costs tens of microseconds: calls with less work than this (output
    # elements x samples per bin) per thread use fewer threads.
    MIN_WORK_PER_THREAD = 1 << 14
    # a table row costs well under a microsecond: fewer boxes per thread are not worth a team
    MIN_BOXES_PER_TABLE_THREAD = 64
    # channels-last scratch of the NCHW block loops, per thread
    SCRATCH_BYTES = 64 << 20

cdef extern from *:
    """
    /* The NCHW kernels copy blocks of LANES planes to channels-last scratch when the boxes take
       at least this many samples (RoIAlign: bilinear samples; roi_pool: window pixels) per
       feature pixel. With the SSE2 transposes the copy costs about as much as a fifth of a
       sample per pixel read straight from the planes: measured break-even 0.15-0.25 for the
       forwards and gradients of RoIAlign and roi_pool on maps (1, 64, 64, 64) to
       (2, 256, 200, 304) (benchmarks/README.md, "Cost model"); above it the blocks win by up to
       4x (e.g. 100 boxes 7x7 on (2, 256, 100, 152): 0.64 samples per pixel, 3.0 against 6.9 ms). */
    #define ROIALIGN_INTERLEAVE_MIN_SAMPLES_PER_PIXEL 0.2
    /* The position-sensitive operators on NCHW maps: bin (ph, pw) of output channels c..c+LANES
       reads planes PH * PW apart, which the block loops copy to channels-last scratch (one task
       per image, bin and LANES output channels) when the plane loops would read at least this
       many values per feature pixel: one per sample (ps_roi_align) or window pixel (ps_roi_pool)
       and output channel. Measured by forcing each order, forwards and gradients, on
       (2, 490, 100, 152) and (1, 490, 50, 68) with 1-2000 boxes of 8-400 px
       (benchmarks/README.md, "Cost model"): break-even about 0.2 for ps_roi_align (its R-FCN
       box head, 0.26: forward 16.3 -> 11.8 ms, gradient 23.7 -> 20.2 ms on 2 threads), 0.25 for
       ps_roi_pool's gradient
       (box head, 0.47-0.5: 11.6-12.5 -> 8.7-8.9 ms), and for ps_roi_pool's forward 0.5 on the
       larger map but past 0.5 on the smaller one (0.49: planes 1.1-1.3 ms, blocks 1.6), so 1. */
    /* The NCHW block loops write each output (box, LANES channels) with non-temporal stores when
       the whole output has at least this many bytes: written once and not read again by the loop,
       an output larger than the caches otherwise costs a read of every line before its write.
       Smaller outputs stay in the cache for the caller. */
    #define ROIALIGN_STREAM_MIN_BYTES (16 << 20)
    #define ROIALIGN_PS_ALIGN_MIN_READS_PER_PIXEL 0.2
    #define ROIALIGN_PS_POOL_MIN_READS_PER_PIXEL 1.0
    #define ROIALIGN_PS_POOL_GRAD_MIN_READS_PER_PIXEL 0.25
    """
    const double INTERLEAVE_MIN_SAMPLES_PER_PIXEL "ROIALIGN_INTERLEAVE_MIN_SAMPLES_PER_PIXEL"
    const double PS_ALIGN_MIN_READS_PER_PIXEL "ROIALIGN_PS_ALIGN_MIN_READS_PER_PIXEL"
    const Py_ssize_t STREAM_MIN_BYTES "ROIALIGN_STREAM_MIN_BYTES"
    const double PS_POOL_MIN_READS_PER_PIXEL "ROIALIGN_PS_POOL_MIN_READS_PER_PIXEL"
    const double PS_POOL_GRAD_MIN_READS_PER_PIXEL "ROIALIGN_PS_POOL_GRAD_MIN_READS_PER_PIXEL"


cdef inline int threads_for_work(int wanted, double n_outputs, double sampling_ratio) noexcept nogil:
    """Threads for a call of ``n_outputs`` output elements: at most ``wanted``, and one per
    MIN_WORK_PER_THREAD samples (adaptive grids and whole-pixel bins counted as 2 x 2)."""
    cdef double samples = sampling_ratio * sampling_ratio if sampling_ratio > 0 else 4
    cdef double fit = n_outputs * samples / MIN_WORK_PER_THREAD
    if fit < 1:
        return 1
    return wanted if fit >= wanted else <int>fit


cdef inline int threads_for_tables(int n_threads, Py_ssize_t n_boxes) noexcept nogil:
    """Threads that fill the sampling tables (or windows) of ``n_boxes`` boxes."""
    cdef Py_ssize_t fit = n_boxes // MIN_BOXES_PER_TABLE_THREAD
    return 1 if fit < 1 else (n_threads if fit >= n_threads else <int>fit)


cdef inline bint blocks_pay(double samples, Py_ssize_t c, Py_ssize_t h, Py_ssize_t w,
                            Py_ssize_t n, Py_ssize_t scratch_bytes, Py_ssize_t tasks,
                            int n_threads, bint forward) noexcept nogil:
    """Whether an NCHW call on one map of n images copies blocks of LANES planes to channels-last
    scratch (vector code over channels) or reads the planes directly. Blocks pay when the boxes
    take at least INTERLEAVE_MIN_SAMPLES_PER_PIXEL samples per feature pixel, when a
    block is full (C >= LANES), and when the per-thread scratch fits SCRATCH_BYTES; the forward
    also needs enough block ``tasks`` to keep the threads busy, since otherwise it splits the
    boxes."""
    if c < LANES or scratch_bytes > SCRATCH_BYTES:
        return False
    if forward and tasks < n_threads:
        return False
    return samples >= INTERLEAVE_MIN_SAMPLES_PER_PIXEL * n * h * w


cdef inline bint ps_blocks_pay(int forced, double reads, double min_reads, Py_ssize_t n,
                               Py_ssize_t c, Py_ssize_t h, Py_ssize_t w,
                               Py_ssize_t itemsize) noexcept nogil:
    """Whether a position-sensitive call on NCHW maps (n, c, h, w) copies blocks of LANES output
    channels of a bin to channels-last scratch: when its plane loops would make ``reads`` reads,
    at least ``min_reads`` (PS_*_MIN_READS_PER_PIXEL) per feature pixel, and the scratch fits
    SCRATCH_BYTES. ``forced``: -1 by this rule, else 0 (planes) or 1 (blocks)."""
    if h * w * LANES * itemsize > SCRATCH_BYTES:
        return False
    if forced >= 0:
        return forced == 1
    return reads >= min_reads * n * c * h * w


cdef inline bint streams_output(Py_ssize_t n_elements, Py_ssize_t itemsize) noexcept nogil:
    """Whether the block loops stream an output of n_elements (non-temporal stores)."""
    return n_elements * itemsize >= STREAM_MIN_BYTES

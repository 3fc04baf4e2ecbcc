# NCHW kernels work on blocks of LANES planes copied to channels-last scratch, so that the inner
# loops run over contiguous channels (vector code) as in the NHWC kernels.
from cython cimport floating
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from ._planes cimport Shape

cdef extern from *:
    """
    /* The transposes between LANES planes and channels-last blocks, in 4 x 4 (float) and 2 x 2
       (double) tiles of SSE2 registers where the compiler targets it (every x86-64 CPU), element
       by element elsewhere. Pure data movement (and one addition per element in the _add form),
       so the bits do not depend on the path. A scalar transpose with 16-element strides cost a
       third of the NCHW block loops' time. */
    #include <stdint.h>
    #include <string.h>
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #define ROIALIGN_SSE2 1
    #else
    #define ROIALIGN_SSE2 0
    #endif
    #define ROIALIGN_LANES 16

    /* element by element: what the tiles leave (and everything where there are none) */
    #define ROIALIGN_TRANSPOSE_REST(T)                                                           \
    static inline void roialign_interleave_rest_##T(const T* planes, Py_ssize_t plane_size,     \
                                                    Py_ssize_t n_planes, T* block, Py_ssize_t i, \
                                                    Py_ssize_t i1) {                             \
        for (; i < i1; i++)                                                                      \
            for (Py_ssize_t c = 0; c < ROIALIGN_LANES; c++)                                      \
                block[i * ROIALIGN_LANES + c] = c < n_planes ? planes[c * plane_size + i] : (T)0; \
    }                                                                                            \
    static inline void roialign_deinterleave_rest_##T(const T* block, Py_ssize_t i, Py_ssize_t n, \
                                                      Py_ssize_t n_planes, T* planes,            \
                                                      Py_ssize_t plane_stride, int add) {        \
        for (; i < n; i++)                                                                       \
            for (Py_ssize_t c = 0; c < n_planes; c++) {                                          \
                if (add)                                                                         \
                    planes[c * plane_stride + i] += block[i * ROIALIGN_LANES + c];               \
                else                                                                             \
                    planes[c * plane_stride + i] = block[i * ROIALIGN_LANES + c];                \
            }                                                                                    \
    }
    ROIALIGN_TRANSPOSE_REST(float)
    ROIALIGN_TRANSPOSE_REST(double)

    /* block[i * LANES + c] = planes[c * plane_size + i] for i0 <= i < i1; lanes past n_planes 0 */
    static inline void roialign_interleave_f32(const float* planes, Py_ssize_t plane_size,
                                               Py_ssize_t n_planes, float* block, Py_ssize_t i0,
                                               Py_ssize_t i1) {
        Py_ssize_t i = i0, c;
    #if ROIALIGN_SSE2
        for (; i + 4 <= i1; i += 4) {
            for (c = 0; c < ROIALIGN_LANES; c += 4) {
                __m128 r0 = c < n_planes ? _mm_loadu_ps(planes + c * plane_size + i) : _mm_setzero_ps();
                __m128 r1 = c + 1 < n_planes ? _mm_loadu_ps(planes + (c + 1) * plane_size + i) : _mm_setzero_ps();
                __m128 r2 = c + 2 < n_planes ? _mm_loadu_ps(planes + (c + 2) * plane_size + i) : _mm_setzero_ps();
                __m128 r3 = c + 3 < n_planes ? _mm_loadu_ps(planes + (c + 3) * plane_size + i) : _mm_setzero_ps();
                _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
                _mm_storeu_ps(block + i * ROIALIGN_LANES + c, r0);
                _mm_storeu_ps(block + (i + 1) * ROIALIGN_LANES + c, r1);
                _mm_storeu_ps(block + (i + 2) * ROIALIGN_LANES + c, r2);
                _mm_storeu_ps(block + (i + 3) * ROIALIGN_LANES + c, r3);
            }
        }
    #endif
        roialign_interleave_rest_float(planes, plane_size, n_planes, block, i, i1);
    }

    static inline void roialign_interleave_f64(const double* planes, Py_ssize_t plane_size,
                                               Py_ssize_t n_planes, double* block, Py_ssize_t i0,
                                               Py_ssize_t i1) {
        Py_ssize_t i = i0, c;
    #if ROIALIGN_SSE2
        for (; i + 2 <= i1; i += 2) {
            for (c = 0; c < ROIALIGN_LANES; c += 2) {
                __m128d r0 = c < n_planes ? _mm_loadu_pd(planes + c * plane_size + i) : _mm_setzero_pd();
                __m128d r1 = c + 1 < n_planes ? _mm_loadu_pd(planes + (c + 1) * plane_size + i) : _mm_setzero_pd();
                _mm_storeu_pd(block + i * ROIALIGN_LANES + c, _mm_unpacklo_pd(r0, r1));
                _mm_storeu_pd(block + (i + 1) * ROIALIGN_LANES + c, _mm_unpackhi_pd(r0, r1));
            }
        }
    #endif
        roialign_interleave_rest_double(planes, plane_size, n_planes, block, i, i1);
    }

    /* The sum of one bin's bilinear samples on LANES channels of a channels-last block: rows
       iy0..iy1 of the tables ylo, yhi, wy0, wy1 and columns ix0..ix1 of xlo, xhi, wx0, wx1 (all
       offset to the bin), each sample weighted as the scalar kernels' bilerp,
       (((a0 b0) v00 + (a0 b1) v01) + (a1 b0) v10) + (a1 b1) v11, so the bits are theirs. With
       GCC and Clang vector types the LANES sums stay in registers (summed into an array of LANES
       from Cython, they were spilled and gathered back element by element); other compilers get
       the same arithmetic lane by lane. */
    #if defined(__GNUC__) || defined(__clang__)
    /* vectors of the width the compiler targets (a LANES-wide vector type is lowered badly) */
    #if defined(__AVX512F__)
    #define ROIALIGN_VBYTES 64
    #elif defined(__AVX__)
    #define ROIALIGN_VBYTES 32
    #else
    #define ROIALIGN_VBYTES 16
    #endif
    #define ROIALIGN_BIN_LANES(T)                                                                \
    typedef T roialign_vec_##T __attribute__((vector_size(ROIALIGN_VBYTES)));                  \
    static inline roialign_vec_##T roialign_load_##T(const T* p) {                              \
        roialign_vec_##T v;                                                                      \
        memcpy(&v, p, sizeof v);                                                                 \
        return v;                                                                                \
    }                                                                                            \
    static inline void roialign_bin_lanes_##T(                                                   \
            const T* image, Py_ssize_t W, Py_ssize_t iy0, Py_ssize_t iy1, Py_ssize_t ix0,        \
            Py_ssize_t ix1, const Py_ssize_t* ylo, const Py_ssize_t* yhi, const Py_ssize_t* xlo, \
            const Py_ssize_t* xhi, const T* wy0, const T* wy1, const T* wx0, const T* wx1,       \
            T* acc) {                                                                            \
        enum { VL = ROIALIGN_VBYTES / sizeof(T), NV = ROIALIGN_LANES / VL };                     \
        roialign_vec_##T s[NV];                                                                  \
        for (int k = 0; k < NV; k++)                                                             \
            s[k] = (roialign_vec_##T){0};                                                        \
        for (Py_ssize_t iy = iy0; iy < iy1; iy++) {                                              \
            const T* r0 = image + ylo[iy] * W * ROIALIGN_LANES;                                  \
            const T* r1 = image + yhi[iy] * W * ROIALIGN_LANES;                                  \
            T a0 = wy0[iy], a1 = wy1[iy];                                                        \
            for (Py_ssize_t ix = ix0; ix < ix1; ix++) {                                          \
                const T* p00 = r0 + xlo[ix] * ROIALIGN_LANES;                                    \
                const T* p01 = r0 + xhi[ix] * ROIALIGN_LANES;                                    \
                const T* p10 = r1 + xlo[ix] * ROIALIGN_LANES;                                    \
                const T* p11 = r1 + xhi[ix] * ROIALIGN_LANES;                                    \
                T w00 = a0 * wx0[ix], w01 = a0 * wx1[ix], w10 = a1 * wx0[ix], w11 = a1 * wx1[ix]; \
                for (int k = 0; k < NV; k++)                                                     \
                    s[k] += ((w00 * roialign_load_##T(p00 + k * VL)                              \
                              + w01 * roialign_load_##T(p01 + k * VL))                           \
                             + w10 * roialign_load_##T(p10 + k * VL))                            \
                            + w11 * roialign_load_##T(p11 + k * VL);                             \
            }                                                                                    \
        }                                                                                        \
        memcpy(acc, s, sizeof s);                                                                \
    }
    #else
    #define ROIALIGN_BIN_LANES(T)                                                                \
    static inline void roialign_bin_lanes_##T(                                                   \
            const T* image, Py_ssize_t W, Py_ssize_t iy0, Py_ssize_t iy1, Py_ssize_t ix0,        \
            Py_ssize_t ix1, const Py_ssize_t* ylo, const Py_ssize_t* yhi, const Py_ssize_t* xlo, \
            const Py_ssize_t* xhi, const T* wy0, const T* wy1, const T* wx0, const T* wx1,       \
            T* acc) {                                                                            \
        for (int c = 0; c < ROIALIGN_LANES; c++)                                                 \
            acc[c] = 0;                                                                          \
        for (Py_ssize_t iy = iy0; iy < iy1; iy++)                                                \
            for (Py_ssize_t ix = ix0; ix < ix1; ix++) {                                          \
                const T* p00 = image + (ylo[iy] * W + xlo[ix]) * ROIALIGN_LANES;                 \
                const T* p01 = image + (ylo[iy] * W + xhi[ix]) * ROIALIGN_LANES;                 \
                const T* p10 = image + (yhi[iy] * W + xlo[ix]) * ROIALIGN_LANES;                 \
                const T* p11 = image + (yhi[iy] * W + xhi[ix]) * ROIALIGN_LANES;                 \
                T a0 = wy0[iy], a1 = wy1[iy], b0 = wx0[ix], b1 = wx1[ix];                        \
                for (int c = 0; c < ROIALIGN_LANES; c++)                                         \
                    acc[c] += a0 * b0 * p00[c] + a0 * b1 * p01[c] + a1 * b0 * p10[c]             \
                              + a1 * b1 * p11[c];                                                \
            }                                                                                    \
    }
    #endif
    ROIALIGN_BIN_LANES(float)
    ROIALIGN_BIN_LANES(double)

    /* dst[i] = src[i] for i < n, with non-temporal stores from the first 16-byte boundary: a
       store that misses the cache first reads its line, so an output written once and far larger
       than the caches costs twice its bytes in memory traffic with plain stores (100 MB: 12 ms
       plain, 5.5 ms streamed, on one thread). Pure data movement. roialign_store_fence orders
       them before the thread's later stores (called at the end of every block loop). */
    #if ROIALIGN_SSE2
    #define ROIALIGN_STREAM(T, LOAD, STORE, STEP)                                                \
    static inline void roialign_stream_##T(T* dst, const T* src, Py_ssize_t n) {                 \
        Py_ssize_t i = 0;                                                                        \
        for (; i < n && ((uintptr_t)(dst + i) & 15) != 0; i++)                                   \
            dst[i] = src[i];                                                                     \
        for (; i + STEP <= n; i += STEP)                                                         \
            STORE(dst + i, LOAD(src + i));                                                       \
        for (; i < n; i++)                                                                       \
            dst[i] = src[i];                                                                     \
    }
    ROIALIGN_STREAM(float, _mm_loadu_ps, _mm_stream_ps, 4)
    ROIALIGN_STREAM(double, _mm_loadu_pd, _mm_stream_pd, 2)
    static inline void roialign_store_fence(void) { _mm_sfence(); }
    #else
    static inline void roialign_stream_float(float* dst, const float* src, Py_ssize_t n) {
        memcpy(dst, src, n * sizeof *dst);
    }
    static inline void roialign_stream_double(double* dst, const double* src, Py_ssize_t n) {
        memcpy(dst, src, n * sizeof *dst);
    }
    static inline void roialign_store_fence(void) {}
    #endif

    /* planes[c * plane_stride + i] = block[i * LANES + c] for i < n, c < n_planes, streamed
       (roialign_stream) through ``staging`` of ROIALIGN_STREAM_PIXELS x LANES elements: a
       gradient block written over its planes, which nothing reads before the call returns. */
    #define ROIALIGN_STREAM_PIXELS 256
    #define ROIALIGN_DEINTERLEAVE_STREAM(T, S)                                                   \
    static inline void roialign_deinterleave_stream_##S(const T* block, Py_ssize_t n,            \
                                                        Py_ssize_t n_planes, T* planes,          \
                                                        Py_ssize_t plane_stride, T* staging) {   \
        for (Py_ssize_t i0 = 0; i0 < n; i0 += ROIALIGN_STREAM_PIXELS) {                          \
            Py_ssize_t m = n - i0 < ROIALIGN_STREAM_PIXELS ? n - i0 : ROIALIGN_STREAM_PIXELS;    \
            roialign_deinterleave_##S(block + i0 * ROIALIGN_LANES, m, n_planes, staging, m, 0);  \
            for (Py_ssize_t c = 0; c < n_planes; c++)                                            \
                roialign_stream_##T(planes + c * plane_stride + i0, staging + c * m, m);         \
        }                                                                                        \
    }

    /* planes[c * plane_stride + i] = block[i * LANES + c] (add: +=) for i < n, c < n_planes */
    static inline void roialign_deinterleave_f32(const float* block, Py_ssize_t n,
                                                 Py_ssize_t n_planes, float* planes,
                                                 Py_ssize_t plane_stride, int add) {
        Py_ssize_t i = 0, c, j;
    #if ROIALIGN_SSE2
        for (; i + 4 <= n; i += 4) {
            for (c = 0; c < n_planes; c += 4) {
                __m128 r[4];
                r[0] = _mm_loadu_ps(block + i * ROIALIGN_LANES + c);
                r[1] = _mm_loadu_ps(block + (i + 1) * ROIALIGN_LANES + c);
                r[2] = _mm_loadu_ps(block + (i + 2) * ROIALIGN_LANES + c);
                r[3] = _mm_loadu_ps(block + (i + 3) * ROIALIGN_LANES + c);
                _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]);
                for (j = 0; j < 4 && c + j < n_planes; j++) {
                    float* dst = planes + (c + j) * plane_stride + i;
                    _mm_storeu_ps(dst, add ? _mm_add_ps(_mm_loadu_ps(dst), r[j]) : r[j]);
                }
            }
        }
    #endif
        roialign_deinterleave_rest_float(block, i, n, n_planes, planes, plane_stride, add);
    }

    static inline void roialign_deinterleave_f64(const double* block, Py_ssize_t n,
                                                 Py_ssize_t n_planes, double* planes,
                                                 Py_ssize_t plane_stride, int add) {
        Py_ssize_t i = 0, c, j;
    #if ROIALIGN_SSE2
        for (; i + 2 <= n; i += 2) {
            for (c = 0; c < n_planes; c += 2) {
                __m128d a = _mm_loadu_pd(block + i * ROIALIGN_LANES + c);
                __m128d b = _mm_loadu_pd(block + (i + 1) * ROIALIGN_LANES + c);
                __m128d r[2];
                r[0] = _mm_unpacklo_pd(a, b);
                r[1] = _mm_unpackhi_pd(a, b);
                for (j = 0; j < 2 && c + j < n_planes; j++) {
                    double* dst = planes + (c + j) * plane_stride + i;
                    _mm_storeu_pd(dst, add ? _mm_add_pd(_mm_loadu_pd(dst), r[j]) : r[j]);
                }
            }
        }
    #endif
        roialign_deinterleave_rest_double(block, i, n, n_planes, planes, plane_stride, add);
    }
    ROIALIGN_DEINTERLEAVE_STREAM(float, f32)
    ROIALIGN_DEINTERLEAVE_STREAM(double, f64)
    """
    # planes per block: lanes of the channels-last scratch
    enum: LANES "ROIALIGN_LANES"

    void roialign_interleave_f32(const float*, Py_ssize_t, Py_ssize_t, float*, Py_ssize_t,
                                 Py_ssize_t) noexcept nogil
    void roialign_interleave_f64(const double*, Py_ssize_t, Py_ssize_t, double*, Py_ssize_t,
                                 Py_ssize_t) noexcept nogil
    void roialign_deinterleave_f32(const float*, Py_ssize_t, Py_ssize_t, float*, Py_ssize_t,
                                   int) noexcept nogil
    void roialign_deinterleave_f64(const double*, Py_ssize_t, Py_ssize_t, double*, Py_ssize_t,
                                   int) noexcept nogil
    void roialign_bin_lanes_float(const float*, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                  Py_ssize_t, const Py_ssize_t*, const Py_ssize_t*,
                                  const Py_ssize_t*, const Py_ssize_t*, const float*, const float*,
                                  const float*, const float*, float*) noexcept nogil
    void roialign_bin_lanes_double(const double*, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                   Py_ssize_t, const Py_ssize_t*, const Py_ssize_t*,
                                   const Py_ssize_t*, const Py_ssize_t*, const double*,
                                   const double*, const double*, const double*,
                                   double*) noexcept nogil
    void roialign_stream_float(float*, const float*, Py_ssize_t) noexcept nogil
    void roialign_stream_double(double*, const double*, Py_ssize_t) noexcept nogil
    void store_fence "roialign_store_fence"() noexcept nogil
    enum: STREAM_PIXELS "ROIALIGN_STREAM_PIXELS"
    void roialign_deinterleave_stream_f32(const float*, Py_ssize_t, Py_ssize_t, float*,
                                          Py_ssize_t, float*) noexcept nogil
    void roialign_deinterleave_stream_f64(const double*, Py_ssize_t, Py_ssize_t, double*,
                                          Py_ssize_t, double*) noexcept nogil


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


cdef struct PsTask:
    # one task of the position-sensitive block loops: image n, bin q (= ph * PW + pw), output
    # channels c0..c0+nb, whose planes (PH * PW apart) start at element ``off`` of the map, and
    # the run lo..hi of the image's boxes within positions j0..j1
    Py_ssize_t n, q, c0, nb, off, lo, hi


cdef inline Py_ssize_t ps_tasks(const Shape* s) noexcept nogil:
    """How many tasks the position-sensitive block loops have: (image, bin, LANES channels)."""
    return s.N * s.PH * s.PW * ((s.Co + LANES - 1) // LANES)


cdef inline PsTask ps_task(Py_ssize_t task, const Shape* s, const int64_t* img_start,
                           Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """Task number -> PsTask (NCHW maps of shape ``s``), tasks ordered as ps_tasks counts them."""
    cdef PsTask t
    cdef Py_ssize_t bins = s.PH * s.PW, blocks = (s.Co + LANES - 1) // LANES
    t.n = task // (bins * blocks)
    t.q = (task // blocks) % bins
    t.c0 = (task % blocks) * LANES
    t.nb = s.Co - t.c0 if s.Co - t.c0 < LANES else LANES
    t.off = (t.n * s.C + t.c0 * bins + t.q) * s.H * s.W
    t.lo = img_start[t.n] if img_start[t.n] > j0 else j0
    t.hi = img_start[t.n + 1] if img_start[t.n + 1] < j1 else j1
    return t


cdef inline void ps_copy_in(const floating* maps, const PsTask* t, const Shape* s,
                            floating* block) noexcept nogil:
    """The task's planes of ``maps`` into a channels-last block (lanes past nb zero)."""
    interleave_planes(maps + t.off, s.PH * s.PW * s.H * s.W, t.nb, block, s.H * s.W)


cdef inline void ps_copy_back(const floating* block, const PsTask* t, const Shape* s,
                              floating* maps, floating* staging=NULL) noexcept nogil:
    """The first nb lanes of a channels-last block back into the task's planes of ``maps``; with
    a ``staging`` buffer (STREAM_PIXELS x LANES), streamed (stream_deinterleaved)."""
    if staging != NULL:
        stream_deinterleaved(block, s.H * s.W, t.nb, maps + t.off, staging,
                             s.PH * s.PW * s.H * s.W)
    else:
        deinterleave_bins(block, s.H * s.W, t.nb, maps + t.off, s.PH * s.PW * s.H * s.W)


cdef inline bint ps_begin(const PsTask* t, const Shape* s, floating* maps, floating* block,
                          bint assign) noexcept nogil:
    """Start a task of the position-sensitive block loops: False when its image has no box (with
    ``assign``, a gradient written over, its planes of ``maps`` are zeroed then), else its
    channels-last block: zero (``assign``) or a copy of its planes of ``maps``."""
    cdef Py_ssize_t c
    if t.lo >= t.hi:
        if assign:
            for c in range(t.nb):
                memset(maps + t.off + c * s.PH * s.PW * s.H * s.W, 0, s.H * s.W * sizeof(floating))
        return False
    if assign:
        memset(block, 0, s.H * s.W * LANES * sizeof(floating))
    else:
        ps_copy_in(maps, t, s, block)
    return True


cdef inline void interleave_planes(const floating* planes, Py_ssize_t plane_size, Py_ssize_t n_planes,
                            floating* block, Py_ssize_t n_pixels=-1) noexcept nogil:
    """block[i * LANES + c] = planes[c * plane_size + i] for i < n_pixels (default: plane_size);
    lanes past n_planes are zero."""
    if n_pixels < 0:
        n_pixels = plane_size
    if floating is float:
        roialign_interleave_f32(planes, plane_size, n_planes, block, 0, n_pixels)
    else:
        roialign_interleave_f64(planes, plane_size, n_planes, block, 0, n_pixels)


cdef inline void stream(floating* dst, const floating* src, Py_ssize_t n) noexcept nogil:
    """dst[:n] = src[:n] with non-temporal stores (roialign_stream: for outputs written once and
    too large for the caches, _cost.streams_output)."""
    if floating is float:
        roialign_stream_float(dst, src, n)
    else:
        roialign_stream_double(dst, src, n)


cdef inline void deinterleave_bins(const floating* block, Py_ssize_t n_bins, Py_ssize_t n_planes,
                            floating* planes, Py_ssize_t plane_stride,
                            floating* staging=NULL) noexcept nogil:
    """planes[c * plane_stride + i] = block[i * LANES + c] for the first n_planes lanes. With a
    ``staging`` buffer of n_bins x LANES and contiguous planes (plane_stride == n_bins), the
    planes are laid out there and streamed to ``planes`` in order (``stream``)."""
    cdef bint streamed = staging != NULL and plane_stride == n_bins
    cdef floating* dst = staging if streamed else planes
    if floating is float:
        roialign_deinterleave_f32(block, n_bins, n_planes, dst, plane_stride, 0)
    else:
        roialign_deinterleave_f64(block, n_bins, n_planes, dst, plane_stride, 0)
    if streamed:
        stream(planes, staging, n_bins * n_planes)


cdef inline void stream_deinterleaved(const floating* block, Py_ssize_t plane_size,
                                      Py_ssize_t n_planes, floating* planes, floating* staging,
                                      Py_ssize_t plane_stride=-1) noexcept nogil:
    """planes[c * plane_stride + i] = block[i * LANES + c] for i < plane_size and the first
    n_planes lanes (plane_stride: default plane_size), with non-temporal stores through
    ``staging`` (STREAM_PIXELS x LANES elements)."""
    if plane_stride < 0:
        plane_stride = plane_size
    if floating is float:
        roialign_deinterleave_stream_f32(block, plane_size, n_planes, planes, plane_stride, staging)
    else:
        roialign_deinterleave_stream_f64(block, plane_size, n_planes, planes, plane_stride, staging)


cdef inline void add_deinterleaved(const floating* block, Py_ssize_t plane_size,
                                   Py_ssize_t n_planes, floating* planes) noexcept nogil:
    """planes[c * plane_size + i] += block[i * LANES + c] for the first n_planes lanes."""
    if floating is float:
        roialign_deinterleave_f32(block, plane_size, n_planes, planes, plane_size, 1)
    else:
        roialign_deinterleave_f64(block, plane_size, n_planes, planes, plane_size, 1)


cdef struct Scratch:
    # one thread's buffers of a block loop (NULL where none was asked for or malloc failed)
    void* a
    void* b
    void* c
    bint ok


cdef inline Scratch scratch_open(size_t* failed, size_t a, size_t b, size_t c=0) noexcept nogil:
    """This thread's buffers of a, b and c bytes (0: none). Called inside the parallel region, so
    that no two threads share a buffer, and returned rather than filled through a pointer: Cython
    makes a variable private to each thread only where the region assigns it. When a malloc fails,
    ``ok`` is False (the thread must skip its tasks) and ``*failed``, a variable shared by the
    threads, is set to the bytes asked for."""
    cdef Scratch s
    s.a = malloc(a) if a else NULL
    s.b = malloc(b) if b else NULL
    s.c = malloc(c) if c else NULL
    s.ok = not ((a and s.a == NULL) or (b and s.b == NULL) or (c and s.c == NULL))
    if not s.ok:
        failed[0] = a + b + c  # every thread that fails writes the same value
    return s


cdef inline void scratch_close(Scratch* s) noexcept nogil:
    store_fence()  # a block loop's streamed stores are ordered before the region ends
    free(s.a)
    free(s.b)
    free(s.c)
    s.a = s.b = s.c = NULL


cdef inline int check_scratch(size_t failed) except -1:
    """After the parallel region: MemoryError when a thread's scratch (``failed`` bytes) could
    not be allocated."""
    if failed:
        raise MemoryError(f"cannot allocate {failed} bytes of per-thread scratch")
    return 0

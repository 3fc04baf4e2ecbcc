# Geometry shared by every CPU kernel (axis-aligned and rotated, forward and backward): where the
# sampling points of a bin lie and which pixels a bilinear sample reads. Spec sections 1, 4 and 5.
from cython cimport floating
from libc.math cimport ceil


cdef inline Py_ssize_t grid_size(Py_ssize_t sampling_ratio, floating roi_size,
                                 Py_ssize_t pooled) noexcept nogil:
    """Samples per bin along one axis: fixed, or adaptive ceil(roi / pooled).

    A non-positive adaptive size (degenerate or inverted aligned box) means no samples: output 0.
    The caller bounds roi / pooled (max_samples_per_bin), so the cast cannot overflow.
    """
    cdef floating g
    if sampling_ratio > 0:
        return sampling_ratio
    g = ceil(roi_size / <floating>pooled)
    return <Py_ssize_t>g if g > 0 else 0


cdef inline floating sample_coord(floating start, floating bin_size, Py_ssize_t p, Py_ssize_t i,
                                  Py_ssize_t g) noexcept nogil:
    """Coordinate of sample i (of g) in bin p, in the operand order of the reference kernels so
    that float32 results round the same way."""
    return start + <floating>p * bin_size + <floating>(i + 0.5) * bin_size / <floating>g


cdef inline double sample_fraction(Py_ssize_t p, Py_ssize_t i, Py_ssize_t g,
                                   Py_ssize_t pooled) noexcept nogil:
    """d(sample coordinate) / d(roi size): where the sample lies across the roi, in (0, 1)."""
    return (p + (i + 0.5) / g) / pooled


cdef inline bint bilinear_axis(floating c, Py_ssize_t size, Py_ssize_t* lo, Py_ssize_t* hi,
                               floating* w_lo, floating* w_hi, floating* slope) noexcept nogil:
    """One axis of a bilinear sample at coordinate c on an axis of ``size`` pixels.

    Sets the two taps and their weights, and ``slope`` = d(w_hi)/dc (0 where c is clamped).
    Returns False for a sample outside [-1, size] (NaN included): its value is 0, its weights are
    0 and its taps point at pixel 0 so that callers may read them unconditionally.
    """
    cdef Py_ssize_t l
    cdef floating f
    if not (c >= -1 and c <= size):
        lo[0] = 0
        hi[0] = 0
        w_lo[0] = 0
        w_hi[0] = 0
        slope[0] = 0
        return False
    slope[0] = 1
    if c <= 0:
        c = 0
        slope[0] = 0
    l = <Py_ssize_t>c
    if l >= size - 1:
        lo[0] = size - 1
        hi[0] = size - 1
        w_lo[0] = 1
        w_hi[0] = 0
        slope[0] = 0
        return True
    f = c - <floating>l
    lo[0] = l
    hi[0] = l + 1
    w_lo[0] = 1 - f
    w_hi[0] = f
    return True

# Geometry shared by every CPU kernel (axis-aligned and rotated, forward and backward): where the
# sampling points of a bin lie and which pixels a bilinear sample reads (docs/conventions.md,
# sections 1, 4 and 5).
from cython cimport floating
from libc.math cimport ceil

cdef extern from *:
    """
    /* a grid size no call can use (its tables alone would not fit in memory): larger sizes
       saturate here; roialign_cy._params.GRID_SATURATE is the same number */
    #define ROIALIGN_GRID_SATURATE ((Py_ssize_t)1 << 40)
    """
    Py_ssize_t GRID_SATURATE "ROIALIGN_GRID_SATURATE"


cdef inline Py_ssize_t grid_size(Py_ssize_t sampling_ratio, floating roi_size,
                                 Py_ssize_t pooled) noexcept nogil:
    """Samples per bin along one axis: fixed, or adaptive ceil(roi / pooled).

    A non-positive adaptive size (degenerate or inverted aligned box) means no samples: output 0.
    Sizes past GRID_SATURATE saturate there (the float-to-integer cast would be undefined), so the
    caller's bound check sees a size it refuses instead of a wrapped one.
    """
    cdef floating g
    if sampling_ratio > 0:
        return sampling_ratio
    g = ceil(roi_size / <floating>pooled)
    if not g > 0:  # NaN included
        return 0
    return <Py_ssize_t>g if g < GRID_SATURATE else GRID_SATURATE


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
    Returns False for a sample outside [-1, size] (NaN included): its value is 0 and callers must
    not read its taps (they point at pixel 0 with weight 0, and 0 * NaN is NaN).
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


cdef inline void valid_run(bint ok, Py_ssize_t i, Py_ssize_t* rng) noexcept nogil:
    """Grow rng[0]..rng[1] (first valid sample, one past the last) by sample i when it is valid.
    Along one axis the samples of a bin are monotonic in i (rounding is monotonic), so the valid
    ones form one run and a bin's valid samples are a rectangle of its grid."""
    if ok:
        if rng[1] <= rng[0]:
            rng[0] = i
        rng[1] = i + 1


cdef inline bint takes_max(floating v, floating best, bint first) noexcept nogil:
    """Max pooling's update rule: the first of equal maxima is kept, and a NaN sample wins and stays
    (numpy.max's rule: NaN propagates)."""
    return first or v > best or (v != v and best == best)

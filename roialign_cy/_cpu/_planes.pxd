# Where the planes of a feature map and the outputs of a box lie, in either layout: shared by the
# kernels whose tasks own planes (_roi_pool.pyx, and the position-sensitive ones of _roi_align.pyx).
# A plane's pixels are C elements apart in NHWC, adjacent in NCHW.


cdef struct Shape:
    # features (N, C, H, W) or (N, H, W, C); outputs (K, Co, PH, PW) or (K, PH, PW, Co)
    Py_ssize_t N, C, H, W, PH, PW, Co
    bint channels_last


cdef inline Shape shape_of(const Py_ssize_t* fs, const Py_ssize_t* os,
                           bint channels_last) noexcept nogil:
    """The Shape of features of shape ``fs`` and outputs (or output gradients) of shape ``os``."""
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
    """Where plane (n, ci) starts."""
    if s.channels_last:
        return n * s.H * s.W * s.C + ci
    return (n * s.C + ci) * s.H * s.W


cdef inline Py_ssize_t out_index(const Shape* s, Py_ssize_t k, Py_ssize_t c, Py_ssize_t ph,
                                 Py_ssize_t pw) noexcept nogil:
    """Where output (k, c, ph, pw) lies."""
    if s.channels_last:
        return ((k * s.PH + ph) * s.PW + pw) * s.Co + c
    return ((k * s.Co + c) * s.PH + ph) * s.PW + pw

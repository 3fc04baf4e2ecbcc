"""Argument checks that numpy would make in many passes, made in one compiled pass.

The Python layer (``roialign_cy._validate``) calls these on the common inputs and, when one reports
a problem, falls back to its own step-by-step checks, which say exactly what is wrong: these only
answer "fine" or "not fine", fast.
"""
from cython cimport floating
from libc.math cimport floor, isfinite
from libc.stdint cimport int64_t


def scan_boxes(const floating[:, :] boxes, Py_ssize_t n_images, bint check_order, bint rotated,
               int64_t[::1] batch_idx):
    """For (K, 5) [b, x1, y1, x2, y2] (or rotated (K, 6) [b, cx, cy, w, h, angle]) boxes: True
    when every value is finite, every batch index is a whole number in [0, n_images) and, with
    ``check_order``, no box is inverted; the batch indices are then written to ``batch_idx``."""
    cdef bint ok
    with nogil:
        ok = _scan(boxes, n_images, check_order, rotated, batch_idx)
    return ok


cdef bint _scan(const floating[:, :] boxes, Py_ssize_t n_images, bint check_order, bint rotated,
                int64_t[::1] batch_idx) noexcept nogil:
    cdef Py_ssize_t k, j
    cdef double b
    for k in range(boxes.shape[0]):
        for j in range(boxes.shape[1]):
            if not isfinite(boxes[k, j]):
                return False
        b = boxes[k, 0]
        if b != floor(b) or b < 0 or b >= n_images:
            return False
        if check_order:
            if rotated and (boxes[k, 3] < 0 or boxes[k, 4] < 0):
                return False
            if not rotated and (boxes[k, 3] < boxes[k, 1] or boxes[k, 4] < boxes[k, 2]):
                return False
        batch_idx[k] = <int64_t>b
    return True


def grid_bound(const int64_t[::1] gh, const int64_t[::1] gw, double limit):
    """True when every box's grid has at most ``limit`` samples per bin and per axis (the sizes
    are at most 2**40, so their product is exact in a double)."""
    cdef Py_ssize_t k
    cdef bint ok = True
    with nogil:
        for k in range(gh.shape[0]):
            if <double>gh[k] * <double>gw[k] > limit or gh[k] > limit or gw[k] > limit:
                ok = False
                break
    return ok

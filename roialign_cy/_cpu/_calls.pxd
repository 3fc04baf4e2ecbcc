# What the one-pass small calls of the kernel modules (forward_small) accept: the plain form of
# each argument, checked in C with no Python-level step. Each check answers "plain and valid" or
# not; on "not" the caller returns None and the general path (roialign_cy._validate) checks the
# call again, with its messages, and refuses or runs it. So these never raise, and never need to
# say what is wrong.
from cython cimport floating
from libc.math cimport floor, isfinite
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free, malloc

cdef enum:
    # the one-pass calls take at most this many boxes and images (past them the general path's
    # fixed cost is small against the kernels')
    SMALL_BOXES = 1024
    SMALL_IMAGES = 4096
    INT_MAX = 2147483647


cdef inline bint plain_output_size(object size, Py_ssize_t* ph, Py_ssize_t* pw):
    """An int, or a tuple of two ints, each in [1, INT_MAX]."""
    if type(size) is int:
        a = b = size
    elif type(size) is tuple and len(<tuple>size) == 2:
        a, b = size
    else:
        return False
    if type(a) is not int or type(b) is not int or not (1 <= a <= INT_MAX and 1 <= b <= INT_MAX):
        return False
    ph[0], pw[0] = a, b
    return True


cdef inline bint plain_scale(object value, double* scale):
    """A finite positive float (or a small positive int)."""
    if type(value) is float:
        scale[0] = value
    elif type(value) is int and 0 < value < INT_MAX:
        scale[0] = <double>(<Py_ssize_t>value)
    else:
        return False
    return isfinite(scale[0]) and scale[0] > 0


cdef inline bint plain_int(object value, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t* out):
    if type(value) is not int or not (lo <= value <= hi):
        return False
    out[0] = value
    return True


cdef inline bint plain_flag(object value):
    return value is True or value is False


cdef inline bint plain_layout(object layout, bint* channels_last):
    if type(layout) is not str or (layout != "NCHW" and layout != "NHWC"):
        return False
    channels_last[0] = layout == "NHWC"
    return True


cdef inline bint plain_threads(object n_threads):
    return n_threads is None or (type(n_threads) is int and 1 <= n_threads <= INT_MAX)


cdef inline int float_size(object features, object boxes, object ndarray, object float32,
                           object float64):
    """4 or 8: ``ndarray`` features and boxes of the same native float dtype (numpy's float32 and
    float64 dtypes, given by the caller: a .pxd imports no Python module); 0: anything else (the
    memoryviews then check rank and contiguity)."""
    if type(features) is not ndarray or type(boxes) is not ndarray:
        return 0
    dtype = features.dtype
    if boxes.dtype is not dtype:
        return 0
    if dtype is float32:
        return 4
    if dtype is float64:
        return 8
    return 0


cdef struct Plain:
    # what every one-pass call takes from its shared arguments (plain_call)
    int size  # the float dtype's itemsize
    Py_ssize_t ph, pw
    double scale
    bint channels_last, check_order


cdef inline bint plain_call(Plain* c, object features, object boxes, object output_size,
                            object spatial_scale, object layout, object n_threads,
                            object allow_inverted, object ndarray, object float32,
                            object float64):
    """The arguments every one-pass call shares, all plain (float_size and the checks above);
    the operator's own arguments are the caller's to check."""
    c.ph = c.pw = 0
    c.scale = 0
    c.channels_last = False
    c.check_order = allow_inverted is False
    c.size = float_size(features, boxes, ndarray, float32, float64)
    return (c.size != 0 and plain_output_size(output_size, &c.ph, &c.pw)
            and plain_scale(spatial_scale, &c.scale) and plain_flag(allow_inverted)
            and plain_layout(layout, &c.channels_last) and plain_threads(n_threads))


cdef inline bint scan_boxes(const floating[:, :] b, Py_ssize_t n_images, bint check_order,
                            floating* coords, int64_t* batch, bint rotated=False) noexcept nogil:
    """(K, 5) [batch_index, x1, y1, x2, y2] rows (rotated: (K, 6) [batch_index, cx, cy, w, h,
    angle]): every value finite, batch indices whole and in [0, n_images), and with
    ``check_order`` no inverted box (rotated: w >= 0 and h >= 0). Writes the (K, 4) (rotated:
    (K, 5)) coordinates and the batch indices."""
    cdef Py_ssize_t k, s, width = 5 if rotated else 4
    cdef double bi
    for k in range(b.shape[0]):
        for s in range(width + 1):
            if not isfinite(b[k, s]):
                return False
        bi = b[k, 0]
        if bi != floor(bi) or bi < 0 or bi >= n_images:
            return False
        if check_order and rotated and (b[k, 3] < 0 or b[k, 4] < 0):
            return False
        if check_order and not rotated and (b[k, 3] < b[k, 1] or b[k, 4] < b[k, 2]):
            return False
        batch[k] = <int64_t>bi
        for s in range(width):
            coords[width * k + s] = b[k, s + 1]
    return True


cdef inline void sort_by_image(const int64_t* batch, Py_ssize_t K, Py_ssize_t n_images,
                               int64_t* order, int64_t* image_start) noexcept nogil:
    """Box positions sorted by image, stably (a counting sort: the general path's argsort
    order), and where each image's run starts (image_start: n_images + 1 entries, zeroed)."""
    cdef Py_ssize_t k, n
    for k in range(K):
        image_start[batch[k] + 1] += 1
    for n in range(n_images):
        image_start[n + 1] += image_start[n]
    for k in range(K):  # image_start[n] runs ahead while placing, then is restored
        order[image_start[batch[k]]] = k
        image_start[batch[k]] += 1
    for n in range(n_images, 0, -1):
        image_start[n] = image_start[n - 1]
    image_start[0] = 0


cdef struct RowKey:
    double y
    int64_t k


cdef extern from "stdlib.h":
    void qsort(void* base, size_t n, size_t size,
               int (*compare)(const void*, const void*) noexcept nogil) noexcept nogil


cdef inline int by_row(const void* a, const void* b) noexcept nogil:
    cdef const RowKey* p = <const RowKey*>a
    cdef const RowKey* q = <const RowKey*>b
    if p.y != q.y:
        return -1 if p.y < q.y else 1
    return (p.k > q.k) - (p.k < q.k)


cdef inline bint row_order(const int64_t* order, const int64_t* starts, Py_ssize_t n_keys,
                           Py_ssize_t j0, Py_ssize_t j1, const floating* rois,
                           int64_t* visit) noexcept nogil:
    """The order in which a forward visits positions j0..j1 of ``order`` (boxes sorted by key,
    (level,) image; key n's run starts at starts[n]): each key's boxes by the y of their centres
    (y1 + y2 of the (K, 4) ``rois``), then by position, so that one box after another reads
    nearby rows of the maps. visit[j - j0] is the position visited at step j. No output depends
    on it (the gradients keep ``order``, whose sums follow it). False when out of memory."""
    cdef RowKey* keys = <RowKey*>malloc((j1 - j0 + 1) * sizeof(RowKey))
    cdef Py_ssize_t n, j, lo, hi, k
    if keys == NULL:
        return False
    for n in range(n_keys):
        lo = starts[n] if starts[n] > j0 else j0
        hi = starts[n + 1] if starts[n + 1] < j1 else j1
        for j in range(lo, hi):
            k = order[j]
            keys[j - lo].y = <double>rois[4 * k + 1] + <double>rois[4 * k + 3]
            keys[j - lo].k = j
        if hi - lo > 1:
            qsort(keys, hi - lo, sizeof(RowKey), by_row)
        for j in range(lo, hi):
            visit[j - j0] = keys[j - lo].k
    free(keys)
    return True


cdef inline Py_ssize_t visited_at(const int64_t* visit, Py_ssize_t j0, Py_ssize_t j) noexcept nogil:
    """The position a forward visits at step j (``visit`` from row_order; NULL: j itself)."""
    return visit[j - j0] if visit != NULL else j


cdef inline const int64_t* positions(const int64_t[::1] visit, Py_ssize_t j0,
                                     Py_ssize_t j1) except? NULL:
    """A forward's visiting order (visit[j - j0]: the position of step j, a permutation of
    j0..j1 that row_order makes), or NULL (None: in position order)."""
    if visit is None:
        return NULL
    if visit.shape[0] != j1 - j0:
        raise ValueError(f"visit has {visit.shape[0]} entries for positions {j0}..{j1}")
    cdef Py_ssize_t i
    for i in range(j1 - j0):
        if not j0 <= visit[i] < j1:
            raise ValueError(f"visit[{i}] = {visit[i]} is outside {j0}..{j1}")
    return &visit[0] if j1 > j0 else NULL


cdef struct Sizes:
    # a small call: K boxes on N images of C channels and H x W pixels
    Py_ssize_t K, N, C, H, W


cdef inline bint small_sizes(Sizes* z, const Py_ssize_t* box_shape, Py_ssize_t box_width,
                             const Py_ssize_t* map_shape, bint channels_last) noexcept nogil:
    """The sizes of a small call: (K, 1 + box_width) boxes, at most SMALL_BOXES of them and
    SMALL_IMAGES images, and no empty map (the general path says what an empty one means)."""
    z.K, z.N = box_shape[0], map_shape[0]
    if channels_last:
        z.H, z.W, z.C = map_shape[1], map_shape[2], map_shape[3]
    else:
        z.C, z.H, z.W = map_shape[1], map_shape[2], map_shape[3]
    return (box_shape[1] == box_width + 1 and 0 < z.K <= SMALL_BOXES and 0 < z.N <= SMALL_IMAGES
            and z.C > 0 and z.H > 0 and z.W > 0)


cdef inline object small_output(Py_ssize_t K, Py_ssize_t C, Py_ssize_t PH, Py_ssize_t PW,
                                bint channels_last, object dtype, Py_ssize_t itemsize,
                                object empty, object host_array):
    """The (K, C, PH, PW) (NHWC: (K, PH, PW, C)) output of a small call, or None when it does not
    fit in memory: the call is then declined, and the general path says so with its message.
    From ``empty`` (numpy's, given by the caller) below 1 MiB, which never reaches the output
    cache (its minimum is larger), else from ``host_array`` (_buffers: reused blocks)."""
    shape = (K, PH, PW, C) if channels_last else (K, C, PH, PW)
    try:
        if <double>K * C * PH * PW * itemsize < (1 << 20):
            return empty(shape, dtype)
        return host_array(shape, dtype)
    except (MemoryError, ValueError):
        return None


cdef inline int64_t* small_block(Py_ssize_t n) except NULL:
    """n zeroed 8-byte slots for a small call's per-box arrays (the caller frees them)."""
    cdef int64_t* block = <int64_t*>calloc(n, 8)
    if block == NULL:
        raise MemoryError("cannot allocate the tables of a small call")
    return block

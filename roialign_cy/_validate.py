"""Argument checking and normalisation shared by every public operator.

Each check raises ValueError/TypeError naming the argument and what was received; kernels then
assume valid, C-contiguous input and never check again.
"""
import math
import numbers
import operator

import numpy as np

from ._buffers import host_array
from ._params import DEFAULT_MAX_SAMPLES_PER_BIN, LAYOUTS, MODES

FLOAT_DTYPES = {"cpu": ("float32", "float64"), "cuda": ("float16", "float32", "float64")}
_INT_MAX = 2**31 - 1  # C int: the kernels' thread count


def xp_of(backend):
    if backend == "cuda":
        import cupy

        return cupy
    return np


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_flag(name, value):
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_int(name, value, minimum=None, maximum=None):
    if type(value) is int and (minimum is None or value >= minimum) and (
            maximum is None or value <= maximum):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def output_size(value):
    """int or ordered (height, width) pair of positive ints (tuple, list or 1-d array) -> (PH, PW).
    Sets, dicts and iterators are refused: their order is not the caller's."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        value = (value, value)
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = tuple(value.tolist())
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"output_size must be an int or a (height, width) tuple, list or array, "
                        f"got {type(value).__name__} {value!r}")
    if len(value) != 2:
        raise ValueError(f"output_size must be an int or a pair of ints, got {value!r}")
    pair = tuple(check_int("output_size", v, minimum=1) for v in value)
    if max(pair) > _INT_MAX:  # the kernels index bins in C integers
        raise ValueError(f"output_size must be at most {_INT_MAX} per side, got {value!r}")
    return pair


def spatial_scale(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"spatial_scale must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"spatial_scale must be finite and > 0, got {value}")
    return value


def n_threads(value):
    if value is None:
        return None
    value = check_int("n_threads", value, minimum=1)
    if value > _INT_MAX:
        raise ValueError(f"n_threads must be <= {_INT_MAX}, got {value}")
    return value


_NATIVE_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def features(array, layout, backend):
    """Float feature map of rank 4 -> C-contiguous array (no copy when already so)."""
    if (type(array) is np.ndarray and backend == "cpu" and array.ndim == 4
            and array.dtype in _NATIVE_FLOATS and array.flags.c_contiguous):
        return array  # the usual call: nothing to check further or convert
    xp = xp_of(backend)
    if array is None or isinstance(array, (str, bytes, numbers.Number)):
        raise TypeError(f"features must be a float array of rank 4, got {type(array).__name__}")
    if backend == "cpu" and not isinstance(array, np.ndarray):
        try:
            array = np.asarray(array)
        except Exception as exc:
            raise TypeError(f"features must be an array, got {type(array).__name__}") from exc
    if array.dtype.name not in FLOAT_DTYPES[backend]:
        raise TypeError(
            f"features must have a floating dtype ({', '.join(FLOAT_DTYPES[backend])}) on the "
            f"{backend} backend, got {array.dtype}"
        )
    if array.ndim != 4:
        raise ValueError(
            f"features must have rank 4 ({'N, C, H, W' if layout == 'NCHW' else 'N, H, W, C'}), "
            f"got shape {tuple(array.shape)}"
        )
    # a non-native byte order (e.g. '>f4' read from a file) is converted, not refused
    return xp.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))


def position_sensitive_channels(shape, layout, ph, pw, op):
    """The position-sensitive operators read channel (c * PH + ph) * PW + pw: C must be a
    multiple of PH * PW."""
    c = shape[3] if layout == "NHWC" else shape[1]
    if c % (ph * pw):
        raise ValueError(
            f"features must have a multiple of output_size[0] * output_size[1] = {ph * pw} "
            f"channels for {op} (C_out x {ph} x {pw}), got {c} channels (shape {tuple(shape)}, "
            f"{layout})")


def no_box_gradient(op, wrt):
    """The operators without a box gradient refuse wrt="boxes" / "both", saying why."""
    if wrt == "features" or op in ("roi_align", "roi_align_rotated"):
        return
    if op == "ps_roi_align":
        why = ("roialign_cy computes only the feature gradient of ps_roi_align (torchvision has no "
               "box gradient either)")
    else:
        why = (f"{op} rounds the boxes to whole pixels: its output is piecewise constant in the "
               "boxes, whose gradient is 0 wherever it exists")
    raise ValueError(f"wrt={wrt!r} is not available: {why}; use wrt='features'")


def argmax(array, shape, backend):
    """roi_pool's arg-max pixels: the int32 array of the output's shape that a forward returned
    -> C-contiguous, of the backend's array type (its values are checked where they are used)."""
    xp = xp_of(backend)
    if backend == "cpu" and type(array) is not np.ndarray or backend == "cuda" and not hasattr(array, "__cuda_array_interface__"):
        raise TypeError(f"argmax must be a {'numpy' if backend == 'cpu' else 'cupy'} array (the "
                        f"one roi_pool(..., return_argmax=True) returned), got {type(array).__name__}")
    if array.dtype != np.int32:
        raise TypeError(f"argmax must be the int32 array roi_pool(..., return_argmax=True) "
                        f"returned, got dtype {array.dtype}")
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"argmax must have the output's shape {tuple(shape)}, got {tuple(array.shape)}")
    return xp.ascontiguousarray(array)


def argmax_fits(shape, channels_last):
    """The int32 arg-max holds y * W + x: maps of 2**31 pixels or more cannot return one."""
    h, w = (shape[1], shape[2]) if channels_last else (shape[2], shape[3])
    if h * w > np.iinfo(np.int32).max:
        raise ValueError(f"return_argmax needs fewer than 2**31 pixels per map (int32 indices, "
                         f"as torchvision's); these maps have {h} x {w}")


def spatial_extent(shape, layout, k):
    """Boxes need pixels to sample: an empty H or W leaves a bilinear sample no neighbours."""
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    if k and (h == 0 or w == 0):
        raise ValueError(
            f"features must have H >= 1 and W >= 1 when there are boxes to pool, got shape "
            f"{tuple(shape)} ({layout})"
        )


def grad_output(array, shape, dtype, backend):
    """dL/d(output): an array of the output's shape and the features' dtype -> C-contiguous."""
    xp = xp_of(backend)
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise TypeError(f"grad_output must be a {xp.__name__} array, got {type(array).__name__}")
    if tuple(array.shape) != shape:
        raise ValueError(f"grad_output must have shape {shape}, got {tuple(array.shape)}")
    if np.dtype(array.dtype).newbyteorder("=") != dtype:
        raise TypeError(
            f"grad_output must have dtype {dtype} (the features' dtype), got {array.dtype}"
        )
    return xp.ascontiguousarray(array, dtype=dtype)


def feature_shape(shape, layout):
    """A features *shape* (used when only the feature gradient in avg mode is wanted)."""
    try:
        shape = tuple(check_int("features shape", s, minimum=0) for s in shape)
    except TypeError:
        raise TypeError(f"features must be an array or a shape tuple, got {shape!r}") from None
    if len(shape) != 4:
        raise ValueError(f"features shape must have 4 entries ({layout}), got {shape!r}")
    return shape


def boxes(value, n_images, batch_indices, width, dtype, backend, name="boxes"):
    """Any of the three box forms -> (rois (K, width) C-contiguous of ``dtype``, batch_idx (K,)
    int64, form) where form is "batched", "onnx" or "list"."""
    xp = xp_of(backend)
    coords = "x1, y1, x2, y2" if width == 4 else "cx, cy, w, h, angle"
    if isinstance(value, (list, tuple)):
        if batch_indices is not None:
            raise ValueError(f"batch_indices must be None when {name} is a list of per-image arrays")
        parts, idx = [], []
        for i, part in enumerate(value):
            part = part if backend == "cuda" else np.asarray(part)
            if part.ndim == 1 and part.shape[0] in (width, width + 1):
                raise ValueError(
                    f"{name} is a list, which means one (L, {width}) array of boxes per image (the "
                    f"list position is the batch index), but {name}[{i}] is a single row of "
                    f"{part.shape[0]}; for a table of [batch_index, {coords}] rows pass "
                    f"np.asarray({name})"
                )
            if part.ndim != 2 or part.shape[1] != width:
                raise ValueError(
                    f"{name}[{i}] must have shape (L, {width}) [{coords}] (a list holds one array "
                    f"per image), got {tuple(part.shape)}"
                )
            _check_real(f"{name}[{i}]", part)
            with np.errstate(over="ignore"):  # overflow to inf is reported below
                parts.append(part.astype(dtype, copy=False))
            idx.append(xp.full(part.shape[0], i, dtype=xp.int64))
        rois = xp.concatenate(parts) if parts else xp.zeros((0, width), dtype)
        batch_idx = xp.concatenate(idx) if idx else xp.zeros(0, xp.int64)
        form = "list"
    else:
        arr = value if backend == "cuda" else np.asarray(value)
        _check_real(name, arr)
        if arr.ndim != 2 or arr.shape[1] not in (width, width + 1):
            raise ValueError(
                f"{name} must have shape (K, {width + 1}) [batch_index, {coords}] or (K, {width}) "
                f"with batch_indices, got {tuple(arr.shape)}"
            )
        if arr.shape[1] == width + 1:
            if batch_indices is not None:
                raise ValueError(
                    f"batch_indices must be None when {name} has {width + 1} columns "
                    "(the first column holds the batch index)"
                )
            col = arr[:, 0]
            if not bool(xp.all(col == xp.floor(col))):
                raise ValueError(f"{name}[:, 0] (batch index) must hold whole numbers")
            _check_finite(f"{name}[:, 0] (batch index)", col)
            _check_batch_range(col, n_images)
            batch_idx = col.astype(xp.int64)
            rois = arr[:, 1:]
            form = "batched"
        else:
            if batch_indices is None:
                if n_images != 1:
                    raise ValueError(
                        f"{name} of shape (K, {width}) needs batch_indices when features hold "
                        f"{n_images} images"
                    )
                batch_idx = xp.zeros(arr.shape[0], xp.int64)
            else:
                batch_idx = batch_index_array(batch_indices, arr.shape[0], backend)
            rois = arr
            form = "onnx"
        with np.errstate(over="ignore"):  # overflow to inf is reported below
            rois = xp.ascontiguousarray(rois, dtype=dtype)
    _check_finite(name, rois, f" in {np.dtype(dtype).name}")
    _check_batch_range(batch_idx, n_images)
    return rois, xp.ascontiguousarray(batch_idx), form


def boxes_fast(value, n_images, batch_indices, width, dtype, backend, check_order):
    """The common call, checked in one compiled pass: a (K, width + 1) numpy array of the boxes'
    dtype, all finite, batch indices in range and (``check_order``) no inverted box. Returns what
    :func:`boxes` would, or None: then :func:`boxes` and :func:`box_order` say what is wrong."""
    if not (type(value) is np.ndarray and backend == "cpu" and batch_indices is None
            and value.ndim == 2 and value.shape[1] == width + 1 and value.dtype == dtype):
        return None
    from ._cpu import _checks

    batch_idx = np.empty(value.shape[0], np.int64)
    if not _checks.scan_boxes(value, n_images, check_order, width == 5, batch_idx):
        return None
    return np.ascontiguousarray(value[:, 1:]), batch_idx, "batched"


def box_order(rois, rotated, name="boxes"):
    """Refuse inverted boxes (x2 < x1 or y2 < y1; rotated: w < 0 or h < 0) unless the caller
    asked for the peers' convention with allow_inverted=True."""
    xp = np if isinstance(rois, np.ndarray) else xp_of("cuda")
    if rotated:
        bad = (rois[:, 2] < 0) | (rois[:, 3] < 0)
        what = "w >= 0 and h >= 0"
    else:
        bad = (rois[:, 2] < rois[:, 0]) | (rois[:, 3] < rois[:, 1])
        what = "x2 >= x1 and y2 >= y1"
    if rois.shape[0] and bool(xp.any(bad)):
        k = int(xp.argmax(bad))
        raise ValueError(
            f"{name} must have {what}; box {k} is {[float(c) for c in rois[k]]} (pass "
            "allow_inverted=True to accept inverted boxes with the peers' convention)"
        )


def batch_index_array(value, k, backend):
    xp = xp_of(backend)
    arr = value if backend == "cuda" else np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"batch_indices must be an integer array, got dtype {arr.dtype}")
    if arr.shape != (k,):
        raise ValueError(f"batch_indices must have shape ({k},) to match boxes, got {tuple(arr.shape)}")
    _check_batch_range(arr, None)
    return xp.ascontiguousarray(arr, dtype=xp.int64)


def _check_batch_range(idx, n_images):
    """Batch indices in [0, n_images) (n_images None: within int64, checked before the cast)."""
    hi = np.iinfo(np.int64).max if n_images is None else n_images - 1
    if idx.size and (bool(idx.min() < 0) or bool(idx.max() > hi)):
        bad = idx[(idx < 0) | (idx > hi)]
        held = "" if n_images is None else f"features hold {n_images} images, "
        raise ValueError(f"batch index out of range: {held}got {int(bad[0])}")


def _check_real(name, arr):
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")


def _check_finite(name, arr, where=""):
    xp = np if isinstance(arr, np.ndarray) else xp_of("cuda")
    if arr.size and not bool(xp.all(xp.isfinite(arr))):
        raise ValueError(f"{name} must be finite (no NaN or inf){where}")


def sample_bound(max_samples_per_bin, gh, gw):
    """Refuse calls whose sampling grid would run for hours (see DEFAULT_MAX_SAMPLES_PER_BIN)."""
    if gh.size == 0:
        return
    from ._cpu import _checks

    if _checks.grid_bound(gh, gw, float(max_samples_per_bin)):
        return
    gh, gw = gh.astype(np.float64), gw.astype(np.float64)
    # each axis is bounded as well: a grid with no columns still lays out its rows (tables, loop
    # trips), and a grid size past int64 would not survive the cast in the kernels
    with np.errstate(over="ignore", invalid="ignore"):
        worst = np.maximum(gh * gw, np.maximum(gh, gw))
    k = int(np.argmax(np.where(np.isnan(worst), np.inf, worst)))
    if not worst[k] <= max_samples_per_bin:  # NaN and inf refused too
        raise ValueError(
            f"sampling grid too large: box {k} would take {gh[k]:.15g} x {gw[k]:.15g} samples per "
            f"bin (max_samples_per_bin={max_samples_per_bin}); pass a smaller sampling_ratio or "
            "raise max_samples_per_bin"
        )


def max_samples(value):
    return check_int("max_samples_per_bin", value, minimum=1)


def check_out(out, shape, dtype, backend):
    xp = xp_of(backend)
    if not isinstance(out, xp.ndarray):
        raise TypeError(f"out must be a {xp.__name__} array, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != dtype:
        raise ValueError(f"out must have shape {shape} and dtype {dtype}, got {tuple(out.shape)} {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    return out


def allocate(xp, shape, dtype, name, zeros=False):
    """An output array, or a MemoryError that names the output (numpy says "array is too big"
    with a ValueError for shapes past the address space). Large host arrays come from the
    block cache of ``_buffers`` (reused, already mapped memory)."""
    try:
        if xp is np:
            return host_array(shape, dtype, zeros)
        return (xp.zeros if zeros else xp.empty)(shape, dtype)
    except (ValueError, MemoryError) as exc:
        raise MemoryError(f"cannot allocate {name} of shape {tuple(shape)} and dtype "
                          f"{np.dtype(dtype).name}: {exc}") from None


def no_overlap(out, inputs):
    """Refuse an ``out`` that shares memory with any input (the kernels read the inputs while they
    write ``out``: aliasing gives wrong numbers, or reads of freed memory)."""
    xp = np if isinstance(out, np.ndarray) else xp_of("cuda")
    for name, arr in inputs.items():
        parts = arr if isinstance(arr, (list, tuple)) else [arr]
        for part in parts:
            if isinstance(part, xp.ndarray) and _overlaps(out, part, xp):
                raise ValueError(f"out must not share memory with {name}")


def _overlaps(a, b, xp):
    if not xp.may_share_memory(a, b):
        return False
    if xp is not np:
        return True
    try:
        return bool(np.shares_memory(a, b, max_work=1 << 20))
    except Exception:  # numpy's TooHardError: too costly to decide, so refuse
        return True


__all__ = [
    "DEFAULT_MAX_SAMPLES_PER_BIN", "LAYOUTS", "MODES", "output_size", "spatial_scale", "features",
    "boxes", "check_choice", "check_flag", "check_int", "n_threads", "sample_bound",
]

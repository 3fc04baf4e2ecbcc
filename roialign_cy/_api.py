"""The public operators: validate once into a plan, then run it (allocate, call the kernel)."""
from typing import Any, Dict, Literal, Optional, Sequence, Tuple, Union, overload

import numpy as np

from . import _backends
from . import _validate as v
from ._params import DEFAULT_MAX_SAMPLES_PER_BIN, EDGES, GRID_SATURATE, OPS, OpParams
from ._plan import Plan
from ._typing import (Array, ArrayLike, Backend, BoxGrad, Boxes, FeaturesOrShape, Layout, Mode,
                      OutputSize, Wrt)


def _prepare(op, features, boxes, batch_indices, output_size, spatial_scale, sampling_ratio,
             aligned, mode, layout, backend, n_threads, max_samples_per_bin, clockwise=False,
             deterministic=True, extra_arrays=None, shape_only_dtype=None, allow_inverted=False,
             edge="torchvision"):
    """Validate every argument; return (Plan, features validated, or None when only their shape
    was given). ``op`` is a key of ``OPERATORS``."""
    rotated = op == "roi_align_rotated"
    arrays = {"features": None if shape_only_dtype is not None else features, "boxes": boxes,
              "batch_indices": batch_indices}
    arrays.update(extra_arrays or {})
    backend = _backends.select(op, arrays, backend)
    p = params(rotated, output_size, spatial_scale, sampling_ratio, aligned, mode, layout,
               clockwise, deterministic, n_threads, "roi_align" if rotated else op, edge)
    layout = "NHWC" if p.channels_last else "NCHW"
    max_samples_per_bin = v.max_samples(max_samples_per_bin)
    if shape_only_dtype is not None:
        shape = v.feature_shape(features, layout)
        dtype = np.dtype(shape_only_dtype)
        if dtype.name not in v.FLOAT_DTYPES[backend]:
            raise TypeError(f"dtype must be one of {', '.join(v.FLOAT_DTYPES[backend])} on the "
                            f"{backend} backend, got {dtype}")
        features = None
    else:
        features = v.features(features, layout, backend)
        shape, dtype = tuple(features.shape), features.dtype
    if p.position_sensitive:
        v.position_sensitive_channels(shape, layout, p.pooled_h, p.pooled_w, op)
    n_images = shape[0]
    # float16 features keep float32 boxes: half precision cannot place a box to the pixel
    box_dtype = np.float32 if dtype == np.float16 else dtype
    check_order = not v.check_flag("allow_inverted", allow_inverted)
    width = 5 if rotated else 4
    checked = v.boxes_fast(boxes, n_images, batch_indices, width, box_dtype, backend, check_order)
    rois, batch_idx, form = checked or v.boxes(boxes, n_images, batch_indices, width, box_dtype,
                                               backend)
    v.spatial_extent(shape, layout, rois.shape[0])
    if check_order and checked is None:
        v.box_order(rois, rotated)
    grid = None
    if not p.integer_bins:  # integer bins are bounded by the map: no sampling grid to bound
        grid = _grid_sizes(rois, p)
        v.sample_bound(max_samples_per_bin, *grid)
    plan = Plan(_backends.module(backend), shape, dtype, rois, batch_idx, form,
                {"boxes": boxes, "batch_indices": batch_indices}, p,
                grid if backend == "cpu" else None)
    return plan, features


_cpu = None


def _cpu_module():
    """The CPU driver, imported on first use (importing roialign_cy builds nothing)."""
    global _cpu
    if _cpu is None:
        from . import _cpu as module

        _cpu = module
    return _cpu


def _one_pass(kernels, out, batch_indices, backend, *args):
    """A forward of few boxes in one compiled pass, with no Python-level step: the result of
    ``forward_small(*args)`` of the CPU kernel module ``kernels``, or None when the call is not
    a plain one (the caller then takes the general path, which checks it with its messages)."""
    if (out is not None or batch_indices is not None or type(backend) is not str
            or (backend != "auto" and backend != "cpu")):
        return None
    return getattr(_cpu or _cpu_module(), kernels).forward_small(*args)


def _fixed_params(op, mode, aligned, sampling_ratio):
    """(mode, aligned, sampling_ratio) of roi_pool / ps_roi_* whose convention fixes them; a value
    given to ``plan`` that contradicts the operator is refused rather than ignored."""
    fixed = {"roi_pool": ("max", False, 0), "ps_roi_pool": ("avg", False, 0),
             "ps_roi_align": ("avg", True, sampling_ratio)}[op]
    if mode != "avg" and mode != fixed[0]:
        raise ValueError(f"mode={mode!r} does not apply to op={op!r} (it pools by "
                         f"{'max' if fixed[0] == 'max' else 'average'})")
    if aligned is not None and op == "ps_roi_align" and aligned is not True:
        raise ValueError("ps_roi_align always samples with the half-pixel offset (aligned=True)")
    if op != "ps_roi_align" and (aligned or sampling_ratio not in (-1, 0)):
        raise ValueError(f"op={op!r} pools whole pixels: aligned and sampling_ratio do not apply")
    return fixed


# OpParams of the scalar arguments already checked, keyed by their types and values (1 == True
# and 0.25 == np.float32(0.25) in Python, but not as arguments); unhashable ones are not kept
_PARAMS: Dict[Any, OpParams] = {}
_PARAMS_KEPT = 256


def params(*args, **kwargs):
    """The scalar arguments of any operator, checked -> OpParams (see ``_check_params``); a
    call repeats its scalars, so each combination is checked once."""
    try:
        key = (tuple((type(a), a) for a in args),
               tuple((k, type(a), a) for k, a in sorted(kwargs.items())))
        return _PARAMS[key]
    except (KeyError, TypeError):
        pass
    checked = _check_params(*args, **kwargs)
    try:
        if len(_PARAMS) >= _PARAMS_KEPT:
            _PARAMS.clear()
        _PARAMS[key] = checked
    except TypeError:
        pass
    return checked


def _check_params(rotated, output_size, spatial_scale, sampling_ratio, aligned, mode, layout,
                  clockwise=False, deterministic=True, n_threads=None, op="roi_align",
                  edge="torchvision"):
    """The scalar arguments of any operator, checked -> OpParams. roi_pool and ps_roi_pool take
    no sampling_ratio or aligned (pass 0 and False); ps_roi_align is always aligned."""
    layout = v.check_choice("layout", layout, v.LAYOUTS)
    mode = v.check_choice("mode", mode, ("avg",) if rotated else v.MODES)
    ph, pw = v.output_size(output_size)
    scale = v.spatial_scale(spatial_scale)
    # past GRID_SATURATE samples per axis no grid can be pooled (its tables would not fit)
    sampling_ratio = v.check_int("sampling_ratio", sampling_ratio, minimum=-1,
                                 maximum=GRID_SATURATE)
    return OpParams(pooled_h=ph, pooled_w=pw, spatial_scale=scale, sampling_ratio=sampling_ratio,
                    aligned=v.check_flag("aligned", aligned), mode=mode,
                    channels_last=layout == "NHWC", rotated=rotated,
                    clockwise=v.check_flag("clockwise", clockwise),
                    n_threads=v.n_threads(n_threads),
                    deterministic=v.check_flag("deterministic", deterministic), op=op,
                    edge=v.check_choice("edge", edge, EDGES))


def _grid_sizes(rois, p):
    """Samples per bin along y and x of every box, by the same compiled rule the kernels use."""
    from . import _cpu

    return _cpu.grid_sizes(rois if isinstance(rois, np.ndarray) else rois.get(), p)


def _forward(op, features, boxes, output_size, spatial_scale, sampling_ratio, aligned, mode,
             layout, batch_indices, backend, n_threads, out, max_samples_per_bin, clockwise=False,
             allow_inverted=False, edge="torchvision", return_argmax=False):
    plan, checked = _prepare(
        op, features, boxes, batch_indices, output_size, spatial_scale, sampling_ratio, aligned,
        mode, layout, backend, n_threads, max_samples_per_bin, clockwise=clockwise,
        extra_arrays={"out": out}, allow_inverted=allow_inverted, edge=edge)
    return plan._forward(checked, out, features, return_argmax)


def _backward(op, grad_output, features, boxes, output_size, spatial_scale, sampling_ratio,
              aligned, mode, layout, batch_indices, wrt, backend, n_threads, deterministic,
              max_samples_per_bin, clockwise=False, allow_inverted=False, edge="torchvision",
              argmax=None):
    wrt = v.check_choice("wrt", wrt, ("features", "boxes", "both"))
    v.no_box_gradient(op, wrt)
    shape_only = isinstance(features, (tuple, list)) and not _looks_like_array(features)
    if shape_only and wrt != "features":
        raise ValueError(
            f"features must be the feature array, not just its shape, for wrt={wrt!r}: the box "
            "gradient reads the feature values (only the feature gradient in avg mode works from "
            "the shape)"
        )
    if shape_only and mode != "avg" and argmax is None:
        what = "roi_pool" if op == "roi_pool" else f"mode={mode!r}"
        raise ValueError(
            f"features must be the feature array, not just its shape, for {what}: the "
            "max-mode gradient reads the feature values to find each bin's maximum"
        )
    if mode == "onnx_max":
        raise ValueError("mode='onnx_max' reproduces an onnxruntime forward quirk and has no "
                         "gradient; use mode='max' (mmcv) for a differentiable max")
    plan, checked = _prepare(
        op, features, boxes, batch_indices, output_size, spatial_scale, sampling_ratio, aligned,
        mode, layout, backend, n_threads, max_samples_per_bin, clockwise=clockwise,
        deterministic=deterministic, extra_arrays={"grad_output": grad_output, "argmax": argmax},
        shape_only_dtype=_grad_dtype(grad_output, backend) if shape_only else None,
        allow_inverted=allow_inverted, edge=edge)
    p = plan.params
    grad_output = v.grad_output(grad_output, plan.output_shape(), plan.dtype, plan.backend)
    if argmax is not None:
        argmax = plan._argmax(argmax)
    return plan._backward(grad_output, checked, plan.feature_shape, wrt, p, argmax)


def _grad_dtype(grad_output, backend):
    dtype = getattr(grad_output, "dtype", None)
    allowed = v.FLOAT_DTYPES["cuda" if backend == "cuda" else "cpu"]
    if dtype is None or np.dtype(dtype).name not in allowed:
        raise TypeError(f"grad_output must be a float array ({', '.join(allowed)}), got "
                        f"{type(grad_output).__name__} of dtype {dtype}")
    return np.dtype(dtype).newbyteorder("=")


def _looks_like_array(x):
    try:
        return np.asarray(x).ndim != 1
    except Exception:
        return True


def plan(boxes: Boxes, feature_shape: Sequence[int], output_size: OutputSize,
         spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: Optional[bool] = None,
         *, rotated: bool = False, mode: Mode = "avg", layout: Layout = "NCHW",
         batch_indices: Optional[ArrayLike] = None, clockwise: bool = False,
         dtype: Any = np.float32, backend: Backend = "auto", n_threads: Optional[int] = None,
         max_samples_per_bin: int = DEFAULT_MAX_SAMPLES_PER_BIN,
         allow_inverted: bool = False, op: str = "roi_align",
         edge: str = "torchvision") -> Plan:
    """Validate boxes and parameters once, for any number of forward and backward calls.

    Returns a :class:`~roialign_cy._plan.Plan` ``p``: ``p.forward(features, out=None)`` equals
    ``roi_align(features, boxes, ...)`` (or ``roi_align_rotated`` with ``rotated=True``) and
    ``p.backward(grad_output, features=None, wrt="features")`` equals the matching ``*_backward``
    call, bit for bit. The sampling tables (taps and weights of every sample, the PreCalc of
    Caffe2) are built on first use and kept, so the same boxes on many maps (video frames, channel
    groups, several models), or a forward and its backward in training, pay for them once.

    Parameters
    ----------
    boxes, output_size, spatial_scale, sampling_ratio, mode, layout, batch_indices, clockwise,
    backend, n_threads, max_samples_per_bin, allow_inverted
        As in :func:`roi_align` / :func:`roi_align_rotated`.
    feature_shape : tuple of 4 ints
        (N, C, H, W), or (N, H, W, C) with layout="NHWC": the maps the plan will be used on. Each
        call's features must have these N, H, W and ``dtype``; C may differ.
    aligned : bool, optional
        Default: each operator's default (False for ``roi_align``, True for rotated boxes).
    rotated : bool
        Boxes are rotated (K, 6) [b, cx, cy, w, h, angle_degrees] (``roi_align_rotated``).
    dtype : float32 or float64 (float16 too with the cuda backend)
        The features' dtype (it also sets the precision the boxes are placed in).
    op : "roi_align" | "roi_pool" | "ps_roi_align" | "ps_roi_pool"
        The operator the plan runs (``rotated=True`` needs "roi_align"). roi_pool and
        ps_roi_pool take no sampling_ratio or aligned; ps_roi_align is always aligned.
    edge : "torchvision" | "image"
        ps_roi_pool's clipping rule, as in :func:`ps_roi_pool`.
    """
    op = v.check_choice("op", op, OPS)
    if not isinstance(rotated, (bool, np.bool_)):
        raise TypeError(f"rotated must be a bool, got {type(rotated).__name__} {rotated!r}")
    if rotated and op != "roi_align":
        raise ValueError(f"rotated=True is RoIAlign over rotated boxes; op={op!r} takes "
                         "axis-aligned boxes only")
    if op != "roi_align":
        mode, aligned, sampling_ratio = _fixed_params(op, mode, aligned, sampling_ratio)
    elif rotated:
        op = "roi_align_rotated"
    if aligned is None:
        aligned = bool(rotated)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a float dtype, got {dtype!r}") from None
    made = _prepare(op, feature_shape, boxes, batch_indices, output_size, spatial_scale,
                    sampling_ratio, aligned, mode, layout, backend, n_threads, max_samples_per_bin,
                    clockwise=clockwise, shape_only_dtype=dtype,
                    allow_inverted=allow_inverted, edge=edge)[0]
    # a plan outlives the call: it keeps copies, not views of the caller's boxes, which may change
    made._rois, made._batch_idx = made._rois.copy(), made._batch_idx.copy()
    return made


def roi_align(features: ArrayLike, boxes: Boxes, output_size: OutputSize,
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              *, mode: Mode = "avg", layout: Layout = "NCHW",
              batch_indices: Optional[ArrayLike] = None, backend: Backend = "auto",
              n_threads: Optional[int] = None, out: Optional[Array] = None,
              max_samples_per_bin: int = DEFAULT_MAX_SAMPLES_PER_BIN,
              allow_inverted: bool = False) -> Array:
    """RoIAlign: pool each box of a feature map into a fixed grid by bilinear sampling.

    Parameters
    ----------
    features : array (N, C, H, W), or (N, H, W, C) with layout="NHWC"
        float32 or float64 (float16 too on the GPU). numpy -> CPU kernels, cupy -> CUDA kernels.
        Any strides are accepted (a contiguous copy is made when needed).
    boxes : array or list of arrays
        Boxes in input-image coordinates (x1, y1, x2, y2), in one of three forms: (K, 5)
        [batch_index, x1, y1, x2, y2] (torchvision/Caffe2); (K, 4) with ``batch_indices`` (ONNX),
        or (K, 4) alone when N == 1; a list of per-image (L_i, 4) arrays (the list position is the
        batch index).
    output_size : int or (int, int)
        (PH, PW) bins per box.
    spatial_scale : float
        Factor from box coordinates to feature-map coordinates (e.g. 0.25 for stride 4).
    sampling_ratio : int
        Samples per bin along each axis; 0 or -1 means adaptive, ceil(roi_size / output_size).
    aligned : bool
        True: shift boxes by -0.5 pixel (half-pixel centres; detectron2, ONNX "half_pixel").
        False (torchvision's default): no shift, and boxes smaller than one pixel grow to 1 pixel.
    mode : "avg" | "max" | "onnx_max"
        "max": the largest bilinear sample of each bin (mmcv). "onnx_max": onnxruntime's variant,
        the largest of the four *weighted taps* over samples; for ONNX parity only.
    layout : "NCHW" | "NHWC"
    batch_indices : int array (K,), optional
        ONNX form: the image of each box when ``boxes`` is (K, 4).
    backend : "auto" | "cpu" | "cuda"
        "auto" follows the array type; a backend that cannot read the arrays raises TypeError.
    n_threads : int, optional
        CPU threads (default: OpenMP's, i.e. OMP_NUM_THREADS or all cores). Results are
        bit-identical for any value.
    out : array, optional
        Preallocated C-contiguous output of the right shape and dtype.
    max_samples_per_bin : int
        Refuse calls whose grid has more samples per bin than this (guards against adaptive
        sampling of huge boxes running for hours); raise it if you really need more.
    allow_inverted : bool
        Boxes with x2 < x1 or y2 < y1 are a ValueError by default (usually a bug upstream).
        True accepts them with the peers' convention: aligned=False grows them to 1 pixel,
        aligned=True keeps the negative size (adaptive sampling then takes no samples: 0).
        Degenerate boxes (x1 == x2 or y1 == y2) are always accepted.

    Returns
    -------
    array (K, C, PH, PW), or (K, PH, PW, C) for NHWC, of the features' dtype. Samples outside
    [-1, H] x [-1, W] count as 0; an empty sampling grid gives 0.
    """
    pooled = _one_pass("_roi_align", out, batch_indices, backend, "roi_align", features, boxes,
                       output_size, spatial_scale, sampling_ratio, aligned, mode, layout,
                       n_threads, max_samples_per_bin, allow_inverted)
    if pooled is not None:
        return pooled
    return _forward("roi_align", features, boxes, output_size, spatial_scale, sampling_ratio,
                    aligned, mode, layout, batch_indices, backend, n_threads, out,
                    max_samples_per_bin, allow_inverted=allow_inverted)


@overload
def roi_align_backward(grad_output: ArrayLike, features: FeaturesOrShape, boxes: Boxes,
                       output_size: OutputSize, spatial_scale: float = ..., sampling_ratio: int = ...,
                       aligned: bool = ..., *, mode: Mode = ..., layout: Layout = ...,
                       batch_indices: Optional[ArrayLike] = ..., wrt: Literal["features"] = ...,
                       backend: Backend = ..., n_threads: Optional[int] = ...,
                       deterministic: bool = ..., max_samples_per_bin: int = ...,
                       allow_inverted: bool = ...) -> Array: ...


@overload
def roi_align_backward(grad_output: ArrayLike, features: FeaturesOrShape, boxes: Boxes,
                       output_size: OutputSize, spatial_scale: float = ..., sampling_ratio: int = ...,
                       aligned: bool = ..., *, mode: Mode = ..., layout: Layout = ...,
                       batch_indices: Optional[ArrayLike] = ..., wrt: Literal["boxes"],
                       backend: Backend = ..., n_threads: Optional[int] = ...,
                       deterministic: bool = ..., max_samples_per_bin: int = ...,
                       allow_inverted: bool = ...) -> BoxGrad: ...


@overload
def roi_align_backward(grad_output: ArrayLike, features: FeaturesOrShape, boxes: Boxes,
                       output_size: OutputSize, spatial_scale: float = ..., sampling_ratio: int = ...,
                       aligned: bool = ..., *, mode: Mode = ..., layout: Layout = ...,
                       batch_indices: Optional[ArrayLike] = ..., wrt: Literal["both"],
                       backend: Backend = ..., n_threads: Optional[int] = ...,
                       deterministic: bool = ..., max_samples_per_bin: int = ...,
                       allow_inverted: bool = ...) -> Tuple[Array, BoxGrad]: ...


def roi_align_backward(grad_output: ArrayLike, features: FeaturesOrShape, boxes: Boxes,
                       output_size: OutputSize, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                       aligned: bool = False, *, mode: Mode = "avg", layout: Layout = "NCHW",
                       batch_indices: Optional[ArrayLike] = None, wrt: Wrt = "features",
                       backend: Backend = "auto", n_threads: Optional[int] = None,
                       deterministic: bool = True,
                       max_samples_per_bin: int = DEFAULT_MAX_SAMPLES_PER_BIN,
                       allow_inverted: bool = False) -> Union[Array, BoxGrad, Tuple[Array, BoxGrad]]:
    """Gradient of :func:`roi_align` (same arguments), given ``grad_output`` = dL/d(output).

    ``features`` is the feature array, or only its shape when just the feature gradient in avg
    mode is wanted (that gradient does not read feature values).

    wrt : "features" | "boxes" | "both"
        "features": dL/d(features), shaped like the features. Each sample sends
        grad * weight / count to its 4 taps (max mode: only the arg-max sample, first on ties).
        Computed in parallel and deterministically: bit-identical for any thread count.
        "boxes": dL/d(boxes), shaped like ``boxes`` (the batch-index column is 0; a list of
        boxes gives a list). The exact derivative of the forward through spatial_scale, the
        aligned offset, the bin sizes and the bilinear weights, with these conventions: a sample
        coordinate clamped to the image edge (below 0, or past H-1 / W-1) has zero derivative;
        samples outside the image contribute nothing; a roi size raised to 1 (aligned=False) does
        not depend on the far corner; the adaptive grid size is held constant (the function is
        piecewise smooth and the derivative is that of the piece the boxes are in).
        "both": (grad_features, grad_boxes).
    deterministic : bool
        GPU only: False allows a faster atomic scatter for the feature gradient.
    """
    return _backward("roi_align", grad_output, features, boxes, output_size, spatial_scale,
                     sampling_ratio, aligned, mode, layout, batch_indices, wrt, backend,
                     n_threads, deterministic, max_samples_per_bin, allow_inverted=allow_inverted)


def roi_align_rotated(features: ArrayLike, boxes: Boxes, output_size: OutputSize,
                      spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = True,
                      *, clockwise: bool = False, layout: Layout = "NCHW",
                      batch_indices: Optional[ArrayLike] = None, backend: Backend = "auto",
                      n_threads: Optional[int] = None, out: Optional[Array] = None,
                      max_samples_per_bin: int = DEFAULT_MAX_SAMPLES_PER_BIN,
                      allow_inverted: bool = False) -> Array:
    """RoIAlign over rotated boxes (detectron2 ``ROIAlignRotated``, Caffe2 ``RoIAlignRotated``).

    boxes : (K, 6) [batch_index, cx, cy, w, h, angle_degrees], or (K, 5) with ``batch_indices``,
        or a list of per-image (L_i, 5) arrays. Angles are counter-clockwise in degrees (detectron2,
        Caffe2); ``clockwise=True`` follows mmcv's clockwise option (the angle is negated). A
        sample at offset (xx, yy) from the box centre in the box frame lands at
        y = yy cos(t) - xx sin(t) + cy, x = yy sin(t) + xx cos(t) + cx.
    aligned : bool
        True (default, detectron2): centre shifted by -0.5 pixel. False (Caffe2/mmcv legacy): no
        shift, and w, h raised to at least 1 pixel.
    allow_inverted : bool
        Negative w or h is a ValueError by default (detectron2 requires w, h >= 0); True accepts
        it as Caffe2 and mmcv do.

    Other arguments and the output are as in :func:`roi_align` (average pooling).
    """
    pooled = _one_pass("_roi_align_rotated", out, batch_indices, backend, features, boxes,
                       output_size, spatial_scale, sampling_ratio, aligned, clockwise, layout,
                       n_threads, max_samples_per_bin, allow_inverted)
    if pooled is not None:
        return pooled
    return _forward("roi_align_rotated", features, boxes, output_size, spatial_scale,
                    sampling_ratio, aligned, "avg", layout, batch_indices, backend, n_threads, out,
                    max_samples_per_bin, clockwise=clockwise, allow_inverted=allow_inverted)


@overload
def roi_align_rotated_backward(grad_output: ArrayLike, features: FeaturesOrShape, boxes: Boxes,
                               output_size: OutputSize, spatial_scale: float = ..., sampling_ratio: int = ...,
                               aligned: bool = ..., *, clockwise: bool = ..., layout: Layout = ...,
                               batch_indices: Optional[ArrayLike] = ..., wrt: Literal["features"] = ...,
                               backend: Backend = ..., n_threads: Optional[int] = ...,
                               deterministic: bool = ..., max_samples_per_bin: int = ...,
                               allow_inverted: bool = ...) -> Array: ...


@overload
def roi_align_rotated_backward(grad_output: ArrayLike, features: FeaturesOrShape, boxes: Boxes,
                               output_size: OutputSize, spatial_scale: float = ..., sampling_ratio: int = ...,
                               aligned: bool = ..., *, clockwise: bool = ..., layout: Layout = ...,
                               batch_indices: Optional[ArrayLike] = ..., wrt: Literal["boxes"],
                               backend: Backend = ..., n_threads: Optional[int] = ...,
                               deterministic: bool = ..., max_samples_per_bin: int = ...,
                               allow_inverted: bool = ...) -> BoxGrad: ...


@overload
def roi_align_rotated_backward(grad_output: ArrayLike, features: FeaturesOrShape, boxes: Boxes,
                               output_size: OutputSize, spatial_scale: float = ..., sampling_ratio: int = ...,
                               aligned: bool = ..., *, clockwise: bool = ..., layout: Layout = ...,
                               batch_indices: Optional[ArrayLike] = ..., wrt: Literal["both"],
                               backend: Backend = ..., n_threads: Optional[int] = ...,
                               deterministic: bool = ..., max_samples_per_bin: int = ...,
                               allow_inverted: bool = ...) -> Tuple[Array, BoxGrad]: ...


def roi_align_rotated_backward(grad_output: ArrayLike, features: FeaturesOrShape, boxes: Boxes,
                               output_size: OutputSize, spatial_scale: float = 1.0,
                               sampling_ratio: int = -1, aligned: bool = True, *,
                               clockwise: bool = False, layout: Layout = "NCHW",
                               batch_indices: Optional[ArrayLike] = None, wrt: Wrt = "features",
                               backend: Backend = "auto", n_threads: Optional[int] = None,
                               deterministic: bool = True,
                               max_samples_per_bin: int = DEFAULT_MAX_SAMPLES_PER_BIN,
                               allow_inverted: bool = False) -> Union[Array, BoxGrad, Tuple[Array, BoxGrad]]:
    """Gradient of :func:`roi_align_rotated`, as :func:`roi_align_backward`.

    The box gradient is with respect to (cx, cy, w, h, angle_degrees), per degree; w and h have
    zero derivative where aligned=False raised them to 1; the conventions of
    :func:`roi_align_backward` apply otherwise.
    """
    return _backward("roi_align_rotated", grad_output, features, boxes, output_size,
                     spatial_scale, sampling_ratio, aligned, "avg", layout, batch_indices, wrt,
                     backend, n_threads, deterministic, max_samples_per_bin, clockwise=clockwise,
                     allow_inverted=allow_inverted)

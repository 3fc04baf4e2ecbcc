"""Multi-level (FPN) RoIAlign: each box is pooled from the pyramid level that suits its size.

The work is split in steps: validation of the levels (``_check_levels``), the level of each box
(``assign_levels``), and the pooling itself (``_pool_levels`` / ``_unpool_levels``). On the CPU the
pooling and its gradients are one call of the multi-level kernels: every level's boxes in one
parallel region, each written straight to its row of the output (no per-level gather or scatter).
On CUDA each step is one launch over every level (the gradient's tile lists cover every level).
"""
import math
import numbers
from typing import Any, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union, overload

import numpy as np

from . import _api, _backends
from . import _validate as v
from ._api import _grad_dtype, _looks_like_array
from ._params import DEFAULT_MAX_SAMPLES_PER_BIN
from ._plan import _box_grad_like
from ._typing import (Array, ArrayLike, Backend, BoxGrad, Boxes, FeaturesOrShape, Layout, Mode,
                      OutputSize, Wrt)

Assign = Literal["torchvision", "detectron2"]
# The epsilon each library adds to the FPN level formula (see assign_levels for where).
ASSIGN_EPS = {"torchvision": 1e-6, "detectron2": 1e-8}


class _Problem(NamedTuple):
    """A validated multi-level call: the levels, the boxes and where each box goes."""

    features: List[Any]  # per level: the array, or its shape (shape-only feature gradient)
    shapes: List[Tuple[int, ...]]
    scales: List[float]
    rois: Any  # (K, 4) [x1, y1, x2, y2], C-contiguous, the features' dtype (float32 for float16)
    batch_idx: Any  # (K,) int64
    form: str  # how the boxes came in: "batched", "onnx" or "list"
    levels: Any  # (K,) int64: the level of each box
    backend: str


def _check_levels(features, spatial_scales, layout):
    """Validate the per-level maps (or shapes) and their scales; return (shapes, scales, k_min).

    Each scale must be 2**-k for an integer k and the levels consecutive (k_min, k_min + 1, ...):
    the FPN formula gives a level number, and level index = k - k_min must name the right map.
    """
    if not isinstance(features, (list, tuple)) or not features:
        raise TypeError(f"features must be a non-empty list or tuple of feature maps (one per "
                        f"level), got {type(features).__name__}")
    shapes = []
    for i, f in enumerate(features):
        shape = v.feature_shape(f, layout) if _is_shape(f) else tuple(np.shape(f))
        if len(shape) != 4:
            raise ValueError(f"features[{i}] must have rank 4 ({layout}), got shape {shape}")
        shapes.append(shape)
    channel_axis = 1 if layout == "NCHW" else 3
    for i, shape in enumerate(shapes[1:], 1):
        if shape[0] != shapes[0][0] or shape[channel_axis] != shapes[0][channel_axis]:
            raise ValueError(
                f"features[{i}] must have the images and channels of features[0] ({layout}): got "
                f"shape {shape}, features[0] has {shapes[0]}")
    if isinstance(spatial_scales, (str, bytes)) or not hasattr(spatial_scales, "__len__"):
        raise TypeError(f"spatial_scales must be a sequence of floats (one per level), got "
                        f"{type(spatial_scales).__name__}")
    if len(spatial_scales) != len(shapes):
        raise ValueError(f"spatial_scales must have one entry per level ({len(shapes)}), got "
                         f"{len(spatial_scales)}")
    scales = [v.spatial_scale(s) for s in spatial_scales]
    k = [-math.log2(s) for s in scales]
    k_min = round(k[0])
    if any(kl != k_min + i for i, kl in enumerate(k)):
        raise ValueError(
            "spatial_scales must be consecutive powers of two, 2**-k_min, 2**-(k_min + 1), ... "
            f"(the FPN level formula indexes the levels by k), got {list(spatial_scales)}")
    return shapes, scales, k_min


def _is_shape(f):
    return isinstance(f, (tuple, list)) and not _looks_like_array(f)


def assign_levels(rois: Any, k_min: int, k_max: int, canonical_scale: float = 224,
                  canonical_level: int = 4, eps: Optional[float] = None,
                  assign: Assign = "torchvision") -> Any:
    """Level index (0 for k_min) of each box by the FPN paper's eq. 1, as torchvision or detectron2
    compute it.

    rois : (K, 4) [x1, y1, x2, y2] array (numpy or cupy), in input-image pixels. The arithmetic
        is done in its dtype, as the peers do it in the boxes' dtype.
    assign : "torchvision" | "detectron2"
        "torchvision" (``MultiScaleRoIAlign``'s LevelMapper):
        k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), eps = 1e-6.
        "detectron2" (``ROIPooler``'s assign_boxes_to_levels):
        k = floor(canonical_level + log2(sqrt(area) / canonical_scale + eps)), eps = 1e-8.
        area = (x2 - x1) * (y2 - y1) in both; k is then clamped to [k_min, k_max].
    eps : float, optional
        Overrides the rule's epsilon.

    Returns an int64 array (K,) of k - k_min. A box of zero area goes to the first level; one
    whose area is negative (inverted on one axis, with allow_inverted=True) has no defined size
    and goes to the first level too (the peers leave such a box unpooled, i.e. zero).
    """
    assign = v.check_choice("assign", assign, tuple(ASSIGN_EPS))
    canonical_scale = _positive_real("canonical_scale", canonical_scale)
    canonical_level = v.check_int("canonical_level", canonical_level)
    eps = ASSIGN_EPS[assign] if eps is None else _positive_real("eps", eps, allow_zero=True)
    xp = np if isinstance(rois, np.ndarray) else v.xp_of("cuda")
    dtype = rois.dtype.type
    with np.errstate(divide="ignore", invalid="ignore"):  # zero and negative areas: see above
        size = xp.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
        if assign == "torchvision":
            k = xp.floor(canonical_level + xp.log2(size / canonical_scale) + dtype(eps))
        else:
            k = xp.floor(canonical_level + xp.log2(size / canonical_scale + dtype(eps)))
    k = xp.where(xp.isnan(k), k_min, xp.clip(k, k_min, k_max))
    return k.astype(np.int64) - k_min


def _positive_real(name, value, allow_zero=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        raise ValueError(f"{name} must be finite and {'>=' if allow_zero else '>'} 0, got {value}")
    return value


def _prepare(features, boxes, spatial_scales, layout, batch_indices, backend, canonical_scale,
             canonical_level, eps, assign, allow_inverted, grad_output=None):
    """Validate a multi-level call and assign its boxes to levels; return (_Problem, dtype)."""
    shapes, scales, k_min = _check_levels(features, spatial_scales, layout)
    shape_only = [_is_shape(f) for f in features]
    if any(shape_only) and grad_output is None:
        raise TypeError("features must be the feature arrays (not their shapes) for the forward")
    if any(shape_only) and not all(shape_only):
        raise TypeError("features must be all arrays or all shapes, not a mix")
    arrays = {f"features[{i}]": None if shape_only[0] else f for i, f in enumerate(features)}
    arrays.update(boxes=boxes, batch_indices=batch_indices, grad_output=grad_output)
    backend = _backends.select("roi_align", arrays, backend)
    if shape_only[0]:
        dtype = _grad_dtype(grad_output, backend)
    else:
        features = [f if backend == "cuda" else np.asarray(f) for f in features]
        dtype = features[0].dtype.newbyteorder("=")
        for i, f in enumerate(features):
            if f.dtype.name not in v.FLOAT_DTYPES[backend] or f.dtype.newbyteorder("=") != dtype:
                raise TypeError(
                    f"features[{i}] must have a floating dtype ({', '.join(v.FLOAT_DTYPES[backend])}), "
                    f"the same on every level; got {f.dtype}, features[0] has {features[0].dtype}")
    # float16 features keep float32 boxes, as in roi_align
    box_dtype = np.float32 if dtype == np.float16 else dtype
    rois, batch_idx, form = v.boxes(boxes, shapes[0][0], batch_indices, 4, box_dtype, backend)
    if not v.check_flag("allow_inverted", allow_inverted):
        v.box_order(rois, False)  # checked here so that the message gives the box's own index
    levels = assign_levels(rois, k_min, k_min + len(shapes) - 1, canonical_scale, canonical_level,
                           eps, assign)
    return _Problem(list(features), shapes, scales, rois, batch_idx, form,
                    levels.astype(np.int64) if backend == "cpu" else levels,
                    backend), dtype


def _levels_kernels(problem, kwargs):
    """(the backend's multi-level kernels, OpParams, the levels' C-contiguous maps; None for
    shapes)."""
    be = _backends.module(problem.backend)
    # the scales are per level (problem.scales); OpParams' spatial_scale goes unused
    p = _api.params(False, kwargs["output_size"], 1.0, kwargs["sampling_ratio"],
                    kwargs["aligned"], kwargs["mode"], kwargs["layout"],
                    deterministic=kwargs.get("deterministic", True),
                    n_threads=kwargs["n_threads"])
    max_samples = v.max_samples(kwargs["max_samples_per_bin"])
    from . import _cpu  # the one statement of the grid rule (on host copies of CuPy boxes)

    host = [a if isinstance(a, np.ndarray) else a.get() for a in (problem.rois, problem.levels)]
    v.sample_bound(max_samples, *_cpu.grid_sizes(host[0], p, host[1].astype(np.int64),
                                                 problem.scales))
    maps = [None if _is_shape(f) else v.features(f, kwargs["layout"], problem.backend)
            for f in problem.features]
    return be, p, maps


def _pool_levels(problem, out, kwargs):
    """Pool every box from its level into ``out`` (box order)."""
    be, p, maps = _levels_kernels(problem, kwargs)
    be.forward_levels(maps, problem.rois, problem.batch_idx, problem.levels, problem.scales, out, p)


def _unpool_levels(problem, grad_output, wrt, dtype, kwargs):
    """Per-level feature gradients and the (K, 4) box gradient (None where not asked for)."""
    xp = v.xp_of(problem.backend)
    grad_rois = xp.zeros(problem.rois.shape, problem.rois.dtype) if wrt != "features" else None
    be, p, maps = _levels_kernels(problem, kwargs)
    if p.mode == "onnx_max":
        raise ValueError("mode='onnx_max' reproduces an onnxruntime forward quirk and has no "
                         "gradient; use mode='max' (mmcv) for a differentiable max")
    if maps[0] is None and (wrt != "features" or p.mode != "avg"):
        raise ValueError(f"features must be the feature arrays, not just their shapes, for "
                         f"wrt={wrt!r} and mode={p.mode!r}: only the feature gradient in avg "
                         "mode works from the shapes")
    grad_features = None
    if wrt != "boxes":
        grad_features = [v.allocate(xp, shape, dtype, f"the gradient of level {i}", zeros=True)
                         for i, shape in enumerate(problem.shapes)]
        be.backward_features_levels(grad_output, maps, problem.rois, problem.batch_idx,
                                    problem.levels, problem.scales, grad_features, p)
    if grad_rois is not None:
        be.backward_boxes_levels(grad_output, maps, problem.rois, problem.batch_idx,
                                 problem.levels, problem.scales, grad_rois, p)
    return grad_features, grad_rois


def _out_shape(shapes, k, output_size, layout):
    ph, pw = v.output_size(output_size)
    if layout == "NHWC":
        return (k, ph, pw, shapes[0][3])
    return (k, shapes[0][1], ph, pw)


def multi_scale_roi_align(
    features: Sequence[ArrayLike], boxes: Boxes, output_size: OutputSize,
    spatial_scales: Sequence[float], sampling_ratio: int = -1, aligned: bool = False, *,
    canonical_scale: float = 224, canonical_level: int = 4, eps: Optional[float] = None,
    assign: Assign = "torchvision", layout: Layout = "NCHW", mode: Mode = "avg",
    batch_indices: Optional[ArrayLike] = None, backend: Backend = "auto",
    n_threads: Optional[int] = None, max_samples_per_bin: int = DEFAULT_MAX_SAMPLES_PER_BIN,
    allow_inverted: bool = False,
) -> Array:
    """RoIAlign over a feature pyramid (FPN): each box is pooled from the level that suits its size.

    Parameters
    ----------
    features : list of L arrays (N, C, H_l, W_l), or (N, H_l, W_l, C) with layout="NHWC"
        The pyramid, finest level first; same N, C and dtype on every level.
    boxes : array or list of arrays
        As in :func:`roialign_cy.roi_align`: (K, 5) [batch_index, x1, y1, x2, y2], (K, 4) with
        ``batch_indices``, or a list of per-image (L_i, 4) arrays; input-image pixels.
    output_size : int or (int, int)
    spatial_scales : sequence of L floats
        Scale of each level, 2**-k_min, 2**-(k_min + 1), ... (e.g. 1/4, 1/8, 1/16, 1/32).
    sampling_ratio, aligned :
        As in :func:`roialign_cy.roi_align`. torchvision's ``MultiScaleRoIAlign`` uses
        aligned=False; detectron2's FPN models pool with aligned=True (``ROIPooler`` with
        pooler type "ROIAlignV2", the default of its configs).
    canonical_scale, canonical_level : the FPN paper's 224 and k0 = 4: a box of
        sqrt(area) = canonical_scale is pooled from level k = canonical_level.
    eps, assign :
        The level rule, "torchvision" (default) or "detectron2", and its epsilon (default: the
        rule's own, 1e-6 or 1e-8); see :func:`assign_levels`. A box's level k is clamped to the
        levels present, and pooled from ``features[k - k_min]`` with k_min = -log2(spatial_scales[0]).
    layout, mode, batch_indices, backend, n_threads, max_samples_per_bin, allow_inverted :
        As in :func:`roialign_cy.roi_align`.

    Returns
    -------
    array (K, C, PH, PW), or (K, PH, PW, C) for NHWC, in box order, of the features' dtype.
    """
    problem, dtype = _prepare(features, boxes, spatial_scales, layout, batch_indices, backend,
                              canonical_scale, canonical_level, eps, assign, allow_inverted)
    out = v.xp_of(problem.backend).empty(
        _out_shape(problem.shapes, problem.rois.shape[0], output_size, layout), dtype)
    kwargs = dict(output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned,
                  mode=mode, layout=layout, backend=backend, n_threads=n_threads,
                  max_samples_per_bin=max_samples_per_bin, allow_inverted=allow_inverted)
    _pool_levels(problem, out, kwargs)
    return out


_GradFeatures = List[Array]


@overload
def multi_scale_roi_align_backward(
    grad_output: ArrayLike, features: Sequence[FeaturesOrShape], boxes: Boxes,
    output_size: OutputSize, spatial_scales: Sequence[float], sampling_ratio: int = ...,
    aligned: bool = ..., *, canonical_scale: float = ..., canonical_level: int = ...,
    eps: Optional[float] = ..., assign: Assign = ..., layout: Layout = ..., mode: Mode = ...,
    batch_indices: Optional[ArrayLike] = ..., wrt: Literal["features"] = ...,
    backend: Backend = ..., n_threads: Optional[int] = ..., deterministic: bool = ...,
    max_samples_per_bin: int = ..., allow_inverted: bool = ...,
) -> _GradFeatures: ...


@overload
def multi_scale_roi_align_backward(
    grad_output: ArrayLike, features: Sequence[FeaturesOrShape], boxes: Boxes,
    output_size: OutputSize, spatial_scales: Sequence[float], sampling_ratio: int = ...,
    aligned: bool = ..., *, canonical_scale: float = ..., canonical_level: int = ...,
    eps: Optional[float] = ..., assign: Assign = ..., layout: Layout = ..., mode: Mode = ...,
    batch_indices: Optional[ArrayLike] = ..., wrt: Literal["boxes"],
    backend: Backend = ..., n_threads: Optional[int] = ..., deterministic: bool = ...,
    max_samples_per_bin: int = ..., allow_inverted: bool = ...,
) -> BoxGrad: ...


@overload
def multi_scale_roi_align_backward(
    grad_output: ArrayLike, features: Sequence[FeaturesOrShape], boxes: Boxes,
    output_size: OutputSize, spatial_scales: Sequence[float], sampling_ratio: int = ...,
    aligned: bool = ..., *, canonical_scale: float = ..., canonical_level: int = ...,
    eps: Optional[float] = ..., assign: Assign = ..., layout: Layout = ..., mode: Mode = ...,
    batch_indices: Optional[ArrayLike] = ..., wrt: Literal["both"],
    backend: Backend = ..., n_threads: Optional[int] = ..., deterministic: bool = ...,
    max_samples_per_bin: int = ..., allow_inverted: bool = ...,
) -> Tuple[_GradFeatures, BoxGrad]: ...


def multi_scale_roi_align_backward(
    grad_output: ArrayLike, features: Sequence[FeaturesOrShape], boxes: Boxes,
    output_size: OutputSize, spatial_scales: Sequence[float], sampling_ratio: int = -1,
    aligned: bool = False, *, canonical_scale: float = 224, canonical_level: int = 4,
    eps: Optional[float] = None, assign: Assign = "torchvision", layout: Layout = "NCHW",
    mode: Mode = "avg", batch_indices: Optional[ArrayLike] = None, wrt: Wrt = "features",
    backend: Backend = "auto", n_threads: Optional[int] = None, deterministic: bool = True,
    max_samples_per_bin: int = DEFAULT_MAX_SAMPLES_PER_BIN, allow_inverted: bool = False,
) -> Union[_GradFeatures, BoxGrad, Tuple[_GradFeatures, BoxGrad]]:
    """Gradient of :func:`multi_scale_roi_align` (same arguments), given ``grad_output``.

    ``features`` is the list of per-level arrays, or of their shapes when only the feature
    gradient in avg mode is wanted. Each box sends its gradient to the level it was pooled from.

    wrt : "features" | "boxes" | "both"
        "features": a list of L arrays, dL/d(features[l]), shaped like each level. "boxes":
        dL/d(boxes) shaped like ``boxes`` (conventions of :func:`roialign_cy.roi_align_backward`;
        the level assignment is piecewise constant and has no derivative). "both": (list, boxes).
    deterministic : bool
        As in :func:`roialign_cy.roi_align_backward`.
    """
    wrt = v.check_choice("wrt", wrt, ("features", "boxes", "both"))
    if grad_output is None:
        raise TypeError("grad_output must be an array, got None")
    problem, dtype = _prepare(features, boxes, spatial_scales, layout, batch_indices, backend,
                              canonical_scale, canonical_level, eps, assign, allow_inverted,
                              grad_output)
    name = problem.backend
    oshape = _out_shape(problem.shapes, problem.rois.shape[0], output_size, layout)
    grad_output = v.grad_output(grad_output, oshape, dtype, name)
    kwargs = dict(output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned,
                  mode=mode, layout=layout, backend=backend, n_threads=n_threads,
                  deterministic=deterministic, max_samples_per_bin=max_samples_per_bin,
                  allow_inverted=allow_inverted)
    grad_features, grad_rois = _unpool_levels(problem, grad_output, wrt, dtype, kwargs)
    if grad_rois is None:
        return grad_features
    grad_boxes = _box_grad_like(grad_rois, boxes, problem.form, v.xp_of(name))
    return grad_boxes if grad_features is None else (grad_features, grad_boxes)


__all__ = ["multi_scale_roi_align", "multi_scale_roi_align_backward", "assign_levels",
           "ASSIGN_EPS"]

"""The rest of the RoI family: RoIPool and the position-sensitive operators (R-FCN), public
functions. Same validation, plans and kernels structure as RoIAlign (``_api``); the conventions
are docs/conventions.md, sections 8 and 9."""
from typing import Any, Optional

from ._api import _backward, _forward, _one_pass
from ._params import DEFAULT_MAX_SAMPLES_PER_BIN
from ._typing import Array, ArrayLike, Backend, Boxes, FeaturesOrShape, Layout, OutputSize, Wrt

_BOXES_DOC = """boxes : array or list of arrays
        (K, 5) [batch_index, x1, y1, x2, y2], (K, 4) with ``batch_indices``, (K, 4) alone when
        N == 1, or a list of per-image (L_i, 4) arrays, in input-image pixels (as
        :func:`roialign_cy.roi_align`)."""


def roi_pool(features: ArrayLike, boxes: Boxes, output_size: OutputSize,
             spatial_scale: float = 1.0, *, layout: Layout = "NCHW",
             batch_indices: Optional[ArrayLike] = None, backend: Backend = "auto",
             n_threads: Optional[int] = None, out: Optional[Array] = None,
             allow_inverted: bool = False, return_argmax: bool = False) -> Any:
    """RoIPool (Fast R-CNN; torchvision ``roi_pool``, Caffe2 ``RoIPool``, ONNX ``MaxRoiPool``): the
    largest pixel of each of PH x PW integer bins of every box.

    Box corners are rounded to whole feature pixels (``round(x * spatial_scale)``, halves away
    from zero), a box covers its end pixel (``x2 - x1 + 1`` wide, at least 1), and bin ``ph``
    covers rows ``floor(ph * h / PH)`` to ``ceil((ph + 1) * h / PH)`` of it, clipped to the map
    (docs/conventions.md, section 8). An empty bin gives 0. A NaN pixel wins (numpy.max's rule;
    torchvision and onnxruntime skip NaN pixels).

    Parameters
    ----------
    features : array (N, C, H, W), or (N, H, W, C) with layout="NHWC"
        float32 or float64 (float16 too on the GPU); numpy -> CPU, cupy -> CUDA.
    """ + _BOXES_DOC + """
    output_size : int or (int, int)
        (PH, PW) bins per box.
    spatial_scale : float
        Factor from box coordinates to feature-map pixels (e.g. 1/16 for stride 16).
    layout, batch_indices, backend, n_threads, out, allow_inverted
        As in :func:`roialign_cy.roi_align`. Inverted boxes (x2 < x1) are refused unless
        ``allow_inverted=True``, which makes them 1 x 1 pixel (the peers' rule).
    return_argmax : bool
        Also return each bin's arg-max pixel (torchvision's second output), for
        :func:`roi_pool_backward`'s ``argmax=``: the gradient then reads no feature value and
        skips the search.

    Returns
    -------
    array (K, C, PH, PW), or (K, PH, PW, C) for NHWC, of the features' dtype; with
    ``return_argmax``, also an int32 array of that shape (as torchvision's): ``y * W + x`` of
    each bin's arg-max pixel in its plane (the first maximum in row-major order), -1 for an empty
    bin.
    """
    if return_argmax is False:  # (any other value is the general path's to accept or refuse)
        pooled = _one_pass("_roi_pool", out, batch_indices, backend, "roi_pool", features, boxes,
                           output_size, spatial_scale, layout, n_threads, allow_inverted,
                           "torchvision")
        if pooled is not None:
            return pooled
    return _forward("roi_pool", features, boxes, output_size, spatial_scale, 0, False, "max",
                    layout, batch_indices, backend, n_threads, out, DEFAULT_MAX_SAMPLES_PER_BIN,
                    allow_inverted=allow_inverted, return_argmax=return_argmax)


def roi_pool_backward(grad_output: ArrayLike, features: FeaturesOrShape, boxes: Boxes,
                      output_size: OutputSize, spatial_scale: float = 1.0, *,
                      layout: Layout = "NCHW", batch_indices: Optional[ArrayLike] = None,
                      wrt: Wrt = "features", backend: Backend = "auto",
                      n_threads: Optional[int] = None, deterministic: bool = True,
                      allow_inverted: bool = False, argmax: Optional[Array] = None) -> Array:
    """Gradient of :func:`roi_pool` (same arguments) with respect to the features, given
    ``grad_output`` = dL/d(output): each bin's gradient goes to its arg-max pixel (the first
    maximum in row-major order), found again from ``features``, or taken from ``argmax`` (the
    second output of ``roi_pool(..., return_argmax=True)`` on these boxes; ``features`` may then
    be just their shape; entries outside [-1, H * W) are a ValueError). The same bits either way,
    and for any thread count. ``wrt`` must be "features": the output is piecewise constant in
    the boxes. ``deterministic``: GPU only, False allows an atomic scatter."""
    return _backward("roi_pool", grad_output, features, boxes, output_size, spatial_scale, 0,
                     False, "max", layout, batch_indices, wrt, backend, n_threads, deterministic,
                     DEFAULT_MAX_SAMPLES_PER_BIN, allow_inverted=allow_inverted, argmax=argmax)


def ps_roi_align(features: ArrayLike, boxes: Boxes, output_size: OutputSize,
                 spatial_scale: float = 1.0, sampling_ratio: int = -1, *,
                 layout: Layout = "NCHW", batch_indices: Optional[ArrayLike] = None,
                 backend: Backend = "auto", n_threads: Optional[int] = None,
                 out: Optional[Array] = None,
                 max_samples_per_bin: int = DEFAULT_MAX_SAMPLES_PER_BIN,
                 allow_inverted: bool = False) -> Array:
    """Position-sensitive RoIAlign (R-FCN with RoIAlign sampling; torchvision ``ps_roi_align``).

    The features hold C_out x PH x PW channels; bin (ph, pw) of output channel c averages the
    bilinear samples of input channel ``(c * PH + ph) * PW + pw``. Sampling is RoIAlign's with the
    half-pixel offset (aligned=True, no size clamp) and ``sampling_ratio`` samples per bin and
    axis (<= 0: adaptive, ceil(roi_size / output_size)); docs/conventions.md, section 9.3. A box
    with no samples (zero or negative size, adaptive sampling) gives 0 (torchvision: NaN / -0).

    Parameters
    ----------
    features : array (N, C, H, W), or (N, H, W, C) with layout="NHWC"
        C must be a multiple of PH * PW. float32 or float64 (float16 too on the GPU).
    """ + _BOXES_DOC + """
    output_size, spatial_scale, sampling_ratio, layout, batch_indices, backend, n_threads, out,
    max_samples_per_bin, allow_inverted
        As in :func:`roialign_cy.roi_align`.

    Returns
    -------
    array (K, C / (PH * PW), PH, PW), or (K, PH, PW, C / (PH * PW)) for NHWC.
    """
    pooled = _one_pass("_roi_align", out, batch_indices, backend, "ps_roi_align", features, boxes,
                       output_size, spatial_scale, sampling_ratio, True, "avg", layout, n_threads,
                       max_samples_per_bin, allow_inverted)
    if pooled is not None:
        return pooled
    return _forward("ps_roi_align", features, boxes, output_size, spatial_scale, sampling_ratio,
                    True, "avg", layout, batch_indices, backend, n_threads, out,
                    max_samples_per_bin, allow_inverted=allow_inverted)


def ps_roi_align_backward(grad_output: ArrayLike, features: FeaturesOrShape, boxes: Boxes,
                          output_size: OutputSize, spatial_scale: float = 1.0,
                          sampling_ratio: int = -1, *, layout: Layout = "NCHW",
                          batch_indices: Optional[ArrayLike] = None, wrt: Wrt = "features",
                          backend: Backend = "auto", n_threads: Optional[int] = None,
                          deterministic: bool = True,
                          max_samples_per_bin: int = DEFAULT_MAX_SAMPLES_PER_BIN,
                          allow_inverted: bool = False) -> Array:
    """Gradient of :func:`ps_roi_align` with respect to the features (``features`` may be just
    their shape: the gradient reads no feature value). Each sample sends
    ``grad * weight / count`` to its 4 taps in its bin's input channel; bit-identical for any
    thread count. ``wrt`` must be "features" (no box gradient)."""
    return _backward("ps_roi_align", grad_output, features, boxes, output_size, spatial_scale,
                     sampling_ratio, True, "avg", layout, batch_indices, wrt, backend, n_threads,
                     deterministic, max_samples_per_bin, allow_inverted=allow_inverted)


def ps_roi_pool(features: ArrayLike, boxes: Boxes, output_size: OutputSize,
                spatial_scale: float = 1.0, *, edge: str = "torchvision",
                layout: Layout = "NCHW", batch_indices: Optional[ArrayLike] = None,
                backend: Backend = "auto", n_threads: Optional[int] = None,
                out: Optional[Array] = None, allow_inverted: bool = False) -> Array:
    """Position-sensitive RoIPool (R-FCN; torchvision ``ps_roi_pool``): the mean of each integer
    bin, bin (ph, pw) of output channel c read from input channel ``(c * PH + ph) * PW + pw``.

    Corners are rounded as in :func:`roi_pool`, but a box is ``x2 - x1`` pixels wide (at least
    1); an empty bin gives 0 (docs/conventions.md, section 9.2).

    Parameters
    ----------
    features : array (N, C, H, W), or (N, H, W, C) with layout="NHWC"
        C must be a multiple of PH * PW.
    """ + _BOXES_DOC + """
    edge : "torchvision" | "image"
        How bins are clipped. "torchvision" (default): to [0, H - 1) x [0, W - 1), as
        torchvision's forward does (the last row and column are never pooled). "image": to the
        map, [0, H) x [0, W). The gradient is that of the chosen forward either way.
    output_size, spatial_scale, layout, batch_indices, backend, n_threads, out, allow_inverted
        As in :func:`roi_pool`.

    Returns
    -------
    array (K, C / (PH * PW), PH, PW), or (K, PH, PW, C / (PH * PW)) for NHWC.
    """
    pooled = _one_pass("_roi_pool", out, batch_indices, backend, "ps_roi_pool", features, boxes,
                       output_size, spatial_scale, layout, n_threads, allow_inverted, edge)
    if pooled is not None:
        return pooled
    return _forward("ps_roi_pool", features, boxes, output_size, spatial_scale, 0, False, "avg",
                    layout, batch_indices, backend, n_threads, out, DEFAULT_MAX_SAMPLES_PER_BIN,
                    allow_inverted=allow_inverted, edge=edge)


def ps_roi_pool_backward(grad_output: ArrayLike, features: FeaturesOrShape, boxes: Boxes,
                         output_size: OutputSize, spatial_scale: float = 1.0, *,
                         edge: str = "torchvision", layout: Layout = "NCHW",
                         batch_indices: Optional[ArrayLike] = None, wrt: Wrt = "features",
                         backend: Backend = "auto", n_threads: Optional[int] = None,
                         deterministic: bool = True, allow_inverted: bool = False) -> Array:
    """Gradient of :func:`ps_roi_pool` with respect to the features (``features`` may be just
    their shape): each pixel of a bin receives ``grad / pixel_count``. Bit-identical for any
    thread count. ``wrt`` must be "features"."""
    return _backward("ps_roi_pool", grad_output, features, boxes, output_size, spatial_scale, 0,
                     False, "avg", layout, batch_indices, wrt, backend, n_threads, deterministic,
                     DEFAULT_MAX_SAMPLES_PER_BIN, allow_inverted=allow_inverted, edge=edge)


__all__ = ["roi_pool", "roi_pool_backward", "ps_roi_align", "ps_roi_align_backward",
           "ps_roi_pool", "ps_roi_pool_backward"]

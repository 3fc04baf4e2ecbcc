"""PyTorch front end: torchvision's RoI operators (functions and modules), differentiable, on
roialign_cy's kernels.

``roi_align``, ``RoIAlign`` and ``MultiScaleRoIAlign``, ``roi_pool`` and ``RoIPool``,
``ps_roi_align`` and ``PSRoIAlign``, ``ps_roi_pool`` and ``PSRoIPool`` take torchvision's arguments
(plus keywords of ours: ``n_threads``, ``allow_inverted``, ...) and follow its conventions, with the
few documented differences of docs/conventions.md, sections 8 and 9 (NaN pixels in roi_pool, boxes
without samples in ps_roi_align, the gradient of ps_roi_pool at the last row and column);
``roi_align_rotated`` and ``RoIAlignRotated`` follow detectron2's ``ROIAlignRotated``. Import this
module explicitly (``import roialign_cy.torch``): ``import roialign_cy`` never imports PyTorch.

Data movement: a CPU tensor reaches the Cython kernels as a numpy array sharing its memory (no copy
when it is contiguous); a channels_last tensor runs the NHWC kernels through a zero-copy permuted
view and its result comes back channels_last; any other layout is made contiguous first. A CUDA
tensor reaches the CUDA kernels through DLPack as a CuPy array on the same memory, and the kernels
run on PyTorch's current stream of its device; nothing is copied to the host.

Autograd: one autograd Function serves every operator; it keeps the core's plan (boxes validated,
sampling tables built once) from the forward for the backward. The gradient flows to the input of
every operator. RoIAlign (axis-aligned and rotated) also gives the boxes their gradient when they
require it (the exact derivative described in :func:`roialign_cy.roi_align_backward`); roi_pool,
ps_roi_align and ps_roi_pool give the boxes none (None, as torchvision does; boxes that require grad
are accepted). The input is kept for the backward only where the gradient reads its values
(roi_pool, roi_align's max mode, the box gradient); the average-mode feature gradients need only
its shape. The backward is not itself differentiable: a double backward raises a RuntimeError.
"""
import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np

try:
    import torch
except ImportError as exc:
    raise ImportError("roialign_cy.torch needs PyTorch: pip install 'roialign_cy[torch]'") from exc
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _api, _cuda, _multiscale, _pooling
from ._typing import Layout, Wrt

BoxesArg = Union[Tensor, List[Tensor]]
OutputSizeArg = Union[int, Tuple[int, int], List[int]]
Edge = Literal["torchvision", "image"]

__all__ = ["roi_align", "roi_align_rotated", "roi_pool", "ps_roi_align", "ps_roi_pool", "RoIAlign",
           "RoIAlignRotated", "RoIPool", "PSRoIAlign", "PSRoIPool", "MultiScaleRoIAlign"]


# ---- tensors <-> kernel arrays ----------------------------------------------------------------

def _is_cuda(t: Tensor) -> bool:
    return t.is_cuda


@contextlib.contextmanager
def _kernel_stream(t: Tensor) -> Iterator[None]:
    """Make CuPy run on PyTorch's current stream of ``t``'s device (nothing to do on the CPU).

    Inside it, DLPack exchanges in both directions see the same stream, so they need no sync.
    """
    if not _is_cuda(t):
        yield
        return
    cupy = _cuda._cupy()
    stream = torch.cuda.current_stream(t.device)
    with cupy.cuda.Device(t.device.index), \
            cupy.cuda.ExternalStream(stream.cuda_stream, t.device.index):
        yield


def _to_array(t: Tensor) -> Any:
    """The tensor's memory as a numpy (CPU) or CuPy (CUDA, via DLPack) array; never a copy."""
    t = t.detach()
    if _is_cuda(t):
        return _cuda._cupy().from_dlpack(t)
    return t.numpy()


def _to_tensor(a: Any, like: Tensor) -> Tensor:
    """A kernel result as a tensor on ``like``'s device, sharing its memory."""
    if _is_cuda(like):
        return torch.from_dlpack(a)
    return torch.from_numpy(a)


def _is_channels_last(t: Tensor) -> bool:
    # a tensor that is both (C == 1, or H == W == 1) counts as plain NCHW
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def _kernel_layout(t: Tensor) -> Tuple[Tensor, Layout]:
    """(tensor the kernels read, layout): NCHW as is, channels_last as a zero-copy (N, H, W, C)
    view for the NHWC kernels, any other strides made contiguous."""
    if _is_channels_last(t):
        return t.permute(0, 2, 3, 1), "NHWC"
    return t.contiguous(), "NCHW"


def _nchw(t: Tensor, layout: str) -> Tensor:
    """A (K, PH, PW, C) or (N, H, W, C) kernel result seen as NCHW (channels_last strides)."""
    return t.permute(0, 3, 1, 2) if layout == "NHWC" else t


def _nhwc(t: Tensor, layout: str) -> Tensor:
    return t.permute(0, 2, 3, 1) if layout == "NHWC" else t


def _check_input(input: Any) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, C, H, W), got {tuple(input.shape)}")


def _rois(boxes: Any, input: Tensor, width: int) -> Tensor:
    """torchvision's box forms -> one (K, 1 + width) tensor [batch_index, ...] on input's device.

    A list of per-image (L_i, width) tensors is concatenated with autograd (torchvision's
    convert_boxes_to_roi_format), so that their gradient flows back to each of them.
    """
    if isinstance(boxes, Tensor):
        rois = boxes
    elif isinstance(boxes, (list, tuple)) and all(isinstance(b, Tensor) for b in boxes):
        for i, b in enumerate(boxes):
            if b.dim() != 2 or b.shape[1] != width:
                raise ValueError(f"boxes[{i}] must have shape (L, {width}), got {tuple(b.shape)}")
        if not boxes:
            return torch.zeros((0, width + 1), dtype=input.dtype, device=input.device)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1)
                          for i, b in enumerate(boxes)])
    else:
        raise TypeError(f"boxes must be a Tensor[K, {width + 1}] or a list of Tensor[L, {width}], "
                        f"got {type(boxes).__name__}")
    if rois.device != input.device:
        raise ValueError(f"boxes must be on the device of input ({input.device}), got {rois.device}")
    return rois


# ---- autograd functions ------------------------------------------------------------------------

# the core's one-shot forward of each operator (rotated RoIAlign: _api.roi_align_rotated)
_CORE_FORWARD: Dict[str, Callable[..., Any]] = {"roi_align": _api.roi_align, "roi_pool": _pooling.roi_pool,
                                                 "ps_roi_align": _pooling.ps_roi_align,
                                                 "ps_roi_pool": _pooling.ps_roi_pool}

# the operators whose output is differentiable in the boxes (roi_pool and ps_roi_pool round them
# to whole pixels; ps_roi_align has no box gradient in the core, nor in torchvision)
_BOX_GRADIENT = ("roi_align",)


def _wrt(want_features: bool, want_boxes: bool) -> Optional[Wrt]:
    """The core's ``wrt`` for the gradients autograd asks for (None: none)."""
    if want_features and want_boxes:
        return "both"
    return "features" if want_features else "boxes" if want_boxes else None


def _split(result: Any, wrt: Wrt) -> Tuple[Any, Any]:
    """(features part, boxes part) of a backward result for ``wrt``."""
    return {"features": (result, None), "boxes": (None, result), "both": result}[wrt]


class _RoIFunction(torch.autograd.Function):
    """One operator of the family on one feature map. ``params`` are the keywords of the core's
    :func:`roialign_cy.plan` (``op``, ``rotated``, ``output_size``, ...); ``deterministic`` is the
    backward's (GPU only: False allows an atomic scatter)."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, rois: Tensor, params: Dict[str, Any],
                deterministic: bool) -> Tensor:
        x, layout = _kernel_layout(input)
        with _kernel_stream(input):
            features = _to_array(x)
            # a plan: the boxes are validated and the sampling tables built once, for the
            # forward and again for the backward of this step
            plan = _api.plan(_to_array(rois), tuple(x.shape), layout=layout,
                             dtype=features.dtype, **params)
            # roi_pool's backward takes the forward's arg-max pixels (as torchvision's does)
            # instead of searching the features again
            argmax = None
            if plan.params.op == "roi_pool" and ctx.needs_input_grad[0]:
                result, argmax = plan.forward(features, return_argmax=True)
            else:
                result = plan.forward(features)
            out = _to_tensor(result, input)
        # boxes that require grad get None from the operators without a box gradient, as from
        # torchvision's
        box_gradient = params.get("op", "roi_align") in _BOX_GRADIENT
        ctx.plan, ctx.layout, ctx.box_gradient = plan, layout, box_gradient
        ctx.deterministic, ctx.argmax = deterministic, argmax
        # the box gradient and roi_align's max-mode gradient read the feature values; the
        # average-mode feature gradients need only their shape, roi_pool's its arg-max
        keep = ((box_gradient and ctx.needs_input_grad[1])
                or (plan.params.mode != "avg" and argmax is None))
        ctx.save_for_backward(x if keep else None, rois)
        return _nchw(out, layout)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, rois = ctx.saved_tensors
        wrt = _wrt(ctx.needs_input_grad[0], ctx.box_gradient and ctx.needs_input_grad[1])
        if wrt is None:
            return None, None, None, None
        with _kernel_stream(grad_output):
            result = ctx.plan.backward(_to_array(_nhwc(grad_output, ctx.layout)),
                                       None if x is None else _to_array(x), wrt=wrt,
                                       deterministic=ctx.deterministic, argmax=ctx.argmax)
            g_features, g_rois = _split(result, wrt)
            if g_features is not None:
                g_features = _nchw(_to_tensor(g_features, grad_output), ctx.layout)
            if g_rois is not None:
                g_rois = _to_tensor(g_rois, grad_output).to(rois.dtype)
        return g_features, g_rois, None, None


def _apply(input: Tensor, boxes: Any, params: Dict[str, Any], deterministic: bool = True) -> Tensor:
    _check_input(input)
    rois = _rois(boxes, input, 5 if params.get("rotated") else 4)
    if torch.is_grad_enabled() and (input.requires_grad or rois.requires_grad):
        return _RoIFunction.apply(input, rois, params, deterministic)
    return _forward_only(input, rois, params)


def _forward_only(input: Tensor, rois: Tensor, params: Dict[str, Any]) -> Tensor:
    """The forward when autograd records nothing (inference, no_grad): the core's one-shot call,
    which checks, plans and pools a small call in one compiled pass, with no plan kept for a
    backward and no autograd node (the output then requires no grad either way)."""
    x, layout = _kernel_layout(input)
    kwargs = dict(params)
    op = kwargs.pop("op", "roi_align")
    function: Callable[..., Any] = (_api.roi_align_rotated if kwargs.pop("rotated", False)
                                    else _CORE_FORWARD[op])
    if not _is_cuda(x):  # (the stream context and DLPack cost microseconds a small call feels)
        out = function(_host_array(x), _host_array(rois), layout=layout, **kwargs)
        return _nchw(torch.from_numpy(out), layout)
    with _kernel_stream(input):
        out = _to_tensor(function(_to_array(x), _to_array(rois), layout=layout, **kwargs), input)
    return _nchw(out, layout)


def _host_array(t: Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array (detached only when it requires grad)."""
    return (t.detach() if t.requires_grad else t).numpy()


def roi_align(input: Tensor, boxes: BoxesArg, output_size: OutputSizeArg,
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False, *,
              mode: Literal["avg", "max"] = "avg", n_threads: Optional[int] = None,
              allow_inverted: bool = False) -> Tensor:
    """torchvision's ``roi_align`` on roialign_cy's kernels, differentiable in input and boxes.

    Args:
        input (Tensor[N, C, H, W]): float32 or float64 on the CPU (float16 too on CUDA); any
            strides (channels_last runs the NHWC kernels without a copy).
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): [batch_index, x1, y1, x2, y2], or one
            (x1, y1, x2, y2) tensor per image, in input-image pixels, on input's device. The box
            gradient is returned in the same form.
        output_size (int or Tuple[int, int]): (PH, PW) bins per box.
        spatial_scale (float): box coordinates -> feature-map coordinates (0.25 for stride 4).
        sampling_ratio (int): samples per bin and axis; <= 0: adaptive, ceil(roi_size / bins).
        aligned (bool): True shifts the boxes by -0.5 pixel (half-pixel centres); False keeps
            torchvision's default (no shift, boxes grown to at least 1 pixel).
        mode ("avg" or "max"): average (torchvision) or max (mmcv) of the bilinear samples.
        n_threads (int, optional): CPU threads (default: OpenMP's); results do not depend on it.
        allow_inverted (bool): accept boxes with x2 < x1 or y2 < y1 with the peers' convention
            (refused with a ValueError by default).

    Returns:
        Tensor[K, C, PH, PW] of input's dtype, on input's device (channels_last strides when the
        input had them).
    """
    return _apply(input, boxes, dict(
        output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
        aligned=aligned, mode=mode, n_threads=n_threads, allow_inverted=allow_inverted))


def roi_align_rotated(input: Tensor, boxes: BoxesArg, output_size: OutputSizeArg,
                      spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = True,
                      clockwise: bool = False, *, n_threads: Optional[int] = None,
                      allow_inverted: bool = False) -> Tensor:
    """RoIAlign over rotated boxes (detectron2's ``ROIAlignRotated``), differentiable in input and
    boxes.

    Args:
        input (Tensor[N, C, H, W]): as in :func:`roi_align`.
        boxes (Tensor[K, 6] or List[Tensor[L, 5]]): [batch_index, cx, cy, w, h, angle], angle
            in degrees counter-clockwise, or one (cx, cy, w, h, angle) tensor per image.
        output_size, spatial_scale, sampling_ratio: as in :func:`roi_align`.
        aligned (bool): True (detectron2) shifts the centre by -0.5 pixel; False (Caffe2, mmcv
            legacy): no shift, w and h raised to at least 1 pixel.
        clockwise (bool): mmcv's clockwise angle convention (the angle is negated).
        n_threads, allow_inverted: as in :func:`roi_align` (inverted: w < 0 or h < 0).

    Returns:
        Tensor[K, C, PH, PW]; the box gradient is per (cx, cy, w, h, angle in degrees).
    """
    return _apply(input, boxes, dict(
        rotated=True, output_size=output_size, spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio, aligned=aligned, clockwise=clockwise, n_threads=n_threads,
        allow_inverted=allow_inverted))


def roi_pool(input: Tensor, boxes: BoxesArg, output_size: OutputSizeArg,
             spatial_scale: float = 1.0, *, n_threads: Optional[int] = None,
             deterministic: bool = True, allow_inverted: bool = False) -> Tensor:
    """torchvision's ``roi_pool`` (Fast R-CNN's RoIPool) on roialign_cy's kernels: the largest
    pixel of each of PH x PW integer bins of every box (:func:`roialign_cy.roi_pool`).

    Args:
        input (Tensor[N, C, H, W]): float32 or float64 on the CPU (float16 too on CUDA); any
            strides (channels_last runs the NHWC kernels without a copy).
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): [batch_index, x1, y1, x2, y2], or one
            (x1, y1, x2, y2) tensor per image, in input-image pixels, on input's device. Corners
            are rounded to whole feature pixels (halves away from zero) and a box covers its end
            pixel (docs/conventions.md, section 8).
        output_size (int or Tuple[int, int]): (PH, PW) bins per box.
        spatial_scale (float): box coordinates -> feature-map coordinates (1/16 for stride 16).
        n_threads (int, optional): CPU threads (default: OpenMP's); results do not depend on it.
        deterministic (bool): CUDA only; False allows an atomic scatter in the backward.
        allow_inverted (bool): accept boxes with x2 < x1 or y2 < y1, made 1 x 1 pixel as
            torchvision does (refused with a ValueError by default).

    Returns:
        Tensor[K, C, PH, PW] of input's dtype, on input's device (channels_last strides when the
        input had them); an empty bin gives 0. A NaN pixel wins (numpy.max's rule; torchvision
        skips NaN pixels); on finite input the result is torchvision's. Differentiable in input:
        each bin's gradient goes to its arg-max pixel (the first maximum in row-major order, as
        torchvision's). The output is piecewise constant in the boxes: they get no gradient
        (None), as in torchvision.
    """
    return _apply(input, boxes, dict(
        op="roi_pool", output_size=output_size, spatial_scale=spatial_scale,
        n_threads=n_threads, allow_inverted=allow_inverted), deterministic)


def ps_roi_align(input: Tensor, boxes: BoxesArg, output_size: OutputSizeArg,
                 spatial_scale: float = 1.0, sampling_ratio: int = -1, *,
                 n_threads: Optional[int] = None, deterministic: bool = True,
                 allow_inverted: bool = False) -> Tensor:
    """torchvision's ``ps_roi_align`` (position-sensitive RoIAlign, R-FCN / Light-Head R-CNN) on
    roialign_cy's kernels (:func:`roialign_cy.ps_roi_align`).

    Bin (ph, pw) of output channel c averages the bilinear samples of input channel
    ``(c * PH + ph) * PW + pw``, sampled as RoIAlign with the half-pixel offset (aligned=True,
    torchvision's rule; docs/conventions.md, section 9.3).

    Args:
        input (Tensor[N, C, H, W]): C a multiple of PH * PW; dtypes and strides as in
            :func:`roi_pool`.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): as in :func:`roi_pool`.
        output_size (int or Tuple[int, int]): (PH, PW) bins per box.
        spatial_scale (float): box coordinates -> feature-map coordinates.
        sampling_ratio (int): samples per bin and axis; <= 0: adaptive, ceil(roi_size / bins).
        n_threads, deterministic, allow_inverted: as in :func:`roi_pool` (inverted boxes keep
            their negative size, as in torchvision).

    Returns:
        Tensor[K, C / (PH * PW), PH, PW]. A box without samples (zero size with an adaptive grid)
        gives 0, where torchvision gives NaN. Differentiable in input; the boxes get no gradient
        (None), as in torchvision.
    """
    return _apply(input, boxes, dict(
        op="ps_roi_align", output_size=output_size, spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio, n_threads=n_threads, allow_inverted=allow_inverted),
        deterministic)


def ps_roi_pool(input: Tensor, boxes: BoxesArg, output_size: OutputSizeArg,
                spatial_scale: float = 1.0, *, edge: Edge = "torchvision",
                n_threads: Optional[int] = None, deterministic: bool = True,
                allow_inverted: bool = False) -> Tensor:
    """torchvision's ``ps_roi_pool`` (position-sensitive RoIPool, R-FCN) on roialign_cy's kernels
    (:func:`roialign_cy.ps_roi_pool`): the mean of each integer bin, bin (ph, pw) of output
    channel c read from input channel ``(c * PH + ph) * PW + pw``.

    Args:
        input (Tensor[N, C, H, W]): C a multiple of PH * PW; dtypes and strides as in
            :func:`roi_pool`.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): as in :func:`roi_pool`; corners rounded to
            whole pixels, a box ``x2 - x1`` pixels wide (at least 1) (docs/conventions.md, 9.2).
        output_size (int or Tuple[int, int]): (PH, PW) bins per box.
        spatial_scale (float): box coordinates -> feature-map coordinates.
        edge ("torchvision" or "image"): how bins are clipped. "torchvision" (default): to
            [0, H - 1) x [0, W - 1), as torchvision's forward does (the last row and column are
            never pooled); "image": to the whole map.
        n_threads, deterministic, allow_inverted: as in :func:`roi_pool`.

    Returns:
        Tensor[K, C / (PH * PW), PH, PW]; an empty bin gives 0. Differentiable in input: the
        gradient is that of the chosen forward (torchvision's backward clips bins to the whole
        map, so for bins that reach the last row or column it is the gradient of edge="image",
        not of its own forward). The boxes get no gradient (None), as in torchvision.
    """
    return _apply(input, boxes, dict(
        op="ps_roi_pool", output_size=output_size, spatial_scale=spatial_scale, edge=edge,
        n_threads=n_threads, allow_inverted=allow_inverted), deterministic)


class _MultiScaleFunction(torch.autograd.Function):
    """multi_scale_roi_align over L levels; inputs are (rois, params, *levels)."""

    @staticmethod
    def forward(ctx: Any, rois: Tensor, params: Dict[str, Any], *levels: Tensor) -> Tensor:
        layout = _pyramid_layout(levels)
        xs = [_as_layout(level, layout) for level in levels]
        with _kernel_stream(rois):
            out = _to_tensor(_multiscale.multi_scale_roi_align(
                [_to_array(x) for x in xs], _to_array(rois), layout=layout, **params), rois)
        ctx.params, ctx.layout, ctx.shapes = params, layout, [tuple(x.shape) for x in xs]
        keep = ctx.needs_input_grad[0] or params.get("mode", "avg") != "avg"
        ctx.save_for_backward(rois, *(xs if keep else ()))
        return _nchw(out, layout)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
        rois, *xs = ctx.saved_tensors
        wrt = _wrt(any(ctx.needs_input_grad[2:]), ctx.needs_input_grad[0])
        n_levels = len(ctx.shapes)
        if wrt is None:
            return (None, None) + (None,) * n_levels
        with _kernel_stream(grad_output):
            features = [_to_array(x) for x in xs] if xs else ctx.shapes
            result = _multiscale.multi_scale_roi_align_backward(
                _to_array(_nhwc(grad_output, ctx.layout)), features, _to_array(rois),
                layout=ctx.layout, wrt=wrt, **ctx.params)
            g_features, g_rois = _split(result, wrt)
            if g_rois is not None:
                g_rois = _to_tensor(g_rois, grad_output).to(rois.dtype)
            g_levels = [None] * n_levels if g_features is None else [
                _nchw(_to_tensor(g, grad_output), ctx.layout) for g in g_features]
        return (g_rois, None, *g_levels)


def _pyramid_layout(levels: Sequence[Tensor]) -> Layout:
    """NHWC when every level is channels_last (the NHWC kernels then read them without a copy),
    else NCHW."""
    return "NHWC" if all(map(_is_channels_last, levels)) else "NCHW"


def _as_layout(t: Tensor, layout: str) -> Tensor:
    return t.permute(0, 2, 3, 1) if layout == "NHWC" else t.contiguous()


class _Pooler(nn.Module):
    """What every single-map module holds: torchvision's output_size and spatial_scale (kept as
    given, and shown in the repr as torchvision shows them) and our n_threads."""

    def __init__(self, output_size: OutputSizeArg, spatial_scale: float,
                 n_threads: Optional[int]) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.n_threads = n_threads

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class _OneLevel(_Pooler):
    """What RoIAlign and RoIAlignRotated hold: the pooling arguments of one feature map."""

    def __init__(self, output_size: OutputSizeArg, spatial_scale: float, sampling_ratio: int,
                 aligned: bool, n_threads: Optional[int]) -> None:
        super().__init__(output_size, spatial_scale, n_threads)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", sampling_ratio={self.sampling_ratio}, "
                f"aligned={self.aligned}")


class RoIAlign(_OneLevel):
    """torchvision's ``RoIAlign`` module on roialign_cy's kernels; see :func:`roi_align`.

    ``forward(input, rois)`` takes the (N, C, H, W) input and the boxes in either form.
    """

    def __init__(self, output_size: OutputSizeArg, spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False, *, mode: Literal["avg", "max"] = "avg",
                 n_threads: Optional[int] = None) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, aligned, n_threads)
        self.mode = mode

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                         self.aligned, mode=self.mode, n_threads=self.n_threads)


class RoIAlignRotated(_OneLevel):
    """detectron2's ``ROIAlignRotated`` as a module; see :func:`roi_align_rotated`.

    ``forward(input, rois)`` takes the (N, C, H, W) input and (K, 6) rotated boxes or a list of
    per-image (L, 5) ones.
    """

    def __init__(self, output_size: OutputSizeArg, spatial_scale: float, sampling_ratio: int,
                 aligned: bool = True, clockwise: bool = False, *,
                 n_threads: Optional[int] = None) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, aligned, n_threads)
        self.clockwise = clockwise

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return roi_align_rotated(input, rois, self.output_size, self.spatial_scale,
                                 self.sampling_ratio, self.aligned, self.clockwise,
                                 n_threads=self.n_threads)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", clockwise={self.clockwise}"


class RoIPool(_Pooler):
    """torchvision's ``RoIPool`` module on roialign_cy's kernels; see :func:`roi_pool`.

    ``forward(input, rois)`` takes the (N, C, H, W) input and the boxes in either form. The repr
    is torchvision's.
    """

    def __init__(self, output_size: OutputSizeArg, spatial_scale: float, *,
                 n_threads: Optional[int] = None, deterministic: bool = True) -> None:
        super().__init__(output_size, spatial_scale, n_threads)
        self.deterministic = deterministic

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale,
                        n_threads=self.n_threads, deterministic=self.deterministic)


class PSRoIAlign(_Pooler):
    """torchvision's ``PSRoIAlign`` module on roialign_cy's kernels; see :func:`ps_roi_align`.

    ``forward(input, rois)`` takes the (N, C, H, W) input and the boxes in either form. The repr
    is torchvision's.
    """

    def __init__(self, output_size: OutputSizeArg, spatial_scale: float, sampling_ratio: int, *,
                 n_threads: Optional[int] = None, deterministic: bool = True) -> None:
        super().__init__(output_size, spatial_scale, n_threads)
        self.sampling_ratio = sampling_ratio
        self.deterministic = deterministic

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return ps_roi_align(input, rois, self.output_size, self.spatial_scale,
                            self.sampling_ratio, n_threads=self.n_threads,
                            deterministic=self.deterministic)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sampling_ratio={self.sampling_ratio}"


class PSRoIPool(_Pooler):
    """torchvision's ``PSRoIPool`` module on roialign_cy's kernels; see :func:`ps_roi_pool`.

    ``forward(input, rois)`` takes the (N, C, H, W) input and the boxes in either form. The repr
    is torchvision's, with ``edge`` added when it is not the default "torchvision".
    """

    def __init__(self, output_size: OutputSizeArg, spatial_scale: float, *,
                 edge: Edge = "torchvision", n_threads: Optional[int] = None,
                 deterministic: bool = True) -> None:
        super().__init__(output_size, spatial_scale, n_threads)
        self.edge = edge
        self.deterministic = deterministic

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return ps_roi_pool(input, rois, self.output_size, self.spatial_scale, edge=self.edge,
                           n_threads=self.n_threads, deterministic=self.deterministic)

    def extra_repr(self) -> str:
        extra = "" if self.edge == "torchvision" else f", edge={self.edge!r}"
        return super().extra_repr() + extra


def infer_scales(features: Sequence[Tensor], image_shapes: Sequence[Tuple[int, int]]) -> List[float]:
    """Each level's scale as torchvision's ``MultiScaleRoIAlign`` infers it: the power of two
    nearest to (level height) / (largest image height), the logarithm rounded in float32."""
    if not image_shapes:
        raise ValueError("image_shapes must not be empty")
    max_h = max(int(s[0]) for s in image_shapes)
    scales = []
    for f in features:
        approx = np.float32(float(f.shape[-2]) / float(max_h))
        scales.append(2.0 ** float(np.round(np.log2(approx))))
    return scales


class MultiScaleRoIAlign(nn.Module):
    """torchvision's ``MultiScaleRoIAlign`` (FPN pooling) on roialign_cy's kernels.

    Each box is pooled from the level its size selects (torchvision's LevelMapper: FPN eq. 1,
    k = floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped to the levels
    present), with roi_align(aligned=False) as torchvision does, in one call over all levels
    (:func:`roialign_cy.multi_scale_roi_align`). The output equals torchvision's.

    Args:
        featmap_names (List[str]): the keys of the feature maps to pool from; they must be
            consecutive pyramid levels (scales 1/4, 1/8, ... once inferred).
        output_size (int or Tuple[int, int]): (PH, PW) bins per box.
        sampling_ratio (int): samples per bin and axis; <= 0: adaptive.
        canonical_scale (int), canonical_level (int): the FPN paper's 224 and k0 = 4.
        aligned (bool): extra, default False as in torchvision; True gives detectron2's
            ROIAlignV2 sampling (the level rule stays torchvision's).
        n_threads (int, optional): CPU threads (default: OpenMP's).

    ``forward(x, boxes, image_shapes)``: x (Dict[str, Tensor[N, C, H_l, W_l]]), the levels taken
    in the dict's order as torchvision does; boxes (List[Tensor[L_i, 4]]), per image, in
    input-image pixels; image_shapes (List[Tuple[int, int]]), (height, width) of each image before
    the backbone. As in torchvision, the scales are inferred from the first call's image shapes
    and kept (``self.scales``). Returns Tensor[K, C, PH, PW], the boxes in order.
    """

    def __init__(self, featmap_names: List[str], output_size: OutputSizeArg, sampling_ratio: int,
                 *, canonical_scale: int = 224, canonical_level: int = 4, aligned: bool = False,
                 n_threads: Optional[int] = None) -> None:
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned
        self.n_threads = n_threads
        self.scales: Optional[List[float]] = None

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor],
                image_shapes: List[Tuple[int, int]]) -> Tensor:
        levels = [v for k, v in x.items() if k in self.featmap_names]
        if not levels:
            raise ValueError(f"x must hold the feature maps {self.featmap_names}, got keys "
                             f"{list(x)}")
        for level in levels:
            _check_input(level)
        if self.scales is None:
            scales = infer_scales(levels, image_shapes)
            k = [-math.log2(s) for s in scales]
            if any(kl != k[0] + i for i, kl in enumerate(k)):
                # torchvision would index its levels by k - k_min past the maps it has, and return
                # zeros for the boxes assigned to the missing ones
                raise ValueError(
                    f"featmap_names must name consecutive pyramid levels, finest first; the maps "
                    f"{self.featmap_names} have the scales {scales}")
            self.scales = scales
        rois = _rois(boxes, levels[0], 4)
        params = dict(output_size=self.output_size, spatial_scales=self.scales,
                      sampling_ratio=self.sampling_ratio, aligned=self.aligned,
                      canonical_scale=self.canonical_scale,
                      canonical_level=self.canonical_level, n_threads=self.n_threads)
        return _MultiScaleFunction.apply(rois, params, *levels)

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}")

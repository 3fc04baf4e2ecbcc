"""Plans: the validated boxes and parameters of a RoIAlign call and its sampling tables, reused by
any number of forward and backward calls (Caffe2's PreCalc; FFTW's and scipy.fft's plans)."""
import dataclasses
import threading

import numpy as np

from . import _validate as v

_WRT = ("features", "boxes", "both")


def output_shape(k, channels, p):
    """Shape of the output of k boxes on maps of ``channels`` channels (the position-sensitive
    operators give channels / (PH * PW))."""
    if p.position_sensitive:
        channels //= p.pooled_h * p.pooled_w
    if p.channels_last:
        return (k, p.pooled_h, p.pooled_w, channels)
    return (k, channels, p.pooled_h, p.pooled_w)


def out_shape(shape, k, p):
    """Shape of the output for features of ``shape`` and k boxes."""
    return output_shape(k, shape[3] if p.channels_last else shape[1], p)


def backend_name(module):
    return "cuda" if module.__name__.endswith("_cuda") else "cpu"


class Plan:
    """Boxes and parameters validated once, for maps of one shape and dtype (see :func:`plan`).

    ``forward(features, out=None)`` pools, ``backward(grad_output, features=None,
    wrt="features")`` gives the gradients, exactly as the one-shot functions do with the same
    arguments. The features of each call must have the plan's N, H, W and dtype; the channel count
    may differ from call to call (channel groups, several heads). The sampling tables are built on
    first use and kept; a plan may be shared by threads.
    """

    def __init__(self, backend, shape, dtype, rois, batch_idx, form, given, p, grid=None):
        # given: the caller's boxes and batch_indices (the box gradient takes their form, and
        # out= may not share memory with them)
        self._be, self._rois, self._batch_idx, self._form, self._given = (
            backend, rois, batch_idx, form, given)
        self.feature_shape, self.dtype, self.params = tuple(shape), np.dtype(dtype), p
        self.backend = backend_name(backend)
        self._run, self._lock, self._grid = None, threading.Lock(), grid

    def __repr__(self):
        p = self.params
        kind = "rotated " if p.rotated else ""
        op = "" if p.op == "roi_align" else f"{p.op} "
        return (f"<roialign_cy {op}plan: {len(self._rois)} {kind}boxes on {self.feature_shape} "
                f"{self.dtype.name} {'NHWC' if p.channels_last else 'NCHW'}, output "
                f"{(p.pooled_h, p.pooled_w)}, {self.backend}>")

    @property
    def num_boxes(self):
        return len(self._rois)

    def output_shape(self, channels=None):
        """Shape of ``forward``'s result for maps of ``channels`` channels (default: the plan's)."""
        shape = list(self.feature_shape)
        if channels is not None:
            shape[3 if self.params.channels_last else 1] = channels
        return out_shape(shape, len(self._rois), self.params)

    # -----------------------------------------------------------------------------------------

    def _kernel_run(self):
        """The backend's prepared run (the CPU keeps tables; other backends none)."""
        prepare = getattr(self._be, "prepare", None)
        if prepare is None:
            return {}
        if self._run is None:
            with self._lock:
                if self._run is None:
                    n, a, b, c = self.feature_shape
                    shape = (n, c, a, b) if self.params.channels_last else (n, a, b, c)
                    self._run = prepare([shape], self.dtype, self._rois, self._batch_idx,
                                        self.params, grid=self._grid)
        return {"run": self._run}

    def _features(self, features):
        features = v.features(features, "NHWC" if self.params.channels_last else "NCHW",
                              self.backend)
        spatial = (0, 1, 2) if self.params.channels_last else (0, 2, 3)
        got, want = tuple(features.shape), self.feature_shape
        if any(got[i] != want[i] for i in spatial):
            raise ValueError(f"features must have the plan's N, H, W "
                             f"{tuple(want[i] for i in spatial)} (shape {want}), got shape {got}")
        if features.dtype != self.dtype:
            raise TypeError(f"features must have the plan's dtype {self.dtype}, got {features.dtype}")
        if self.params.position_sensitive:
            p = self.params
            v.position_sensitive_channels(got, "NHWC" if p.channels_last else "NCHW",
                                          p.pooled_h, p.pooled_w, p.op)
        return features

    def forward(self, features, out=None, *, return_argmax=False):
        """Pool the plan's boxes from ``features``; ``out``: optional preallocated output.
        ``return_argmax`` (roi_pool only): also return each bin's arg-max pixel, for
        ``backward(..., argmax=)``."""
        return self._forward(self._features(features), out, features, return_argmax)

    def _forward(self, features, out, original, return_argmax=False):
        oshape = out_shape(features.shape, len(self._rois), self.params)
        xp = v.xp_of(self.backend)
        argmax = None
        if v.check_flag("return_argmax", return_argmax):
            if self.params.op != "roi_pool":
                raise ValueError(f"return_argmax is roi_pool's; {self.params.op} has no arg-max")
            v.argmax_fits(self.feature_shape, self.params.channels_last)
            argmax = v.allocate(xp, oshape, np.int32, "the arg-max")
        if out is None:
            out = v.allocate(xp, oshape, features.dtype, "the output")
        else:
            out = v.check_out(out, oshape, features.dtype, self.backend)
            v.no_overlap(out, dict(self._given, features=original))
            v.no_overlap(out, {"features": features, "boxes": self._rois,
                               "batch_indices": self._batch_idx})
        run = self._kernel_run()
        if argmax is not None:
            run["argmax"] = argmax
        self._be.forward(features, self._rois, self._batch_idx, out, self.params, **run)
        return out if argmax is None else (out, argmax)

    def backward(self, grad_output, features=None, wrt="features", *, deterministic=True,
                 argmax=None):
        """Gradient of ``forward`` given ``grad_output`` = dL/d(output): with respect to the
        features ("features", shaped like them), the boxes ("boxes", shaped like the boxes the
        plan was made from) or both ("both": a pair). ``features`` may be omitted for the
        feature gradient in avg mode, which reads no feature value, and for roi_pool given
        ``argmax`` (from ``forward(..., return_argmax=True)``). ``deterministic``: GPU only,
        False allows a faster atomic scatter."""
        wrt = v.check_choice("wrt", wrt, _WRT)
        p = dataclasses.replace(self.params, deterministic=v.check_flag("deterministic",
                                                                        deterministic))
        v.no_box_gradient(p.op, wrt)
        if p.mode == "onnx_max":
            raise ValueError("mode='onnx_max' reproduces an onnxruntime forward quirk and has no "
                             "gradient; use mode='max' (mmcv) for a differentiable max")
        if argmax is not None:
            argmax = self._argmax(argmax)
        if features is None and (wrt != "features" or (p.mode != "avg" and argmax is None)):
            what = (f"wrt={wrt!r}: the box gradient" if wrt != "features"
                    else f"{'roi_pool' if p.op == 'roi_pool' else f'mode={p.mode!r}'}: the "
                    "max-mode gradient")
            raise ValueError(f"features are needed for {what} reads the feature values")
        if features is not None:
            features = self._features(features)
            shape = tuple(features.shape)
        else:
            shape = self.feature_shape
        return self._backward(v.grad_output(grad_output, out_shape(shape, len(self._rois), p),
                                            self.dtype, self.backend),
                              features, shape, wrt, p, argmax)

    def _argmax(self, argmax):
        """The arg-max of a roi_pool forward, checked: int32, the output's shape (its values are
        checked by the kernels, which refuse pixels outside the map)."""
        if self.params.op != "roi_pool":
            raise ValueError(f"argmax is roi_pool's; {self.params.op} has no arg-max")
        return v.argmax(argmax, self.output_shape(), self.backend)

    def _backward(self, grad_output, features, shape, wrt, p, argmax=None):
        xp = v.xp_of(self.backend)
        run = self._kernel_run()
        grad_features = grad_boxes = None
        if wrt in ("features", "both"):
            # the CPU kernels can write the whole gradient themselves: no zero-fill pass first
            overwrite = getattr(self._be, "OVERWRITES_GRADIENTS", False)
            grad_features = v.allocate(xp, shape, self.dtype, "the feature gradient",
                                       zeros=not overwrite)
            extra = {"argmax": argmax} if argmax is not None else {}
            if overwrite:
                extra["overwrite"] = True
            self._be.backward_features(grad_output, features, self._rois, self._batch_idx,
                                       grad_features, p, **run, **extra)
        if wrt in ("boxes", "both"):
            grad_rois = xp.zeros(self._rois.shape, self._rois.dtype)
            self._be.backward_boxes(grad_output, features, self._rois, self._batch_idx,
                                    grad_rois, p, **run)
            grad_boxes = _box_grad_like(grad_rois, self._given["boxes"], self._form, xp)
        if wrt == "features":
            return grad_features
        if wrt == "boxes":
            return grad_boxes
        return grad_features, grad_boxes


def _box_grad_like(grad_rois, boxes, form, xp):
    """Give the box gradient the form the boxes came in (batch column zero, list split back)."""
    if form == "onnx":
        return grad_rois
    if form == "batched":
        return xp.concatenate([xp.zeros((grad_rois.shape[0], 1), grad_rois.dtype), grad_rois], axis=1)
    sizes = np.cumsum([len(b) for b in boxes])[:-1]
    return list(xp.split(grad_rois, sizes.tolist())) if len(boxes) else []

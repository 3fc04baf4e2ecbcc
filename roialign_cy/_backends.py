"""Which backend serves which arrays, and the registry of operators, gradients and device types.

Every backend module exposes the same kernel entry points; arguments arrive validated,
C-contiguous and allocated by ``roialign_cy._api`` (see ``OpParams`` for the scalars):

``forward(features, rois, batch_idx, out, p)``
    features (N, C, H, W), or (N, H, W, C) when ``p.channels_last``; float32/float64 (GPU: also
    float16). rois (K, 4) [x1, y1, x2, y2], or (K, 5) [cx, cy, w, h, angle_deg] when ``p.rotated``,
    same dtype as features (float32 when features are float16). batch_idx (K,) int64 in [0, N).
    out (K, C, PH, PW), or (K, PH, PW, C), features' dtype: every element is written.
``backward_features(grad_out, features, rois, batch_idx, grad_features, p)``
    grad_out shaped like ``out``; features may be None in avg mode; grad_features shaped like the
    features, zero-filled by the caller; the kernel adds into it. Deterministic: bit-identical for
    any thread count and run to run.
``backward_boxes(grad_out, features, rois, batch_idx, grad_rois, p)``
    grad_rois shaped like rois, zero-filled by the caller; d(sum(grad_out * out)) / d(rois).
``forward_levels(maps, rois, batch_idx, level, scales, out, p)``, ``backward_features_levels(
grad_out, maps, rois, batch_idx, level, scales, grads, p)``, ``backward_boxes_levels(...,
grad_rois, p)``
    The same for RoIAlign over a feature pyramid (``roialign_cy._multiscale``), every level in
    one parallel region (CPU) or one launch per step (CUDA): box k reads ``maps[level[k]]`` at
    ``scales[level[k]]`` (``p.spatial_scale`` unused) and its gradient goes to ``grads[level[k]]``.
"""
import importlib
from typing import Any, Dict, Tuple

import numpy as np

from . import _params

# Forward operator -> (its gradient operator, device types that serve both). The Caffe2 notion of
# registered gradients made Pythonic: dispatch asks it which backends exist, tests enumerate it.
OPERATORS: Dict[str, Dict[str, Any]] = {
    "roi_align": {"gradient": "roi_align_backward", "devices": ("cpu", "cuda")},
    "roi_align_rotated": {"gradient": "roi_align_rotated_backward", "devices": ("cpu", "cuda")},
    "roi_pool": {"gradient": "roi_pool_backward", "devices": ("cpu", "cuda")},
    "ps_roi_align": {"gradient": "ps_roi_align_backward", "devices": ("cpu", "cuda")},
    "ps_roi_pool": {"gradient": "ps_roi_pool_backward", "devices": ("cpu", "cuda")},
}
BACKENDS = ("auto", "cpu", "cuda")
_MODULES = {"cpu": "roialign_cy._cpu", "cuda": "roialign_cy._cuda"}


def gradient_of(op_name: str) -> str:
    """Name of the registered gradient operator of the forward operator ``op_name``."""
    return OPERATORS[op_name]["gradient"]


def devices_of(op_name: str) -> Tuple[str, ...]:
    """Device types that have kernels for ``op_name`` (and its gradient)."""
    return OPERATORS[op_name]["devices"]


def _is_cupy(a):
    return type(a).__module__.split(".")[0] == "cupy"


def select(op_name, arrays, backend):
    """Return the backend name ("cpu" or "cuda") that serves ``arrays`` for ``op_name``.

    ``arrays`` maps argument names to the array-like inputs (None entries are ignored). numpy (or
    anything numpy can read) goes to "cpu", cupy arrays to "cuda"; mixing them, or forcing a backend
    that cannot read the arrays, is an error rather than a silent copy.
    """
    if backend == "auto" and all(v is None or type(v) is np.ndarray for v in arrays.values()):
        return "cpu"  # the usual call: numpy arrays only
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    given = {k: v for k, v in arrays.items() if v is not None}
    on_gpu = sorted(k for k, v in given.items() if _is_cupy(v) or (isinstance(v, list) and any(map(_is_cupy, v))))
    on_host = sorted(k for k in given if k not in on_gpu and not isinstance(given[k], tuple))
    if on_gpu and on_host:
        raise TypeError(
            f"cannot mix cupy arrays ({', '.join(on_gpu)}) with host arrays ({', '.join(on_host)}); "
            "move them to the same device first"
        )
    wanted = "cuda" if on_gpu else "cpu"
    if backend == "auto":
        backend = wanted
    elif backend != wanted:
        where = "cupy (GPU)" if on_gpu else "numpy (host)"
        raise TypeError(
            f"backend={backend!r} cannot serve {where} arrays; pass {'cupy' if backend == 'cuda' else 'numpy'} "
            f"arrays or backend={wanted!r}"
        )
    if backend not in devices_of(op_name):
        raise ValueError(f"{op_name} has no {backend!r} kernels")
    return backend


def module(backend):
    """Import the kernel module of ``backend`` (cupy is imported only when "cuda" is asked for)."""
    return importlib.import_module(_MODULES[backend])


__all__ = ["OPERATORS", "BACKENDS", "gradient_of", "devices_of", "select", "module", "_params"]

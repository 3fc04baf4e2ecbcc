"""RoIAlign operators (axis-aligned and rotated, forward and gradients) for numpy and CuPy, and
the rest of the RoI family: RoIPool and position-sensitive RoIAlign / RoIPool.

CPU kernels are Cython + OpenMP; GPU kernels are CUDA sources compiled at run time through CuPy.
The backend follows the array type (numpy -> "cpu", cupy -> "cuda") unless ``backend=`` forces it.
``roialign_cy.torch`` (imported on its own, needs PyTorch) wraps the operators for torch tensors
and autograd.
"""
from ._api import (plan, roi_align, roi_align_backward, roi_align_rotated,
                   roi_align_rotated_backward)
from ._plan import Plan
from ._pooling import (ps_roi_align, ps_roi_align_backward, ps_roi_pool, ps_roi_pool_backward,
                       roi_pool, roi_pool_backward)
from ._backends import OPERATORS, devices_of, gradient_of
from ._multiscale import multi_scale_roi_align, multi_scale_roi_align_backward
from ._params import DEFAULT_MAX_SAMPLES_PER_BIN
from ._buffers import output_cache, set_output_cache

__version__ = "0.1.0"

__all__ = [
    "roi_align",
    "roi_align_backward",
    "roi_align_rotated",
    "roi_align_rotated_backward",
    "roi_pool",
    "roi_pool_backward",
    "ps_roi_align",
    "ps_roi_align_backward",
    "ps_roi_pool",
    "ps_roi_pool_backward",
    "plan",
    "Plan",
    "multi_scale_roi_align",
    "multi_scale_roi_align_backward",
    "OPERATORS",
    "gradient_of",
    "devices_of",
    "DEFAULT_MAX_SAMPLES_PER_BIN",
    "output_cache",
    "set_output_cache",
    "__version__",
]

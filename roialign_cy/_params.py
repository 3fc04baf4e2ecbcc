"""The validated, normalised description of one operator call, shared by every backend."""
from dataclasses import dataclass

MODES = ("avg", "max", "onnx_max")
# the operators of the family (rotated RoIAlign is "roi_align" with OpParams.rotated)
OPS = ("roi_align", "roi_pool", "ps_roi_align", "ps_roi_pool")
# position-sensitive operators: output channel c of bin (ph, pw) reads input channel
# (c * PH + ph) * PW + pw, so the output has C / (PH * PW) channels
POSITION_SENSITIVE = ("ps_roi_align", "ps_roi_pool")
# ps_roi_pool's clipping of bins: "torchvision" (its forward: [0, H - 1) x [0, W - 1), the last
# row and column are never pooled) or "image" ([0, H) x [0, W))
EDGES = ("torchvision", "image")
LAYOUTS = ("NCHW", "NHWC")

# Default bound on sampling points per output bin (gh * gw). torchvision and onnxruntime have none,
# so one huge box with adaptive sampling can make a call run for hours; 2**16 (a 256 x 256 grid per
# bin) is far above any detector's needs. Raise it with max_samples_per_bin=... on any call.
DEFAULT_MAX_SAMPLES_PER_BIN = 1 << 16
# Adaptive grid sizes past this saturate in the kernels (roialign_cy/_cpu/_geometry.pxd), and no
# sampling_ratio may exceed it: a grid of that many samples per axis could never be pooled.
GRID_SATURATE = 1 << 40


@dataclass(frozen=True)
class OpParams:
    """Everything a kernel needs besides the arrays.

    sampling_ratio <= 0 means adaptive (ceil(roi_size / output_size) samples per bin and axis).
    rotated boxes are (cx, cy, w, h, angle_degrees); axis-aligned ones (x1, y1, x2, y2).
    clockwise (rotated only) negates the angle, the mmcv convention.
    op: which operator of the family (``OPS``); roi_pool and ps_roi_pool pool integer pixel bins
    and ignore sampling_ratio and aligned; ps_roi_align samples with aligned=True. edge: the
    clipping rule of ps_roi_pool (``EDGES``).
    """

    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    mode: str = "avg"
    channels_last: bool = False
    rotated: bool = False
    clockwise: bool = False
    n_threads: int = 1
    deterministic: bool = True
    op: str = "roi_align"
    edge: str = "torchvision"

    @property
    def position_sensitive(self):
        return self.op in POSITION_SENSITIVE

    @property
    def integer_bins(self):
        return self.op in ("roi_pool", "ps_roi_pool")

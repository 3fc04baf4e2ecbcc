"""Slow, obviously-correct numpy reference of the RoIAlign family, written from docs/conventions.md.

Everything is computed in float64 with python loops over boxes, bins and samples and numpy
vectors over channels, so that each line can be checked against docs/conventions.md by eye. Features are
NCHW here; the tests convert layouts themselves.

The geometry (box -> sample coordinates, grid size, count) is computed once per box by
``aligned_samples`` / ``rotated_samples`` and shared by the forward values and the feature-gradient
scatter, and the tests reuse it to keep finite-difference steps away from the kinks of the
piecewise-bilinear interpolant.
"""
import math

import numpy as np


def _grid_size(roi_size, pooled, sampling_ratio):
    # Spec 1.4: a fixed ratio, or ceil(roi / pooled) ("adaptive"); the latter may be <= 0 for a
    # negative (aligned) roi size, which leaves the bin without samples.
    if sampling_ratio > 0:
        return int(sampling_ratio)
    return int(math.ceil(roi_size / pooled))


def aligned_samples(roi, PH, PW, spatial_scale, sampling_ratio, aligned):
    """Sample coordinates of one axis-aligned box ``roi`` = (x1, y1, x2, y2), conventions section 1.

    Returns (ys, xs, count): ys (PH, PW, gh, gw) and xs (PH, PW, gh, gw) in feature-map pixels,
    count = max(gh * gw, 1). gh or gw <= 0 gives arrays with a zero-size axis.
    """
    x1, y1, x2, y2 = (float(v) for v in roi)
    offset = 0.5 if aligned else 0.0
    start_x = x1 * spatial_scale - offset
    start_y = y1 * spatial_scale - offset
    roi_w = x2 * spatial_scale - offset - start_x
    roi_h = y2 * spatial_scale - offset - start_y
    if not aligned:
        roi_w = max(roi_w, 1.0)
        roi_h = max(roi_h, 1.0)
    bin_w = roi_w / PW
    bin_h = roi_h / PH
    gh = _grid_size(roi_h, PH, sampling_ratio)
    gw = _grid_size(roi_w, PW, sampling_ratio)
    count = max(gh * gw, 1)
    ys = np.empty((PH, PW, max(gh, 0), max(gw, 0)))
    xs = np.empty_like(ys)
    for ph in range(PH):
        for pw in range(PW):
            for iy in range(gh):
                for ix in range(gw):
                    ys[ph, pw, iy, ix] = start_y + ph * bin_h + (iy + 0.5) * bin_h / gh
                    xs[ph, pw, iy, ix] = start_x + pw * bin_w + (ix + 0.5) * bin_w / gw
    return ys, xs, count


def rotated_samples(roi, PH, PW, spatial_scale, sampling_ratio, aligned, clockwise):
    """Sample coordinates of one rotated box ``roi`` = (cx, cy, w, h, angle_degrees), conventions section 4."""
    cx, cy, w, h, angle = (float(v) for v in roi)
    offset = 0.5 if aligned else 0.0
    centre_x = cx * spatial_scale - offset
    centre_y = cy * spatial_scale - offset
    roi_w = w * spatial_scale
    roi_h = h * spatial_scale
    if not aligned:
        roi_w = max(roi_w, 1.0)
        roi_h = max(roi_h, 1.0)
    bin_w = roi_w / PW
    bin_h = roi_h / PH
    gh = _grid_size(roi_h, PH, sampling_ratio)
    gw = _grid_size(roi_w, PW, sampling_ratio)
    count = max(gh * gw, 1)
    theta = angle * math.pi / 180.0
    if clockwise:
        theta = -theta
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    ys = np.empty((PH, PW, max(gh, 0), max(gw, 0)))
    xs = np.empty_like(ys)
    for ph in range(PH):
        for pw in range(PW):
            for iy in range(gh):
                for ix in range(gw):
                    yy = -roi_h / 2 + ph * bin_h + (iy + 0.5) * bin_h / gh
                    xx = -roi_w / 2 + pw * bin_w + (ix + 0.5) * bin_w / gw
                    ys[ph, pw, iy, ix] = yy * cos_t - xx * sin_t + centre_y
                    xs[ph, pw, iy, ix] = yy * sin_t + xx * cos_t + centre_x
    return ys, xs, count


def bilinear_taps(y, x, H, W):
    """The 4 (row, col, weight) taps of the bilinear sample at (y, x), or [] when out of range."""
    # Written as a negated "inside" test so that NaN coordinates are outside (conventions 1.6).
    if not (-1.0 <= y <= H and -1.0 <= x <= W):
        return []
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low = int(math.floor(y))
    if y_low >= H - 1:
        y_low = y_high = H - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    x_low = int(math.floor(x))
    if x_low >= W - 1:
        x_low = x_high = W - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly = y - y_low
    lx = x - x_low
    hy = 1.0 - ly
    hx = 1.0 - lx
    return [
        (y_low, x_low, hy * hx),
        (y_low, x_high, hy * lx),
        (y_high, x_low, ly * hx),
        (y_high, x_high, ly * lx),
    ]


def sample_values(plane, ys, xs, mode):
    """Values (S, C) of the samples of one bin on ``plane`` (C, H, W), iy-major / ix-minor order."""
    C, H, W = plane.shape
    values = []
    for y, x in zip(ys.ravel(), xs.ravel()):
        taps = bilinear_taps(y, x, H, W)
        if not taps:
            values.append(np.zeros(C))
        elif mode == "onnx_max":
            # onnxruntime quirk (conventions 3): the largest *weighted tap*, not the tap sum.
            values.append(np.max([w * plane[:, r, c] for r, c, w in taps], axis=0))
        else:
            values.append(sum(w * plane[:, r, c] for r, c, w in taps))
    return np.array(values).reshape(len(values), C)


def _pool(features, rois, batch_idx, PH, PW, samples_of, mode):
    features = np.asarray(features, dtype=np.float64)
    K = len(rois)
    C = features.shape[1]
    out = np.zeros((K, C, PH, PW))
    for k in range(K):
        plane = features[int(batch_idx[k])]
        ys, xs, count = samples_of(rois[k])
        for ph in range(PH):
            for pw in range(PW):
                vals = sample_values(plane, ys[ph, pw], xs[ph, pw], mode)
                if len(vals) == 0:
                    continue  # empty grid -> 0 (conventions 3)
                out[k, :, ph, pw] = vals.sum(axis=0) / count if mode == "avg" else vals.max(axis=0)
    return out


def _scatter(grad_out, features, feature_shape, rois, batch_idx, PH, PW, samples_of, mode):
    grad_out = np.asarray(grad_out, dtype=np.float64)
    grad = np.zeros(feature_shape)
    H, W = feature_shape[2:]
    for k in range(len(rois)):
        b = int(batch_idx[k])
        ys, xs, count = samples_of(rois[k])
        for ph in range(PH):
            for pw in range(PW):
                g = grad_out[k, :, ph, pw]
                by, bx = ys[ph, pw].ravel(), xs[ph, pw].ravel()
                if mode == "avg":
                    for y, x in zip(by, bx):
                        for r, c, w in bilinear_taps(y, x, H, W):
                            grad[b, :, r, c] += g * w / count
                elif len(by):
                    # The whole gradient goes to the 4 taps of the arg-max sample, per channel;
                    # np.argmax picks the first maximum, i.e. iy-major / ix-minor order.
                    vals = sample_values(np.asarray(features[b], dtype=np.float64), by, bx, "max")
                    best = vals.argmax(axis=0)
                    for s, (y, x) in enumerate(zip(by, bx)):
                        chans = best == s
                        for r, c, w in bilinear_taps(y, x, H, W):
                            grad[b, chans, r, c] += g[chans] * w
    return grad


def roi_align_ref(features_nchw, rois_k4, batch_idx, PH, PW, spatial_scale, sampling_ratio, aligned, mode="avg"):
    """Axis-aligned RoIAlign (conventions 1 and 3); mode "avg", "max" (mmcv) or "onnx_max". Float64 (K, C, PH, PW)."""
    def samples_of(roi):
        return aligned_samples(roi, PH, PW, spatial_scale, sampling_ratio, aligned)

    return _pool(features_nchw, rois_k4, batch_idx, PH, PW, samples_of, mode)


def roi_align_rotated_ref(features_nchw, rois_k5, batch_idx, PH, PW, spatial_scale, sampling_ratio, aligned=True,
                          clockwise=False):
    """Rotated RoIAlign (conventions 4), average mode; rois (K, 5) [cx, cy, w, h, angle_degrees]."""
    def samples_of(roi):
        return rotated_samples(roi, PH, PW, spatial_scale, sampling_ratio, aligned, clockwise)

    return _pool(features_nchw, rois_k5, batch_idx, PH, PW, samples_of, "avg")


def roi_align_backward_ref(grad_out, features_nchw, rois_k4, batch_idx, PH, PW, spatial_scale, sampling_ratio,
                           aligned, mode="avg"):
    """Gradient wrt the NCHW features by explicit scatter (conventions 5); mode "avg" or "max"."""
    features = np.asarray(features_nchw)

    def samples_of(roi):
        return aligned_samples(roi, PH, PW, spatial_scale, sampling_ratio, aligned)

    return _scatter(grad_out, features, features.shape, rois_k4, batch_idx, PH, PW, samples_of, mode)


def roi_align_rotated_backward_ref(grad_out, feature_shape, rois_k5, batch_idx, PH, PW, spatial_scale,
                                   sampling_ratio, aligned=True, clockwise=False):
    """Gradient of rotated RoIAlign (avg) wrt the NCHW features of shape ``feature_shape``."""
    def samples_of(roi):
        return rotated_samples(roi, PH, PW, spatial_scale, sampling_ratio, aligned, clockwise)

    return _scatter(grad_out, None, tuple(feature_shape), rois_k5, batch_idx, PH, PW, samples_of, "avg")


def numerical_box_grad(fn, rois, eps=1e-6):
    """Central differences of the scalar ``fn(rois)`` wrt every element of ``rois`` (float64)."""
    rois = np.array(rois, dtype=np.float64)
    grad = np.zeros_like(rois)
    for idx in np.ndindex(rois.shape):
        plus, minus = rois.copy(), rois.copy()
        plus[idx] += eps
        minus[idx] -= eps
        grad[idx] = (fn(plus) - fn(minus)) / (2 * eps)
    return grad

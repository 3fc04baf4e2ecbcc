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


# ---------------------------------------------------------------------------------------------
# RoIPool and the position-sensitive operators (conventions sections 8 and 9)

def round_half_away(v):
    """C's round(): halves go away from zero (numpy's round goes to even)."""
    a = abs(v)
    r = math.floor(a)
    if a - r >= 0.5:
        r += 1
    return int(math.copysign(r, v)) if r else 0


def integer_bins(roi, PH, PW, spatial_scale, H, W, op, dtype=np.float64, edge="torchvision"):
    """Pixel windows of one box ``roi`` = (x1, y1, x2, y2) for "roi_pool" or "ps_roi_pool"
    (conventions 8.1-8.3, 9.2): (hs, he, ws, we) lists of PH and PW half-open ranges, clipped.
    Products and bin sizes are formed in ``dtype``, as the peers' kernels form them."""
    t = np.dtype(dtype).type
    s = t(spatial_scale)
    x1, y1, x2, y2 = (round_half_away(float(t(v) * s)) for v in roi)
    grow = 1 if op == "roi_pool" else 0
    roi_w = max(x2 - x1 + grow, 1)
    roi_h = max(y2 - y1 + grow, 1)
    bin_h = t(roi_h) / t(PH)
    bin_w = t(roi_w) / t(PW)
    top_h, top_w = (H - 1, W - 1) if op == "ps_roi_pool" and edge == "torchvision" else (H, W)

    def windows(n, size, start, top):
        lo = [min(max(int(math.floor(t(p) * size)) + start, 0), top) for p in range(n)]
        hi = [min(max(int(math.ceil(t(p + 1) * size)) + start, 0), top) for p in range(n)]
        return lo, hi

    hs, he = windows(PH, bin_h, y1, top_h)
    ws, we = windows(PW, bin_w, x1, top_w)
    return hs, he, ws, we


def roi_pool_ref(features_nchw, rois_k4, batch_idx, PH, PW, spatial_scale, dtype=np.float64):
    """RoIPool (conventions 8): the largest pixel of each integer bin (numpy.max: NaN wins), 0 for
    an empty bin. Returns (out (K, C, PH, PW) float64, argmax (K, C, PH, PW) flat pixel index or -1)."""
    x = np.asarray(features_nchw, dtype=np.float64)
    N, C, H, W = x.shape
    out = np.zeros((len(rois_k4), C, PH, PW))
    arg = np.full(out.shape, -1, np.int64)
    for k, roi in enumerate(rois_k4):
        hs, he, ws, we = integer_bins(roi, PH, PW, spatial_scale, H, W, "roi_pool", dtype)
        plane = x[int(batch_idx[k])]
        for ph in range(PH):
            for pw in range(PW):
                if he[ph] <= hs[ph] or we[pw] <= ws[pw]:
                    continue
                win = plane[:, hs[ph]:he[ph], ws[pw]:we[pw]].reshape(C, -1)
                j = np.argmax(win, axis=1)  # first maximum, or first NaN
                out[k, :, ph, pw] = win[np.arange(C), j]
                arg[k, :, ph, pw] = (hs[ph] + j // (we[pw] - ws[pw])) * W + ws[pw] + j % (we[pw] - ws[pw])
    return out, arg


def roi_pool_backward_ref(grad_out, features_nchw, rois_k4, batch_idx, PH, PW, spatial_scale,
                          dtype=np.float64):
    """Gradient of RoIPool wrt the features: each bin's gradient goes to its arg-max pixel."""
    x = np.asarray(features_nchw)
    N, C, H, W = x.shape
    _, arg = roi_pool_ref(x, rois_k4, batch_idx, PH, PW, spatial_scale, dtype)
    grad = np.zeros((N, C, H * W))
    g = np.asarray(grad_out, dtype=np.float64)
    for k in range(len(rois_k4)):
        b = int(batch_idx[k])
        for c in range(C):
            for ph in range(PH):
                for pw in range(PW):
                    if arg[k, c, ph, pw] >= 0:
                        grad[b, c, arg[k, c, ph, pw]] += g[k, c, ph, pw]
    return grad.reshape(N, C, H, W)


def ps_channel(c, ph, pw, PH, PW):
    """Input channel read by bin (ph, pw) of output channel c (conventions 9.1)."""
    return (c * PH + ph) * PW + pw


def ps_pool_windows(rois_k4, batch_idx, PH, PW, spatial_scale, H, W, Co, dtype, edge):
    """(k, image, c, ph, pw, input channel, (row slice, column slice)) of every non-empty
    position-sensitive integer bin (conventions 9.1, 9.2), box by box in row-major bin order."""
    for k, roi in enumerate(rois_k4):
        hs, he, ws, we = integer_bins(roi, PH, PW, spatial_scale, H, W, "ps_roi_pool", dtype, edge)
        for c in range(Co):
            for ph in range(PH):
                for pw in range(PW):
                    if he[ph] > hs[ph] and we[pw] > ws[pw]:
                        yield (k, int(batch_idx[k]), c, ph, pw, ps_channel(c, ph, pw, PH, PW),
                               (slice(hs[ph], he[ph]), slice(ws[pw], we[pw])))


def ps_roi_pool_ref(features_nchw, rois_k4, batch_idx, PH, PW, spatial_scale, dtype=np.float64,
                    edge="torchvision"):
    """Position-sensitive RoIPool (conventions 9.2): the mean of each integer bin of its channel;
    an empty bin gives 0."""
    x = np.asarray(features_nchw, dtype=np.float64)
    N, C, H, W = x.shape
    out = np.zeros((len(rois_k4), C // (PH * PW), PH, PW))
    for k, b, c, ph, pw, ci, (rows, cols) in ps_pool_windows(
            rois_k4, batch_idx, PH, PW, spatial_scale, H, W, out.shape[1], dtype, edge):
        out[k, c, ph, pw] = x[b, ci, rows, cols].mean()
    return out


def ps_roi_pool_backward_ref(grad_out, feature_shape, rois_k4, batch_idx, PH, PW, spatial_scale,
                             dtype=np.float64, edge="torchvision"):
    """Its gradient: each pixel of a bin receives grad / pixel count."""
    N, C, H, W = feature_shape
    grad = np.zeros(feature_shape)
    g = np.asarray(grad_out, dtype=np.float64)
    for k, b, c, ph, pw, ci, (rows, cols) in ps_pool_windows(
            rois_k4, batch_idx, PH, PW, spatial_scale, H, W, C // (PH * PW), dtype, edge):
        grad[b, ci, rows, cols] += g[k, c, ph, pw] / ((rows.stop - rows.start) * (cols.stop - cols.start))
    return grad


def ps_roi_align_ref(features_nchw, rois_k4, batch_idx, PH, PW, spatial_scale, sampling_ratio):
    """Position-sensitive RoIAlign (conventions 9.3): section 1's samples with aligned=True, bin
    (ph, pw) of output channel c averaged from input channel ps_channel(c, ph, pw)."""
    x = np.asarray(features_nchw, dtype=np.float64)
    N, C, H, W = x.shape
    Co = C // (PH * PW)
    out = np.zeros((len(rois_k4), Co, PH, PW))
    for k, roi in enumerate(rois_k4):
        ys, xs, count = aligned_samples(roi, PH, PW, spatial_scale, sampling_ratio, True)
        for ph in range(PH):
            for pw in range(PW):
                if ys[ph, pw].size == 0:
                    continue
                chans = [ps_channel(c, ph, pw, PH, PW) for c in range(Co)]
                vals = sample_values(x[int(batch_idx[k])][chans], ys[ph, pw], xs[ph, pw], "avg")
                out[k, :, ph, pw] = vals.sum(axis=0) / count
    return out


def ps_roi_align_backward_ref(grad_out, feature_shape, rois_k4, batch_idx, PH, PW, spatial_scale,
                              sampling_ratio):
    N, C, H, W = feature_shape
    Co = C // (PH * PW)
    grad = np.zeros(feature_shape)
    g = np.asarray(grad_out, dtype=np.float64)
    for k, roi in enumerate(rois_k4):
        b = int(batch_idx[k])
        ys, xs, count = aligned_samples(roi, PH, PW, spatial_scale, sampling_ratio, True)
        for ph in range(PH):
            for pw in range(PW):
                chans = [ps_channel(c, ph, pw, PH, PW) for c in range(Co)]
                for y, xx in zip(ys[ph, pw].ravel(), xs[ph, pw].ravel()):
                    for r, col, w in bilinear_taps(y, xx, H, W):
                        grad[b, chans, r, col] += g[k, :, ph, pw] * w / count
    return grad

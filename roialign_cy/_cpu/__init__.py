"""CPU backend: drives the Cython kernels (contract in ``roialign_cy._backends``)."""
import numpy as np

from . import _roi_align, _roi_align_rotated
from ._openmp import effective_n_threads, openmp_enabled

_MODE = {"avg": 0, "max": 1, "onnx_max": 2}
# Bound on the table entries built at once; boxes beyond it are processed in further chunks so that
# memory stays flat whatever the sampling ratio.
_TABLE_ENTRIES_PER_CHUNK = 1 << 22


# Starting an OpenMP team costs tens of microseconds: calls with less work than this (output
# elements x samples per bin) per thread use fewer threads. Results do not depend on the count.
_MIN_WORK_PER_THREAD = 1 << 16


def _n_threads(p, n_outputs):
    samples = p.sampling_ratio ** 2 if p.sampling_ratio > 0 else 4
    wanted = effective_n_threads(p.n_threads)
    return int(max(1, min(wanted, n_outputs * samples // _MIN_WORK_PER_THREAD)))


def _group_by_image(batch_idx, n_images):
    """Positions of the boxes sorted by image (stable, so the visiting order is fixed) and where
    each image's run starts."""
    order = np.argsort(batch_idx, kind="stable").astype(np.int64)
    img_start = np.searchsorted(batch_idx[order], np.arange(n_images + 1)).astype(np.int64)
    return order, img_start


def _chunks(per_box_entries, order):
    """Split the sorted positions into runs whose tables hold at most _TABLE_ENTRIES_PER_CHUNK."""
    sizes = per_box_entries[order]
    if sizes.sum() <= _TABLE_ENTRIES_PER_CHUNK:  # the usual case: one chunk, no Python loop
        if len(order):
            yield 0, len(order)
        return
    j0, acc = 0, 0
    for j, s in enumerate(sizes.tolist()):
        if acc and acc + s > _TABLE_ENTRIES_PER_CHUNK:
            yield j0, j
            j0, acc = j, 0
        acc += s
    if j0 < len(order):
        yield j0, len(order)


def _shape(features, p):
    if p.channels_last:
        n, h, w, c = features.shape
    else:
        n, c, h, w = features.shape
    return n, c, h, w


def _axis_aligned_runs(rois, batch_idx, n_images, height, width, p, n_threads):
    """Yield (order, img_start, j0, j1, gh, gw, tables) for each chunk of boxes."""
    gh, gw = _roi_align.grid_sizes(rois, p.pooled_h, p.pooled_w, p.spatial_scale,
                                   p.sampling_ratio, p.aligned)
    order, img_start = _group_by_image(batch_idx, n_images)
    for j0, j1 in _chunks(gh * p.pooled_h + gw * p.pooled_w, order):
        t = _roi_align.make_tables(rois, order, j0, j1, gh, gw, height, width, p.pooled_h,
                                   p.pooled_w, p.spatial_scale, p.aligned, n_threads)
        yield order, img_start, j0, j1, gh, gw, t


# The NCHW kernels copy blocks of planes to channels-last scratch when the boxes take at least this
# many bilinear samples per feature pixel (the copy costs about one read of the map; measured on
# the benchmark workloads, see benchmarks/).
_INTERLEAVE_MIN_SAMPLES_PER_PIXEL = 1.0


def _interleave(gh, gw, boxes, n, c, h, w, p, n_threads):
    if p.channels_last:
        return False
    if n * -(-c // _roi_align.BLOCK_CHANNELS) < n_threads:
        return False
    samples = float(np.sum(gh[boxes] * gw[boxes])) * p.pooled_h * p.pooled_w
    return samples >= _INTERLEAVE_MIN_SAMPLES_PER_PIXEL * n * h * w


def _rotated_runs(rois, batch_idx, n_images, height, width, p, n_threads):
    """Yield (order, img_start, j0, j1, gh, gw, sample tables) for each chunk of rotated boxes."""
    gh, gw = _roi_align_rotated.grid_sizes(rois, p.pooled_h, p.pooled_w, p.spatial_scale,
                                           p.sampling_ratio, p.aligned)
    order, img_start = _group_by_image(batch_idx, n_images)
    # a sample costs 4 table entries of each kind
    for j0, j1 in _chunks(gh * gw * (p.pooled_h * p.pooled_w * 4), order):
        t = _roi_align_rotated.make_tables(rois, order, j0, j1, gh, gw, height, width,
                                           p.pooled_h, p.pooled_w, p.spatial_scale, p.aligned,
                                           p.clockwise, n_threads)
        yield order, img_start, j0, j1, gh, gw, t


def forward(features, rois, batch_idx, out, p):
    if out.size == 0:
        return
    n_threads = _n_threads(p, out.size)
    n, c, h, w = _shape(features, p)
    if p.rotated:
        for order, img_start, j0, j1, gh, gw, t in _rotated_runs(rois, batch_idx, n, h, w, p,
                                                                  n_threads):
            _roi_align_rotated.forward(features, batch_idx, order, img_start, j0, j1, gh, gw, t,
                                       out, p.channels_last,
                                       _interleave(gh, gw, order[j0:j1], n, c, h, w, p,
                                                   n_threads),
                                       n_threads)
        return
    for order, img_start, j0, j1, gh, gw, t in _axis_aligned_runs(rois, batch_idx, n, h, w, p,
                                                                   n_threads):
        _roi_align.forward(features, batch_idx, order, img_start, j0, j1, gh, gw, t, out,
                           _MODE[p.mode], p.channels_last,
                           _interleave(gh, gw, order[j0:j1], n, c, h, w, p, n_threads),
                           n_threads)


def backward_features(grad_out, features, rois, batch_idx, grad_features, p):
    if grad_out.size == 0:
        return
    n_threads = _n_threads(p, grad_out.size)
    n, c, h, w = _shape(grad_features, p)
    if features is None:
        features = grad_features  # avg mode reads no feature value; any array of the shape will do
    if p.rotated:
        for order, img_start, j0, j1, gh, gw, t in _rotated_runs(rois, batch_idx, n, h, w, p,
                                                                  n_threads):
            _roi_align_rotated.backward_features(grad_out, batch_idx, order, img_start, j0, j1,
                                                 gh, gw, t, grad_features, p.channels_last,
                                                 n_threads)
        return
    for order, img_start, j0, j1, gh, gw, t in _axis_aligned_runs(rois, batch_idx, n, h, w, p,
                                                                   n_threads):
        _roi_align.backward_features(grad_out, features, batch_idx, order, img_start, j0, j1, gh,
                                     gw, t, grad_features, _MODE[p.mode], p.channels_last,
                                     n_threads)


def backward_boxes(grad_out, features, rois, batch_idx, grad_rois, p):
    if grad_out.size == 0:
        return
    n_threads = _n_threads(p, grad_out.size)
    if p.rotated:
        gh, gw = _roi_align_rotated.grid_sizes(rois, p.pooled_h, p.pooled_w, p.spatial_scale,
                                               p.sampling_ratio, p.aligned)
        order, img_start = _group_by_image(batch_idx, features.shape[0])
        _roi_align_rotated.backward_boxes(grad_out, features, rois, batch_idx, order, img_start,
                                          gh, gw, grad_rois, p.spatial_scale, p.aligned,
                                          p.clockwise, p.channels_last, n_threads)
        return
    n, c, h, w = _shape(features, p)
    for order, img_start, j0, j1, gh, gw, t in _axis_aligned_runs(rois, batch_idx, n, h, w, p,
                                                                   n_threads):
        _roi_align.backward_boxes(grad_out, features, rois, batch_idx, order, img_start, j0, j1,
                                  gh, gw, t,
                                  grad_rois, p.spatial_scale, p.aligned, _MODE[p.mode],
                                  p.channels_last, n_threads)


__all__ = ["forward", "backward_features", "backward_boxes", "effective_n_threads",
           "openmp_enabled"]

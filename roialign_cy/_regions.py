"""Where the samples of each box fall, and how to pool a box from a region of the map exactly.

Planning for ``roialign_cy.dask`` (numpy only, no dask): for every box the rectangle of feature
pixels its bilinear samples may read, and the box re-expressed in the coordinates of a region
[y0, y1) x [x0, x1) so that pooling from the region equals pooling from the whole map.

Exactness. The kernels compute a box's start and end (axis-aligned) or centre (rotated) as
``T(double(coord) * spatial_scale - offset)`` in the features' dtype T, then the roi size, bin
size and grid from them. The host does the same arithmetic (same operations, same order, IEEE
double then one rounding to T), so it holds the very start s the kernel would use; the region's
integer origin r0 <= s makes s - r0 exact in T. The region call then uses spatial_scale=1 and
aligned=False, under which the kernel takes the passed coordinate unchanged: start, end, roi
size, bin size and sampling grid are bit-identical to the whole-map call. Only the sample
coordinates (start + bin offsets) are summed at the region's smaller magnitude, so they round
more finely: results agree to a few ulps of the map coordinates times the local slope of the
features (bit-identical along an axis whose region starts at 0). aligned=False is correct there
only where the kernel's one-pixel minimum does not apply, i.e. for boxes of roi size >= 1: the
other boxes of an aligned=True call (tiny, degenerate, inverted) go through aligned=True with the
half pixel added back, exact whenever start + 0.5 is representable in T (always when r0 > 0).

Regions. A region side that is not the map's side keeps one pixel of margin beyond the taps of
every in-map sample, so no sample there is clamped or counted outside; a box whose samples reach
below 0 or past H - 1 (or lie beyond the map) gets a region that extends to that side of the
map, where the kernel applies the map's own rules. The extents are computed in float64 from the
kernel's start and bin size; the margin absorbs their rounding.
"""
import math

import numpy as np

from . import _cpu

# Pixels of slack beyond the bilinear taps on a region side inside the map: covers the host's
# float64 estimate of the sample extent against the kernel's rounding in T.
MARGIN = 1


def _scaled(coord, scale, offset, dtype):
    """The kernel's ``T(double(coord) * scale - offset)``."""
    return (coord.astype(np.float64) * scale - offset).astype(dtype)


def _axis_extent(start, size, pooled, g):
    """First and last sample coordinate along one axis (float64; min, max order)."""
    bin_size = size.astype(np.float64) / pooled
    step = bin_size / np.maximum(g, 1)
    first = start + 0.5 * step
    last = start + (pooled - 1) * bin_size + (g - 0.5) * step
    return np.minimum(first, last), np.maximum(first, last)


class Geometry:
    """Kernel-exact geometry of K validated boxes.

    rois : (K, 4) [x1, y1, x2, y2] or (K, 5) [cx, cy, w, h, angle_deg] of dtype T (the
        features' dtype, as the kernels see them). p : OpParams. gh, gw : (K,) grid sizes from
        the kernels' own ``grid_sizes``.

    Attributes: ``lo``, ``hi`` (K, 2) float64 bounds of the sample coordinates (y, x);
    ``anchor`` (K, 2) the least coordinate the shift must keep >= region origin (y, x);
    ``exact`` (K,) True where the region call may use aligned=False (see the module docstring).
    """

    def __init__(self, rois, p, gh, gw):
        self.p, self.gh, self.gw = p, gh, gw
        dtype, scale = rois.dtype, p.spatial_scale
        offset = 0.5 if p.aligned else 0.0
        if p.rotated:
            self._rotated(rois, dtype, scale, offset)
        else:
            self._axis_aligned(rois, dtype, scale, offset)
        # aligned=False calls apply the one-pixel minimum themselves, to the same roi sizes
        self.exact = np.all(self.size >= 1, axis=1) | (not p.aligned)
        self.has_samples = (gh > 0) & (gw > 0)

    def _axis_aligned(self, rois, dtype, scale, offset):
        # columns (x1, y1, x2, y2) -> per axis (y, x)
        self.start = np.stack([_scaled(rois[:, 1], scale, offset, dtype),
                               _scaled(rois[:, 0], scale, offset, dtype)], axis=1)
        self.end = np.stack([_scaled(rois[:, 3], scale, offset, dtype),
                             _scaled(rois[:, 2], scale, offset, dtype)], axis=1)
        self.size = self.end - self.start  # in T, as the kernel
        size = self.size if self.p.aligned else np.maximum(self.size, dtype.type(1))
        lo_y, hi_y = _axis_extent(self.start[:, 0], size[:, 0], self.p.pooled_h, self.gh)
        lo_x, hi_x = _axis_extent(self.start[:, 1], size[:, 1], self.p.pooled_w, self.gw)
        self.lo = np.stack([lo_y, lo_x], axis=1)
        self.hi = np.stack([hi_y, hi_x], axis=1)
        self.anchor = np.minimum(np.minimum(self.start, self.end), self.lo)

    def _rotated(self, rois, dtype, scale, offset):
        p = self.p
        self.angle_deg = rois[:, 4].astype(np.float64)
        self.centre = np.stack([_scaled(rois[:, 1], scale, offset, dtype),
                                _scaled(rois[:, 0], scale, offset, dtype)], axis=1)
        self.wh = np.stack([_scaled(rois[:, 2], scale, 0.0, dtype),
                            _scaled(rois[:, 3], scale, 0.0, dtype)], axis=1)
        self.size = self.wh[:, ::-1]  # (h, w): the legacy one-pixel minimum looks at these
        roi_h, roi_w = self.size[:, 0], self.size[:, 1]
        if not p.aligned:
            roi_h, roi_w = np.maximum(roi_h, dtype.type(1)), np.maximum(roi_w, dtype.type(1))
        # half extent of the sample offsets (yy, xx) from the centre, in the box frame
        half_h = np.max(np.abs(_axis_extent(-roi_h / 2.0, roi_h, p.pooled_h, self.gh)), axis=0)
        half_w = np.max(np.abs(_axis_extent(-roi_w / 2.0, roi_w, p.pooled_w, self.gw)), axis=0)
        theta = self.angle_deg * (math.pi / 180.0)
        cos_t, sin_t = np.abs(np.cos(theta)), np.abs(np.sin(theta))
        reach = np.stack([cos_t * half_h + sin_t * half_w, sin_t * half_h + cos_t * half_w],
                         axis=1)
        self.lo = self.centre - reach
        self.hi = self.centre + reach
        self.anchor = np.minimum(self.centre, self.lo)

    def regions(self, height, width):
        """(K, 4) int64 [y0, y1, x0, x1] pixel regions, and the (K,) mask of boxes that may have
        a sample inside the map (the others pool to 0 and read nothing)."""
        shape = np.array([height, width], dtype=np.float64)
        # one pixel of slack on the -1 / size test: a box that close goes to a task, where the
        # kernel decides exactly (its region then reaches that side of the map)
        live = self.has_samples & np.all((self.hi >= -1 - MARGIN) & (self.lo <= shape + MARGIN),
                                         axis=1)
        first = np.floor(np.clip(np.minimum(self.lo, self.anchor), 0, shape - 1)) - MARGIN
        last = np.floor(np.clip(self.hi, 0, shape - 1)) + 2 + MARGIN  # + 1 tap, exclusive end
        r0 = np.maximum(first, 0).astype(np.int64)
        r1 = np.minimum(last, shape).astype(np.int64)
        return np.stack([r0[:, 0], r1[:, 0], r0[:, 1], r1[:, 1]], axis=1), live

    def shifted(self, boxes, y0, x0):
        """Boxes ``boxes`` (indices) in the coordinates of regions with origins y0, x0 (arrays or
        scalars), as float64 rows for a call with spatial_scale=1: aligned=False rows where
        ``exact``, aligned=True rows (the half pixel added back) elsewhere. The aligned=False
        rows hold values of T (the call's cast to T is exact); the others are exact whenever
        start + 0.5 is representable in T, always when the origin is > 0 (start < 2**23)."""
        origin = np.stack(np.broadcast_arrays(y0, x0), axis=-1).astype(np.float64)
        half = np.where(self.exact[boxes], 0.0, 0.5)[:, None]
        if self.p.rotated:
            centre = self.centre[boxes].astype(np.float64) - origin + half
            return np.column_stack([centre[:, 1], centre[:, 0], self.wh[boxes],
                                    self.angle_deg[boxes]])
        start = self.start[boxes].astype(np.float64) - origin + half
        end = self.end[boxes].astype(np.float64) - origin + half
        return np.column_stack([start[:, 1], start[:, 0], end[:, 1], end[:, 0]])

    def moved(self, dy, dx):
        """What to add to rows of :meth:`shifted` to move their region's origin up by dy and left
        by dx pixels (exact: the sums are the kernel's starts minus a smaller integer)."""
        if self.p.rotated:
            return np.array([dx, dy, 0, 0, 0], dtype=np.float64)
        return np.array([dx, dy, dx, dy], dtype=np.float64)

    def sample_taps(self, k, height, width):
        """Rows and columns of the map that the taps of box k's in-map samples may read, with
        the margin: (rows, cols) sorted int64 arrays (rotated boxes: the pairs, as (R, 2))."""
        p = self.p
        if p.rotated:
            ys, xs = self._rotated_samples(k)
            ok = (ys >= -1 - MARGIN) & (ys <= height + MARGIN) & (xs >= -1 - MARGIN) & \
                 (xs <= width + MARGIN)
            rows, cols = _taps(ys[ok], height)[:, :, None], _taps(xs[ok], width)[:, None, :]
            pix = np.stack(np.broadcast_arrays(rows, cols), axis=-1)  # every row x every column
            return np.unique(pix.reshape(-1, 2), axis=0)
        ys = _samples(self.start[k, 0], self._size(k, 0), p.pooled_h, self.gh[k])
        xs = _samples(self.start[k, 1], self._size(k, 1), p.pooled_w, self.gw[k])
        ys = ys[(ys >= -1 - MARGIN) & (ys <= height + MARGIN)]
        xs = xs[(xs >= -1 - MARGIN) & (xs <= width + MARGIN)]
        return np.unique(_taps(ys, height)), np.unique(_taps(xs, width))

    def _size(self, k, axis):
        s = float(self.size[k, axis])
        return s if self.p.aligned else max(s, 1.0)

    def _rotated_samples(self, k):
        p = self.p
        h, w = self._size(k, 0), self._size(k, 1)
        yy = _samples(-h / 2.0, h, p.pooled_h, self.gh[k])
        xx = _samples(-w / 2.0, w, p.pooled_w, self.gw[k])
        theta = float(self.angle_deg[k]) * math.pi / 180.0
        if p.clockwise:
            theta = -theta
        c, s = math.cos(theta), math.sin(theta)
        yy, xx = np.meshgrid(yy, xx, indexing="ij")
        cy, cx = self.centre[k].astype(np.float64)
        return yy * c - xx * s + cy, yy * s + xx * c + cx


def _samples(start, size, pooled, g):
    """Every sample coordinate along one axis (float64)."""
    bin_size = size / pooled
    p, i = np.meshgrid(np.arange(pooled), np.arange(g), indexing="ij")
    return (start + p * bin_size + (i + 0.5) * bin_size / g).ravel()


def _taps(c, size):
    """The pixels a bilinear tap at c may read, widened by the margin, clipped to the map."""
    lo = np.floor(np.clip(c, 0, size - 1)).astype(np.int64)
    return np.clip(lo[..., None] + np.arange(-MARGIN, 2 + MARGIN), 0, size - 1)


def geometry(rois, p):
    """Geometry of validated rois (dtype T) under OpParams p, grids by the kernels' own rule."""
    return Geometry(rois, p, *_cpu.grid_sizes(rois, p))

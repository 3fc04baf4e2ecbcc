// Box geometry shared by every kernel, forward and backward (docs/conventions.md sections 1, 4 and 5): where
// the sampling points of a bin lie, how they move with the box coordinates, and which of them can
// reach a given pixel. Forward, both feature gradients and the box gradient all call point(), so
// they cannot disagree about a sample.
//
// Both geometries expose the same interface, which roi_pool.cuh is written against:
//   make(problem, k)                      the geometry of box k
//   gh, gw, inv_count()                   samples per bin and axis; 1 / (gh * gw)
//   point(ph, pw, iy, ix, y, x)           sample (iy, ix) of bin (ph, pw), feature-map pixels
//   accumulate(ph, pw, iy, ix, dy, dx, s) add a sample's d(loss)/d(y, x) into the NSUMS sums s
//   finish(s, grad)                       add the sums, chained to the box coordinates, to grad
//   candidates(y, x, H, W, r)             sample ranges that may touch pixel (y, x) (a superset)
//   footprint(H, W, r)                    pixel rows and columns the box's samples may touch
#ifndef ROIALIGN_CY_ROI_GEOMETRY_CUH
#define ROIALIGN_CY_ROI_GEOMETRY_CUH

#include "roi_common.cuh"

namespace rac {

// FLAG_IMAGE_EDGE: ps_roi_pool clips its bins to the whole map (edge="image"), not to the last
// row and column but one (torchvision's forward; docs/conventions.md 9.2)
enum { FLAG_ALIGNED = 1, FLAG_CLOCKWISE = 2, FLAG_IMAGE_EDGE = 4 };

// Everything a kernel needs besides its arrays; built from the kernel arguments of RAC_PROBLEM.
template <typename A> struct Problem {
    const A* rois;
    const i64* batch_idx;
    int N, C, H, W, K, PH, PW;
    double spatial_scale;
    int sampling_ratio, flags;
};

// The kernel parameters behind Problem, identical in every kernel (roialign_cy/_cuda.py passes
// them as one tuple): rois (K, 4) or (K, 5) in the accumulator type, batch_idx (K,) int64, the
// sizes, spatial_scale, sampling_ratio (<= 0: adaptive) and flags (FLAG_ALIGNED | FLAG_CLOCKWISE).
#define RAC_PROBLEM_PARAMS                                                                        \
    const typename rac::Acc<T>::type* __restrict__ rois, const rac::i64* __restrict__ batch_idx, \
        int N, int C, int H, int W, int K, int PH, int PW, double spatial_scale,                  \
        int sampling_ratio, int flags
#define RAC_PROBLEM(T)                                                                            \
    rac::Problem<typename rac::Acc<T>::type> {                                                    \
        rois, batch_idx, N, C, H, W, K, PH, PW, spatial_scale, sampling_ratio, flags               \
    }

// Inclusive index ranges: samples j0..j1 along y (j = ph * gh + iy) and i0..i1 along x, or pixel
// rows j0..j1 and columns i0..i1 for a footprint.
struct Range {
    i64 j0, j1, i0, i1;
};

// Samples per bin along one axis: fixed, or adaptive ceil(roi / pooled); a non-positive adaptive
// size (degenerate or inverted aligned box) means no samples (output 0).
template <typename A> __device__ __forceinline__ int grid_size(int sampling_ratio, A roi_size, int pooled) {
    if (sampling_ratio > 0) return sampling_ratio;
    A g = ceil_(roi_size / A(pooled));
    if (!(g > A(0))) return 0;
    return g < A(1 << 30) ? (int)g : (1 << 30);  // the caller bounds gh * gw; this only keeps the cast defined
}

// Sample i (of g) of bin p along one axis, in the operand order of the CPU kernels.
template <typename A> __device__ __forceinline__ A sample_coord(A start, A bin, int p, int i, int g) {
    return start + A(p) * bin + A(i + 0.5) * bin / A(g);
}

// d(sample coordinate) / d(roi size): where the sample lies across the roi, in (0, 1).
template <typename A> __device__ __forceinline__ A sample_fraction(int p, int i, int g, int pooled) {
    return (A(p) + A(i + 0.5) / A(g)) / A(pooled);
}

// Sample indices along one axis whose coordinate can fall in [c_lo, c_hi]. The samples lie at
// start + (j + 0.5) * sub (sub = bin / g) in exact arithmetic; point() rounds in several steps
// (and the GPU may contract them into FMAs), an error of up to a few ulps of `mag` (a bound on
// the magnitudes involved), which is many indices when sub is far below an ulp. The margin covers
// that; the caller's exact test of each candidate removes the extra ones.
template <typename A>
__device__ __forceinline__ bool axis_candidates(A c_lo, A c_hi, A start, A bin, int g, int pooled, A mag,
                                                i64& lo, i64& hi) {
    const i64 n = (i64)pooled * g;
    if (n <= 0 || !finite_(start) || !finite_(bin)) return false;  // no sample, or none in range
    const A sub = bin / A(g);
    const A ta = (c_lo - start) / sub - A(0.5);
    const A tb = (c_hi - start) / sub - A(0.5);
    const A margin = A(2) + A(8) * Eps<A>::value() * (abs_(ta) + abs_(tb) + mag / abs_(sub));
    const A t_min = min_(ta, tb) - margin, t_max = max_(ta, tb) + margin;
    if (!(t_min == t_min && t_max == t_max)) {  // sub == 0 and the like: every sample may touch
        lo = 0;
        hi = n - 1;
        return true;
    }
    if (t_max < A(0) || t_min > A(n - 1)) return false;
    lo = floor_clamped(t_min, 0, n - 1);
    hi = floor_clamped(t_max, 0, n - 1) + 1;
    if (hi > n - 1) hi = n - 1;
    return true;
}

// Coordinate interval of the samples that may tap pixel p of an axis of `size` pixels: a sample
// at c reads floor(c) and floor(c) + 1, clamped at 0 and size - 1 (bilinear_axis).
template <typename A> __device__ __forceinline__ void tap_interval(int p, int size, A& lo, A& hi) {
    lo = p == 0 ? A(-1) : A(p - 1);
    hi = p == size - 1 ? A(size) : A(p + 1);
}

// Pixels [p0, p1] of an axis of `size` pixels that samples with coordinates in [c_min, c_max] may
// tap; false when none. `mag` bounds the magnitudes, for the rounding margin.
template <typename A>
__device__ __forceinline__ bool pixel_span(A c_min, A c_max, A mag, int size, i64& p0, i64& p1) {
    if (!finite_(c_min) || !finite_(c_max)) return false;
    const A margin = A(16) * Eps<A>::value() * mag;
    p0 = floor_clamped(c_min - margin, -2, (i64)size + 2) - 1;
    p1 = floor_clamped(c_max + margin, -2, (i64)size + 2) + 2;
    if (p0 < 0) p0 = 0;
    if (p1 > size - 1) p1 = size - 1;
    return p0 <= p1;
}

// Axis-aligned box (x1, y1, x2, y2), docs/conventions.md section 1.
template <typename A_> struct AlignedBox {
    typedef A_ A;
    typedef A_ acc_t;
    enum { COORDS = 4, NSUMS = 4 };
    A start_y, start_x, bin_h, bin_w;
    double scale;
    int gh, gw, PH, PW;
    bool fixed_h, fixed_w;  // roi size raised to 1 (aligned=False): it no longer moves with the box

    // Start, bin size and whether the roi size was clamped, along one axis. The scaled corners are
    // computed in double, then stored in A: the rounding of the CPU kernels' roi_axis.
    __device__ static A axis(A lo_corner, A hi_corner, double scale, bool aligned, int pooled, A& start,
                             A& bin, bool& fixed) {
        const double offset = aligned ? 0.5 : 0.0;
        const A s = (A)((double)lo_corner * scale - offset);
        const A e = (A)((double)hi_corner * scale - offset);
        A size = e - s;
        fixed = false;
        if (!aligned && size < A(1)) {  // legacy: malformed boxes become 1 pixel wide
            size = A(1);
            fixed = true;
        }
        start = s;
        bin = size / A(pooled);
        return size;
    }

    __device__ static AlignedBox make(const Problem<A>& pb, i64 k) {
        AlignedBox g;
        const A* r = pb.rois + k * COORDS;
        const bool aligned = (pb.flags & FLAG_ALIGNED) != 0;
        const A h = axis(r[1], r[3], pb.spatial_scale, aligned, pb.PH, g.start_y, g.bin_h, g.fixed_h);
        const A w = axis(r[0], r[2], pb.spatial_scale, aligned, pb.PW, g.start_x, g.bin_w, g.fixed_w);
        g.gh = grid_size(pb.sampling_ratio, h, pb.PH);
        g.gw = grid_size(pb.sampling_ratio, w, pb.PW);
        g.scale = pb.spatial_scale;
        g.PH = pb.PH;
        g.PW = pb.PW;
        return g;
    }

    __device__ __forceinline__ A inv_count() const { return A(1) / A(gh * gw); }

    __device__ __forceinline__ void point(int ph, int pw, int iy, int ix, A& y, A& x) const {
        y = sample_coord(start_y, bin_h, ph, iy, gh);
        x = sample_coord(start_x, bin_w, pw, ix, gw);
    }

    // A sample at start + t * roi_size moves by scale * (1 - t) with the low corner and scale * t
    // with the high one; the sums are (dy, dy * t_y, dx, dx * t_x), chained in finish().
    __device__ __forceinline__ void accumulate(int ph, int pw, int iy, int ix, A dy, A dx, A* s) const {
        s[0] += dy;
        s[1] += dy * sample_fraction<A>(ph, iy, gh, PH);
        s[2] += dx;
        s[3] += dx * sample_fraction<A>(pw, ix, gw, PW);
    }

    __device__ __forceinline__ void finish(const A* s, A* grad) const {
        const A sc = (A)scale;
        if (fixed_w) {
            grad[0] += sc * s[2];
        } else {
            grad[0] += sc * (s[2] - s[3]);
            grad[2] += sc * s[3];
        }
        if (fixed_h) {
            grad[1] += sc * s[0];
        } else {
            grad[1] += sc * (s[0] - s[1]);
            grad[3] += sc * s[1];
        }
    }

    __device__ bool candidates(int y, int x, int H, int W, Range& r) const {
        A lo, hi;
        tap_interval(y, H, lo, hi);
        if (!axis_candidates(lo, hi, start_y, bin_h, gh, PH, abs_(start_y) + A(2) * abs_(bin_h) * A(PH) + hi + A(1),
                             r.j0, r.j1))
            return false;
        tap_interval(x, W, lo, hi);
        return axis_candidates(lo, hi, start_x, bin_w, gw, PW, abs_(start_x) + A(2) * abs_(bin_w) * A(PW) + hi + A(1),
                               r.i0, r.i1);
    }

    __device__ bool footprint(int H, int W, Range& r) const {
        if (gh <= 0 || gw <= 0) return false;
        const A end_y = start_y + bin_h * A(PH), end_x = start_x + bin_w * A(PW);
        return pixel_span(min_(start_y, end_y), max_(start_y, end_y), abs_(start_y) + abs_(end_y) + A(1), H,
                          r.j0, r.j1) &&
               pixel_span(min_(start_x, end_x), max_(start_x, end_x), abs_(start_x) + abs_(end_x) + A(1), W,
                          r.i0, r.i1);
    }
};

// Rotated box (cx, cy, w, h, angle in degrees), docs/conventions.md section 4: sample offsets (yy, xx) from the
// centre on an axis-aligned grid, rotated by theta (negated for clockwise=True).
template <typename A_> struct RotatedBox {
    typedef A_ A;
    typedef A_ acc_t;
    enum { COORDS = 5, NSUMS = 5 };
    A centre_y, centre_x, start_yy, start_xx, bin_h, bin_w, cos_t, sin_t;
    double scale, dtheta;  // dtheta = d(theta) / d(angle)
    int gh, gw, PH, PW;
    bool fixed_h, fixed_w;

    __device__ static RotatedBox make(const Problem<A>& pb, i64 k) {
        RotatedBox g;
        const A* r = pb.rois + k * COORDS;
        const bool aligned = (pb.flags & FLAG_ALIGNED) != 0;
        const double offset = aligned ? 0.5 : 0.0;
        const double deg = 3.14159265358979323846 / 180.0;
        g.scale = pb.spatial_scale;
        g.centre_x = (A)((double)r[0] * pb.spatial_scale - offset);
        g.centre_y = (A)((double)r[1] * pb.spatial_scale - offset);
        A roi_w = (A)((double)r[2] * pb.spatial_scale);
        A roi_h = (A)((double)r[3] * pb.spatial_scale);
        g.fixed_w = g.fixed_h = false;
        if (!aligned) {  // Caffe2 / mmcv legacy: no half-pixel offset, sizes raised to 1
            if (roi_w < A(1)) { roi_w = A(1); g.fixed_w = true; }
            if (roi_h < A(1)) { roi_h = A(1); g.fixed_h = true; }
        }
        g.dtheta = (pb.flags & FLAG_CLOCKWISE) ? -deg : deg;
        const A theta = (A)((double)r[4] * g.dtheta);
        g.cos_t = cos_(theta);
        g.sin_t = sin_(theta);
        g.start_yy = -roi_h / A(2);
        g.start_xx = -roi_w / A(2);
        g.bin_h = roi_h / A(pb.PH);
        g.bin_w = roi_w / A(pb.PW);
        g.gh = grid_size(pb.sampling_ratio, roi_h, pb.PH);
        g.gw = grid_size(pb.sampling_ratio, roi_w, pb.PW);
        g.PH = pb.PH;
        g.PW = pb.PW;
        return g;
    }

    __device__ __forceinline__ A inv_count() const { return A(1) / A(gh * gw); }

    __device__ __forceinline__ void local(int ph, int pw, int iy, int ix, A& yy, A& xx) const {
        yy = sample_coord(start_yy, bin_h, ph, iy, gh);
        xx = sample_coord(start_xx, bin_w, pw, ix, gw);
    }

    __device__ __forceinline__ void point(int ph, int pw, int iy, int ix, A& y, A& x) const {
        A yy, xx;
        local(ph, pw, iy, ix, yy, xx);
        y = yy * cos_t - xx * sin_t + centre_y;
        x = yy * sin_t + xx * cos_t + centre_x;
    }

    // Sums: (dx, dy) move the centre; the offsets yy = roi_h * (t_y - 1/2) and xx = roi_w *
    // (t_x - 1/2) scale with the size along the rotated axes; theta rotates (yy, xx).
    __device__ __forceinline__ void accumulate(int ph, int pw, int iy, int ix, A dy, A dx, A* s) const {
        A yy, xx;
        local(ph, pw, iy, ix, yy, xx);
        s[0] += dx;
        s[1] += dy;
        s[2] += (dx * cos_t - dy * sin_t) * (sample_fraction<A>(pw, ix, gw, PW) - A(0.5));
        s[3] += (dy * cos_t + dx * sin_t) * (sample_fraction<A>(ph, iy, gh, PH) - A(0.5));
        s[4] += dy * (-yy * sin_t - xx * cos_t) + dx * (yy * cos_t - xx * sin_t);
    }

    __device__ __forceinline__ void finish(const A* s, A* grad) const {
        const A sc = (A)scale;
        grad[0] += sc * s[0];
        grad[1] += sc * s[1];
        if (!fixed_w) grad[2] += sc * s[2];
        if (!fixed_h) grad[3] += sc * s[3];
        grad[4] += (A)dtheta * s[4];
    }

    // Pixel (y, x) is tapped by samples in a world rectangle; its corners in the box frame bound
    // the local sample ranges.
    __device__ bool candidates(int y, int x, int H, int W, Range& r) const {
        A y_lo, y_hi, x_lo, x_hi;
        tap_interval(y, H, y_lo, y_hi);
        tap_interval(x, W, x_lo, x_hi);
        A yy_min = A(0), yy_max = A(0), xx_min = A(0), xx_max = A(0);
        for (int c = 0; c < 4; ++c) {
            const A dy = ((c & 1) ? y_hi : y_lo) - centre_y;
            const A dx = ((c & 2) ? x_hi : x_lo) - centre_x;
            const A yy = dy * cos_t + dx * sin_t;
            const A xx = dx * cos_t - dy * sin_t;
            yy_min = c ? min_(yy_min, yy) : yy;
            yy_max = c ? max_(yy_max, yy) : yy;
            xx_min = c ? min_(xx_min, xx) : xx;
            xx_max = c ? max_(xx_max, xx) : xx;
        }
        const A mag = abs_(centre_y) + abs_(centre_x) + abs_(bin_h) * A(PH) + abs_(bin_w) * A(PW) + y_hi + x_hi + A(1);
        return axis_candidates(yy_min, yy_max, start_yy, bin_h, gh, PH, mag, r.j0, r.j1) &&
               axis_candidates(xx_min, xx_max, start_xx, bin_w, gw, PW, mag, r.i0, r.i1);
    }

    __device__ bool footprint(int H, int W, Range& r) const {
        if (gh <= 0 || gw <= 0) return false;
        A y_min = A(0), y_max = A(0), x_min = A(0), x_max = A(0);
        for (int c = 0; c < 4; ++c) {
            const A yy = (c & 1) ? start_yy + bin_h * A(PH) : start_yy;
            const A xx = (c & 2) ? start_xx + bin_w * A(PW) : start_xx;
            const A y = yy * cos_t - xx * sin_t + centre_y;
            const A x = yy * sin_t + xx * cos_t + centre_x;
            y_min = c ? min_(y_min, y) : y;
            y_max = c ? max_(y_max, y) : y;
            x_min = c ? min_(x_min, x) : x;
            x_max = c ? max_(x_max, x) : x;
        }
        const A mag = abs_(centre_y) + abs_(centre_x) + abs_(bin_h) * A(PH) + abs_(bin_w) * A(PW) + A(1);
        return pixel_span(y_min, y_max, mag, H, r.j0, r.j1) && pixel_span(x_min, x_max, mag, W, r.i0, r.i1);
    }
};

}  // namespace rac

#endif  // ROIALIGN_CY_ROI_GEOMETRY_CUH

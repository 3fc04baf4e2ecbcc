// RoIPool and the position-sensitive operators (docs/conventions.md sections 8 and 9): forward,
// and gradient with respect to the features (deterministic gather, or atomic scatter). There is no
// box gradient: roi_pool and ps_roi_pool are piecewise constant in the boxes (8.6), and the API
// offers none for ps_roi_align (9.3).
//
// roi_pool and ps_roi_pool pool integer pixel bins (IntegerBins below); ps_roi_align samples as
// roi_align does with aligned=True (AlignedBox of roi_geometry.cuh, pooled by roi_pool.cuh's
// pool_bin). The position-sensitive operators read input channel (c * PH + ph) * PW + pw for bin
// (ph, pw) of output channel c, so each input channel belongs to one bin: a gradient element's
// gather visits one bin of each box.
//
// Work decomposition as in roi_pool.cuh: forward and arg-max one thread per output element; the
// atomic gradient one thread per grad_out element; the deterministic gather one thread per
// gradient element, summing over the boxes of its tile's list (roi_tiles_count / roi_tiles_fill)
// in increasing box index, then over bins (and samples) in row-major order: one owner per element
// and a fixed order, so the bits do not depend on the launch or the scheduling.
//
// Templates: T = __half, float or double (boxes and accumulation in float for __half); NHWC =
// channels-last layout. roialign_cy/_cuda.py instantiates them through NVRTC name expressions.
#include "roi_pool.cuh"

namespace rac {

// A scaled corner of an integer-bin box (docs/conventions.md 8.1): the product in A, as the peers
// form it, and C's round. Held as an integer; the clamp at 2^61 keeps the bin arithmetic from
// overflowing and changes nothing for any box within 2^61 pixels of the map.
template <typename A> __device__ __forceinline__ i64 scaled_corner(A v, A scale) {
    const A r = round_(v * scale);
    const A limit = A(1LL << 61);
    if (r <= -limit) return -(1LL << 61);
    if (r >= limit) return 1LL << 61;
    return (i64)r;
}

// floor(p * bin) or ceil(...) (already applied to `edge`) + start, clipped to [0, top].
template <typename A> __device__ __forceinline__ int bin_edge(A edge, i64 start, int top) {
    const i64 e = (i64)edge + start;
    return (int)(e < 0 ? 0 : e > top ? top : e);
}

// The integer pixel bins of one box: roi_pool's (PS = false, docs/conventions.md 8.1-8.3) or
// ps_roi_pool's (PS = true, 9.2: no "+ 1" on the size, and clipped to the last row and column but
// one unless FLAG_IMAGE_EDGE). Bin (ph, pw) covers rows [h0, h1) and columns [w0, w1), empty when
// h1 <= h0 or w1 <= w0. Both ends grow with ph (pw), and bin ph ends no earlier than bin ph + 1
// starts: the bins of a box tile one rectangle of rows and columns.
template <typename A_, bool PS> struct IntegerBins {
    typedef A_ A;
    i64 y1, x1;
    A bin_h, bin_w;
    int top_h, top_w, PH, PW;

    __device__ static IntegerBins make(const Problem<A>& pb, i64 k) {
        IntegerBins g;
        const A* r = pb.rois + 4 * k;
        const A scale = (A)pb.spatial_scale;
        const i64 grow = PS ? 0 : 1;  // RoIPool's box covers its end pixel
        g.x1 = scaled_corner(r[0], scale);
        g.y1 = scaled_corner(r[1], scale);
        g.bin_w = A(max_(scaled_corner(r[2], scale) - g.x1 + grow, (i64)1)) / A(pb.PW);
        g.bin_h = A(max_(scaled_corner(r[3], scale) - g.y1 + grow, (i64)1)) / A(pb.PH);
        const bool whole_map = !PS || (pb.flags & FLAG_IMAGE_EDGE);
        g.top_h = whole_map ? pb.H : pb.H - 1;
        g.top_w = whole_map ? pb.W : pb.W - 1;
        g.PH = pb.PH;
        g.PW = pb.PW;
        return g;
    }

    __device__ __forceinline__ void rows(int ph, int& h0, int& h1) const {
        h0 = bin_edge(floor_(A(ph) * bin_h), y1, top_h);
        h1 = bin_edge(ceil_(A(ph + 1) * bin_h), y1, top_h);
    }

    __device__ __forceinline__ void cols(int pw, int& w0, int& w1) const {
        w0 = bin_edge(floor_(A(pw) * bin_w), x1, top_w);
        w1 = bin_edge(ceil_(A(pw + 1) * bin_w), x1, top_w);
    }

    // Pixels the box's bins cover (inclusive, as roi_pool.cuh's footprint_body wants them).
    __device__ bool footprint(int, int, Range& r) const {
        int h0, h1, w0, w1, unused;
        rows(0, h0, unused);
        rows(PH - 1, unused, h1);
        cols(0, w0, unused);
        cols(PW - 1, unused, w1);
        r.j0 = h0;
        r.j1 = h1 - 1;
        r.i0 = w0;
        r.i1 = w1 - 1;
        return h0 < h1 && w0 < w1;
    }
};

// Input channel of bin (ph, pw) of output channel c (docs/conventions.md 9.1).
__device__ __forceinline__ int ps_channel(int c, int ph, int pw, int PH, int PW) { return (c * PH + ph) * PW + pw; }

// ---------------------------------------------------------------------------------------------
// roi_pool

// The largest pixel of bin (ph, pw) (docs/conventions.md 8.4), by max pooling's rule (takes_max:
// the first maximum in row-major order, a NaN wins and stays); `arg` its index y * W + x, -1 and
// value 0 for an empty bin.
template <typename A, typename T>
__device__ __forceinline__ A bin_max(const IntegerBins<A, false>& g, const Plane<const T>& f, int W, int ph, int pw,
                                     i64& arg) {
    int h0, h1, w0, w1;
    g.rows(ph, h0, h1);
    g.cols(pw, w0, w1);
    A best = A(0);
    arg = -1;
    for (int y = h0; y < h1; ++y) {
        for (int x = w0; x < w1; ++x) {
            const A v = to_acc(f(y, x));
            if (takes_max(v, best, arg < 0)) {
                best = v;
                arg = (i64)y * W + x;
            }
        }
    }
    return best;
}

// out (K, C, PH, PW) or (K, PH, PW, C), and/or the arg-max of every output (either may be null).
template <bool NHWC, typename A, typename T>
__device__ void roi_pool_forward_body(const Problem<A>& pb, const T* __restrict__ features, T* __restrict__ out,
                                      i64* __restrict__ argmax) {
    RAC_GRID_STRIDE(i, (i64)pb.K * pb.C * pb.PH * pb.PW) {
        const Index4 o = split_index<NHWC>(i, pb.C, pb.PH, pb.PW);  // (k, c, ph, pw)
        const IntegerBins<A, false> g = IntegerBins<A, false>::make(pb, o.n);
        const Plane<const T> f = plane_of<NHWC>(features, pb.batch_idx[o.n], o.c, pb.C, pb.H, pb.W);
        i64 arg;
        const A v = bin_max(g, f, pb.W, o.y, o.x, arg);
        if (out) out[i] = from_acc<T>(v);
        if (argmax) argmax[i] = arg;
    }
}

// Each bin's gradient to its arg-max pixel (8.5), scattered with atomicAdd into grad_acc.
template <bool NHWC, typename A, typename T>
__device__ void roi_pool_backward_features_atomic_body(const Problem<A>& pb, const T* __restrict__ grad_out,
                                                       const i64* __restrict__ argmax, A* grad_acc) {
    RAC_GRID_STRIDE(i, (i64)pb.K * pb.C * pb.PH * pb.PW) {
        const i64 a = argmax[i];
        if (a < 0) continue;  // an empty bin sends nothing
        const Index4 o = split_index<NHWC>(i, pb.C, pb.PH, pb.PW);
        const Plane<A> gf = plane_of<NHWC>(grad_acc, pb.batch_idx[o.n], o.c, pb.C, pb.H, pb.W);
        atomicAdd(&gf((int)(a / pb.W), (int)(a % pb.W)), to_acc(grad_out[i]));
    }
}

// grad_features[n, c, y, x] += the gradients of the bins, of the boxes listed for its tile, whose
// arg-max is pixel (y, x); boxes in list order, bins in row-major order.
template <bool NHWC, typename A, typename T>
__device__ void roi_pool_backward_features_gather_body(const Problem<A>& pb, const T* __restrict__ grad_out,
                                                       const i64* __restrict__ argmax, int tile_h, int tile_w,
                                                       int tiles_y, int tiles_x, const i64* __restrict__ tile_offsets,
                                                       const int* __restrict__ tile_boxes,
                                                       T* __restrict__ grad_features) {
    RAC_GRID_STRIDE(i, (i64)pb.N * pb.C * pb.H * pb.W) {
        const Index4 p = split_index<NHWC>(i, pb.C, pb.H, pb.W);  // (n, c, y, x)
        const i64 tile = (p.n * tiles_y + p.y / tile_h) * tiles_x + p.x / tile_w;
        const i64 pixel = (i64)p.y * pb.W + p.x;
        A acc = A(0);
        for (i64 e = tile_offsets[tile]; e < tile_offsets[tile + 1]; ++e) {
            const int k = tile_boxes[e];
            const IntegerBins<A, false> g = IntegerBins<A, false>::make(pb, k);
            const Plane<const T> go = plane_of<NHWC>(grad_out, k, p.c, pb.C, pb.PH, pb.PW);
            const Plane<const i64> am = plane_of<NHWC>(argmax, k, p.c, pb.C, pb.PH, pb.PW);
            for (int ph = 0; ph < pb.PH; ++ph) {
                int h0, h1;
                g.rows(ph, h0, h1);
                if (p.y >= h1) continue;
                if (p.y < h0) break;  // the later bins start lower still
                for (int pw = 0; pw < pb.PW; ++pw) {
                    int w0, w1;
                    g.cols(pw, w0, w1);
                    if (p.x >= w1) continue;
                    if (p.x < w0) break;
                    if (am(ph, pw) == pixel) acc += to_acc(go(ph, pw));
                }
            }
        }
        grad_features[i] = from_acc<T>(to_acc(grad_features[i]) + acc);
    }
}

// ---------------------------------------------------------------------------------------------
// ps_roi_pool and ps_roi_align: one body per kernel, each bin operation overloaded on the geometry

// ps_roi_pool (9.2): the mean of the bin, summed in row-major order; 0 for an empty bin.
template <typename A, typename T>
__device__ __forceinline__ A bin_mean(const IntegerBins<A, true>& g, const Plane<const T>& f, int, int, int ph,
                                      int pw) {
    int h0, h1, w0, w1;
    g.rows(ph, h0, h1);
    g.cols(pw, w0, w1);
    if (h1 <= h0 || w1 <= w0) return A(0);
    A sum = A(0);
    for (int y = h0; y < h1; ++y)
        for (int x = w0; x < w1; ++x) sum += to_acc(f(y, x));
    return sum / A((i64)(h1 - h0) * (w1 - w0));
}

// ps_roi_align (9.3): roi_align's average of the bin's samples (1.7).
template <typename A, typename T>
__device__ __forceinline__ A bin_mean(const AlignedBox<A>& g, const Plane<const T>& f, int H, int W, int ph, int pw) {
    int unused;
    return pool_bin<MODE_AVG>(g, f, H, W, ph, pw, unused);
}

// Scatter gv, the gradient of bin (ph, pw), over the plane gf with atomicAdd: an equal share to
// each pixel of the bin, or the samples' shares to their taps.
template <typename A>
__device__ __forceinline__ void bin_scatter(const IntegerBins<A, true>& g, const Plane<A>& gf, int, int, int ph,
                                            int pw, A gv) {
    int h0, h1, w0, w1;
    g.rows(ph, h0, h1);
    g.cols(pw, w0, w1);
    if (h1 <= h0 || w1 <= w0) return;
    const A share = gv / A((i64)(h1 - h0) * (w1 - w0));
    for (int y = h0; y < h1; ++y)
        for (int x = w0; x < w1; ++x) atomicAdd(&gf(y, x), share);
}

template <typename A>
__device__ __forceinline__ void bin_scatter(const AlignedBox<A>& g, const Plane<A>& gf, int H, int W, int ph, int pw,
                                            A gv) {
    if (g.gh <= 0 || g.gw <= 0) return;
    gv *= g.inv_count();
    for (int iy = 0; iy < g.gh; ++iy) {
        for (int ix = 0; ix < g.gw; ++ix) {
            A y, x;
            g.point(ph, pw, iy, ix, y, x);
            const Sample<A> s = bilinear_sample(y, x, H, W);
            if (!s.valid()) continue;
            for (int t = 0; t < 4; ++t) atomicAdd(&gf(s.row(t), s.col(t)), gv * s.wy(t) * s.wx(t));
        }
    }
}

// acc += the share of gv, the gradient of bin (ph, pw), that pixel (y, x) receives; nothing at all
// (not 0 * gv, which a NaN or inf gradient would turn into NaN) when the bin does not reach it.
template <typename A>
__device__ __forceinline__ void bin_gather(const IntegerBins<A, true>& g, int, int, int ph, int pw, int y, int x,
                                           A gv, A& acc) {
    int h0, h1, w0, w1;
    g.rows(ph, h0, h1);
    g.cols(pw, w0, w1);
    if (y >= h0 && y < h1 && x >= w0 && x < w1) acc += gv / A((i64)(h1 - h0) * (w1 - w0));
}

template <typename A>
__device__ __forceinline__ void bin_gather(const AlignedBox<A>& g, int H, int W, int ph, int pw, int y, int x, A gv,
                                           A& acc) {
    Range r;
    if (!g.candidates(y, x, H, W, r)) return;
    // candidates() spans every bin's samples (j = ph * gh + iy): keep those of bin (ph, pw)
    const i64 j0 = max_(r.j0, (i64)ph * g.gh), j1 = min_(r.j1, (i64)ph * g.gh + g.gh - 1);
    const i64 i0 = max_(r.i0, (i64)pw * g.gw), i1 = min_(r.i1, (i64)pw * g.gw + g.gw - 1);
    const A inv_count = g.inv_count();
    for (i64 j = j0; j <= j1; ++j) {
        for (i64 q = i0; q <= i1; ++q) {
            A sy, sx;
            g.point(ph, pw, (int)(j - (i64)ph * g.gh), (int)(q - (i64)pw * g.gw), sy, sx);
            const Sample<A> s = bilinear_sample(sy, sx, H, W);
            if (s.valid() && touches(s, y, x)) acc += gv * inv_count * weight_at(s, y, x);
        }
    }
}

// out (K, C_out, PH, PW) or (K, PH, PW, C_out), C_out = C / (PH * PW).
template <bool NHWC, typename Geom, typename T>
__device__ void ps_forward_body(const Problem<typename Geom::A>& pb, const T* __restrict__ features,
                                T* __restrict__ out) {
    const int C_out = pb.C / (pb.PH * pb.PW);
    RAC_GRID_STRIDE(i, (i64)pb.K * C_out * pb.PH * pb.PW) {
        const Index4 o = split_index<NHWC>(i, C_out, pb.PH, pb.PW);  // (k, c, ph, pw)
        const Geom g = Geom::make(pb, o.n);
        const int channel = ps_channel(o.c, o.y, o.x, pb.PH, pb.PW);
        const Plane<const T> f = plane_of<NHWC>(features, pb.batch_idx[o.n], channel, pb.C, pb.H, pb.W);
        out[i] = from_acc<T>(bin_mean(g, f, pb.H, pb.W, o.y, o.x));
    }
}

template <bool NHWC, typename Geom, typename T>
__device__ void ps_backward_features_atomic_body(const Problem<typename Geom::A>& pb, const T* __restrict__ grad_out,
                                                 typename Geom::A* grad_acc) {
    typedef typename Geom::A A;
    const int C_out = pb.C / (pb.PH * pb.PW);
    RAC_GRID_STRIDE(i, (i64)pb.K * C_out * pb.PH * pb.PW) {
        const Index4 o = split_index<NHWC>(i, C_out, pb.PH, pb.PW);
        const Geom g = Geom::make(pb, o.n);
        const int channel = ps_channel(o.c, o.y, o.x, pb.PH, pb.PW);
        const Plane<A> gf = plane_of<NHWC>(grad_acc, pb.batch_idx[o.n], channel, pb.C, pb.H, pb.W);
        bin_scatter(g, gf, pb.H, pb.W, o.y, o.x, to_acc(grad_out[i]));
    }
}

// grad_features[n, c, y, x] += the shares of (y, x) in the gradients of bin (ph, pw) of output
// channel c / (PH * PW), the one bin that reads input channel c, of the boxes listed for its tile.
template <bool NHWC, typename Geom, typename T>
__device__ void ps_backward_features_gather_body(const Problem<typename Geom::A>& pb, const T* __restrict__ grad_out,
                                                 int tile_h, int tile_w, int tiles_y, int tiles_x,
                                                 const i64* __restrict__ tile_offsets,
                                                 const int* __restrict__ tile_boxes, T* __restrict__ grad_features) {
    typedef typename Geom::A A;
    const int C_out = pb.C / (pb.PH * pb.PW);
    RAC_GRID_STRIDE(i, (i64)pb.N * pb.C * pb.H * pb.W) {
        const Index4 p = split_index<NHWC>(i, pb.C, pb.H, pb.W);  // (n, c, y, x)
        const int pw = p.c % pb.PW, ph = p.c / pb.PW % pb.PH, c = p.c / (pb.PW * pb.PH);
        const i64 tile = (p.n * tiles_y + p.y / tile_h) * tiles_x + p.x / tile_w;
        A acc = A(0);
        for (i64 e = tile_offsets[tile]; e < tile_offsets[tile + 1]; ++e) {
            const int k = tile_boxes[e];
            const Plane<const T> go = plane_of<NHWC>(grad_out, k, c, C_out, pb.PH, pb.PW);
            bin_gather(Geom::make(pb, k), pb.H, pb.W, ph, pw, p.y, p.x, to_acc(go(ph, pw)), acc);
        }
        grad_features[i] = from_acc<T>(to_acc(grad_features[i]) + acc);
    }
}

// ps_roi_align samples with the half-pixel offset whatever the caller's flags say (9.3).
template <typename A> __device__ __forceinline__ Problem<A> always_aligned(Problem<A> pb) {
    pb.flags |= FLAG_ALIGNED;
    return pb;
}

}  // namespace rac

#define RAC_A typename rac::Acc<T>::type

// roi_pool --------------------------------------------------------------------------------------

template <typename T, bool NHWC>
__global__ void roi_pool_forward(const T* __restrict__ features, RAC_PROBLEM_PARAMS, T* __restrict__ out) {
    rac::roi_pool_forward_body<NHWC>(RAC_PROBLEM(T), features, out, (rac::i64*)0);
}

// The arg-max pixel of every output, for the gradients: found again from the features when the
// backward is not given the forward's (docs/conventions.md 8.5).
template <typename T, bool NHWC>
__global__ void roi_pool_argmax(const T* __restrict__ features, RAC_PROBLEM_PARAMS, rac::i64* __restrict__ argmax) {
    rac::roi_pool_forward_body<NHWC>(RAC_PROBLEM(T), features, (T*)0, argmax);
}

// The forward and its arg-max in one pass (roi_pool(..., return_argmax=True)).
template <typename T, bool NHWC>
__global__ void roi_pool_forward_argmax(const T* __restrict__ features, RAC_PROBLEM_PARAMS, T* __restrict__ out,
                                        rac::i64* __restrict__ argmax) {
    rac::roi_pool_forward_body<NHWC>(RAC_PROBLEM(T), features, out, argmax);
}

template <typename T, bool NHWC>
__global__ void roi_pool_backward_features_atomic(const T* __restrict__ grad_out, const rac::i64* __restrict__ argmax,
                                                  RAC_PROBLEM_PARAMS, RAC_A* grad_acc) {
    rac::roi_pool_backward_features_atomic_body<NHWC>(RAC_PROBLEM(T), grad_out, argmax, grad_acc);
}

template <typename T, bool NHWC>
__global__ void roi_pool_backward_features_gather(const T* __restrict__ grad_out, const rac::i64* __restrict__ argmax,
                                                  RAC_PROBLEM_PARAMS, int tile_h, int tile_w, int tiles_y,
                                                  int tiles_x, const rac::i64* __restrict__ tile_offsets,
                                                  const int* __restrict__ tile_boxes, T* __restrict__ grad_features) {
    rac::roi_pool_backward_features_gather_body<NHWC>(RAC_PROBLEM(T), grad_out, argmax, tile_h, tile_w, tiles_y,
                                                      tiles_x, tile_offsets, tile_boxes, grad_features);
}

template <typename T>
__global__ void roi_pool_footprint(RAC_PROBLEM_PARAMS, int tile_h, int tile_w, int* __restrict__ footprints) {
    rac::footprint_body<rac::IntegerBins<RAC_A, false> >(RAC_PROBLEM(T), tile_h, tile_w, footprints);
}

// ps_roi_pool -----------------------------------------------------------------------------------

#define RAC_GEOM rac::IntegerBins<RAC_A, true>

template <typename T, bool NHWC>
__global__ void ps_roi_pool_forward(const T* __restrict__ features, RAC_PROBLEM_PARAMS, T* __restrict__ out) {
    rac::ps_forward_body<NHWC, RAC_GEOM>(RAC_PROBLEM(T), features, out);
}

template <typename T, bool NHWC>
__global__ void ps_roi_pool_backward_features_atomic(const T* __restrict__ grad_out, RAC_PROBLEM_PARAMS,
                                                     RAC_A* grad_acc) {
    rac::ps_backward_features_atomic_body<NHWC, RAC_GEOM>(RAC_PROBLEM(T), grad_out, grad_acc);
}

template <typename T, bool NHWC>
__global__ void ps_roi_pool_backward_features_gather(const T* __restrict__ grad_out, RAC_PROBLEM_PARAMS, int tile_h,
                                                     int tile_w, int tiles_y, int tiles_x,
                                                     const rac::i64* __restrict__ tile_offsets,
                                                     const int* __restrict__ tile_boxes,
                                                     T* __restrict__ grad_features) {
    rac::ps_backward_features_gather_body<NHWC, RAC_GEOM>(RAC_PROBLEM(T), grad_out, tile_h, tile_w, tiles_y, tiles_x,
                                                          tile_offsets, tile_boxes, grad_features);
}

template <typename T>
__global__ void ps_roi_pool_footprint(RAC_PROBLEM_PARAMS, int tile_h, int tile_w, int* __restrict__ footprints) {
    rac::footprint_body<RAC_GEOM>(RAC_PROBLEM(T), tile_h, tile_w, footprints);
}

#undef RAC_GEOM

// ps_roi_align ----------------------------------------------------------------------------------

#define RAC_GEOM rac::AlignedBox<RAC_A>

template <typename T, bool NHWC>
__global__ void ps_roi_align_forward(const T* __restrict__ features, RAC_PROBLEM_PARAMS, T* __restrict__ out) {
    rac::ps_forward_body<NHWC, RAC_GEOM>(rac::always_aligned(RAC_PROBLEM(T)), features, out);
}

template <typename T, bool NHWC>
__global__ void ps_roi_align_backward_features_atomic(const T* __restrict__ grad_out, RAC_PROBLEM_PARAMS,
                                                      RAC_A* grad_acc) {
    rac::ps_backward_features_atomic_body<NHWC, RAC_GEOM>(rac::always_aligned(RAC_PROBLEM(T)), grad_out, grad_acc);
}

template <typename T, bool NHWC>
__global__ void ps_roi_align_backward_features_gather(const T* __restrict__ grad_out, RAC_PROBLEM_PARAMS, int tile_h,
                                                      int tile_w, int tiles_y, int tiles_x,
                                                      const rac::i64* __restrict__ tile_offsets,
                                                      const int* __restrict__ tile_boxes,
                                                      T* __restrict__ grad_features) {
    rac::ps_backward_features_gather_body<NHWC, RAC_GEOM>(rac::always_aligned(RAC_PROBLEM(T)), grad_out, tile_h,
                                                          tile_w, tiles_y, tiles_x, tile_offsets, tile_boxes,
                                                          grad_features);
}

template <typename T>
__global__ void ps_roi_align_footprint(RAC_PROBLEM_PARAMS, int tile_h, int tile_w, int* __restrict__ footprints) {
    rac::footprint_body<RAC_GEOM>(rac::always_aligned(RAC_PROBLEM(T)), tile_h, tile_w, footprints);
}

#undef RAC_GEOM
#undef RAC_A

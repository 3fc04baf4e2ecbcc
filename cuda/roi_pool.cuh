// Kernel bodies shared by the axis-aligned (roi_align.cu) and rotated (roi_align_rotated.cu)
// operators, written against the geometry interface of roi_geometry.cuh. The __global__ kernels
// of the two .cu files are one-line wrappers around these, named like the CPU kernels.
//
// Work decomposition (every loop is grid-stride, so any grid size gives the same result):
// - forward / argmax: one thread per output element (k, c, ph, pw);
// - feature gradient, atomic: one thread per grad_out element, scattering with atomicAdd (fast,
//   not bit-reproducible: float addition order follows the hardware's scheduling);
// - feature gradient, deterministic ("gather"): one thread per grad_features element (n, c, y, x)
//   owns it and sums the contributions of the boxes listed for its spatial tile, in increasing
//   box index, then of their samples in (row, column) order: no atomics, so every run and every
//   launch configuration gives the same bits. The tile lists are built by footprint_body,
//   roi_tiles_count and roi_tiles_fill (plus an exclusive scan on the host side's xp);
// - box gradient: one block per box; each thread sums a fixed, strided subset of the box's
//   outputs, then a shared-memory tree adds the partial sums in a fixed order. No atomics.
// The multi-level (FPN) kernels (``_levels``) do the same over a pyramid in one launch: box k
// reads and writes the arrays of its level (Levels), and the gather runs over every level's
// gradient elements laid end to end, with tile lists per level.
#ifndef ROIALIGN_CY_ROI_POOL_CUH
#define ROIALIGN_CY_ROI_POOL_CUH

#include "roi_geometry.cuh"

#define RAC_GRID_STRIDE(i, total)                                                  \
    for (rac::i64 i = blockIdx.x * (rac::i64)blockDim.x + threadIdx.x; i < (total); \
         i += (rac::i64)blockDim.x * gridDim.x)

namespace rac {

// Pool bin (ph, pw) of one channel (docs/conventions.md 1.7 and 3). For the max modes `arg` receives the winning
// sample iy * gw + ix (the first one on ties, the first NaN, like the CPU kernels), -1 for an empty grid.
template <int MODE, typename Geom, typename T>
__device__ __forceinline__ typename Geom::A pool_bin(const Geom& g, const Plane<const T>& f, int H, int W, int ph,
                                                     int pw, int& arg) {
    typedef typename Geom::A A;
    A acc = A(0);
    arg = -1;
    for (int iy = 0; iy < g.gh; ++iy) {
        for (int ix = 0; ix < g.gw; ++ix) {
            A y, x;
            g.point(ph, pw, iy, ix, y, x);
            const Sample<A> s = bilinear_sample(y, x, H, W);
            // a sample outside the image is 0 and reads nothing (docs/conventions.md 1.6)
            A val = A(0);
            if (s.valid()) {
                const Taps<A> v = read_taps(f, s);
                val = MODE == MODE_ONNX_MAX ? tap_max(s, v) : bilerp(s, v);
            }
            if (MODE == MODE_AVG) {
                acc += val;
            } else if (takes_max(val, acc, arg < 0)) {
                acc = val;
                arg = iy * g.gw + ix;
            }
        }
    }
    if (MODE == MODE_AVG && g.gh > 0 && g.gw > 0) acc *= g.inv_count();
    return acc;
}

// Output o = (k, c, ph, pw) of the problem (arg: its winning sample in the max modes).
template <int MODE, bool NHWC, typename Geom, typename T>
__device__ __forceinline__ typename Geom::A pool_output(const Problem<typename Geom::A>& pb, const T* __restrict__ features,
                                                        const Index4& o, int& arg) {
    const Geom g = Geom::make(pb, o.n);
    const Plane<const T> f = plane_of<NHWC>(features, pb.batch_idx[o.n], o.c, pb.C, pb.H, pb.W);
    return pool_bin<MODE>(g, f, pb.H, pb.W, o.y, o.x, arg);
}

// out (K, C, PH, PW) or (K, PH, PW, C); either output pointer may be null.
template <int MODE, bool NHWC, typename Geom, typename T>
__device__ void forward_body(const Problem<typename Geom::A>& pb, const T* __restrict__ features, T* __restrict__ out,
                             int* __restrict__ argmax) {
    typedef typename Geom::A A;
    const i64 total = (i64)pb.K * pb.C * pb.PH * pb.PW;
    RAC_GRID_STRIDE(i, total) {
        const Index4 o = split_index<NHWC>(i, pb.C, pb.PH, pb.PW);  // (k, c, ph, pw)
        int arg;
        const A v = pool_output<MODE, NHWC, Geom>(pb, features, o, arg);
        if (out) out[i] = from_acc<T>(v);
        if (argmax) argmax[i] = arg;
    }
}

// The levels of a feature pyramid: level l's arrays (maps, or gradients) start at address
// maps[l] and have heights[l] x widths[l] pixels at scale scales[l] (N and C are the problem's);
// box k lies on level levels[k].
struct Levels {
    const i64* maps;
    const int* heights;
    const int* widths;
    const double* scales;
    const i64* levels;
};

// The kernel parameters behind Levels (roialign_cy/_cuda.py passes them as one tuple).
#define RAC_LEVELS_PARAMS                                                                          \
    const rac::i64 *__restrict__ maps, const int *__restrict__ heights, const int *__restrict__ widths, \
        const double *__restrict__ scales, const rac::i64 *__restrict__ levels
#define RAC_LEVELS \
    rac::Levels { maps, heights, widths, scales, levels }

// The problem of level l: its H, W and spatial_scale in place of the problem's.
template <typename A>
__device__ __forceinline__ Problem<A> at_level(const Problem<A>& pb, const Levels& lv, i64 l) {
    Problem<A> level = pb;
    level.H = lv.heights[l];
    level.W = lv.widths[l];
    level.spatial_scale = lv.scales[l];
    return level;
}

// The forward (or the winning samples) of every box from its level, all levels in one launch
// (the multi-level forward of roialign_cy._multiscale): no per-level launch, gather or scatter of
// the output. Either output pointer may be null.
template <int MODE, bool NHWC, typename Geom, typename T>
__device__ void forward_levels_body(const Problem<typename Geom::A>& pb, const Levels& lv, T* __restrict__ out,
                                    int* __restrict__ argmax) {
    const i64 total = (i64)pb.K * pb.C * pb.PH * pb.PW;
    RAC_GRID_STRIDE(i, total) {
        const Index4 o = split_index<NHWC>(i, pb.C, pb.PH, pb.PW);
        const i64 l = lv.levels[o.n];
        int arg;
        const typename Geom::A v = pool_output<MODE, NHWC, Geom>(at_level(pb, lv, l), (const T*)lv.maps[l], o, arg);
        if (out) out[i] = from_acc<T>(v);
        if (argmax) argmax[i] = arg;
    }
}

// The samples of a bin that receive its gradient: all of them (avg), or the winner ``arg`` of the
// max modes.
struct SampleRange {
    int iy0, iy1, ix0, ix1;
};

template <int MODE, typename Geom>
__device__ __forceinline__ SampleRange samples_of(const Geom& g, int arg) {
    if (MODE == MODE_AVG) return SampleRange{0, g.gh, 0, g.gw};
    return SampleRange{arg / g.gw, arg / g.gw + 1, arg % g.gw, arg % g.gw + 1};
}

// Feature gradient by scatter: grad_acc (accumulator type, shaped like the features) += the
// contributions of every grad_out element. MODE_MAX reads the winning samples from argmax.
template <int MODE, bool NHWC, typename Geom>
__device__ __forceinline__ void scatter_output(const Problem<typename Geom::A>& pb, const Index4& o,
                                               typename Geom::A gv, int arg, typename Geom::A* grad_acc) {
    typedef typename Geom::A A;
    const Geom g = Geom::make(pb, o.n);
    if (g.gh <= 0 || g.gw <= 0) return;
    const Plane<A> gf = plane_of<NHWC>(grad_acc, pb.batch_idx[o.n], o.c, pb.C, pb.H, pb.W);
    const SampleRange sr = samples_of<MODE>(g, arg);
    if (MODE == MODE_AVG) gv *= g.inv_count();
    for (int iy = sr.iy0; iy < sr.iy1; ++iy) {
        for (int ix = sr.ix0; ix < sr.ix1; ++ix) {
            A y, x;
            g.point(o.y, o.x, iy, ix, y, x);
            const Sample<A> s = bilinear_sample(y, x, pb.H, pb.W);
            if (!s.valid()) continue;
            for (int t = 0; t < 4; ++t) atomicAdd(&gf(s.row(t), s.col(t)), gv * s.wy(t) * s.wx(t));
        }
    }
}

template <int MODE, bool NHWC, typename Geom, typename T>
__device__ void backward_features_atomic_body(const Problem<typename Geom::A>& pb, const T* __restrict__ grad_out,
                                              const int* __restrict__ argmax, typename Geom::A* grad_acc) {
    const i64 total = (i64)pb.K * pb.C * pb.PH * pb.PW;
    RAC_GRID_STRIDE(i, total) {
        const Index4 o = split_index<NHWC>(i, pb.C, pb.PH, pb.PW);
        scatter_output<MODE, NHWC, Geom>(pb, o, to_acc(grad_out[i]), MODE == MODE_AVG ? 0 : argmax[i], grad_acc);
    }
}

// The same over a pyramid: box k scatters into the accumulator of its level (lv.maps[levels[k]]).
template <int MODE, bool NHWC, typename Geom, typename T>
__device__ void backward_features_atomic_levels_body(const Problem<typename Geom::A>& pb, const Levels& lv,
                                                     const T* __restrict__ grad_out, const int* __restrict__ argmax) {
    typedef typename Geom::A A;
    const i64 total = (i64)pb.K * pb.C * pb.PH * pb.PW;
    RAC_GRID_STRIDE(i, total) {
        const Index4 o = split_index<NHWC>(i, pb.C, pb.PH, pb.PW);
        const i64 l = lv.levels[o.n];
        scatter_output<MODE, NHWC, Geom>(at_level(pb, lv, l), o, to_acc(grad_out[i]),
                                         MODE == MODE_AVG ? 0 : argmax[i], (A*)lv.maps[l]);
    }
}

// Feature gradient by gather (deterministic): grad_features[n, c, y, x] += the sum, over the boxes
// of tile_boxes[tile_offsets[t] : tile_offsets[t + 1]] (t: the tile of (n, y, x)) in that order,
// of the contributions of their samples that tap (y, x).
template <int MODE, bool NHWC, typename Geom, typename T>
__device__ __forceinline__ typename Geom::A gather_pixel(const Problem<typename Geom::A>& pb,
                                                         const T* __restrict__ grad_out,
                                                         const int* __restrict__ argmax, const Index4& p, i64 e0,
                                                         i64 e1, const int* __restrict__ tile_boxes) {
    typedef typename Geom::A A;
    A acc = A(0);
    for (i64 e = e0; e < e1; ++e) {
        const int k = tile_boxes[e];
        const Geom g = Geom::make(pb, k);
        Range r;
        if (!g.candidates(p.y, p.x, pb.H, pb.W, r)) continue;
        const Plane<const T> go = plane_of<NHWC>(grad_out, k, p.c, pb.C, pb.PH, pb.PW);
        if (MODE == MODE_AVG) {
            const A inv_count = g.inv_count();
            for (i64 j = r.j0; j <= r.j1; ++j) {
                const int ph = (int)(j / g.gh), iy = (int)(j % g.gh);
                for (i64 q = r.i0; q <= r.i1; ++q) {
                    const int pw = (int)(q / g.gw), ix = (int)(q % g.gw);
                    A y, x;
                    g.point(ph, pw, iy, ix, y, x);
                    const Sample<A> s = bilinear_sample(y, x, pb.H, pb.W);
                    if (s.valid() && touches(s, p.y, p.x))
                        acc += to_acc(go(ph, pw)) * inv_count * weight_at(s, p.y, p.x);
                }
            }
        } else {
            const Plane<const int> am = plane_of<NHWC>(argmax, k, p.c, pb.C, pb.PH, pb.PW);
            for (int ph = (int)(r.j0 / g.gh); ph <= (int)(r.j1 / g.gh); ++ph) {
                for (int pw = (int)(r.i0 / g.gw); pw <= (int)(r.i1 / g.gw); ++pw) {
                    const int a = am(ph, pw);
                    A y, x;
                    g.point(ph, pw, a / g.gw, a % g.gw, y, x);
                    const Sample<A> s = bilinear_sample(y, x, pb.H, pb.W);
                    if (s.valid() && touches(s, p.y, p.x)) acc += to_acc(go(ph, pw)) * weight_at(s, p.y, p.x);
                }
            }
        }
    }
    return acc;
}

template <int MODE, bool NHWC, typename Geom, typename T>
__device__ void backward_features_gather_body(const Problem<typename Geom::A>& pb, const T* __restrict__ grad_out,
                                              const int* __restrict__ argmax, int tile_h, int tile_w, int tiles_y,
                                              int tiles_x, const i64* __restrict__ tile_offsets,
                                              const int* __restrict__ tile_boxes, T* __restrict__ grad_features) {
    const i64 total = (i64)pb.N * pb.C * pb.H * pb.W;
    RAC_GRID_STRIDE(i, total) {
        const Index4 p = split_index<NHWC>(i, pb.C, pb.H, pb.W);  // (n, c, y, x)
        const i64 tile = (p.n * tiles_y + p.y / tile_h) * tiles_x + p.x / tile_w;
        grad_features[i] = from_acc<T>(to_acc(grad_features[i]) +
                                       gather_pixel<MODE, NHWC, Geom>(pb, grad_out, argmax, p, tile_offsets[tile],
                                                                      tile_offsets[tile + 1], tile_boxes));
    }
}

// The same over a pyramid, all levels in one launch: element i of the levels' gradients laid end
// to end (level l's from pixel_base[l]; lv.maps[l]: its address), its tile numbered from
// tile_base[l] among the levels' tiles (tiles_y[l] x tiles_x[l] per image), whose lists hold the
// boxes of level l only (roi_tiles_count_levels).
template <int MODE, bool NHWC, typename Geom, typename T>
__device__ void backward_features_gather_levels_body(const Problem<typename Geom::A>& pb, const Levels& lv,
                                                     const T* __restrict__ grad_out, const int* __restrict__ argmax,
                                                     i64 total, const i64* __restrict__ pixel_base, int tile_h,
                                                     int tile_w, const i64* __restrict__ tile_base,
                                                     const int* __restrict__ tiles_y, const int* __restrict__ tiles_x,
                                                     const i64* __restrict__ tile_offsets,
                                                     const int* __restrict__ tile_boxes) {
    RAC_GRID_STRIDE(i, total) {
        int l = 0;
        while (i >= pixel_base[l + 1]) ++l;  // a handful of levels; empty ones are skipped
        const i64 local = i - pixel_base[l];
        const Problem<typename Geom::A> level = at_level(pb, lv, l);
        const Index4 p = split_index<NHWC>(local, pb.C, level.H, level.W);
        const i64 tile = tile_base[l] + (p.n * tiles_y[l] + p.y / tile_h) * tiles_x[l] + p.x / tile_w;
        T* g = (T*)lv.maps[l];
        g[local] = from_acc<T>(to_acc(g[local]) + gather_pixel<MODE, NHWC, Geom>(level, grad_out, argmax, p,
                                                                                 tile_offsets[tile],
                                                                                 tile_offsets[tile + 1], tile_boxes));
    }
}

// Box gradient: grad_rois[k] += d(sum(grad_out * out)) / d(rois[k]), one block per box. Launch
// with blockDim.x == THREADS.
// With ``lv`` (a pyramid), box k reads the features of its level instead of ``features``.
template <int MODE, bool NHWC, typename Geom, typename T>
__device__ void backward_boxes_body(const Problem<typename Geom::A>& problem, const T* __restrict__ grad_out,
                                    const T* __restrict__ features, const int* __restrict__ argmax,
                                    typename Geom::A* __restrict__ grad_rois, const Levels* lv = nullptr) {
    typedef typename Geom::A A;
    __shared__ A partial[Geom::NSUMS][THREADS];
    const i64 per_box = (i64)problem.C * problem.PH * problem.PW;
    for (i64 k = blockIdx.x; k < problem.K; k += gridDim.x) {
        const Problem<A> pb = lv ? at_level(problem, *lv, lv->levels[k]) : problem;
        if (lv) features = (const T*)lv->maps[lv->levels[k]];
        const Geom g = Geom::make(pb, k);
        A sums[Geom::NSUMS];
        for (int q = 0; q < Geom::NSUMS; ++q) sums[q] = A(0);
        if (g.gh > 0 && g.gw > 0) {
            for (i64 e = threadIdx.x; e < per_box; e += blockDim.x) {
                const Index4 o = split_index<NHWC>(e, pb.C, pb.PH, pb.PW);  // (0, c, ph, pw)
                const Plane<const T> f = plane_of<NHWC>(features, pb.batch_idx[k], o.c, pb.C, pb.H, pb.W);
                A gv = to_acc(grad_out[k * per_box + e]);
                const SampleRange sr = samples_of<MODE>(g, MODE == MODE_AVG ? 0 : argmax[k * per_box + e]);
                if (MODE == MODE_AVG) gv *= g.inv_count();
                for (int iy = sr.iy0; iy < sr.iy1; ++iy) {
                    for (int ix = sr.ix0; ix < sr.ix1; ++ix) {
                        A y, x;
                        g.point(o.y, o.x, iy, ix, y, x);
                        const Sample<A> s = bilinear_sample(y, x, pb.H, pb.W);
                        if (!s.valid()) continue;
                        const Taps<A> v = read_taps(f, s);
                        g.accumulate(o.y, o.x, iy, ix, gv * dvalue_dy(s, v), gv * dvalue_dx(s, v), sums);
                    }
                }
            }
        }
        for (int q = 0; q < Geom::NSUMS; ++q) partial[q][threadIdx.x] = sums[q];
        __syncthreads();
        for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
            if (threadIdx.x < stride)
                for (int q = 0; q < Geom::NSUMS; ++q) partial[q][threadIdx.x] += partial[q][threadIdx.x + stride];
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            for (int q = 0; q < Geom::NSUMS; ++q) sums[q] = partial[q][0];
            g.finish(sums, grad_rois + k * Geom::COORDS);
        }
        __syncthreads();  // partial is rewritten by the next box
    }
}

// Tiles of pixels (tile_h x tile_w) that box k's samples may tap: fp = (first tile row, last tile
// row, first tile column, last tile column), an empty range (1, 0, 1, 0) when none.
template <typename Geom>
__device__ __forceinline__ void footprint_of(const Problem<typename Geom::A>& pb, i64 k, int tile_h, int tile_w,
                                             int* __restrict__ fp) {
    const Geom g = Geom::make(pb, k);
    Range r;
    if (g.footprint(pb.H, pb.W, r)) {
        fp[0] = (int)(r.j0 / tile_h);
        fp[1] = (int)(r.j1 / tile_h);
        fp[2] = (int)(r.i0 / tile_w);
        fp[3] = (int)(r.i1 / tile_w);
    } else {
        fp[0] = fp[2] = 1;
        fp[1] = fp[3] = 0;
    }
}

template <typename Geom>
__device__ void footprint_body(const Problem<typename Geom::A>& pb, int tile_h, int tile_w,
                               int* __restrict__ footprints) {
    RAC_GRID_STRIDE(k, (i64)pb.K) footprint_of<Geom>(pb, k, tile_h, tile_w, footprints + 4 * k);
}

// Box k's footprint on its level of a pyramid.
template <typename Geom>
__device__ void footprint_levels_body(const Problem<typename Geom::A>& pb, const Levels& lv, int tile_h, int tile_w,
                                      int* __restrict__ footprints) {
    RAC_GRID_STRIDE(k, (i64)pb.K) footprint_of<Geom>(at_level(pb, lv, lv.levels[k]), k, tile_h, tile_w, footprints + 4 * k);
}

__device__ __forceinline__ bool box_covers(const int* fp, int ty, int tx) {
    return fp[0] <= ty && ty <= fp[1] && fp[2] <= tx && tx <= fp[3];
}

}  // namespace rac

// counts[t] = number of boxes of image n whose footprint covers tile t = (n, ty, tx).
__global__ void roi_tiles_count(const int* __restrict__ footprints, const rac::i64* __restrict__ batch_idx, int K,
                                int N, int tiles_y, int tiles_x, rac::i64* __restrict__ counts) {
    RAC_GRID_STRIDE(t, (rac::i64)N * tiles_y * tiles_x) {
        const rac::i64 n = t / ((rac::i64)tiles_y * tiles_x);
        const int ty = (int)(t / tiles_x % tiles_y), tx = (int)(t % tiles_x);
        rac::i64 count = 0;
        for (int k = 0; k < K; ++k) count += batch_idx[k] == n && rac::box_covers(footprints + 4 * k, ty, tx);
        counts[t] = count;
    }
}

// boxes[offsets[t] : offsets[t + 1]] = those boxes, in increasing index: the order the gather
// sums them in, fixed whatever the launch.
__global__ void roi_tiles_fill(const int* __restrict__ footprints, const rac::i64* __restrict__ batch_idx, int K,
                               int N, int tiles_y, int tiles_x, const rac::i64* __restrict__ offsets,
                               int* __restrict__ boxes) {
    RAC_GRID_STRIDE(t, (rac::i64)N * tiles_y * tiles_x) {
        const rac::i64 n = t / ((rac::i64)tiles_y * tiles_x);
        const int ty = (int)(t / tiles_x % tiles_y), tx = (int)(t % tiles_x);
        rac::i64 e = offsets[t];
        for (int k = 0; k < K; ++k)
            if (batch_idx[k] == n && rac::box_covers(footprints + 4 * k, ty, tx)) boxes[e++] = k;
    }
}

namespace rac {
// Tile t of a pyramid's tiles laid end to end (level l's from tile_base[l], tiles_y[l] x
// tiles_x[l] per image): its level, image and tile row and column.
struct LevelTile {
    int l, ty, tx;
    i64 n;
};

__device__ __forceinline__ LevelTile level_tile(i64 t, const i64* tile_base, const int* tiles_y,
                                                const int* tiles_x) {
    LevelTile r;
    r.l = 0;
    while (t >= tile_base[r.l + 1]) ++r.l;
    const i64 local = t - tile_base[r.l];
    r.n = local / ((i64)tiles_y[r.l] * tiles_x[r.l]);
    r.ty = (int)(local / tiles_x[r.l] % tiles_y[r.l]);
    r.tx = (int)(local % tiles_x[r.l]);
    return r;
}
}  // namespace rac

// The tile lists of a pyramid (n_tiles tiles over all levels): the boxes of tile t's level and
// image whose footprint on that level covers it.
__global__ void roi_tiles_count_levels(const int* __restrict__ footprints, const rac::i64* __restrict__ batch_idx,
                                       const rac::i64* __restrict__ levels, int K, rac::i64 n_tiles,
                                       const rac::i64* __restrict__ tile_base, const int* __restrict__ tiles_y,
                                       const int* __restrict__ tiles_x, rac::i64* __restrict__ counts) {
    RAC_GRID_STRIDE(t, n_tiles) {
        const rac::LevelTile lt = rac::level_tile(t, tile_base, tiles_y, tiles_x);
        rac::i64 count = 0;
        for (int k = 0; k < K; ++k)
            count += levels[k] == lt.l && batch_idx[k] == lt.n && rac::box_covers(footprints + 4 * k, lt.ty, lt.tx);
        counts[t] = count;
    }
}

__global__ void roi_tiles_fill_levels(const int* __restrict__ footprints, const rac::i64* __restrict__ batch_idx,
                                      const rac::i64* __restrict__ levels, int K, rac::i64 n_tiles,
                                      const rac::i64* __restrict__ tile_base, const int* __restrict__ tiles_y,
                                      const int* __restrict__ tiles_x, const rac::i64* __restrict__ offsets,
                                      int* __restrict__ boxes) {
    RAC_GRID_STRIDE(t, n_tiles) {
        const rac::LevelTile lt = rac::level_tile(t, tile_base, tiles_y, tiles_x);
        rac::i64 e = offsets[t];
        for (int k = 0; k < K; ++k)
            if (levels[k] == lt.l && batch_idx[k] == lt.n && rac::box_covers(footprints + 4 * k, lt.ty, lt.tx))
                boxes[e++] = k;
    }
}

#endif  // ROIALIGN_CY_ROI_POOL_CUH

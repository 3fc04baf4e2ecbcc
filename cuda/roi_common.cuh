// Scalar types, indexing and the bilinear sample shared by every roialign_cy CUDA kernel.
//
// The sources are compiled at run time by NVRTC (cupy.RawModule), so they include no host
// standard header; cuda_fp16.h is the only include and NVRTC/CuPy provide it. They also compile
// as plain C++ under the host emulation of tests/cuda_host, which is why device code uses the C
// math functions (floorf / floor, ...) through the overloads below and no warp intrinsics.
#ifndef ROIALIGN_CY_ROI_COMMON_CUH
#define ROIALIGN_CY_ROI_COMMON_CUH

#include <cuda_fp16.h>

namespace rac {

typedef long long i64;

enum { MODE_AVG = 0, MODE_MAX = 1, MODE_ONNX_MAX = 2 };

// Threads per block of the grid-stride kernels and of the one-block-per-box box gradient (a power
// of two: the box gradient reduces with a tree). roialign_cy/_cuda.py launches with these.
enum { THREADS = 256 };

// Accumulator type: half features are pooled and reduced in float (their boxes are float too).
template <typename T> struct Acc { typedef T type; };
template <> struct Acc<__half> { typedef float type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float floor_(float v) { return floorf(v); }
__device__ __forceinline__ double floor_(double v) { return floor(v); }
__device__ __forceinline__ float ceil_(float v) { return ceilf(v); }
__device__ __forceinline__ double ceil_(double v) { return ceil(v); }
// C's round: halves go away from zero (RoIPool's corners, docs/conventions.md 8.1)
__device__ __forceinline__ float round_(float v) { return roundf(v); }
__device__ __forceinline__ double round_(double v) { return round(v); }
__device__ __forceinline__ float abs_(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_(double v) { return fabs(v); }
__device__ __forceinline__ float sin_(float v) { return sinf(v); }
__device__ __forceinline__ double sin_(double v) { return sin(v); }
__device__ __forceinline__ float cos_(float v) { return cosf(v); }
__device__ __forceinline__ double cos_(double v) { return cos(v); }

template <typename A> struct Eps;
template <> struct Eps<float> { static __device__ __forceinline__ float value() { return 1.1920929e-7f; } };
template <> struct Eps<double> { static __device__ __forceinline__ double value() { return 2.220446049250313e-16; } };

template <typename A> __device__ __forceinline__ A min_(A a, A b) { return b < a ? b : a; }
template <typename A> __device__ __forceinline__ A max_(A a, A b) { return a < b ? b : a; }
template <typename A> __device__ __forceinline__ bool finite_(A v) { return v - v == A(0); }

// floor(v) clamped to [lo, hi] before the conversion, so that huge or infinite v stay defined.
template <typename A> __device__ __forceinline__ i64 floor_clamped(A v, i64 lo, i64 hi) {
    if (!(v > A(lo))) return lo;  // NaN included
    if (!(v < A(hi))) return hi;
    return (i64)floor_(v);
}

// Element (y, x) of one image plane: NCHW planes have unit column stride, NHWC ones stride C.
template <typename T> struct Plane {
    T* base;
    i64 col;  // distance between horizontally adjacent pixels
    i64 row;  // distance between vertically adjacent pixels
    __device__ __forceinline__ T& operator()(int y, int x) const { return base[y * row + x * col]; }
};

// Plane (n, c) of an (N, C, H, W) or (N, H, W, C) array.
template <bool NHWC, typename T>
__device__ __forceinline__ Plane<T> plane_of(T* data, i64 n, int c, int C, int H, int W) {
    Plane<T> p;
    if (NHWC) {
        p.base = data + n * H * W * C + c;
        p.col = C;
    } else {
        p.base = data + (n * C + c) * H * W;
        p.col = 1;
    }
    p.row = W * p.col;
    return p;
}

// Position of linear element i of an (N, C, H, W) array, or of an (N, H, W, C) one.
struct Index4 {
    i64 n;
    int c, y, x;
};

template <bool NHWC> __device__ __forceinline__ Index4 split_index(i64 i, int C, int H, int W) {
    Index4 r;
    if (NHWC) {
        r.c = (int)(i % C); i /= C;
        r.x = (int)(i % W); i /= W;
        r.y = (int)(i % H);
        r.n = i / H;
    } else {
        r.x = (int)(i % W); i /= W;
        r.y = (int)(i % H); i /= H;
        r.c = (int)(i % C);
        r.n = i / C;
    }
    return r;
}

// One axis of a bilinear sample (docs/conventions.md 1.6): coordinate c on an axis of `size` pixels. Sets the two
// taps and their weights, and `slope` = d(w_hi)/dc, 0 where the coordinate is clamped (at or below
// 0, at or beyond size - 1). Outside [-1, size] (NaN included) the sample is invalid: weights 0,
// taps at pixel 0, which callers must not read: 0 * NaN is NaN, so a NaN at pixel 0 would reach
// every box outside the image. Same rules as the CPU kernels' bilinear_axis.
template <typename A> struct Axis {
    int lo, hi;
    A w_lo, w_hi, slope;
    bool valid;
};

template <typename A> __device__ __forceinline__ Axis<A> bilinear_axis(A c, int size) {
    Axis<A> a;
    if (!(c >= A(-1) && c <= A(size))) {
        a.lo = a.hi = 0;
        a.w_lo = a.w_hi = a.slope = A(0);
        a.valid = false;
        return a;
    }
    a.valid = true;
    a.slope = A(1);
    if (c <= A(0)) {
        c = A(0);
        a.slope = A(0);
    }
    int l = (int)c;
    if (l >= size - 1) {
        a.lo = a.hi = size - 1;
        a.w_lo = A(1);
        a.w_hi = A(0);
        a.slope = A(0);
        return a;
    }
    A f = c - A(l);
    a.lo = l;
    a.hi = l + 1;
    a.w_lo = A(1) - f;
    a.w_hi = f;
    return a;
}

// The four taps of a sample at (y, x): tap t reads row (t < 2 ? ay.lo : ay.hi) and column
// (t % 2 ? ax.hi : ax.lo) with weight wy * wx.
template <typename A> struct Sample {
    Axis<A> ay, ax;
    __device__ __forceinline__ bool valid() const { return ay.valid && ax.valid; }
    __device__ __forceinline__ int row(int t) const { return t < 2 ? ay.lo : ay.hi; }
    __device__ __forceinline__ int col(int t) const { return (t & 1) ? ax.hi : ax.lo; }
    __device__ __forceinline__ A wy(int t) const { return t < 2 ? ay.w_lo : ay.w_hi; }
    __device__ __forceinline__ A wx(int t) const { return (t & 1) ? ax.w_hi : ax.w_lo; }
};

template <typename A> __device__ __forceinline__ Sample<A> bilinear_sample(A y, A x, int H, int W) {
    Sample<A> s;
    s.ay = bilinear_axis(y, H);
    s.ax = bilinear_axis(x, W);
    return s;
}

// The four tap values of a valid sample on a plane.
template <typename A> struct Taps {
    A v00, v01, v10, v11;
};

template <typename T, typename A>
__device__ __forceinline__ Taps<A> read_taps(const Plane<const T>& f, const Sample<A>& s) {
    Taps<A> v;
    v.v00 = to_acc(f(s.ay.lo, s.ax.lo));
    v.v01 = to_acc(f(s.ay.lo, s.ax.hi));
    v.v10 = to_acc(f(s.ay.hi, s.ax.lo));
    v.v11 = to_acc(f(s.ay.hi, s.ax.hi));
    return v;
}

// Bilinear value, in the operand order of the CPU kernels' bilerp.
template <typename A> __device__ __forceinline__ A bilerp(const Sample<A>& s, const Taps<A>& v) {
    return s.ay.w_lo * (s.ax.w_lo * v.v00 + s.ax.w_hi * v.v01) +
           s.ay.w_hi * (s.ax.w_lo * v.v10 + s.ax.w_hi * v.v11);
}

// Max pooling's update rule (docs/conventions.md 3, numpy.max's): v replaces best when it is the
// first sample, larger, or a NaN replacing a number; so the first of equal maxima, and the first
// NaN, stay. The CPU kernels' takes_max.
template <typename A> __device__ __forceinline__ bool takes_max(A v, A best, bool first) {
    return first || v > best || (v != v && best == best);
}

// onnxruntime's max mode (docs/conventions.md 3): the largest weighted tap, not the sum of the
// taps; a NaN tap propagates, as in mode "max".
template <typename A> __device__ __forceinline__ A tap_max(const Sample<A>& s, const Taps<A>& v) {
    A m = s.ay.w_lo * s.ax.w_lo * v.v00;
    A t = s.ay.w_lo * s.ax.w_hi * v.v01;
    if (takes_max(t, m, false)) m = t;
    t = s.ay.w_hi * s.ax.w_lo * v.v10;
    if (takes_max(t, m, false)) m = t;
    t = s.ay.w_hi * s.ax.w_hi * v.v11;
    if (takes_max(t, m, false)) m = t;
    return m;
}

// d(value)/dy and d(value)/dx of a sample, 0 along a clamped axis (docs/conventions.md 5).
template <typename A> __device__ __forceinline__ A dvalue_dy(const Sample<A>& s, const Taps<A>& v) {
    return s.ay.slope * ((s.ax.w_lo * v.v10 + s.ax.w_hi * v.v11) - (s.ax.w_lo * v.v00 + s.ax.w_hi * v.v01));
}

template <typename A> __device__ __forceinline__ A dvalue_dx(const Sample<A>& s, const Taps<A>& v) {
    return s.ax.slope * (s.ay.w_lo * (v.v01 - v.v00) + s.ay.w_hi * (v.v11 - v.v10));
}

// Sum of the weights of the taps of `s` that fall on pixel (y, x): the share of the sample's
// gradient that pixel receives. Clamped samples have coinciding taps, whose weights add up, as
// they do when the four taps are scattered one by one.
template <typename A> __device__ __forceinline__ A weight_at(const Sample<A>& s, int y, int x) {
    A wy = (s.ay.lo == y ? s.ay.w_lo : A(0)) + (s.ay.hi == y ? s.ay.w_hi : A(0));
    A wx = (s.ax.lo == x ? s.ax.w_lo : A(0)) + (s.ax.hi == x ? s.ax.w_hi : A(0));
    return wy * wx;
}

template <typename A> __device__ __forceinline__ bool touches(const Sample<A>& s, int y, int x) {
    return (s.ay.lo == y || s.ay.hi == y) && (s.ax.lo == x || s.ax.hi == x);
}

}  // namespace rac

#endif  // ROIALIGN_CY_ROI_COMMON_CUH

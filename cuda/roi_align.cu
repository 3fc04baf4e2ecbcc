// Axis-aligned RoIAlign kernels: forward (avg, max, onnx_max), gradient with respect to the
// features (deterministic gather, or atomic scatter) and to the boxes. The GPU twin of
// roialign_cy/_cpu/_roi_align.pyx; the loops live in roi_pool.cuh, shared with the rotated
// operator, and the box geometry in roi_geometry.cuh (AlignedBox).
//
// Templates: T = __half, float or double (rois and accumulation in float for __half); MODE =
// rac::MODE_AVG / MODE_MAX / MODE_ONNX_MAX (gradients: avg and max); NHWC = channels-last layout.
// roialign_cy/_cuda.py instantiates them through NVRTC name expressions.
#include "roi_pool.cuh"

#define RAC_GEOM rac::AlignedBox<typename rac::Acc<T>::type>

template <typename T, int MODE, bool NHWC>
__global__ void roi_align_forward(const T* __restrict__ features, RAC_PROBLEM_PARAMS, T* __restrict__ out) {
    rac::forward_body<MODE, NHWC, RAC_GEOM>(RAC_PROBLEM(T), features, out, (int*)0);
}

// Multi-level (FPN): box k from level levels[k] (rac::Levels: maps holds each level's features,
// or gradients); the problem's H, W and spatial_scale are unused, each level's are read from
// heights, widths and scales.
template <typename T, int MODE, bool NHWC>
__global__ void roi_align_forward_levels(RAC_LEVELS_PARAMS, RAC_PROBLEM_PARAMS, T* __restrict__ out) {
    rac::forward_levels_body<MODE, NHWC, RAC_GEOM>(RAC_PROBLEM(T), RAC_LEVELS, out, (int*)0);
}

template <typename T, int MODE, bool NHWC>
__global__ void roi_align_argmax_levels(RAC_LEVELS_PARAMS, RAC_PROBLEM_PARAMS, int* __restrict__ argmax) {
    rac::forward_levels_body<MODE, NHWC, RAC_GEOM>(RAC_PROBLEM(T), RAC_LEVELS, (T*)0, argmax);
}

template <typename T, int MODE, bool NHWC>
__global__ void roi_align_backward_features_atomic_levels(const T* __restrict__ grad_out,
                                                          const int* __restrict__ argmax, RAC_LEVELS_PARAMS,
                                                          RAC_PROBLEM_PARAMS) {
    rac::backward_features_atomic_levels_body<MODE, NHWC, RAC_GEOM>(RAC_PROBLEM(T), RAC_LEVELS, grad_out, argmax);
}

template <typename T, int MODE, bool NHWC>
__global__ void roi_align_backward_features_gather_levels(
    const T* __restrict__ grad_out, const int* __restrict__ argmax, RAC_LEVELS_PARAMS, RAC_PROBLEM_PARAMS,
    rac::i64 total, const rac::i64* __restrict__ pixel_base, int tile_h, int tile_w,
    const rac::i64* __restrict__ tile_base, const int* __restrict__ tiles_y, const int* __restrict__ tiles_x,
    const rac::i64* __restrict__ tile_offsets, const int* __restrict__ tile_boxes) {
    rac::backward_features_gather_levels_body<MODE, NHWC, RAC_GEOM>(RAC_PROBLEM(T), RAC_LEVELS, grad_out, argmax,
                                                                    total, pixel_base, tile_h, tile_w, tile_base,
                                                                    tiles_y, tiles_x, tile_offsets, tile_boxes);
}

template <typename T, int MODE, bool NHWC>
__global__ void roi_align_backward_boxes_levels(const T* __restrict__ grad_out, const int* __restrict__ argmax,
                                                RAC_LEVELS_PARAMS, RAC_PROBLEM_PARAMS,
                                                typename rac::Acc<T>::type* __restrict__ grad_rois) {
    const rac::Levels lv = RAC_LEVELS;
    rac::backward_boxes_body<MODE, NHWC, RAC_GEOM>(RAC_PROBLEM(T), grad_out, (const T*)0, argmax, grad_rois, &lv);
}

template <typename T>
__global__ void roi_align_footprint_levels(RAC_LEVELS_PARAMS, RAC_PROBLEM_PARAMS, int tile_h, int tile_w,
                                           int* __restrict__ footprints) {
    rac::footprint_levels_body<RAC_GEOM>(RAC_PROBLEM(T), RAC_LEVELS, tile_h, tile_w, footprints);
}

// The winning sample of every output of the max modes, for the gradients.
template <typename T, int MODE, bool NHWC>
__global__ void roi_align_argmax(const T* __restrict__ features, RAC_PROBLEM_PARAMS, int* __restrict__ argmax) {
    rac::forward_body<MODE, NHWC, RAC_GEOM>(RAC_PROBLEM(T), features, (T*)0, argmax);
}

template <typename T, int MODE, bool NHWC>
__global__ void roi_align_backward_features_atomic(const T* __restrict__ grad_out, const int* __restrict__ argmax,
                                                   RAC_PROBLEM_PARAMS, typename rac::Acc<T>::type* grad_acc) {
    rac::backward_features_atomic_body<MODE, NHWC, RAC_GEOM>(RAC_PROBLEM(T), grad_out, argmax, grad_acc);
}

template <typename T, int MODE, bool NHWC>
__global__ void roi_align_backward_features_gather(const T* __restrict__ grad_out, const int* __restrict__ argmax,
                                                   RAC_PROBLEM_PARAMS, int tile_h, int tile_w, int tiles_y,
                                                   int tiles_x, const rac::i64* __restrict__ tile_offsets,
                                                   const int* __restrict__ tile_boxes,
                                                   T* __restrict__ grad_features) {
    rac::backward_features_gather_body<MODE, NHWC, RAC_GEOM>(RAC_PROBLEM(T), grad_out, argmax, tile_h, tile_w,
                                                             tiles_y, tiles_x, tile_offsets, tile_boxes,
                                                             grad_features);
}

template <typename T, int MODE, bool NHWC>
__global__ void roi_align_backward_boxes(const T* __restrict__ grad_out, const T* __restrict__ features,
                                         const int* __restrict__ argmax, RAC_PROBLEM_PARAMS,
                                         typename rac::Acc<T>::type* __restrict__ grad_rois) {
    rac::backward_boxes_body<MODE, NHWC, RAC_GEOM>(RAC_PROBLEM(T), grad_out, features, argmax, grad_rois);
}

template <typename T>
__global__ void roi_align_footprint(RAC_PROBLEM_PARAMS, int tile_h, int tile_w, int* __restrict__ footprints) {
    rac::footprint_body<RAC_GEOM>(RAC_PROBLEM(T), tile_h, tile_w, footprints);
}

#undef RAC_GEOM

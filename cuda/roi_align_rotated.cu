// Rotated RoIAlign kernels (average mode): forward, gradient with respect to the features
// (deterministic gather, or atomic scatter) and to the boxes (cx, cy, w, h, angle). The GPU twin
// of roialign_cy/_cpu/_roi_align_rotated.pyx; the loops live in roi_pool.cuh, shared with the
// axis-aligned operator, and the box geometry in roi_geometry.cuh (RotatedBox).
//
// Templates: T = __half, float or double (rois and accumulation in float for __half); NHWC =
// channels-last layout. roialign_cy/_cuda.py instantiates them through NVRTC name expressions.
#include "roi_pool.cuh"

#define RAC_GEOM rac::RotatedBox<typename rac::Acc<T>::type>

template <typename T, bool NHWC>
__global__ void roi_align_rotated_forward(const T* __restrict__ features, RAC_PROBLEM_PARAMS, T* __restrict__ out) {
    rac::forward_body<rac::MODE_AVG, NHWC, RAC_GEOM>(RAC_PROBLEM(T), features, out, (int*)0);
}

template <typename T, bool NHWC>
__global__ void roi_align_rotated_backward_features_atomic(const T* __restrict__ grad_out, RAC_PROBLEM_PARAMS,
                                                           typename rac::Acc<T>::type* grad_acc) {
    rac::backward_features_atomic_body<rac::MODE_AVG, NHWC, RAC_GEOM>(RAC_PROBLEM(T), grad_out, (const int*)0,
                                                                       grad_acc);
}

template <typename T, bool NHWC>
__global__ void roi_align_rotated_backward_features_gather(const T* __restrict__ grad_out, RAC_PROBLEM_PARAMS,
                                                           int tile_h, int tile_w, int tiles_y, int tiles_x,
                                                           const rac::i64* __restrict__ tile_offsets,
                                                           const int* __restrict__ tile_boxes,
                                                           T* __restrict__ grad_features) {
    rac::backward_features_gather_body<rac::MODE_AVG, NHWC, RAC_GEOM>(RAC_PROBLEM(T), grad_out, (const int*)0,
                                                                       tile_h, tile_w, tiles_y, tiles_x,
                                                                       tile_offsets, tile_boxes, grad_features);
}

template <typename T, bool NHWC>
__global__ void roi_align_rotated_backward_boxes(const T* __restrict__ grad_out, const T* __restrict__ features,
                                                 RAC_PROBLEM_PARAMS,
                                                 typename rac::Acc<T>::type* __restrict__ grad_rois) {
    rac::backward_boxes_body<rac::MODE_AVG, NHWC, RAC_GEOM>(RAC_PROBLEM(T), grad_out, features, (const int*)0,
                                                             grad_rois);
}

template <typename T>
__global__ void roi_align_rotated_footprint(RAC_PROBLEM_PARAMS, int tile_h, int tile_w, int* __restrict__ footprints) {
    rac::footprint_body<RAC_GEOM>(RAC_PROBLEM(T), tile_h, tile_w, footprints);
}

#undef RAC_GEOM

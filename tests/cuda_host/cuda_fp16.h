// Host stand-in for CUDA's cuda_fp16.h under the emulation: a 2-byte IEEE half (GCC's _Float16),
// so numpy float16 buffers are read and written as they are on the device. Conversions round to
// nearest even, like __float2half.
#ifndef ROIALIGN_CY_HOST_FP16_H
#define ROIALIGN_CY_HOST_FP16_H

struct __half {
    _Float16 value;
};

inline float __half2float(__half h) { return (float)h.value; }
inline __half __float2half(float f) { return __half{(_Float16)f}; }

#endif

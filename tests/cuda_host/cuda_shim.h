// Force-included (g++ -include) before the kernel sources of cuda/ so that they compile as plain
// C++ for the host emulation: CUDA keywords become ordinary C++, the thread-index built-ins are
// globals set by the scheduler of emu_runtime.h, which runs each CUDA thread as a fiber.
#ifndef ROIALIGN_CY_CUDA_SHIM_H
#define ROIALIGN_CY_CUDA_SHIM_H

#include <math.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Blocks run one after another, so one static copy per variable is exactly block-shared storage.
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

extern dim3 threadIdx, blockIdx, blockDim, gridDim;

// Switches to the next fiber; the scheduler resumes the block once every thread has arrived.
void __syncthreads();

// Fibers never interleave inside an expression: a plain add is atomic here.
template <typename T> inline T atomicAdd(T* address, T value) {
    T old = *address;
    *address = old + value;
    return old;
}

#endif

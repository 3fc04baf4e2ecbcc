// Host emulation of a CUDA grid launch: each CUDA thread of a block runs as a ucontext fiber on
// one OS thread; __syncthreads() switches back to the scheduler, which resumes the block's
// threads only once all of them have arrived (and reports a barrier that some thread skipped).
// Blocks run one after another. With a non-zero seed the order of the blocks, and of the threads
// in each round between barriers, is shuffled: results of code whose outputs each have one owner
// do not depend on it.
//
// emu::launch checks the arguments against the kernel's parameter types (type codes "f4", "i8",
// "pf2" = pointer to half, ...) before running it, as a device launch would not.
#ifndef ROIALIGN_CY_EMU_RUNTIME_H
#define ROIALIGN_CY_EMU_RUNTIME_H

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_fp16.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

enum { OK = 0, ERR_ARGS = 1, ERR_BARRIER = 2, ERR_UNKNOWN = 3 };

inline std::string& last_error() {
    static std::string message;
    return message;
}

template <typename T> struct Code;
template <> struct Code<int> { static std::string get() { return "i4"; } };
template <> struct Code<long long> { static std::string get() { return "i8"; } };
template <> struct Code<float> { static std::string get() { return "f4"; } };
template <> struct Code<double> { static std::string get() { return "f8"; } };
template <> struct Code<__half> { static std::string get() { return "f2"; } };
template <typename T> struct Code<T*> {
    static std::string get() { return "p" + Code<typename std::remove_cv<T>::type>::get(); }
};

struct Fiber {
    ucontext_t context;
    dim3 index;
    bool done, at_barrier;
};

inline ucontext_t& scheduler() {
    static ucontext_t context;
    return context;
}
inline Fiber*& current() {
    static Fiber* fiber = nullptr;
    return fiber;
}
inline std::function<void()>& body() {
    static std::function<void()> f;
    return f;
}

inline void fiber_main() {
    body()();
    current()->done = true;  // returning resumes uc_link, the scheduler
}

constexpr size_t STACK_BYTES = 256 * 1024;

inline int run_grid(dim3 grid, dim3 block, unsigned seed) {
    gridDim = grid;
    blockDim = block;
    const unsigned n_threads = block.x * block.y * block.z;
    const unsigned long long n_blocks = (unsigned long long)grid.x * grid.y * grid.z;
    static std::vector<std::vector<char>> stacks;
    if (stacks.size() < n_threads) stacks.resize(n_threads, std::vector<char>(STACK_BYTES));
    std::vector<Fiber> fibers(n_threads);
    std::vector<unsigned long long> block_order(n_blocks);
    std::iota(block_order.begin(), block_order.end(), 0ULL);
    std::vector<unsigned> thread_order(n_threads);
    std::iota(thread_order.begin(), thread_order.end(), 0U);
    std::mt19937 rng(seed);
    if (seed) std::shuffle(block_order.begin(), block_order.end(), rng);
    for (unsigned long long b : block_order) {
        blockIdx = dim3((unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / grid.x / grid.y));
        for (unsigned t = 0; t < n_threads; ++t) {
            Fiber& f = fibers[t];
            f.index = dim3(t % block.x, t / block.x % block.y, t / block.x / block.y);
            f.done = f.at_barrier = false;
            getcontext(&f.context);
            f.context.uc_stack.ss_sp = stacks[t].data();
            f.context.uc_stack.ss_size = STACK_BYTES;
            f.context.uc_link = &scheduler();
            makecontext(&f.context, fiber_main, 0);
        }
        for (;;) {
            if (seed) std::shuffle(thread_order.begin(), thread_order.end(), rng);
            unsigned finished = 0, waiting = 0;
            for (unsigned t : thread_order) {
                Fiber& f = fibers[t];
                if (!f.done) {
                    f.at_barrier = false;
                    threadIdx = f.index;
                    current() = &f;
                    swapcontext(&scheduler(), &f.context);
                }
                finished += f.done;
                waiting += f.at_barrier;
            }
            if (finished == n_threads) break;
            if (finished + waiting != n_threads || finished) {
                last_error() = "__syncthreads() not reached by every thread of a block";
                return ERR_BARRIER;
            }
        }
    }
    return OK;
}

template <typename... P, size_t... I>
inline void invoke(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<typename std::remove_reference<P>::type*>(args[I])...);
}

template <typename... P>
inline int launch(const char* name, void (*kernel)(P...), const unsigned* dims, void** args, const char** codes,
                  int n_args, unsigned seed) {
    const std::string expected[] = {Code<P>::get()..., ""};
    if (n_args != (int)sizeof...(P)) {
        last_error() = std::string(name) + ": " + std::to_string(n_args) + " arguments given, " +
                       std::to_string(sizeof...(P)) + " expected";
        return ERR_ARGS;
    }
    for (int i = 0; i < n_args; ++i) {
        if (expected[i] != codes[i]) {
            last_error() = std::string(name) + ": argument " + std::to_string(i) + " is " + codes[i] +
                           ", the kernel takes " + expected[i];
            return ERR_ARGS;
        }
    }
    body() = [&]() { invoke(kernel, args, std::index_sequence_for<P...>{}); };
    return run_grid(dim3(dims[0], dims[1], dims[2]), dim3(dims[3], dims[4], dims[5]), seed);
}

}  // namespace emu

void __syncthreads() {
    emu::current()->at_barrier = true;
    swapcontext(&emu::current()->context, &emu::scheduler());
}

extern "C" const char* emu_last_error() { return emu::last_error().c_str(); }

#endif

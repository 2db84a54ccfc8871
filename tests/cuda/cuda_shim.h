// cuda_shim.h: enough of CUDA to compile an unchanged kernel source as ordinary C++ and run it on a CPU.
//
// The GPU model, and how this file imitates it:
//   a kernel launch   = a grid of blocks        -> the blocks run one after another (cuda_launcher.h)
//   a block           = blockDim threads        -> one real thread (pthread) per CUDA thread, reused for
//                                                  every block of the launch
//   threadIdx, ...    = per-thread registers    -> thread_local variables, set before the kernel starts
//   __shared__ array  = one copy per block      -> a function-static array: one block runs at a time
//   dynamic shared    = shared_mem bytes        -> one malloc'd buffer exactly that long, filled with NaN
//                                                  before each block, so reading what nobody wrote shows up
//   __syncthreads()   = block-wide barrier      -> a real barrier across the block's threads
//   warp shuffles     = registers across a warp -> the 32 lanes write their values into the warp's slots,
//                                                  meet at a barrier, then read their source lane's slot
//   atomicAdd         = atomic add in memory    -> a compare-and-swap loop
//
// Because every CUDA thread is a real thread and every barrier a real barrier, ThreadSanitizer sees exactly
// the synchronisation the kernel asks for: a missing __syncthreads is a data race it reports.
// Not modelled: speed (coalescing, bank conflicts, divergence), and races *between* blocks (blocks never
// overlap here; kernels must not write the same place from two blocks except with atomicAdd).
//
// Only C headers, so that g++ compiles a kernel in about a second.
#pragma once

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// ---------------------------------------------------------------------------------------------------
// Qualifiers: on a CPU every function is a host function and every pointer points into one memory.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static  // one block at a time, so a function-static array is that block's shared memory
// __restrict__ is a g++ keyword already; `#pragma unroll` is an unknown pragma that g++ ignores.

// ---------------------------------------------------------------------------------------------------
// Barriers, and errors found while a kernel runs (a barrier some thread never reaches, a partial shuffle
// mask). The first error is kept; the launch returns it and Python raises it.

namespace shim {
inline pthread_mutex_t error_mutex = PTHREAD_MUTEX_INITIALIZER;
inline char first_error[512];

inline void fail(const char* what, const char* message) {
    pthread_mutex_lock(&error_mutex);
    if (first_error[0] == '\0') snprintf(first_error, sizeof first_error, "%s: %s", what, message);
    pthread_mutex_unlock(&error_mutex);
}

// A reusable barrier for `count` threads. A thread that returns from the kernel "leaves" it: if the
// others then wait for that thread, a GPU would hang; here the barrier breaks and reports it instead.
struct Barrier {
    pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t released = PTHREAD_COND_INITIALIZER;
    int count = 0, arrived = 0, left = 0;
    long generation = 0;    // how many times the barrier has opened
    bool broken = false;    // once broken, every wait returns at once so that the launch can end
    int timeout_s = 60;     // a wait this long means a thread never arrives (0: wait for ever)
    const char* name = "";  // what the kernel called, for error messages
};

inline void reset(Barrier& b, int count) {  // between blocks, while no thread uses it
    b.count = count;
    b.arrived = b.left = 0;
    b.broken = false;
}

inline void break_barrier(Barrier& b, const char* message) {
    fail(b.name, message);
    b.broken = true;
    pthread_cond_broadcast(&b.released);
}

inline void check_for_deadlock(Barrier& b) {
    if (b.arrived > 0 && b.arrived + b.left == b.count) {
        break_barrier(b, "a thread returned from the kernel while others wait here; on a GPU this "
                         "hangs (every thread of the block, or lane of the warp, must arrive)");
    }
}

inline void barrier_wait(Barrier& b) {
    pthread_mutex_lock(&b.mutex);
    long generation = b.generation;
    if (++b.arrived == b.count) {  // the last thread to arrive opens the barrier for everyone
        b.arrived = 0;
        ++b.generation;
        pthread_cond_broadcast(&b.released);
    }
    check_for_deadlock(b);
    timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += b.timeout_s;
    while (b.generation == generation && !b.broken) {
        if (b.timeout_s == 0) {
            pthread_cond_wait(&b.released, &b.mutex);
        } else if (pthread_cond_timedwait(&b.released, &b.mutex, &deadline) != 0) {
            break_barrier(b, "timed out: some threads of the block never arrive");
        }
    }
    pthread_mutex_unlock(&b.mutex);
}

inline void barrier_leave(Barrier& b) {  // each thread, once, when it returns from the kernel
    pthread_mutex_lock(&b.mutex);
    ++b.left;
    check_for_deadlock(b);
    pthread_mutex_unlock(&b.mutex);
}

// What the threads of one running block share.
struct Warp {
    Barrier barrier;
    float slots[2][32];  // lane i writes slots[n % 2][i] in its n-th shuffle
};

struct Block {
    Barrier barrier;       // __syncthreads
    Warp* warps;           // n_threads / 32 of them, rounded up
    float* dynamic_shared; // exactly shared_mem bytes, so AddressSanitizer catches an access past its end
};

inline thread_local Block* this_block;
inline thread_local Warp* this_warp;
inline thread_local int this_lane;  // the flattened threadIdx, modulo 32
inline thread_local long this_shuffle;  // how many shuffles this thread has done in this block
}  // namespace shim

// ---------------------------------------------------------------------------------------------------
// The built-in index variables: every thread has its own copy.

struct uint3 { unsigned int x, y, z; };
typedef uint3 dim3;
inline thread_local uint3 threadIdx, blockIdx, blockDim, gridDim;

// Dynamic shared memory: a kernel writes `SHARED_MEMORY(smem);`, which on a GPU is the source's own
// `#ifndef SHARED_MEMORY` definition, `extern __shared__ float smem[]`; here it is the running block's buffer.
#define SHARED_MEMORY(name) float* name = shim::this_block->dynamic_shared

inline void __syncthreads() { shim::barrier_wait(shim::this_block->barrier); }

// ---------------------------------------------------------------------------------------------------
// Warp shuffles: a warp is 32 consecutive threads (flattened threadIdx). Only the full mask 0xffffffff is
// supported: every lane of the warp takes part.

namespace shim {
inline float shuffle(unsigned mask, float value, int source_lane, const char* what) {
    if (mask != 0xffffffffu) fail(what, "only the full mask 0xffffffff is supported");
    // Two sets of slots, used in turn: a lane writes set n % 2 in shuffle n only after every lane has
    // passed the barrier of shuffle n - 1, so every lane has finished reading set n % 2 in shuffle n - 2.
    float* slots = this_warp->slots[this_shuffle++ % 2];
    slots[this_lane] = value;
    barrier_wait(this_warp->barrier);  // every lane of the warp has written its value
    return slots[source_lane];
}
}  // namespace shim

// Each lane reads lane src_lane % width of its own group of `width` lanes.
inline float __shfl_sync(unsigned mask, float value, int src_lane, int width = 32) {
    int group_start = shim::this_lane & ~(width - 1);
    return shim::shuffle(mask, value, group_start + (src_lane & (width - 1)), "__shfl_sync");
}

// Each lane reads lane ^ lane_mask (a butterfly); a source in a later group of `width` lanes gives the
// lane its own value, as on a GPU.
inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask, int width = 32) {
    int source = shim::this_lane ^ lane_mask;
    if ((source & ~(width - 1)) > (shim::this_lane & ~(width - 1))) source = shim::this_lane;
    return shim::shuffle(mask, value, source, "__shfl_xor_sync");
}

// ---------------------------------------------------------------------------------------------------
// atomicAdd: returns the old value, as CUDA's does. Retry until no other thread changed *address between
// our read and our write.

inline float atomicAdd(float* address, float value) {
    float old, sum;
    __atomic_load(address, &old, __ATOMIC_RELAXED);
    do {
        sum = old + value;
    } while (!__atomic_compare_exchange(address, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); }

// ---------------------------------------------------------------------------------------------------
// Math. The fast GPU intrinsics (__expf, __logf, __fdividef) become the ordinary, more exact functions.

#define __expf(x) expf(x)
#define __logf(x) logf(x)
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __int_as_float(int bits) { float f; memcpy(&f, &bits, sizeof f); return f; }
inline int __float_as_int(float f) { int bits; memcpy(&bits, &f, sizeof bits); return bits; }
template <typename A, typename B> inline auto min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B> inline auto max(A a, B b) { return a < b ? b : a; }

// ---------------------------------------------------------------------------------------------------
// Vector types: float4 loads are how kernels read 16 bytes at once; here they are plain structs.

struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

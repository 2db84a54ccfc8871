// cuda_launcher.h: launch a kernel compiled with cuda_shim.h the way cuLaunchKernel does, from Python.
//
// Included after the kernel source; then EXPORT_KERNEL(name) for each `__global__` kernel gives the
// shared library two C functions that Python calls through ctypes:
//   const char* signature_<name>()   the parameter types, e.g. "const float*,float*,int,float", so that
//                                    Python checks its arguments before a wrong one crashes the kernel
//   const char* launch_<name>(grid, block, shared_bytes, args)
//                                    runs the whole grid; args[i] points at parameter i's value (CUDA's
//                                    kernelParams convention); returns "" or an error message
#pragma once

#include <type_traits>
#include <utility>

namespace shim {
template <typename T> const char* type_name() {
    if (std::is_same_v<T, int>) return "int";
    if (std::is_same_v<T, float>) return "float";
    if (std::is_same_v<T, float*>) return "float*";
    if (std::is_same_v<T, const float*>) return "const float*";
    return "unsupported";
}

template <typename... Params>
void write_signature(void (*)(Params...), char* names, size_t size) {
    const char* each[] = {type_name<Params>()..., ""};
    names[0] = '\0';
    for (size_t i = 0; i < sizeof...(Params); ++i) {
        if (i > 0) strncat(names, ",", size - strlen(names) - 1);
        strncat(names, each[i], size - strlen(names) - 1);
    }
}

// What the launching thread and the block's threads share during a launch.
template <typename... Params>
struct Launch {
    void (*kernel)(Params...);
    void** args;
    uint3 grid, block;
    uint3 block_index;   // the block now running
    bool finished;       // every block has run: the threads return
    Block state;         // the running block's barriers, warps and dynamic shared memory
    Barrier start, done; // the launching thread and all the block's threads meet here before and after
                         // each block: blocks run one after another on the same threads
};

template <typename... Params>
struct Thread {
    Launch<Params...>* launch;
    int flat_index;      // threadIdx flattened: x fastest, then y, then z
};

// Call kernel(*args[0], *args[1], ...), each pointer cast back to its parameter's type.
template <typename... Params, size_t... I>
void call(void (*kernel)(Params...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<Params*>(args[I])...);
}

// The life of one CUDA thread: for each block of the grid, run the kernel once.
template <typename... Params>
void* run_thread(void* thread_pointer) {
    Launch<Params...>& launch = *static_cast<Thread<Params...>*>(thread_pointer)->launch;
    int t = static_cast<Thread<Params...>*>(thread_pointer)->flat_index;
    gridDim = launch.grid;
    blockDim = launch.block;
    threadIdx = {t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
    this_block = &launch.state;
    this_warp = &launch.state.warps[t / 32];
    this_lane = t % 32;
    for (;;) {
        barrier_wait(launch.start);
        if (launch.finished) return nullptr;
        blockIdx = launch.block_index;
        this_shuffle = 0;
        call(launch.kernel, launch.args, std::index_sequence_for<Params...>{});
        barrier_leave(this_block->barrier);  // returned: no barrier may wait for this thread any more
        barrier_leave(this_warp->barrier);
        barrier_wait(launch.done);
    }
}

template <typename... Params>
const char* launch(void (*kernel)(Params...), const unsigned* grid, const unsigned* block,
                   size_t shared_bytes, void** args) {
    Launch<Params...> launch;
    launch.kernel = kernel;
    launch.args = args;
    launch.grid = {grid[0], grid[1], grid[2]};
    launch.block = {block[0], block[1], block[2]};
    launch.finished = false;
    int n_threads = block[0] * block[1] * block[2], n_warps = (n_threads + 31) / 32;
    launch.state.warps = new Warp[n_warps];
    // Exactly shared_bytes long, so that AddressSanitizer catches an access past its end.
    launch.state.dynamic_shared = static_cast<float*>(malloc(shared_bytes > 0 ? shared_bytes : 1));
    launch.state.barrier.name = "__syncthreads";
    for (int w = 0; w < n_warps; ++w) launch.state.warps[w].barrier.name = "a warp shuffle";
    reset(launch.start, n_threads + 1);  // the block's threads and this one
    reset(launch.done, n_threads + 1);
    launch.start.timeout_s = launch.done.timeout_s = 0;  // a block may take long under a sanitizer
    first_error[0] = '\0';

    Thread<Params...>* threads = new Thread<Params...>[n_threads];
    pthread_t* ids = new pthread_t[n_threads];
    for (int t = 0; t < n_threads; ++t) {  // every CUDA thread of a block is a real thread
        threads[t] = {&launch, t};
        if (pthread_create(&ids[t], nullptr, run_thread<Params...>, &threads[t]) != 0) {
            fprintf(stderr, "cuda_launcher: cannot start thread %d of %d\n", t, n_threads);
            abort();
        }
    }
    for (unsigned bz = 0; bz < grid[2]; ++bz)
    for (unsigned by = 0; by < grid[1]; ++by)
    for (unsigned bx = 0; bx < grid[0] && first_error[0] == '\0'; ++bx) {  // blockIdx.x fastest
        reset(launch.state.barrier, n_threads);
        for (int w = 0; w < n_warps; ++w) reset(launch.state.warps[w].barrier, min(32, n_threads - 32 * w));
        memset(launch.state.dynamic_shared, 0xff, shared_bytes);  // every float 0xffffffff: a NaN
        launch.block_index = {bx, by, bz};
        barrier_wait(launch.start);  // the block runs ...
        barrier_wait(launch.done);   // ... until all its threads have returned
    }
    launch.finished = true;
    barrier_wait(launch.start);
    for (int t = 0; t < n_threads; ++t) pthread_join(ids[t], nullptr);
    delete[] ids;
    delete[] threads;
    free(launch.state.dynamic_shared);
    delete[] launch.state.warps;
    return first_error;
}
}  // namespace shim

#define EXPORT_KERNEL(name)                                                                      \
    extern "C" const char* signature_##name() {                                                  \
        static char names[512];                                                                  \
        shim::write_signature(name, names, sizeof names);                                        \
        return names;                                                                            \
    }                                                                                            \
    extern "C" const char* launch_##name(const unsigned* grid, const unsigned* block,            \
                                         size_t shared_bytes, void** args) {                     \
        return shim::launch(name, grid, block, shared_bytes, args);                              \
    }

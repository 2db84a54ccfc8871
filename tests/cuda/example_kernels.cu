// Four small CUDA kernels that together use every part of the CUDA subset cuda_shim.h implements. The
// tests run them on the CPU against NumPy, plant bugs in them for the sanitizers to find, and compile
// them with NVRTC to prove they are real CUDA. Read them before the flash-attention kernels.

#ifndef SHARED_MEMORY
#define SHARED_MEMORY(name) extern __shared__ __align__(16) float name[]
#endif

// total += sum(x[0:n]). Each block: a grid-stride loop, a tree in static shared memory down to one warp,
// then warp shuffles; lane 0 adds the block's sum with atomicAdd (blocks may finish in any order).
extern "C" __global__ void __launch_bounds__(128) block_sum(const float* __restrict__ x,
                                                            float* __restrict__ total, int n) {
    __shared__ float partial[128];
    float value = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) value += x[i];
    partial[threadIdx.x] = value;
    __syncthreads();                                       // every partial sum written before any is read
    for (int half = blockDim.x / 2; half >= 32; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x < 32) {                                // the first warp, all 32 lanes of it
        value = partial[threadIdx.x];
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
        if (threadIdx.x == 0) atomicAdd(total, value);
    }
}

// y = softmax(x) along each row of x (rows, n): one warp per row, blockDim = (32, rows per block).
extern "C" __global__ void row_softmax(const float* __restrict__ x, float* __restrict__ y, int rows, int n) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool real = row < rows;                          // a warp past the last row still shuffles
    float row_max = __int_as_float(0xff800000);            // -inf
    for (int j = threadIdx.x; real && j < n; j += 32) row_max = fmaxf(row_max, x[row * n + j]);
    for (int offset = 16; offset > 0; offset /= 2)
        row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffff, row_max, offset));
    float total = 0.0f;
    for (int j = threadIdx.x; real && j < n; j += 32) total += __expf(x[row * n + j] - row_max);
    for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffff, total, offset);
    total = __shfl_sync(0xffffffff, total, 0);             // lane 0's sum, to every lane
    for (int j = threadIdx.x; real && j < n; j += 32)
        y[row * n + j] = __fdividef(__expf(x[row * n + j] - row_max), total);
}

// y = x^T for x (rows, cols), through a 32 x 33 tile of dynamic shared memory (rows padded by one float, so
// reading a column touches 32 different banks): blockDim = (32, 8), grid = (ceil(cols / 32), ceil(rows / 32)),
// shared_mem = 32 * 33 * 4 bytes. Partial tiles are bounds-checked.
extern "C" __global__ void transpose(const float* __restrict__ x, float* __restrict__ y, int rows, int cols) {
    SHARED_MEMORY(tile);
    const int r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
    for (int r = threadIdx.y; r < 32; r += 8)              // tile[r][c] = x[r0 + r][c0 + c], c = threadIdx.x
        if (r0 + r < rows && c0 + threadIdx.x < cols)
            tile[r * 33 + threadIdx.x] = x[(r0 + r) * cols + c0 + threadIdx.x];
    __syncthreads();                                       // the whole tile loaded before it is read across
    for (int c = threadIdx.y; c < 32; c += 8)              // y[c0 + c][r0 + r] = tile[r][c], r = threadIdx.x
        if (c0 + c < cols && r0 + threadIdx.x < rows)
            y[(c0 + c) * rows + r0 + threadIdx.x] = tile[threadIdx.x * 33 + c];
}

// y = a * x + y, four floats at a time through float4 (n a multiple of 4, x and y 16-byte aligned).
extern "C" __global__ void axpy4(const float* __restrict__ x, float* __restrict__ y, float a, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (4 * i < n) {
        const float4 xi = reinterpret_cast<const float4*>(x)[i];
        const float4 yi = reinterpret_cast<const float4*>(y)[i];
        reinterpret_cast<float4*>(y)[i] = make_float4(fmaf(a, xi.x, yi.x), fmaf(a, xi.y, yi.y),
                                                      fmaf(a, xi.z, yi.z), fmaf(a, xi.w, yi.w));
    }
}

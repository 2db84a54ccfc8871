"""flash.py's CUDA kernels, run on the CPU, equal the NumPy path: out, lse, dq, dk, dv.

No GPU needed: tests/cuda/cpu_cuda.py compiles the unchanged kernel source as C++ with a small shim
(every CUDA thread a real thread, every __syncthreads a real barrier, blocks one after another) and runs
exactly the Launch list (kernel, grid, block, args, shared_mem) that flash.py hands to CuPy.
The first tests prove the shim itself on small example kernels (tests/cuda/example_kernels.cu).
"""
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cpu_cuda  # tests/cuda is not a package: conftest.py puts it on the path
import flash
from helpers import run_demo

pytestmark = pytest.mark.skipif(shutil.which(cpu_cuda.CXX) is None,
                                reason=f"needs a C++ compiler ({cpu_cuda.CXX}) to build kernels for the CPU")
EXAMPLES = os.path.join(cpu_cuda.SHIM_DIR, "example_kernels.cu")

# Kernels that probe the shim's edges: atomics under contention, and kernels that break CUDA's rules
# (to prove the shim reports it instead of hanging or hiding it).
EDGES = r"""
#ifndef SHARED_MEMORY
#define SHARED_MEMORY(name) extern __shared__ __align__(16) float name[]
#endif
extern "C" __global__ void count_with_atomics(float* total) {   // every thread adds 1 to the same float
    atomicAdd(total, 1.0f);
}
extern "C" __global__ void shuffle_in_groups_of_8(const float* x, float* from_lane_1, float* from_xor_8) {
    from_lane_1[threadIdx.x] = __shfl_sync(0xffffffff, x[threadIdx.x], 1, 8);
    from_xor_8[threadIdx.x] = __shfl_xor_sync(0xffffffff, x[threadIdx.x], 8, 8);
}
extern "C" __global__ void read_unwritten_shared(float* y) {   // reads shared memory nobody wrote
    SHARED_MEMORY(smem);
    y[threadIdx.x] = smem[threadIdx.x];
}
extern "C" __global__ void return_before_barrier(float* y) {   // thread 0 never reaches __syncthreads
    if (threadIdx.x == 0) return;
    __syncthreads();
    y[threadIdx.x] = 1.0f;
}
extern "C" __global__ void half_warp_mask(float* y) {          // only a full warp mask is supported
    y[threadIdx.x] = __shfl_xor_sync(0x0000ffff, y[threadIdx.x], 1);
}
"""


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cuda"))


@pytest.fixture(scope="module")
def examples(build_dir):
    with open(EXAMPLES) as f:
        return cpu_cuda.load_kernels(f.read(), build_dir)


@pytest.fixture(scope="module")
def edges(build_dir):
    return cpu_cuda.load_kernels(EDGES, build_dir)


@pytest.fixture(scope="module")
def kernels(build_dir):
    return cpu_cuda.load_kernels(flash.FLASH_KERNEL_SOURCE, build_dir)


# ----------------------------------------------------------------------------------------------------
# The shim, on the example kernels


@pytest.mark.parametrize("n", [1, 1000, 4099])
def test_block_sum_adds_every_element_across_blocks_and_warps(examples, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    total = np.zeros(1, dtype=np.float32)
    cpu_cuda.run_kernel(examples, "block_sum", (3, 1, 1), (128, 1, 1), (x, total, np.int32(n)))
    # float32 sum of n terms in a different order than float64's: relative error ~ n * 6e-8.
    np.testing.assert_allclose(total[0], x.astype(np.float64).sum(), rtol=1e-4, atol=1e-5)


def test_row_softmax_one_warp_per_row_matches_numpy(examples):
    rows, n = 13, 70                                            # 4 rows per block: the last block has 3 idle warps
    x = np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32)
    x[3, :50] = -np.inf                                         # a row with masked entries
    y = np.full_like(x, np.nan)
    cpu_cuda.run_kernel(examples, "row_softmax", (4, 1, 1), (32, 4, 1), (x, y, np.int32(rows), np.int32(n)))
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    # float32 exp and a sum of 70 terms, against float64.
    np.testing.assert_allclose(y, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rows, cols", [(45, 70), (32, 32), (1, 33)])
def test_transpose_through_dynamic_shared_memory_handles_partial_tiles(examples, rows, cols):
    x = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)
    y = np.full((cols, rows), np.nan, dtype=np.float32)
    grid = (-(-cols // 32), -(-rows // 32), 1)
    cpu_cuda.run_kernel(examples, "transpose", grid, (32, 8, 1), (x, y, np.int32(rows), np.int32(cols)),
                        shared_mem=32 * 33 * 4)
    np.testing.assert_array_equal(y, x.T)                      # a copy: exact


def test_axpy4_float4_loads_and_stores_match_numpy(examples):
    x, y = np.random.default_rng(2).standard_normal((2, 100)).astype(np.float32)
    want = 0.5 * x.astype(np.float64) + y
    cpu_cuda.run_kernel(examples, "axpy4", (1, 1, 1), (32, 1, 1), (x, y, np.float32(0.5), np.int32(100)))
    np.testing.assert_allclose(y, want, rtol=1e-7, atol=1e-7)  # one float32 rounding of a * x + y (fmaf)


# ----------------------------------------------------------------------------------------------------
# The shim's edges: contention, and kernels that break CUDA's rules


def test_atomic_add_loses_no_update_when_every_thread_adds_at_once(edges):
    total = np.zeros(1, dtype=np.float32)
    cpu_cuda.run_kernel(edges, "count_with_atomics", (3, 1, 1), (256, 1, 1), (total,))
    assert total[0] == 3 * 256                                  # small integers are exact in float32


def test_warp_shuffles_with_a_width_stay_within_groups_of_that_many_lanes(edges):
    x = np.arange(32, dtype=np.float32) * 10
    from_lane_1, from_xor_8 = np.zeros(32, np.float32), np.zeros(32, np.float32)
    cpu_cuda.run_kernel(edges, "shuffle_in_groups_of_8", (1, 1, 1), (32, 1, 1), (x, from_lane_1, from_xor_8))
    lanes = np.arange(32)
    np.testing.assert_array_equal(from_lane_1, x[lanes // 8 * 8 + 1])    # lane 1 of each group of 8
    # CUDA's rule: a lane whose xor partner lies in a later group of `width` lanes keeps its own value.
    np.testing.assert_array_equal(from_xor_8, np.where(lanes & 8, x[lanes ^ 8], x))


def test_unwritten_dynamic_shared_memory_reads_as_nan(edges):
    y = np.zeros(32, dtype=np.float32)
    cpu_cuda.run_kernel(edges, "read_unwritten_shared", (1, 1, 1), (32, 1, 1), (y,), shared_mem=32 * 4)
    assert np.isnan(y).all()


def test_a_thread_returning_before_syncthreads_is_reported_not_hung(edges):
    with pytest.raises(RuntimeError, match="__syncthreads: a thread returned from the kernel"):
        cpu_cuda.run_kernel(edges, "return_before_barrier", (2, 1, 1), (64, 1, 1), (np.zeros(64, np.float32),))


def test_a_partial_warp_mask_is_reported(edges):
    with pytest.raises(RuntimeError, match="only the full mask"):
        cpu_cuda.run_kernel(edges, "half_warp_mask", (1, 1, 1), (32, 1, 1), (np.zeros(32, np.float32),))


def test_arguments_that_do_not_match_the_kernel_raise_naming_them(examples):
    x, total = np.zeros(8, np.float32), np.zeros(1, np.float32)
    with pytest.raises(TypeError, match=r"block_sum argument 2 \(int\): needs a numpy.int32, got int"):
        cpu_cuda.run_kernel(examples, "block_sum", (1, 1, 1), (128, 1, 1), (x, total, 8))
    with pytest.raises(TypeError, match=r"argument 0 \(const float\*\): needs a C-contiguous float32"):
        cpu_cuda.run_kernel(examples, "block_sum", (1, 1, 1), (128, 1, 1), (x.astype(np.float64), total, np.int32(8)))
    with pytest.raises(TypeError, match=r"takes 3 arguments \(const float\*, float\*, int\), got 2"):
        cpu_cuda.run_kernel(examples, "block_sum", (1, 1, 1), (128, 1, 1), (x, total))
    with pytest.raises(ValueError, match=r"no `__global__ void block_total\(...\)`"):
        cpu_cuda.run_kernel(examples, "block_total", (1, 1, 1), (128, 1, 1), (x, total, np.int32(8)))
    with pytest.raises(ValueError, match="at most 1024 threads"):
        cpu_cuda.run_kernel(examples, "block_sum", (1, 1, 1), (2048, 1, 1), (x, total, np.int32(8)))
    with pytest.raises(ValueError, match="shared_mem must be 0 to"):
        cpu_cuda.run_kernel(examples, "block_sum", (1, 1, 1), (128, 1, 1), (x, total, np.int32(8)),
                            shared_mem=cpu_cuda.MAX_SHARED_BYTES + 4)


# ----------------------------------------------------------------------------------------------------
# flash.py's kernels


def test_the_shim_runs_flashs_own_launch_records():
    assert cpu_cuda.Launch is flash.Launch                     # one definition: what CuPy and the shim run


def misaligned(x):
    """x's values in a C-contiguous view that starts 4 bytes past a 16-byte boundary (no float4 loads)."""
    buffer = np.empty(x.size + 1, dtype=np.float32)
    view = buffer[1:].reshape(x.shape)
    view[...] = x
    return view


def assert_kernels_match_numpy_path(kernels, BH, T, S, Dh, causal, seed=0, place=lambda x: x, window=None):
    q, k, v, dout = (place(x) for x in cpu_cuda.flash_inputs(BH, T, S, Dh, seed))
    inputs = [x.copy() for x in (q, k, v, dout)]
    got = cpu_cuda.run_flash_attention(kernels, q, k, v, dout, causal, window=window)
    for name, before, after in zip(("q", "k", "v", "dout"), inputs, (q, k, v, dout)):
        np.testing.assert_array_equal(after, before, err_msg=f"the kernels modified {name}")
    reference = cpu_cuda.flash_reference(q, k, v, dout, causal, window)
    for name, g, want in zip(("out", "lse", "dq", "dk", "dv"), got, reference):
        # float32 kernels against float64: rounding of dot products over Dh <= 128 and sums over at most a
        # few hundred keys or queries, with exp/log done as exp2/log2; errors of ~1e-6 are typical.
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=2e-5, err_msg=f"{name}, BH={BH} T={T} S={S} "
                                   f"Dh={Dh} causal={causal} window={window}")


@pytest.mark.parametrize("BH, T, S, Dh, causal", [
    (2, 70, 45, 40, False),     # partial query and key tiles, T != S, Dh zero-padded to a wider kernel
    (1, 100, 130, 64, True),    # causal with T < S: three key tiles, the last partial, skipped future tiles
    (1, 90, 30, 7, True),       # causal with T > S: rows 0..59 see no key; Dh not a multiple of 4
    (1, 33, 64, 128, False),    # the widest head; S exactly one tile
    (3, 1, 1, 96, True),        # one query, one key
])
def test_flash_kernels_match_the_numpy_path(kernels, BH, T, S, Dh, causal):
    assert_kernels_match_numpy_path(kernels, BH, T, S, Dh, causal)


@pytest.mark.parametrize("T, S, Dh, causal, window", [
    (200, 200, 32, True, (70, 0)),    # Mistral-style: the band skips key tiles before it, edges mid-tile
    (192, 192, 40, False, (10, 20)),  # key tiles skipped on both sides of the band, in every kernel
    (60, 200, 16, False, (20, 0)),    # T < S: the queries sit at the end, so do their keys
    (180, 70, 7, False, (0, 5)),      # T > S: the top rows' windows hold no key (zeros, lse -inf)
    (130, 130, 64, False, (0, 0)),    # window 0: one key per row, the diagonal tile only
    (70, 90, 96, True, (500, 500)),   # wider than S: the same as causal alone
])
def test_flash_kernels_match_the_numpy_path_with_a_sliding_window(kernels, T, S, Dh, causal, window):
    assert_kernels_match_numpy_path(kernels, 1, T, S, Dh, causal, window=window)


def test_flash_kernels_match_the_numpy_path_on_inputs_not_16_byte_aligned(kernels):
    # A CuPy view can start anywhere; the kernels then load scalars instead of float4.
    assert_kernels_match_numpy_path(kernels, 2, 70, 45, 64, True, place=misaligned)


def test_flash_kernels_give_rows_with_no_allowed_key_zeros_minus_inf_lse_and_zero_gradient(kernels):
    T, S = 90, 30                                               # causal: query i sees keys j <= i - 60
    q, k, v, dout = cpu_cuda.flash_inputs(1, T, S, 32, seed=3)
    out, lse, dq, dk, dv = cpu_cuda.run_flash_attention(kernels, q, k, v, dout, causal=True)
    empty = slice(0, T - S)
    assert np.all(out[:, empty] == 0) and np.all(dq[:, empty] == 0)
    assert np.all(np.isneginf(lse[:, empty])) and np.all(np.isfinite(lse[:, T - S:]))
    assert np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))


@settings(max_examples=max(2, settings().max_examples // 4))   # each case runs ~1000 real threads
@given(T=st.integers(1, 140), S=st.integers(1, 140), Dh=st.integers(1, 128), causal=st.booleans(),
       seed=st.integers(0, 2**32 - 1), window=st.one_of(st.none(), st.tuples(*2 * [st.none() | st.integers(0, 80)])))
def test_flash_kernels_match_the_numpy_path_on_drawn_shapes(kernels, T, S, Dh, causal, seed, window):
    assert_kernels_match_numpy_path(kernels, 1, T, S, Dh, causal, seed, window=window)


def test_the_command_line_runs_flash_on_the_cpu_and_reports_agreement(tmp_path):
    # What the README tells a student without a GPU to type; TMPDIR keeps its build in pytest's tmp_path.
    result = run_demo("tests/cuda/cpu_cuda.py", "--T", "20", "--S", "9", "--causal",
                      env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert "The kernels agree with the NumPy path." in result.stdout

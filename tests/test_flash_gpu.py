"""flash.py's CUDA kernels, called through the public functions with CuPy arrays, equal full attention.

Each test runs twice: on "cupy-on-cpu" (tests/cuda/cupy_on_cpu.py, a `cupy` whose arrays live in host
memory and whose RawKernels are the same kernel source compiled for the CPU by tests/cuda/cpu_cuda.py),
and on a GPU with real CuPy (marker `gpu`, skipped without one). The CPU run checks everything but the
hardware: flash.py's dispatch, broadcasting, launch plans, shared-memory opt-in and errors, and the
kernels' arithmetic. Reference values come from attention.py in float64 on NumPy (exact up to 1e-15)
and from flash.py's NumPy path.

float32 tolerances: the kernels add up to S products in float32 (epsilon 6e-8) in a different order
than the reference and use the hardware exp2, so outputs agree to ~1e-6 relative; gradients, sums of
T x S products, to ~1e-5. The tolerances below leave a factor of 10 to 100 of margin and still fail on
any wrong term, mask or tile edge (those give errors of order 1e-1).
"""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attention import attention_backward, attention_forward
from conftest import CUPY_ON_CPU, CUPY_ON_GPU, array_module
from flash import (KERNEL_HEAD_WIDTHS, _backward_launches, _cuda_module, _forward_launches,
                   flash_attention_backward, flash_attention_forward)
from helpers import ROOT
OUT_TOL = dict(rtol=1e-4, atol=1e-5)    # outputs and lse: float32 sums over <= 300 keys
GRAD_TOL = dict(rtol=1e-3, atol=1e-4)   # gradients: float32 sums of T x S products


@pytest.fixture(scope="module", params=[CUPY_ON_CPU, CUPY_ON_GPU])
def cp(request):
    """CuPy on a CPU, and CuPy where a GPU is present (the `gpu` marker skips it before this runs)."""
    return array_module(request.param)


@pytest.fixture(scope="module", params=[CUPY_ON_GPU])
def gpu_cp(request):
    """CuPy on a GPU only: for sizes the CPU stand-in would take minutes over."""
    return array_module(request.param)


# Lengths from 1 to 300, with extra weight on the 64-row tile edges where bounds checks matter.
lengths = st.one_of(st.integers(1, 300), st.sampled_from([63, 64, 65, 127, 128, 129, 191, 192, 193]))


@st.composite
def kernel_cases(draw):
    """Shapes for the kernels: any T and S (T != S mostly), head widths on and between the compiled ones,
    and sliding windows (narrow ones skip tiles on both sides of the band)."""
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    Dh = draw(st.sampled_from([1, 3, 8, 24, 32, 40, 63, 64, 80, 96, 100, 127, 128]))
    side = st.one_of(st.none(), st.integers(0, 130))
    return dict(lead=lead, T=draw(lengths), S=draw(lengths), Dh=Dh, causal=draw(st.booleans()),
                window=draw(st.one_of(st.none(), st.tuples(side, side))), seed=draw(st.integers(0, 2**32 - 1)))


def random_inputs(case, rng):
    """q, k, v, dout as float32 NumPy arrays (the CuPy copies are made by the test)."""
    lead, T, S, Dh = case["lead"], case["T"], case["S"], case["Dh"]
    shapes = [lead + (T, Dh), lead + (S, Dh), lead + (S, Dh), lead + (T, Dh)]
    return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def kernels(cp, q, k, v, dout, causal, window=None):
    """out, lse, dq, dk, dv from the CUDA kernels, as NumPy arrays."""
    out, cache = flash_attention_forward(*(cp.asarray(x) for x in (q, k, v)), causal=causal, window=window)
    grads = flash_attention_backward(cp.asarray(dout), cache)
    return [cp.asnumpy(x) for x in (out, cache["lse"], *grads)]


@given(case=kernel_cases())
def test_kernels_match_full_attention_and_the_numpy_flash_path(cp, case):
    q, k, v, dout = random_inputs(case, np.random.default_rng(case["seed"]))
    options = dict(causal=case["causal"], window=case["window"])
    out, lse, dq, dk, dv = kernels(cp, q, k, v, dout, **options)

    # Full attention in float64 is the truth for out and the gradients.
    as64 = [x.astype(np.float64) for x in (q, k, v, dout)]
    full, full_cache = attention_forward(*as64[:3], **options)
    for got, want in zip((dq, dk, dv), attention_backward(as64[3], full_cache)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, **GRAD_TOL)
    np.testing.assert_allclose(out, full, **OUT_TOL)
    # The NumPy flash path (float64) gives lse, -inf exactly where a row has no allowed key.
    _, numpy_cache = flash_attention_forward(*as64[:3], **options)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(numpy_cache["lse"]))
    finite = np.isfinite(numpy_cache["lse"])
    np.testing.assert_allclose(lse[finite], numpy_cache["lse"][finite], **OUT_TOL)


@pytest.mark.parametrize("window", [None, (200, 0), (100, 150)])
def test_kernels_match_the_numpy_path_on_long_sequences(gpu_cp, window):
    # 1500 = 23 full tiles and a partial one; causal with T < S skips tiles per query tile, and a window
    # skips all but the few tiles of its band.
    rng = np.random.default_rng(0)
    case = dict(lead=(2,), T=1300, S=1500, Dh=64, causal=True)
    q, k, v, dout = random_inputs(case, rng)
    got = kernels(gpu_cp, q, k, v, dout, causal=True, window=window)
    out, cache = flash_attention_forward(q, k, v, causal=True, window=window)
    want = [out, cache["lse"], *flash_attention_backward(dout, cache)]
    for name, g, w, tol in zip(("out", "lse", "dq", "dk", "dv"), got, want, [OUT_TOL] * 2 + [GRAD_TOL] * 3):
        np.testing.assert_allclose(g, w, err_msg=name, **tol)


def test_rows_with_no_allowed_key_give_zeros_lse_minus_inf_and_zero_gradient(cp):
    # Causal with T > S: query i sees keys j <= i - (T - S); the first T - S = 70 rows (a whole tile and
    # part of the next) see nothing.
    rng = np.random.default_rng(1)
    T, S = 100, 30
    q, k, v, dout = random_inputs(dict(lead=(2,), T=T, S=S, Dh=40), rng)
    out, lse, dq, dk, dv = kernels(cp, q, k, v, dout, causal=True)
    empty = T - S
    assert np.all(out[:, :empty] == 0) and np.all(dq[:, :empty] == 0)
    assert np.all(np.isneginf(lse[:, :empty])) and np.all(np.isfinite(lse[:, empty:]))
    for array in (out, dq, dk, dv):
        assert np.all(np.isfinite(array))


def test_broadcast_and_non_contiguous_inputs_give_summed_gradients(cp):
    # One k, v shared by 4 heads (multi-query attention) and a q that is a transposed view: the kernels
    # see contiguous (BH, n, Dh) copies and the gradients of k, v sum over the heads.
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 70, 4, 48)).astype(np.float32).transpose(0, 2, 1, 3)  # (2, 4, 70, 48)
    k, v = (rng.standard_normal((2, 1, 90, 48)).astype(np.float32) for _ in range(2))
    dout = rng.standard_normal((2, 4, 70, 48)).astype(np.float32)
    out, cache = flash_attention_forward(*(cp.asarray(x) for x in (q, k, v)), causal=True)
    grads = flash_attention_backward(cp.asarray(dout), cache)
    full, full_cache = attention_forward(q, k, v, causal=True)
    np.testing.assert_allclose(cp.asnumpy(out), full, **OUT_TOL)
    for got, want in zip(grads, attention_backward(dout, full_cache)):
        assert got.shape == want.shape
        np.testing.assert_allclose(cp.asnumpy(got), want, **GRAD_TOL)


def test_kernels_are_deterministic(gpu_cp):
    # Each block writes only its own outputs (no atomics), so two runs agree bit for bit, whatever order
    # the GPU runs the blocks in. (The CPU stand-in runs them in one order, so it could not fail there.)
    rng = np.random.default_rng(4)
    inputs = random_inputs(dict(lead=(2, 3), T=200, S=170, Dh=96), rng)
    first, second = (kernels(gpu_cp, *inputs, causal=False) for _ in range(2))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_inputs_untouched_and_float32_preserved(cp):
    rng = np.random.default_rng(5)
    q, k, v, dout = (cp.asarray(x) for x in random_inputs(dict(lead=(2,), T=50, S=60, Dh=16), rng))
    copies = [x.copy() for x in (q, k, v, dout)]
    out, cache = flash_attention_forward(q, k, v, causal=True)
    grads = flash_attention_backward(dout, cache)
    assert out.dtype == cache["lse"].dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    for original, array in zip(copies, (q, k, v, dout)):
        assert bool(cp.all(original == array))


def test_cupy_float64_runs_the_tiled_path_exactly(cp):
    # The documented choice: float64 on CuPy is not sent to the float32 kernels but runs the tiled loops.
    rng = np.random.default_rng(6)
    q, k, v, dout = (x.astype(np.float64) for x in random_inputs(dict(lead=(2,), T=45, S=70, Dh=24), rng))
    out, cache = flash_attention_forward(*(cp.asarray(x) for x in (q, k, v)), causal=True, block_q=16)
    full, full_cache = attention_forward(q, k, v, causal=True)
    assert out.dtype == np.float64
    np.testing.assert_allclose(cp.asnumpy(out), full, rtol=1e-10, atol=1e-12)  # float64 reordering only
    for got, want in zip(flash_attention_backward(cp.asarray(dout), cache), attention_backward(dout, full_cache)):
        np.testing.assert_allclose(cp.asnumpy(got), want, rtol=1e-10, atol=1e-11)


# Huge and saturated logits: test_flash.py's tests take `xp`, so they run the kernels on CuPy too.


def test_cupy_float16_raises_type_error(cp):
    q = cp.zeros((2, 5, 8), dtype=cp.float16)
    with pytest.raises(TypeError, match="^q must be float32 .* got float16"):
        flash_attention_forward(q, q, q)


def test_dout_of_another_dtype_or_on_the_host_raises_type_error(cp):
    q = cp.zeros((2, 5, 8), dtype=cp.float32)
    out, cache = flash_attention_forward(q, q, q)
    with pytest.raises(TypeError, match="^dout must have dtype float32 .*, got float64"):
        flash_attention_backward(out.astype(cp.float64), cache)
    with pytest.raises(TypeError, match="^dout must be a .* array like"):
        flash_attention_backward(np.zeros((2, 5, 8), dtype=np.float32), cache)


def test_inputs_on_different_devices_raise_type_error(cp):
    q = cp.zeros((2, 5, 8), dtype=cp.float32)
    with pytest.raises(TypeError, match="^k must be a .* array like q, got numpy array"):
        flash_attention_forward(q, np.zeros((2, 5, 8), dtype=np.float32), q)


def test_head_width_above_128_raises_value_error_naming_dh(cp):
    q = cp.zeros((1, 4, KERNEL_HEAD_WIDTHS[-1] + 1), dtype=cp.float32)
    with pytest.raises(ValueError, match=r"^q must have a head width Dh <= 128 .* got Dh = 129"):
        flash_attention_forward(q, q, q)


def test_value_width_other_than_query_width_raises(cp):
    q, v = cp.zeros((1, 4, 8), dtype=cp.float32), cp.zeros((1, 4, 16), dtype=cp.float32)
    with pytest.raises(ValueError, match=r"^v must have q's head width 8 .* got shape \(1, 4, 16\)"):
        flash_attention_forward(q, q, v)


def test_sequences_beyond_the_grid_limit_raise_value_error(cp):
    T = 65535 * 64 + 1                                         # one query tile more than gridDim.y allows
    q = cp.zeros((1, T, 4), dtype=cp.float32)
    with pytest.raises(ValueError, match=f"^q must have at most {65535 * 64} rows .* got {T}"):
        flash_attention_forward(q, q[:, :8], q[:, :8])
    # A key sequence that long: the forward's grid would take it, the backward's (one block per key
    # tile) would not, so the forward refuses it up front.
    with pytest.raises(ValueError, match=f"^k must have at most {65535 * 64} rows .* got {T}"):
        flash_attention_forward(q[:, :8], q, q)


def test_every_launch_fits_the_device(cp):
    # The widest plans (Dh = 128) ask for the most shared memory; the device must grant it.
    opt_in = cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    q = cp.zeros((1, 70, 128), dtype=cp.float32)
    lse = cp.zeros((1, 70), dtype=cp.float32)
    band = (140, 0)                                                # causal, T = S = 70
    plans = _forward_launches(q, q, q, q, lse, band, 1.0) + _backward_launches(q, q, q, q, lse, q, q, q, q,
                                                                               band, 1.0)
    assert max(launch.shared_mem for launch in plans) <= opt_in


def test_a_gpu_with_less_shared_memory_raises_value_error_for_wide_heads_and_runs_dh_64(cp, monkeypatch):
    # Consumer GPUs (sm_86, sm_89) give a block at most 99 KiB; Dh = 128 needs 116 KiB in the forward.
    monkeypatch.setattr(cp.cuda.runtime, "deviceGetAttribute", lambda attribute, device: 99 * 1024)
    wide = cp.zeros((1, 70, 128), dtype=cp.float32)
    with pytest.raises(ValueError, match="need 118784 bytes of shared memory a block, this GPU gives at most 101376"):
        flash_attention_forward(wide, wide, wide)
    narrow = cp.ones((1, 70, 64), dtype=cp.float32)            # 85.5 KiB at most: fits
    out, cache = flash_attention_forward(narrow, narrow, narrow)
    assert all(bool(cp.all(g == 0)) for g in flash_attention_backward(cp.zeros_like(out), cache))
    assert bool(cp.allclose(out, 1, rtol=1e-6, atol=0))       # equal scores average v = 1; float32 rounding


def test_kernels_compile_once_and_import_compiles_nothing(cp):
    assert _cuda_module() is _cuda_module()
    # A fresh interpreter that imports flash.py has compiled nothing yet.
    code = "import flash; assert flash._cuda_module.cache_info().currsize == 0"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

"""flash.py's tiled path equals full attention (attention.py): outputs, lse and all three gradients.

The GPU kernels have their own tests (test_flash_gpu.py on a GPU, test_kernels_cpu.py on the CPU);
these tests prove the NumPy algorithm they are compared with.
"""
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attention import attention_backward, attention_forward, causal_mask
from flash import flash_attention_backward, flash_attention_forward
from gradcheck import check_gradients, random_like

ROOT = Path(__file__).resolve().parent.parent


@st.composite
def flash_cases(draw, max_len=200):
    """Shapes that stress the tiling: lengths not multiples of the tiles, T != S, tiny and odd tiles."""
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    T, S = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    Dh = draw(st.integers(1, 40))
    # Tiles from 1 row up to larger than the sequence; at least T/16 so a case stays a few hundred tiles.
    block_q = draw(st.integers(max(1, T // 16), T + 5))
    block_k = draw(st.integers(max(1, S // 16), S + 5))
    return dict(lead=lead, T=T, S=S, Dh=Dh, block_q=block_q, block_k=block_k,
                causal=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


def make_qkv(case, dtype, xp=np):
    rng = np.random.default_rng(case["seed"])
    shapes = [case["lead"] + (case["T"], case["Dh"])] + 2 * [case["lead"] + (case["S"], case["Dh"])]
    return [xp.asarray(rng.standard_normal(shape).astype(dtype)) for shape in shapes]


def log_sum_exp_of_scores(q, k, causal, xp):
    """lse computed the direct way from the full T x S scores, -inf for rows with no allowed key."""
    scores = (q @ xp.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
    if causal:
        scores = xp.where(causal_mask(q.shape[-2], k.shape[-2], xp), scores, -xp.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    finite_max = xp.where(xp.isneginf(row_max), 0, row_max)
    with np.errstate(divide="ignore"):                        # log(0) = -inf is the answer for empty rows
        return (finite_max + xp.log(xp.exp(scores - finite_max).sum(axis=-1, keepdims=True)))[..., 0]


@given(case=flash_cases())
def test_flash_matches_full_attention_outputs_and_gradients(case, xp):
    q, k, v = make_qkv(case, np.float64, xp)
    opts = dict(block_q=case["block_q"], block_k=case["block_k"])
    full, full_cache = attention_forward(q, k, v, causal=case["causal"])
    flash, cache = flash_attention_forward(q, k, v, causal=case["causal"], **opts)
    # float64: the two differ only in the order of additions, ~1e-16 per term.
    xp.testing.assert_allclose(flash, full, rtol=1e-10, atol=1e-12)
    xp.testing.assert_allclose(cache["lse"], log_sum_exp_of_scores(q, k, case["causal"], xp),
                               rtol=1e-10, atol=1e-12)
    dout = random_like(full, np.random.default_rng(case["seed"] + 1))
    for got, want in zip(flash_attention_backward(dout, cache), attention_backward(dout, full_cache)):
        xp.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11)


@given(case=flash_cases(max_len=300))
def test_flash_matches_full_attention_in_float32(case, xp):
    q, k, v = make_qkv(case, np.float32, xp)
    full, full_cache = attention_forward(q, k, v, causal=case["causal"])
    flash, cache = flash_attention_forward(q, k, v, causal=case["causal"],
                                           block_q=case["block_q"], block_k=case["block_k"])
    assert flash.dtype == np.float32 and cache["lse"].dtype == np.float32
    # float32 epsilon is 6e-8; weights and sums over <= 300 keys in a different order stay within 1e-5.
    xp.testing.assert_allclose(flash, full, rtol=1e-4, atol=1e-5)
    dout = random_like(full, np.random.default_rng(case["seed"] + 1))
    for got, want in zip(flash_attention_backward(dout, cache), attention_backward(dout, full_cache)):
        assert got.dtype == np.float32
        xp.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)   # gradients sum T x S products


def test_flash_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 7, 3)), rng.standard_normal((2, 7, 3))
    for causal in (False, True):
        out, cache = flash_attention_forward(q, k, v, causal=causal, block_q=2, block_k=3)
        dout = random_like(out, rng)

        def loss():
            return float((flash_attention_forward(q, k, v, causal=causal, block_q=2, block_k=3)[0]
                          * dout).sum())

        check_gradients(loss, [q, k, v], list(flash_attention_backward(dout, cache)))


def test_rows_with_no_allowed_key_give_zeros_and_zero_gradient(xp):
    # Causal with T > S: query i sees keys j <= i - (T - S), so the first T - S queries see nothing.
    rng = np.random.default_rng(1)
    T, S = 9, 4
    q, k, v = (xp.asarray(rng.standard_normal((2, n, 8)).astype(np.float32)) for n in (T, S, S))
    out, cache = flash_attention_forward(q, k, v, causal=True, block_q=4, block_k=3)
    dq, dk, dv = flash_attention_backward(xp.ones_like(out), cache)
    empty = T - S
    assert bool(xp.all(out[:, :empty] == 0)) and bool(xp.all(dq[:, :empty] == 0))
    assert bool(xp.all(xp.isneginf(cache["lse"][:, :empty])))
    for array in (out, dq, dk, dv, cache["lse"][:, empty:]):
        assert bool(xp.all(xp.isfinite(array)))


def float32_score_rounding_bound(q, k, v):
    """How far a correct float32 attention output may be from the exact one, for inputs whose scores are huge.

    Rounding a score s = q.k * scale to float32 moves it by up to u |s| (u = 2^-24), which scales its weight
    by up to exp(u |s|) ~ 1 + u |s|, and so moves an output by up to about u max|s| max|v|. With scores in
    the thousands that is ~1e-3, far above the usual float32 tolerance, and every float32 implementation
    (full attention included) sits within it; a wrong mask or tile edge is off by ~1e-1.
    """
    q, k = q.astype(np.float64), k.astype(np.float64)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    return 2.0**-24 * np.abs(scores).max() * np.abs(v).max()


def test_huge_logits_stay_finite_and_exact(xp):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((3, 37, 16)).astype(np.float32) for _ in range(3))
    q = q * 1e3                                                # scores up to ~4e3: exp would overflow
    flash, cache = flash_attention_forward(*(xp.asarray(x) for x in (q, k, v)), causal=True, block_q=8, block_k=8)
    assert bool(xp.all(xp.isfinite(flash))) and bool(xp.all(xp.isfinite(cache["lse"])))
    exact, _ = attention_forward(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    xp.testing.assert_allclose(flash, exact, rtol=0, atol=float32_score_rounding_bound(q, k, v))


def test_broadcast_leading_axes_sum_their_gradients():
    # One k, v shared by 4 heads (multi-query attention): their gradients sum over the heads.
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 10, 6))
    k, v = rng.standard_normal((2, 1, 12, 6)), rng.standard_normal((2, 1, 12, 6))
    full, full_cache = attention_forward(q, k, v, causal=True)
    flash, cache = flash_attention_forward(q, k, v, causal=True, block_q=4, block_k=5)
    np.testing.assert_allclose(flash, full, rtol=1e-10, atol=1e-12)  # float64 reordering only
    dout = random_like(full, rng)
    for got, want in zip(flash_attention_backward(dout, cache), attention_backward(dout, full_cache)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_never_holds_a_T_by_S_array_forward_or_backward(causal):
    # tracemalloc sees every NumPy allocation. Full attention's peak holds several T x S arrays; flash
    # holds the inputs' size (the outputs, or dq, dk, dv) plus one block_q x block_k tile.
    rng = np.random.default_rng(4)
    T = S = 1024
    q, k, v = (rng.standard_normal((1, n, 16)) for n in (T, S, S))
    dout = rng.standard_normal((1, T, 16))
    scores_bytes = T * S * 8

    def peak(fn):
        tracemalloc.start()
        result = fn()
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del result
        return size

    blocks = dict(block_q=64, block_k=64)
    _, full_cache = attention_forward(q, k, v, causal=causal)
    _, flash_cache = flash_attention_forward(q, k, v, causal=causal, **blocks)
    full_peaks = (peak(lambda: attention_forward(q, k, v, causal=causal)),
                  peak(lambda: attention_backward(dout, full_cache)))
    flash_peaks = (peak(lambda: flash_attention_forward(q, k, v, causal=causal, **blocks)),
                   peak(lambda: flash_attention_backward(dout, flash_cache)))
    for full_peak, flash_peak in zip(full_peaks, flash_peaks):
        assert full_peak >= scores_bytes                       # it holds at least one T x S array
        assert flash_peak < scores_bytes / 8                   # inputs' size and a tile: ~7 % of T x S here


def test_launch_plan_constants_match_the_kernel_source():
    # _forward_launches / _backward_launches size grids and shared memory from Python copies of the
    # kernels' tile constants; if one side changed alone, launches would be silently wrong.
    import re

    import flash

    def constant(name):
        return re.search(rf"constexpr int {name} = ([^;]+);", flash.FLASH_KERNEL_SOURCE).group(1).strip()

    assert int(constant("BLOCK_Q")) == int(constant("BLOCK_K")) == flash._TILE
    assert int(constant("THREADS")) == flash._THREADS
    assert constant("P_STRIDE") == "BLOCK_K + 4" and flash._P_TILE == flash._TILE * (flash._TILE + 4)
    assert "static constexpr int STRIDE = HEAD + 4;" in flash.FLASH_KERNEL_SOURCE
    assert flash._shared_tile(64) == flash._TILE * (64 + 4)


def test_dtype_preserved_and_inputs_untouched():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 11, 8)).astype(np.float32) for _ in range(3))
    copies = [a.copy() for a in (q, k, v)]
    out, cache = flash_attention_forward(q, k, v, causal=True, block_q=4, block_k=4)
    dout = np.ones_like(out)
    grads = flash_attention_backward(dout, cache)
    assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    for original, array in zip(copies, (q, k, v)):
        np.testing.assert_array_equal(original, array)


def test_bad_input_raises_clear_errors():
    q, k = np.zeros((2, 5, 8)), np.zeros((2, 6, 8))
    with pytest.raises(TypeError, match="q must be a floating-point array"):
        flash_attention_forward(np.zeros((2, 5, 8), dtype=np.int64), k, k)
    with pytest.raises(ValueError, match=r"k must have shape \(\.\.\., S, 8\)"):
        flash_attention_forward(q, np.zeros((2, 6, 7)), k)
    with pytest.raises(ValueError, match=r"v must have shape \(\.\.\., 6, Dv\)"):
        flash_attention_forward(q, k, np.zeros((2, 5, 8)))
    with pytest.raises(ValueError, match="block_q must be a positive integer, got 0"):
        flash_attention_forward(q, k, k, block_q=0)
    out, cache = flash_attention_forward(q, k, k)
    with pytest.raises(ValueError, match=r"dout must have the output's shape \(2, 5, 8\)"):
        flash_attention_backward(np.zeros((2, 5, 7)), cache)


def test_demo_runs_and_checks_itself():
    result = subprocess.run([sys.executable, "flash.py", "--T", "300"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "same output as full attention" in result.stdout

"""flash.py's tiled path equals full attention (attention.py): outputs, lse and all three gradients.

Tests taking `xp` run on NumPy and on CuPy on a CPU, where float32 inputs take the CUDA kernels (and on a
GPU where there is one). The kernels have their own tests too (test_flash_gpu.py through the public
functions, test_kernels_cpu.py launch by launch); these tests prove the algorithm they are compared with.
"""
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import attention
import flash
from attention import attention_backward, attention_forward, causal_mask, sliding_window_mask
from flash import flash_attention_backward, flash_attention_forward
from gradcheck import check_gradients, random_like
from helpers import random_array, run_demo, to_numpy

U = 2.0**-24                                                   # float32 unit roundoff


window_sides = st.one_of(st.none(), st.integers(0, 40))


@st.composite
def flash_cases(draw, max_len=200):
    """Shapes that stress the tiling: lengths not multiples of the tiles, T != S, tiny and odd tiles, and
    sliding windows (narrow ones, whose band skips tiles, and wide ones)."""
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    T, S = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    Dh = draw(st.integers(1, 40))
    # Tiles from 1 row up to larger than the sequence; at least T/16 so a case stays a few hundred tiles.
    block_q = draw(st.integers(max(1, T // 16), T + 5))
    block_k = draw(st.integers(max(1, S // 16), S + 5))
    window = draw(st.one_of(st.none(), st.tuples(window_sides, window_sides)))
    return dict(lead=lead, T=T, S=S, Dh=Dh, block_q=block_q, block_k=block_k,
                causal=draw(st.booleans()), window=window, seed=draw(st.integers(0, 2**32 - 1)))


# Edges every run: T < S and T > S causal (rows that see no key), one token, partial tiles of both lengths;
# windows of 0, wider than S, leaving rows with no key (T > S), cutting tiles at both band edges, T < S.
EDGES = [dict(lead=(2,), T=5, S=13, Dh=3, block_q=2, block_k=4, causal=True, window=None, seed=0),
         dict(lead=(), T=13, S=5, Dh=4, block_q=4, block_k=2, causal=True, window=None, seed=1),
         dict(lead=(1,), T=1, S=1, Dh=1, block_q=1, block_k=1, causal=False, window=None, seed=2),
         dict(lead=(), T=13, S=13, Dh=2, block_q=4, block_k=4, causal=False, window=(0, 0), seed=3),
         dict(lead=(2,), T=7, S=9, Dh=3, block_q=3, block_k=2, causal=True, window=(50, 50), seed=4),
         dict(lead=(), T=10, S=4, Dh=2, block_q=3, block_k=3, causal=False, window=(0, 1), seed=5),
         dict(lead=(), T=40, S=40, Dh=3, block_q=8, block_k=8, causal=False, window=(5, 3), seed=6),
         dict(lead=(), T=5, S=23, Dh=2, block_q=3, block_k=4, causal=True, window=(3, None), seed=7),
         dict(lead=(), T=23, S=6, Dh=2, block_q=4, block_k=3, causal=False, window=(None, 2), seed=8)]
at_the_edges = [example(case=case) for case in EDGES]


def with_edges(test):
    for pin in at_the_edges:
        test = pin(test)
    return test


def options(case):
    """causal and window of a case, as both attention_forward and flash_attention_forward take them."""
    return dict(causal=case["causal"], window=case["window"])


def make_qkv(case, dtype, xp=np):
    rng = np.random.default_rng(case["seed"])
    shapes = [case["lead"] + (case["T"], case["Dh"])] + 2 * [case["lead"] + (case["S"], case["Dh"])]
    return [random_array(rng, shape, dtype, xp) for shape in shapes]


def log_sum_exp_of_scores(q, k, causal, xp, window=None):
    """lse computed the direct way from the full T x S scores, -inf for rows with no allowed key."""
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ xp.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
    allowed = sliding_window_mask(T, S, *(window or (None, None)), xp=xp)
    scores = xp.where(allowed & causal_mask(T, S, xp) if causal else allowed, scores, -xp.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    finite_max = xp.where(xp.isneginf(row_max), 0, row_max)
    with np.errstate(divide="ignore"):                        # log(0) = -inf is the answer for empty rows
        return (finite_max + xp.log(xp.exp(scores - finite_max).sum(axis=-1, keepdims=True)))[..., 0]


@given(case=flash_cases())
@with_edges
def test_flash_matches_full_attention_outputs_and_gradients(case, xp):
    q, k, v = make_qkv(case, np.float64, xp)
    opts = dict(block_q=case["block_q"], block_k=case["block_k"])
    full, full_cache = attention_forward(q, k, v, **options(case))
    flash_out, cache = flash_attention_forward(q, k, v, **options(case), **opts)
    # float64: the two differ only in the order of additions, ~1e-16 per term.
    xp.testing.assert_allclose(flash_out, full, rtol=1e-10, atol=1e-12)
    xp.testing.assert_allclose(cache["lse"], log_sum_exp_of_scores(q, k, case["causal"], xp, case["window"]),
                               rtol=1e-10, atol=1e-12)
    dout = random_like(full, np.random.default_rng(case["seed"] + 1))
    for got, want in zip(flash_attention_backward(dout, cache), attention_backward(dout, full_cache)):
        xp.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11)


@given(case=flash_cases(max_len=300))
@example(case=EDGES[6])
def test_flash_matches_full_attention_in_float32(case, xp):
    q, k, v = make_qkv(case, np.float32, xp)
    full, full_cache = attention_forward(q, k, v, **options(case))
    flash_out, cache = flash_attention_forward(q, k, v, **options(case), block_q=case["block_q"],
                                               block_k=case["block_k"])
    assert flash_out.dtype == np.float32 and cache["lse"].dtype == np.float32
    # float32 epsilon is 6e-8; weights and sums over <= 300 keys in a different order stay within 1e-5.
    xp.testing.assert_allclose(flash_out, full, rtol=1e-4, atol=1e-5)
    dout = random_like(full, np.random.default_rng(case["seed"] + 1))
    for got, want in zip(flash_attention_backward(dout, cache), attention_backward(dout, full_cache)):
        assert got.dtype == np.float32
        xp.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)   # gradients sum T x S products


@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (False, (1, 2)), (True, (2, None))])
def test_flash_backward_matches_finite_differences(causal, window):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 7, 3)), rng.standard_normal((2, 7, 4))
    opts = dict(causal=causal, window=window, block_q=2, block_k=3)
    out, cache = flash_attention_forward(q, k, v, **opts)
    dout = random_like(out, rng)                                  # random upstream gradient
    loss = lambda: float((flash_attention_forward(q, k, v, **opts)[0] * dout).sum())   # noqa: E731
    check_gradients(loss, [q, k, v], list(flash_attention_backward(dout, cache)))


# ----------------------------------------------------------------------------------------------------
# Sliding windows: the key tiles wholly outside a query tile's band are never visited (and the query
# tiles outside a key tile's band in the backward), so a window of w costs O(T w), not O(T S).


def tiles_with_an_allowed_key(T, S, causal, window, block_q, block_k):
    """(query tiles, key tiles) bool: does the tile pair hold any allowed (query, key), from the mask."""
    allowed = sliding_window_mask(T, S, *window) & (causal_mask(T, S) if causal else True)
    rows, cols = np.arange(T) // block_q, np.arange(S) // block_k
    sees = np.zeros((rows[-1] + 1, cols[-1] + 1), dtype=bool)
    np.logical_or.at(sees, (rows[:, None], cols[None, :]), allowed)
    return sees


@pytest.mark.parametrize("T, S, causal, window", [(140, 150, False, (10, 20)), (200, 200, True, (60, 0)),
                                                  (150, 100, False, (0, 0))])
def test_tiles_outside_the_band_are_never_visited_forward_or_backward(xp, T, S, causal, window):
    if xp.__name__ == "cupy_on_cpu" and (T, S) != (140, 150):   # the first skips tiles on both sides
        pytest.skip("on the CPU stand-in the kernels run the first case only (a block is 256 CPU threads)")
    # NaN in a tile of k and v reaches every output row of every query tile that visits it (0 * NaN in
    # P V and in dP = dO V^T, even where P is masked to 0) and no other. So with one key tile poisoned at
    # a time, the query tiles whose out and dq turn NaN are exactly the ones that visited it; likewise NaN
    # in a tile of dout reaches dk and dv of exactly the key tiles whose backward visited it. Both loops and
    # kernels (64-row tiles) must visit just the tiles that hold an allowed (query, key) pair.
    # One run does it all: batch entry b poisons key tile b (b < n_k) or query tile b - n_k of dout.
    tile = 64
    sees = tiles_with_an_allowed_key(T, S, causal, window, tile, tile)   # (n_q, n_k)
    n_q, n_k = sees.shape
    rng = np.random.default_rng(0)
    q, k, v, dout = (np.repeat(rng.standard_normal((1, n, 8)).astype(np.float32), n_k + n_q, axis=0)
                     for n in (T, S, S, T))
    for b in range(n_k):
        k[b, b * tile:(b + 1) * tile] = v[b, b * tile:(b + 1) * tile] = np.nan
    for b in range(n_q):
        dout[n_k + b, b * tile:(b + 1) * tile] = np.nan
    out, cache = flash_attention_forward(*(xp.asarray(x) for x in (q, k, v)), causal=causal, window=window,
                                         block_q=tile, block_k=tile)
    out, dq, dk, dv = (to_numpy(x) for x in (out, *flash_attention_backward(xp.asarray(dout), cache)))
    nan_rows = lambda x: ~np.isfinite(x).all(axis=-1)            # noqa: E731  (batch, rows) bool
    visited_by_query_tiles = np.repeat(sees.T, tile, axis=1)[:, :T]   # (n_k, T): row i's tile visits key tile b
    np.testing.assert_array_equal(nan_rows(out[:n_k]), visited_by_query_tiles)
    np.testing.assert_array_equal(nan_rows(dq[:n_k]), visited_by_query_tiles)
    visited_by_key_tiles = np.repeat(sees, tile, axis=1)[:, :S]       # (n_q, S): key j's tile visits query tile b
    np.testing.assert_array_equal(nan_rows(dk[n_k:]), visited_by_key_tiles)
    np.testing.assert_array_equal(nan_rows(dv[n_k:]), visited_by_key_tiles)


def test_a_window_of_w_visits_order_t_w_tiles_not_t_s(monkeypatch):
    # Every visited tile computes its scores once (_tile_scores), forward and backward: count the calls.
    T = S = 4096
    block, w = 64, 100
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, T, 4)) for _ in range(3))
    calls = []
    scores = flash._tile_scores
    monkeypatch.setattr(flash, "_tile_scores", lambda *args: calls.append(1) or scores(*args))
    out, cache = flash_attention_forward(q, k, v, causal=True, window=(w, 0), block_q=block, block_k=block)
    forward_calls = len(calls)
    flash_attention_backward(out, cache)
    sees = tiles_with_an_allowed_key(T, S, True, (w, 0), block, block)
    assert forward_calls == len(calls) - forward_calls == sees.sum()   # exactly the tiles with an allowed pair
    # Each query tile sees its diagonal tile and the ones w keys back: at most 1 + ceil(w / 64) + 1 of 64.
    assert sees.sum() <= (T // block) * (w // block + 2) < (T // block) ** 2 / 16


def test_rows_with_no_allowed_key_give_zeros_and_zero_gradient(xp):
    # Causal with T > S: query i sees keys j <= i - (T - S), so the first T - S queries see nothing.
    rng = np.random.default_rng(1)
    T, S = 9, 4
    q, k, v = (random_array(rng, (2, n, 8), np.float32, xp) for n in (T, S, S))
    out, cache = flash_attention_forward(q, k, v, causal=True, block_q=4, block_k=3)
    dq, dk, dv = flash_attention_backward(xp.ones_like(out), cache)
    empty = T - S
    assert bool(xp.all(out[:, :empty] == 0)) and bool(xp.all(dq[:, :empty] == 0))
    assert bool(xp.all(xp.isneginf(cache["lse"][:, :empty])))
    for array in (out, dq, dk, dv, cache["lse"][:, empty:]):
        assert bool(xp.all(xp.isfinite(array)))


# ----------------------------------------------------------------------------------------------------
# float32 at huge and saturated logits: the bounds of flash.py's docstring. The inputs make every score
# q . k exact in float32 (integers below 2^24, whose products and sums are exact in any order, and
# scale = 1/4), so what remains is exactly the rounding each bound counts.


def weight_error(q, k, n):
    """How far, relatively, a float32 attention weight may be from the exact one: expm1(16 u max|s| + 3 (n + 4) u).

    A weight is exp(s_j - m) / sum_i exp(s_i - m). The kernels form s_j - m in base 2: scale * log2(e)
    (two roundings) times q . k (one) moves each score by 3 u |s|, and the subtraction by u |s_j - m| <=
    2 u max|s|, so each exp(s_j - m) is off by a factor within exp(8 u max|s|) (the tiled loops, exact up to
    exp's own rounding, stay far inside). The ratio can move by that factor twice; the sum over n terms,
    the division and exp's last bits add under 3 (n + 4) u.
    """
    q, k = q.astype(np.float64), k.astype(np.float64)
    max_score = np.abs(q @ np.swapaxes(k, -1, -2)).max() / math.sqrt(q.shape[-1])
    return math.expm1(16 * U * max_score + 3 * (n + 4) * U)


def test_huge_logits_stay_finite_and_within_the_float32_rounding_bound(xp):
    # Scores up to ~1e4, where exp overflows float32 at 89: only the running max keeps flash finite. Each
    # output is a weighted average of v, so weights off by a relative weight_error move it by at most
    # max|v| weight_error: ~1e-2 here, while a wrong mask or tile edge moves it by ~1.
    rng = np.random.default_rng(2)
    T = S = 137                                                # three kernel tiles, the last partial
    q = rng.integers(-2000, 2001, (3, T, 16)).astype(np.float32)
    k = rng.integers(-4, 5, (3, S, 16)).astype(np.float32)
    v = rng.standard_normal((3, S, 16)).astype(np.float32)
    out, cache = flash_attention_forward(*(xp.asarray(x) for x in (q, k, v)), causal=True, block_q=8, block_k=8)
    assert bool(xp.all(xp.isfinite(out))) and bool(xp.all(xp.isfinite(cache["lse"])))
    exact, _ = attention_forward(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    assert np.abs(to_numpy(out) - exact).max() <= np.abs(v).max() * weight_error(q, k, S)


def saturated_inputs(rng, B, T, S, Dh=16):
    """float32 q, k, v, dout where every query i has one key j*(i) it may attend (causal, T <= S) whose
    score beats every other key's by 128 or more, so softmax is one-hot to far below float32's precision.

    Keys are distinct patterns of +-32 (any two differ in a coordinate); query i is +-8 times the pattern
    of its key, so s_ij = (1/4) 8 * 32 * (16 - 2 * (coordinates where the patterns differ)):
    1024 for j*(i), at most 896 for any other key.
    """
    assert T <= S, "with causal, every query needs a key it may attend"
    codes = rng.choice(2**Dh, size=(B, S), replace=False)      # distinct sign patterns, one per key
    signs = 1.0 - 2.0 * ((codes[..., None] >> np.arange(Dh)) & 1)  # (B, S, Dh) of +-1
    last_allowed = np.arange(T) + (S - T)                      # query i may attend keys 0 .. i + (S - T)
    winner = (rng.random((B, T)) * (last_allowed + 1)).astype(int)  # (B, T) j*(i)
    q = 8 * np.take_along_axis(signs, winner[..., None], axis=1)   # (B, T, Dh)
    k = 32 * signs                                              # (B, S, Dh)
    v, dout = rng.standard_normal((B, S, Dh)), rng.standard_normal((B, T, Dh))
    return [x.astype(np.float32) for x in (q, k, v, dout)]


def test_saturated_logits_leave_dq_and_dk_a_rounding_residue_within_the_stated_bound(xp):
    # One-hot softmax: the exact dS = P (dP - delta) is ~1e-55, since dP_ij* = dO_i . V_j* and delta_i =
    # dO_i . O_i with O_i = V_j*. Computed, they are two float32 sums of the same Dh products in different
    # orders, each within Dh u sum_d |dO_id V_j*d| of the truth: a residue up to (2 Dh + 4) u |dO_i|_1
    # max|v| (the 4: the products' rounding and P's), which dQ_i = scale dS K multiplies by scale |K| and
    # dK_j = scale dS^T Q by scale |Q|, once for each query that picked key j.
    rng = np.random.default_rng(7)
    Dh, scale = 16, 1 / 4
    q, k, v, dout = saturated_inputs(rng, B=2, T=70, S=90, Dh=Dh)  # partial tiles of both lengths
    out, cache = flash_attention_forward(*(xp.asarray(x) for x in (q, k, v)), causal=True, block_q=32, block_k=32)
    dq, dk, dv = (to_numpy(g) for g in flash_attention_backward(xp.asarray(dout), cache))
    _, exact_cache = attention_forward(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    exact_dq, exact_dk, exact_dv = attention_backward(dout.astype(np.float64), exact_cache)
    weights = exact_cache["weights"]                           # (B, T, S) one-hot up to exp(-128)
    tiny = np.finfo(np.float32).tiny                           # exact terms of e^-128 are below float32's range
    residue = (2 * Dh + 4) * U * np.abs(dout).sum(-1) * np.abs(v).max()  # (B, T)
    assert np.all(np.abs(dq - exact_dq) <= scale * np.abs(k).max() * residue[..., None] + tiny)
    picked = np.swapaxes(weights, -1, -2) @ residue[..., None]  # (B, S, 1) sum of residues of the queries
    assert np.all(np.abs(dk - exact_dk) <= scale * np.abs(q).max() * picked + tiny)
    # dV = P^T dO has no cancellation: each weight within weight_error, relatively.
    dv_bound = weight_error(q, k, 70) * (np.swapaxes(weights, -1, -2) @ np.abs(dout)) + tiny
    assert np.all(np.abs(dv - exact_dv) <= dv_bound)
    # Full attention takes delta = rowsum(dP * P) from the rounded dP itself: with P exactly one-hot in
    # float32 that is dP_ij* to the bit, and dS, so dq, is exactly 0.
    _, full_cache = attention_forward(*(xp.asarray(x) for x in (q, k, v)), causal=True)
    assert np.all(to_numpy(attention_backward(xp.asarray(dout), full_cache)[0]) == 0)


# ----------------------------------------------------------------------------------------------------


def test_broadcast_leading_axes_sum_their_gradients():
    # One k, v shared by 4 heads (multi-query attention): their gradients sum over the heads.
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 10, 6))
    k, v = rng.standard_normal((2, 1, 12, 6)), rng.standard_normal((2, 1, 12, 6))
    full, full_cache = attention_forward(q, k, v, causal=True)
    flash_out, cache = flash_attention_forward(q, k, v, causal=True, block_q=4, block_k=5)
    np.testing.assert_allclose(flash_out, full, rtol=1e-10, atol=1e-12)  # float64 reordering only
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


def test_cache_holds_lse_and_the_documented_fields_and_dtypes_are_preserved():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 11, 8)).astype(np.float32) for _ in range(3))
    copies = [a.copy() for a in (q, k, v)]
    out, cache = flash_attention_forward(q, k, v, causal=True, block_q=4, block_k=4)
    assert set(cache) == {"q", "k", "v", "out", "lse", "band", "scale", "block_q", "block_k"}
    assert cache["lse"].shape == (2, 11)                       # T numbers a row, not the T x S weights
    grads = flash_attention_backward(random_like(out, rng), cache)
    assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in grads)
    for original, array in zip(copies, (q, k, v)):
        np.testing.assert_array_equal(original, array)


def test_flash_uses_attentions_get_xp():
    assert flash.get_xp is attention.get_xp                    # one array-module idiom, not a copy


def test_kernel_source_takes_the_sizes_of_the_launch_plans_from_python():
    # The launch plans size grids and shared memory from flash.py's constants; the compiled source must be
    # built from the same ones, with every head width the plans may ask for stamped out.
    source = flash.FLASH_KERNEL_SOURCE
    assert (f"constexpr int BLOCK_Q = {flash._TILE}, BLOCK_K = {flash._TILE}, THREADS = {flash._THREADS}, "
            f"PAD = {flash._PAD};") in source
    assert all(f"FLASH_KERNELS({width})" in source for width in flash.KERNEL_HEAD_WIDTHS)
    assert "$" not in source                                  # every placeholder of the template filled in


# ----------------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument, what it needs and what it got


QKV = [np.zeros(shape) for shape in ((2, 5, 8), (2, 6, 8), (2, 6, 8))]


@pytest.mark.parametrize("change, error, match", [
    # attention.py's checks, which flash shares
    (dict(q=np.zeros((2, 5, 8), dtype=np.int64)), TypeError, "^q must be a floating-point array"),
    (dict(k=[[0.0] * 8] * 6), TypeError, "^k must be a floating-point array"),
    (dict(q=np.zeros(8)), ValueError, r"^q must have shape \(\.\.\., length, width\)"),
    (dict(k=np.zeros((2, 6, 7))), ValueError, r"^k must have shape \(\.\.\., S, 8\)"),
    (dict(v=np.zeros((2, 5, 8))), ValueError, r"^v must have shape \(\.\.\., 6, Dv\)"),
    (dict(k=np.zeros((2, 6, 8), dtype=np.float32)), TypeError, "^k must have dtype float64"),
    (dict(q=np.zeros((2, 5, 0)), k=np.zeros((2, 6, 0))), ValueError, "^q must have a width Dk >= 1"),
    (dict(causal=np.array(True)), TypeError, "^causal must be True or False, got numpy array"),
    (dict(causal=1), TypeError, "^causal must be True or False, got 1"),
    (dict(causal="yes"), TypeError, "^causal must be True or False, got 'yes'"),
    (dict(scale=float("nan")), ValueError, "^scale must be a finite number > 0, got nan"),
    (dict(scale=0.0), ValueError, "^scale must be a finite number > 0, got 0.0"),
    (dict(scale=-0.5), ValueError, "^scale must be a finite number > 0, got -0.5"),
    (dict(scale=float("inf")), ValueError, "^scale must be a finite number > 0, got inf"),
    (dict(scale="0.1"), TypeError, "^scale must be a number .*, got '0.1'"),
    (dict(scale=np.ones(1)), TypeError, "^scale must be a number .*, got numpy array"),
    # flash's own options
    (dict(block_q=0), ValueError, "^block_q must be an integer >= 1, got 0"),
    (dict(block_k=-3), ValueError, "^block_k must be an integer >= 1, got -3"),
    (dict(block_q=2.5), ValueError, "^block_q must be an integer >= 1, got 2.5"),
    (dict(block_k=True), ValueError, "^block_k must be an integer >= 1, got True"),
    (dict(block_q=None), ValueError, "^block_q must be an integer >= 1, got None"),
    (dict(window=4), ValueError, r"^window must be a pair \(left, right\) of integers >= 0 or None, got 4"),
    (dict(window=(-1, 0)), ValueError, r"^window must be a pair .*got \(-1, 0\)"),
    (dict(window=(0.5, 0)), ValueError, r"^window must be a pair .*got \(0\.5, 0\)"),
])
def test_bad_forward_input_raises_naming_it(change, error, match):
    arguments = dict(zip("qkv", QKV), causal=False, scale=None, block_q=4, block_k=4)
    arguments.update(change)
    with pytest.raises(error, match=match):
        flash_attention_forward(**arguments)


@pytest.mark.parametrize("dout, error, match", [
    (np.zeros((2, 5, 7)), ValueError, r"^dout must have shape \(2, 5, 8\) .*, got \(2, 5, 7\)"),
    (np.zeros((1, 2, 5, 8)), ValueError, r"^dout must have shape \(2, 5, 8\) .*, got \(1, 2, 5, 8\)"),
    (np.zeros((5, 8)), ValueError, r"^dout must have shape \(2, 5, 8\) .*, got \(5, 8\)"),
    (np.zeros((2, 5, 8), dtype=np.float32), TypeError, "^dout must have dtype float64 .*, got float32"),
    ([[[0.0] * 8] * 5] * 2, TypeError, "^dout must be an array of dtype float64, got list"),
])
def test_bad_upstream_gradient_raises_naming_it(dout, error, match):
    _, cache = flash_attention_forward(*QKV)
    with pytest.raises(error, match=match):
        flash_attention_backward(dout, cache)


def test_a_cache_that_is_not_flashs_raises_type_error():
    out, cache = attention_forward(*QKV)
    with pytest.raises(TypeError, match="^cache must be the dict flash_attention_forward returned"):
        flash_attention_backward(out, cache)


def test_demo_runs_and_checks_itself():
    result = run_demo("flash.py", "--T", "300", timeout=120)
    assert "same output as full attention" in result.stdout

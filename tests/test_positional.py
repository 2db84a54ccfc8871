"""Tests for positional.py, what they prove (each test name is the property it proves):

- adding sinusoids or RoPE breaks attention's permutation equivariance;
- a sinusoidal shift by k is one fixed rotation for every position (the property the paper chose it for);
- RoPE: scores depend only on i - j, norms are kept, the backward is the inverse rotation, an offset agrees
  with slices of the full sequence; float32 angles would miss by over 50x the 1e-5 that float64 angles
  keep (a bound from the float32 format, not one CPU's rounding);
- ALiBi's slopes are the paper's (also for head counts that are not powers of two) and its bias is
  aligned bottom-right;
- learned positions' backward against finite differences; float32 stays float32; bad input refused by name.

Tests taking `xp` run on NumPy, CuPy on a CPU, and CuPy where a GPU is present.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attention import attention_forward
from gradcheck import check_gradients, random_like
from helpers import random_array, run_demo, spoiled, to_numpy
from positional import (alibi_bias, alibi_slopes, init_learned_positions, learned_position_backward,
                        learned_position_forward, rope_backward, rope_forward, sinusoidal_encoding)

seeds = st.integers(0, 2**32 - 1)


def non_identity_permutation(rng, T):
    perm = rng.permutation(T)
    return np.roll(perm, 1) if np.array_equal(perm, np.arange(T)) else perm


def rope(x, offset=0):
    return rope_forward(x, offset=offset)[0]


# ----------------------------------------------------------------------------------------------------
# Order: attention alone is permutation equivariant; sinusoids and RoPE break that


@given(seed=seeds, T=st.integers(2, 7), D=st.integers(1, 6))
def test_self_attention_without_positions_is_permutation_equivariant(xp, seed, T, D):
    rng = np.random.default_rng(seed)
    x = random_array(rng, (T, D), xp=xp)
    perm = xp.asarray(non_identity_permutation(rng, T))
    out, _ = attention_forward(x, x, x)
    out_of_permuted, _ = attention_forward(x[perm], x[perm], x[perm])
    # float64 rounding only: the same sums in another order
    np.testing.assert_allclose(to_numpy(out_of_permuted), to_numpy(out[perm]), rtol=1e-12, atol=1e-12)


@given(seed=seeds, T=st.integers(2, 7), D=st.integers(1, 6))
def test_adding_sinusoidal_positions_breaks_permutation_equivariance(xp, seed, T, D):
    rng = np.random.default_rng(seed)
    x = random_array(rng, (T, D), xp=xp)
    perm = xp.asarray(non_identity_permutation(rng, T))
    pe = sinusoidal_encoding(T, D, dtype=np.float64, xp=xp)
    h, h_permuted = x + pe, x[perm] + pe                       # the same tokens in another order
    out, _ = attention_forward(h, h, h)
    out_of_permuted, _ = attention_forward(h_permuted, h_permuted, h_permuted)
    # without positions the two agree to 1e-12 (rounding); a gap above 1e-8 is a real difference
    assert np.abs(to_numpy(out_of_permuted) - to_numpy(out[perm])).max() > 1e-8


@given(seed=seeds, T=st.integers(2, 7), half=st.integers(1, 3))
def test_rope_on_queries_and_keys_breaks_permutation_equivariance(xp, seed, T, half):
    rng = np.random.default_rng(seed)
    x = random_array(rng, (T, 2 * half), xp=xp)
    perm = xp.asarray(non_identity_permutation(rng, T))
    out, _ = attention_forward(rope(x), rope(x), x)
    out_of_permuted, _ = attention_forward(rope(x[perm]), rope(x[perm]), x[perm])
    # without positions the two agree to 1e-12 (rounding); a gap above 1e-8 is a real difference
    # (it is small only when the tokens are nearly parallel, which random vectors almost never are)
    assert np.abs(to_numpy(out_of_permuted) - to_numpy(out[perm])).max() > 1e-8


def test_demo_runs_and_tells_the_two_sentences_apart_only_with_positions():
    # the demo asserts its own claims; this runs it so they are checked with the suite
    assert "no positions" in run_demo("positional.py").stdout


# ----------------------------------------------------------------------------------------------------
# RoPE


@given(seed=seeds, half=st.integers(1, 8), i=st.integers(0, 50), j=st.integers(0, 50),
       shift=st.integers(0, 5000))
def test_rope_score_depends_only_on_relative_position(xp, seed, half, i, j, shift):
    rng = np.random.default_rng(seed)
    q, k = random_array(rng, (1, 2 * half), xp=xp), random_array(rng, (1, 2 * half), xp=xp)
    score = float((rope(q, i) * rope(k, j)).sum())
    shifted = float((rope(q, i + shift) * rope(k, j + shift)).sum())
    # float64 rounding of cos/sin at angles up to ~5000 rad: ~1e-12 relative
    assert shifted == pytest.approx(score, rel=1e-9, abs=1e-9)


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 6), half=st.integers(1, 5),
       offset=st.integers(0, 1000))
def test_rope_preserves_vector_norms(xp, seed, B, T, half, offset):
    x = random_array(np.random.default_rng(seed), (B, T, 2 * half), xp=xp)
    norms, rotated_norms = xp.linalg.norm(x, axis=-1), xp.linalg.norm(rope(x, offset), axis=-1)
    # a rotation in float64: equal up to rounding
    np.testing.assert_allclose(to_numpy(rotated_norms), to_numpy(norms), rtol=1e-12)


@given(seed=seeds, T=st.integers(1, 6), half=st.integers(1, 5), offset=st.integers(0, 1000))
def test_rope_backward_is_the_inverse_rotation(xp, seed, T, half, offset):
    x = random_array(np.random.default_rng(seed), (2, T, 2 * half), xp=xp)
    out, cache = rope_forward(x, offset=offset)
    # rotating back and forth in float64: rounding only
    np.testing.assert_allclose(to_numpy(rope_backward(out, cache)), to_numpy(x), rtol=1e-12, atol=1e-12)


@given(seed=seeds, total=st.integers(2, 12), half=st.integers(1, 4), data=st.data())
def test_rope_with_offset_equals_the_same_rows_of_the_whole_sequence(xp, seed, total, half, data):
    start = data.draw(st.integers(0, total - 1))
    stop = data.draw(st.integers(start + 1, total))
    x = random_array(np.random.default_rng(seed), (3, total, 2 * half), xp=xp)
    whole = rope(x)
    piece = rope(x[:, start:stop], offset=start)               # what cached decoding computes
    # identical angles, identical arithmetic
    np.testing.assert_allclose(to_numpy(piece), to_numpy(whole[:, start:stop]), rtol=0, atol=1e-15)


def test_rope_rotates_interleaved_pairs_by_the_roformer_angle():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8))
    offset, base = 3, 500.0
    out, _ = rope_forward(x, offset=offset, base=base)
    for t, i in [(0, 0), (2, 1), (4, 3)]:
        theta = (offset + t) * base ** (-2 * i / 8)
        a, b = x[t, 2 * i], x[t, 2 * i + 1]
        # float64 against the scalar formula: rounding only
        assert out[t, 2 * i] == pytest.approx(a * math.cos(theta) - b * math.sin(theta), rel=1e-12)
        assert out[t, 2 * i + 1] == pytest.approx(a * math.sin(theta) + b * math.cos(theta), rel=1e-12)


@given(seed=seeds, T=st.integers(1, 4), half=st.integers(1, 3), offset=st.integers(0, 100))
def test_rope_gradients_match_finite_differences(seed, T, half, offset):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, T, 2 * half))
    dout = random_like(x, rng)
    _, cache = rope_forward(x, offset=offset)
    check_gradients(lambda: float((rope(x, offset) * dout).sum()), x, rope_backward(dout, cache))


def test_rope_in_float32_stays_accurate_at_large_positions():
    x = np.random.default_rng(0).standard_normal((4, 16))
    exact = rope(x, offset=100_000)
    single = rope(x.astype(np.float32), offset=100_000)
    # float32 rounding of cos/sin and of the product, ~1e-7 each; angles computed in float32
    # would be off by ~1e-3 rad at this position and fail this (next test)
    np.testing.assert_allclose(single, exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("Dh", [16, 64])
def test_float32_angles_would_miss_by_far_more_than_rope_keeps(Dh):
    # Why rope_forward computes its angles in float64. Near position 10^5 the fast pairs' angles are
    # 3e4 to 1e5 rad, where float32 numbers are 2^-9 to 2^-7 apart: even the float32 number nearest to
    # each exact angle misses it by up to ~1e-3 rad (Dh = 16) to ~4e-3 rad (Dh = 64). That floor follows
    # from the float32 format, not from how some CPU's pow rounds, and it is over 50x the 1e-5 RoPE keeps.
    pairs, position = np.arange(Dh // 2), np.arange(99_900, 100_001)
    exact = position[:, None] * 10000.0 ** (-2.0 * pairs / Dh)                # (101, Dh/2) float64
    nearest_float32 = exact.astype(np.float32).astype(np.float64)
    floor = np.abs(nearest_float32 - exact).max()
    assert floor > 50 * 1e-5
    # So the formula evaluated in float32 misses by at least as much, whatever its pow returns:
    single = (position[:, None].astype(np.float32)
              * np.float32(10000.0) ** (np.float32(-2.0) * pairs.astype(np.float32) / np.float32(Dh)))
    assert np.abs(single.astype(np.float64) - exact).max() >= floor


# ----------------------------------------------------------------------------------------------------
# Sinusoidal encoding


def shift_rotation(k, D, base=10000.0):
    """The (D, D) block-diagonal map with PE[pos + k] = PE[pos] @ M (row-vector layout)."""
    M = np.zeros((D, D))
    for i in range(D // 2):
        angle = k * base ** (-2 * i / D)
        c, s = math.cos(angle), math.sin(angle)
        # (sin a, cos a) @ [[c, -s], [s, c]] = (sin(a + angle), cos(a + angle))
        M[2 * i:2 * i + 2, 2 * i:2 * i + 2] = [[c, -s], [s, c]]
    return M


@given(half=st.integers(1, 16), k=st.integers(1, 40), T=st.integers(1, 60))
def test_sinusoidal_shift_is_a_fixed_rotation_of_every_position(xp, half, k, T):
    D = 2 * half
    pe = to_numpy(sinusoidal_encoding(T + k, D, dtype=np.float64, xp=xp))
    M = shift_rotation(k, D)
    np.testing.assert_allclose(M @ M.T, np.eye(D), atol=1e-12)    # M is a rotation (orthogonal)
    # one M for every pos; float64 sin/cos of angles below 100 rad: rounding ~1e-14
    np.testing.assert_allclose(pe[:T] @ M, pe[k:], rtol=0, atol=1e-12)


def test_sinusoidal_odd_width_shift_rotates_all_but_the_last_column():
    D, k = 7, 5
    pe = sinusoidal_encoding(30 + k, D, dtype=np.float64)
    # the first D - 1 columns are three full (sin, cos) pairs, frequencies base^(-2i/D) with D = 7
    M = shift_rotation(k, D)[:D - 1, :D - 1]
    # float64 rounding only
    np.testing.assert_allclose(pe[:30, :D - 1] @ M, pe[k:, :D - 1], rtol=0, atol=1e-12)
    # the last column is the formula's lone sine, 2i = D - 1
    np.testing.assert_allclose(pe[:, D - 1], np.sin(np.arange(30 + k) / 10000.0 ** ((D - 1) / D)), rtol=1e-14)


@pytest.mark.parametrize("pos, column, D", [(0, 0, 4), (0, 1, 4), (7, 2, 4), (7, 3, 4), (50, 10, 512),
                                            (50, 11, 512), (1999, 510, 512), (3, 4, 5)])
def test_sinusoidal_matches_the_formula_entry_by_entry(pos, column, D):
    pe = sinusoidal_encoding(pos + 1, D, dtype=np.float64)
    two_i = column - column % 2
    angle = pos / 10000.0 ** (two_i / D)
    expected = math.sin(angle) if column % 2 == 0 else math.cos(angle)
    # float64 rounding only (the table uses pos * base^(-2i/D), the formula pos / base^(2i/D))
    assert pe[pos, column] == pytest.approx(expected, rel=1e-12, abs=1e-13)


@given(T=st.integers(1, 200), D=st.integers(1, 64))
def test_sinusoidal_values_lie_between_minus_one_and_one(xp, T, D):
    pe = to_numpy(sinusoidal_encoding(T, D, xp=xp))
    assert pe.shape == (T, D) and pe.dtype == np.float32
    assert np.all(np.abs(pe) <= 1)


# ----------------------------------------------------------------------------------------------------
# Learned absolute positions


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 4), D=st.integers(1, 3), extra=st.integers(0, 3))
def test_learned_positions_gradients_match_finite_differences(seed, B, T, D, extra):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D))
    table = init_learned_positions(T + extra, D, rng, dtype=np.float64)
    dout = random_like(x, rng)
    out, cache = learned_position_forward(x, table)
    np.testing.assert_array_equal(out, x + table[:T])         # exactly one addition
    dx, dtable = learned_position_backward(dout, cache)
    assert dtable.shape == table.shape and np.all(dtable[T:] == 0)   # unused rows get nothing

    def loss():
        return float((learned_position_forward(x, table)[0] * dout).sum())
    check_gradients(loss, [x, table], [dx, dtable])


def test_learned_positions_reject_sequences_longer_than_the_table():
    table = init_learned_positions(4, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"T=5.*max_len=4"):
        learned_position_forward(np.zeros((2, 5, 3), np.float32), table)


def test_learned_positions_start_with_standard_deviation_0_02():
    table = init_learned_positions(128, 64, np.random.default_rng(0))
    assert table.shape == (128, 64) and table.dtype == np.float32
    # 8192 draws: the sample std is within ~1% of 0.02, 3% leaves room
    assert abs(table.std() - 0.02) < 0.03 * 0.02 and abs(table.mean()) < 1e-3


# ----------------------------------------------------------------------------------------------------
# ALiBi


def test_alibi_slopes_for_8_and_16_heads_are_the_papers():
    np.testing.assert_array_equal(alibi_slopes(8, np.float64), [1 / 2 ** n for n in range(1, 9)])
    # 2^(-n/2) computed two ways: one rounding apart
    np.testing.assert_allclose(alibi_slopes(16, np.float64), [2 ** (-n / 2) for n in range(1, 17)], rtol=1e-15)


def test_alibi_slopes_for_heads_not_a_power_of_two_interleave_the_next_power():
    # 6 heads: the 4-head slopes, then the 1st and 3rd of the 8-head slopes
    np.testing.assert_array_equal(alibi_slopes(6, np.float64), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])
    # 12 heads: the 8-head slopes, then the 1st, 3rd, 5th, 7th of the 16-head slopes
    expected = [2.0 ** -n for n in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    np.testing.assert_allclose(alibi_slopes(12, np.float64), expected, rtol=1e-15)   # one rounding apart


@given(H=st.integers(1, 100))
def test_alibi_slopes_are_distinct_and_between_zero_and_one(H):
    slopes = alibi_slopes(H, np.float64)
    assert slopes.shape == (H,) and np.all((slopes > 0) & (slopes < 1))
    assert len(np.unique(slopes)) == H


@given(H=st.integers(1, 12), T=st.integers(1, 8), data=st.data())
def test_alibi_bias_is_minus_slope_times_distance_bottom_right_aligned(xp, H, T, data):
    S = data.draw(st.integers(T, 12))
    bias = to_numpy(alibi_bias(H, T, S, dtype=np.float64, xp=xp))
    assert bias.shape == (H, T, S)
    slopes = alibi_slopes(H, np.float64)
    for h, i, j in [(0, 0, 0), (H - 1, T - 1, 0), (H // 2, T // 2, S - 1)]:
        assert bias[h, i, j] == -slopes[h] * abs(i + (S - T) - j)
    # zero where query i meets its own position i + S - T; the last query meets the last key
    assert np.all(bias[:, np.arange(T), np.arange(T) + S - T] == 0)
    # T queries at the end of S keys see exactly the last T rows of the full S x S bias
    np.testing.assert_array_equal(bias, to_numpy(alibi_bias(H, S, S, dtype=np.float64, xp=xp))[:, S - T:])


# ----------------------------------------------------------------------------------------------------
# dtypes and purity


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_function_keeps_the_dtype_it_is_given(xp, dtype):
    rng = np.random.default_rng(0)
    x = random_array(rng, (2, 3, 4), dtype, xp)
    assert sinusoidal_encoding(3, 4, dtype=dtype, xp=xp).dtype == dtype
    assert alibi_slopes(4, dtype).dtype == dtype
    assert alibi_bias(4, 3, 5, dtype=dtype, xp=xp).dtype == dtype
    table = xp.asarray(init_learned_positions(5, 4, rng, dtype))
    assert table.dtype == dtype
    out, cache = learned_position_forward(x, table)
    assert out.dtype == dtype and all(g.dtype == dtype for g in learned_position_backward(out, cache))
    out, cache = rope_forward(x, offset=7)
    assert out.dtype == dtype and rope_backward(out, cache).dtype == dtype


def test_inputs_are_never_modified(xp):
    rng = np.random.default_rng(0)
    x, dout = random_array(rng, (2, 3, 4), xp=xp), random_array(rng, (2, 3, 4), xp=xp)
    table = xp.asarray(init_learned_positions(5, 4, rng, np.float64))
    saved = [a.copy() for a in (x, dout, table)]
    _, cache = rope_forward(x)
    rope_backward(dout, cache)
    _, cache = learned_position_forward(x, table)
    dx, _ = learned_position_backward(dout, cache)
    dx += 1                                                    # a caller accumulating into dx
    for before, after in zip(saved, (x, dout, table)):
        np.testing.assert_array_equal(to_numpy(after), to_numpy(before))


# ----------------------------------------------------------------------------------------------------
# Caches and the edges of good input


def test_caches_are_dicts_with_the_fields_the_docstrings_name(xp):
    rng = np.random.default_rng(0)
    x = random_array(rng, (2, 3, 4), np.float32, xp)
    _, cache = rope_forward(x, offset=5)
    assert set(cache) == {"cos", "sin", "x_shape"} and cache["x_shape"] == (2, 3, 4)
    assert cache["cos"].shape == cache["sin"].shape == (3, 2) and cache["cos"].dtype == np.float32
    table = xp.asarray(init_learned_positions(6, 4, rng))
    _, cache = learned_position_forward(x, table)
    assert cache == {"x_shape": (2, 3, 4), "table_shape": (6, 4), "dtype": np.float32}


@pytest.mark.parametrize("shape", [(2, 0, 4), (0, 3, 4), (0, 4)])
def test_empty_sequences_pass_through_forward_and_backward(xp, shape):
    # T = 0 (no token) or an empty batch: nothing to add or rotate, and no table row gets gradient.
    rng = np.random.default_rng(0)
    x = random_array(rng, shape, xp=xp)
    table = random_array(rng, (5, 4), xp=xp)
    out, cache = learned_position_forward(x, table)
    dx, dtable = learned_position_backward(xp.ones_like(out), cache)
    assert out.shape == dx.shape == shape and dtable.shape == (5, 4) and not to_numpy(dtable).any()
    out, cache = rope_forward(x, offset=3)
    assert out.shape == rope_backward(xp.ones_like(out), cache).shape == shape
    assert sinusoidal_encoding(0, 4, xp=xp).shape == (0, 4) and alibi_bias(2, 0, 0, xp=xp).shape == (2, 0, 0)


def test_numpy_integers_are_accepted_as_sizes_and_offsets(xp):
    x = random_array(np.random.default_rng(0), (3, 4), xp=xp)
    np.testing.assert_array_equal(to_numpy(rope_forward(x, offset=np.int64(7))[0]), to_numpy(rope_forward(x, 7)[0]))
    assert sinusoidal_encoding(np.int32(3), np.int64(4), xp=xp).shape == (3, 4)
    assert alibi_bias(np.int64(2), np.int64(3), np.int64(5), xp=xp).shape == (2, 3, 5)


# ----------------------------------------------------------------------------------------------------
# Bad input: every one raises ValueError or TypeError naming the argument, what it got and what it needs


def good_x(xp, shape=(2, 3, 4), dtype=np.float64):
    return random_array(np.random.default_rng(0), shape, dtype, xp)


def rope_then_backward(make_dout=None, make_cache=None):
    """rope_backward after a good rope_forward of a float64 (2, 3, 4) x, with dout or cache replaced."""
    def call(xp):
        out, cache = rope_forward(good_x(xp))
        return rope_backward(xp.ones_like(out) if make_dout is None else make_dout(xp, out),
                             cache if make_cache is None else make_cache(cache))
    return call


def learned_then_backward(make_dout=None, make_cache=None):
    """learned_position_backward after a good forward of a float64 (2, 3, 4) x and a (5, 4) table."""
    def call(xp):
        out, cache = learned_position_forward(good_x(xp), good_x(xp, (5, 4)))
        return learned_position_backward(xp.ones_like(out) if make_dout is None else make_dout(xp, out),
                                         cache if make_cache is None else make_cache(cache))
    return call


SIZE = r"must be an integer >= "
BAD_CALLS = {
    # RoPE
    "rope odd width": (lambda xp: rope_forward(good_x(xp, (2, 3, 5))), ValueError,
                       r"x must have an even head width Dh >= 2 \(RoPE rotates pairs\), got shape \(2, 3, 5\)"),
    "rope zero width": (lambda xp: rope_forward(good_x(xp, (2, 3, 0))), ValueError,
                        r"x must have an even head width Dh >= 2"),
    "rope integer x": (lambda xp: rope_forward(xp.zeros((2, 3), np.int64)), TypeError,
        r"x must be a floating-point array \(\.\.\., T, Dh\), got \w+ array of dtype int64, shape \(2, 3\)"),
    "rope boolean x": (lambda xp: rope_forward(xp.zeros((2, 4), bool)), TypeError,
                       r"x must be a floating-point array .*bool"),
    "rope x a list": (lambda xp: rope_forward([[0.0] * 4] * 3), TypeError,
                      r"x must be a floating-point array .*got list of length 3"),
    "rope x None": (lambda xp: rope_forward(None), TypeError, r"x must be a floating-point array .*got None"),
    "rope rank 1": (lambda xp: rope_forward(good_x(xp, (4,))), ValueError,
                    r"x must have shape \(\.\.\., T, Dh\), got \(4,\)"),
    "rope offset -1": (lambda xp: rope_forward(good_x(xp), offset=-1), ValueError, r"offset " + SIZE + r"0, got -1"),
    "rope offset 2.5": (lambda xp: rope_forward(good_x(xp), offset=2.5), ValueError,
                        r"offset " + SIZE + r"0, got 2\.5"),
    "rope offset True": (lambda xp: rope_forward(good_x(xp), offset=True), ValueError,
                         r"offset " + SIZE + r"0, got True"),
    "rope offset None": (lambda xp: rope_forward(good_x(xp), offset=None), ValueError,
                         r"offset " + SIZE + r"0, got None"),
    "rope offset an array": (lambda xp: rope_forward(good_x(xp), offset=xp.arange(3)), ValueError,
                             r"offset " + SIZE + r"0, got \w+ array of dtype int64, shape \(3,\)"),
    "rope base 0": (lambda xp: rope_forward(good_x(xp), base=0), ValueError,
                    r"base must be a finite number > 0, got 0"),
    "rope base negative": (lambda xp: rope_forward(good_x(xp), base=-10000.0), ValueError,
                           r"base must be a finite number > 0, got -10000\.0"),
    "rope base nan": (lambda xp: rope_forward(good_x(xp), base=float("nan")), ValueError,
                      r"base must be a finite number > 0, got nan"),
    "rope base inf": (lambda xp: rope_forward(good_x(xp), base=np.inf), ValueError,
                      r"base must be a finite number > 0, got inf"),
    "rope base a string": (lambda xp: rope_forward(good_x(xp), base="10000"), TypeError,
                           r"base must be a number, got '10000'"),
    "rope base None": (lambda xp: rope_forward(good_x(xp), base=None), TypeError, r"base must be a number, got None"),
    "rope dout of another dtype": (rope_then_backward(lambda xp, out: out.astype(np.float32)), TypeError,
                                   r"dout must have dtype float64 \(the forward's\), got float32"),
    "rope dout with an extra axis": (rope_then_backward(lambda xp, out: out[None]), ValueError,
                                     r"dout must have shape \(2, 3, 4\) \(the forward output's\), got \(1, 2, 3, 4\)"),
    "rope dout broadcastable": (rope_then_backward(lambda xp, out: out[:1]), ValueError,
                                r"dout must have shape \(2, 3, 4\) .*got \(1, 3, 4\)"),
    "rope dout without the batch axis": (rope_then_backward(lambda xp, out: out[0]), ValueError,
                                         r"dout must have shape \(2, 3, 4\) .*got \(3, 4\)"),
    "rope dout a list": (rope_then_backward(lambda xp, out: [0.0] * 4), TypeError,
                         r"dout must be an array of dtype float64, got list of length 4"),
    "rope dout None": (rope_then_backward(lambda xp, out: None), TypeError,
                       r"dout must be an array of dtype float64, got None"),
    "rope cache a tuple": (rope_then_backward(make_cache=lambda c: (c["cos"], c["sin"])), TypeError,
                           r"cache must be the dict rope_forward returned, got tuple of length 2"),
    "rope cache of learned positions": (
        lambda xp: rope_backward(xp.ones((2, 3, 4)), learned_position_forward(good_x(xp), good_x(xp, (5, 4)))[1]),
        TypeError, r"cache must be the dict rope_forward returned"),
    # learned positions
    "learned table of another width": (lambda xp: learned_position_forward(good_x(xp, (2, 3)), good_x(xp, (5, 4))),
        ValueError, r"table must have shape \(max_len, 3\) to match x \(2, 3\), got \(5, 4\)"),
    "learned table rank 3": (lambda xp: learned_position_forward(good_x(xp, (2, 3)), good_x(xp, (1, 5, 3))),
                             ValueError, r"table must have shape \(max_len, 3\) to match x \(2, 3\), got \(1, 5, 3\)"),
    "learned table of another dtype": (
        lambda xp: learned_position_forward(good_x(xp, (2, 3), np.float32), good_x(xp, (5, 3))),
        TypeError, r"table must have dtype float32 \(x's\), got float64"),
    "learned table integer": (lambda xp: learned_position_forward(good_x(xp, (2, 3)), xp.zeros((5, 3), np.int64)),
                              TypeError, r"table must be a floating-point array \(max_len, D\), got .*int64"),
    "learned table a list": (lambda xp: learned_position_forward(good_x(xp, (2, 3)), [[0.0] * 3] * 5),
                             TypeError, r"table must be a floating-point array \(max_len, D\), got list of length 5"),
    "learned x rank 1": (lambda xp: learned_position_forward(good_x(xp, (3,)), good_x(xp, (5, 3))),
                         ValueError, r"x must have shape \(\.\.\., T, D\), got \(3,\)"),
    "learned x integer": (lambda xp: learned_position_forward(xp.zeros((2, 3), np.int32), good_x(xp, (5, 3))),
                          TypeError, r"x must be a floating-point array \(\.\.\., T, D\).*int32"),
    "learned sequence longer than the table": (
        lambda xp: learned_position_forward(good_x(xp, (2, 6, 3)), good_x(xp, (5, 3))),
        ValueError, r"x has T=6 positions \(shape \(2, 6, 3\)\) but table holds only max_len=5 \(shape \(5, 3\)\)"),
    "learned dout of another dtype": (learned_then_backward(lambda xp, out: out.astype(np.float32)), TypeError,
                                      r"dout must have dtype float64 \(the forward's\), got float32"),
    "learned dout with an extra axis": (learned_then_backward(lambda xp, out: out[None]), ValueError,
        r"dout must have shape \(2, 3, 4\) \(the forward output's\), got \(1, 2, 3, 4\)"),
    "learned dout broadcastable": (learned_then_backward(lambda xp, out: out[..., :1]), ValueError,
                                   r"dout must have shape \(2, 3, 4\) .*got \(2, 3, 1\)"),
    "learned dout a number": (learned_then_backward(lambda xp, out: 0.0), TypeError,
                              r"dout must be an array of dtype float64, got 0\.0"),
    "learned cache a shape": (learned_then_backward(make_cache=lambda c: c["table_shape"]), TypeError,
                              r"cache must be the dict learned_position_forward returned, got tuple of length 2"),
    "learned init max_len 2.5": (lambda xp: init_learned_positions(2.5, 4, np.random.default_rng(0)), ValueError,
                                 r"max_len " + SIZE + r"1, got 2\.5"),
    "learned init max_len 0": (lambda xp: init_learned_positions(0, 4, np.random.default_rng(0)), ValueError,
                               r"max_len " + SIZE + r"1, got 0"),
    "learned init D -1": (lambda xp: init_learned_positions(4, -1, np.random.default_rng(0)), ValueError,
                          r"D " + SIZE + r"1, got -1"),
    "learned init rng a seed": (lambda xp: init_learned_positions(4, 3, 0), TypeError,
        r"rng must be a numpy\.random\.Generator \(numpy\.random\.default_rng\(seed\)\), got 0"),
    "learned init legacy RandomState": (lambda xp: init_learned_positions(4, 3, np.random.RandomState(0)), TypeError,
                                        r"rng must be a numpy\.random\.Generator .*RandomState"),
    "learned init integer dtype": (lambda xp: init_learned_positions(4, 3, np.random.default_rng(0), np.int32),
                                   TypeError, r"dtype must be a floating-point dtype such as numpy\.float32, got int32"),
    # sinusoidal encoding
    "sinusoidal D 0": (lambda xp: sinusoidal_encoding(4, 0, xp=xp), ValueError, r"D " + SIZE + r"1, got 0"),
    "sinusoidal T -1": (lambda xp: sinusoidal_encoding(-1, 8, xp=xp), ValueError, r"T " + SIZE + r"0, got -1"),
    "sinusoidal T 4.0": (lambda xp: sinusoidal_encoding(4.0, 8, xp=xp), ValueError, r"T " + SIZE + r"0, got 4\.0"),
    "sinusoidal D a string": (lambda xp: sinusoidal_encoding(4, "8", xp=xp), ValueError, r"D " + SIZE + r"1, got '8'"),
    "sinusoidal integer dtype": (lambda xp: sinusoidal_encoding(4, 8, dtype=np.int32, xp=xp), TypeError,
                                 r"dtype must be a floating-point dtype such as numpy\.float32, got int32"),
    "sinusoidal boolean dtype": (lambda xp: sinusoidal_encoding(4, 8, dtype=bool, xp=xp), TypeError,
                                 r"dtype must be a floating-point dtype such as numpy\.float32, got bool"),
    "sinusoidal dtype not a dtype": (lambda xp: sinusoidal_encoding(4, 8, dtype=[1], xp=xp), TypeError,
                                     r"dtype must be a floating-point dtype such as numpy\.float32, got list of length 1"),
    "sinusoidal base 0": (lambda xp: sinusoidal_encoding(4, 8, base=0.0, xp=xp), ValueError,
                          r"base must be a finite number > 0, got 0\.0"),
    "sinusoidal base -1": (lambda xp: sinusoidal_encoding(4, 8, base=-1, xp=xp), ValueError,
                           r"base must be a finite number > 0, got -1"),
    "sinusoidal base inf": (lambda xp: sinusoidal_encoding(4, 8, base=float("inf"), xp=xp), ValueError,
                            r"base must be a finite number > 0, got inf"),
    "sinusoidal base an array": (lambda xp: sinusoidal_encoding(4, 8, base=xp.ones(1), xp=xp), TypeError,
                                 r"base must be a number, got \w+ array"),
    "sinusoidal dtype None": (lambda xp: sinusoidal_encoding(4, 8, dtype=None, xp=xp), TypeError,
                              r"dtype must be a floating-point dtype such as numpy\.float32, got None"),
    "sinusoidal xp a string": (lambda xp: sinusoidal_encoding(4, 8, xp="numpy"), TypeError,
                               r"xp must be an array module \(numpy or cupy\), got 'numpy'"),
    # ALiBi
    "alibi_slopes H 0": (lambda xp: alibi_slopes(0), ValueError, r"H " + SIZE + r"1, got 0"),
    "alibi_slopes H 2.0": (lambda xp: alibi_slopes(2.0), ValueError, r"H " + SIZE + r"1, got 2\.0"),
    "alibi_slopes H True": (lambda xp: alibi_slopes(True), ValueError, r"H " + SIZE + r"1, got True"),
    "alibi_slopes integer dtype": (lambda xp: alibi_slopes(4, np.int64), TypeError,
                                   r"dtype must be a floating-point dtype such as numpy\.float32, got int64"),
    "alibi_bias T -1": (lambda xp: alibi_bias(4, -1, 3, xp=xp), ValueError, r"T " + SIZE + r"0, got -1"),
    "alibi_bias S 2.5": (lambda xp: alibi_bias(4, 2, 2.5, xp=xp), ValueError, r"S " + SIZE + r"0, got 2\.5"),
    "alibi_bias H -2": (lambda xp: alibi_bias(-2, 2, 3, xp=xp), ValueError, r"H " + SIZE + r"1, got -2"),
    "alibi_bias integer dtype": (lambda xp: alibi_bias(4, 2, 3, dtype=np.int32, xp=xp), TypeError,
                                 r"dtype must be a floating-point dtype such as numpy\.float32, got int32"),
    "alibi_bias xp None": (lambda xp: alibi_bias(4, 2, 3, xp=None), TypeError,
                           r"xp must be an array module \(numpy or cupy\), got None"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_naming_the_argument_what_it_got_and_what_it_needs(xp, name):
    call, error, message = BAD_CALLS[name]
    with pytest.raises(error, match=message):
        call(xp)


@pytest.mark.cupy_on_cpu
def test_a_table_or_dout_on_another_array_module_is_refused():
    import cupy_on_cpu as cp
    x = cp.asarray(good_x(np))
    with pytest.raises(TypeError, match=r"table must be a cupy_on_cpu array like x, got numpy array"):
        learned_position_forward(x, good_x(np, (5, 4)))
    out, cache = rope_forward(x)
    with pytest.raises(TypeError, match=r"dout must be a cupy_on_cpu array like the forward's inputs, got numpy"):
        rope_backward(np.ones((2, 3, 4)), cache)


# ----------------------------------------------------------------------------------------------------
# Any input at all: a clear error, or a result whose backward accepts its own output's shape


@given(data=st.data(), T=st.integers(0, 3), offset=st.sampled_from([0] * 4 + [3, -1, 2.5, None, True]),
       base=st.sampled_from([10000.0] * 4 + [500, 0, -1.0, float("nan"), float("inf"), "1e4", None]))
def test_any_input_to_rope_gives_a_clear_error_or_a_result_its_backward_accepts(data, T, offset, base):
    x = data.draw(spoiled(np.random.default_rng(0).standard_normal((2, T, 4))))
    try:
        out, cache = rope_forward(x, offset=offset, base=base)
    except (ValueError, TypeError) as error:   # the message starts with the argument's name
        assert str(error).split()[0] in {"x", "offset", "base"}, error
        return
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rope_backward(np.ones_like(out), cache).shape == x.shape


@given(data=st.data(), T=st.integers(0, 4), wrong=st.sampled_from(["nothing", "x", "table"]))
def test_any_input_to_learned_positions_gives_a_clear_error_or_a_result_its_backward_accepts(data, T, wrong):
    rng = np.random.default_rng(0)
    x, table = rng.standard_normal((2, T, 3)), rng.standard_normal((4, 3))
    x, table = (data.draw(spoiled(a)) if name == wrong else a for name, a in (("x", x), ("table", table)))
    try:
        out, cache = learned_position_forward(x, table)
    except (ValueError, TypeError) as error:   # the message starts with the argument's name
        assert str(error).split()[0] in {"x", "table"}, error
        return
    assert out.shape == x.shape and out.dtype == x.dtype
    dx, dtable = learned_position_backward(np.ones_like(out), cache)
    assert dx.shape == x.shape and dtable.shape == table.shape

"""Tests for positional.py: each test name is the property it proves."""
import math
import os
import runpy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attention import attention_forward
from gradcheck import check_gradients, random_like
from positional import (alibi_bias, alibi_slopes, init_learned_positions, learned_position_backward,
                        learned_position_forward, rope_backward, rope_forward, sinusoidal_encoding)

seeds = st.integers(0, 2**32 - 1)


def to_numpy(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def random_array(xp, rng, shape, dtype=np.float64):
    return xp.asarray(rng.standard_normal(shape).astype(dtype))


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
    x = random_array(xp, rng, (T, D))
    perm = xp.asarray(non_identity_permutation(rng, T))
    out, _ = attention_forward(x, x, x)
    out_of_permuted, _ = attention_forward(x[perm], x[perm], x[perm])
    # float64 rounding only: the same sums in another order
    np.testing.assert_allclose(to_numpy(out_of_permuted), to_numpy(out[perm]), rtol=1e-12, atol=1e-12)


@given(seed=seeds, T=st.integers(2, 7), D=st.integers(1, 6))
def test_adding_sinusoidal_positions_breaks_permutation_equivariance(xp, seed, T, D):
    rng = np.random.default_rng(seed)
    x = random_array(xp, rng, (T, D))
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
    x = random_array(xp, rng, (T, 2 * half))
    perm = xp.asarray(non_identity_permutation(rng, T))
    out, _ = attention_forward(rope(x), rope(x), x)
    out_of_permuted, _ = attention_forward(rope(x[perm]), rope(x[perm]), x[perm])
    # without positions the two agree to 1e-12 (rounding); a gap above 1e-8 is a real difference
    # (it is small only when the tokens are nearly parallel, which random vectors almost never are)
    assert np.abs(to_numpy(out_of_permuted) - to_numpy(out[perm])).max() > 1e-8


def test_demo_runs_and_tells_the_two_sentences_apart_only_with_positions(capsys):
    # the demo asserts its own claims; this runs it so they are checked with the suite
    runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "positional.py"), run_name="__main__")
    assert "no positions" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# RoPE


@given(seed=seeds, half=st.integers(1, 8), i=st.integers(0, 50), j=st.integers(0, 50),
       shift=st.integers(0, 5000))
def test_rope_score_depends_only_on_relative_position(xp, seed, half, i, j, shift):
    rng = np.random.default_rng(seed)
    q, k = random_array(xp, rng, (1, 2 * half)), random_array(xp, rng, (1, 2 * half))
    score = float((rope(q, i) * rope(k, j)).sum())
    shifted = float((rope(q, i + shift) * rope(k, j + shift)).sum())
    # float64 rounding of cos/sin at angles up to ~5000 rad: ~1e-12 relative
    assert shifted == pytest.approx(score, rel=1e-9, abs=1e-9)


@given(seed=seeds, B=st.integers(1, 3), T=st.integers(1, 6), half=st.integers(1, 5),
       offset=st.integers(0, 1000))
def test_rope_preserves_vector_norms(xp, seed, B, T, half, offset):
    x = random_array(xp, np.random.default_rng(seed), (B, T, 2 * half))
    norms, rotated_norms = xp.linalg.norm(x, axis=-1), xp.linalg.norm(rope(x, offset), axis=-1)
    # a rotation in float64: equal up to rounding
    np.testing.assert_allclose(to_numpy(rotated_norms), to_numpy(norms), rtol=1e-12)


@given(seed=seeds, T=st.integers(1, 6), half=st.integers(1, 5), offset=st.integers(0, 1000))
def test_rope_backward_is_the_inverse_rotation(xp, seed, T, half, offset):
    x = random_array(xp, np.random.default_rng(seed), (2, T, 2 * half))
    out, cache = rope_forward(x, offset=offset)
    # rotating back and forth in float64: rounding only
    np.testing.assert_allclose(to_numpy(rope_backward(out, cache)), to_numpy(x), rtol=1e-12, atol=1e-12)


@given(seed=seeds, total=st.integers(2, 12), half=st.integers(1, 4), data=st.data())
def test_rope_with_offset_equals_the_same_rows_of_the_whole_sequence(xp, seed, total, half, data):
    start = data.draw(st.integers(0, total - 1))
    stop = data.draw(st.integers(start + 1, total))
    x = random_array(xp, np.random.default_rng(seed), (3, total, 2 * half))
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


@pytest.mark.parametrize("Dh, low, high", [(16, 5e-4, 5e-3), (64, 5e-3, 5e-2)])
def test_float32_angles_would_be_off_by_the_amount_the_docstring_says(Dh, low, high):
    # Why rope_forward computes its angles in float64: the same formula in float32 misses by
    # ~1e-3 rad (Dh = 16) to ~1e-2 rad (Dh = 64) at position 10^5, far above the 1e-5 it keeps.
    pairs, position = np.arange(Dh // 2), np.arange(99_900, 100_001)
    exact = position[:, None] * 10000.0 ** (-2.0 * pairs / Dh)
    single = (position[:, None].astype(np.float32)
              * np.float32(10000.0) ** (np.float32(-2.0) * pairs.astype(np.float32) / np.float32(Dh)))
    error = np.abs(single.astype(np.float64) - exact).max()
    assert low < error < high


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
# dtypes, purity, bad input


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_function_keeps_the_dtype_it_is_given(xp, dtype):
    rng = np.random.default_rng(0)
    x = random_array(xp, rng, (2, 3, 4), dtype)
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
    x, dout = random_array(xp, rng, (2, 3, 4)), random_array(xp, rng, (2, 3, 4))
    table = xp.asarray(init_learned_positions(5, 4, rng, np.float64))
    saved = [a.copy() for a in (x, dout, table)]
    _, cache = rope_forward(x)
    rope_backward(dout, cache)
    _, cache = learned_position_forward(x, table)
    dx, _ = learned_position_backward(dout, cache)
    dx += 1                                                    # a caller accumulating into dx
    for before, after in zip(saved, (x, dout, table)):
        np.testing.assert_array_equal(to_numpy(after), to_numpy(before))


@pytest.mark.parametrize("call, error, message", [
    (lambda: rope_forward(np.zeros((2, 3, 5))), ValueError, r"x .*even.*\(2, 3, 5\)"),
    (lambda: rope_forward(np.zeros((2, 3), np.int64)), TypeError, r"x must be a floating-point.*int64"),
    (lambda: rope_forward(np.zeros(4)), ValueError, r"x must have shape \(\.\.\., T, Dh\), got \(4,\)"),
    (lambda: rope_forward(np.zeros((3, 4)), offset=-1), ValueError, r"offset .*-1"),
    (lambda: learned_position_forward(np.zeros((2, 3)), np.zeros((5, 4))), ValueError,
     r"table must have shape \(max_len, 3\).*\(2, 3\).*\(5, 4\)"),
    (lambda: learned_position_forward(np.zeros((2, 3), np.float32), np.zeros((5, 3))), TypeError,
     r"table .*float32.*float64"),
    (lambda: learned_position_forward(np.zeros(3), np.zeros((5, 3))), ValueError, r"x must have shape"),
    (lambda: sinusoidal_encoding(4, 0), ValueError, r"D must be an integer >= 1, got 0"),
    (lambda: sinusoidal_encoding(4, 8, dtype=np.int32), TypeError, r"dtype .*int32"),
    (lambda: alibi_slopes(0), ValueError, r"H must be an integer >= 1, got 0"),
    (lambda: alibi_bias(4, -1, 3), ValueError, r"T must be an integer >= 0, got -1"),
    (lambda: alibi_bias(4, 2, 3, dtype=np.int32), TypeError, r"dtype .*int32"),
    (lambda: init_learned_positions(2.5, 4, np.random.default_rng(0)), ValueError, r"max_len .*2\.5"),
])
def test_bad_input_raises_naming_the_argument_and_what_it_needs(call, error, message):
    with pytest.raises(error, match=message):
        call()

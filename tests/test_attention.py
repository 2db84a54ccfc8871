"""Tests for attention.py: softmax, causal_mask, attention_forward / attention_backward.

Every property is checked by hypothesis over shapes (0-2 leading axes, T and S from 1 to 12), seeds and
dtypes, with the `xp` fixture (NumPy, and CuPy where a GPU is present). Gradients are checked against
central finite differences in float64 with a random upstream gradient, and against PyTorch's
scaled_dot_product_attention where PyTorch is installed.
"""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

from attention import attention_backward, attention_forward, causal_mask, softmax, softmax_backward
from gradcheck import check_gradients, random_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([np.float32, np.float64])
leading_axes = st.lists(st.integers(1, 3), max_size=2).map(tuple)
lengths = st.integers(1, 12)
widths = st.integers(1, 6)

# Agreement between two computations of the same quantity in a different order (a permuted sum, a
# shifted row): float32 keeps ~7 digits, float64 ~16, and rounding grows a little with T, S and D.
TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}

# check_gradients' default atol=1e-9 assumes a loss near 1; ours sum up to ~140 terms, and each difference
# quotient carries the loss's rounding, ~|L| * 1e-16 / 1e-6: up to 3e-9 measured over 3000 random cases.
FD_ATOL = 2e-8


def to_numpy(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def randn(xp, rng, shape, dtype=np.float64):
    """A standard-normal array of `shape` and `dtype` built by `xp`."""
    return xp.asarray(rng.standard_normal(shape).astype(dtype))


def allowed_keys(T, S, lead, mask=None, causal=False):
    """The boolean (lead..., T, S) of keys each query may attend, written out independently."""
    allowed = np.ones(lead + (T, S), dtype=bool)
    if mask is not None:
        allowed &= to_numpy(mask)
    if causal:
        allowed &= np.array([[j <= i + (S - T) for j in range(S)] for i in range(T)])
    return allowed


# ----------------------------------------------------------------------------------------------------
# softmax


@given(lead=leading_axes, S=lengths, seed=seeds, dtype=dtypes, axis=st.sampled_from([0, -1]))
def test_softmax_rows_are_non_negative_and_sum_to_one(xp, lead, S, seed, dtype, axis):
    x = randn(xp, np.random.default_rng(seed), lead + (S,), dtype) * 5
    y = softmax(x, axis=axis)
    assert y.dtype == dtype and y.shape == x.shape
    assert bool((y >= 0).all())
    np.testing.assert_allclose(to_numpy(y.sum(axis=axis)), 1.0, **TOL[dtype])


@given(lead=leading_axes, S=lengths, seed=seeds, dtype=dtypes)
def test_softmax_is_invariant_to_adding_a_constant_to_a_row(xp, lead, S, seed, dtype):
    rng = np.random.default_rng(seed)
    x = randn(xp, rng, lead + (S,), dtype)
    shift = xp.asarray(rng.uniform(-50, 50, lead + (1,)).astype(dtype))  # one constant per row
    # x + shift rounds each logit to the precision of |shift| <= 50: 50 * 6e-8 ~ 3e-6 in float32.
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == np.float32 else TOL[dtype]
    np.testing.assert_allclose(to_numpy(softmax(x + shift)), to_numpy(softmax(x)), **tol)


def reference_softmax(x):
    """y_j = 1 / sum_k exp(x_k - x_j): no max subtracted, so it checks softmax by another route.

    Far-below-max entries overflow the sum to inf and correctly give 1 / inf = 0.
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        return 1.0 / np.exp(x[..., None, :] - x[..., :, None]).sum(axis=-1)


# Logits of size 1e4 (exp(1e4) overflows even float64), mixed signs in one row, each exactly
# representable in float32: a huge level plus a small integer offset.
huge_rows = st.lists(st.tuples(st.sampled_from([-1e4, 0.0, 1e4]), st.integers(-8, 8)),
                     min_size=1, max_size=10).map(lambda row: [level + offset for level, offset in row])


@given(rows=st.lists(huge_rows, min_size=1, max_size=4), dtype=dtypes)
def test_softmax_of_huge_logits_stays_finite_and_correct(xp, rows, dtype):
    S = max(len(row) for row in rows)
    x = np.array([row + [-1e4] * (S - len(row)) for row in rows])   # pad short rows with a huge negative
    y = softmax(xp.asarray(x.astype(dtype)))
    assert y.dtype == dtype
    assert bool(xp.isfinite(y).all())
    # The logits are exact in both dtypes, so only exp and the division round: a few ulps.
    np.testing.assert_allclose(to_numpy(y), reference_softmax(x), rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-30)


def test_softmax_of_opposite_huge_logits_puts_all_weight_on_the_largest(xp):
    y = softmax(xp.asarray([[1e4, -1e4, 0.0], [1e4, 1e4, -1e4], [-1e4, -1e4, -1e4]]))
    np.testing.assert_array_equal(to_numpy(y), [[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])


@given(lead=leading_axes, S=lengths, seed=seeds, dtype=dtypes)
def test_softmax_row_of_only_minus_infinity_gives_zeros_never_nan(xp, lead, S, seed, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(lead + (S,))
    x[rng.random(lead + (S,)) < 0.3] = -np.inf                         # scattered forbidden entries
    x[rng.random(lead) < 0.5] = -np.inf                                # some whole rows forbidden
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # no "invalid value" warnings either
        y = to_numpy(softmax(xp.asarray(x.astype(dtype))))
    assert not np.isnan(y).any()
    assert (y[np.isneginf(x)] == 0).all()                              # exp(-inf) is exactly 0
    empty = np.isneginf(x).all(axis=-1)
    assert (y[empty] == 0).all()
    np.testing.assert_allclose(y[~empty].sum(axis=-1), 1.0, **TOL[dtype])


@given(lead=leading_axes, S=st.integers(1, 6), seed=seeds, axis=st.sampled_from([0, -1]))
def test_softmax_backward_matches_finite_differences(xp, lead, S, seed, axis):
    rng = np.random.default_rng(seed)
    x = randn(xp, rng, lead + (S,))
    dy = random_like(x, rng)                                           # random upstream gradient
    dx = softmax_backward(dy, softmax(x, axis=axis), axis=axis)
    check_gradients(lambda: float((softmax(x, axis=axis) * dy).sum()), [x], [dx], atol=FD_ATOL)


def softmax_backward_without_the_weighted_mean(dy, y, axis=-1):
    """A plausible bug: subtracts the plain mean of dy instead of its y-weighted mean sum(dy * y)."""
    return y * (dy - dy.mean(axis=axis, keepdims=True))


@given(rows=st.integers(1, 3), S=st.integers(2, 6), seed=seeds)
def test_random_upstream_gradient_catches_a_softmax_backward_that_all_ones_misses(xp, rows, S, seed):
    rng = np.random.default_rng(seed)
    x = randn(xp, rng, (rows, S))
    y = softmax(x)
    # With dy = 1 the loss sum(softmax(x)) is the constant 1 per row: its gradient is 0, and the
    # broken backward also returns 0, so an all-ones check passes it.
    ones = xp.ones_like(x)
    check_gradients(lambda: float((softmax(x) * ones).sum()), [x],
                    [softmax_backward_without_the_weighted_mean(ones, y)], atol=FD_ATOL)
    # A random dy exposes it, while the real backward passes.
    dy = random_like(x, rng)
    loss = lambda: float((softmax(x) * dy).sum())
    with pytest.raises(AssertionError, match="disagrees with finite differences"):
        check_gradients(loss, [x], [softmax_backward_without_the_weighted_mean(dy, y)], atol=FD_ATOL)
    check_gradients(loss, [x], [softmax_backward(dy, y)], atol=FD_ATOL)


# ----------------------------------------------------------------------------------------------------
# causal_mask


@pytest.mark.parametrize("T, S, expected", [
    (3, 3, [[1, 0, 0], [1, 1, 0], [1, 1, 1]]),               # T == S: the usual lower triangle
    (2, 4, [[1, 1, 1, 0], [1, 1, 1, 1]]),                    # T < S: the newest 2 of 4 positions
    (4, 2, [[0, 0], [0, 0], [1, 0], [1, 1]]),                # T > S: the top rows see no key
])
def test_causal_mask_examples_are_bottom_right_aligned(xp, T, S, expected):
    np.testing.assert_array_equal(to_numpy(causal_mask(T, S, xp)), np.array(expected, dtype=bool))


@given(T=lengths, S=st.one_of(st.none(), lengths))
def test_causal_mask_lets_query_i_see_key_j_iff_j_le_i_plus_s_minus_t(xp, T, S):
    mask = causal_mask(T, S, xp=xp)
    S = T if S is None else S
    assert isinstance(mask, xp.ndarray)                      # built where the data lives
    assert mask.dtype == bool and mask.shape == (T, S)
    assert bool(mask[-1].all())                              # the last query sees every key
    np.testing.assert_array_equal(to_numpy(mask), allowed_keys(T, S, (), causal=True))


# ----------------------------------------------------------------------------------------------------
# Attention weights


@st.composite
def attention_problems(draw, max_len=12, max_width=6):
    """(lead, T, S, Dk, Dv) for q (lead, T, Dk), k (lead, S, Dk), v (lead, S, Dv)."""
    lead = draw(leading_axes)
    return (lead, draw(st.integers(1, max_len)), draw(st.integers(1, max_len)),
            draw(st.integers(1, max_width)), draw(st.integers(1, max_width)))


def random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype=np.float64):
    return (randn(xp, rng, lead + (T, Dk), dtype), randn(xp, rng, lead + (S, Dk), dtype),
            randn(xp, rng, lead + (S, Dv), dtype))


@given(problem=attention_problems(), seed=seeds, dtype=dtypes, use_mask=st.booleans(),
       causal=st.booleans(), use_bias=st.booleans())
def test_attention_weights_are_non_negative_allowed_rows_sum_to_one_masked_entries_are_zero(
        xp, problem, seed, dtype, use_mask, causal, use_bias):
    lead, T, S, Dk, Dv = problem
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    mask = xp.asarray(rng.random(lead + (T, S)) < 0.6) if use_mask else None
    bias = randn(xp, rng, (T, S), dtype) * 3 if use_bias else None
    out, cache = attention_forward(q, k, v, mask=mask, causal=causal, bias=bias)
    weights = to_numpy(cache["weights"])
    allowed = allowed_keys(T, S, lead, mask, causal)
    has_key = allowed.any(axis=-1)
    assert weights.shape == lead + (T, S)
    assert (weights >= 0).all()
    assert (weights[~allowed] == 0).all()                    # masked entries are exactly zero
    np.testing.assert_allclose(weights.sum(axis=-1)[has_key], 1.0, **TOL[dtype])
    assert (weights.sum(axis=-1)[~has_key] == 0).all()
    # out is the weights' average of the values
    np.testing.assert_allclose(to_numpy(out), weights @ to_numpy(v), **TOL[dtype])


# ----------------------------------------------------------------------------------------------------
# Self-attention is permutation equivariant


@given(lead=leading_axes, T=lengths, D=widths, seed=seeds, dtype=dtypes, shared=st.booleans(),
       use_padding=st.booleans())
def test_self_attention_is_permutation_equivariant(xp, lead, T, D, seed, dtype, shared, use_padding):
    rng = np.random.default_rng(seed)
    if shared:                                               # q = k = v = x
        x = randn(xp, rng, lead + (T, D), dtype)
        q = k = v = x
    else:                                                    # q, k, v of the same T tokens
        q, k, v = random_qkv(xp, rng, lead, T, T, D, D, dtype)
    padding = xp.asarray(rng.random(T) < 0.7) if use_padding else None   # (S,): which tokens are real
    dout = randn(xp, rng, lead + (T, D), dtype)
    perm = xp.asarray(rng.permutation(T))

    out, cache = attention_forward(q, k, v, mask=padding)
    grads = attention_backward(dout, cache)
    out_p, cache_p = attention_forward(q[..., perm, :], k[..., perm, :], v[..., perm, :],
                                       mask=None if padding is None else padding[perm])
    grads_p = attention_backward(dout[..., perm, :], cache_p)

    np.testing.assert_allclose(to_numpy(out_p), to_numpy(out[..., perm, :]), **TOL[dtype])
    for g, g_p in zip(grads, grads_p):
        np.testing.assert_allclose(to_numpy(g_p), to_numpy(g[..., perm, :]), **TOL[dtype])
    if shared:                                               # x feeds q, k and v: its gradient is the sum
        dx, dx_p = sum(grads), sum(grads_p)
        np.testing.assert_allclose(to_numpy(dx_p), to_numpy(dx[..., perm, :]), **TOL[dtype])


# ----------------------------------------------------------------------------------------------------
# Causal masking


@st.composite
def aligned_lengths(draw, alignment):
    """(T, S) with T == S, T < S (decoding: new queries at the end) or T > S."""
    T = draw(st.integers(2 if alignment == "T > S" else 1, 12))
    if alignment == "T == S":
        return T, T
    if alignment == "T < S":
        return T, draw(st.integers(T + 1, T + 8))
    return T, draw(st.integers(1, T - 1))


ALIGNMENTS = ["T == S", "T < S", "T > S"]


@pytest.mark.parametrize("alignment", ALIGNMENTS)
@given(data=st.data(), lead=leading_axes, Dk=widths, Dv=widths, seed=seeds, dtype=dtypes,
       use_bias=st.booleans())
def test_future_tokens_cannot_change_past_outputs(xp, alignment, data, lead, Dk, Dv, seed, dtype, use_bias):
    T, S = data.draw(aligned_lengths(alignment))
    i = data.draw(st.integers(0, T - 1), label="last query kept")   # outputs 0..i must not move
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    bias = randn(xp, rng, (T, S), dtype) if use_bias else None
    future = i + (S - T) + 1                                 # first key query i may not see
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[..., i + 1:, :] = randn(xp, rng, q2[..., i + 1:, :].shape, dtype) * 10
    k2[..., max(future, 0):, :] = randn(xp, rng, k2[..., max(future, 0):, :].shape, dtype) * 10
    v2[..., max(future, 0):, :] = randn(xp, rng, v2[..., max(future, 0):, :].shape, dtype) * 10
    out, _ = attention_forward(q, k, v, causal=True, bias=bias)
    out2, _ = attention_forward(q2, k2, v2, causal=True, bias=bias)
    # Exactly equal: a future key's score is replaced by -inf whatever it was, and its value is
    # multiplied by a weight of exactly 0.
    np.testing.assert_array_equal(to_numpy(out2[..., :i + 1, :]), to_numpy(out[..., :i + 1, :]))


@pytest.mark.parametrize("alignment", ALIGNMENTS)
@given(data=st.data(), lead=leading_axes, Dk=widths, Dv=widths, seed=seeds, dtype=dtypes,
       use_bias=st.booleans())
def test_earlier_outputs_have_exactly_zero_gradient_wrt_later_inputs(xp, alignment, data, lead, Dk, Dv,
                                                                    seed, dtype, use_bias):
    T, S = data.draw(aligned_lengths(alignment))
    i = data.draw(st.integers(0, T - 1), label="last query differentiated")
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    bias = randn(xp, rng, (T, S), dtype) if use_bias else None
    dout = randn(xp, rng, lead + (T, Dv), dtype)
    dout[..., i + 1:, :] = 0                                 # differentiate only outputs 0..i
    _, cache = attention_forward(q, k, v, causal=True, bias=bias)
    dq, dk, dv = attention_backward(dout, cache)
    future = max(i + (S - T) + 1, 0)
    assert (to_numpy(dq[..., i + 1:, :]) == 0).all()         # later queries
    assert (to_numpy(dk[..., future:, :]) == 0).all()        # keys no query 0..i may see
    assert (to_numpy(dv[..., future:, :]) == 0).all()


def test_causal_self_attention_gradient_of_earlier_tokens_wrt_later_tokens_is_exactly_zero(xp):
    rng = np.random.default_rng(0)
    x = randn(xp, rng, (2, 7, 4))                            # q = k = v = x, T == S
    for i in range(7):
        dout = randn(xp, rng, (2, 7, 4))
        dout[:, i + 1:] = 0
        _, cache = attention_forward(x, x, x, causal=True)
        dx = sum(attention_backward(dout, cache))            # x feeds q, k and v
        assert (to_numpy(dx[:, i + 1:]) == 0).all()
        assert (to_numpy(dx[:, :i + 1]) != 0).any()          # while earlier tokens do get gradient


# ----------------------------------------------------------------------------------------------------
# Padding masks and rows with no allowed key


@given(problem=attention_problems(), seed=seeds, dtype=dtypes, per_batch=st.booleans(), causal=st.booleans())
def test_masked_keys_and_values_change_nothing(xp, problem, seed, dtype, per_batch, causal):
    lead, T, S, Dk, Dv = problem
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    # Key padding: (S,) shared by the batch, or (lead..., 1, S) one per sequence, broadcast over queries.
    padding = rng.random(lead + (1, S) if per_batch else (S,)) < 0.6
    pad_keys = np.broadcast_to(~padding[..., 0, :] if per_batch else ~padding, lead + (S,))
    mask = xp.asarray(padding)
    k2, v2 = k.copy(), v.copy()
    k2[xp.asarray(pad_keys)] = randn(xp, rng, (int(pad_keys.sum()), Dk), dtype) * 10
    v2[xp.asarray(pad_keys)] = randn(xp, rng, (int(pad_keys.sum()), Dv), dtype) * 10
    dout = randn(xp, rng, lead + (T, Dv), dtype)

    out, cache = attention_forward(q, k, v, mask=mask, causal=causal)
    dq, dk, dv = attention_backward(dout, cache)
    out2, cache2 = attention_forward(q, k2, v2, mask=mask, causal=causal)
    dq2, dk2, dv2 = attention_backward(dout, cache2)

    # Exactly equal: a padded key's score becomes -inf whatever it was, its value gets weight 0.
    np.testing.assert_array_equal(to_numpy(out2), to_numpy(out))
    np.testing.assert_array_equal(to_numpy(dq2), to_numpy(dq))
    np.testing.assert_array_equal(to_numpy(dk2)[~pad_keys], to_numpy(dk)[~pad_keys])
    np.testing.assert_array_equal(to_numpy(dv2)[~pad_keys], to_numpy(dv)[~pad_keys])
    assert (to_numpy(dk2)[pad_keys] == 0).all() and (to_numpy(dv2)[pad_keys] == 0).all()


@given(problem=attention_problems(), seed=seeds, dtype=dtypes, use_bias=st.booleans())
def test_query_with_no_allowed_key_returns_zeros_and_passes_zero_gradient(xp, problem, seed, dtype, use_bias):
    lead, T, S, Dk, Dv = problem
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    mask = rng.random(lead + (T, S)) < 0.7
    empty = rng.random(lead + (T,)) < 0.4
    empty.reshape(-1)[0] = True                              # at least one query sees nothing
    mask[empty] = False
    bias = randn(xp, rng, (T, S), dtype) if use_bias else None
    dout = randn(xp, rng, lead + (T, Dv), dtype)

    out, cache = attention_forward(q, k, v, mask=xp.asarray(mask), bias=bias)
    dq, dk, dv = attention_backward(dout, cache)
    for array in (out, cache["weights"], dq, dk, dv):
        assert not bool(xp.isnan(array).any())
    assert (to_numpy(out)[empty] == 0).all()
    assert (to_numpy(dq)[empty] == 0).all()
    # The empty rows' upstream gradient reaches no key: zeroing it changes dk and dv not at all.
    dout_without = dout.copy()
    dout_without[xp.asarray(empty)] = 0
    _, dk2, dv2 = attention_backward(dout_without, cache)
    np.testing.assert_array_equal(to_numpy(dk2), to_numpy(dk))
    np.testing.assert_array_equal(to_numpy(dv2), to_numpy(dv))


@given(data=st.data(), lead=leading_axes, Dk=widths, Dv=widths, seed=seeds, dtype=dtypes)
def test_causal_with_more_queries_than_keys_gives_top_rows_zeros_and_zero_gradient(xp, data, lead, Dk, Dv,
                                                                                   seed, dtype):
    T, S = data.draw(aligned_lengths("T > S"))
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    out, cache = attention_forward(q, k, v, causal=True)
    dq, dk, dv = attention_backward(randn(xp, rng, lead + (T, Dv), dtype), cache)
    top = T - S                                              # queries 0 .. T-S-1 precede every key
    for array in (out, dq, dk, dv):
        assert not bool(xp.isnan(array).any())
    assert (to_numpy(out[..., :top, :]) == 0).all() and (to_numpy(dq[..., :top, :]) == 0).all()
    assert (to_numpy(out[..., top:, :]) != 0).any()          # the remaining rows are real outputs


# ----------------------------------------------------------------------------------------------------
# Gradients: finite differences


def attention_loss(q, k, v, dout, **options):
    """L = sum(attention_forward(q, k, v) * dout): its gradient is what attention_backward returns."""
    return lambda: float((attention_forward(q, k, v, **options)[0] * dout).sum())


@given(problem=attention_problems(max_len=5, max_width=3), seed=seeds, use_mask=st.booleans(),
       causal=st.booleans(), use_bias=st.booleans(), scale=st.one_of(st.none(), st.floats(0.1, 2.0)))
def test_attention_gradients_match_finite_differences(xp, problem, seed, use_mask, causal, use_bias, scale):
    lead, T, S, Dk, Dv = problem
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv)
    options = dict(mask=xp.asarray(rng.random(lead + (T, S)) < 0.7) if use_mask else None, causal=causal,
                   bias=randn(xp, rng, (T, S)) if use_bias else None, scale=scale)
    dout = randn(xp, rng, lead + (T, Dv))                    # random upstream gradient
    _, cache = attention_forward(q, k, v, **options)
    check_gradients(attention_loss(q, k, v, dout, **options), [q, k, v], attention_backward(dout, cache),
                    atol=FD_ATOL)


@given(B=st.integers(1, 2), H=st.integers(2, 3), T=st.integers(1, 4), S=st.integers(1, 4),
       D=st.integers(1, 3), seed=seeds, causal=st.booleans())
def test_keys_shared_across_heads_get_the_sum_of_every_heads_gradient(xp, B, H, T, S, D, seed, causal):
    rng = np.random.default_rng(seed)
    q = randn(xp, rng, (B, H, T, D))
    k, v = randn(xp, rng, (B, 1, S, D)), randn(xp, rng, (B, 1, S, D))   # one k, v for all H heads
    options = dict(mask=xp.asarray(rng.random((B, 1, 1, S)) < 0.8),     # key padding per sequence
                   causal=causal, bias=randn(xp, rng, (H, T, S)))        # a per-head bias, as ALiBi
    dout = randn(xp, rng, (B, H, T, D))
    _, cache = attention_forward(q, k, v, **options)
    dq, dk, dv = attention_backward(dout, cache)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    check_gradients(attention_loss(q, k, v, dout, **options), [q, k, v], [dq, dk, dv], atol=FD_ATOL)


# ----------------------------------------------------------------------------------------------------
# PyTorch cross-check


def assert_matches_torch(torch, q, k, v, dout, ours, attn_mask=None, is_causal=False, scale=None):
    """Run torch's scaled_dot_product_attention on the same float64 inputs and compare out, dq, dk, dv."""
    tq, tk, tv = (torch.tensor(to_numpy(a), requires_grad=True) for a in (q, k, v))
    t_out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=attn_mask,
                                                             is_causal=is_causal, scale=scale)
    t_out.backward(torch.from_numpy(to_numpy(dout)))
    out, cache = ours
    # float64 on both sides, the same formula summed in a different order.
    np.testing.assert_allclose(to_numpy(out), t_out.detach().numpy(), rtol=1e-10, atol=1e-12)
    theirs = (tq.grad, tk.grad, tv.grad)
    for name, mine, their in zip(("dq", "dk", "dv"), attention_backward(dout, cache), theirs):
        np.testing.assert_allclose(to_numpy(mine), their.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


@given(problem=attention_problems(max_len=8), seed=seeds, use_mask=st.booleans(), causal=st.booleans(),
       use_bias=st.booleans(), scale=st.one_of(st.none(), st.floats(0.1, 2.0)))
def test_forward_and_gradients_match_torch_sdpa_with_masks_bias_and_scale(xp, problem, seed, use_mask,
                                                                          causal, use_bias, scale):
    torch = pytest.importorskip("torch")
    lead, T, S, Dk, Dv = problem
    if causal and T > S:
        T, S = S, T                                          # every row needs a key (torch's empty rows vary)
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv)
    dout = randn(xp, rng, lead + (T, Dv))
    mask = None
    if use_mask:
        mask = rng.random(lead + (T, S)) < 0.6
        mask[..., 0] = True                                  # every query sees key 0 (causal too: T <= S)
    bias = rng.standard_normal((T, S)) if use_bias else None
    ours = attention_forward(q, k, v, mask=None if mask is None else xp.asarray(mask), causal=causal,
                             bias=None if bias is None else xp.asarray(bias), scale=scale)
    # torch's boolean attn_mask has True = takes part, as ours; a float attn_mask is added to the scores.
    # Causal with T != S goes in as our bottom-right mask (torch's is_causal is top-left aligned).
    allowed = allowed_keys(T, S, lead, mask, causal)
    attn_mask = torch.from_numpy(allowed)
    if bias is not None:
        attn_mask = torch.from_numpy(np.where(allowed, bias, -np.inf))
    assert_matches_torch(torch, q, k, v, dout, ours, attn_mask=attn_mask, scale=scale)


@given(lead=leading_axes, T=lengths, Dk=widths, Dv=widths, seed=seeds,
       scale=st.one_of(st.none(), st.floats(0.1, 2.0)))
def test_causal_matches_torch_sdpa_is_causal_when_t_equals_s(xp, lead, T, Dk, Dv, seed, scale):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, T, Dk, Dv)
    dout = randn(xp, rng, lead + (T, Dv))
    ours = attention_forward(q, k, v, causal=True, scale=scale)
    assert_matches_torch(torch, q, k, v, dout, ours, is_causal=True, scale=scale)


# ----------------------------------------------------------------------------------------------------
# dtype and purity


@given(problem=attention_problems(), seed=seeds, causal=st.booleans())
def test_float32_in_gives_float32_out_weights_and_gradients(xp, problem, seed, causal):
    lead, T, S, Dk, Dv = problem
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, np.float32)
    mask = xp.asarray(rng.random((T, S)) < 0.7)
    bias = randn(xp, rng, (T, S), np.float32)
    out, cache = attention_forward(q, k, v, mask=mask, causal=causal, bias=bias)
    grads = attention_backward(randn(xp, rng, lead + (T, Dv), np.float32), cache)
    for array in (out, cache["weights"], *grads):
        assert array.dtype == np.float32


def test_float64_bias_does_not_upcast_float32_attention(xp):
    """A float64 table (say an ALiBi bias built without a dtype) must not turn float32 data into float64."""
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(xp, rng, (2,), 3, 4, 5, 6, np.float32)
    out, cache = attention_forward(q, k, v, bias=randn(xp, rng, (3, 4), np.float64))
    grads = attention_backward(randn(xp, rng, (2, 3, 6), np.float32), cache)
    for array in (out, cache["weights"], *grads):
        assert array.dtype == np.float32


@given(problem=attention_problems(), seed=seeds, dtype=dtypes, causal=st.booleans())
def test_inputs_are_never_modified(xp, problem, seed, dtype, causal):
    lead, T, S, Dk, Dv = problem
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    mask = xp.asarray(rng.random((T, S)) < 0.7)
    bias = randn(xp, rng, (T, S), dtype)
    dout = randn(xp, rng, lead + (T, Dv), dtype)
    inputs = [q, k, v, mask, bias, dout]
    before = [to_numpy(a).copy() for a in inputs]
    _, cache = attention_forward(q, k, v, mask=mask, causal=causal, bias=bias)
    cache_before = {name: to_numpy(a).copy() for name, a in cache.items() if hasattr(a, "shape")}
    attention_backward(dout, cache)
    for a, a0 in zip(inputs, before):
        np.testing.assert_array_equal(to_numpy(a), a0)
    for name, a0 in cache_before.items():                    # backward leaves the cache as it found it
        np.testing.assert_array_equal(to_numpy(cache[name]), a0)


# ----------------------------------------------------------------------------------------------------
# Bad input


def _arrays(xp, *shapes, dtype=np.float64):
    return [xp.zeros(shape, dtype=dtype) for shape in shapes]


@pytest.mark.parametrize("make, error, message", [
    (lambda xp: (*_arrays(xp, (2, 3, 4), dtype=np.int64), *_arrays(xp, (2, 5, 4), (2, 5, 6)), {}),
     TypeError, r"q must be a floating-point array, got int64"),
    (lambda xp: (*_arrays(xp, (2, 3, 4), (2, 5, 7), (2, 5, 6)), {}),
     ValueError, r"k must have shape \(\.\.\., S, 4\) to match q \(2, 3, 4\), got \(2, 5, 7\)"),
    (lambda xp: (*_arrays(xp, (2, 3, 4), (2, 5, 4), (2, 6, 6)), {}),
     ValueError, r"v must have shape \(\.\.\., 5, Dv\) to match k \(2, 5, 4\), got \(2, 6, 6\)"),
    (lambda xp: (*_arrays(xp, (4,), (5, 4), (5, 6)), {}),
     ValueError, r"q must have shape \(\.\.\., length, width\), got \(4,\)"),
    (lambda xp: (*_arrays(xp, (3, 4), (5, 4), (5, 6)), {"mask": xp.ones((3, 5))}),
     TypeError, r"mask must be boolean \(True = may attend\), got dtype float64"),
    (lambda xp: (*_arrays(xp, (2, 3, 4), (2, 5, 4), (2, 5, 6)), {"mask": xp.ones((5, 3), dtype=bool)}),
     ValueError, r"mask must broadcast to \(\.\.\., T, S\) = \(2, 3, 5\), got \(5, 3\)"),
    (lambda xp: (*_arrays(xp, (3, 4)), *_arrays(xp, (5, 4), (5, 6), dtype=np.float32), {}),
     TypeError, r"q, k, v must share one dtype, got float64, float32, float32"),
    (lambda xp: (*_arrays(xp, (2, 3, 4), (3, 5, 4), (3, 5, 6)), {}),
     ValueError, r"leading axes of q \(2, 3, 4\), k \(3, 5, 4\), v \(3, 5, 6\) do not broadcast"),
    (lambda xp: (*_arrays(xp, (3, 4), (5, 4), (5, 6)), {"bias": xp.zeros((3, 4))}),
     ValueError, r"bias must broadcast to \(\.\.\., T, S\) = \(3, 5\), got \(3, 4\)"),
    (lambda xp: (*_arrays(xp, (3, 4), (5, 4), (5, 6)), {"mask": [[True] * 5] * 3}),
     TypeError, r"mask must be an array broadcastable to \(\.\.\., T, S\), got list"),
    (lambda xp: (*_arrays(xp, (3, 4), (5, 4), (5, 6)), {"bias": 1.0}),
     TypeError, r"bias must be an array broadcastable to \(\.\.\., T, S\), got float"),
], ids=["integer q", "mismatched Dk", "mismatched S in k and v", "rank-1 q", "non-boolean mask",
        "mask of the wrong shape", "q and k dtypes differ", "leading axes do not broadcast",
        "bias of the wrong shape", "mask not an array", "bias not an array"])
def test_bad_input_raises_an_error_naming_the_argument_and_shape(xp, make, error, message):
    *qkv, options = make(xp)
    with pytest.raises(error, match=message):
        attention_forward(*qkv, **options)


# ----------------------------------------------------------------------------------------------------
# Demo


def test_demo_runs_and_exits_zero():
    result = subprocess.run([sys.executable, "attention.py"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Every allowed row sums to 1 and masked entries are exactly 0." in result.stdout


def test_no_keys_at_all_gives_zeros_like_an_empty_row(xp):
    # S = 0: every query has no allowed key, so the answer is zeros and zero gradient (flash agrees).
    q = xp.ones((2, 3, 4))
    k, v = xp.ones((2, 0, 4)), xp.ones((2, 0, 5))
    out, cache = attention_forward(q, k, v, causal=True)
    assert out.shape == (2, 3, 5) and bool(xp.all(out == 0))
    dq, dk, dv = attention_backward(xp.ones_like(out), cache)
    assert bool(xp.all(dq == 0)) and dk.shape == k.shape and dv.shape == v.shape

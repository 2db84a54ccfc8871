"""Tests for attention.py: softmax, causal_mask, attention_forward / attention_backward.

Every property is checked by hypothesis over shapes (0-2 leading axes, T and S from 1 to 12), seeds and
dtypes, with the `xp` fixture (NumPy, CuPy on a CPU, and CuPy where a GPU is present); the edges that
decide whether a bug shows (T < S, T > S, one token, Dk != Dv) are pinned with @example so they run every
time. Outputs are compared with an independent float64 reference (below), gradients with central finite
differences in float64 with a random upstream gradient, and with PyTorch's scaled_dot_product_attention
where PyTorch is installed (every claim is also caught without it).
"""
import functools
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

from attention import (attention_backward, attention_forward, causal_mask, sliding_window_mask, softmax,
                       softmax_backward)
from gradcheck import check_gradients, random_like
from helpers import random_array, run_demo, spoiled, to_numpy, with_examples

seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([np.float32, np.float64])
leading_axes = st.lists(st.integers(1, 3), max_size=2).map(tuple)
lengths = st.integers(1, 12)
widths = st.integers(1, 6)

# Agreement between two computations of the same quantity in a different order (a permuted sum, a
# shifted row): float32 keeps ~7 digits, float64 ~16, and rounding grows a little with T, S and D.
TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}

# check_gradients' default atol=1e-9 assumes a loss near 1; ours sum up to ~140 terms, and each difference
# quotient carries the loss's float64 rounding, ~|L| * 1e-16 / 1e-6: up to 3e-9 over 3000 random cases.
FD_ATOL = 2e-8


def allowed_keys(T, S, lead, mask=None, causal=False, window=None):
    """The boolean (lead..., T, S) of keys each query may attend, written out independently."""
    allowed = np.ones(lead + (T, S), dtype=bool)
    if mask is not None:
        allowed &= to_numpy(mask)
    if causal:
        allowed &= np.array([[j <= i + (S - T) for j in range(S)] for i in range(T)]).reshape(T, S)
    if window is not None:
        left, right = (math.inf if side is None else side for side in window)
        allowed &= np.array([[i + (S - T) - left <= j <= i + (S - T) + right for j in range(S)]
                             for i in range(T)]).reshape(T, S)
    return allowed


# ----------------------------------------------------------------------------------------------------
# softmax


@given(lead=leading_axes, S=lengths, seed=seeds, dtype=dtypes, axis=st.sampled_from([0, -1]))
def test_softmax_rows_are_non_negative_and_sum_to_one(xp, lead, S, seed, dtype, axis):
    x = random_array(np.random.default_rng(seed), lead + (S,), dtype, xp) * 5
    y = softmax(x, axis=axis)
    assert y.dtype == dtype and y.shape == x.shape
    assert bool((y >= 0).all())
    np.testing.assert_allclose(to_numpy(y.sum(axis=axis)), 1.0, **TOL[dtype])


@given(lead=leading_axes, S=lengths, seed=seeds, dtype=dtypes)
def test_softmax_is_invariant_to_adding_a_constant_to_a_row(xp, lead, S, seed, dtype):
    rng = np.random.default_rng(seed)
    x = random_array(rng, lead + (S,), dtype, xp)
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
    x = random_array(rng, lead + (S,), xp=xp)
    dy = random_like(x, rng)                                           # random upstream gradient
    dx = softmax_backward(dy, softmax(x, axis=axis), axis=axis)
    check_gradients(lambda: float((softmax(x, axis=axis) * dy).sum()), [x], [dx], atol=FD_ATOL)


def softmax_backward_without_the_weighted_mean(dy, y, axis=-1):
    """A plausible bug: subtracts the plain mean of dy instead of its y-weighted mean sum(dy * y)."""
    return y * (dy - dy.mean(axis=axis, keepdims=True))


@given(rows=st.integers(1, 3), S=st.integers(2, 6), seed=seeds)
def test_random_upstream_gradient_catches_a_softmax_backward_that_all_ones_misses(xp, rows, S, seed):
    rng = np.random.default_rng(seed)
    x = random_array(rng, (rows, S), xp=xp)
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
    return (random_array(rng, lead + (T, Dk), dtype, xp), random_array(rng, lead + (S, Dk), dtype, xp),
            random_array(rng, lead + (S, Dv), dtype, xp))


# The edges where a wrong alignment or a wrong width shows: T < S, T > S, one token, Dk != Dv.
EDGE_PROBLEMS = [((), 2, 7, 3, 5), ((2,), 6, 2, 1, 4), ((), 1, 1, 1, 1), ((2, 1), 3, 3, 4, 2)]
at_the_edges = functools.partial(with_examples, "problem", EDGE_PROBLEMS)   # @example for each, other arguments given


@given(problem=attention_problems(), seed=seeds, dtype=dtypes, use_mask=st.booleans(),
       causal=st.booleans(), use_bias=st.booleans())
@at_the_edges(seed=0, dtype=np.float32, use_mask=True, causal=True, use_bias=True)
def test_attention_weights_are_non_negative_allowed_rows_sum_to_one_masked_entries_are_zero(
        xp, problem, seed, dtype, use_mask, causal, use_bias):
    lead, T, S, Dk, Dv = problem
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    mask = xp.asarray(rng.random(lead + (T, S)) < 0.6) if use_mask else None
    bias = random_array(rng, (T, S), dtype, xp) * 3 if use_bias else None
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
# The output equals the formula, computed independently (and the default scale is 1 / sqrt(Dk))


def reference_attention(q, k, v, allowed, bias=None, scale=None):
    """softmax(q k^T * scale + bias) v over the allowed keys, in float64 with einsum and an explicit
    renormalisation over the allowed entries only: another route than attention.py's -inf scores."""
    q, k, v = (to_numpy(a).astype(np.float64) for a in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("...td,...sd->...ts", q, k) * scale      # (..., T, S)
    if bias is not None:
        scores = scores + to_numpy(bias)
    scores, allowed = np.broadcast_arrays(scores, allowed)
    has_key = allowed.any(axis=-1, keepdims=True)               # (..., T, 1)
    row_max = np.where(allowed, scores, -np.inf).max(axis=-1, keepdims=True)
    e = np.where(allowed, np.exp(scores - np.where(has_key, row_max, 0)), 0)
    weights = e / np.where(has_key, e.sum(axis=-1, keepdims=True), 1)
    return np.einsum("...ts,...sd->...td", weights, v)          # (..., T, Dv)


@given(problem=attention_problems(), seed=seeds, dtype=dtypes, use_mask=st.booleans(), causal=st.booleans(),
       use_bias=st.booleans(), scale=st.one_of(st.none(), st.floats(0.1, 2.0)))
@at_the_edges(seed=0, dtype=np.float64, use_mask=True, causal=True, use_bias=True, scale=None)
@at_the_edges(seed=1, dtype=np.float32, use_mask=False, causal=False, use_bias=False, scale=None)
def test_output_equals_the_formula_computed_independently(xp, problem, seed, dtype, use_mask, causal,
                                                         use_bias, scale):
    lead, T, S, Dk, Dv = problem
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    mask = rng.random(lead + (T, S)) < 0.7 if use_mask else None
    bias = random_array(rng, (T, S), dtype, xp) if use_bias else None
    out, _ = attention_forward(q, k, v, mask=None if mask is None else xp.asarray(mask), causal=causal,
                               bias=bias, scale=scale)
    expected = reference_attention(q, k, v, allowed_keys(T, S, lead, mask, causal), bias, scale)
    # float64: the same sums in another order; float32: its inputs' rounding carried through exp.
    np.testing.assert_allclose(to_numpy(out), expected, **TOL[dtype])


def test_default_scale_is_one_over_sqrt_of_the_query_key_width_not_the_value_width(xp):
    # Dk = 2 and Dv = 9: 1/sqrt(Dk), 1/sqrt(Dv) and no scale at all give visibly different outputs.
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(xp, rng, (2,), 4, 5, 2, 9)
    q = q * 3                                                     # large scores, so the scale matters a lot
    out, cache = attention_forward(q, k, v)
    allowed = np.ones((4, 5), dtype=bool)
    assert cache["scale"] == 1 / math.sqrt(2)
    np.testing.assert_allclose(to_numpy(out), reference_attention(q, k, v, allowed, scale=1 / math.sqrt(2)),
                               rtol=1e-12, atol=1e-12)           # float64 rounding only
    for wrong_scale in (1 / math.sqrt(9), 1.0):                   # what the two plausible bugs would give
        assert np.abs(to_numpy(out) - reference_attention(q, k, v, allowed, scale=wrong_scale)).max() > 1e-2


@pytest.mark.parametrize("scale", [0.25, np.float32(2.0), 3])
def test_an_explicit_scale_multiplies_the_scores(xp, scale):
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(xp, rng, (), 3, 4, 5, 2)
    out, cache = attention_forward(q, k, v, scale=scale)
    assert cache["scale"] == float(scale)
    expected = reference_attention(q, k, v, np.ones((3, 4), dtype=bool), scale=float(scale))
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-12, atol=1e-12)   # float64 rounding only


# ----------------------------------------------------------------------------------------------------
# Self-attention is permutation equivariant


@given(lead=leading_axes, T=lengths, D=widths, seed=seeds, dtype=dtypes, shared=st.booleans(),
       use_padding=st.booleans())
def test_self_attention_is_permutation_equivariant(xp, lead, T, D, seed, dtype, shared, use_padding):
    rng = np.random.default_rng(seed)
    if shared:                                               # q = k = v = x
        x = random_array(rng, lead + (T, D), dtype, xp)
        q = k = v = x
    else:                                                    # q, k, v of the same T tokens
        q, k, v = random_qkv(xp, rng, lead, T, T, D, D, dtype)
    padding = xp.asarray(rng.random(T) < 0.7) if use_padding else None   # (S,): which tokens are real
    dout = random_array(rng, lead + (T, D), dtype, xp)
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
    bias = random_array(rng, (T, S), dtype, xp) if use_bias else None
    future = i + (S - T) + 1                                 # first key query i may not see
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    q2[..., i + 1:, :] = random_array(rng, q2[..., i + 1:, :].shape, dtype, xp) * 10
    k2[..., max(future, 0):, :] = random_array(rng, k2[..., max(future, 0):, :].shape, dtype, xp) * 10
    v2[..., max(future, 0):, :] = random_array(rng, v2[..., max(future, 0):, :].shape, dtype, xp) * 10
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
    bias = random_array(rng, (T, S), dtype, xp) if use_bias else None
    dout = random_array(rng, lead + (T, Dv), dtype, xp)
    dout[..., i + 1:, :] = 0                                 # differentiate only outputs 0..i
    _, cache = attention_forward(q, k, v, causal=True, bias=bias)
    dq, dk, dv = attention_backward(dout, cache)
    future = max(i + (S - T) + 1, 0)
    assert (to_numpy(dq[..., i + 1:, :]) == 0).all()         # later queries
    assert (to_numpy(dk[..., future:, :]) == 0).all()        # keys no query 0..i may see
    assert (to_numpy(dv[..., future:, :]) == 0).all()


def test_causal_self_attention_gradient_of_earlier_tokens_wrt_later_tokens_is_exactly_zero(xp):
    rng = np.random.default_rng(0)
    x = random_array(rng, (2, 7, 4), xp=xp)                            # q = k = v = x, T == S
    for i in range(7):
        dout = random_array(rng, (2, 7, 4), xp=xp)
        dout[:, i + 1:] = 0
        _, cache = attention_forward(x, x, x, causal=True)
        dx = sum(attention_backward(dout, cache))            # x feeds q, k and v
        assert (to_numpy(dx[:, i + 1:]) == 0).all()
        assert (to_numpy(dx[:, :i + 1]) != 0).any()          # while earlier tokens do get gradient


# ----------------------------------------------------------------------------------------------------
# Padding masks and rows with no allowed key


@given(problem=attention_problems(), seed=seeds, dtype=dtypes, per_batch=st.booleans(), causal=st.booleans(),
       filler=st.sampled_from(["random", "nan", "inf"]))
@at_the_edges(seed=2, dtype=np.float64, per_batch=True, causal=True, filler="nan")
@at_the_edges(seed=3, dtype=np.float32, per_batch=False, causal=False, filler="inf")
def test_keys_no_query_may_attend_change_nothing_even_holding_nan_or_inf(xp, problem, seed, dtype, per_batch,
                                                                       causal, filler):
    lead, T, S, Dk, Dv = problem
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    # Key padding: (S,) shared by the batch, or (lead..., 1, S) one per sequence, broadcast over queries.
    # With causal too, a padded key is still attended by no query (and every other key by the last one).
    padding = rng.random(lead + (1, S) if per_batch else (S,)) < 0.6
    pad_keys = np.broadcast_to(~padding[..., 0, :] if per_batch else ~padding, lead + (S,))
    mask = xp.asarray(padding)
    k2, v2 = k.copy(), v.copy()
    for x2, width in ((k2, Dk), (v2, Dv)):
        junk = {"random": rng.standard_normal((int(pad_keys.sum()), width)) * 10,
                "nan": np.full((int(pad_keys.sum()), width), np.nan),
                "inf": rng.choice([-np.inf, np.inf], (int(pad_keys.sum()), width))}[filler]
        x2[xp.asarray(pad_keys)] = xp.asarray(junk.astype(dtype))  # what padding holds must not matter
    dout = random_array(rng, lead + (T, Dv), dtype, xp)

    out, cache = attention_forward(q, k, v, mask=mask, causal=causal)
    dq, dk, dv = attention_backward(dout, cache)
    out2, cache2 = attention_forward(q, k2, v2, mask=mask, causal=causal)
    dq2, dk2, dv2 = attention_backward(dout, cache2)

    # Exactly equal: a padded key's score becomes -inf and its k and v rows 0, whatever they held.
    np.testing.assert_array_equal(to_numpy(out2), to_numpy(out))
    np.testing.assert_array_equal(to_numpy(cache2["weights"]), to_numpy(cache["weights"]))
    np.testing.assert_array_equal(to_numpy(dq2), to_numpy(dq))
    np.testing.assert_array_equal(to_numpy(dk2), to_numpy(dk))
    np.testing.assert_array_equal(to_numpy(dv2), to_numpy(dv))
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
    bias = random_array(rng, (T, S), dtype, xp) if use_bias else None
    dout = random_array(rng, lead + (T, Dv), dtype, xp)

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
    dq, dk, dv = attention_backward(random_array(rng, lead + (T, Dv), dtype, xp), cache)
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
@at_the_edges(seed=0, use_mask=True, causal=True, use_bias=True, scale=None)
@at_the_edges(seed=1, use_mask=False, causal=False, use_bias=False, scale=0.7)
def test_attention_gradients_match_finite_differences(xp, problem, seed, use_mask, causal, use_bias, scale):
    lead, T, S, Dk, Dv = problem
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv)
    options = dict(mask=xp.asarray(rng.random(lead + (T, S)) < 0.7) if use_mask else None, causal=causal,
                   bias=random_array(rng, (T, S), xp=xp) if use_bias else None, scale=scale)
    dout = random_array(rng, lead + (T, Dv), xp=xp)                    # random upstream gradient
    _, cache = attention_forward(q, k, v, **options)
    check_gradients(attention_loss(q, k, v, dout, **options), [q, k, v], attention_backward(dout, cache),
                    atol=FD_ATOL)


@given(B=st.integers(1, 2), H=st.integers(2, 3), T=st.integers(1, 4), S=st.integers(1, 4),
       D=st.integers(1, 3), seed=seeds, causal=st.booleans())
def test_keys_shared_across_heads_get_the_sum_of_every_heads_gradient(xp, B, H, T, S, D, seed, causal):
    rng = np.random.default_rng(seed)
    q = random_array(rng, (B, H, T, D), xp=xp)
    k, v = random_array(rng, (B, 1, S, D), xp=xp), random_array(rng, (B, 1, S, D), xp=xp)   # one k, v for all H heads
    options = dict(mask=xp.asarray(rng.random((B, 1, 1, S)) < 0.8),     # key padding per sequence
                   causal=causal, bias=random_array(rng, (H, T, S), xp=xp))        # a per-head bias, as ALiBi
    dout = random_array(rng, (B, H, T, D), xp=xp)
    _, cache = attention_forward(q, k, v, **options)
    dq, dk, dv = attention_backward(dout, cache)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    check_gradients(attention_loss(q, k, v, dout, **options), [q, k, v], [dq, dk, dv], atol=FD_ATOL)


@pytest.mark.parametrize("q_shape, k_shape, v_shape", [((3, 2), (4, 2), (2, 4, 5)), ((1, 3, 2), (2, 1, 4, 2), (4, 5)),
                                                     ((2, 1, 3, 2), (3, 4, 2), (1, 3, 4, 1))])
def test_gradients_are_right_whichever_input_carries_the_leading_axes(xp, q_shape, k_shape, v_shape):
    rng = np.random.default_rng(0)
    q, k, v = (random_array(rng, shape, xp=xp) for shape in (q_shape, k_shape, v_shape))
    out, cache = attention_forward(q, k, v, causal=True)
    dout = random_like(out, rng)
    check_gradients(attention_loss(q, k, v, dout, causal=True), [q, k, v], attention_backward(dout, cache),
                    atol=FD_ATOL)


# ----------------------------------------------------------------------------------------------------
# Sliding windows: query i at p = i + (S - T) attends key j iff p - left <= j <= p + right


window_sides = st.one_of(st.none(), st.integers(0, 14))   # up to wider than any S drawn


# The window's edges: 0 (only the aligned key), wider than S, a window that leaves rows with no key
# (T > S with right 0, or T < S with left 0 and right 0 misses the first keys), one side unbounded.
WINDOW_EDGES = [((), 3, 3, 2, 2, (0, 0)), ((), 4, 6, 3, 5, (20, 10**30)), ((2,), 7, 3, 2, 1, (1, 0)),
                ((), 2, 7, 1, 3, (0, 0)), ((), 5, 5, 3, 3, (None, 1)), ((), 6, 2, 2, 2, (0, 2))]
at_the_window_edges = functools.partial(with_examples, "case", WINDOW_EDGES)


@st.composite
def window_problems(draw, max_len=12, max_width=6):
    """(lead, T, S, Dk, Dv, window)."""
    return draw(attention_problems(max_len, max_width)) + ((draw(window_sides), draw(window_sides)),)


@given(case=window_problems(), seed=seeds, dtype=dtypes, causal=st.booleans(), use_mask=st.booleans())
@at_the_window_edges(seed=0, dtype=np.float64, causal=True, use_mask=True)
@at_the_window_edges(seed=1, dtype=np.float32, causal=False, use_mask=False)
def test_window_equals_the_formula_and_attention_with_the_explicit_mask(xp, case, seed, dtype, causal, use_mask):
    lead, T, S, Dk, Dv, window = case
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    mask = rng.random(lead + (T, S)) < 0.8 if use_mask else None
    allowed = allowed_keys(T, S, lead, mask, causal, window)
    out, cache = attention_forward(q, k, v, mask=None if mask is None else xp.asarray(mask), causal=causal,
                                   window=window)
    out_masked, _ = attention_forward(q, k, v, mask=xp.asarray(allowed))
    weights = to_numpy(cache["weights"])
    assert not np.isnan(to_numpy(out)).any()
    assert (weights[~allowed] == 0).all()                    # nothing outside the window is attended
    assert (to_numpy(out)[~allowed.any(axis=-1)] == 0).all()   # a row with no key in its window: zeros
    np.testing.assert_array_equal(to_numpy(out), to_numpy(out_masked))   # the same mask, the same sums
    np.testing.assert_allclose(to_numpy(out), reference_attention(q, k, v, allowed), **TOL[dtype])


@given(case=window_problems(max_len=5, max_width=3), seed=seeds, causal=st.booleans())
@at_the_window_edges(seed=0, causal=True)
@at_the_window_edges(seed=1, causal=False)
def test_window_gradients_match_finite_differences_and_the_explicit_mask(xp, case, seed, causal):
    lead, T, S, Dk, Dv, window = case
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv)
    dout = random_array(rng, lead + (T, Dv), xp=xp)                    # random upstream gradient
    _, cache = attention_forward(q, k, v, causal=causal, window=window)
    grads = attention_backward(dout, cache)
    check_gradients(attention_loss(q, k, v, dout, causal=causal, window=window), [q, k, v], grads, atol=FD_ATOL)
    _, masked_cache = attention_forward(q, k, v, mask=xp.asarray(allowed_keys(T, S, (), causal=causal,
                                                                              window=window)))
    for ours, theirs in zip(grads, attention_backward(dout, masked_cache)):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))


@pytest.mark.parametrize("T, S", [(9, 9), (4, 9), (9, 4)])
@pytest.mark.parametrize("w", [0, 1, 3, 20])
def test_causal_window_w_sees_exactly_min_w_plus_1_p_plus_1_keys_flash_attention_2s_count(xp, T, S, w):
    # The off-by-one of transformers issue 29623: (w, 0) counts the query's own key apart, so w + 1 keys.
    q, k, v = random_qkv(xp, np.random.default_rng(0), (), T, S, 2, 2)
    _, cache = attention_forward(q, k, v, causal=True, window=(w, 0))
    p = np.arange(T) + (S - T)                                          # aligned positions
    expected = np.clip(np.minimum(w + 1, p + 1), 0, None)               # no key at all where p < 0 (T > S)
    np.testing.assert_array_equal((to_numpy(cache["weights"]) > 0).sum(axis=-1), expected)
    np.testing.assert_array_equal(to_numpy(sliding_window_mask(T, S, w, 0, xp=xp)).sum(axis=-1), expected)


@given(T=lengths, S=st.one_of(st.none(), lengths), left=window_sides, right=window_sides)
def test_sliding_window_mask_is_the_band_p_minus_left_to_p_plus_right(xp, T, S, left, right):
    mask = sliding_window_mask(T, S, left, right, xp=xp)
    S = T if S is None else S
    assert isinstance(mask, xp.ndarray) and mask.dtype == bool and mask.shape == (T, S)
    np.testing.assert_array_equal(to_numpy(mask), allowed_keys(T, S, (), window=(left, right)))
    if (left, right) == (None, 0):
        np.testing.assert_array_equal(to_numpy(mask), to_numpy(causal_mask(T, S, xp)))


@given(T=lengths, left=window_sides, right=window_sides, data=st.data())
def test_global_tokens_see_every_key_and_every_query_sees_them(xp, T, left, right, data):
    tokens = data.draw(st.lists(st.integers(0, T - 1), max_size=3))
    mask = to_numpy(sliding_window_mask(T, T, left, right, global_tokens=tokens, xp=xp))
    band = allowed_keys(T, T, (), window=(left, right))
    is_global = np.isin(np.arange(T), tokens)
    assert mask[is_global].all() and mask[:, is_global].all()            # Longformer's global rows and columns
    np.testing.assert_array_equal(mask[~is_global][:, ~is_global], band[~is_global][:, ~is_global])


def test_window_zeroes_keys_no_query_can_reach_so_nan_there_changes_nothing(xp):
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(xp, rng, (), 2, 6, 3, 3)                      # T < S: queries at p = 4, 5
    k_nan, v_nan = to_numpy(k).copy(), to_numpy(v).copy()
    k_nan[:3], v_nan[:3] = np.nan, np.inf                              # keys 0..2 lie before every window
    out, cache = attention_forward(q, k, v, window=(1, 0))
    out2, cache2 = attention_forward(q, xp.asarray(k_nan), xp.asarray(v_nan), window=(1, 0))
    np.testing.assert_array_equal(to_numpy(out2), to_numpy(out))
    dout = random_array(rng, out.shape, xp=xp)
    for ours, clean in zip(attention_backward(dout, cache2), attention_backward(dout, cache)):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(clean))


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
    dout = random_array(rng, lead + (T, Dv), xp=xp)
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
    dout = random_array(rng, lead + (T, Dv), xp=xp)
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
    bias = random_array(rng, (T, S), np.float32, xp)
    out, cache = attention_forward(q, k, v, mask=mask, causal=causal, bias=bias)
    grads = attention_backward(random_array(rng, lead + (T, Dv), np.float32, xp), cache)
    for array in (out, cache["weights"], *grads):
        assert array.dtype == np.float32


def test_float64_bias_does_not_upcast_float32_attention(xp):
    """A float64 table (say an ALiBi bias built without a dtype) must not turn float32 data into float64."""
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(xp, rng, (2,), 3, 4, 5, 6, np.float32)
    out, cache = attention_forward(q, k, v, bias=random_array(rng, (3, 4), np.float64, xp))
    grads = attention_backward(random_array(rng, (2, 3, 6), np.float32, xp), cache)
    for array in (out, cache["weights"], *grads):
        assert array.dtype == np.float32


@given(problem=attention_problems(), seed=seeds, dtype=dtypes, causal=st.booleans())
def test_inputs_are_never_modified(xp, problem, seed, dtype, causal):
    lead, T, S, Dk, Dv = problem
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, lead, T, S, Dk, Dv, dtype)
    mask = xp.asarray(rng.random((T, S)) < 0.7)
    bias = random_array(rng, (T, S), dtype, xp)
    dout = random_array(rng, lead + (T, Dv), dtype, xp)
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
# Bad input: every one raises ValueError or TypeError naming the argument, what it got and what it needs


def call_forward(**changes):
    """attention_forward on good q (2, 3, 4), k (2, 5, 4), v (2, 5, 6) with some arguments replaced;
    a replacement that is a function is called with xp (to build an array where the test runs)."""
    def call(xp):
        q, k, v = random_qkv(xp, np.random.default_rng(0), (2,), 3, 5, 4, 6)
        arguments = dict(q=q, k=k, v=v)
        arguments.update({name: value(xp) if callable(value) else value for name, value in changes.items()})
        return attention_forward(**arguments)
    return call


def call_backward(dout=None, cache=None):
    """attention_backward after a good forward (out (2, 3, 6) float64), with dout or cache replaced by
    dout(xp, out) / cache(good_cache)."""
    def call(xp):
        q, k, v = random_qkv(xp, np.random.default_rng(0), (2,), 3, 5, 4, 6)
        out, good_cache = attention_forward(q, k, v)
        return attention_backward(xp.ones_like(out) if dout is None else dout(xp, out),
                                  good_cache if cache is None else cache(good_cache))
    return call


def zeros(shape, dtype=np.float64):
    return lambda xp: xp.zeros(shape, dtype=dtype)


FLOAT_ARRAY = r"must be a floating-point array"
BAD_CALLS = {
    # q, k, v: floating-point arrays
    "q integer": (call_forward(q=zeros((2, 3, 4), np.int64)), TypeError,
        r"q must be a floating-point array \(\.\.\., T, Dk\), got \w+ array of dtype int64, shape \(2, 3, 4\)"),
    "q boolean": (call_forward(q=zeros((2, 3, 4), bool)), TypeError, r"q " + FLOAT_ARRAY + r".*dtype bool"),
    "q complex": (call_forward(q=zeros((2, 3, 4), np.complex128)), TypeError, r"q " + FLOAT_ARRAY + r".*complex128"),
    "q a list": (call_forward(q=[[0.0] * 4] * 3), TypeError, r"q " + FLOAT_ARRAY + r".*got list of length 3"),
    "q None": (call_forward(q=None), TypeError, r"q " + FLOAT_ARRAY + r".*got None"),
    "q a number": (call_forward(q=1.0), TypeError, r"q " + FLOAT_ARRAY + r".*got 1\.0"),
    "k integer": (call_forward(k=zeros((2, 5, 4), np.int32)), TypeError,
                  r"k " + FLOAT_ARRAY + r" \(\.\.\., S, Dk\).*int32"),
    "k None": (call_forward(k=None), TypeError, r"k " + FLOAT_ARRAY + r".*got None"),
    "v a list": (call_forward(v=[[1.0] * 6] * 5), TypeError,
                 r"v " + FLOAT_ARRAY + r" \(\.\.\., S, Dv\), got list of length 5"),
    "v boolean": (call_forward(v=zeros((2, 5, 6), bool)), TypeError, r"v " + FLOAT_ARRAY + r".*bool"),
    # ranks and widths
    "q rank 1": (call_forward(q=zeros((4,))), ValueError, r"q must have shape \(\.\.\., length, width\), got \(4,\)"),
    "q rank 0": (call_forward(q=zeros(())), ValueError, r"q must have shape \(\.\.\., length, width\), got \(\)"),
    "k rank 1": (call_forward(k=zeros((4,))), ValueError, r"k must have shape \(\.\.\., length, width\), got \(4,\)"),
    "v rank 1": (call_forward(v=zeros((6,))), ValueError, r"v must have shape \(\.\.\., length, width\), got \(6,\)"),
    "Dk = 0": (call_forward(q=zeros((2, 3, 0)), k=zeros((2, 5, 0))), ValueError,
               r"q must have a width Dk >= 1 \(shape \(\.\.\., T, Dk\)\), got \(2, 3, 0\)"),
    "k's width differs from q's": (call_forward(k=zeros((2, 5, 7))), ValueError,
                                   r"k must have shape \(\.\.\., S, 4\) to match q \(2, 3, 4\), got \(2, 5, 7\)"),
    "k and v lengths differ": (call_forward(v=zeros((2, 6, 6))), ValueError,
                               r"v must have shape \(\.\.\., 5, Dv\) to match k \(2, 5, 4\), got \(2, 6, 6\)"),
    "k and v swapped": (call_forward(k=zeros((2, 5, 6)), v=zeros((2, 5, 4))), ValueError,
                        r"k must have shape \(\.\.\., S, 4\) to match q \(2, 3, 4\), got \(2, 5, 6\)"),
    "leading axes do not broadcast": (call_forward(k=zeros((3, 5, 4)), v=zeros((3, 5, 6))), ValueError,
                                      r"leading axes of q \(2, 3, 4\), k \(3, 5, 4\), v \(3, 5, 6\) do not broadcast"),
    # one dtype
    "k float32, q float64": (call_forward(k=zeros((2, 5, 4), np.float32)), TypeError,
                             r"k must have dtype float64 \(q's\), got float32"),
    "v float16, q float64": (call_forward(v=zeros((2, 5, 6), np.float16)), TypeError,
                             r"v must have dtype float64 \(q's\), got float16"),
    "q float32, k and v float64": (call_forward(q=zeros((2, 3, 4), np.float32)), TypeError,
                                   r"k must have dtype float32 \(q's\), got float64"),
    # mask: boolean, broadcastable to (..., T, S) without adding axes
    "mask float": (call_forward(mask=lambda xp: xp.ones((3, 5))), TypeError,
                   r"mask must be boolean \(True = may attend\), got dtype float64"),
    "mask integer 0/1": (call_forward(mask=lambda xp: xp.ones((3, 5), dtype=np.int8)), TypeError,
                         r"mask must be boolean .*got dtype int8"),
    "mask a list": (call_forward(mask=[[True] * 5] * 3), TypeError,
        r"mask must be a boolean \(True = may attend\) array broadcastable to \(\.\.\., T, S\), got list of length 3"),
    "mask a Python bool": (call_forward(mask=True), TypeError, r"mask must be a boolean .* array .*got True"),
    "mask (S, T) instead of (T, S)": (call_forward(mask=lambda xp: xp.ones((5, 3), dtype=bool)), ValueError,
                                      r"mask must broadcast to \(\.\.\., T, S\) = \(2, 3, 5\), got \(5, 3\)"),
    "mask one key too many": (call_forward(mask=lambda xp: xp.ones((6,), dtype=bool)), ValueError,
                              r"mask must broadcast to \(\.\.\., T, S\) = \(2, 3, 5\), got \(6,\)"),
    "mask with an extra leading axis": (call_forward(mask=lambda xp: xp.ones((2, 2, 3, 5), dtype=bool)), ValueError,
                                        r"mask must broadcast to \(\.\.\., T, S\) = \(2, 3, 5\), got \(2, 2, 3, 5\)"),
    "mask stretching q's batch of 1": (
        call_forward(q=zeros((1, 3, 4)), k=zeros((1, 5, 4)), v=zeros((1, 5, 6)),
                     mask=lambda xp: xp.ones((4, 3, 5), dtype=bool)), ValueError,
        r"mask must broadcast to \(\.\.\., T, S\) = \(1, 3, 5\), got \(4, 3, 5\)"),
    "mask batch on unbatched q": (
        call_forward(q=zeros((3, 4)), k=zeros((5, 4)), v=zeros((5, 6)), mask=lambda xp: xp.ones((2, 1, 5), dtype=bool)),
        ValueError, r"mask must broadcast to \(\.\.\., T, S\) = \(3, 5\), got \(2, 1, 5\)"),
    # bias: floating-point, broadcastable like mask
    "bias integer": (call_forward(bias=lambda xp: xp.zeros((3, 5), dtype=np.int64)), TypeError,
                     r"bias must be floating-point, got dtype int64"),
    "bias boolean": (call_forward(bias=lambda xp: xp.ones((3, 5), dtype=bool)), TypeError,
                     r"bias must be floating-point, got dtype bool"),
    "bias a number": (call_forward(bias=1.0), TypeError,
                      r"bias must be a floating-point array broadcastable to \(\.\.\., T, S\), got 1\.0"),
    "bias a list": (call_forward(bias=[[0.0] * 5] * 3), TypeError,
                    r"bias must be a floating-point array .*got list of length 3"),
    "bias of the wrong shape": (call_forward(bias=zeros((3, 4))), ValueError,
                                r"bias must broadcast to \(\.\.\., T, S\) = \(2, 3, 5\), got \(3, 4\)"),
    "bias with an extra leading axis": (call_forward(bias=zeros((4, 2, 3, 5))), ValueError,
                                        r"bias must broadcast to \(\.\.\., T, S\) = \(2, 3, 5\), got \(4, 2, 3, 5\)"),
    # causal: True or False
    "causal an array": (call_forward(causal=lambda xp: xp.ones((3, 5), dtype=bool)), TypeError,
                        r"causal must be True or False, got \w+ array of dtype bool, shape \(3, 5\)"),
    "causal 1": (call_forward(causal=1), TypeError, r"causal must be True or False, got 1"),
    "causal None": (call_forward(causal=None), TypeError, r"causal must be True or False, got None"),
    "causal a string": (call_forward(causal="True"), TypeError, r"causal must be True or False, got 'True'"),
    # scale: a finite number > 0
    "scale nan": (call_forward(scale=float("nan")), ValueError, r"scale must be a finite number > 0, got nan"),
    "scale inf": (call_forward(scale=float("inf")), ValueError, r"scale must be a finite number > 0, got inf"),
    "scale -inf": (call_forward(scale=-np.inf), ValueError, r"scale must be a finite number > 0, got -inf"),
    "scale 0": (call_forward(scale=0), ValueError, r"scale must be a finite number > 0, got 0"),
    "scale negative": (call_forward(scale=-0.5), ValueError, r"scale must be a finite number > 0, got -0\.5"),
    "scale float32 nan": (call_forward(scale=np.float32("nan")), ValueError, r"scale must be a finite number > 0"),
    "scale a string": (call_forward(scale="0.5"), TypeError,
                       r"scale must be a number \(or None for 1 / sqrt\(Dk\)\), got '0\.5'"),
    "scale True": (call_forward(scale=True), TypeError, r"scale must be a number .*got True"),
    "scale an array": (call_forward(scale=lambda xp: xp.ones(1)), TypeError, r"scale must be a number .*got \w+ array"),
    "scale complex": (call_forward(scale=1j), TypeError, r"scale must be a number .*got 1j"),
    # attention_backward: dout of exactly the output's shape and dtype; the forward's cache
    "dout float32 after a float64 forward": (call_backward(dout=lambda xp, out: out.astype(np.float32)), TypeError,
                                             r"dout must have dtype float64 \(the forward's\), got float32"),
    "dout integer": (call_backward(dout=lambda xp, out: xp.ones(out.shape, dtype=np.int64)), TypeError,
                     r"dout must have dtype float64 \(the forward's\), got int64"),
    "dout with an extra axis": (call_backward(dout=lambda xp, out: out[None]), ValueError,
                                r"dout must have shape \(2, 3, 6\) \(the forward output's\), got \(1, 2, 3, 6\)"),
    "dout without the batch axis": (call_backward(dout=lambda xp, out: out[0]), ValueError,
                                    r"dout must have shape \(2, 3, 6\) .*got \(3, 6\)"),
    "dout broadcastable (2, 3, 1)": (call_backward(dout=lambda xp, out: out[..., :1]), ValueError,
                                     r"dout must have shape \(2, 3, 6\) .*got \(2, 3, 1\)"),
    "dout transposed": (call_backward(dout=lambda xp, out: xp.swapaxes(out, -1, -2)), ValueError,
                        r"dout must have shape \(2, 3, 6\) .*got \(2, 6, 3\)"),
    "dout a list": (call_backward(dout=lambda xp, out: [[[0.0] * 6] * 3] * 2), TypeError,
                    r"dout must be an array of dtype float64, got list of length 2"),
    "dout None": (call_backward(dout=lambda xp, out: None), TypeError,
                  r"dout must be an array of dtype float64, got None"),
    "dout a number": (call_backward(dout=lambda xp, out: 1.0), TypeError, r"dout must be an array .*got 1\.0"),
    "cache a tuple": (call_backward(cache=lambda c: tuple(c.values())), TypeError,
                      r"cache must be the dict attention_forward returned, got tuple of length 5"),
    "cache None": (call_backward(cache=lambda c: None), TypeError,
                   r"cache must be the dict attention_forward returned, got None"),
    "cache without weights": (call_backward(cache=lambda c: {n: a for n, a in c.items() if n != "weights"}), TypeError,
                              r"cache must be the dict attention_forward returned"),
    # softmax and its backward
    "softmax of integers": (lambda xp: softmax(xp.arange(3)), TypeError, r"x must be a floating-point array .*int64"),
    "softmax of a list": (lambda xp: softmax([1.0, 2.0]), TypeError,
                          r"x must be a floating-point array .*got list of length 2"),
    "softmax_backward dy of another shape": (lambda xp: softmax_backward(xp.ones((2, 3)), xp.ones((2, 4)) / 4),
        ValueError, r"dy must have shape \(2, 4\) \(the forward output's\), got \(2, 3\)"),
    "softmax_backward dy of another dtype": (lambda xp: softmax_backward(xp.ones(3, np.float32), xp.ones(3) / 3),
                                             TypeError, r"dy must have dtype float64 \(the forward's\), got float32"),
    "softmax_backward y integer": (lambda xp: softmax_backward(xp.ones(3), xp.ones(3, np.int64)), TypeError,
                                   r"y must be a floating-point array"),
    "softmax axis out of range": (lambda xp: softmax(xp.ones((2, 3)), axis=2), ValueError,
                                  r"axis must be an integer in \[-2, 2\) for shape \(2, 3\), got 2"),
    "softmax axis a float": (lambda xp: softmax(xp.ones((2, 3)), axis=1.0), ValueError,
                             r"axis must be an integer in \[-2, 2\) for shape \(2, 3\), got 1\.0"),
    "softmax of a 0-d array": (lambda xp: softmax(xp.ones(())), ValueError, r"axis must be an integer in \[0, 0\)"),
    "softmax_backward axis out of range": (lambda xp: softmax_backward(xp.ones(3), xp.ones(3) / 3, axis=-2),
                                           ValueError, r"axis must be an integer in \[-1, 1\) for shape \(3,\), got -2"),
    # causal_mask: lengths are integers >= 0, and xp an array module
    "causal_mask(3, xp='numpy')": (lambda xp: causal_mask(3, xp="numpy"), TypeError,
                                   r"xp must be an array module \(numpy or cupy\), got 'numpy'"),
    "causal_mask(-3)": (lambda xp: causal_mask(-3, xp=xp), ValueError, r"T must be an integer >= 0, got -3"),
    "causal_mask(2.5)": (lambda xp: causal_mask(2.5, xp=xp), ValueError, r"T must be an integer >= 0, got 2\.5"),
    "causal_mask(3.0)": (lambda xp: causal_mask(3.0, xp=xp), ValueError, r"T must be an integer >= 0, got 3\.0"),
    "causal_mask(True)": (lambda xp: causal_mask(True, xp=xp), ValueError, r"T must be an integer >= 0, got True"),
    "causal_mask('3')": (lambda xp: causal_mask("3", xp=xp), ValueError, r"T must be an integer >= 0, got '3'"),
    "causal_mask(None)": (lambda xp: causal_mask(None, xp=xp), ValueError, r"T must be an integer >= 0, got None"),
    "causal_mask(3, -1)": (lambda xp: causal_mask(3, -1, xp=xp), ValueError, r"S must be an integer >= 0, got -1"),
    "causal_mask(3, 2.0)": (lambda xp: causal_mask(3, 2.0, xp=xp), ValueError, r"S must be an integer >= 0, got 2\.0"),
    # window: a pair (left, right), each an integer >= 0 or None; sliding_window_mask's sides and globals
    "window a number": (call_forward(window=3), ValueError,
                        r"window must be a pair \(left, right\) of integers >= 0 or None, got 3"),
    "window of one side": (call_forward(window=(3,)), ValueError, r"window must be a pair .*got \(3,\)"),
    "window of three sides": (call_forward(window=(1, 2, 3)), ValueError, r"window must be a pair .*got \(1, 2, 3\)"),
    "window negative": (call_forward(window=(-1, 0)), ValueError, r"window must be a pair .*got \(-1, 0\)"),
    "window a float side": (call_forward(window=(2.0, 0)), ValueError, r"window must be a pair .*got \(2\.0, 0\)"),
    "window a bool side": (call_forward(window=(True, 0)), ValueError, r"window must be a pair .*got \(True, 0\)"),
    "window an array": (call_forward(window=lambda xp: xp.ones(2, dtype=np.int64)), ValueError,
                        r"window must be a pair .*got \w+ array of dtype int64, shape \(2,\)"),
    "sliding_window_mask left -1": (lambda xp: sliding_window_mask(3, left=-1, xp=xp), ValueError,
                                    r"left must be an integer >= 0 or None \(unbounded\), got -1"),
    "sliding_window_mask right 1.5": (lambda xp: sliding_window_mask(3, right=1.5, xp=xp), ValueError,
                                      r"right must be an integer >= 0 or None \(unbounded\), got 1\.5"),
    "sliding_window_mask T -1": (lambda xp: sliding_window_mask(-1, xp=xp), ValueError,
                                 r"T must be an integer >= 0, got -1"),
    "global token out of range": (lambda xp: sliding_window_mask(4, left=1, global_tokens=(0, 4), xp=xp),
                                  ValueError, r"global_tokens must be a sequence of integer positions in "
                                              r"\[0, 4\), got \[0, 4\]"),
    "global token negative": (lambda xp: sliding_window_mask(4, global_tokens=[-1], xp=xp), ValueError,
                              r"global_tokens must be .* in \[0, 4\), got \[-1\]"),
    "global tokens a number": (lambda xp: sliding_window_mask(4, global_tokens=2, xp=xp), ValueError,
                               r"global_tokens must be a sequence .*got 2"),
    "global tokens with T != S": (lambda xp: sliding_window_mask(3, 5, left=1, global_tokens=(0,), xp=xp), ValueError,
                                  r"global_tokens need T == S .*got T = 3, S = 5"),
    "causal_mask(an array)": (lambda xp: causal_mask(xp.ones(3, dtype=np.int64), xp=xp), ValueError,
                              r"T must be an integer >= 0, got \w+ array of dtype int64, shape \(3,\)"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_an_error_naming_the_argument_what_it_got_and_what_it_needs(xp, name):
    call, error, message = BAD_CALLS[name]
    with pytest.raises(error, match=message):
        call(xp)


@pytest.mark.cupy_on_cpu
def test_arrays_from_two_array_modules_are_refused_naming_the_argument():
    import cupy_on_cpu as cp
    rng = np.random.default_rng(0)
    q, k, v = (cp.asarray(a) for a in random_qkv(np, rng, (), 3, 5, 4, 6))
    host_k, host_mask, host_bias = cp.asnumpy(k), np.ones((3, 5), dtype=bool), np.zeros((3, 5))
    with pytest.raises(TypeError, match=r"k must be a cupy_on_cpu array like q, got numpy array"):
        attention_forward(q, host_k, v)
    with pytest.raises(TypeError, match=r"mask must be a cupy_on_cpu array like q, got numpy array"):
        attention_forward(q, k, v, mask=host_mask)
    with pytest.raises(TypeError, match=r"bias must be a cupy_on_cpu array like q, got numpy array"):
        attention_forward(q, k, v, bias=host_bias)
    out, cache = attention_forward(q, k, v)
    with pytest.raises(TypeError, match=r"dout must be a cupy_on_cpu array like the forward's inputs, got numpy"):
        attention_backward(cp.asnumpy(out), cache)


# ----------------------------------------------------------------------------------------------------
# Good input at the edges: empty sizes, NumPy scalars, flags as NumPy booleans


@pytest.mark.parametrize("lead, T, S, Dv", [((2,), 0, 5, 6), ((2,), 3, 0, 6), ((0,), 3, 5, 6), ((2,), 3, 5, 0),
                                            ((2, 0), 0, 0, 1)])
def test_empty_sizes_give_empty_or_zero_results_and_gradients(xp, lead, T, S, Dv):
    # S = 0: every query has no allowed key, so the answer is zeros and zero gradient (flash agrees).
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(xp, rng, lead, T, S, 4, Dv)
    for options in ({}, {"causal": True}, {"mask": xp.ones((T, S), dtype=bool)}):
        out, cache = attention_forward(q, k, v, **options)
        assert out.shape == lead + (T, Dv) and not to_numpy(out).any()
        dq, dk, dv = attention_backward(random_array(rng, out.shape, xp=xp), cache)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
        # no query, no key or no value width: nothing for any gradient to carry
        assert not to_numpy(dq).any() and not to_numpy(dk).any() and not to_numpy(dv).any()


def test_numpy_scalars_and_booleans_are_accepted_where_python_ones_are(xp):
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(xp, rng, (2,), 3, 5, 4, 6)
    out, _ = attention_forward(q, k, v, causal=True, scale=0.5)
    out_np, _ = attention_forward(q, k, v, causal=np.bool_(True), scale=np.float32(0.5))
    np.testing.assert_array_equal(to_numpy(out_np), to_numpy(out))
    np.testing.assert_array_equal(to_numpy(causal_mask(np.int64(3), np.int32(5), xp)), to_numpy(causal_mask(3, 5, xp)))


# ----------------------------------------------------------------------------------------------------
# Demo


def test_demo_runs_and_its_asserts_hold():
    result = run_demo("attention.py")
    assert "Every allowed row sums to 1 and masked entries are exactly 0." in result.stdout


# ----------------------------------------------------------------------------------------------------
# Any input at all: a clear error, or a result whose backward accepts its own output's shape


@given(data=st.data(), problem=attention_problems(max_len=3, max_width=3),
       wrong=st.sampled_from(["nothing", "q", "k", "v", "mask", "bias"]), use_mask=st.booleans(),
       use_bias=st.booleans(), causal=st.sampled_from([False, True] * 3 + [None, 1, np.ones(2, bool)]),
       scale=st.sampled_from([None] * 6 + [0.5, 0, -1.0, float("nan"), float("inf"), "0.5", True]))
def test_any_input_gives_a_clear_error_or_a_result_its_backward_accepts(data, problem, wrong, use_mask, use_bias,
                                                                       causal, scale):
    lead, T, S, Dk, Dv = problem
    q, k, v = random_qkv(np, np.random.default_rng(0), lead, T, S, Dk, Dv)
    mask = np.ones(lead + (T, S), dtype=bool) if use_mask or wrong == "mask" else None
    bias = np.zeros((T, S)) if use_bias or wrong == "bias" else None
    q, k, v, mask, bias = (data.draw(spoiled(a)) if name == wrong else a   # one argument spoiled
                           for name, a in (("q", q), ("k", k), ("v", v), ("mask", mask), ("bias", bias)))
    try:
        out, cache = attention_forward(q, k, v, mask=mask, causal=causal, bias=bias, scale=scale)
    except (ValueError, TypeError) as error:   # the message starts with the argument's name
        assert str(error).split()[0] in {"q", "k", "v", "mask", "causal", "bias", "scale", "leading"}, error
        return
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    assert out.shape == lead + (q.shape[-2], v.shape[-1]) and out.dtype == q.dtype
    dq, dk, dv = attention_backward(np.ones_like(out), cache)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)

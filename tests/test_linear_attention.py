"""Tests for linear_attention.py: the feature map, linear attention's forward / backward, the recurrent step.

Outputs are compared with the explicit form written independently below (phi(Q) phi(K)^T as a T x S
matrix, masked and row-normalised with eps, in float64), gradients with central finite differences in
float64 with a random upstream gradient. Shapes are drawn by hypothesis with the edges pinned by
@example (T < S, T > S, one token, Dk != Dv, k and v shared across a leading axis), and the block size
of the causal sweeps is drawn too, so blocks that straddle the T - S offset and a partial last block are
exercised at small T. Every test taking `xp` runs on NumPy and on the CuPy stand-in (tests/cuda).
"""
import functools
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, strategies as st

from attention import attention_forward
from gradcheck import check_gradients
from helpers import random_array, run_demo, to_numpy, with_examples
from linear_attention import (feature_map_backward, feature_map_forward, linear_attention_backward,
                              linear_attention_forward, linear_attention_step)

seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([np.float32, np.float64])
blocks = st.sampled_from([1, 2, 3, 5, 64])

# The same sums in another order: float32 keeps ~7 digits, float64 ~16; outputs are averages of values of
# size ~1 weighted by phi products of size ~1-10, so rounding stays a few ulps of that.
TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}

# check_gradients' atol assumes a loss near 1; ours sums up to ~100 terms of size ~1 (see test_attention.py).
FD_ATOL = 2e-8


def explicit_phi(x):
    """elu(x) + 1 written as its definition, in float64."""
    x = to_numpy(x).astype(np.float64)
    return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))


def explicit_linear_attention(q, k, v, causal, eps=1e-6):
    """The T x S form: weights phi(q_i) . phi(k_j), zero where causal forbids, each row divided by its
    sum + eps; float64. The quadratic route that linear_attention.py never takes."""
    weights = np.einsum("...td,...sd->...ts", explicit_phi(q), explicit_phi(k))    # (..., T, S)
    T, S = weights.shape[-2:]
    if causal:
        weights = weights * np.array([[j <= i + (S - T) for j in range(S)] for i in range(T)])
    return weights @ to_numpy(v).astype(np.float64) / (weights.sum(axis=-1, keepdims=True) + eps)


@st.composite
def problems(draw, max_len=9, max_width=5):
    """(lead, T, S, Dk, Dv, shared): q (lead, T, Dk); k, v (lead, S, ...) or (1, S, ...) when shared."""
    return (draw(st.sampled_from([(), (2,)])), draw(st.integers(1, max_len)), draw(st.integers(1, max_len)),
            draw(st.integers(1, max_width)), draw(st.integers(1, max_width)), draw(st.booleans()))


# The edges where a wrong alignment or width shows: T < S, T > S, one token, Dk != Dv, shared k and v.
EDGES = [((), 2, 7, 3, 5, False), ((2,), 6, 2, 1, 4, False), ((), 1, 1, 1, 1, False), ((2,), 5, 8, 4, 2, True)]
at_the_edges = functools.partial(with_examples, "problem", EDGES)


def random_qkv(xp, rng, problem, dtype=np.float64):
    lead, T, S, Dk, Dv, shared = problem
    kv_lead = (1,) * len(lead) if shared else lead
    return (random_array(rng, lead + (T, Dk), dtype, xp), random_array(rng, kv_lead + (S, Dk), dtype, xp),
            random_array(rng, kv_lead + (S, Dv), dtype, xp))


# ----------------------------------------------------------------------------------------------------
# The feature map


@given(seed=seeds, dtype=dtypes)
def test_feature_map_is_elu_plus_one_strictly_positive_and_its_backward_matches_finite_differences(xp, seed,
                                                                                                 dtype):
    rng = np.random.default_rng(seed)
    x = random_array(rng, (3, 5), dtype, xp) * 4
    x[0, :3] = xp.asarray(np.array([0.0, -700.0, 700.0], dtype=dtype))   # the kink and the far tails
    phi, cache = feature_map_forward(x)
    assert phi.dtype == dtype
    np.testing.assert_allclose(to_numpy(phi), explicit_phi(x), **TOL[dtype])   # no inf from exp(700)
    assert bool((phi[1:] > 0).all())                             # only exp(-700) underflows to 0
    x64 = random_array(rng, (3, 5), xp=xp) * 3
    dphi = random_array(rng, (3, 5), xp=xp)
    dx = feature_map_backward(dphi, feature_map_forward(x64)[1])
    check_gradients(lambda: float((feature_map_forward(x64)[0] * dphi).sum()), [x64], [dx])


# ----------------------------------------------------------------------------------------------------
# Linear attention equals the explicit T x S form, in outputs and gradients


@given(problem=problems(), seed=seeds, dtype=dtypes, causal=st.booleans(), block=blocks)
@at_the_edges(seed=0, dtype=np.float32, causal=True, block=2)
@at_the_edges(seed=1, dtype=np.float64, causal=False, block=64)
def test_output_equals_the_explicit_masked_row_normalised_form(xp, problem, seed, dtype, causal, block):
    q, k, v = random_qkv(xp, np.random.default_rng(seed), problem, dtype)
    out, _ = linear_attention_forward(q, k, v, causal=causal, block=block)
    assert out.dtype == dtype
    np.testing.assert_allclose(to_numpy(out), explicit_linear_attention(q, k, v, causal), **TOL[dtype])


@given(problem=problems(max_len=6, max_width=3), seed=seeds, causal=st.booleans(), block=blocks)
@at_the_edges(seed=0, causal=True, block=2)
@at_the_edges(seed=1, causal=False, block=64)
def test_gradients_match_finite_differences_of_the_explicit_form(xp, problem, seed, causal, block):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, problem)
    out, cache = linear_attention_forward(q, k, v, causal=causal, block=block)
    dout = random_array(rng, out.shape, xp=xp)                  # a random upstream gradient
    grads = linear_attention_backward(dout, cache)
    loss = lambda: float((explicit_linear_attention(q, k, v, causal) * to_numpy(dout)).sum())
    check_gradients(loss, [q, k, v], list(grads), atol=FD_ATOL)


def test_a_query_with_no_key_gives_zeros_and_passes_zero_gradient(xp):
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(xp, rng, ((), 6, 2, 3, 4, False))       # T > S causal: queries 0..3 see no key
    out, cache = linear_attention_forward(q, k, v, causal=True, block=3)
    dq, dk, dv = linear_attention_backward(random_array(rng, out.shape, xp=xp), cache)
    assert (to_numpy(out[:4]) == 0).all() and (to_numpy(dq[:4]) == 0).all()
    assert bool(xp.isfinite(dq).all() & xp.isfinite(dk).all() & xp.isfinite(dv).all())


# ----------------------------------------------------------------------------------------------------
# The recurrent view


@given(problem=problems(max_len=10), seed=seeds, dtype=dtypes)
@at_the_edges(seed=0, dtype=np.float32)
def test_recurrent_step_gives_the_parallel_causal_outputs_with_the_prefix_keys_prefilled(xp, problem, seed,
                                                                                       dtype):
    lead, T, S = problem[:3]
    if T > S:                                                    # the step needs a key per query
        T, S = S, T
    problem = (lead, T, S) + problem[3:]
    q, k, v = random_qkv(xp, np.random.default_rng(seed), problem, dtype)
    parallel, _ = linear_attention_forward(q, k, v, causal=True, block=3)
    # Bottom-right alignment: query i sits at position i + (S - T), so the first S - T keys come before
    # every query. Prefill the state with them (their own outputs are not part of the parallel form).
    state, outs = None, []
    for j in range(S):
        i = max(j - (S - T), 0)                                  # any query will do for a prefix key
        query = q[..., i:i + 1, :]
        out, state = linear_attention_step(query, k[..., j:j + 1, :], v[..., j:j + 1, :], state)
        if j >= S - T:
            outs.append(out)
    assert state["S"].shape[-2:] == (k.shape[-1], v.shape[-1]) and state["S"].dtype == dtype
    np.testing.assert_allclose(to_numpy(xp.concatenate(outs, axis=-2)), to_numpy(parallel), **TOL[dtype])


def test_the_step_does_not_modify_the_state_it_is_given(xp):
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(xp, rng, ((2,), 1, 1, 3, 4, False))
    _, state = linear_attention_step(q, k, v)
    before = {name: to_numpy(x).copy() for name, x in state.items()}
    _, new_state = linear_attention_step(q, k, v, state)
    for name in before:
        np.testing.assert_array_equal(to_numpy(state[name]), before[name])
        np.testing.assert_allclose(to_numpy(new_state[name]), 2 * before[name], rtol=1e-15)   # the same token twice


# ----------------------------------------------------------------------------------------------------
# Symmetry and causality


@given(lead=st.sampled_from([(), (2,)]), T=st.integers(1, 9), D=st.integers(1, 5), seed=seeds, dtype=dtypes)
def test_without_the_causal_mask_self_attention_is_permutation_equivariant(xp, lead, T, D, seed, dtype):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, (lead, T, T, D, D, False), dtype)
    dout = random_array(rng, lead + (T, D), dtype, xp)
    perm = xp.asarray(rng.permutation(T))
    out, cache = linear_attention_forward(q, k, v)
    out_p, cache_p = linear_attention_forward(q[..., perm, :], k[..., perm, :], v[..., perm, :])
    np.testing.assert_allclose(to_numpy(out_p), to_numpy(out[..., perm, :]), **TOL[dtype])
    grads = linear_attention_backward(dout, cache)
    grads_p = linear_attention_backward(dout[..., perm, :], cache_p)
    for g, g_p in zip(grads, grads_p):
        np.testing.assert_allclose(to_numpy(g_p), to_numpy(g[..., perm, :]), **TOL[dtype])


@given(problem=problems(), data=st.data(), seed=seeds, dtype=dtypes, block=blocks)
@at_the_edges(data=None, seed=0, dtype=np.float32, block=2)
def test_future_keys_and_values_change_nothing_exactly(xp, problem, data, seed, dtype, block):
    lead, T, S = problem[:3]
    i = data.draw(st.integers(0, T - 1)) if data is not None else T // 2   # outputs 0..i must not move
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(xp, rng, problem, dtype)
    future = max(i + (S - T) + 1, 0)                             # the first key query i may not see
    k2, v2 = k.copy(), v.copy()
    k2[..., future:, :] = random_array(rng, k2[..., future:, :].shape, dtype, xp) * 10
    v2[..., future:, :] = random_array(rng, v2[..., future:, :].shape, dtype, xp) * 10
    out, cache = linear_attention_forward(q, k, v, causal=True, block=block)
    out2, _ = linear_attention_forward(q, k2, v2, causal=True, block=block)
    # Exactly: a future key's in-block weight is replaced by 0 and it joins the carried state only after.
    np.testing.assert_array_equal(to_numpy(out2[..., :i + 1, :]), to_numpy(out[..., :i + 1, :]))
    dout = random_array(rng, out.shape, dtype, xp)
    dout[..., i + 1:, :] = 0                                     # differentiate outputs 0..i only
    dq, dk, dv = linear_attention_backward(dout, cache)
    assert (to_numpy(dk[..., future:, :]) == 0).all() and (to_numpy(dv[..., future:, :]) == 0).all()


# ----------------------------------------------------------------------------------------------------
# dtype and memory


@pytest.mark.parametrize("causal", [False, True])
def test_float32_stays_float32(xp, causal):
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(xp, rng, ((2,), 5, 7, 3, 4, False), np.float32)
    out, cache = linear_attention_forward(q, k, v, causal=causal, block=2)
    grads = linear_attention_backward(xp.ones_like(out), cache)
    step, state = linear_attention_step(q[..., :1, :], k[..., :1, :], v[..., :1, :])
    arrays = [out, cache["den"], *grads, step, state["S"], state["z"]]
    assert all(a.dtype == np.float32 for a in arrays), [a.dtype for a in arrays]


def array_leaves(tree):
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in array_leaves(value)]
    return [tree] if hasattr(tree, "shape") else []


def test_the_causal_cache_and_backward_hold_no_running_sum_per_position():
    T, Dk, Dv = 512, 64, 64
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(np, rng, ((), T, T, Dk, Dv, False))
    out, cache = linear_attention_forward(q, k, v, causal=True)
    leaves = array_leaves(cache)
    assert not any(a.shape[-3:] == (T, Dk, Dv) for a in leaves if a.ndim >= 3)
    # phi(q), phi(k), v, out and den: O(T (Dk + Dv)) numbers, the inputs' and output's size.
    assert sum(a.size for a in leaves) == T * Dk + T * Dk + T * Dv + T * Dv + T
    # The backward's peak (tracemalloc counts NumPy's buffers; deterministic) stays far below one (T, Dk, Dv)
    # array of prefix sums, 16 MiB here: it holds a few (T, D) arrays (256 KiB each) and block-sized tiles.
    dout = random_array(rng, out.shape)
    tracemalloc.start()
    linear_attention_backward(dout, cache)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < T * Dk * Dv * 8 / 4, f"backward peak {peak / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------------------
# Bad input: ValueError or TypeError naming the argument, what it got and what it needs


QKV = (np.zeros((2, 5, 3)), np.zeros((2, 6, 3)), np.zeros((2, 6, 4)))


@pytest.mark.parametrize("change, error, match", [
    (dict(q=np.zeros((2, 5, 3), dtype=int)), TypeError, r"^q must be a floating-point array"),
    (dict(k=np.zeros((2, 6, 2))), ValueError, r"^k must have shape \(\.\.\., S, 3\) to match q"),
    (dict(v=np.zeros((2, 5, 4))), ValueError, r"^v must have shape \(\.\.\., 6, Dv\)"),
    (dict(v=np.zeros((2, 6, 4), dtype=np.float32)), TypeError, "^v must have dtype float64"),
    (dict(causal=1), TypeError, "^causal must be True or False, got 1"),
    (dict(eps=0.0), ValueError, "^eps must be a finite number > 0, got 0.0"),
    (dict(eps=float("nan")), ValueError, "^eps must be a finite number > 0, got nan"),
    (dict(eps="1e-6"), TypeError, "^eps must be a number, got '1e-6'"),
    (dict(block=0), ValueError, "^block must be an integer >= 1, got 0"),
    (dict(block=2.5), ValueError, "^block must be an integer >= 1, got 2.5"),
])
def test_bad_forward_input_raises_naming_it(change, error, match):
    arguments = dict(zip("qkv", QKV))
    arguments.update(change)
    with pytest.raises(error, match=match):
        linear_attention_forward(**arguments)


def test_bad_upstream_gradient_or_cache_raises_naming_it():
    out, cache = linear_attention_forward(*QKV, causal=True)
    with pytest.raises(ValueError, match=r"^dout must have shape \(2, 5, 4\) .*, got \(2, 5, 3\)"):
        linear_attention_backward(np.zeros((2, 5, 3)), cache)
    with pytest.raises(TypeError, match="^dout must have dtype float64 .*, got float32"):
        linear_attention_backward(out.astype(np.float32), cache)
    with pytest.raises(TypeError, match="^cache must be the dict linear_attention_forward returned"):
        linear_attention_backward(out, attention_forward(*QKV)[1])
    with pytest.raises(TypeError, match="^x must be a floating-point array"):
        feature_map_forward(np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"^dphi must have shape \(3,\) .*, got \(4,\)"):
        feature_map_backward(np.zeros(4), feature_map_forward(np.zeros(3))[1])


@pytest.mark.parametrize("change, error, match", [
    (dict(q=np.zeros((2, 2, 3))), ValueError, r"^q must hold one token, shape \(\.\.\., 1, width\), got \(2, 2, 3\)"),
    (dict(state={"S": np.zeros((2, 3, 4))}), TypeError, r"^state must be None or a dict \{'S', 'z'\}, got \['S'\]"),
    (dict(state={"S": np.zeros((2, 4, 3)), "z": np.zeros((2, 3))}), ValueError,
     r"^state\['S'\] must have shape \(\.\.\., 3, 4\) for k .*, got \(2, 4, 3\)"),
    (dict(state={"S": np.zeros((2, 3, 4)), "z": np.zeros((2, 3), dtype=np.float32)}), TypeError,
     r"^state\['z'\] must have dtype float64"),
    (dict(eps=-1.0), ValueError, "^eps must be a finite number > 0, got -1.0"),
])
def test_bad_step_input_raises_naming_it(change, error, match):
    arguments = dict(q=np.zeros((2, 1, 3)), k=np.zeros((2, 1, 3)), v=np.zeros((2, 1, 4)), state=None)
    arguments.update(change)
    with pytest.raises(error, match=match):
        linear_attention_step(**arguments)


def test_demo_runs_and_checks_itself():
    result = run_demo("linear_attention.py", timeout=120)
    assert "Recurrent steps vs parallel causal form" in result.stdout

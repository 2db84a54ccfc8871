"""Tests for multihead.py: the properties multi-head attention must have, each proved on its own.

Hypothesis draws shapes (B, T, S, H, Dh) and seeds, with the edges that decide whether a bug shows
(T < S, T > S, one token) pinned by @example; tests taking `xp` run on NumPy, CuPy on a CPU and, with a
GPU, CuPy.
"""
import functools

import numpy as np
import pytest
from hypothesis import given, strategies as st

from attention import causal_mask
from gradcheck import check_directional_derivative, check_gradients, random_like
from helpers import run_demo, spoiled, to_numpy, with_examples
from multihead import (PARAM_NAMES, init_multihead, linear_backward, linear_forward, multihead_backward,
                       multihead_forward)
from positional import alibi_bias


# ----------------------------------------------------------------------------------------------------
# Helpers


def make_case(xp, seed, B, T, S, D, dtype=np.float64):
    """rng, x_q (B, T, D), x_kv (B, S, D) and params on `xp`; biases non-zero so their gradients count."""
    rng = np.random.default_rng(seed)
    params = init_multihead(D, rng, dtype)
    for name in ("b_q", "b_k", "b_v", "b_o"):
        params[name] = (0.1 * rng.standard_normal(D)).astype(dtype)
    params = {name: xp.asarray(w) for name, w in params.items()}
    x_q = xp.asarray(rng.standard_normal((B, T, D)).astype(dtype))
    x_kv = xp.asarray(rng.standard_normal((B, S, D)).astype(dtype))
    return rng, x_q, x_kv, params


def assert_same(a, b):
    """Bit-for-bit equality: masked keys get weight exp(-inf) = 0 exactly, so nothing may leak."""
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def padding_mask(xp, rng, B, S):
    """(B, 1, 1, S) random padding mask, True = real token, with at least one real token per sequence."""
    keep = rng.random((B, S)) < 0.6
    keep[np.arange(B), rng.integers(0, S, B)] = True
    return xp.asarray(keep[:, None, None, :])


@st.composite
def shapes(draw, even_head_width=False, max_len=5):
    """(B, T, S, D, H) with D = H * Dh; Dh even when RoPE needs it."""
    H = draw(st.integers(1, 3))
    Dh = draw(st.sampled_from([2, 4])) if even_head_width else draw(st.integers(1, 3))
    B, T, S = draw(st.integers(1, 2)), draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    return B, T, S, H * Dh, H


seeds = st.integers(0, 2**32 - 1)

# (B, T, S, D, H) at the edges: T < S (cached decoding), T > S, one token, and T == S.
EDGE_SHAPES = [(2, 2, 5, 4, 2), (1, 5, 2, 4, 1), (1, 1, 1, 2, 1), (2, 3, 3, 8, 2)]
at_the_edges = functools.partial(with_examples, "shape", EDGE_SHAPES)   # @example for each, other arguments given


# ----------------------------------------------------------------------------------------------------
# Initialisation


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_draws_torch_multihead_distributions(dtype):
    D = 256
    params = init_multihead(D, np.random.default_rng(0), dtype)
    assert list(params) == list(PARAM_NAMES)
    in_bound, out_bound = np.sqrt(6 / (D + 3 * D)), 1 / np.sqrt(D)
    for name, bound in (("W_q", in_bound), ("W_k", in_bound), ("W_v", in_bound), ("W_o", out_bound)):
        w = params[name]
        assert w.shape == (D, D) and w.dtype == dtype
        assert np.abs(w).max() <= bound * (1 + 1e-6)          # float32 rounding of values at the bound
        assert np.abs(w).max() > 0.99 * bound                 # 65536 uniform draws reach the last 1%
        # U(-a, a) has mean 0 and variance a^2 / 3; with 65536 draws both are within 3% of a^2 / 3.
        assert abs(w.mean()) < 0.03 * bound
        assert abs(w.var() / (bound**2 / 3) - 1) < 0.03
    for name in ("b_q", "b_k", "b_v", "b_o"):
        assert params[name].shape == (D,) and params[name].dtype == dtype and not params[name].any()


def test_init_bounds_are_those_torch_uses():
    torch = pytest.importorskip("torch")
    D = 64
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(D, 4, batch_first=True, bias=True)
    in_proj, out_proj = mha.in_proj_weight.detach().numpy(), mha.out_proj.weight.detach().numpy()
    ours = init_multihead(D, np.random.default_rng(0))
    for theirs, mine in ((in_proj, np.concatenate([ours["W_q"], ours["W_k"], ours["W_v"]], axis=1)),
                         (out_proj, ours["W_o"])):
        bound = np.abs(mine).max()
        # Same distribution: both maxima sit within 2% of the common bound (4096+ uniform draws each).
        assert abs(np.abs(theirs).max() / bound - 1) < 0.02
        assert abs(theirs.std() / mine.std() - 1) < 0.05    # std of 4096+ draws is within a few %
    assert not mha.in_proj_bias.detach().numpy().any() and not mha.out_proj.bias.detach().numpy().any()


# ----------------------------------------------------------------------------------------------------
# Symmetries and masking


@given(shape=shapes(), seed=seeds)
@at_the_edges(seed=0)
def test_multihead_self_attention_is_permutation_equivariant(xp, shape, seed):
    B, T, _, D, H = shape
    rng, x, _, params = make_case(xp, seed, B, T, T, D)
    perm = xp.asarray(rng.permutation(T))
    out, cache = multihead_forward(x, x, params, H)
    out_p, cache_p = multihead_forward(x[:, perm], x[:, perm], params, H)
    # float64 matmuls summed in a different token order: rounding of ~1e-15 relative.
    np.testing.assert_allclose(to_numpy(out_p), to_numpy(out[:, perm]), rtol=1e-10, atol=1e-12)

    dout = random_like(out, rng)
    dx_q, dx_kv, grads = multihead_backward(dout, cache)
    dx = dx_q + dx_kv                     # self-attention: x feeds both places, so the gradients add
    dx_q_p, dx_kv_p, grads_p = multihead_backward(dout[:, perm], cache_p)
    dx_p = dx_q_p + dx_kv_p               # the same sum for the permuted run
    np.testing.assert_allclose(to_numpy(dx_p), to_numpy(dx[:, perm]), rtol=1e-10, atol=1e-12)  # rounding only
    for name in PARAM_NAMES:              # parameters see the same tokens in another order
        np.testing.assert_allclose(to_numpy(grads_p[name]), to_numpy(grads[name]), rtol=1e-10, atol=1e-12)


def test_rope_breaks_permutation_equivariance(xp):
    rng, x, _, params = make_case(xp, 0, 1, 5, 5, 8)
    perm = xp.asarray([1, 0, 3, 4, 2])
    out, _ = multihead_forward(x, x, params, 2, rope=True)
    out_p, _ = multihead_forward(x[:, perm], x[:, perm], params, 2, rope=True)
    assert float(abs(out_p - out[:, perm]).max()) > 1e-3      # positions now matter, far above rounding


def causal_decoding_case(xp, shape, seed, position, rope):
    """x (B, S, D) with x_q its last T tokens, and the same with token `position` changed.

    Query t sits at absolute position S - T + t (bottom-right alignment), which RoPE's default
    rope_offset = 0 (x_kv starts at position 0) also gives it.
    """
    B, T, S, D, H = shape
    T = min(T, S)
    rng, _, x, params = make_case(xp, seed, B, T, S, D)
    p = position % S
    x_changed = x.copy()
    x_changed[:, p] = xp.asarray(rng.standard_normal((B, D)))
    options = dict(causal=True, rope=rope)
    return rng, x, x_changed, params, H, T, S, p, options


@given(shape=shapes(even_head_width=True), seed=seeds, position=st.integers(0, 100), rope=st.booleans())
@at_the_edges(seed=0, position=1, rope=True)
def test_future_tokens_cannot_change_past_outputs(xp, shape, seed, position, rope):
    rng, x, x_changed, params, H, T, S, p, options = causal_decoding_case(xp, shape, seed, position, rope)
    out, _ = multihead_forward(x[:, S - T:], x, params, H, **options)
    out_changed, _ = multihead_forward(x_changed[:, S - T:], x_changed, params, H, **options)
    earlier = max(0, p - (S - T))                              # queries at absolute positions < p
    assert_same(out_changed[:, :earlier], out[:, :earlier])


@given(shape=shapes(even_head_width=True), seed=seeds, position=st.integers(0, 100), rope=st.booleans())
@at_the_edges(seed=0, position=3, rope=True)
def test_gradient_of_past_outputs_wrt_future_tokens_is_exactly_zero(xp, shape, seed, position, rope):
    rng, x, _, params, H, T, S, p, options = causal_decoding_case(xp, shape, seed, position, rope)
    out, cache = multihead_forward(x[:, S - T:], x, params, H, **options)
    dout = random_like(out, rng)
    earlier = max(0, p - (S - T))
    dout[:, earlier:] = 0                                      # only outputs before position p send gradient
    dx_q, dx_kv, _ = multihead_backward(dout, cache)
    dx = dx_kv.copy()
    dx[:, S - T:] += dx_q                 # x_q is a slice of x: the slice's gradient adds into x's
    assert not to_numpy(dx[:, p:]).any()


@given(shape=shapes(), seed=seeds)
@at_the_edges(seed=0)
def test_padding_mask_makes_masked_keys_irrelevant(xp, shape, seed):
    B, T, S, D, H = shape
    rng, x_q, x_kv, params = make_case(xp, seed, B, T, S, D)
    mask = padding_mask(xp, rng, B, S)                         # (B, 1, 1, S)
    x_kv_changed = xp.where(mask[:, 0, 0, :, None], x_kv, xp.asarray(rng.standard_normal(x_kv.shape)))
    out, cache = multihead_forward(x_q, x_kv, params, H, mask=mask)
    out_changed, _ = multihead_forward(x_q, x_kv_changed, params, H, mask=mask)
    assert_same(out_changed, out)
    _, dx_kv, _ = multihead_backward(random_like(out, rng), cache)
    assert not to_numpy(dx_kv[~mask[:, 0, 0, :]]).any()       # masked keys receive no gradient


def test_a_T_by_S_mask_is_shared_by_every_sequence_and_head(xp):
    rng, x_q, x_kv, params = make_case(xp, 1, 2, 3, 5, 6)
    out_mask, _ = multihead_forward(x_q, x_kv, params, 3, mask=causal_mask(3, 5, xp))
    out_causal, _ = multihead_forward(x_q, x_kv, params, 3, causal=True)
    assert_same(out_mask, out_causal)


# ----------------------------------------------------------------------------------------------------
# Gradients


def options_for(xp, variant, rng, B, T, S, H):
    """The forward's keyword options for one named variant."""
    return {
        "plain": {},
        "mask": {"mask": padding_mask(xp, rng, B, S)},
        "causal": {"causal": True},
        "rope": {"rope": True, "rope_offset": max(0, T - S) + 2},
        "alibi": {"bias": alibi_bias(H, T, S, dtype=np.float64, xp=xp)},
        "all": {"mask": padding_mask(xp, rng, B, S), "causal": True,
                "bias": alibi_bias(H, T, S, dtype=np.float64, xp=xp), "rope": True, "rope_offset": max(0, T - S)},
    }[variant]


VARIANTS = ["plain", "mask", "causal", "rope", "alibi", "all"]


def cross_attention_gradients(xp, seed, shape, variant):
    """rng, the scalar loss sum(out * dout) for a random dout, the inputs and backward's gradients."""
    B, T, S, D, H = shape
    rng, x_q, x_kv, params = make_case(xp, seed, B, T, S, D)
    options = options_for(xp, variant, rng, B, T, S, H)
    out, cache = multihead_forward(x_q, x_kv, params, H, **options)
    dout = random_like(out, rng)
    dx_q, dx_kv, grads = multihead_backward(dout, cache)

    def loss():
        return float((multihead_forward(x_q, x_kv, params, H, **options)[0] * dout).sum())

    return rng, loss, (x_q, x_kv, params), (dx_q, dx_kv, grads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cross_attention_gradients_match_finite_differences(xp, variant):
    _, loss, inputs, grads = cross_attention_gradients(xp, 3, (2, 3, 4, 4, 2), variant)
    check_gradients(loss, inputs, grads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_self_attention_gradient_is_dx_q_plus_dx_kv(xp, variant):
    B, T, D, H = 2, 4, 4, 2
    rng, x, _, params = make_case(xp, 4, B, T, T, D)
    options = options_for(xp, variant, rng, B, T, T, H)
    out, cache = multihead_forward(x, x, params, H, **options)
    dout = random_like(out, rng)
    dx_q, dx_kv, grads = multihead_backward(dout, cache)
    # x feeds both x_q and x_kv: one tensor in two places sums its gradients.
    dx = dx_q + dx_kv

    def loss():
        return float((multihead_forward(x, x, params, H, **options)[0] * dout).sum())

    check_gradients(loss, (x, params), (dx, grads))


@given(shape=shapes(even_head_width=True), seed=seeds, variant=st.sampled_from(VARIANTS))
@at_the_edges(seed=0, variant="all")
def test_gradients_along_a_random_direction_for_any_shape(xp, shape, seed, variant):
    rng, loss, inputs, grads = cross_attention_gradients(xp, seed, shape, variant)
    check_directional_derivative(loss, inputs, grads, rng)


# ----------------------------------------------------------------------------------------------------
# Positions inside multi-head attention


@given(shape=shapes(even_head_width=True, max_len=6), seed=seeds, positions=st.sampled_from(["rope", "alibi"]))
@at_the_edges(seed=0, positions="rope")
@at_the_edges(seed=1, positions="alibi")
def test_cached_decoding_equals_the_last_rows_of_full_causal_attention(xp, shape, seed, positions):
    B, T, S, D, H = shape
    T = min(T, S)
    rng, _, x, params = make_case(xp, seed, B, T, S, D)
    if positions == "rope":
        full_options = last_options = {"rope": True}          # x_kv starts at position 0 in both calls
    else:
        full_options = {"bias": alibi_bias(H, S, S, dtype=np.float64, xp=xp)}
        last_options = {"bias": alibi_bias(H, T, S, dtype=np.float64, xp=xp)}
    full, _ = multihead_forward(x, x, params, H, causal=True, **full_options)
    last, _ = multihead_forward(x[:, S - T:], x, params, H, causal=True, **last_options)
    # The same sums of the same products; RoPE's angles at shifted positions round differently (~1e-15).
    np.testing.assert_allclose(to_numpy(last), to_numpy(full[:, S - T:]), rtol=1e-10, atol=1e-12)


@given(shape=shapes(even_head_width=True), seed=seeds, shift=st.integers(1, 1000))
@at_the_edges(seed=0, shift=7)
def test_rope_offset_cancels_from_the_output(xp, shape, seed, shift):
    B, T, S, D, H = shape
    rng, x_q, x_kv, params = make_case(xp, seed, B, T, S, D)
    smallest = max(0, T - S)                                   # query 0 at position >= 0
    out, _ = multihead_forward(x_q, x_kv, params, H, rope=True, rope_offset=smallest)
    out_shifted, _ = multihead_forward(x_q, x_kv, params, H, rope=True, rope_offset=smallest + shift)
    # Angles up to 1000 rad carry float64 rounding of ~1e-13 into the rotated q and k.
    np.testing.assert_allclose(to_numpy(out_shifted), to_numpy(out), rtol=1e-9, atol=1e-10)


def rotate_by_position(x, positions, base=10000.0):
    """RoFormer's rotation written out from its formula: pair (x[2i], x[2i+1]) at position p turns by
    p * base^(-2i/Dh). x (B, H, L, Dh) and positions (L,) NumPy, float64."""
    Dh = x.shape[-1]
    theta = positions[:, None] * base ** (-2.0 * np.arange(Dh // 2) / Dh)   # (L, Dh/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(theta) - odd * np.sin(theta)
    out[..., 1::2] = even * np.sin(theta) + odd * np.cos(theta)
    return out


def reference_multihead(x_q, x_kv, params, H, causal=False, rope=False, rope_offset=0):
    """Multi-head attention written out head by head in NumPy, float64, from the paper's equations,
    with RoPE's positions bottom-right aligned: key j at rope_offset + j, query t at rope_offset + S - T + t."""
    x_q, x_kv = to_numpy(x_q), to_numpy(x_kv)
    p = {name: to_numpy(w) for name, w in params.items()}
    (B, T, D), S = x_q.shape, x_kv.shape[1]
    Dh = D // H
    heads = []
    for h in range(H):
        cols = slice(h * Dh, (h + 1) * Dh)                     # head h's block of columns
        q = (x_q @ p["W_q"][:, cols] + p["b_q"][cols])[:, None]    # (B, 1, T, Dh)
        k = (x_kv @ p["W_k"][:, cols] + p["b_k"][cols])[:, None]   # (B, 1, S, Dh)
        v = x_kv @ p["W_v"][:, cols] + p["b_v"][cols]              # (B, S, Dh)
        if rope:
            q = rotate_by_position(q, rope_offset + (S - T) + np.arange(T))
            k = rotate_by_position(k, rope_offset + np.arange(S))
        scores = (q[:, 0] @ k[:, 0].transpose(0, 2, 1)) / np.sqrt(Dh)   # (B, T, S)
        if causal:
            scores = np.where(np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T), scores, -np.inf)
        rows = np.isfinite(scores).any(axis=-1, keepdims=True)          # queries with an allowed key
        e = np.exp(scores - np.where(rows, scores.max(axis=-1, keepdims=True), 0))
        heads.append(e / np.where(rows, e.sum(axis=-1, keepdims=True), 1) @ v)
    return np.concatenate(heads, axis=-1) @ p["W_o"] + p["b_o"]     # (B, T, D)


@given(shape=shapes(even_head_width=True), seed=seeds, causal=st.booleans(), rope=st.booleans(),
       extra_offset=st.integers(0, 50))
@at_the_edges(seed=0, causal=True, rope=True, extra_offset=0)
@at_the_edges(seed=1, causal=False, rope=True, extra_offset=3)
def test_output_equals_the_equations_written_head_by_head(xp, shape, seed, causal, rope, extra_offset):
    # With RoPE this pins the alignment: the queries sit S - T after rope_offset, for T < S and T > S.
    B, T, S, D, H = shape
    _, x_q, x_kv, params = make_case(xp, seed, B, T, S, D)
    rope_offset = max(0, T - S) + extra_offset if rope else 0
    out, _ = multihead_forward(x_q, x_kv, params, H, causal=causal, rope=rope, rope_offset=rope_offset)
    expected = reference_multihead(x_q, x_kv, params, H, causal, rope, rope_offset)
    # float64, the same sums in another order; angles below ~60 rad round to ~1e-15
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# PyTorch cross-check


@pytest.mark.parametrize("case", ["self", "self-causal", "self-padding",
                                  "cross", "cross-causal", "cross-padding"])
def test_matches_torch_multihead_attention(case):
    torch = pytest.importorskip("torch")
    B, T, S, D, H = 2, 4, 6, 8, 2
    S = T if case.startswith("self") else S
    rng, x_q, x_kv, params = make_case(np, 5, B, T, S, D)
    if case.startswith("self"):
        x_kv = x_q
    mask = padding_mask(np, rng, B, S) if case.endswith("padding") else None
    causal = case.endswith("causal")
    out, cache = multihead_forward(x_q, x_kv, params, H, mask=mask, causal=causal)
    dout = rng.standard_normal(out.shape)
    dx_q, dx_kv, grads = multihead_backward(dout, cache)

    mha = torch.nn.MultiheadAttention(D, H, batch_first=True, bias=True, dtype=torch.float64)
    with torch.no_grad():                 # torch stores W^T and applies x @ W^T; its q, k, v rows are stacked
        mha.in_proj_weight.copy_(torch.from_numpy(np.concatenate([params["W_q"].T, params["W_k"].T,
                                                                  params["W_v"].T])))
        mha.in_proj_bias.copy_(torch.from_numpy(np.concatenate([params["b_q"], params["b_k"],
                                                                params["b_v"]])))
        mha.out_proj.weight.copy_(torch.from_numpy(params["W_o"].T))
        mha.out_proj.bias.copy_(torch.from_numpy(params["b_o"]))
    tq = torch.tensor(x_q, requires_grad=True)
    tkv = tq if case.startswith("self") else torch.tensor(x_kv, requires_grad=True)
    # torch's boolean masks mean True = may NOT attend, the opposite of ours.
    attn_mask = torch.from_numpy(~causal_mask(T, S)) if causal else None
    key_padding_mask = torch.from_numpy(~mask[:, 0, 0, :]) if mask is not None else None
    t_out, t_weights = mha(tq, tkv, tkv, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=True, average_attn_weights=False)
    t_out.backward(torch.from_numpy(dout))

    close = dict(rtol=1e-10, atol=1e-12)  # float64 on both sides; only summation order differs
    np.testing.assert_allclose(out, t_out.detach().numpy(), **close)
    np.testing.assert_allclose(cache["attn"]["weights"], t_weights.detach().numpy(), **close)
    if case.startswith("self"):
        dx = dx_q + dx_kv                 # torch sees one tensor in both places, so its grad is the sum
        np.testing.assert_allclose(dx, tq.grad.numpy(), **close)
    else:
        np.testing.assert_allclose(dx_q, tq.grad.numpy(), **close)
        np.testing.assert_allclose(dx_kv, tkv.grad.numpy(), **close)
    d_in_w, d_in_b = mha.in_proj_weight.grad.numpy(), mha.in_proj_bias.grad.numpy()
    for i, name in enumerate("qkv"):
        np.testing.assert_allclose(grads[f"W_{name}"], d_in_w[i * D:(i + 1) * D].T, **close)
        np.testing.assert_allclose(grads[f"b_{name}"], d_in_b[i * D:(i + 1) * D], **close)
    np.testing.assert_allclose(grads["W_o"], mha.out_proj.weight.grad.numpy().T, **close)
    np.testing.assert_allclose(grads["b_o"], mha.out_proj.bias.grad.numpy(), **close)


# ----------------------------------------------------------------------------------------------------
# dtype, purity, errors, demo


@pytest.mark.parametrize("bias_dtype", [np.float32, np.float64])
def test_float32_is_preserved_end_to_end(xp, bias_dtype):
    # A float64 bias table (ALiBi's default precision elsewhere) must not upcast float32 attention.
    B, T, S, D, H = 2, 3, 5, 8, 2
    rng, x_q, x_kv, params = make_case(xp, 6, B, T, S, D, dtype=np.float32)
    bias = alibi_bias(H, T, S, dtype=bias_dtype, xp=xp)
    out, cache = multihead_forward(x_q, x_kv, params, H, mask=padding_mask(xp, rng, B, S), causal=True,
                                   rope=True, bias=bias)
    assert out.dtype == np.float32 and out.shape == (B, T, D)
    assert cache["attn"]["weights"].dtype == np.float32 and cache["attn"]["weights"].shape == (B, H, T, S)
    dx_q, dx_kv, grads = multihead_backward(random_like(out, rng), cache)
    assert dx_q.dtype == np.float32 and dx_q.shape == x_q.shape
    assert dx_kv.dtype == np.float32 and dx_kv.shape == x_kv.shape
    assert list(grads) == list(PARAM_NAMES)
    for name in PARAM_NAMES:
        assert grads[name].dtype == np.float32 and grads[name].shape == params[name].shape


def test_inputs_and_params_are_never_modified(xp):
    B, T, S, D, H = 2, 3, 4, 4, 2
    rng, x_q, x_kv, params = make_case(xp, 7, B, T, S, D)
    mask = padding_mask(xp, rng, B, S)
    bias = alibi_bias(H, T, S, dtype=np.float64, xp=xp)
    arrays = {"x_q": x_q, "x_kv": x_kv, "mask": mask, "bias": bias, **params}
    before = {name: a.copy() for name, a in arrays.items()}
    out, cache = multihead_forward(x_q, x_kv, params, H, mask=mask, causal=True, rope=True, bias=bias)
    dout = random_like(out, rng)
    dout_before = dout.copy()
    multihead_backward(dout, cache)
    for name, a in arrays.items():
        assert_same(a, before[name])
    assert_same(dout, dout_before)


def with_param(params, name, value):
    return {**params, name: value}


def forward(**changes):
    """multihead_forward on good x_q (2, 3, 4), x_kv (2, 5, 4), params (D = 4), n_heads = 2, with some
    arguments replaced by change(x_q, x_kv, params)."""
    def call(x_q, x_kv, params):
        arguments = dict(x_q=x_q, x_kv=x_kv, params=params, n_heads=2)
        arguments.update({name: change(x_q, x_kv, params) for name, change in changes.items()})
        return multihead_forward(**arguments)
    return call


def backward(make_dout=None, make_cache=None):
    """multihead_backward after a good forward (out (2, 3, 4) float64), with dout or cache replaced."""
    def call(x_q, x_kv, params):
        out, cache = multihead_forward(x_q, x_kv, params, 2)
        return multihead_backward(np.ones_like(out) if make_dout is None else make_dout(out),
                                  cache if make_cache is None else make_cache(cache))
    return call


SIZE = r"must be an integer >= "
BAD_CALLS = {
    # x_q, x_kv
    "x_q rank 2": (forward(x_q=lambda q, kv, p: q[0]), ValueError,
                   r"x_q must have shape \(B, length, D\), got \(3, 4\)"),
    "x_kv rank 4": (forward(x_kv=lambda q, kv, p: kv[None]), ValueError,
                    r"x_kv must have shape \(B, length, D\), got \(1, 2, 5, 4\)"),
    "x_kv width": (forward(x_kv=lambda q, kv, p: kv[..., :2]), ValueError,
                   r"x_kv must have shape \(2, S, 4\) to match x_q \(2, 3, 4\), got \(2, 5, 2\)"),
    "x_kv batch": (forward(x_kv=lambda q, kv, p: kv[:1]), ValueError,
                   r"x_kv must have shape \(2, S, 4\) to match x_q \(2, 3, 4\), got \(1, 5, 4\)"),
    "integer x_q": (forward(x_q=lambda q, kv, p: q.astype(np.int64)), TypeError,
        r"x_q must be a floating-point array \(B, T, D\), got numpy array of dtype int64, shape \(2, 3, 4\)"),
    "integer x_kv": (forward(x_kv=lambda q, kv, p: kv.astype(np.int32)), TypeError,
                     r"x_kv must be a floating-point array \(B, S, D\), got .*int32"),
    "boolean x_q": (forward(x_q=lambda q, kv, p: q > 0), TypeError, r"x_q must be a floating-point array .*bool"),
    "x_q a list": (forward(x_q=lambda q, kv, p: q.tolist()), TypeError,
                   r"x_q must be a floating-point array \(B, T, D\), got list of length 2"),
    "x_kv None": (forward(x_kv=lambda q, kv, p: None), TypeError, r"x_kv must be a floating-point array .*got None"),
    "mixed dtypes": (forward(x_kv=lambda q, kv, p: kv.astype(np.float32)), TypeError,
                     r"x_kv must have dtype float64 \(x_q's\), got float32"),
    "D = 0": (forward(x_q=lambda q, kv, p: q[..., :0], x_kv=lambda q, kv, p: kv[..., :0]), ValueError,
              r"x_q must have a width D >= 1 \(shape \(B, T, D\)\), got \(2, 3, 0\)"),
    # n_heads
    "D not divisible by H": (forward(n_heads=lambda q, kv, p: 3), ValueError,
                             r"D = 4 .* must be divisible by n_heads = 3"),
    "n_heads zero": (forward(n_heads=lambda q, kv, p: 0), ValueError, r"n_heads " + SIZE + r"1, got 0"),
    "n_heads negative": (forward(n_heads=lambda q, kv, p: -2), ValueError, r"n_heads " + SIZE + r"1, got -2"),
    "n_heads 2.0": (forward(n_heads=lambda q, kv, p: 2.0), ValueError, r"n_heads " + SIZE + r"1, got 2\.0"),
    "n_heads True": (forward(n_heads=lambda q, kv, p: True), ValueError, r"n_heads " + SIZE + r"1, got True"),
    "n_heads None": (forward(n_heads=lambda q, kv, p: None), ValueError, r"n_heads " + SIZE + r"1, got None"),
    # params
    "params a list": (forward(params=lambda q, kv, p: list(p.values())), TypeError,
                      r"params must be a dict with keys \['W_q', .*\] \(see init_multihead\), got list of length 8"),
    "params None": (forward(params=lambda q, kv, p: None), TypeError, r"params must be a dict .*got None"),
    "missing param": (forward(params=lambda q, kv, p: {n: w for n, w in p.items() if n != "W_v"}), ValueError,
                      r"params is missing \['W_v'\]"),
    "W_q shape": (forward(params=lambda q, kv, p: with_param(p, "W_q", p["W_q"][:, :3])), ValueError,
                  r"params\['W_q'\] must have shape \(4, 4\) for D = 4, got \(4, 3\)"),
    "W_k transposed-looking (D, 2D)": (forward(params=lambda q, kv, p: with_param(p, "W_k", np.zeros((4, 8)))),
                                       ValueError, r"params\['W_k'\] must have shape \(4, 4\) for D = 4, got \(4, 8\)"),
    "b_o shape": (forward(params=lambda q, kv, p: with_param(p, "b_o", p["b_o"][None])), ValueError,
                  r"params\['b_o'\] must have shape \(4,\) for D = 4, got \(1, 4\)"),
    "W_o a list": (forward(params=lambda q, kv, p: with_param(p, "W_o", p["W_o"].tolist())), TypeError,
                   r"params\['W_o'\] must be a floating-point array \(4, 4\), got list of length 4"),
    "b_q None": (forward(params=lambda q, kv, p: with_param(p, "b_q", None)), TypeError,
                 r"params\['b_q'\] must be a floating-point array \(4,\), got None"),
    "integer W_v": (forward(params=lambda q, kv, p: with_param(p, "W_v", p["W_v"].astype(np.int64))), TypeError,
                    r"params\['W_v'\] must be a floating-point array \(4, 4\), got .*int64"),
    "float32 params": (forward(params=lambda q, kv, p: with_param(p, "W_o", p["W_o"].astype(np.float32))), TypeError,
                       r"params\['W_o'\] must have dtype float64 \(x_q's\), got float32"),
    # rope
    "odd head width with RoPE": (forward(n_heads=lambda q, kv, p: 4, rope=lambda q, kv, p: True), ValueError,
                                 r"rope=True needs an even head width Dh = D / n_heads, got 4 / 4 = 1"),
    "RoPE position below 0": (forward(x_q=lambda q, kv, p: kv, x_kv=lambda q, kv, p: q, rope=lambda q, kv, p: True),
        ValueError, r"rope_offset must be an integer >= max\(0, T - S\) = 2 .* got 0 with T = 5, S = 3"),
    "rope_offset negative": (forward(rope=lambda q, kv, p: True, rope_offset=lambda q, kv, p: -1), ValueError,
                             r"rope_offset " + SIZE + r"0, got -1"),
    "rope_offset 1.5": (forward(rope=lambda q, kv, p: True, rope_offset=lambda q, kv, p: 1.5), ValueError,
                        r"rope_offset " + SIZE + r"0, got 1\.5"),
    "rope_offset without rope": (forward(rope_offset=lambda q, kv, p: 5), ValueError,
                                 r"rope_offset must be 0 without rope=True .*got 5"),
    "rope an array": (forward(rope=lambda q, kv, p: np.ones(3, bool)), TypeError,
                      r"rope must be True or False, got numpy array"),
    "rope 1": (forward(rope=lambda q, kv, p: 1), TypeError, r"rope must be True or False, got 1"),
    "rope 'yes'": (forward(rope=lambda q, kv, p: "yes"), TypeError, r"rope must be True or False, got 'yes'"),
    # mask, bias, causal (checked by attention_forward against the heads' (B, H, T, S))
    "mask shape": (forward(mask=lambda q, kv, p: np.ones((3, 4), bool)), ValueError,
                   r"mask must broadcast to \(\.\.\., T, S\) = \(2, 2, 3, 5\), got \(3, 4\)"),
    "mask with more leading axes than the heads": (
        forward(mask=lambda q, kv, p: np.ones((3, 2, 2, 3, 5), bool)), ValueError,
        r"mask must broadcast to \(\.\.\., T, S\) = \(2, 2, 3, 5\), got \(3, 2, 2, 3, 5\)"),
    "mask (B, T, S) with B != H": (forward(n_heads=lambda q, kv, p: 4, mask=lambda q, kv, p: np.ones((2, 3, 5), bool)),
        ValueError, r"mask must broadcast to \(\.\.\., T, S\) = \(2, 4, 3, 5\), got \(2, 3, 5\)"),
    "mask float": (forward(mask=lambda q, kv, p: np.ones((3, 5))), TypeError,
                   r"mask must be boolean .*got dtype float64"),
    "mask a list": (forward(mask=lambda q, kv, p: [[True] * 5] * 3), TypeError,
                    r"mask must be a boolean .*got list of length 3"),
    "bias with more leading axes": (forward(bias=lambda q, kv, p: np.zeros((7, 2, 2, 3, 5))), ValueError,
                                    r"bias must broadcast to \(\.\.\., T, S\) = \(2, 2, 3, 5\), got \(7, 2, 2, 3, 5\)"),
    "bias of the wrong heads": (forward(bias=lambda q, kv, p: np.zeros((3, 3, 5))), ValueError,
                                r"bias must broadcast to \(\.\.\., T, S\) = \(2, 2, 3, 5\), got \(3, 3, 5\)"),
    "bias integer": (forward(bias=lambda q, kv, p: np.zeros((2, 3, 5), np.int64)), TypeError,
                     r"bias must be floating-point, got dtype int64"),
    "causal an array": (forward(causal=lambda q, kv, p: np.ones((3, 5), bool)), TypeError,
                        r"causal must be True or False, got numpy array"),
    "causal None": (forward(causal=lambda q, kv, p: None), TypeError, r"causal must be True or False, got None"),
    # backward
    "dout shape": (backward(lambda out: np.zeros((2, 3, 5))), ValueError,
                   r"dout must have shape \(2, 3, 4\) \(the forward output's\), got \(2, 3, 5\)"),
    "dout with an extra axis": (backward(lambda out: out[None]), ValueError,
                                r"dout must have shape \(2, 3, 4\) .*got \(1, 2, 3, 4\)"),
    "dout broadcastable (1, 3, 4)": (backward(lambda out: out[:1]), ValueError,
                                     r"dout must have shape \(2, 3, 4\) .*got \(1, 3, 4\)"),
    "dout float32": (backward(lambda out: out.astype(np.float32)), TypeError,
                     r"dout must have dtype float64 \(the forward's\), got float32"),
    "dout a list": (backward(lambda out: out.tolist()), TypeError,
                    r"dout must be an array of dtype float64, got list of length 2"),
    "dout None": (backward(lambda out: None), TypeError, r"dout must be an array of dtype float64, got None"),
    "cache a tuple": (backward(make_cache=lambda c: tuple(c.values())), TypeError,
                      r"cache must be the dict multihead_forward returned, got tuple of length 8"),
    "cache of attention_forward": (backward(make_cache=lambda c: c["attn"]), TypeError,
                                   r"cache must be the dict multihead_forward returned, got dict of length 5"),
    # init_multihead
    "init D 0": (lambda q, kv, p: init_multihead(0, np.random.default_rng(0)), ValueError, r"D " + SIZE + r"1, got 0"),
    "init D True": (lambda q, kv, p: init_multihead(True, np.random.default_rng(0)), ValueError,
                    r"D " + SIZE + r"1, got True"),
    "init D 8.0": (lambda q, kv, p: init_multihead(8.0, np.random.default_rng(0)), ValueError,
                   r"D " + SIZE + r"1, got 8\.0"),
    "init integer dtype": (lambda q, kv, p: init_multihead(8, np.random.default_rng(0), dtype=np.int32), TypeError,
                           r"dtype must be a floating-point dtype such as numpy\.float32, got int32"),   # would round every weight to 0
    "init dtype None": (lambda q, kv, p: init_multihead(8, np.random.default_rng(0), dtype=None), TypeError,
                        r"dtype must be a floating-point dtype such as numpy\.float32, got None"),
    "init rng a seed": (lambda q, kv, p: init_multihead(8, 0), TypeError,
                        r"rng must be a numpy\.random\.Generator \(numpy\.random\.default_rng\(seed\)\), got 0"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_an_error_naming_the_argument_what_it_got_and_what_it_needs(name):
    call, error, message = BAD_CALLS[name]
    _, x_q, x_kv, params = make_case(np, 8, 2, 3, 5, 4)
    with pytest.raises(error, match=message):
        call(x_q, x_kv, params)


@pytest.mark.parametrize("mask_shape", [(5,), (3, 5), (2, 1, 1, 5), (2, 2, 3, 5), (1, 1, 3, 5), (2, 3, 5), (1, 3, 5),
                                        (2, 2, 1, 5), ()])
def test_every_mask_the_forward_accepts_gives_an_output_its_backward_accepts(xp, mask_shape):
    # B = H = 2: a (2, 3, 5) mask broadcasts as (H, T, S), one mask per head, shared by the batch.
    _, x_q, x_kv, params = make_case(xp, 9, 2, 3, 5, 4)
    mask = xp.asarray(np.random.default_rng(0).random(mask_shape) < 0.7)
    out, cache = multihead_forward(x_q, x_kv, params, 2, mask=mask)
    assert out.shape == x_q.shape
    dx_q, dx_kv, grads = multihead_backward(xp.ones_like(out), cache)
    assert dx_q.shape == x_q.shape and dx_kv.shape == x_kv.shape


@pytest.mark.parametrize("B, T, S", [(0, 3, 5), (2, 0, 5), (2, 3, 0), (2, 0, 0)])
@pytest.mark.parametrize("variant", ["plain", "mask", "causal", "rope"])
def test_empty_batches_and_sequences_run_forward_and_backward(xp, B, T, S, variant):
    # No sequence, no query or no key: shapes follow, every number is finite (S = 0 gives zeros).
    rng, x_q, x_kv, params = make_case(xp, 11, B, T, S, 4)
    options = {"plain": {}, "mask": {"mask": xp.ones((T, S), dtype=bool)}, "causal": {"causal": True},
               "rope": {"rope": True, "rope_offset": max(0, T - S)}}[variant]
    out, cache = multihead_forward(x_q, x_kv, params, 2, **options)
    dx_q, dx_kv, grads = multihead_backward(random_like(out, rng), cache)
    assert out.shape == x_q.shape and dx_q.shape == x_q.shape and dx_kv.shape == x_kv.shape
    for array in (out, dx_q, dx_kv, *grads.values()):
        assert np.isfinite(to_numpy(array)).all()


def test_cache_is_a_dict_with_the_fields_the_docstring_names(xp):
    _, x_q, x_kv, params = make_case(xp, 10, 2, 3, 5, 4)
    _, cache = multihead_forward(x_q, x_kv, params, 2)
    assert set(cache) == {"q", "k", "v", "o", "n_heads", "attn", "rope_q", "rope_k"}
    assert cache["rope_q"] is None and cache["rope_k"] is None and cache["o"]["x"].shape == (2, 3, 4)
    assert cache["q"]["x"] is x_q and cache["k"]["x"] is x_kv and cache["v"]["W"] is params["W_v"]
    _, cache = multihead_forward(x_q, x_kv, params, 2, rope=True)
    assert cache["rope_q"]["x_shape"] == (2, 2, 3, 2) and cache["rope_k"]["x_shape"] == (2, 2, 5, 2)
    assert cache["attn"]["weights"].shape == (2, 2, 3, 5)


@pytest.mark.parametrize("x_shape", [(7,), (3, 7), (2, 3, 7), (2, 0, 7)])
def test_linear_layer_gradients_match_finite_differences(xp, x_shape):
    rng = np.random.default_rng(0)
    x, W, b = (xp.asarray(rng.standard_normal(shape)) for shape in (x_shape, (7, 5), (5,)))
    y, cache = linear_forward(x, W, b)
    # The one 2-D product over all rows is the same map as the batched one, row for row.
    np.testing.assert_allclose(to_numpy(y), to_numpy(x) @ to_numpy(W) + to_numpy(b), rtol=1e-13, atol=1e-13)
    dy = random_like(y, rng)                                   # random: all ones would hide a transposed dW
    dx, dW, db = linear_backward(dy, cache)
    assert dx.shape == x.shape and dW.shape == W.shape and db.shape == b.shape
    check_gradients(lambda: float((linear_forward(x, W, b)[0] * dy).sum()), [x, W, b], [dx, dW, db])


def test_linear_layer_keeps_float32_and_refuses_bad_input():
    x, W, b = np.ones((2, 3, 4), np.float32), np.ones((4, 5), np.float32), np.ones(5, np.float32)
    y, cache = linear_forward(x, W, b)
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in linear_backward(y, cache))
    with pytest.raises(ValueError, match=r"W must have shape \(4, N\) to multiply x \(2, 3, 4\), got \(5, 4\)"):
        linear_forward(x, W.T, b)
    with pytest.raises(ValueError, match=r"b must have shape \(5,\) to match W \(4, 5\), got \(4,\)"):
        linear_forward(x, W, b[:4])
    with pytest.raises(TypeError, match="W must have dtype float32"):
        linear_forward(x, W.astype(np.float64), b)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 5\)"):
        linear_backward(y[:, :2], cache)
    with pytest.raises(TypeError, match="cache must be the dict linear_forward returned"):
        linear_backward(y, {"x": x})


def test_demo_runs_and_its_asserts_hold():
    assert "dx_q + dx_kv is the gradient of self-attention" in run_demo("multihead.py").stdout


@given(data=st.data(), seed=seeds, wrong=st.sampled_from(["nothing", "x_q", "x_kv", "params", "mask", "bias"]),
       n_heads=st.sampled_from([2, 2, 2, 2, 1, 4, 3, 0, 2.0, None]),
       rope=st.sampled_from([False, True] * 3 + [None, 1]), rope_offset=st.sampled_from([0] * 6 + [2, -1, 2.5]),
       causal=st.sampled_from([False, True] * 3 + [None]), use_mask=st.booleans(), use_bias=st.booleans())
def test_any_input_gives_a_clear_error_or_a_result_its_backward_accepts(data, seed, wrong, n_heads, rope, rope_offset,
                                                                       causal, use_mask, use_bias):
    B, T, S, D = 2, data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3)), 4
    _, x_q, x_kv, params = make_case(np, seed, B, T, S, D)
    mask = np.ones((B, 1, 1, S), dtype=bool) if use_mask or wrong == "mask" else None
    bias = np.zeros((2, T, S)) if use_bias or wrong == "bias" else None
    if wrong in ("x_q", "x_kv", "mask", "bias"):          # one argument spoiled, the others as they should be
        x_q, x_kv, mask, bias = (data.draw(spoiled(a)) if name == wrong else a
                                 for name, a in (("x_q", x_q), ("x_kv", x_kv), ("mask", mask), ("bias", bias)))
    elif wrong == "params":
        name = data.draw(st.sampled_from(PARAM_NAMES))
        params = {**params, name: data.draw(spoiled(params[name]))}
    try:
        out, cache = multihead_forward(x_q, x_kv, params, n_heads, mask=mask, causal=causal, rope=rope,
                                       rope_offset=rope_offset, bias=bias)
    except (ValueError, TypeError) as error:   # the message starts with the argument's name
        assert str(error).split()[0].split("[")[0] in {"x_q", "x_kv", "params", "n_heads", "D", "rope", "rope=True",
                                                       "rope_offset", "mask", "causal", "bias"}, error
        return
    assert out.shape == x_q.shape and out.dtype == x_q.dtype
    dx_q, dx_kv, grads = multihead_backward(np.ones_like(out), cache)
    assert dx_q.shape == x_q.shape and dx_kv.shape == x_kv.shape
    assert all(grads[n].shape == params[n].shape for n in PARAM_NAMES)

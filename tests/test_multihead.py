"""Tests for multihead.py: the properties multi-head attention must have, each proved on its own.

Hypothesis draws shapes (B, T, S, H, Dh) and seeds; tests taking `xp` run on NumPy and, with a GPU, CuPy.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

from attention import causal_mask
from gradcheck import check_directional_derivative, check_gradients, random_like
from multihead import PARAM_NAMES, init_multihead, multihead_backward, multihead_forward
from positional import alibi_bias

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def to_numpy(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


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


def test_init_rejects_a_bad_width_or_dtype():
    with pytest.raises(ValueError, match=r"D must be a positive integer, got 0"):
        init_multihead(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"D must be a positive integer, got True"):
        init_multihead(True, np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"dtype must be a floating-point dtype, got int32"):
        init_multihead(8, np.random.default_rng(0), dtype=np.int32)   # would round every weight to 0


# ----------------------------------------------------------------------------------------------------
# Symmetries and masking


@given(shapes(), seeds)
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


@given(shapes(even_head_width=True), seeds, st.integers(0, 100), st.booleans())
def test_future_tokens_cannot_change_past_outputs(xp, shape, seed, position, rope):
    rng, x, x_changed, params, H, T, S, p, options = causal_decoding_case(xp, shape, seed, position, rope)
    out, _ = multihead_forward(x[:, S - T:], x, params, H, **options)
    out_changed, _ = multihead_forward(x_changed[:, S - T:], x_changed, params, H, **options)
    earlier = max(0, p - (S - T))                              # queries at absolute positions < p
    assert_same(out_changed[:, :earlier], out[:, :earlier])


@given(shapes(even_head_width=True), seeds, st.integers(0, 100), st.booleans())
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


@given(shapes(), seeds)
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


@given(shapes(even_head_width=True), seeds, st.sampled_from(VARIANTS))
def test_gradients_along_a_random_direction_for_any_shape(xp, shape, seed, variant):
    rng, loss, inputs, grads = cross_attention_gradients(xp, seed, shape, variant)
    check_directional_derivative(loss, inputs, grads, rng)


# ----------------------------------------------------------------------------------------------------
# Positions inside multi-head attention


@given(shapes(even_head_width=True, max_len=6), seeds, st.sampled_from(["rope", "alibi"]))
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


@given(shapes(even_head_width=True), seeds, st.integers(1, 1000))
def test_rope_offset_cancels_from_the_output(xp, shape, seed, shift):
    B, T, S, D, H = shape
    rng, x_q, x_kv, params = make_case(xp, seed, B, T, S, D)
    smallest = max(0, T - S)                                   # query 0 at position >= 0
    out, _ = multihead_forward(x_q, x_kv, params, H, rope=True, rope_offset=smallest)
    out_shifted, _ = multihead_forward(x_q, x_kv, params, H, rope=True, rope_offset=smallest + shift)
    # Angles up to 1000 rad carry float64 rounding of ~1e-13 into the rotated q and k.
    np.testing.assert_allclose(to_numpy(out_shifted), to_numpy(out), rtol=1e-9, atol=1e-10)


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


def bad_calls():
    """(description, function of a good (x_q, x_kv, params), exception, what the message must say)."""
    def with_param(params, name, value):
        return {**params, name: value}

    return [
        ("D not divisible by H", lambda q, kv, p: multihead_forward(q, kv, p, 3),
         ValueError, r"D = 4 .* must be divisible by n_heads = 3"),
        ("n_heads zero", lambda q, kv, p: multihead_forward(q, kv, p, 0),
         ValueError, r"n_heads must be a positive integer, got 0"),
        ("x_q rank 2", lambda q, kv, p: multihead_forward(q[0], kv, p, 2),
         ValueError, r"x_q must have shape \(B, length, D\), got \(3, 4\)"),
        ("x_kv rank 4", lambda q, kv, p: multihead_forward(q, kv[None], p, 2),
         ValueError, r"x_kv must have shape \(B, length, D\), got \(1, 2, 5, 4\)"),
        ("x_kv width", lambda q, kv, p: multihead_forward(q, kv[..., :2], p, 2),
         ValueError, r"x_kv must have shape \(2, S, 4\) to match x_q \(2, 3, 4\), got \(2, 5, 2\)"),
        ("x_kv batch", lambda q, kv, p: multihead_forward(q, kv[:1], p, 2),
         ValueError, r"x_kv must have shape \(2, S, 4\) to match x_q \(2, 3, 4\), got \(1, 5, 4\)"),
        ("W_q shape", lambda q, kv, p: multihead_forward(q, kv, with_param(p, "W_q", p["W_q"][:, :3]), 2),
         ValueError, r"params\['W_q'\] must have shape \(4, 4\) for D = 4, got \(4, 3\)"),
        ("b_o shape", lambda q, kv, p: multihead_forward(q, kv, with_param(p, "b_o", p["b_o"][None]), 2),
         ValueError, r"params\['b_o'\] must have shape \(4,\) for D = 4, got \(1, 4\)"),
        ("missing param",
         lambda q, kv, p: multihead_forward(q, kv, {n: w for n, w in p.items() if n != "W_v"}, 2),
         ValueError, r"params is missing \['W_v'\]"),
        ("integer x_q", lambda q, kv, p: multihead_forward(q.astype(np.int64), kv, p, 2),
         TypeError, r"x_q must be a floating-point array, got int64"),
        ("integer x_kv", lambda q, kv, p: multihead_forward(q, kv.astype(np.int32), p, 2),
         TypeError, r"x_kv must be a floating-point array, got int32"),
        ("mixed dtypes", lambda q, kv, p: multihead_forward(q, kv.astype(np.float32), p, 2),
         TypeError, r"x_kv must have dtype float64 like x_q, got float32"),
        ("float32 params",
         lambda q, kv, p: multihead_forward(q, kv, with_param(p, "W_o", p["W_o"].astype(np.float32)), 2),
         TypeError, r"params\['W_o'\] must have dtype float64 like x_q, got float32"),
        ("odd head width with RoPE", lambda q, kv, p: multihead_forward(q, kv, p, 4, rope=True),
         ValueError, r"rope=True needs an even head width Dh = D / n_heads, got 4 / 4 = 1"),
        ("RoPE position below 0", lambda q, kv, p: multihead_forward(kv, q, p, 2, rope=True),
         ValueError, r"rope_offset must be an integer >= max\(0, T - S\) = 2 .* got 0 with T = 5, S = 3"),
        ("mask shape", lambda q, kv, p: multihead_forward(q, kv, p, 2, mask=np.ones((3, 4), bool)),
         ValueError, r"mask must broadcast to .*\(2, 2, 3, 5\), got \(3, 4\)"),
        ("dout shape",
         lambda q, kv, p: multihead_backward(np.zeros((2, 3, 5)), multihead_forward(q, kv, p, 2)[1]),
         ValueError, r"dout must have the output's shape \(2, 3, 4\), got \(2, 3, 5\)"),
    ]


@pytest.mark.parametrize("description, call, error, message", bad_calls(), ids=[c[0] for c in bad_calls()])
def test_bad_input_raises_an_error_naming_the_argument(description, call, error, message):
    _, x_q, x_kv, params = make_case(np, 8, 2, 3, 5, 4)
    with pytest.raises(error, match=message):
        call(x_q, x_kv, params)


def test_demo_runs_and_its_asserts_hold():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "multihead.py")], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "dx_q + dx_kv is the gradient of self-attention" in result.stdout

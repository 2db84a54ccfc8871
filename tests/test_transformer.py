"""Tests for transformer.py: every backward against finite differences, the properties a transformer must
have (permutation equivariance without positions, no information from the future, padding changes nothing,
cached generation equals recomputation), the activations, dtypes, the CuPy path and bad input.

The PyTorch cross-checks live in test_transformer_torch.py; every claim here holds without torch.
"""
import math

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

import transformer as tf
from gradcheck import check_directional_derivative, check_gradients
from helpers import ROOT, random_array, run_demo, to_numpy
from training import adam_init, adam_step, tree_leaves, tree_map

EPS64 = np.finfo(np.float64).eps


def make_model(kind, positions, seed=0, norm_first=True, tied=False, pad_id=None, xp=np, dtype=np.float64,
               activation="gelu", B=2, T=5, S=6, V=11, D=8, H=2, n_layers=2):
    """config, params (on xp), tokens (B, T) and src (B, S) (None unless encoder-decoder). Ids avoid 0 (pad)."""
    rng = np.random.default_rng(seed)
    config = {"kind": kind, "V": V, "D": D, "n_heads": H, "F": 12, "n_layers": n_layers, "max_len": 12,
              "positions": positions, "norm_first": norm_first, "activation": activation, "tied": tied,
              "pad_id": pad_id}
    params = tf.init_transformer(config, rng, dtype)
    params = tree_map(lambda p: xp.asarray(p + 0.1 * rng.standard_normal(p.shape).astype(dtype)), params)
    tokens = xp.asarray(rng.integers(1, V, (B, T)))
    src = xp.asarray(rng.integers(1, V, (B, S))) if kind == "encoder-decoder" else None
    return config, params, tokens, src


def on(xp, ids):
    """ids moved to the array module xp (None stays None)."""
    return None if ids is None else xp.asarray(ids)


def logits_of(params, config, tokens, src=None):
    return tf.transformer_forward(tokens, params, config, src)[0]


# ----------------------------------------------------------------------------------------------------
# The activations (erf itself: test_erf.py)


def test_gelu_is_x_times_the_normal_cdf_and_tanh_is_gpt2s_formula():
    x = np.linspace(-10, 10, 4001)
    exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(tf.activation_forward(x, "gelu")[0], exact, rtol=1e-14, atol=4 * EPS64)
    approx = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    # x**3 against x*x*x and tanh's own rounding: a few ulp of the output, or of 1 where it crosses zero.
    np.testing.assert_allclose(tf.activation_forward(x, "gelu_tanh")[0], approx, rtol=1e-14, atol=4 * EPS64)
    gap = np.abs(tf.activation_forward(x, "gelu")[0] - tf.activation_forward(x, "gelu_tanh")[0])
    # The two GELUs differ by up to ~4.7e-4 (near |x| = 2.7): a 1e-4 comparison tells which one is used.
    assert 4e-4 < gap.max() < 5e-4


def test_gelu_backward_at_three_is_phi_plus_x_times_density():
    # A published NumPy ViT shipped a GELU backward of -16 at x = 3; the true value is about 1.0119.
    x = np.array([3.0, -3.0, 0.0])
    _, cache = tf.activation_forward(x, "gelu")
    phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))
    density = lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
    expected = [phi(v) + v * density(v) for v in x]
    np.testing.assert_allclose(tf.activation_backward(np.ones(3), cache), expected, rtol=1e-14)
    assert abs(expected[0] - 1.0119) < 1e-4


@pytest.mark.parametrize("kind", tf.ACTIVATIONS)
def test_activation_gradients_match_finite_differences(xp, kind):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7)) * 3
    x[np.abs(x) < 1e-3] = 0.5                                  # ReLU's kink: keep finite differences away
    x, dout = xp.asarray(x), random_array(rng, x.shape, np.float64, xp)
    dx = tf.activation_backward(dout, tf.activation_forward(x, kind)[1])
    check_gradients(lambda: float((tf.activation_forward(x, kind)[0] * dout).sum()), [x], [dx])


# ----------------------------------------------------------------------------------------------------
# Layer norm, dropout, feed-forward


def test_layer_norm_gradients_match_finite_differences_with_a_random_upstream_gradient(xp):
    rng = np.random.default_rng(0)
    x, gamma, beta = (random_array(rng, shape, np.float64, xp) for shape in ((2, 3, 6), (6,), (6,)))
    dout = random_array(rng, x.shape, np.float64, xp)          # all ones would cancel the sum(dy * xhat) term
    out, cache = tf.layer_norm_forward(x, gamma, beta)
    grads = tf.layer_norm_backward(dout, cache)
    check_gradients(lambda: float((tf.layer_norm_forward(x, gamma, beta)[0] * dout).sum()), [x, gamma, beta],
                    list(grads))


def test_layer_norm_normalises_each_row_and_survives_a_large_mean_in_float32():
    rng = np.random.default_rng(0)
    D = 64
    x = (2000 + rng.standard_normal((4, D))).astype(np.float32)   # |mean| >> std
    out, _ = tf.layer_norm_forward(x, np.ones(D, np.float32), np.zeros(D, np.float32))
    assert out.dtype == np.float32
    x64 = x.astype(np.float64)
    truth = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    # Two-pass statistics: the error is float32 rounding of values near 2000 (eps32 * 2000 * log2(D) / std),
    # about 1e-3. E[x^2] - E[x]^2 would lose eps32 * 2000^2 = 0.5 of a unit variance instead.
    bound = 8 * np.finfo(np.float32).eps * 2002 * math.log2(D)
    assert np.abs(out - truth).max() < bound


def test_dropout_is_seeded_inverted_and_its_backward_uses_the_same_mask():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 100))
    out, cache = tf.dropout_forward(x, 0.25, np.random.default_rng(7))
    again, _ = tf.dropout_forward(x, 0.25, np.random.default_rng(7))
    np.testing.assert_array_equal(out, again)                  # the seed fixes the mask
    kept = cache["keep"]
    assert abs(kept.mean() - 0.75) < 5 * math.sqrt(0.75 * 0.25 / kept.size)   # 5 sigma of a binomial
    np.testing.assert_allclose(out[kept], x[kept] / 0.75)
    assert np.all(out[~kept] == 0)
    dout = rng.standard_normal(x.shape)
    np.testing.assert_allclose(tf.dropout_backward(dout, cache), dout * kept / 0.75)
    assert tf.dropout_forward(x, 0.0)[0] is x                  # p = 0: the identity, no rng needed
    with pytest.raises(ValueError, match="dropout p = 0.5 needs rng"):
        tf.dropout_forward(x, 0.5)                             # never a silent no-op


@pytest.mark.parametrize("activation", tf.ACTIVATIONS)
def test_feed_forward_gradients_match_finite_differences(xp, activation):
    rng = np.random.default_rng(1)
    x = random_array(rng, (2, 3, 4), np.float64, xp)
    params = tree_map(xp.asarray, tf.init_feed_forward(4, 6, rng, np.float64))
    dout = random_array(rng, x.shape, np.float64, xp)
    dx, grads = tf.feed_forward_backward(dout, tf.feed_forward_forward(x, params, activation)[1])
    check_gradients(lambda: float((tf.feed_forward_forward(x, params, activation)[0] * dout).sum()),
                    [x, params], [dx, grads])


def test_feed_forward_with_dropout_gradients_match_finite_differences():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4))
    params = tf.init_feed_forward(4, 6, rng, np.float64)
    dout = rng.standard_normal(x.shape)
    forward = lambda: tf.feed_forward_forward(x, params, "gelu", 0.5, np.random.default_rng(3))  # same mask
    dx, grads = tf.feed_forward_backward(dout, forward()[1])
    check_gradients(lambda: float((forward()[0] * dout).sum()), [x, params], [dx, grads])


# ----------------------------------------------------------------------------------------------------
# Encoder and decoder layers


LAYER_OPTIONS = [
    dict(norm_first=True), dict(norm_first=False), dict(norm_first=True, activation="relu"),
    dict(norm_first=False, activation="gelu_tanh"), dict(causal=True, rope=True), dict(norm_first=False, alibi=True),
    dict(mask=True), dict(norm_first=True, dropout=0.3),
]


def layer_kwargs(options, rng, B, T, H, xp=np):
    kwargs = {k: v for k, v in options.items() if k not in ("alibi", "mask")}
    if options.get("alibi"):
        from positional import alibi_bias
        kwargs["bias"] = alibi_bias(H, T, T, dtype=np.float64, xp=xp)
    if options.get("mask"):
        keep = np.ones((B, 1, 1, T), bool)
        keep[0, ..., -2:] = False                              # the first sequence's last two tokens are padding
        kwargs["mask"] = xp.asarray(keep)
    if "dropout" in kwargs:
        kwargs["rng_seed"] = 5
    return kwargs


@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_encoder_layer_gradients_match_finite_differences(xp, options):
    if "dropout" in options and xp is not np:
        pytest.skip("dropout draws its mask from a Generator of the data's array module; the stand-in has none")
    rng = np.random.default_rng(0)
    B, T, D, H = 2, 4, 4, 2
    x = random_array(rng, (B, T, D), np.float64, xp)
    params = tree_map(lambda p: xp.asarray(p + 0.1 * rng.standard_normal(p.shape)),
                      tf.init_encoder_layer(D, 6, rng, np.float64))
    kwargs = layer_kwargs(options, rng, B, T, H, xp)
    seed = kwargs.pop("rng_seed", None)
    forward = lambda: tf.encoder_layer_forward(x, params, H, **kwargs,
                                               rng=None if seed is None else np.random.default_rng(seed))
    dout = random_array(rng, x.shape, np.float64, xp)
    dx, grads = tf.encoder_layer_backward(dout, forward()[1])
    check_gradients(lambda: float((forward()[0] * dout).sum()), [x, params], [dx, grads])


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("with_masks", [False, True])
def test_decoder_layer_gradients_match_finite_differences(xp, norm_first, with_masks):
    rng = np.random.default_rng(1)
    B, T, S, D, H = 2, 3, 4, 4, 2
    y, memory = random_array(rng, (B, T, D), np.float64, xp), random_array(rng, (B, S, D), np.float64, xp)
    params = tree_map(lambda p: xp.asarray(p + 0.1 * rng.standard_normal(p.shape)),
                      tf.init_decoder_layer(D, 6, rng, np.float64))
    kwargs = {"norm_first": norm_first}
    if with_masks:
        memory_keep = np.ones((B, 1, 1, S), bool)
        memory_keep[1, ..., -1] = False                        # source padding
        kwargs.update(memory_mask=xp.asarray(memory_keep), tgt_mask=xp.ones((B, 1, 1, T), bool), rope=True)
    dout = random_array(rng, y.shape, np.float64, xp)
    dy, dmemory, grads = tf.decoder_layer_backward(dout, tf.decoder_layer_forward(y, memory, params, H, **kwargs)[1])
    loss = lambda: float((tf.decoder_layer_forward(y, memory, params, H, **kwargs)[0] * dout).sum())
    check_gradients(loss, [y, memory, params], [dy, dmemory, grads])


# ----------------------------------------------------------------------------------------------------
# Whole models


MODEL_CASES = [(kind, positions) for kind in tf.KINDS for positions in tf.POSITIONS]


@pytest.mark.parametrize("kind,positions", MODEL_CASES)
def test_model_gradients_along_a_random_direction(xp, kind, positions):
    for tied, norm_first in ((False, True), (True, False)):
        config, params, tokens, src = make_model(kind, positions, norm_first=norm_first, tied=tied, pad_id=0)
        tokens[0, -1] = 0                                      # a padded target position
        if src is not None:
            src[1, -2:] = 0                                    # and padded source positions
        params, tokens, src = tree_map(xp.asarray, params), xp.asarray(tokens), on(xp, src)
        rng = np.random.default_rng(3)
        logits, cache = tf.transformer_forward(tokens, params, config, src)
        dlogits = random_array(rng, logits.shape, np.float64, xp)
        grads = tf.transformer_backward(dlogits, cache)
        assert [g.shape for g in tree_leaves(grads)] == [p.shape for p in tree_leaves(params)]
        loss = lambda: float((logits_of(params, config, tokens, src) * dlogits).sum())
        check_directional_derivative(loss, params, grads, rng)


def test_small_model_gradients_match_finite_differences_entry_by_entry():
    config, params, tokens, src = make_model("encoder-decoder", "learned", tied=True, B=1, T=3, S=3, D=4, n_layers=1)
    targets = np.array([[2, -100, 5]])                         # one ignored position
    loss, cache = tf.lm_loss_forward(tokens, targets, params, config, src, label_smoothing=0.1)
    grads = tf.lm_loss_backward(1.0, cache)
    check_gradients(lambda: tf.lm_loss_forward(tokens, targets, params, config, src, label_smoothing=0.1)[0],
                    params, grads)


def test_a_tied_table_gets_the_sum_of_its_output_and_input_gradients():
    config, params, tokens, _ = make_model("decoder", "rope", tied=True)
    untied_config = dict(config, tied=False)
    untied = dict(params, W_out=params["embed"].T.copy())      # the same function, two separate arrays
    dlogits = np.random.default_rng(0).standard_normal((2, 5, config["V"]))
    np.testing.assert_allclose(logits_of(params, config, tokens), logits_of(untied, untied_config, tokens))
    tied_grads = tf.transformer_backward(dlogits, tf.transformer_forward(tokens, params, config)[1])
    untied_grads = tf.transformer_backward(dlogits, tf.transformer_forward(tokens, untied, untied_config)[1])
    output_use, input_use = untied_grads["W_out"].T, untied_grads["embed"]
    assert np.abs(output_use).max() > 0.1 and np.abs(input_use).max() > 0.1      # both uses contribute
    np.testing.assert_allclose(tied_grads["embed"], output_use + input_use, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("V", [12, 1000])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", tf.KINDS)
def test_a_fresh_model_starts_within_half_a_nat_of_ln_v(kind, tied, V):
    # "Verify loss @ init" (Karpathy): a uniform guess costs ln V. Random targets, so no logit is right.
    config = {"kind": kind, "V": V, "D": 32, "n_heads": 4, "F": 32, "n_layers": 1, "max_len": 16,
              "positions": "sinusoidal", "tied": tied, "norm_first": kind != "encoder"}
    params = tf.init_transformer(config, np.random.default_rng(0), np.float64)
    rng = np.random.default_rng(1)
    tokens, targets = rng.integers(0, V, (8, 16)), rng.integers(0, V, (8, 16))
    src = rng.integers(0, V, (8, 16)) if kind == "encoder-decoder" else None
    loss, _ = tf.lm_loss_forward(tokens, targets, params, config, src)
    # Logits of std s add about s^2 / 2 (0.17 untied, s = 0.6); a tied token's own logit (<= 1) adds less.
    assert abs(loss - math.log(V)) < 0.5, (loss, math.log(V))


@pytest.mark.parametrize("tied", [False, True])
def test_tokens_enter_at_the_scale_the_init_docstring_gives_and_tied_logits_stay_below_one(tied):
    # Untied: embed N(0, 1/D) times sqrt(D), unit-scale entries next to the sinusoids. Tied: N(0, 1/D^2) times
    # sqrt(D), entries 1/sqrt(D), so that each logit |LN(h) . embed[v]| <= sqrt(D) |embed[v]| is about 1.
    D, V = 64, 200
    config = {"kind": "decoder", "V": V, "D": D, "n_heads": 4, "positions": "none", "tied": tied}
    params = tf.init_transformer(config, np.random.default_rng(0), np.float64)
    tokens = np.random.default_rng(1).integers(0, V, (8, 32))
    x, _ = tf.embed_forward(tokens, params, tf.check_config(config))
    need = 1 / math.sqrt(D) if tied else 1.0
    assert 0.9 * need < x.std() < 1.1 * need                   # 16384 draws: within a few percent
    if tied:
        logits = logits_of(params, config, tokens)
        bound = math.sqrt(D) * np.linalg.norm(params["embed"], axis=1).max()    # Cauchy-Schwarz, |LN(h)| <= sqrt(D)
        assert np.abs(logits).max() <= bound < 1.5


def test_the_memory_gradient_is_the_sum_over_every_decoder_layer():
    config, params, tokens, src = make_model("encoder-decoder", "none", n_layers=3)
    _, cache = tf.transformer_forward(tokens, params, config, src)
    dh = np.random.default_rng(0).standard_normal((2, 5, 8))
    dmemory_each, d = [], dh
    for layer_cache in reversed(cache["decoder"]["layers"]):
        d, dmemory, _ = tf.decoder_layer_backward(d, layer_cache)
        dmemory_each.append(dmemory)
    _, _, total = tf._stack_backward(dh, dict(cache["decoder"], norm=None), "decoder")
    assert all(np.abs(d).max() > 1e-3 for d in dmemory_each)   # every layer reads the memory
    np.testing.assert_allclose(total, sum(dmemory_each), rtol=1e-12)


def written_out_layer(x, params, H, memory=None, norm_first=True):
    """An encoder (memory None) or decoder layer written from the module docstring's equations, with
    attention.py and multihead.py as the only helpers (an independent reference, no torch)."""
    from multihead import multihead_forward
    LN = lambda v, n: (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5) * n["gamma"] + n["beta"]
    SA = lambda v: multihead_forward(v, v, params["attn"], H, causal=memory is not None)[0]
    CA = lambda v: multihead_forward(v, memory, params["cross_attn"], H)[0]
    gelu = lambda v: v * 0.5 * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))
    FFN = lambda v: gelu(v @ params["ff"]["W_1"] + params["ff"]["b_1"]) @ params["ff"]["W_2"] + params["ff"]["b_2"]
    ff_norm = "ln2" if memory is None else "ln3"
    if norm_first:                                             # h1 = y + SA(LN1(y)); h2 = h1 + CA(LN2(h1)); ...
        h = x + SA(LN(x, params["ln1"]))
        if memory is not None:
            h = h + CA(LN(h, params["ln2"]))
        return h + FFN(LN(h, params[ff_norm]))
    h = LN(x + SA(x), params["ln1"])                           # h1 = LN1(y + SA(y)); h2 = LN2(h1 + CA(h1)); ...
    if memory is not None:
        h = LN(h + CA(h), params["ln2"])
    return LN(h + FFN(h), params[ff_norm])


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_layers_equal_their_equations_written_out(layer, norm_first):
    rng = np.random.default_rng(4)
    x, memory = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 5, 8))
    init = tf.init_encoder_layer if layer == "encoder" else tf.init_decoder_layer
    # Every norm gets its own gamma and beta, so a swapped or misplaced norm changes the output.
    params = tree_map(lambda p: p + 0.3 * rng.standard_normal(p.shape), init(8, 12, rng, np.float64))
    if layer == "encoder":
        out, _ = tf.encoder_layer_forward(x, params, 2, norm_first=norm_first)
        expected = written_out_layer(x, params, 2, norm_first=norm_first)
    else:
        out, _ = tf.decoder_layer_forward(x, memory, params, 2, norm_first=norm_first)
        expected = written_out_layer(x, params, 2, memory, norm_first=norm_first)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_post_ln_ends_in_a_norm_and_pre_ln_models_alone_have_final_norms():
    rng = np.random.default_rng(0)
    params = tf.init_encoder_layer(8, 12, rng, np.float64)    # gamma = 1, beta = 0
    x = 3 + 2 * rng.standard_normal((2, 4, 8))
    post, _ = tf.encoder_layer_forward(x, params, 2, norm_first=False)
    pre, _ = tf.encoder_layer_forward(x, params, 2, norm_first=True)
    np.testing.assert_allclose(post.mean(-1), 0, atol=1e-12)  # post-LN: every row normalised
    np.testing.assert_allclose(post.var(-1), 1, rtol=1e-4)    # var / (var + eps) with eps = 1e-5
    assert np.abs(pre.mean(-1)).min() > 0.1                    # pre-LN: the residual stream is not
    for kind in tf.KINDS:
        post_params = make_model(kind, "none", norm_first=False)[1]
        pre_params = make_model(kind, "none", norm_first=True)[1]
        assert not {"enc_norm", "dec_norm"} & set(post_params)
        assert {"enc_norm", "dec_norm"} & set(pre_params)


def test_dropout_acts_where_torch_applies_it():
    rng = np.random.default_rng(0)
    B, T, S, D, F = 2, 3, 4, 8, 12
    cache = tf.decoder_layer_forward(rng.standard_normal((B, T, D)), rng.standard_normal((B, S, D)),
                                     tf.init_decoder_layer(D, F, rng, np.float64), 2, dropout=0.5, rng=rng)[1]
    # On each sublayer's output before its residual add, and after the FFN's activation.
    for key in ("drop1", "drop2", "drop3"):
        assert cache[key]["keep"].shape == (B, T, D)
    assert cache["ff"]["drop"]["keep"].shape == (B, T, F)
    no_dropout = tf.decoder_layer_forward(rng.standard_normal((B, T, D)), rng.standard_normal((B, S, D)),
                                          tf.init_decoder_layer(D, F, rng, np.float64), 2)[1]
    assert all(no_dropout[key]["keep"] is None for key in ("drop1", "drop2", "drop3"))


# ----------------------------------------------------------------------------------------------------
# Properties


@given(seed=st.integers(0, 2**16), T=st.integers(1, 6))
@example(seed=0, T=1)                                           # one token
@example(seed=1, T=6)
def test_encoder_without_positions_is_permutation_equivariant(seed, T):
    config, params, tokens, _ = make_model("encoder", "none", seed=seed, T=T)
    perm = np.random.default_rng(seed).permutation(T)
    # Permuting the tokens permutes the logits: nothing in the stack knows where a token sits.
    np.testing.assert_allclose(logits_of(params, config, tokens[:, perm]), logits_of(params, config, tokens)[:, perm],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rope", "alibi"])
def test_every_positional_scheme_breaks_permutation_equivariance(positions):
    config, params, _, _ = make_model("encoder", positions)
    tokens = np.array([[1, 2, 3, 4, 5]])
    perm = np.array([1, 0, 2, 3, 4])
    gap = np.abs(logits_of(params, config, tokens[:, perm]) - logits_of(params, config, tokens)[:, perm]).max()
    assert gap > 1e-4


GENERATING = [(kind, positions) for kind in ("decoder", "encoder-decoder") for positions in tf.POSITIONS]


@pytest.mark.parametrize("kind,positions", GENERATING)
@given(seed=st.integers(0, 2**16), position=st.integers(0, 4))
@example(seed=0, position=0)
@example(seed=0, position=4)
def test_future_tokens_change_no_earlier_logit(xp, kind, positions, seed, position):
    config, params, tokens, src = make_model(kind, positions, seed=seed)
    changed = tokens.copy()
    changed[:, position:] = np.random.default_rng(seed + 1).integers(1, config["V"], changed[:, position:].shape)
    params, src = tree_map(xp.asarray, params), on(xp, src)
    before = to_numpy(logits_of(params, config, xp.asarray(tokens), src))
    after = to_numpy(logits_of(params, config, xp.asarray(changed), src))
    # Future keys get weight exp(-inf) = 0 exactly, so the earlier rows are bit-for-bit the same.
    np.testing.assert_array_equal(before[:, :position], after[:, :position])


@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_future_positions_get_exactly_zero_gradient_from_earlier_logits(xp, kind):
    config, params, _, src = make_model(kind, "learned")
    tokens = np.array([[1, 2, 3, 7, 8], [2, 3, 1, 9, 10]])     # ids 7..10 occur only at positions 3 and 4
    if src is not None:
        src = np.array([[1, 2, 3], [4, 5, 6]])                 # the source uses positions 0..2 and ids 1..6 only
    dlogits = np.random.default_rng(0).standard_normal((2, 5, config["V"]))
    dlogits[:, 3:] = 0                                         # a loss on positions 0, 1, 2 only
    params = tree_map(xp.asarray, params)
    _, cache = tf.transformer_forward(xp.asarray(tokens), params, config, on(xp, src))
    grads = tree_map(to_numpy, tf.transformer_backward(xp.asarray(dlogits), cache))
    assert np.all(grads["pos"][3:] == 0) and np.all(grads["embed"][7:11] == 0)
    assert np.abs(grads["pos"][:3]).min() > 0


@pytest.mark.parametrize("kind,positions", MODEL_CASES)
@given(seed=st.integers(0, 2**16), n_pad=st.integers(1, 4))
@example(seed=0, n_pad=1)
def test_padding_changes_nothing_that_is_not_padding(xp, kind, positions, seed, n_pad):
    config, params, tokens, src = make_model(kind, positions, pad_id=0, seed=seed)
    params, tokens, src = tree_map(xp.asarray, params), xp.asarray(tokens), on(xp, src)
    pad = xp.zeros((2, n_pad), tokens.dtype)
    unpadded = to_numpy(logits_of(params, config, tokens, src))                           # (B, T, V)
    if kind == "encoder-decoder":                              # pad the source: the target's logits stay
        padded = logits_of(params, config, tokens, xp.concatenate([src, pad], axis=1))
        np.testing.assert_allclose(to_numpy(padded), unpadded, rtol=1e-12, atol=1e-12)
    padded = logits_of(params, config, xp.concatenate([tokens, pad], axis=1), src)       # (B, T + n_pad, V)
    np.testing.assert_allclose(to_numpy(padded)[:, :5], unpadded, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,positions", GENERATING)
@given(seed=st.integers(0, 2**16), prompt_length=st.integers(1, 4), norm_first=st.booleans())
@example(seed=0, prompt_length=1, norm_first=True)              # one token: the cache starts empty
@example(seed=0, prompt_length=4, norm_first=False)
def test_cached_generation_equals_recomputation(xp, kind, positions, seed, prompt_length, norm_first):
    config, params, tokens, src = make_model(kind, positions, norm_first=norm_first, pad_id=0, seed=seed)
    prompt = tokens[:, :prompt_length].copy()
    prompt[0, 0] = 0                                           # padding in the prompt stays masked as a key
    if src is not None:
        src[1, -2:] = 0                                        # and source padding in cross-attention
    params, prompt, src = tree_map(xp.asarray, params), xp.asarray(prompt), on(xp, src)
    # NumPy: up to the last position the table holds. The slower CuPy stand-in checks the same code path
    # (the CuPy branch of every function) on three steps.
    n_new = config["max_len"] - prompt_length if xp is np else 3
    cached, cached_logits = tf.generate(prompt, n_new, params, config, src=src)
    full, full_logits = tf.generate(prompt, n_new, params, config, src=src, use_cache=False)
    np.testing.assert_array_equal(to_numpy(cached), to_numpy(full))
    cached_logits, full_logits = to_numpy(cached_logits), to_numpy(full_logits)
    # The same arithmetic on fewer rows at a time: matrix products may sum in another order, so the logits
    # differ by rounding only. Each of the ~10 layers' sublayers adds a relative error of about (D + S) eps,
    # here about 20 eps, so 1000 eps of the largest logit is a bound with room; any cache bug moves a logit
    # by order 1e-2 or more.
    assert np.abs(cached_logits - full_logits).max() <= 1e3 * EPS64 * np.abs(full_logits).max()


def test_sampling_is_seeded_and_follows_the_temperature():
    config, params, tokens, _ = make_model("decoder", "rope")
    a, _ = tf.generate(tokens[:, :2], 6, params, config, temperature=1.0, rng=np.random.default_rng(4))
    b, _ = tf.generate(tokens[:, :2], 6, params, config, temperature=1.0, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    greedy, _ = tf.generate(tokens[:, :2], 6, params, config)
    cold, _ = tf.generate(tokens[:, :2], 6, params, config, temperature=1e-6, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(cold, greedy)                # temperature -> 0 is greedy


def test_mask_tokens_chooses_15_percent_then_80_10_10():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 50, (400, 250))
    tokens[:, -10:] = 0                                        # padding is never chosen
    inputs, targets = tf.mask_tokens(tokens, rng, V=50, mask_id=3, keep_ids=(0,))
    chosen = targets != -100
    n = (tokens != 0).sum()
    assert not chosen[:, -10:].any()
    assert abs(chosen.sum() / n - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n)   # 5 sigma
    np.testing.assert_array_equal(targets[chosen], tokens[chosen])
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
    masked, kept = (inputs[chosen] == 3).mean(), (inputs[chosen] == tokens[chosen]).mean()
    m = chosen.sum()
    assert abs(masked - 0.8) < 5 * math.sqrt(0.16 / m)
    # kept: the 10 % that stay, plus random tokens that happened to draw themselves (1 / 49 of 10 %:
    # a random token is never the pad id 0).
    assert abs(kept - (0.1 + 0.1 / 49)) < 5 * math.sqrt(0.09 / m)
    assert not np.any(inputs[chosen] == 0)


# ----------------------------------------------------------------------------------------------------
# dtypes, the CuPy path, training


def test_float32_stays_float32_through_a_whole_training_step(xp):
    for kind in tf.KINDS:
        config, params, tokens, src = make_model(kind, "alibi", dtype=np.float32, tied=True)
        params, tokens, src = tree_map(xp.asarray, params), xp.asarray(tokens), on(xp, src)
        loss, cache = tf.lm_loss_forward(tokens, tokens, params, config, src, label_smoothing=0.1)
        assert cache["model"]["out"]["x"].dtype == np.float32
        grads = tf.lm_loss_backward(1.0, cache)
        new_params, _ = adam_step(params, grads, adam_init(params), lr=1e-3, weight_decay=0.1)
        assert all(x.dtype == np.float32 for x in tree_leaves(grads) + tree_leaves(new_params))
        assert np.isfinite(loss)


@pytest.mark.parametrize("kind", tf.KINDS)
def test_the_same_code_runs_on_every_array_module(xp, kind):
    config, params, tokens, src = make_model(kind, "rope", pad_id=0)
    xp_params = tree_map(xp.asarray, params)
    xp_src = None if src is None else xp.asarray(src)
    logits, cache = tf.transformer_forward(xp.asarray(tokens), xp_params, config, xp_src)
    np.testing.assert_allclose(to_numpy(logits), logits_of(params, config, tokens, src), rtol=1e-10, atol=1e-12)
    dlogits = random_array(np.random.default_rng(0), logits.shape, np.float64, xp)
    grads = tf.transformer_backward(dlogits, cache)
    expected = tf.transformer_backward(to_numpy(dlogits), tf.transformer_forward(tokens, params, config, src)[1])
    for g, e in zip(tree_leaves(grads), tree_leaves(expected)):
        np.testing.assert_allclose(to_numpy(g), e, rtol=1e-9, atol=1e-12)
    if kind != "encoder":
        prompt = xp.asarray(tokens[:, :1])
        out, _ = tf.generate(prompt, 4, xp_params, config, src=xp_src)
        np.testing.assert_array_equal(to_numpy(out), tf.generate(tokens[:, :1], 4, params, config, src=src)[0])


@pytest.mark.slow
def test_demo_reverses_held_out_sequences_and_its_cross_attention_is_the_mirror(tmp_path):
    result = run_demo(ROOT / "transformer.py", timeout=600, cwd=tmp_path)
    # The demo itself asserts exact match >= 0.99 and anti-diagonal cross-attention mass > 0.5.
    assert "held-out exact-match accuracy on 1000 sequences" in result.stdout


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_tokens_are_refused_with_a_clear_message():
    config, params, tokens, _ = make_model("decoder", "learned")
    with pytest.raises(ValueError, match=r"tokens must hold ids in \[0, 11\), got values in \[\d+, 11\]"):
        logits_of(params, config, np.where(tokens == tokens[0, 0], 11, tokens))
    with pytest.raises(TypeError, match="tokens must be an integer array"):
        logits_of(params, config, tokens.astype(np.float64))
    with pytest.raises(ValueError, match="tokens must have shape"):
        logits_of(params, config, tokens[0])
    with pytest.raises(ValueError, match="at most config\\['max_len'\\] = 12 long, got 13"):
        logits_of(params, config, np.ones((1, 13), np.int64))
    with pytest.raises(ValueError, match="src must be None"):
        logits_of(params, config, tokens, tokens)
    ed_config, ed_params, ed_tokens, _ = make_model("encoder-decoder", "none")
    with pytest.raises(ValueError, match="src must be given"):
        logits_of(ed_params, ed_config, ed_tokens)
    with pytest.raises(ValueError, match="positions must be < max_len"):
        tf.generate(tokens, 9, params, config)                 # the 13th position would be fed in
    with pytest.raises(ValueError, match="prompt must hold ids in"):
        tf.generate(tokens + 20, 2, params, config)
    with pytest.raises(ValueError, match="n_new must be an integer >= 0, got -1"):
        tf.generate(tokens, -1, params, config)
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or a finite number > 0, got -1"):
        tf.generate(tokens, 2, params, config, temperature=-1)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        tf.generate(tokens, 2, params, config, temperature=0.5)            # sampling needs an rng
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        tf.generate(tokens, 2, params, config, temperature=0.5, rng=np.random.RandomState(0))
    with pytest.raises(ValueError, match=r"prompt must hold at least one token per row .* got shape \(2, 0\)"):
        tf.generate(tokens[:, :0], 2, params, config)
    with pytest.raises(TypeError, match="prompt must be an integer array of token ids, got float32"):
        tf.generate(tokens.astype(np.float32), 2, params, config)
    with pytest.raises(TypeError, match=r"config must be a dict, got int64 array of shape \(2, 5\)"):
        tf.transformer_forward(params, config, tokens)         # the old order (params, config, tokens)
    out, logits = tf.generate(tokens, 0, params, config)
    assert out is tokens and logits.shape == (2, 0, 11)


@pytest.mark.parametrize("change,error,message", [
    (dict(D=10, n_heads=4), ValueError, r"config\['D'\] = 10 must be divisible by config\['n_heads'\] = 4"),
    (dict(kind="gpt"), ValueError, r"config\['kind'\] must be one of"),
    (dict(positions="relative"), ValueError, r"config\['positions'\] must be one of"),
    (dict(activation="swish"), ValueError, r"config\['activation'\] must be one of"),
    (dict(n_layers=0), ValueError, r"config\['n_layers'\] must be an integer >= 1, got 0"),
    (dict(D=0), ValueError, r"config\['D'\] must be an integer >= 1, got 0"),
    (dict(F=0), ValueError, r"config\['F'\] must be an integer >= 1, got 0"),
    (dict(max_len=0), ValueError, r"config\['max_len'\] must be an integer >= 1, got 0"),
    (dict(n_heads=0), ValueError, r"config\['n_heads'\] must be an integer >= 1, got 0"),
    (dict(V=2.5), ValueError, r"config\['V'\] must be an integer >= 1, got 2.5"),
    (dict(norm_first="yes"), TypeError, r"config\['norm_first'\] must be True or False"),
    (dict(pad_id=11), ValueError, r"config\['pad_id'\] must be None or an id in \[0, 11\)"),
    (dict(D=6, n_heads=2, positions="rope"), ValueError, "needs an even head width"),
    (dict(heads=2), ValueError, "config has unknown fields"),
    (dict(positions=None), ValueError, r"config\['positions'\] must be one of .*'none'"),
])
def test_bad_configs_are_refused_naming_the_field(change, error, message):
    config = {"V": 11, "D": 8, **change}
    with pytest.raises(error, match=message):
        tf.init_transformer(config, np.random.default_rng(0))


def test_bad_layer_inputs_are_refused():
    rng = np.random.default_rng(0)
    params = tf.init_encoder_layer(8, 16, rng, np.float64)
    x = rng.standard_normal((2, 3, 8))
    with pytest.raises(ValueError, match=r"D = 8 .* must be divisible by n_heads = 3"):
        tf.encoder_layer_forward(x, params, 3)
    with pytest.raises(ValueError, match="x must have shape \\(B, T, D\\)"):
        tf.encoder_layer_forward(x[0], params, 2)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        tf.encoder_layer_forward(x.astype(np.int64), params, 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        tf.encoder_layer_forward(x, params, 2, activation="elu")
    with pytest.raises(ValueError, match="memory must have shape \\(2, S, 8\\)"):
        tf.decoder_layer_forward(x, x[..., :4], tf.init_decoder_layer(8, 16, rng, np.float64), 2)
    with pytest.raises(ValueError, match=r"gamma must have shape \(8,\) to match x"):
        tf.layer_norm_forward(x, np.ones(4), np.zeros(8))
    with pytest.raises(TypeError, match=r"gamma must have dtype float64 \(x.s\), got float32"):
        tf.layer_norm_forward(x, np.ones(8, np.float32), np.zeros(8))
    out, cache = tf.encoder_layer_forward(x, params, 2)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 3, 8\)"):
        tf.encoder_layer_backward(out[:, :2], cache)
    with pytest.raises(TypeError, match="dout must have dtype float64"):
        tf.encoder_layer_backward(out.astype(np.float32), cache)
    with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\), got 1.0"):
        tf.dropout_forward(x, 1.0, rng)
    with pytest.raises(ValueError, match=r"params must have keys \['attn', 'ff', 'ln1', 'ln2'\]: missing \['ff'\]"):
        tf.encoder_layer_forward(x, {k: v for k, v in params.items() if k != "ff"}, 2)
    with pytest.raises(ValueError, match=r"params\['W_2'\] must be a (a )?float array of shape \(16, 8\)"):
        tf.feed_forward_forward(x, dict(params["ff"], W_2=np.zeros((16, 4))))
    with pytest.raises(TypeError, match="params must hold arrays of one dtype, float64, got a float32"):
        tf.feed_forward_forward(x, dict(params["ff"], W_1=params["ff"]["W_1"].astype(np.float32)))
    with pytest.raises(ValueError, match=r"params\['ln2'\]\['gamma'\] must be a (a )?float array of shape \(8,\)"):
        tf.encoder_layer_forward(x, dict(params, ln2={"gamma": np.ones(4), "beta": np.zeros(8)}), 2)
    with pytest.raises(TypeError, match="norm_first must be True or False"):
        tf.encoder_layer_forward(x, params, 2, norm_first=1)
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            tf.layer_norm_forward(x, np.ones(8), np.zeros(8), eps=eps)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        tf.dropout_forward(x, 0.5, np.random.RandomState(0))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        tf.init_feed_forward(8, 16, 0)


def test_a_params_tree_that_does_not_match_its_config_is_refused_by_path():
    config, params, tokens, _ = make_model("decoder", "learned")
    fewer = dict(params, decoder=params["decoder"][:1])        # config['n_layers'] = 2
    with pytest.raises(ValueError, match=r"params\['decoder'\] must be a list of length 2, got length 1"):
        logits_of(fewer, config, tokens)
    with pytest.raises(ValueError, match=r"params must have keys .*: missing \['W_out'\]"):
        logits_of({k: v for k, v in params.items() if k != "W_out"}, config, tokens)
    with pytest.raises(ValueError, match=r"extra \['W_out'\]"):
        logits_of(params, dict(config, tied=True), tokens)     # a tied config has no W_out
    wide = tree_map(lambda p: p, params)
    wide["decoder"][1]["ff"]["W_1"] = np.zeros((8, 13))
    with pytest.raises(ValueError, match=r"params\['decoder'\]\[1\]\['ff'\]\['W_1'\] must be a (a )?float array of shape \(8, 12\)"):
        logits_of(wide, config, tokens)
    with pytest.raises(ValueError, match=r"params\['embed'\] must be a (a )?float array of shape \(12, 8\)"):
        logits_of(params, dict(config, V=12), tokens)
    with pytest.raises(TypeError, match="params must hold arrays of one dtype, float64, got a float32"):
        logits_of(dict(params, b_out=params["b_out"].astype(np.float32)), config, tokens)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        tf.init_transformer(config, 0)


def test_a_cache_from_another_function_is_refused():
    config, params, tokens, _ = make_model("decoder", "none")
    logits, model_cache = tf.transformer_forward(tokens, params, config)
    _, loss_cache = tf.lm_loss_forward(tokens, tokens, params, config)
    with pytest.raises(TypeError, match=r"cache must be the dict transformer_forward returned"):
        tf.transformer_backward(logits, loss_cache)
    with pytest.raises(TypeError, match=r"cache must be the dict lm_loss_forward returned"):
        tf.lm_loss_backward(1.0, model_cache)
    layer_cache = model_cache["decoder"]["layers"][0]
    with pytest.raises(TypeError, match=r"cache must be the dict decoder_layer_forward returned"):
        tf.decoder_layer_backward(np.zeros((2, 5, 8)), layer_cache)
    with pytest.raises(TypeError, match=r"cache must be the dict layer_norm_forward returned"):
        tf.layer_norm_backward(np.zeros((2, 5, 8)), layer_cache)
    with pytest.raises(TypeError, match=r"cache must be the dict feed_forward_forward returned"):
        tf.feed_forward_backward(np.zeros((2, 5, 8)), (1, 2))
    with pytest.raises(ValueError, match=r"dlogits must have shape \(2, 5, 11\)"):
        tf.transformer_backward(logits[:, :3], model_cache)


def test_mask_tokens_refuses_a_bad_probability_mask_id_or_rng():
    tokens, rng = np.ones((2, 5), np.int64), np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
        tf.mask_tokens(tokens, rng, V=10, mask_id=3, p=1.5)
    with pytest.raises(ValueError, match=r"mask_id must be an id in \[0, V = 10\), got 10"):
        tf.mask_tokens(tokens, rng, V=10, mask_id=10)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        tf.mask_tokens(tokens, None, V=10, mask_id=3)
    with pytest.raises(TypeError, match="tokens must be an integer array"):
        tf.mask_tokens(tokens.astype(np.float32), rng, V=10, mask_id=3)


def test_embed_forward_checks_its_config_and_the_tables_it_reads():
    config = {"V": 10, "D": 8}                                   # positions default to 'learned'
    ids = np.zeros((1, 2), dtype=int)
    with pytest.raises(ValueError, match=r"params\['pos'\] must be a float array of shape \(64, 8\), got NoneType"):
        tf.embed_forward(ids, {"embed": np.zeros((10, 8))}, config)
    with pytest.raises(ValueError, match=r"config has unknown fields \['depth'\]"):
        tf.embed_forward(ids, {"embed": np.zeros((10, 8))}, {**config, "depth": 2})

"""The transformer, forward and backward by hand: encoder-decoder (T5), encoder-only (BERT), decoder-only (GPT).

A transformer is a stack of identical layers. Each layer lets every token look at other tokens (multi-head
attention, multihead.py) and then thinks about what it saw on its own (a small two-layer network applied to
each position). Residual connections carry the input around each of the two, and layer normalization keeps
the activations at unit scale (Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762).

    LayerNorm(x) = gamma * (x - mean) / sqrt(var + eps) + beta      statistics over D, biased var, as PyTorch
    FFN(x)       = act(x W_1 + b_1) W_2 + b_2                       W_1 (D, F), W_2 (F, D)
    GELU(x)      = x Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2    (Hendrycks & Gimpel, arXiv:1606.08415)
    GELU_tanh(x) = x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2  (GPT-2's approximation; differs by <= 5e-4)

Encoder layer, with SA = self-attention and the two placements of the norm (`norm_first`):

    pre-LN  (GPT-2, ViT):  h = x + SA(LN1(x));        out = h + FFN(LN2(h))
    post-LN (the paper):   h = LN1(x + SA(x));        out = LN2(h + FFN(h))

Decoder layer: causal self-attention, then cross-attention CA to the encoder's output `memory`, then FFN:

    pre-LN:   h1 = y + SA(LN1(y));   h2 = h1 + CA(LN2(h1), memory);   out = h2 + FFN(LN3(h2))
    post-LN:  h1 = LN1(y + SA(y));   h2 = LN2(h1 + CA(h1, memory));   out = LN3(h2 + FFN(h2))

A residual x + f(x) feeds x to two places, so its backward adds two gradients: dx = dout + (df/dx)^T dout.
The memory feeds every decoder layer, so its gradient is the sum over the layers.

The three shapes from the same parts (`config['kind']`):
- 'encoder-decoder' (the paper, T5): source -> encoder stack -> memory; target -> decoder stack reading
  memory -> next-token logits. Trained with teacher forcing, decoded one token at a time.
- 'encoder' (BERT, arXiv:1810.04805): one stack without a causal mask; logits at every position, trained
  to fill in masked tokens (each position chosen with probability 0.15; of those 80 % become [MASK],
  10 % a random token, 10 % stay) -- `mask_tokens`.
- 'decoder' (GPT, Radford et al. 2018/2019): one stack of encoder layers with a causal mask; next-token
  logits, generated one token at a time.
Each model: token embedding x = sqrt(D) embed[ids] (the paper's section 3.4); positions (config['positions']: 'sinusoidal' or 'learned', added to
the embedding; 'rope' rotating q and k in self-attention; 'alibi' biasing self-attention's scores; 'none');
the layers; a final LayerNorm for pre-LN (post-LN ends every layer with one; torch.nn.Transformer adds a
final norm either way); logits = h W_out + b_out, with W_out = embed^T when `tied`
(Press & Wolf, arXiv:1608.05859; the tied table's gradient is the sum of its two uses).

Generation keeps a key/value cache: each layer's self-attention keys and values of the tokens so far
(after RoPE), so a new token costs one query row. The new token's position is the cache length, for every
positional scheme; causal masking aligned at the bottom-right (attention.py) lets that one query see
every cached key. Cross-attention's keys and values of the memory are computed once.

Dropout (Srivastava et al. 2014) is applied, when asked for, where torch.nn.TransformerEncoderLayer
applies it: on each sublayer's output before the residual add, and after the FFN's activation. torch
also drops attention weights; this file does not (attention.py has no dropout). With dropout 0 the
layers equal torch's with batch_first=True in outputs and every gradient.

Shapes: B batch, T target length, S source length, D model width, H heads, Dh = D / H, F FFN width,
V vocabulary. Masks are boolean, True = may attend (the opposite of PyTorch's boolean src_mask).
Imports attention.py, positional.py, multihead.py, training.py and erf.py. Runs on NumPy or CuPy arrays unchanged.
"""
import math
import numbers

import numpy as np

from attention import attention_forward, get_xp
from erf import erfc
from multihead import init_multihead, merge_heads, multihead_backward, multihead_forward, split_heads
from positional import (alibi_bias, init_learned_positions, learned_position_backward,
                        learned_position_forward, rope_forward, sinusoidal_encoding)
from training import (check_ids, check_upstream, cross_entropy_backward, cross_entropy_forward, embedding_backward,
                      embedding_forward)

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "none")
KINDS = ("encoder-decoder", "encoder", "decoder")


# ----------------------------------------------------------------------------------------------------
# Layer normalization


def init_layer_norm(D, dtype=np.float32):
    """{'gamma': ones (D,), 'beta': zeros (D,)}: the identity map on normalised inputs, as PyTorch starts."""
    _check_positive_int("D", D)
    return {"gamma": np.ones(D, dtype), "beta": np.zeros(D, dtype)}


def layer_norm_forward(x, gamma, beta, eps=1e-5):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, statistics over the last axis.

    x (..., D), gamma and beta (D,). var is the biased variance (divide by D) and eps sits inside the
    square root, as torch.nn.LayerNorm. The mean is subtracted before squaring (never E[x^2] - E[x]^2,
    which loses every digit when |mean| >> std).
    Returns y (..., D) and cache = {'xhat', 'gamma', 'rstd'}.
    """
    _check_layer_norm(x, gamma, beta)
    xp = get_xp(x)
    mean = x.mean(axis=-1, keepdims=True)                      # (..., 1)
    xc = x - mean                                              # (..., D) centred
    var = (xc * xc).mean(axis=-1, keepdims=True)               # (..., 1) biased, as PyTorch
    rstd = 1 / xp.sqrt(var + eps)                              # (..., 1)
    xhat = xc * rstd                                           # (..., D) zero mean, unit variance
    return xhat * gamma + beta, {"xhat": xhat, "gamma": gamma, "rstd": rstd}


def layer_norm_backward(dout, cache):
    """dbeta = sum dout;  dgamma = sum dout * xhat;
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dout * gamma.

    mean(g) is the path through `mean`, xhat * mean(g * xhat) the path through `var`. With an all-ones
    dout and gamma = 1 the second term vanishes (mean of xhat is 0), which is why tests use a random dout.
    """
    xhat, gamma, rstd = cache["xhat"], cache["gamma"], cache["rstd"]
    _check_dout(dout, xhat)
    lead = tuple(range(dout.ndim - 1))                         # every axis but the feature axis
    dbeta = dout.sum(axis=lead)                                # (D,)
    dgamma = (dout * xhat).sum(axis=lead)                      # (D,)
    g = dout * gamma                                           # (..., D) gradient wrt xhat
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - xhat * (g * xhat).mean(axis=-1, keepdims=True))   # (..., D)
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------------------------------------
# Activations: ReLU, exact GELU (erf from erf.py), GELU's tanh approximation

def activation_forward(x, kind="gelu"):
    """out = act(x) for kind 'relu' (max(x, 0)), 'gelu' (x Phi(x), exact) or 'gelu_tanh' (GPT-2's).

    Phi(x) = erfc(-x / sqrt 2) / 2, the normal CDF, written with erfc so that far in the negative tail
    Phi keeps its relative accuracy. Returns out and cache = {'x', 'kind', 'phi' (gelu) or 't' (gelu_tanh)}.
    """
    if kind not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")
    xp = get_xp(x)
    cache = {"x": x, "kind": kind}
    if kind == "relu":
        return xp.maximum(x, 0), cache
    if kind == "gelu":
        cache["phi"] = 0.5 * erfc(-x / math.sqrt(2))             # Phi(x)
        return x * cache["phi"], cache
    cache["t"] = xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))   # x * x * x: NumPy's x**3 is slow
    return 0.5 * x * (1 + cache["t"]), cache


def activation_backward(dout, cache):
    """dx = dout * act'(x):
    relu: 1 where x > 0 (0 at x = 0, as PyTorch);  gelu: Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi);
    gelu_tanh: (1 + t)/2 + x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2,  t the tanh of the forward.
    """
    x, kind = cache["x"], cache["kind"]
    _check_dout(dout, x)
    xp = get_xp(x)
    if kind == "relu":
        return dout * (x > 0)
    if kind == "gelu":
        pdf = xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))   # phi(x), the normal density
        return dout * (cache["phi"] + x * pdf)
    t = cache["t"]
    dinner = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)     # d/dx of tanh's argument
    return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dinner)


# ----------------------------------------------------------------------------------------------------
# Dropout


def dropout_forward(x, p, rng=None):
    """out = x * keep / (1 - p), keep ~ Bernoulli(1 - p) drawn from rng (inverted dropout).

    p = 0 is the identity, as at evaluation time. rng is a random Generator of x's array module
    (numpy.random.default_rng(seed) for NumPy arrays, cupy.random.default_rng(seed) on the GPU), so a seed
    fixes the mask. Returns out and cache = {'keep' (x's shape, bool, or None), 'scale'}.
    """
    if not isinstance(p, numbers.Real) or not (0 <= p < 1):
        raise ValueError(f"dropout p must be in [0, 1), got {p!r}")
    if p > 0 and rng is None:
        raise ValueError(f"dropout p = {p} needs rng, a random Generator of x's array module, got None")
    if p == 0:
        return x, {"keep": None, "scale": 1.0}
    keep = rng.random(x.shape) >= p                            # (...) True with probability 1 - p
    if get_xp(keep) is not get_xp(x):
        raise TypeError("rng must be a Generator of x's array module (numpy or cupy), got one of another")
    scale = 1.0 / (1.0 - p)
    return x * keep * x.dtype.type(scale), {"keep": keep, "scale": scale}


def dropout_backward(dout, cache):
    """dx = dout * keep / (1 - p): the same mask and scale as the forward."""
    if cache["keep"] is None:
        return dout
    return dout * cache["keep"] * dout.dtype.type(cache["scale"])


# ----------------------------------------------------------------------------------------------------
# Position-wise feed-forward network


def init_feed_forward(D, F, rng, dtype=np.float32):
    """{'W_1' (D, F), 'b_1' (F,), 'W_2' (F, D), 'b_2' (D,)}, drawn as torch.nn.Linear draws them:
    W and b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    _check_positive_int("D", D)
    _check_positive_int("F", F)
    a1, a2 = 1 / math.sqrt(D), 1 / math.sqrt(F)
    return {"W_1": rng.uniform(-a1, a1, (D, F)).astype(dtype), "b_1": rng.uniform(-a1, a1, F).astype(dtype),
            "W_2": rng.uniform(-a2, a2, (F, D)).astype(dtype), "b_2": rng.uniform(-a2, a2, D).astype(dtype)}


def feed_forward_forward(x, params, activation="gelu", dropout=0.0, rng=None):
    """out = drop(act(x W_1 + b_1)) W_2 + b_2, applied to every position alone.

    x (B, L, D). Returns out (B, L, D) and cache = {'x', 'act', 'drop', 'hidden', 'params'}.
    """
    _check_feed_forward(x, params)
    hidden, act_cache = activation_forward(x @ params["W_1"] + params["b_1"], activation)  # (B, L, F)
    hidden, drop_cache = dropout_forward(hidden, dropout, rng)                           # (B, L, F)
    out = hidden @ params["W_2"] + params["b_2"]                                         # (B, L, D)
    return out, {"x": x, "act": act_cache, "drop": drop_cache, "hidden": hidden, "params": params}


def feed_forward_backward(dout, cache):
    """dx and grads {'W_1','b_1','W_2','b_2'} of feed_forward_forward; each linear map y = x W + b gives
    dx = dy W^T, dW = x^T dy, db = sum dy (rows = every position of every sequence)."""
    x, hidden, params = cache["x"], cache["hidden"], cache["params"]
    _check_dout(dout, x)
    dout_rows = dout.reshape(-1, dout.shape[-1])               # (B*L, D)
    dW_2 = hidden.reshape(-1, hidden.shape[-1]).T @ dout_rows  # (F, D)   out = hidden W_2 + b_2
    dhidden = dout @ params["W_2"].T                           # (B, L, F)
    dhidden = dropout_backward(dhidden, cache["drop"])
    dpre = activation_backward(dhidden, cache["act"])          # (B, L, F) hidden = act(pre)
    dpre_rows = dpre.reshape(-1, dpre.shape[-1])               # (B*L, F)
    grads = {"W_1": x.reshape(-1, x.shape[-1]).T @ dpre_rows, "b_1": dpre_rows.sum(axis=0),  # pre = x W_1 + b_1
             "W_2": dW_2, "b_2": dout_rows.sum(axis=0)}
    return dpre @ params["W_1"].T, grads                       # (B, L, D)


# ----------------------------------------------------------------------------------------------------
# Encoder layer and decoder layer


def init_encoder_layer(D, F, rng, dtype=np.float32):
    """{'attn': multihead params, 'ln1', 'ff': FFN params, 'ln2'} (torch's self_attn, norm1, linear1/2, norm2)."""
    return {"attn": init_multihead(D, rng, dtype), "ln1": init_layer_norm(D, dtype),
            "ff": init_feed_forward(D, F, rng, dtype), "ln2": init_layer_norm(D, dtype)}


def init_decoder_layer(D, F, rng, dtype=np.float32):
    """An encoder layer's params plus {'cross_attn', 'ln3'}; norms in torch's order norm1, norm2, norm3."""
    return {"attn": init_multihead(D, rng, dtype), "ln1": init_layer_norm(D, dtype),
            "cross_attn": init_multihead(D, rng, dtype), "ln2": init_layer_norm(D, dtype),
            "ff": init_feed_forward(D, F, rng, dtype), "ln3": init_layer_norm(D, dtype)}


def _sublayer_forward(x, norm, sublayer, norm_first, dropout, rng):
    """One residual sublayer: pre-LN x + drop(f(LN(x))), or post-LN LN(x + drop(f(x))).

    sublayer(z) -> (f(z), f's cache). Returns out (B, T, D) and (f's cache, the norm's, the dropout's).
    """
    if norm_first:
        z, norm_cache = layer_norm_forward(x, norm["gamma"], norm["beta"])     # (B, T, D)
        update, f_cache = sublayer(z)                                          # (B, T, D)
        update, drop_cache = dropout_forward(update, dropout, rng)
        return x + update, (f_cache, norm_cache, drop_cache)
    update, f_cache = sublayer(x)                                              # (B, T, D)
    update, drop_cache = dropout_forward(update, dropout, rng)
    out, norm_cache = layer_norm_forward(x + update, norm["gamma"], norm["beta"])   # (B, T, D)
    return out, (f_cache, norm_cache, drop_cache)


def _sublayer_backward(dout, caches, norm_first, sublayer_backward):
    """Backward of _sublayer_forward; sublayer_backward(dupdate, f_cache) -> (dz, *f's other gradients).

    Returns dx, [f's other gradients], and the norm's gradients {'gamma', 'beta'}. x feeds both the
    residual and f, so dx is the sum of the two paths.
    """
    f_cache, norm_cache, drop_cache = caches
    if norm_first:                                             # out = x + drop(f(LN(x)))
        dz, *f_grads = sublayer_backward(dropout_backward(dout, drop_cache), f_cache)
        dx_f, dgamma, dbeta = layer_norm_backward(dz, norm_cache)
        dx = dout + dx_f                                       # residual path + path through f
    else:                                                      # out = LN(x + drop(f(x)))
        dsum, dgamma, dbeta = layer_norm_backward(dout, norm_cache)
        dx_f, *f_grads = sublayer_backward(dropout_backward(dsum, drop_cache), f_cache)
        dx = dsum + dx_f                                       # residual path + path through f
    return dx, f_grads, {"gamma": dgamma, "beta": dbeta}


def _self_attention_backward(dupdate, cache):
    """Self-attention is fed one tensor as both x_q and x_kv, so that tensor's gradient is dx_q + dx_kv."""
    dx_q, dx_kv, grads = multihead_backward(dupdate, cache)
    return dx_q + dx_kv, grads


def encoder_layer_forward(x, params, n_heads, mask=None, norm_first=True, activation="gelu", causal=False,
                          rope=False, bias=None, dropout=0.0, rng=None):
    """One encoder layer (module docstring): self-attention sublayer, then feed-forward sublayer.

    x (B, T, D). mask: bool broadcastable to (B, H, T, T), True = may attend (a padding mask is
    (B, 1, 1, T)). causal=True makes it a GPT block. rope / bias (an ALiBi table (H, T, T)) go to the
    self-attention (multihead.py). dropout > 0 (with a Generator rng) drops each sublayer's output and
    the FFN's hidden activations.
    Returns out (B, T, D) and cache = {'attn' (multihead's cache), 'ln1', 'drop1', 'ff', 'ln2', 'drop2',
    'norm_first'}, keyed like params; the per-head attention weights (B, H, T, T) are
    cache['attn']['attn']['weights'].
    """
    _check_layer_options(x, params, ("attn", "ln1", "ff", "ln2"), n_heads, norm_first, activation)

    def attention(z):
        return multihead_forward(z, z, params["attn"], n_heads, mask=mask, causal=causal, rope=rope, bias=bias)

    def feed_forward(z):
        return feed_forward_forward(z, params["ff"], activation, dropout, rng)

    cache = {"norm_first": norm_first}
    h, (cache["attn"], cache["ln1"], cache["drop1"]) = _sublayer_forward(x, params["ln1"], attention, norm_first,
                                                                         dropout, rng)             # (B, T, D)
    out, (cache["ff"], cache["ln2"], cache["drop2"]) = _sublayer_forward(h, params["ln2"], feed_forward, norm_first,
                                                                         dropout, rng)             # (B, T, D)
    return out, cache


def encoder_layer_backward(dout, cache):
    """dx (B, T, D) and grads (the params' keys) of encoder_layer_forward: its two sublayers in reverse."""
    norm_first, grads = cache["norm_first"], {}
    dh, (grads["ff"],), grads["ln2"] = _sublayer_backward(dout, (cache["ff"], cache["ln2"], cache["drop2"]),
                                                          norm_first, feed_forward_backward)      # (B, T, D)
    dx, (grads["attn"],), grads["ln1"] = _sublayer_backward(dh, (cache["attn"], cache["ln1"], cache["drop1"]),
                                                            norm_first, _self_attention_backward)  # (B, T, D)
    return dx, {key: grads[key] for key in ("attn", "ln1", "ff", "ln2")}


def decoder_layer_forward(y, memory, params, n_heads, memory_mask=None, norm_first=True, activation="gelu",
                          tgt_mask=None, rope=False, bias=None, dropout=0.0, rng=None):
    """One decoder layer: causal self-attention, cross-attention to memory, feed-forward (module docstring).

    y (B, T, D) the target so far; memory (B, S, D) the encoder's output. Self-attention is always causal,
    AND-ed with tgt_mask (e.g. a (B, 1, 1, T) padding mask); memory_mask (bool, broadcastable to
    (B, H, T, S)) limits cross-attention (e.g. source padding). rope / bias act on self-attention only.
    Returns out (B, T, D) and cache = {'attn', 'ln1', 'drop1', 'cross_attn', 'ln2', 'drop2', 'ff', 'ln3',
    'drop3', 'norm_first'}; the cross-attention weights (B, H, T, S) are cache['cross_attn']['attn']['weights'].
    """
    _check_layer_options(y, params, ("attn", "ln1", "cross_attn", "ln2", "ff", "ln3"), n_heads, norm_first,
                         activation)
    if not hasattr(memory, "ndim") or memory.ndim != 3 or memory.shape[0] != y.shape[0] \
            or memory.shape[2] != y.shape[2]:
        raise ValueError(f"memory must have shape ({y.shape[0]}, S, {y.shape[2]}) to match y {y.shape}, "
                         f"got {getattr(memory, 'shape', type(memory).__name__)}")

    def attention(z):
        return multihead_forward(z, z, params["attn"], n_heads, mask=tgt_mask, causal=True, rope=rope, bias=bias)

    def cross_attention(z):
        return multihead_forward(z, memory, params["cross_attn"], n_heads, mask=memory_mask)

    def feed_forward(z):
        return feed_forward_forward(z, params["ff"], activation, dropout, rng)

    cache = {"norm_first": norm_first}
    h1, (cache["attn"], cache["ln1"], cache["drop1"]) = _sublayer_forward(
        y, params["ln1"], attention, norm_first, dropout, rng)                                     # (B, T, D)
    h2, (cache["cross_attn"], cache["ln2"], cache["drop2"]) = _sublayer_forward(
        h1, params["ln2"], cross_attention, norm_first, dropout, rng)                              # (B, T, D)
    out, (cache["ff"], cache["ln3"], cache["drop3"]) = _sublayer_forward(
        h2, params["ln3"], feed_forward, norm_first, dropout, rng)                                 # (B, T, D)
    return out, cache


def decoder_layer_backward(dout, cache):
    """dy (B, T, D), dmemory (B, S, D) and grads of decoder_layer_forward, sublayers in reverse.

    Cross-attention's backward (multihead_backward) returns (dx_q, dx_kv, grads): dx_kv is dmemory.
    """
    norm_first, grads = cache["norm_first"], {}
    dh2, (grads["ff"],), grads["ln3"] = _sublayer_backward(
        dout, (cache["ff"], cache["ln3"], cache["drop3"]), norm_first, feed_forward_backward)     # (B, T, D)
    dh1, (dmemory, grads["cross_attn"]), grads["ln2"] = _sublayer_backward(
        dh2, (cache["cross_attn"], cache["ln2"], cache["drop2"]), norm_first, multihead_backward)
    dy, (grads["attn"],), grads["ln1"] = _sublayer_backward(
        dh1, (cache["attn"], cache["ln1"], cache["drop1"]), norm_first, _self_attention_backward)
    return dy, dmemory, {key: grads[key] for key in ("attn", "ln1", "cross_attn", "ln2", "ff", "ln3")}


# ----------------------------------------------------------------------------------------------------
# Whole models: embedding and positions, stacks, output projection


def init_transformer(config, rng, dtype=np.float32):
    """Parameters of one of the three shapes, from config (a dict):

    kind ('encoder-decoder' | 'encoder' | 'decoder'), V, D, n_heads, F, n_layers, max_len,
    positions ('sinusoidal' | 'learned' | 'rope' | 'alibi' | 'none'), norm_first, activation, tied,
    pad_id (or None). Returns {'embed' (V, D), 'pos' (max_len, D) if learned,
    'encoder': [encoder layers] and 'enc_norm' (kinds with an encoder), 'decoder': [decoder layers for
    'encoder-decoder', causal encoder-shaped blocks for 'decoder'] and 'dec_norm', 'W_out' (D, V) unless
    tied, 'b_out' (V,)}. The final norms exist for pre-LN only (post-LN ends every layer with a norm).
    The embedding is drawn N(0, 1/D) and multiplied by sqrt(D) in the forward (the paper's section 3.4),
    so tokens start at unit scale next to the sinusoids, and a tied output starts with logits of unit scale.
    """
    config = check_config(config)
    V, D, F, L = config["V"], config["D"], config["F"], config["n_layers"]
    params = {"embed": (rng.standard_normal((V, D)) / math.sqrt(D)).astype(dtype)}      # (V, D)
    if config["positions"] == "learned":
        params["pos"] = init_learned_positions(config["max_len"], D, rng, dtype)        # (max_len, D)
    if config["kind"] != "decoder":
        params["encoder"] = [init_encoder_layer(D, F, rng, dtype) for _ in range(L)]
        if config["norm_first"]:
            params["enc_norm"] = init_layer_norm(D, dtype)
    if config["kind"] != "encoder":
        init_layer = init_decoder_layer if config["kind"] == "encoder-decoder" else init_encoder_layer
        params["decoder"] = [init_layer(D, F, rng, dtype) for _ in range(L)]
        if config["norm_first"]:
            params["dec_norm"] = init_layer_norm(D, dtype)
    if not config["tied"]:
        params["W_out"] = rng.uniform(-1 / math.sqrt(D), 1 / math.sqrt(D), (D, V)).astype(dtype)  # (D, V)
    params["b_out"] = np.zeros(V, dtype)                                                # (V,)
    return params


def embed_forward(ids, params, config, offset=0):
    """x = sqrt(D) * embed[ids] + positions (sinusoidal or learned; RoPE and ALiBi act inside attention).

    ids int (B, T) at positions offset .. offset + T - 1. Returns x (B, T, D) and cache = {'embed', 'pos'}
    (training.embedding_forward's cache, learned_position_forward's or None).
    """
    table = params["embed"]
    xp = get_xp(table)
    T, D = ids.shape[1], table.shape[1]
    if offset + T > config["max_len"]:
        raise ValueError(f"positions must be < max_len = {config['max_len']}, got {T} tokens from position {offset}")
    x, embed_cache = embedding_forward(ids, table)                              # (B, T, D)
    x = x * table.dtype.type(math.sqrt(D))
    pos_cache = None
    if config["positions"] == "sinusoidal":
        x = x + sinusoidal_encoding(offset + T, D, dtype=table.dtype, xp=xp)[offset:]   # (T, D) broadcast
    elif config["positions"] == "learned" and offset == 0:
        x, pos_cache = learned_position_forward(x, params["pos"])                # adds pos[:T]
    elif config["positions"] == "learned":
        x = x + params["pos"][offset:offset + T]                                  # decoding: no backward
    return x, {"embed": embed_cache, "pos": pos_cache}


def embed_backward(dx, cache):
    """dembed (V, D) and dpos (max_len, D) or None, of x = sqrt(D) embed[ids] + pos[:T]."""
    dpos = None
    if cache["pos"] is not None:
        dx, dpos = learned_position_backward(dx, cache["pos"])
    return embedding_backward(dx * dx.dtype.type(math.sqrt(dx.shape[-1])), cache["embed"]), dpos


def _attention_options(config, T, xp, dtype):
    """Self-attention's positional options: (rope, ALiBi bias (H, T, T) or None)."""
    bias = None
    if config["positions"] == "alibi":
        bias = alibi_bias(config["n_heads"], T, T, dtype=dtype, xp=xp)              # (H, T, T)
    return config["positions"] == "rope", bias


def _padding_mask(ids, config):
    """(B, 1, 1, L) True at the keys that are not padding (broadcast over heads and queries), or None."""
    if config["pad_id"] is None:
        return None
    return (ids != config["pad_id"])[:, None, None, :]


_NORM = {"encoder": "enc_norm", "decoder": "dec_norm"}        # each stack's final norm (pre-LN only)


def _stack_forward(ids, params, config, stack, memory=None, memory_mask=None, dropout=0.0, rng=None):
    """Embed ids (B, L), run the layers of params[stack] ('encoder' or 'decoder'), then the final norm
    (pre-LN only). The 'decoder' stack is causal; given memory its layers also cross-attend to it.
    Returns h (B, L, D) and (the embedding's cache, the list of layer caches, the final norm's or None)."""
    norm_first, activation, H = config["norm_first"], config["activation"], config["n_heads"]
    x, embed_cache = embed_forward(ids, params, config)                          # (B, L, D)
    rope, bias = _attention_options(config, ids.shape[1], get_xp(x), x.dtype)
    mask = _padding_mask(ids, config)                                            # (B, 1, 1, L)
    layer_caches = []
    for layer in params[stack]:
        if memory is not None:
            x, layer_cache = decoder_layer_forward(x, memory, layer, H, memory_mask, norm_first, activation,
                                                   tgt_mask=mask, rope=rope, bias=bias, dropout=dropout, rng=rng)
        else:
            x, layer_cache = encoder_layer_forward(x, layer, H, mask, norm_first, activation,
                                                   causal=stack == "decoder", rope=rope, bias=bias,
                                                   dropout=dropout, rng=rng)
        layer_caches.append(layer_cache)                                         # x: (B, L, D)
    norm_cache = None
    if norm_first:
        x, norm_cache = layer_norm_forward(x, params[_NORM[stack]]["gamma"], params[_NORM[stack]]["beta"])
    return x, (embed_cache, layer_caches, norm_cache)


def _stack_backward(dh, cache, stack, grads):
    """Backward of _stack_forward from the model's cache: puts the layers' and the final norm's gradients
    into grads; returns dx (B, L, D) at the embedding's output and dmemory (B, S, D) (0 without memory)."""
    if cache[_NORM[stack]] is not None:
        dh, dgamma, dbeta = layer_norm_backward(dh, cache[_NORM[stack]])
        grads[_NORM[stack]] = {"gamma": dgamma, "beta": dbeta}
    layer_grads, dmemory = [], 0
    for layer_cache in reversed(cache[stack]):
        if "cross_attn" in layer_cache:
            dh, dmemory_layer, g = decoder_layer_backward(dh, layer_cache)
            dmemory = dmemory + dmemory_layer                  # the memory feeds every decoder layer: sum them
        else:
            dh, g = encoder_layer_backward(dh, layer_cache)
        layer_grads.append(g)
    grads[stack] = layer_grads[::-1]
    return dh, dmemory


def _output_forward(h, params, config):
    """logits = h W_out + b_out, with W_out = embed^T when tied. Returns logits (B, L, V), cache = {'h'}."""
    W_out = params["embed"].T if config["tied"] else params["W_out"]              # (D, V)
    return h @ W_out + params["b_out"], {"h": h}


def _output_backward(dlogits, cache, params, config, grads):
    """dh (B, L, D) of _output_forward, and the tied table's gradient from this use (None when untied);
    puts W_out's and b_out's gradients into grads."""
    h = cache["h"]
    dlogits_rows = dlogits.reshape(-1, dlogits.shape[-1])                        # (B*L, V)
    dW_out = h.reshape(-1, h.shape[-1]).T @ dlogits_rows                         # (D, V)
    grads["b_out"] = dlogits_rows.sum(axis=0)                                    # (V,)
    if config["tied"]:                                         # W_out = embed^T, so dembed = dW_out^T
        return dlogits @ params["embed"], dW_out.T                               # (B, L, D), (V, D)
    grads["W_out"] = dW_out
    return dlogits @ params["W_out"].T, None                                     # (B, L, D)


def transformer_forward(params, config, tokens, src=None, dropout=0.0, rng=None):
    """Logits (B, T, V) of the model in config['kind'].

    tokens int (B, T): BERT's input, GPT's input, or the encoder-decoder's target shifted right.
    src int (B, S): the encoder-decoder's source (required there, refused elsewhere).
    Padding (config['pad_id']) is masked as a key everywhere: in self-attention, and for source padding in
    cross-attention. Returns logits and a cache keyed like params: 'encoder' / 'decoder' (lists of layer
    caches), 'enc_norm' / 'dec_norm' (None for post-LN), 'embed' ({stack: its embedding's cache}), 'out',
    and 'config', 'params'. The per-head weights (B, H, T, S) of layer i are
    cache[stack][i]['attn']['attn']['weights'] (self-attention) or [i]['cross_attn']['attn']['weights'].
    """
    config = check_config(config)
    _check_tokens(tokens, src, params, config)
    cache = {"config": config, "params": params, "embed": {}}
    memory = memory_mask = None
    if config["kind"] == "encoder-decoder":                    # the encoder reads the source once
        memory, (cache["embed"]["encoder"], cache["encoder"], cache["enc_norm"]) = _stack_forward(
            src, params, config, "encoder", dropout=dropout, rng=rng)            # (B, S, D)
        memory_mask = _padding_mask(src, config)                                 # (B, 1, 1, S)
    stack = "encoder" if config["kind"] == "encoder" else "decoder"
    h, (cache["embed"][stack], cache[stack], cache[_NORM[stack]]) = _stack_forward(
        tokens, params, config, stack, memory, memory_mask, dropout, rng)        # (B, T, D)
    logits, cache["out"] = _output_forward(h, params, config)                    # (B, T, V)
    return logits, cache


def transformer_backward(dlogits, cache):
    """The gradient tree of transformer_forward (the params' keys), given dlogits (B, T, V)."""
    config, params = cache["config"], cache["params"]
    h = cache["out"]["h"]
    check_upstream("dlogits", dlogits, h.shape[:-1] + params["b_out"].shape, h.dtype)
    grads = {}
    dh, dembed_output = _output_backward(dlogits, cache["out"], params, config, grads)   # (B, T, D)
    stack = "encoder" if config["kind"] == "encoder" else "decoder"
    dx, dmemory = _stack_backward(dh, cache, stack, grads)                       # (B, T, D), (B, S, D) or 0
    dembed, dpos = embed_backward(dx, cache["embed"][stack])
    if config["kind"] == "encoder-decoder":                    # back through the encoder to the source tokens
        dx_src, _ = _stack_backward(dmemory, cache, "encoder", grads)            # (B, S, D)
        dembed_src, dpos_src = embed_backward(dx_src, cache["embed"]["encoder"])
        # Source and target read one table (and one position table): their gradients add.
        dembed = dembed + dembed_src
        dpos = None if dpos is None else dpos + dpos_src
    if dembed_output is not None:
        dembed = dembed + dembed_output                        # tied: the table is also the output projection
    grads["embed"] = dembed
    if dpos is not None:
        grads["pos"] = dpos
    return {key: grads[key] for key in params}


def lm_loss_forward(params, config, tokens, targets, src=None, label_smoothing=0.0, dropout=0.0, rng=None):
    """Mean cross-entropy of the logits against targets (B, T); targets = -100 are ignored (training.py).

    Returns loss (a float) and cache for lm_loss_backward.
    """
    logits, model_cache = transformer_forward(params, config, tokens, src, dropout, rng)
    loss, loss_cache = cross_entropy_forward(logits, targets, ignore_index=-100, label_smoothing=label_smoothing)
    return loss, {"model": model_cache, "loss": loss_cache}


def lm_loss_backward(dloss, cache):
    """The gradient tree of lm_loss_forward's loss with respect to params."""
    return transformer_backward(cross_entropy_backward(dloss, cache["loss"]), cache["model"])


def mask_tokens(tokens, rng, V, mask_id, p=0.15, keep_ids=()):
    """BERT's masked-token corruption: returns (inputs, targets), both int (B, T).

    Each position is chosen with probability p (never a position whose id is in keep_ids, e.g. padding);
    a chosen position's target is its token (others get -100, ignored by the loss), and its input
    becomes mask_id with probability 0.8, a random token with 0.1, and stays itself with 0.1. Random
    tokens are drawn from the ids not in keep_ids (so a random [PAD] cannot appear; BERT drew from all).
    rng is a numpy Generator; tokens are NumPy ids (data preparation happens on the host).
    """
    chosen = (rng.random(tokens.shape) < p) & ~np.isin(tokens, keep_ids)         # (B, T)
    targets = np.where(chosen, tokens, -100)
    roll = rng.random(tokens.shape)                                              # which corruption
    inputs = np.where(chosen & (roll < 0.8), mask_id, tokens)
    candidates = np.setdiff1d(np.arange(V), keep_ids)                            # ids a random token may take
    random_tokens = candidates[rng.integers(0, len(candidates), tokens.shape)]
    inputs = np.where(chosen & (roll >= 0.8) & (roll < 0.9), random_tokens, inputs)
    return inputs, targets


# ----------------------------------------------------------------------------------------------------
# Generation with a key/value cache


def _project_heads(x, params, name, n_heads):
    """split_heads(x W + b) for name 'q', 'k' or 'v' of a multihead params dict: (B, L, D) -> (B, H, L, Dh)."""
    return split_heads(x @ params[f"W_{name}"] + params[f"b_{name}"], n_heads)


def _cached_attention(z, params, kv, config, n_cached, keep):
    """Self-attention of new tokens z (B, n, D), at positions n_cached .. n_cached + n - 1, against every
    token so far. kv holds the earlier tokens' keys and values {'k', 'v'} (B, H, n_cached, Dh), after RoPE,
    and 'keep' (B, 1, 1, n_cached), which of them are not padding; it is extended with the new tokens'.
    keep: (B, 1, 1, n) for the new tokens, or None without a pad_id."""
    xp, H = get_xp(z), config["n_heads"]
    q, k, v = (_project_heads(z, params, name, H) for name in "qkv")           # (B, H, n, Dh) each
    if config["positions"] == "rope":                          # rotate by the tokens' true positions
        q, _ = rope_forward(q, offset=n_cached)
        k, _ = rope_forward(k, offset=n_cached)
    kv["k"] = k if n_cached == 0 else xp.concatenate([kv["k"], k], axis=2)       # (B, H, S, Dh), S = n_cached + n
    kv["v"] = v if n_cached == 0 else xp.concatenate([kv["v"], v], axis=2)       # (B, H, S, Dh)
    if keep is not None:                                       # padding stays masked as a key, as in training
        kv["keep"] = keep if n_cached == 0 else xp.concatenate([kv["keep"], keep], axis=3)   # (B, 1, 1, S)
    n, S = z.shape[1], kv["k"].shape[2]
    bias = alibi_bias(H, n, S, dtype=z.dtype, xp=xp) if config["positions"] == "alibi" else None   # (H, n, S)
    # Causal, bottom-right aligned: new query i (position S - n + i) sees keys 0 .. S - n + i.
    heads, _ = attention_forward(q, kv["k"], kv["v"], mask=kv.get("keep"), causal=True, bias=bias)  # (B, H, n, Dh)
    return merge_heads(heads) @ params["W_o"] + params["b_o"], None                 # (B, n, D), no cache


def _cached_cross_attention(z, params, memory_kv, memory_mask, n_heads):
    """Cross-attention of new tokens z (B, n, D) to the memory's keys and values, projected once:
    memory_kv = {'k', 'v'} (B, H, S, Dh)."""
    q = _project_heads(z, params, "q", n_heads)                                   # (B, H, n, Dh)
    heads, _ = attention_forward(q, memory_kv["k"], memory_kv["v"], mask=memory_mask)   # (B, H, n, Dh)
    return merge_heads(heads) @ params["W_o"] + params["b_o"], None                 # (B, n, D)


def _layer_step(x, layer, kv, config, n_cached, keep, memory_kv=None, memory_mask=None):
    """A layer's forward for the new tokens x (B, n, D) only, reading and extending its cache kv."""
    def sublayer(x, norm_key, f):                              # the same residual rule as in training
        return _sublayer_forward(x, layer[norm_key], f, config["norm_first"], 0.0, None)[0]

    x = sublayer(x, "ln1", lambda z: _cached_attention(z, layer["attn"], kv, config, n_cached, keep))
    if "cross_attn" in layer:
        x = sublayer(x, "ln2", lambda z: _cached_cross_attention(z, layer["cross_attn"], memory_kv, memory_mask,
                                                                 config["n_heads"]))
    ff_norm = "ln3" if "cross_attn" in layer else "ln2"
    return sublayer(x, ff_norm, lambda z: feed_forward_forward(z, layer["ff"], config["activation"]))


def generate(params, config, prompt, n_new, src=None, temperature=0.0, rng=None, use_cache=True):
    """Continue prompt (B, T0) by n_new tokens, greedily (temperature 0) or by sampling softmax(logits / temp).

    For 'decoder' (GPT) and 'encoder-decoder' (prompt = the start symbol, src = the source). use_cache=True
    keeps every layer's keys and values, so each step runs one new row through the stack (the memory's keys
    and values too are projected once); use_cache=False recomputes the whole sequence every step (the
    reference the cache must equal). rng, for sampling, is a Generator of the params' array module
    (numpy.random.default_rng or cupy.random.default_rng).
    Returns tokens (B, T0 + n_new) and the logits of each new token (B, n_new, V).
    """
    config = check_config(config)
    if config["kind"] == "encoder":
        raise ValueError("generate needs config['kind'] 'decoder' or 'encoder-decoder', got 'encoder'")
    _check_tokens(prompt, src, params, config, name="prompt")
    if isinstance(n_new, bool) or not isinstance(n_new, (int, np.integer)) or n_new < 0:
        raise ValueError(f"n_new must be a non-negative integer, got {n_new!r}")
    if not isinstance(temperature, numbers.Real) or not temperature >= 0 or (temperature > 0 and rng is None):
        raise ValueError(f"temperature must be 0 (greedy) or > 0 with an rng, got {temperature!r}, rng={rng!r}")
    xp, H = get_xp(params["embed"]), config["n_heads"]
    tokens, all_logits = prompt, []
    kvs = [{} for _ in params["decoder"]]                      # one key/value cache per layer
    memory_kvs, memory_mask = [None] * len(params["decoder"]), None
    if use_cache and config["kind"] == "encoder-decoder":      # encode once, project the memory once per layer
        memory = _stack_forward(src, params, config, "encoder")[0]               # (B, S, D)
        memory_mask = _padding_mask(src, config)                                 # (B, 1, 1, S)
        memory_kvs = [{name: _project_heads(memory, layer["cross_attn"], name, H) for name in "kv"}
                      for layer in params["decoder"]]
    n_cached = 0                                               # tokens whose keys and values are cached
    for _ in range(n_new):
        if use_cache:
            new_tokens = tokens[:, n_cached:]                  # the whole prompt first, then one token
            x, _ = embed_forward(new_tokens, params, config, offset=n_cached)    # (B, n, D)
            keep = _padding_mask(new_tokens, config)
            for layer, kv, memory_kv in zip(params["decoder"], kvs, memory_kvs):
                x = _layer_step(x, layer, kv, config, n_cached, keep, memory_kv, memory_mask)
            n_cached = tokens.shape[1]
            h = x[:, -1:]                                                          # (B, 1, D) the newest token
            if config["norm_first"]:
                h = layer_norm_forward(h, params["dec_norm"]["gamma"], params["dec_norm"]["beta"])[0]
            logits = _output_forward(h, params, config)[0][:, 0]                   # (B, V)
        else:
            logits = transformer_forward(params, config, tokens, src)[0][:, -1]    # (B, V)
        all_logits.append(logits)
        if temperature == 0:
            next_token = logits.argmax(axis=-1)                # (B,)
        else:
            scaled = logits / logits.dtype.type(temperature)                       # (B, V)
            probs = xp.exp(scaled - scaled.max(axis=-1, keepdims=True))
            probs = probs / probs.sum(axis=-1, keepdims=True)                      # (B, V) softmax
            below = xp.cumsum(probs, axis=-1) < rng.random((probs.shape[0], 1))    # inverse CDF: count entries below u
            next_token = xp.minimum(below.sum(axis=-1), probs.shape[-1] - 1)
        tokens = xp.concatenate([tokens, next_token[:, None].astype(tokens.dtype)], axis=1)
    if not all_logits:                                         # n_new = 0
        return tokens, xp.zeros(prompt.shape[:1] + (0, config["V"]), params["embed"].dtype)
    return tokens, xp.stack(all_logits, axis=1)


# ----------------------------------------------------------------------------------------------------
# Input checks (below the math they guard)

CONFIG_DEFAULTS = {"kind": "decoder", "n_heads": 4, "F": None, "n_layers": 2, "max_len": 64,
                   "positions": "learned", "norm_first": True, "activation": "gelu", "tied": False,
                   "pad_id": None}


def check_config(config):
    """Return config with defaults filled in (F = 4 D) and every field checked; raise naming the field."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    unknown = set(config) - set(CONFIG_DEFAULTS) - {"V", "D"}
    if unknown:
        raise ValueError(f"config has unknown fields {sorted(unknown)}; known: {sorted(CONFIG_DEFAULTS)} + V, D")
    missing = {"V", "D"} - set(config)
    if missing:
        raise ValueError(f"config must give {sorted(missing)} (vocabulary size, model width)")
    config = {**CONFIG_DEFAULTS, **config}
    if config["F"] is None:
        config["F"] = 4 * config["D"]
    for name in ("V", "D", "n_heads", "F", "n_layers", "max_len"):
        _check_positive_int(f"config['{name}']", config[name])
    for name, options in (("kind", KINDS), ("positions", POSITIONS), ("activation", ACTIVATIONS)):
        if config[name] not in options:
            raise ValueError(f"config['{name}'] must be one of {options}, got {config[name]!r}")
    for name in ("norm_first", "tied"):
        if not isinstance(config[name], bool):
            raise TypeError(f"config['{name}'] must be True or False, got {config[name]!r}")
    if config["D"] % config["n_heads"]:
        raise ValueError(f"config['D'] = {config['D']} must be divisible by config['n_heads'] = {config['n_heads']}")
    if config["positions"] == "rope" and (config["D"] // config["n_heads"]) % 2:
        raise ValueError(f"positions 'rope' needs an even head width D / n_heads, got {config['D'] // config['n_heads']}")
    pad = config["pad_id"]
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or not 0 <= pad < config["V"]):
        raise ValueError(f"config['pad_id'] must be None or an id in [0, {config['V']}), got {pad!r}")
    return config


def _check_tokens(tokens, src, params, config, name="tokens"):
    V = config["V"]
    if params["embed"].shape != (V, config["D"]):
        raise ValueError(f"params['embed'] must have shape ({V}, {config['D']}) for this config, "
                         f"got {params['embed'].shape}")
    check_ids(name, tokens, V)
    if config["kind"] == "encoder-decoder":
        if src is None:
            raise ValueError("src must be given for config['kind'] 'encoder-decoder' (the source ids (B, S))")
        check_ids("src", src, V)
        if src.shape[0] != tokens.shape[0]:
            raise ValueError(f"src must have batch size {tokens.shape[0]} like {name}, got shape {src.shape}")
    elif src is not None:
        raise ValueError(f"src must be None for config['kind'] {config['kind']!r} (it has no encoder-decoder)")
    longest = max(tokens.shape[1], 0 if src is None else src.shape[1])
    if longest > config["max_len"]:
        raise ValueError(f"sequences must be at most config['max_len'] = {config['max_len']} long, got {longest}")


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_float(name, x):
    if not hasattr(x, "dtype") or x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got {getattr(x, 'dtype', type(x).__name__)}")


def _check_layer_norm(x, gamma, beta):
    _check_float("x", x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {x.shape}")
    for name, p in (("gamma", gamma), ("beta", beta)):
        _check_float(name, p)
        if p.shape != x.shape[-1:]:
            raise ValueError(f"{name} must have shape ({x.shape[-1]},) to match x {x.shape}, got {p.shape}")
        if p.dtype != x.dtype:
            raise TypeError(f"{name} must have dtype {x.dtype} like x, got {p.dtype}")


def _check_feed_forward(x, params):
    _check_float("x", x)
    if not isinstance(params, dict) or set(params) != {"W_1", "b_1", "W_2", "b_2"}:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params must be a dict with keys ['W_1', 'b_1', 'W_2', 'b_2'], got {got}")
    D, F = x.shape[-1], getattr(params["b_1"], "shape", (None,))[0]
    for name, need in (("W_1", (D, F)), ("b_1", (F,)), ("W_2", (F, D)), ("b_2", (D,))):
        got = getattr(params[name], "shape", type(params[name]).__name__)
        if got != need:
            raise ValueError(f"params['{name}'] must have shape {need} for x {x.shape} and F = {F}, got {got}")
        if params[name].dtype != x.dtype:
            raise TypeError(f"params['{name}'] must have dtype {x.dtype} like x, got {params[name].dtype}")


def _check_dout(dout, like):
    check_upstream("dout", dout, like.shape, like.dtype)


def _check_layer_options(x, params, keys, n_heads, norm_first, activation):
    _check_float("x", x)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, T, D), got {x.shape}")
    if not isinstance(params, dict) or set(params) != set(keys):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params must be a dict with keys {list(keys)} (see init_*_layer), got {got}")
    if not isinstance(norm_first, bool):
        raise TypeError(f"norm_first must be True or False, got {norm_first!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check_positive_int("n_heads", n_heads)


# ----------------------------------------------------------------------------------------------------
# Demo: an encoder-decoder learns to reverse sequences


def reversal_batch(rng, B, L, n_symbols):
    """src (B, L) random symbols 2 .. n_symbols + 1; decoder input (B, L) = BOS + reversed[:-1];
    targets (B, L) = reversed. Ids 0 and 1 are PAD and BOS."""
    src = rng.integers(2, n_symbols + 2, (B, L))
    reversed_src = src[:, ::-1]
    decoder_input = np.concatenate([np.ones((B, 1), src.dtype), reversed_src[:, :-1]], axis=1)   # BOS first
    return src, decoder_input, np.ascontiguousarray(reversed_src)


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")   # small matrices: a second BLAS thread would only wait (spinning)
    import argparse
    import os
    import time

    from training import adam_init, adam_step, clip_gradients, lr_schedule, weight_decay_mask

    parser = argparse.ArgumentParser(description="Train an encoder-decoder transformer to reverse sequences.")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--figures", default=".", help="folder for the two figures, if matplotlib is there "
                        "(figures/make_figures.py writes the README's)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    L, n_symbols, B = 8, 10, 64
    config = {"kind": "encoder-decoder", "V": n_symbols + 2, "D": 64, "n_heads": 4, "F": 128, "n_layers": 2,
              "max_len": L, "positions": "sinusoidal", "norm_first": True, "activation": "gelu", "pad_id": 0}
    params = init_transformer(config, rng, np.float32)
    state, decay = adam_init(params), weight_decay_mask(params)
    test_src, _, test_targets = reversal_batch(np.random.default_rng(1), 1000, L, n_symbols)   # held out

    def exact_match(n=1000):
        bos = np.ones((n, 1), np.int64)
        out, _ = generate(params, config, bos, L, src=test_src[:n])             # greedy, with the KV cache
        return float((out[:, 1:] == test_targets[:n]).all(axis=1).mean()), out[:, 1:]

    print(f"Reverse {L} symbols of {n_symbols}: an encoder-decoder transformer, D={config['D']}, "
          f"{config['n_layers']}+{config['n_layers']} layers, pre-LN, GELU, sinusoidal positions")
    print(f"chance of guessing a whole sequence: {n_symbols ** -L:.0e}")
    start, curve = time.perf_counter(), []
    for step in range(args.steps + 1):
        src, decoder_input, targets = reversal_batch(rng, B, L, n_symbols)
        loss, cache = lm_loss_forward(params, config, decoder_input, targets, src=src)
        grads, norm = clip_gradients(lm_loss_backward(1.0, cache), max_norm=1.0)
        lr = lr_schedule(step + 1, 3e-3, warmup_steps=50, total_steps=args.steps + 1, min_lr=1e-4)
        params, state = adam_step(params, grads, state, lr=lr, weight_decay=0.01, decay=decay)
        if step % 50 == 0:
            accuracy = exact_match(200)[0]
            curve.append((step, loss, accuracy))
            print(f"  step {step:4d}  loss {loss:.4f}  held-out exact match {accuracy:.3f}  "
                  f"({time.perf_counter() - start:.0f} s)")
    accuracy, decoded = exact_match()
    print(f"held-out exact-match accuracy on 1000 sequences: {accuracy:.3f}")
    for i in range(3):
        print(f"  {test_src[i]} -> {decoded[i]}")
    assert accuracy >= 0.99, f"the model should reverse at least 99% of held-out sequences, got {accuracy}"

    # Where does output position t look? The cross-attention of the last decoder layer, heads averaged.
    bos_and_output = np.concatenate([np.ones((1, 1), np.int64), test_targets[:1, :-1]], axis=1)
    _, cache = transformer_forward(params, config, bos_and_output, src=test_src[:1])
    cross = cache["decoder"][-1]["cross_attn"]["attn"]["weights"][0].mean(axis=0)         # (T, S)
    anti_diagonal = cross[np.arange(L), L - 1 - np.arange(L)]
    print(f"cross-attention mass on the mirrored source position: {anti_diagonal.mean():.2f} (1/S = {1 / L:.2f})")
    assert anti_diagonal.mean() > 0.5, "output t should attend mostly to source position L - 1 - t"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no figures)")
    else:
        os.makedirs(args.figures, exist_ok=True)
        fig, ax = plt.subplots(figsize=(4, 3.6))
        ax.imshow(cross, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(L), [str(s) for s in test_src[0]])
        ax.set_yticks(range(L), [str(s) for s in test_targets[0]])
        ax.set_xlabel("source symbol (key)")
        ax.set_ylabel("output symbol (query)")
        ax.set_title("cross-attention, last decoder layer")
        fig.tight_layout()
        fig.savefig(os.path.join(args.figures, "transformer_cross_attention.png"), dpi=100)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        steps, losses, accuracies = zip(*curve)
        ax.plot(steps, losses, "o-", label="training loss (nats/token)")
        ax.plot(steps, accuracies, "s-", label="held-out exact match")
        ax.set_xlabel("step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.figures, "transformer_learning_curve.png"), dpi=100)
        print(f"figures saved to {args.figures}/transformer_cross_attention.png and transformer_learning_curve.png")

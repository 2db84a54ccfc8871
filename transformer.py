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
Each model: token embedding x = sqrt(D) embed[ids] (the paper's section 3.4); positions (config['positions']:
'sinusoidal' or 'learned', added to the embedding; 'rope' rotating q and k in self-attention; 'alibi' biasing
self-attention's scores; 'none'); the layers; a final LayerNorm for pre-LN (post-LN ends every layer with one;
torch.nn.Transformer adds a final norm either way); the output layer logits = h W_out + b_out, with
W_out = embed^T when `tied` (Press & Wolf, arXiv:1608.05859; the tied table's gradient is the sum of its two
uses). A fresh model's loss is ln V, a uniform guess: its logits start small (init_transformer says why).

Generation keeps a key/value cache: each layer's self-attention keys and values of the tokens so far
(after RoPE), so a new token costs one query row, at position = the cache length for every positional
scheme; the bottom-right causal alignment (attention.py) lets it see every cached key. Cross-attention's
keys and values of the memory are computed once. Dropout (Srivastava et al. 2014), when asked for, acts
where torch.nn.TransformerEncoderLayer's does: on each sublayer's output before the residual add, and
after the FFN's activation (not on attention weights). With dropout 0 the layers equal torch's
(batch_first=True) in outputs and every gradient.

Shapes: B batch, T length of the sequence a stack reads (queries), S length of what is attended to (keys:
the source, i.e. the memory; in cached generation, the tokens so far), D model width, H heads, Dh = D / H,
F FFN width, V vocabulary; config['n_layers'] layers per stack.
Masks are boolean, True = may attend (the opposite of PyTorch's boolean src_mask).

Imports attention.py, positional.py, multihead.py (which imports those two), training.py (token embedding,
cross-entropy, the shared input checks) and erf.py (erfc for the exact GELU): copy these six files together.
Runs on NumPy or CuPy arrays unchanged. Demo: python transformer.py (an encoder-decoder learns to reverse
sequences; figures/make_figures.py draws its learning curve and cross-attention from the same functions).
"""
import math
import numbers

import numpy as np

from attention import attention_forward, check_flag, check_float_array, get_xp, softmax
from erf import erfc
from multihead import (PARAM_NAMES, init_multihead, linear_backward, linear_forward, merge_heads, multihead_backward,
                       multihead_forward, split_heads)
from positional import (alibi_bias, init_learned_positions, learned_position_backward,
                        learned_position_forward, rope_forward, sinusoidal_encoding)
from training import (check_cache, check_ids, check_positive_int, check_rng, check_tree, check_upstream,
                      cross_entropy_backward, cross_entropy_forward, describe, embedding_backward, embedding_forward,
                      tree_leaves)

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "none")
KINDS = ("encoder-decoder", "encoder", "decoder")


# ----------------------------------------------------------------------------------------------------
# Layer normalization

def init_layer_norm(D, dtype=np.float32):
    """{'gamma': ones (D,), 'beta': zeros (D,)}: the identity map on normalised inputs, as PyTorch starts."""
    check_positive_int("D", D)
    return {"gamma": np.ones(D, dtype), "beta": np.zeros(D, dtype)}


def layer_norm_forward(x, gamma, beta, eps=1e-5):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta over the last axis: x (..., D), gamma and beta (D,).

    The mean is subtracted before squaring (E[x^2] - E[x]^2 loses every digit when |mean| >> std).
    Returns y (..., D) and cache = {'xhat', 'gamma', 'rstd'}.
    """
    _check_layer_norm(x, gamma, beta, eps)
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
    check_cache(cache, "layer_norm_forward", {"xhat", "gamma", "rstd"})
    xhat, gamma, rstd = cache["xhat"], cache["gamma"], cache["rstd"]
    check_upstream("dout", dout, xhat.shape, xhat.dtype)
    lead = tuple(range(dout.ndim - 1))                         # every axis but the feature axis
    dbeta = dout.sum(axis=lead)                                # (D,)
    dgamma = (dout * xhat).sum(axis=lead)                      # (D,)
    g = dout * gamma                                           # (..., D) gradient wrt xhat
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - xhat * (g * xhat).mean(axis=-1, keepdims=True))   # (..., D)
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------------------------------------
# Activations: ReLU, exact GELU (erf from erf.py), GELU's tanh approximation

def activation_forward(x, activation="gelu"):
    """out = act(x) for activation 'relu' (max(x, 0)), 'gelu' (x Phi(x), exact) or 'gelu_tanh' (GPT-2's).

    Phi(x) = erfc(-x / sqrt 2) / 2, the normal CDF, written with erfc so that far in the negative tail Phi
    keeps its relative accuracy. Returns out, cache = {'x', 'activation', 'phi', 't'} (phi for gelu, t for tanh).
    """
    check_float_array("x", x, "(...)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    xp = get_xp(x)
    cache = {"x": x, "activation": activation, "phi": None, "t": None}
    if activation == "relu":
        return xp.maximum(x, 0), cache
    if activation == "gelu":
        cache["phi"] = 0.5 * erfc(-x / math.sqrt(2))             # Phi(x)
        return x * cache["phi"], cache
    cache["t"] = xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))   # x * x * x: NumPy's x**3 is slow
    return 0.5 * x * (1 + cache["t"]), cache


def activation_backward(dout, cache):
    """dx = dout * act'(x):
    relu: 1 where x > 0 (0 at x = 0, as PyTorch);  gelu: Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi);
    gelu_tanh: (1 + t)/2 + x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2,  t the tanh of the forward.
    """
    check_cache(cache, "activation_forward", {"x", "activation", "phi", "t"})
    x, activation = cache["x"], cache["activation"]
    check_upstream("dout", dout, x.shape, x.dtype)
    xp = get_xp(x)
    if activation == "relu":
        return dout * (x > 0)
    if activation == "gelu":
        pdf = xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))   # phi(x), the normal density
        return dout * (cache["phi"] + x * pdf)
    t = cache["t"]
    dinner = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)     # d/dx of tanh's argument
    return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dinner)


# ----------------------------------------------------------------------------------------------------
# Dropout

def dropout_forward(x, p, rng=None):
    """out = x * keep / (1 - p), keep ~ Bernoulli(1 - p) drawn from rng (inverted dropout).

    p = 0 is the identity, as at evaluation time. rng: a Generator of x's array module (numpy's or cupy's
    default_rng(seed)), so a seed fixes the mask. Returns out and cache = {'keep' (bool, or None), 'scale'}.
    """
    _check_dropout(x, p, rng)
    if p == 0:
        return x, {"keep": None, "scale": 1.0}
    keep = rng.random(x.shape) >= p                            # (...) True with probability 1 - p
    scale = 1.0 / (1.0 - p)
    return x * keep * x.dtype.type(scale), {"keep": keep, "scale": scale}


def dropout_backward(dout, cache):
    """dx = dout * keep / (1 - p): the same mask and scale as the forward."""
    check_cache(cache, "dropout_forward", {"keep", "scale"})
    if cache["keep"] is None:
        return dout
    return dout * cache["keep"] * dout.dtype.type(cache["scale"])


# ----------------------------------------------------------------------------------------------------
# Position-wise feed-forward network

def init_feed_forward(D, F, rng, dtype=np.float32):
    """{'W_1' (D, F), 'b_1' (F,), 'W_2' (F, D), 'b_2' (D,)}, drawn as torch.nn.Linear draws them:
    W and b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    check_positive_int("D", D)
    check_positive_int("F", F)
    check_rng(rng)
    a1, a2 = 1 / math.sqrt(D), 1 / math.sqrt(F)
    return {"W_1": rng.uniform(-a1, a1, (D, F)).astype(dtype), "b_1": rng.uniform(-a1, a1, F).astype(dtype),
            "W_2": rng.uniform(-a2, a2, (F, D)).astype(dtype), "b_2": rng.uniform(-a2, a2, D).astype(dtype)}


def feed_forward_forward(x, params, activation="gelu", dropout=0.0, rng=None):
    """out = drop(act(x W_1 + b_1)) W_2 + b_2, applied to every position alone (two linear layers).

    x (B, T, D). Returns out (B, T, D) and cache = {'linear_1', 'act', 'drop', 'linear_2'}: its steps' caches.
    """
    _check_feed_forward(x, params)
    pre, linear_1 = linear_forward(x, params["W_1"], params["b_1"])            # (B, T, F)
    hidden, act_cache = activation_forward(pre, activation)                    # (B, T, F)
    hidden, drop_cache = dropout_forward(hidden, dropout, rng)                 # (B, T, F)
    out, linear_2 = linear_forward(hidden, params["W_2"], params["b_2"])       # (B, T, D)
    return out, {"linear_1": linear_1, "act": act_cache, "drop": drop_cache, "linear_2": linear_2}


def feed_forward_backward(dout, cache):
    """dx (B, T, D) and grads {'W_1','b_1','W_2','b_2'} of feed_forward_forward: its steps in reverse,
    each linear layer through multihead.linear_backward (dx = dy W^T, dW = x^T dy, db = sum dy)."""
    check_cache(cache, "feed_forward_forward", {"linear_1", "act", "drop", "linear_2"})
    x = cache["linear_1"]["x"]
    check_upstream("dout", dout, x.shape, x.dtype)
    dhidden, dW_2, db_2 = linear_backward(dout, cache["linear_2"])             # (B, T, F)
    dhidden = dropout_backward(dhidden, cache["drop"])                         # (B, T, F)
    dpre = activation_backward(dhidden, cache["act"])                          # (B, T, F)
    dx, dW_1, db_1 = linear_backward(dpre, cache["linear_1"])                  # (B, T, D)
    return dx, {"W_1": dW_1, "b_1": db_1, "W_2": dW_2, "b_2": db_2}


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


def _sublayer_forward(x, f, params, key, n, norm_first, dropout, rng):
    """Sublayer n of a layer: f = the part params[key] computes, with norm 'ln{n}' and dropout 'drop{n}':

        pre-LN:  out = x + drop(f(LN(x)))          post-LN:  out = LN(x + drop(f(x)))

    f(z) -> (f(z), f's cache). Returns out (B, T, D) and a cache keyed like the layer's params:
    {key: f's cache, 'ln{n}': the norm's, 'drop{n}': the dropout's}.
    """
    norm = params[f"ln{n}"]
    if norm_first:
        z, norm_cache = layer_norm_forward(x, norm["gamma"], norm["beta"])       # (B, T, D)
        update, f_cache = f(z)                                                   # (B, T, D)
        update, drop_cache = dropout_forward(update, dropout, rng)
        out = x + update
    else:
        update, f_cache = f(x)                                                   # (B, T, D)
        update, drop_cache = dropout_forward(update, dropout, rng)
        out, norm_cache = layer_norm_forward(x + update, norm["gamma"], norm["beta"])   # (B, T, D)
    return out, {key: f_cache, f"ln{n}": norm_cache, f"drop{n}": drop_cache}


def _sublayer_backward(dout, cache, key, n):
    """Backward of _sublayer_forward, from the layer's cache: dx (x feeds the residual and f: the sum of both
    paths), the sublayer's grads {key: f's, 'ln{n}': the norm's} and dmemory (or None)."""
    dsum = dout                                                # at the sum x + drop(f(.)): pre-LN's out
    if not cache["norm_first"]:                                # post-LN: out = LN(x + drop(f(x)))
        dsum, dgamma, dbeta = layer_norm_backward(dout, cache[f"ln{n}"])
    dupdate = dropout_backward(dsum, cache[f"drop{n}"])                          # (B, T, D)
    dmemory = None
    if key == "ff":
        dx_f, f_grads = feed_forward_backward(dupdate, cache[key])
    elif key == "attn":                                        # self-attention: z was fed as x_q and as x_kv,
        dx_q, dx_kv, f_grads = multihead_backward(dupdate, cache[key])
        dx_f = dx_q + dx_kv                                    # so its gradient is the sum of the two
    else:                                                      # cross-attention: x_kv is the memory
        dx_f, dmemory, f_grads = multihead_backward(dupdate, cache[key])
    if cache["norm_first"]:                                    # f read LN(x), not x
        dx_f, dgamma, dbeta = layer_norm_backward(dx_f, cache[f"ln{n}"])
    dx = dsum + dx_f                                           # residual path + path through f
    return dx, {key: f_grads, f"ln{n}": {"gamma": dgamma, "beta": dbeta}}, dmemory


def encoder_layer_forward(x, params, n_heads, mask=None, norm_first=True, activation="gelu", causal=False,
                          rope=False, bias=None, dropout=0.0, rng=None):
    """One encoder layer (module docstring): self-attention sublayer, then feed-forward sublayer.

    x (B, T, D). mask: bool broadcastable to (B, H, T, T), True = may attend (padding: (B, 1, 1, T)).
    causal=True makes it a GPT block. rope / bias (ALiBi (H, T, T)) go to the self-attention; dropout > 0 needs rng.
    Returns out (B, T, D) and cache = {'attn' (multihead's), 'ln1', 'drop1', 'ff', 'ln2', 'drop2', 'norm_first'},
    keyed like params; the per-head attention weights (B, H, T, T) are cache['attn']['attn']['weights'].
    """
    _check_layer(x, params, norm_first)

    def attention(z):
        return multihead_forward(z, z, params["attn"], n_heads, mask=mask, causal=causal, rope=rope, bias=bias)

    def feed_forward(z):
        return feed_forward_forward(z, params["ff"], activation, dropout, rng)

    h, attn_cache = _sublayer_forward(x, attention, params, "attn", 1, norm_first, dropout, rng)    # (B, T, D)
    out, ff_cache = _sublayer_forward(h, feed_forward, params, "ff", 2, norm_first, dropout, rng)   # (B, T, D)
    return out, {**attn_cache, **ff_cache, "norm_first": norm_first}


def encoder_layer_backward(dout, cache):
    """dx (B, T, D) and grads (the params' keys) of encoder_layer_forward: its two sublayers in reverse."""
    check_cache(cache, "encoder_layer_forward", {"attn", "ln1", "drop1", "ff", "ln2", "drop2", "norm_first"})
    dh, ff_grads, _ = _sublayer_backward(dout, cache, "ff", 2)                  # (B, T, D)
    dx, attn_grads, _ = _sublayer_backward(dh, cache, "attn", 1)                 # (B, T, D)
    return dx, {**attn_grads, **ff_grads}                      # keys in the params' order


def decoder_layer_forward(y, memory, params, n_heads, memory_mask=None, norm_first=True, activation="gelu",
                          tgt_mask=None, rope=False, bias=None, dropout=0.0, rng=None):
    """One decoder layer: causal self-attention, cross-attention to memory, feed-forward (module docstring).

    y (B, T, D) the target so far; memory (B, S, D) the encoder's output. Self-attention is always causal,
    AND-ed with tgt_mask (e.g. a (B, 1, 1, T) padding mask); memory_mask (bool, broadcastable to
    (B, H, T, S)) limits cross-attention (e.g. source padding). rope / bias act on self-attention only.
    Returns out (B, T, D) and cache = {'attn', 'ln1', 'drop1', 'cross_attn', 'ln2', 'drop2', 'ff', 'ln3',
    'drop3', 'norm_first'}; the cross-attention weights (B, H, T, S) are cache['cross_attn']['attn']['weights'].
    """
    _check_layer(y, params, norm_first, memory, name="y")

    def attention(z):
        return multihead_forward(z, z, params["attn"], n_heads, mask=tgt_mask, causal=True, rope=rope, bias=bias)

    def cross_attention(z):
        return multihead_forward(z, memory, params["cross_attn"], n_heads, mask=memory_mask)

    def feed_forward(z):
        return feed_forward_forward(z, params["ff"], activation, dropout, rng)

    h1, attn_cache = _sublayer_forward(y, attention, params, "attn", 1, norm_first, dropout, rng)           # (B, T, D)
    h2, cross_cache = _sublayer_forward(h1, cross_attention, params, "cross_attn", 2, norm_first, dropout, rng)
    out, ff_cache = _sublayer_forward(h2, feed_forward, params, "ff", 3, norm_first, dropout, rng)          # (B, T, D)
    return out, {**attn_cache, **cross_cache, **ff_cache, "norm_first": norm_first}


def decoder_layer_backward(dout, cache):
    """dy (B, T, D), dmemory (B, S, D) and grads of decoder_layer_forward, sublayers in reverse."""
    check_cache(cache, "decoder_layer_forward", {"attn", "ln1", "drop1", "cross_attn", "ln2", "drop2", "ff", "ln3",
                                                 "drop3", "norm_first"})
    dh2, ff_grads, _ = _sublayer_backward(dout, cache, "ff", 3)                     # (B, T, D)
    dh1, cross_grads, dmemory = _sublayer_backward(dh2, cache, "cross_attn", 2)     # dmemory (B, S, D)
    dy, attn_grads, _ = _sublayer_backward(dh1, cache, "attn", 1)                   # (B, T, D)
    return dy, dmemory, {**attn_grads, **cross_grads, **ff_grads}


# ----------------------------------------------------------------------------------------------------
# Whole models: embedding and positions, stacks, output projection

_NORM = {"encoder": "enc_norm", "decoder": "dec_norm"}        # each stack's final norm (pre-LN only)


def init_transformer(config, rng, dtype=np.float32):
    """Parameters of one of the three shapes, from config (check_config: kind, V, D, n_heads, F, n_layers,
    max_len, positions, norm_first, activation, tied, pad_id). Returns {'embed' (V, D), 'pos' (max_len, D)
    if learned, 'encoder': [encoder layers], 'decoder': [decoder layers, or causal encoder-shaped blocks for
    'decoder'], their final norms 'enc_norm', 'dec_norm' (pre-LN only), 'W_out' (D, V) unless tied, 'b_out' (V,)}.

    A fresh model's loss is ln V (a uniform guess) because its logits start small: logit v is
    LN(h) . w_v with |LN(h)| <= sqrt(D) (gamma = 1, beta = 0, b_out = 0), at most sqrt(D) |w_v| (Cauchy-Schwarz).
    - Untied: W_out ~ U(-1/sqrt(D), 1/sqrt(D)) (torch.nn.Linear): logits of std 1/sqrt(3). The embedding
      is drawn N(0, 1/D) and multiplied by sqrt(D) (the paper's section 3.4): tokens enter at unit scale.
    - Tied: w_v is a token's own embedding, and h is mostly the input token's, so the bound is nearly met:
      drawn N(0, 1/D), a token's own logit would be sqrt(D) (8 at D = 64: far above ln V for small V).
      The tied table is drawn N(0, 1/D^2): every logit is at most about 1, tokens enter with norm about 1.
    """
    config = check_config(config)
    check_rng(rng)
    if dtype is None or np.dtype(dtype).kind != "f":                 # None would silently mean float64
        raise TypeError(f"dtype must be a floating-point dtype such as numpy.float32, got {dtype!r}")
    V, D, F, n_layers = config["V"], config["D"], config["F"], config["n_layers"]
    std = 1 / D if config["tied"] else 1 / math.sqrt(D)       # tied: the output reuses it (docstring)
    params = {"embed": (rng.standard_normal((V, D)) * std).astype(dtype)}              # (V, D)
    if config["positions"] == "learned":
        params["pos"] = init_learned_positions(config["max_len"], D, rng, dtype)        # (max_len, D)
    for stack in ("encoder", "decoder"):
        if config["kind"] in (stack, "encoder-decoder"):       # the stacks this kind has
            cross = stack == "decoder" and config["kind"] == "encoder-decoder"   # decoder layers read a memory
            init_layer = init_decoder_layer if cross else init_encoder_layer
            params[stack] = [init_layer(D, F, rng, dtype) for _ in range(n_layers)]
            if config["norm_first"]:
                params[_NORM[stack]] = init_layer_norm(D, dtype)
    if not config["tied"]:
        params["W_out"] = rng.uniform(-1 / math.sqrt(D), 1 / math.sqrt(D), (D, V)).astype(dtype)  # (D, V)
    params["b_out"] = np.zeros(V, dtype)                                                # (V,)
    return params


def embed_forward(ids, params, config, offset=0):
    """x = sqrt(D) * embed[ids] + positions (sinusoidal or learned; RoPE and ALiBi act inside attention).

    ids int (B, T) at positions offset .. offset + T - 1. Returns x (B, T, D) and cache = {'embed', 'pos'}
    (training.embedding_forward's cache, learned_position_forward's or None).
    """
    config = check_config(config)
    shapes = {key: shape for key, shape in _param_shapes(config).items() if key in ("embed", "pos")}
    check_tree("params", {key: params.get(key) for key in shapes}, shapes)     # the tables used here
    table, T, D = params["embed"], ids.shape[1], config["D"]                   # table (V, D)
    if offset + T > config["max_len"]:
        raise ValueError(f"positions must be < max_len = {config['max_len']}, got {T} tokens from position {offset}")
    x, embed_cache = embedding_forward(ids, table)                              # (B, T, D)
    x = x * table.dtype.type(math.sqrt(D))
    pos_cache = None
    if config["positions"] == "sinusoidal":
        x = x + sinusoidal_encoding(offset + T, D, dtype=table.dtype, xp=get_xp(table))[offset:]   # (T, D) broadcast
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


def _padding_mask(ids, config):
    """(B, 1, 1, T) True at the keys that are not padding (broadcast over heads and queries), or None."""
    return None if config["pad_id"] is None else (ids != config["pad_id"])[:, None, None, :]


def _stack_forward(ids, params, config, stack, memory=None, memory_mask=None, dropout=0.0, rng=None):
    """Embed ids (B, T), run the layers of params[stack] (causal for 'decoder'; cross-attending to memory if
    given), then the final norm (pre-LN). Returns h (B, T, D) and cache {'embed', 'layers', 'norm' (or None)}."""
    norm_first, activation, H = config["norm_first"], config["activation"], config["n_heads"]
    x, embed_cache = embed_forward(ids, params, config)                          # (B, T, D)
    rope, T = config["positions"] == "rope", ids.shape[1]
    bias = alibi_bias(H, T, T, dtype=x.dtype, xp=get_xp(x)) if config["positions"] == "alibi" else None  # (H, T, T)
    mask = _padding_mask(ids, config)                                            # (B, 1, 1, T)
    cache = {"embed": embed_cache, "layers": [], "norm": None}
    for layer in params[stack]:
        if memory is not None:
            x, layer_cache = decoder_layer_forward(x, memory, layer, H, memory_mask, norm_first, activation,
                                                   tgt_mask=mask, rope=rope, bias=bias, dropout=dropout, rng=rng)
        else:
            x, layer_cache = encoder_layer_forward(x, layer, H, mask, norm_first, activation, causal=stack == "decoder",
                                                   rope=rope, bias=bias, dropout=dropout, rng=rng)
        cache["layers"].append(layer_cache)                                      # x: (B, T, D)
    if norm_first:
        norm = params[_NORM[stack]]
        x, cache["norm"] = layer_norm_forward(x, norm["gamma"], norm["beta"])   # (B, T, D)
    return x, cache


def _stack_backward(dh, cache, stack):
    """Backward of _stack_forward, given dh (B, T, D): dx (B, T, D) at the embedding's output, the grads
    {stack: [layer grads], and the final norm's if pre-LN} and dmemory (B, S, D) (0 without memory)."""
    grads = {}
    if cache["norm"] is not None:
        dh, dgamma, dbeta = layer_norm_backward(dh, cache["norm"])
        grads[_NORM[stack]] = {"gamma": dgamma, "beta": dbeta}
    layer_grads, dmemory = [], 0
    for layer_cache in reversed(cache["layers"]):
        if "cross_attn" in layer_cache:
            dh, dmemory_layer, g = decoder_layer_backward(dh, layer_cache)
            dmemory = dmemory + dmemory_layer                  # the memory feeds every decoder layer: sum them
        else:
            dh, g = encoder_layer_backward(dh, layer_cache)
        layer_grads.append(g)
    grads[stack] = layer_grads[::-1]
    return dh, grads, dmemory


def _output_forward(h, params, config):
    """logits (B, T, V) = h W_out + b_out, W_out = embed^T when tied; and linear_forward's cache."""
    W_out = params["embed"].T if config["tied"] else params["W_out"]              # (D, V)
    return linear_forward(h, W_out, params["b_out"])


def transformer_forward(tokens, params, config, src=None, dropout=0.0, rng=None):
    """Logits (B, T, V) of the model in config['kind'].

    tokens int (B, T): BERT's input, GPT's input, or the encoder-decoder's target shifted right.
    src int (B, S): the encoder-decoder's source (required there, refused elsewhere).
    Padding (config['pad_id']) is masked as a key everywhere (self-attention, and cross-attention to the source).
    Returns logits and cache = {'config', 'params', 'encoder', 'decoder', 'out'}: each stack's cache {'embed',
    'layers' (the layer caches, with the attention weights), 'norm'} (None if the kind lacks it), the output's.
    """
    config = _check_model_inputs(tokens, src, params, config)
    cache = {"config": config, "params": params, "encoder": None, "decoder": None}
    memory = memory_mask = None
    if config["kind"] == "encoder-decoder":                    # the encoder reads the source once
        memory, cache["encoder"] = _stack_forward(src, params, config, "encoder", dropout=dropout, rng=rng)  # (B, S, D)
        memory_mask = _padding_mask(src, config)                                 # (B, 1, 1, S)
    stack = "encoder" if config["kind"] == "encoder" else "decoder"
    h, cache[stack] = _stack_forward(tokens, params, config, stack, memory, memory_mask, dropout, rng)   # (B, T, D)
    logits, cache["out"] = _output_forward(h, params, config)                    # (B, T, V)
    return logits, cache


def transformer_backward(dlogits, cache):
    """The gradient tree of transformer_forward (the params' keys), given dlogits (B, T, V)."""
    check_cache(cache, "transformer_forward", {"config", "params", "encoder", "decoder", "out"})
    config, params, h = cache["config"], cache["params"], cache["out"]["x"]
    check_upstream("dlogits", dlogits, h.shape[:-1] + params["b_out"].shape, h.dtype)
    dh, dW_out, db_out = linear_backward(dlogits, cache["out"])                 # (B, T, D), (D, V), (V,)
    grads = {"b_out": db_out} if config["tied"] else {"W_out": dW_out, "b_out": db_out}
    stack = "encoder" if config["kind"] == "encoder" else "decoder"
    dx, stack_grads, dmemory = _stack_backward(dh, cache[stack], stack)          # (B, T, D), (B, S, D) or 0
    grads.update(stack_grads)
    dembed, dpos = embed_backward(dx, cache[stack]["embed"])
    if config["kind"] == "encoder-decoder":                    # back through the encoder to the source tokens
        dx_src, encoder_grads, _ = _stack_backward(dmemory, cache["encoder"], "encoder")   # (B, S, D)
        grads.update(encoder_grads)
        dembed_src, dpos_src = embed_backward(dx_src, cache["encoder"]["embed"])
        # Source and target read one table (and one position table): their gradients add.
        dembed = dembed + dembed_src
        dpos = None if dpos is None else dpos + dpos_src
    if config["tied"]:                                         # W_out = embed^T: the table's second use adds dW_out^T
        dembed = dembed + dW_out.T
    grads.update(embed=dembed, pos=dpos)                       # dpos is None without learned positions
    return {key: grads[key] for key in params}                 # in the params' order, without a None pos


def lm_loss_forward(tokens, targets, params, config, src=None, label_smoothing=0.0, dropout=0.0, rng=None):
    """Mean cross-entropy (a float) of the logits against targets (B, T), -100 ignored (training.py); and a cache."""
    logits, model_cache = transformer_forward(tokens, params, config, src, dropout, rng)
    loss, loss_cache = cross_entropy_forward(logits, targets, ignore_index=-100, label_smoothing=label_smoothing)
    return loss, {"model": model_cache, "loss": loss_cache}


def lm_loss_backward(dloss, cache):
    """The gradient tree of lm_loss_forward's loss with respect to params."""
    check_cache(cache, "lm_loss_forward", {"model", "loss"})
    return transformer_backward(cross_entropy_backward(dloss, cache["loss"]), cache["model"])


def mask_tokens(tokens, rng, V, mask_id, p=0.15, keep_ids=()):
    """BERT's masked-token corruption (module docstring), each position chosen with probability p: returns
    (inputs, targets), both int (B, T). A chosen position's target is its token (others -100, ignored by the
    loss). Ids in keep_ids (e.g. padding) are never chosen nor drawn as the random token (BERT drew from all).
    rng: a numpy Generator; tokens: NumPy ids (data preparation happens on the host)."""
    _check_mask_tokens(tokens, rng, V, mask_id, p, keep_ids)
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
    """split_heads(x W + b) for name 'q', 'k' or 'v' of a multihead params dict: (B, T, D) -> (B, H, T, Dh)."""
    return split_heads(linear_forward(x, params[f"W_{name}"], params[f"b_{name}"])[0], n_heads)


def _cached_attention(z, params, kv, config, n_cached, keep):
    """Self-attention of new tokens z (B, n, D), at positions n_cached .. n_cached + n - 1, to every token so
    far. kv holds the earlier tokens' keys and values {'k', 'v'} (B, H, n_cached, Dh), after RoPE, and which
    are not padding, 'keep' (B, 1, 1, n_cached); the new tokens' (keep (B, 1, 1, n) or None) are appended."""
    xp, H = get_xp(z), config["n_heads"]
    q, k, v = (_project_heads(z, params, name, H) for name in "qkv")           # (B, H, n, Dh) each
    if config["positions"] == "rope":                          # rotate by the tokens' true positions
        q, k = rope_forward(q, offset=n_cached)[0], rope_forward(k, offset=n_cached)[0]
    kv["k"] = k if n_cached == 0 else xp.concatenate([kv["k"], k], axis=2)       # (B, H, S, Dh), S = n_cached + n
    kv["v"] = v if n_cached == 0 else xp.concatenate([kv["v"], v], axis=2)       # (B, H, S, Dh)
    if keep is not None:                                       # padding stays masked as a key, as in training
        kv["keep"] = keep if n_cached == 0 else xp.concatenate([kv["keep"], keep], axis=3)   # (B, 1, 1, S)
    n, S = z.shape[1], kv["k"].shape[2]
    bias = alibi_bias(H, n, S, dtype=z.dtype, xp=xp) if config["positions"] == "alibi" else None   # (H, n, S)
    # Causal, bottom-right aligned: new query i (position S - n + i) sees keys 0 .. S - n + i.
    heads, _ = attention_forward(q, kv["k"], kv["v"], mask=kv.get("keep"), causal=True, bias=bias)  # (B, H, n, Dh)
    return linear_forward(merge_heads(heads), params["W_o"], params["b_o"])[0], None  # (B, n, D), no cache


def _layer_step(x, layer, kv, config, n_cached, keep, memory_kv=None, memory_mask=None):
    """A layer's forward for the new tokens x (B, n, D) only, reading and extending its cache kv; the same
    residual sublayers as in training (_sublayer_forward), without dropout."""
    norm_first, H = config["norm_first"], config["n_heads"]

    def attention(z):
        return _cached_attention(z, layer["attn"], kv, config, n_cached, keep)

    def cross_attention(z):                                    # to the memory's keys and values, projected once
        q = _project_heads(z, layer["cross_attn"], "q", H)                                 # (B, H, n, Dh)
        heads, _ = attention_forward(q, memory_kv["k"], memory_kv["v"], mask=memory_mask)  # (B, H, n, Dh)
        return linear_forward(merge_heads(heads), layer["cross_attn"]["W_o"], layer["cross_attn"]["b_o"])[0], None

    def feed_forward(z):
        return feed_forward_forward(z, layer["ff"], config["activation"])

    x = _sublayer_forward(x, attention, layer, "attn", 1, norm_first, 0.0, None)[0]            # (B, n, D)
    if "cross_attn" not in layer:
        return _sublayer_forward(x, feed_forward, layer, "ff", 2, norm_first, 0.0, None)[0]
    x = _sublayer_forward(x, cross_attention, layer, "cross_attn", 2, norm_first, 0.0, None)[0]
    return _sublayer_forward(x, feed_forward, layer, "ff", 3, norm_first, 0.0, None)[0]


def generate(prompt, n_new, params, config, src=None, temperature=0.0, rng=None, use_cache=True):
    """Continue prompt (B, T0) by n_new tokens, greedily (temperature 0) or by sampling softmax(logits / temp).

    For 'decoder' (GPT) and 'encoder-decoder' (prompt = the start symbol, src = the source). use_cache=False
    recomputes the whole sequence every step (the reference the key/value cache must equal). rng, for
    sampling, is a Generator of the params' array module (numpy.random.default_rng or cupy.random.default_rng).
    Returns tokens (B, T0 + n_new) and the logits of each new token (B, n_new, V).
    """
    config = _check_generate(prompt, n_new, params, config, src, temperature, rng)
    xp, H = get_xp(params["embed"]), config["n_heads"]
    tokens, all_logits = prompt, xp.zeros((len(prompt), n_new, config["V"]), params["embed"].dtype)  # (B, n_new, V)
    kvs = [{} for _ in params["decoder"]]                      # one key/value cache per layer
    memory_kvs, memory_mask = [None] * len(params["decoder"]), None
    if use_cache and config["kind"] == "encoder-decoder":      # encode once, project the memory once per layer
        memory = _stack_forward(src, params, config, "encoder")[0]               # (B, S, D)
        memory_mask = _padding_mask(src, config)                                 # (B, 1, 1, S)
        memory_kvs = [{name: _project_heads(memory, layer["cross_attn"], name, H) for name in "kv"}
                      for layer in params["decoder"]]
    n_cached = 0                                               # tokens whose keys and values are cached
    for step in range(n_new):
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
            logits = transformer_forward(tokens, params, config, src)[0][:, -1]    # (B, V)
        all_logits[:, step] = logits
        if temperature == 0:
            next_token = logits.argmax(axis=-1)                # (B,)
        else:
            probs = softmax(logits / logits.dtype.type(temperature))               # (B, V)
            below = xp.cumsum(probs, axis=-1) < rng.random((probs.shape[0], 1))    # inverse CDF: count entries below u
            next_token = xp.minimum(below.sum(axis=-1), probs.shape[-1] - 1)
        tokens = xp.concatenate([tokens, next_token[:, None].astype(tokens.dtype)], axis=1)
    return tokens, all_logits


# ----------------------------------------------------------------------------------------------------
# Input checks (below the math they guard)

CONFIG_DEFAULTS = {"kind": "decoder", "n_heads": 4, "F": None, "n_layers": 2, "max_len": 64, "positions": "learned",
                   "norm_first": True, "activation": "gelu", "tied": False, "pad_id": None}


def check_config(config):
    """Return config with defaults filled in (F = 4 D) and every field checked; raise naming the field."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {describe(config)}")
    unknown = set(config) - set(CONFIG_DEFAULTS) - {"V", "D"}
    if unknown:
        raise ValueError(f"config has unknown fields {sorted(unknown)}; known: {sorted(CONFIG_DEFAULTS)} + V, D")
    if not {"V", "D"} <= set(config):
        raise ValueError(f"config must give V and D (vocabulary size, model width), got {sorted(config)}")
    config = {**CONFIG_DEFAULTS, **config}
    if config["F"] is None:
        config["F"] = 4 * config["D"]
    for name in ("V", "D", "n_heads", "F", "n_layers", "max_len"):
        check_positive_int(f"config['{name}']", config[name])
    for name, options in (("kind", KINDS), ("positions", POSITIONS), ("activation", ACTIVATIONS)):
        if config[name] not in options:
            raise ValueError(f"config['{name}'] must be one of {options}, got {config[name]!r}")
    for name in ("norm_first", "tied"):
        check_flag(f"config['{name}']", config[name])
    D, H, V, pad = config["D"], config["n_heads"], config["V"], config["pad_id"]
    if D % H:
        raise ValueError(f"config['D'] = {D} must be divisible by config['n_heads'] = {H}")
    if config["positions"] == "rope" and (D // H) % 2:
        raise ValueError(f"positions 'rope' needs an even head width D / n_heads, got {D // H}")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or not 0 <= pad < V):
        raise ValueError(f"config['pad_id'] must be None or an id in [0, {V}), got {pad!r}")
    return config


def _layer_shapes(D, F, cross):
    """The shape tree of init_encoder_layer(D, F) (cross=False) or init_decoder_layer(D, F) (cross=True)."""
    attn = {name: (D, D) if name[0] == "W" else (D,) for name in PARAM_NAMES}
    norm = {"gamma": (D,), "beta": (D,)}
    ff = {"W_1": (D, F), "b_1": (F,), "W_2": (F, D), "b_2": (D,)}
    if cross:
        return {"attn": attn, "ln1": norm, "cross_attn": attn, "ln2": norm, "ff": ff, "ln3": norm}
    return {"attn": attn, "ln1": norm, "ff": ff, "ln2": norm}


def _param_shapes(config):
    """The shape tree init_transformer(config) builds: what a params tree must match for this config."""
    V, D, F, n_layers = config["V"], config["D"], config["F"], config["n_layers"]
    shapes = {"embed": (V, D), "b_out": (V,)}
    if config["positions"] == "learned":
        shapes["pos"] = (config["max_len"], D)
    for stack in ("encoder", "decoder"):
        if config["kind"] in (stack, "encoder-decoder"):
            cross = stack == "decoder" and config["kind"] == "encoder-decoder"
            shapes[stack] = [_layer_shapes(D, F, cross) for _ in range(n_layers)]
            if config["norm_first"]:
                shapes[_NORM[stack]] = {"gamma": (D,), "beta": (D,)}
    if not config["tied"]:
        shapes["W_out"] = (D, V)
    return shapes


def _check_params(params, shapes, dtype=None, name="params"):
    """params must match the shape tree exactly (check_tree names the first bad leaf), in one dtype."""
    check_tree(name, params, shapes)
    dtype = tree_leaves(params)[0].dtype if dtype is None else dtype
    for leaf in tree_leaves(params):
        if leaf.dtype != dtype:
            raise TypeError(f"{name} must hold arrays of one dtype, {dtype}, got a {describe(leaf)}")


def _check_model_inputs(tokens, src, params, config, name="tokens"):
    """Check config, params against config, and the ids; return the config with its defaults."""
    config = check_config(config)
    _check_params(params, _param_shapes(config))
    check_ids(name, tokens, config["V"])
    if config["kind"] == "encoder-decoder":
        if src is None:
            raise ValueError("src must be given for config['kind'] 'encoder-decoder' (the source ids (B, S))")
        check_ids("src", src, config["V"])
        if src.shape[0] != tokens.shape[0]:
            raise ValueError(f"src must have batch size {tokens.shape[0]} like {name}, got shape {src.shape}")
    elif src is not None:
        raise ValueError(f"src must be None for config['kind'] {config['kind']!r} (it has no encoder-decoder)")
    longest = max(tokens.shape[1], 0 if src is None else src.shape[1])
    if longest > config["max_len"]:
        raise ValueError(f"sequences must be at most config['max_len'] = {config['max_len']} long, got {longest}")
    return config


def _check_generate(prompt, n_new, params, config, src, temperature, rng):
    config = _check_model_inputs(prompt, src, params, config, name="prompt")
    if config["kind"] == "encoder":
        raise ValueError("generate needs config['kind'] 'decoder' or 'encoder-decoder', got 'encoder'")
    if prompt.shape[1] == 0:
        raise ValueError(f"prompt must hold at least one token per row (a start symbol), got shape {prompt.shape}")
    check_positive_int("n_new", n_new, minimum=0)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be 0 (greedy) or a finite number > 0, got {temperature!r}")
    if temperature > 0:
        _check_generator(rng, params["embed"], "params")
    return config


def _check_generator(rng, like, like_name):
    """rng must be a random Generator of like's array module (numpy.random.default_rng or cupy's)."""
    xp = get_xp(like)
    if xp is np:
        check_rng(rng)
    elif not isinstance(rng, xp.random.Generator):
        raise TypeError(f"rng must be a {xp.__name__}.random.Generator like {like_name}'s arrays, got {describe(rng)}")


def _check_layer_norm(x, gamma, beta, eps):
    check_float_array("x", x, "(..., D)")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {x.shape}")
    for name, p in (("gamma", gamma), ("beta", beta)):
        check_float_array(name, p, f"({x.shape[-1]},)", like=x, like_name="x")
        if p.shape != x.shape[-1:]:
            raise ValueError(f"{name} must have shape ({x.shape[-1]},) to match x {x.shape}, got {p.shape}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0 (it keeps sqrt(var + eps) away from 0), got {eps!r}")


def _check_dropout(x, p, rng):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0 <= p < 1):
        raise ValueError(f"dropout p must be in [0, 1), got {p!r}")
    if p > 0 and rng is None:
        raise ValueError(f"dropout p = {p} needs rng, a random Generator of x's array module, got None")
    if p > 0:
        _check_generator(rng, x, "x")


def _check_feed_forward(x, params):
    check_float_array("x", x, "(B, T, D)")
    if x.ndim < 1:
        raise ValueError(f"x must have shape (B, T, D), got {x.shape}")
    F = getattr(params.get("W_1"), "shape", (0, 0))[-1] if isinstance(params, dict) else 0
    _check_params(params, _layer_shapes(x.shape[-1], F, cross=False)["ff"], x.dtype)


def _check_layer(x, params, norm_first, memory=None, name="x"):
    check_float_array(name, x, "(B, T, D)")
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (B, T, D), got {x.shape}")
    ff = params.get("ff") if isinstance(params, dict) else None
    F = getattr(ff.get("W_1"), "shape", (0, 0))[-1] if isinstance(ff, dict) else 0
    _check_params(params, _layer_shapes(x.shape[-1], F, cross=memory is not None), x.dtype)
    if memory is not None:
        check_float_array("memory", memory, "(B, S, D)", like=x, like_name=name)
        if memory.ndim != 3 or memory.shape[0] != x.shape[0] or memory.shape[2] != x.shape[2]:
            raise ValueError(f"memory must have shape ({x.shape[0]}, S, {x.shape[2]}) to match {name} {x.shape}, "
                             f"got {memory.shape}")
    check_flag("norm_first", norm_first)       # multihead_forward checks n_heads, activation_forward the activation


def _check_mask_tokens(tokens, rng, V, mask_id, p, keep_ids):
    check_rng(rng)
    check_positive_int("V", V)
    check_ids("tokens", tokens, V)
    if isinstance(mask_id, bool) or not isinstance(mask_id, (int, np.integer)) or not 0 <= mask_id < V:
        raise ValueError(f"mask_id must be an id in [0, V = {V}), got {mask_id!r}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in keep_ids):
        raise TypeError(f"keep_ids must be a sequence of integer ids, got {keep_ids!r}")


# ----------------------------------------------------------------------------------------------------
# Demo: an encoder-decoder learns to reverse sequences (figures/make_figures.py draws its two figures)

def reversal_batch(rng, B, T, n_symbols):
    """src (B, T) random symbols 2 .. n_symbols + 1; decoder input (B, T) = BOS + reversed[:-1];
    targets (B, T) = reversed. Ids 0 and 1 are PAD and BOS."""
    src = rng.integers(2, n_symbols + 2, (B, T))
    reversed_src = src[:, ::-1]
    decoder_input = np.concatenate([np.ones((B, 1), src.dtype), reversed_src[:, :-1]], axis=1)   # BOS first
    return src, decoder_input, np.ascontiguousarray(reversed_src)


def reversal_exact_match(params, config, src, targets):
    """Greedy decoding (generate, KV cache) from BOS of each source row (N, S): the fraction of rows equal
    to targets (N, T), and the decoded rows (N, T)."""
    out, _ = generate(np.ones((len(src), 1), np.int64), targets.shape[1], params, config, src=src)
    return float((out[:, 1:] == targets).all(axis=1).mean()), out[:, 1:]


def train_reversal(steps=300, seed=0, every=50, T=8, n_symbols=10, B=64, report=None):
    """Train a pre-LN GELU encoder-decoder (D = 64, 2 + 2 layers) to reverse T symbols, `steps` steps of
    AdamW (warm-up, cosine decay, gradients clipped to 1). Every `every` steps (and at 0) it measures the
    exact match on 200 held-out sequences (drawn from seed 1) and calls report(step, loss, accuracy).
    Returns params, config and the curve, a list of (step, loss, accuracy)."""
    from training import adam_init, adam_step, clip_gradients, lr_schedule, weight_decay_mask
    rng = np.random.default_rng(seed)
    config = {"kind": "encoder-decoder", "V": n_symbols + 2, "D": 64, "n_heads": 4, "F": 128, "n_layers": 2,
              "max_len": T, "positions": "sinusoidal", "norm_first": True, "activation": "gelu", "pad_id": 0}
    params = init_transformer(config, rng, np.float32)
    state, decay = adam_init(params), weight_decay_mask(params)
    test_src, _, test_targets = reversal_batch(np.random.default_rng(1), 200, T, n_symbols)   # held out
    curve = []
    for step in range(steps + 1):
        src, decoder_input, targets = reversal_batch(rng, B, T, n_symbols)
        loss, cache = lm_loss_forward(decoder_input, targets, params, config, src=src)
        grads, _ = clip_gradients(lm_loss_backward(1.0, cache), max_norm=1.0)
        lr = lr_schedule(step + 1, 3e-3, warmup_steps=min(50, steps), total_steps=steps + 1, min_lr=1e-4)
        params, state = adam_step(params, grads, state, lr=lr, weight_decay=0.01, decay=decay)
        if step % every == 0:
            curve.append((step, loss, reversal_exact_match(params, config, test_src, test_targets)[0]))
            if report is not None:
                report(*curve[-1])
    return params, config, curve


def reversal_cross_attention(params, config, src, targets):
    """The last decoder layer's cross-attention (T, S), heads averaged, while the model writes targets (T,)
    for the source src (S,) (teacher forcing: BOS + targets[:-1] is the decoder's input)."""
    decoder_input = np.concatenate([[1], targets[:-1]])[None]                    # (1, T) BOS first
    _, cache = transformer_forward(decoder_input, params, config, src=src[None])
    return cache["decoder"]["layers"][-1]["cross_attn"]["attn"]["weights"][0].mean(axis=0)   # (T, S)


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")   # small matrices: a second BLAS thread would only wait (spinning)
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Train an encoder-decoder transformer to reverse sequences.")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    T, n_symbols, start = 8, 10, time.perf_counter()
    print(f"Reverse {T} symbols of {n_symbols}: an encoder-decoder transformer, D=64, 2+2 layers, pre-LN, GELU, "
          f"sinusoidal positions\nchance of guessing a whole sequence: {n_symbols ** -T:.0e}")
    params, config, curve = train_reversal(args.steps, T=T, n_symbols=n_symbols, report=lambda step, loss, accuracy:
                                           print(f"  step {step:4d}  loss {loss:.4f}  held-out exact match "
                                                 f"{accuracy:.3f}  ({time.perf_counter() - start:.0f} s)"))
    assert abs(curve[0][1] - math.log(config["V"])) < 0.5, "a fresh model's loss should be about ln V"
    test_src, _, test_targets = reversal_batch(np.random.default_rng(1), 1000, T, n_symbols)   # held out
    accuracy, decoded = reversal_exact_match(params, config, test_src, test_targets)
    print(f"held-out exact-match accuracy on 1000 sequences: {accuracy:.3f}")
    for i in range(3):
        print(f"  {test_src[i]} -> {decoded[i]}")
    assert accuracy >= 0.99, f"the model should reverse at least 99% of held-out sequences, got {accuracy}"
    # Where does output position t look? The cross-attention of the last decoder layer, heads averaged.
    cross = reversal_cross_attention(params, config, test_src[0], test_targets[0])            # (T, S)
    mirrored = cross[np.arange(T), T - 1 - np.arange(T)].mean()
    print(f"cross-attention mass on the mirrored source position: {mirrored:.2f} (1/S = {1 / T:.2f})")
    assert mirrored > 0.5, "output t should attend mostly to source position S - 1 - t"
    print("its figures: python figures/make_figures.py transformer_learning_curve transformer_cross_attention")

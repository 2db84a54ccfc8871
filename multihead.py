"""Multi-head attention, forward and backward by hand.

One attention compares queries and keys in one way. Multi-head attention projects the inputs into H
smaller query/key/value spaces ("heads"), runs attention in every head side by side, and mixes the
heads back together with an output projection, so that different heads can look for different things
(Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762, section 3.2.2):

    MultiHead(Q, K, V) = Concat(head_1, ..., head_H) W_O + b_O
    head_h             = Attention(Q W_Q^h + b_Q^h,  K W_K^h + b_K^h,  V W_V^h + b_V^h)
    Attention(q, k, v) = softmax(q k^T / sqrt(Dh) + bias, masked) v               (attention.py)

Q is x_q (the sequence asking), K = V = x_kv (the sequence attended to). Self-attention passes the same
array twice; cross-attention (a decoder reading an encoder's output) passes two different ones.
W_Q^h is the h-th block of Dh columns of W_Q (D, D), so all H projections are one (D, D) matmul and the
split into heads is a reshape, (B, T, D) -> (B, T, H, Dh) -> (B, H, T, Dh). The head axis is then just
another leading axis: all heads go through ONE batched call of attention_forward, no loop over heads.

Backward walks the same steps in reverse:

    dW_O = Concat^T dout,   db_O = sum(dout),   dConcat = dout W_O^T
    split dConcat into heads -> attention_backward -> dq, dk, dv per head
    (rope: rope_backward rotates dq, dk back) -> merge to (B, T, D) and (B, S, D)
    dW_Q = x_q^T dq,   db_Q = sum(dq),   dx_q = dq W_Q^T          (the same for K and V, from x_kv)
    dx_kv = dk W_K^T + dv W_V^T       x_kv feeds both k and v, so its two gradients add

The four projections are one building block, the linear layer y = x W + b (linear_forward /
linear_backward: dx = dy W^T, dW = x^T dy, db = sum dy), written once here; transformer.py's feed-forward
network and output layer use it too.

Self-attention feeds one tensor x into both x_q and x_kv; its gradient is dx_q + dx_kv, and the caller
adds them (one tensor feeding two places sums its gradients).

Positions (multi-head attention alone cannot tell token order; these options add it):
- rope=True rotates every head's q and k with RoPE (positional.rope_forward, RoFormer arXiv:2104.09864).
  Positions are aligned at the bottom-right like the causal mask: key j sits at position
  rope_offset + j and query t at rope_offset + (S - T) + t, so the last query and the last key share
  a position. rope_offset is the position of x_kv's first token (default 0): when x_q holds the last
  T tokens of x_kv (cached decoding, x_kv from the start of the sequence) the default gives every
  token its true position 0..S-1. A RoPE score depends only on the difference of the two positions,
  (t + S - T) - j here, so rope_offset shifts q and k alike and cancels from the output (up to
  rounding). Positions may not be negative, so with T > S it must be at least T - S.
- bias adds to every head's scores, e.g. positional.alibi_bias(H, T, S, dtype=x.dtype) (H, T, S)
  (ALiBi, Press et al., arXiv:2108.12409), which uses the same bottom-right alignment.

Shapes: B batch, T query length, S key/value length, D model width, H = n_heads heads, Dh = D / H.
Imports attention.py (attention_forward, attention_backward, and its input checks) and positional.py
(rope_forward, rope_backward; alibi_bias in the demo). Runs on NumPy or CuPy arrays unchanged.
Bad input raises ValueError or TypeError naming the argument, what it got and what it needs.
"""
import math

import numpy as np

from attention import (attention_backward, attention_forward, check_flag, check_float_array, check_size,
                       check_upstream, describe)
from positional import rope_backward, rope_forward

PARAM_NAMES = ("W_q", "b_q", "W_k", "b_k", "W_v", "b_v", "W_o", "b_o")
CACHE_FIELDS = ("q", "k", "v", "o", "n_heads", "attn", "rope_q", "rope_k")


# ----------------------------------------------------------------------------------------------------
# Parameters


def init_multihead(D, rng, dtype=np.float32):
    """Parameters of one multi-head attention layer, drawn as torch.nn.MultiheadAttention draws them.

    W_q, W_k, W_v ~ U(-a, a), a = sqrt(6 / (D + 3D)): Xavier/Glorot uniform over the stacked (3D, D)
                    in-projection (fan_in D, fan_out 3D), which torch initialises as one matrix.
    b_q, b_k, b_v = 0.
    W_o ~ U(-1/sqrt(D), 1/sqrt(D)): nn.Linear's default (kaiming_uniform with a = sqrt(5)).
    b_o = 0 (MultiheadAttention zeroes the output bias).
    Every W is (D, D) in row-vector layout (y = x @ W + b), every b is (D,).
    Returns NumPy arrays of `dtype`; for the GPU, move them with cupy.asarray.
    """
    check_size("D", D, 1)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (numpy.random.default_rng(seed)), got {describe(rng)}")
    if dtype is None or np.dtype(dtype).kind != "f":                   # None would silently mean float64
        raise TypeError(f"dtype must be a floating-point dtype such as numpy.float32, "
                        f"got {None if dtype is None else np.dtype(dtype)}")
    in_bound = math.sqrt(6.0 / (D + 3 * D))
    out_bound = 1.0 / math.sqrt(D)
    params = {}
    for name in ("q", "k", "v"):
        params[f"W_{name}"] = rng.uniform(-in_bound, in_bound, (D, D)).astype(dtype)   # (D, D)
        params[f"b_{name}"] = np.zeros(D, dtype)                                       # (D,)
    params["W_o"] = rng.uniform(-out_bound, out_bound, (D, D)).astype(dtype)           # (D, D)
    params["b_o"] = np.zeros(D, dtype)                                                 # (D,)
    return params


# ----------------------------------------------------------------------------------------------------
# Heads, and the linear maps around them


def split_heads(x, n_heads):
    """(B, T, D) -> (B, H, T, Dh): head h holds columns h*Dh .. (h+1)*Dh - 1 of the last axis."""
    B, T, D = x.shape
    return x.reshape(B, T, n_heads, D // n_heads).swapaxes(1, 2)


def merge_heads(x):
    """(B, H, T, Dh) -> (B, T, D), the inverse of split_heads (Concat(head_1, ..., head_H))."""
    B, H, T, Dh = x.shape
    return x.swapaxes(1, 2).reshape(B, T, H * Dh)


def linear_forward(x, W, b):
    """y = x W + b, the linear layer: x (..., K), W (K, N), b (N,) -> y (..., N).

    Every leading axis is a batch of rows, so the map runs as ONE 2-D product over all of them,
    x.reshape(-1, K) @ W: NumPy runs a (B, T, K) @ (K, N) product as B separate (T, K) @ (K, N) ones,
    slower than one (B*T, K) @ (K, N). Returns y and cache = {'x', 'W'}.
    """
    _check_linear(x, W, b)
    x_rows = x.reshape(-1, x.shape[-1])                        # (rows, K) every token is one row
    y_rows = x_rows @ W + b                                    # (rows, N)
    return y_rows.reshape(x.shape[:-1] + W.shape[1:]), {"x": x, "W": W}


def linear_backward(dy, cache):
    """dx = dy W^T,  dW = x^T dy,  db = sum of dy over every row (b was added to each row).

    dy (..., N). Returns dx (..., K), dW (K, N), db (N,), each from one 2-D product over the rows.
    """
    if not isinstance(cache, dict) or set(cache) != {"x", "W"}:
        raise TypeError(f"cache must be the dict linear_forward returned (keys ['W', 'x']), got {describe(cache)}")
    x, W = cache["x"], cache["W"]
    check_upstream("dy", dy, x, shape=x.shape[:-1] + W.shape[1:])
    x_rows = x.reshape(-1, W.shape[0])                         # (rows, K)
    dy_rows = dy.reshape(-1, W.shape[1])                       # (rows, N)
    dx = (dy_rows @ W.T).reshape(x.shape)                      # (..., K)
    return dx, x_rows.T @ dy_rows, dy_rows.sum(axis=0)         # (..., K), (K, N), (N,)


# ----------------------------------------------------------------------------------------------------
# Multi-head attention


def multihead_forward(x_q, x_kv, params, n_heads, mask=None, causal=False, rope=False, rope_offset=0,
                      bias=None):
    """out = Concat(head_1, ..., head_H) W_O + b_O,
    head_h = Attention(x_q W_Q^h + b_Q^h, x_kv W_K^h + b_K^h, x_kv W_V^h + b_V^h).

    x_q (B, T, D) the queries' sequence; x_kv (B, S, D) the sequence attended to (x_q again for
    self-attention). params: init_multihead's dict. n_heads: H, which must divide D.
    mask: bool, broadcastable to (B, H, T, S), True = may attend: a (B, 1, 1, S) padding mask, a (T, S)
      mask shared by every sequence and head, or a full (B, H, T, S) one (a per-sequence (B, T, S)
      mask needs its head axis, mask[:, None]: broadcasting aligns axes from the right).
    causal: query t may attend key j iff j <= t + (S - T) (attention.py's bottom-right alignment);
      AND-ed with mask.
    rope: True or False. Rotate each head's q and k with RoPE; key j at position rope_offset + j,
      query t at rope_offset + (S - T) + t (bottom-right, see the module docstring; the default
      rope_offset = 0 is right when x_q is the last T tokens of x_kv). Needs an even Dh, and an integer
      rope_offset >= max(0, T - S); without rope, rope_offset must stay 0 (it would do nothing).
    bias: float, broadcastable to (B, H, T, S), added to every head's scores; attention_forward casts
      it to x_q's dtype, so a float64 table cannot upcast float32 (ALiBi: positional.alibi_bias(H, T, S)).
    Returns out (B, T, D) and cache = {'q', 'k', 'v', 'o', 'n_heads', 'attn', 'rope_q', 'rope_k'}: the four
    projections' linear_forward caches ('o' holds the merged heads (B, T, D) it multiplied), attention_forward's
    cache under 'attn', and rope_forward's caches of q and k (None without rope).
    The per-head attention weights (B, H, T, S), for plots, are cache['attn']['weights'].
    """
    _check_inputs(x_q, x_kv, params, n_heads, rope, rope_offset)
    T, S = x_q.shape[1], x_kv.shape[1]
    cache = {"n_heads": n_heads, "rope_q": None, "rope_k": None}
    q, cache["q"] = linear_forward(x_q, params["W_q"], params["b_q"])  # (B, T, D)
    k, cache["k"] = linear_forward(x_kv, params["W_k"], params["b_k"])  # (B, S, D)
    v, cache["v"] = linear_forward(x_kv, params["W_v"], params["b_v"])  # (B, S, D)
    q, k, v = split_heads(q, n_heads), split_heads(k, n_heads), split_heads(v, n_heads)   # (B, H, T or S, Dh)
    if rope:
        q, cache["rope_q"] = rope_forward(q, offset=rope_offset + (S - T))   # (B, H, T, Dh) query t at offset+S-T+t
        k, cache["rope_k"] = rope_forward(k, offset=rope_offset)             # (B, H, S, Dh) key j at offset+j
    heads, cache["attn"] = attention_forward(q, k, v, mask=mask, causal=causal, bias=bias)  # (B, H, T, Dh)
    concat = merge_heads(heads)                                        # (B, T, D)
    out, cache["o"] = linear_forward(concat, params["W_o"], params["b_o"])   # (B, T, D)
    return out, cache


def multihead_backward(dout, cache):
    """dx_q (B, T, D), dx_kv (B, S, D), grads (params' keys) of multihead_forward, given dout (B, T, D).

    For self-attention (the same x passed as x_q and x_kv) the gradient of x is dx_q + dx_kv: one tensor
    feeding two places sums its gradients, and the caller adds them.
    """
    if not isinstance(cache, dict) or set(cache) != set(CACHE_FIELDS):
        raise TypeError(f"cache must be the dict multihead_forward returned, got {describe(cache)}")
    n_heads, x_q = cache["n_heads"], cache["q"]["x"]
    check_upstream("dout", dout, x_q)                                  # out has x_q's shape and dtype
    grads = {}
    # out = concat W_o + b_o
    dconcat, grads["W_o"], grads["b_o"] = linear_backward(dout, cache["o"])                  # (B, T, D)
    # concat = merge_heads(heads), heads = attention(q, k, v): one batched backward for all heads
    dheads = split_heads(dconcat, n_heads)                             # (B, H, T, Dh)
    dq, dk, dv = attention_backward(dheads, cache["attn"])             # dq (B, H, T, Dh), dk, dv (B, H, S, Dh)
    if cache["rope_q"] is not None:
        dq = rope_backward(dq, cache["rope_q"])                        # (B, H, T, Dh) rotate back
        dk = rope_backward(dk, cache["rope_k"])                        # (B, H, S, Dh)
    # q = x_q W_q + b_q, k = x_kv W_k + b_k, v = x_kv W_v + b_v (then split into heads)
    dx_q, grads["W_q"], grads["b_q"] = linear_backward(merge_heads(dq), cache["q"])        # (B, T, D)
    dx_k, grads["W_k"], grads["b_k"] = linear_backward(merge_heads(dk), cache["k"])        # (B, S, D)
    dx_v, grads["W_v"], grads["b_v"] = linear_backward(merge_heads(dv), cache["v"])        # (B, S, D)
    # x_kv feeds both k and v: its gradient is the sum of the two paths.
    dx_kv = dx_k + dx_v                                                # (B, S, D)
    return dx_q, dx_kv, {name: grads[name] for name in PARAM_NAMES}


# ----------------------------------------------------------------------------------------------------
# Input checks (below the math they guard; mask, bias and causal are attention_forward's to check)


def _check_inputs(x_q, x_kv, params, n_heads, rope, rope_offset):
    """Raise ValueError/TypeError naming the argument, what it got and what it needs."""
    check_float_array("x_q", x_q, "(B, T, D)")
    check_float_array("x_kv", x_kv, "(B, S, D)", like=x_q, like_name="x_q")
    for name, x in (("x_q", x_q), ("x_kv", x_kv)):
        if x.ndim != 3:
            raise ValueError(f"{name} must have shape (B, length, D), got {x.shape}")
    B, T, D = x_q.shape
    S = x_kv.shape[1]
    if D == 0:
        raise ValueError(f"x_q must have a width D >= 1 (shape (B, T, D)), got {x_q.shape}")
    if x_kv.shape[0] != B or x_kv.shape[2] != D:
        raise ValueError(f"x_kv must have shape ({B}, S, {D}) to match x_q {x_q.shape}, got {x_kv.shape}")
    check_size("n_heads", n_heads, 1)
    if D % n_heads:
        raise ValueError(f"D = {D} (x_q {x_q.shape}) must be divisible by n_heads = {n_heads}")
    check_flag("rope", rope)
    check_size("rope_offset", rope_offset, 0)
    if rope and (D // n_heads) % 2:
        raise ValueError(f"rope=True needs an even head width Dh = D / n_heads, "
                         f"got {D} / {n_heads} = {D // n_heads}")
    if rope and rope_offset < T - S:
        raise ValueError(f"rope_offset must be an integer >= max(0, T - S) = {max(0, T - S)} "
                         f"(query 0 sits at rope_offset + S - T and positions are >= 0), "
                         f"got {rope_offset!r} with T = {T}, S = {S}")
    if not rope and rope_offset != 0:
        raise ValueError(f"rope_offset must be 0 without rope=True (it places RoPE's positions), "
                         f"got {rope_offset!r}")
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict with keys {list(PARAM_NAMES)} (see init_multihead), "
                        f"got {describe(params)}")
    missing = [name for name in PARAM_NAMES if name not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; it needs {list(PARAM_NAMES)} (see init_multihead)")
    for name in PARAM_NAMES:
        need = (D, D) if name.startswith("W") else (D,)
        check_float_array(f"params['{name}']", params[name], str(need), like=x_q, like_name="x_q")
        if params[name].shape != need:
            raise ValueError(f"params['{name}'] must have shape {need} for D = {D}, got {params[name].shape}")


def _check_linear(x, W, b):
    check_float_array("x", x, "(..., K)")
    check_float_array("W", W, "(K, N)", like=x, like_name="x")
    check_float_array("b", b, "(N,)", like=x, like_name="x")
    if x.ndim < 1 or W.ndim != 2 or W.shape[0] != x.shape[-1]:
        raise ValueError(f"W must have shape ({x.shape[-1] if x.ndim else 'K'}, N) to multiply x {x.shape}, got {W.shape}")
    if b.shape != W.shape[1:]:
        raise ValueError(f"b must have shape ({W.shape[1]},) to match W {W.shape}, got {b.shape}")


# ----------------------------------------------------------------------------------------------------
# Demo


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")   # small matrices: a second BLAS thread would only wait (spinning)
    from positional import alibi_bias

    rng = np.random.default_rng(0)
    B, T, S, D, H = 2, 5, 7, 16, 4
    params = init_multihead(D, rng, dtype=np.float64)
    x = rng.standard_normal((B, T, D))                                 # (B, T, D) a decoder's tokens
    memory = rng.standard_normal((B, S, D))                            # (B, S, D) an encoder's output

    out, cache = multihead_forward(x, x, params, H, causal=True)
    print(f"causal self-attention: x {x.shape} -> out {out.shape}, "
          f"per-head weights {cache['attn']['weights'].shape} (B, H, T, S)")
    out, cache = multihead_forward(x, memory, params, H, rope=True)
    print(f"cross-attention with RoPE: x {x.shape} reads memory {memory.shape} -> out {out.shape}, "
          f"per-head weights {cache['attn']['weights'].shape}")
    out, cache = multihead_forward(x, x, params, H, causal=True, bias=alibi_bias(H, T, T, dtype=x.dtype))
    print("causal self-attention with ALiBi, head 0's weights (row = query, column = key):")
    print(np.array2string(cache["attn"]["weights"][0, 0], precision=2, suppress_small=True))

    dout = rng.standard_normal(out.shape)                              # (B, T, D) a random upstream gradient
    dx_q, dx_kv, grads = multihead_backward(dout, cache)
    # x is both x_q and x_kv: one tensor feeding two places sums its gradients.
    dx = dx_q + dx_kv                                                  # (B, T, D)
    direction = rng.standard_normal(x.shape)                           # (B, T, D)
    eps = 1e-6

    def loss(x_):
        bias = alibi_bias(H, T, T, dtype=x_.dtype)
        return float((multihead_forward(x_, x_, params, H, causal=True, bias=bias)[0] * dout).sum())

    slope = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
    print(f"slope of the loss along a random direction: finite differences {slope:.8f}, "
          f"<dx_q + dx_kv, u> {(dx * direction).sum():.8f}, <dx_q, u> alone {(dx_q * direction).sum():.8f}")
    assert abs(slope - (dx * direction).sum()) < 1e-6 * max(1.0, abs(slope))  # central differences: O(eps^2)
    assert abs(slope - (dx_q * direction).sum()) > 1e-3                       # dx_q alone is not the gradient
    print("dx_q + dx_kv is the gradient of self-attention; dx_q alone is not.")

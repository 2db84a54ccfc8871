"""Scaled dot-product attention, forward and backward by hand.

Each query asks "which keys look like me?", turns the answers into weights that sum to one, and returns
the weighted average of the values (Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762):

    scores  = Q K^T * scale + bias           scale = 1 / sqrt(Dk) by default          (..., T, S)
    scores  = -inf where the key may not be attended (mask False, or a future key when causal)
    weights = softmax(scores)                 over the key axis S, each allowed row sums to 1
    out     = weights V                                                                 (..., T, Dv)

Backward, with dweights the gradient flowing into `weights`:

    dV       = weights^T dout
    dweights = dout V^T
    dscores  = weights * (dweights - rowsum(dweights * weights))       (softmax backward)
    dQ       = dscores K * scale,     dK = dscores^T Q * scale

Masks are boolean and True means "may attend". Causal means query i may attend key j iff
j <= i + (S - T): aligned at the bottom-right, so the last query sees every key (with T < S the
queries are the newest T positions of a longer sequence, as in cached decoding). A query row with no
allowed key returns zeros and passes zero gradient, never NaN.

Shapes: q (..., T, Dk), k (..., S, Dk), v (..., S, Dv); any leading batch/head axes that broadcast.
Imports no project file. Runs on NumPy or CuPy arrays unchanged.
"""
import math

import numpy as np


def get_xp(*arrays):
    """The array module of the inputs: cupy for CuPy arrays, numpy otherwise.

    rnn.py, attention.py and positional.py each define this helper: they import no project file.
    """
    try:
        import cupy
    except ImportError:
        return np
    return cupy.get_array_module(*arrays)


# ----------------------------------------------------------------------------------------------------
# Softmax


def softmax(x, axis=-1):
    """y = exp(x - max(x)) / sum(exp(x - max(x))) along `axis`.

    Subtracting the row max changes nothing mathematically (it cancels between numerator and
    denominator) but keeps exp() from overflowing: the largest exponent is exp(0) = 1.
    A row that is entirely -inf (no allowed entry) gives zeros instead of 0/0 = NaN.
    """
    xp = get_xp(x)
    if x.shape[axis] == 0:                                     # no entries (S = 0): nothing to normalise
        return x.copy()
    row_max = x.max(axis=axis, keepdims=True)                  # (..., 1)
    row_max = xp.where(xp.isneginf(row_max), 0, row_max)       # all -inf row: exp(-inf - 0) = 0
    e = xp.exp(x - row_max)                                    # (..., S) in (0, 1]
    total = e.sum(axis=axis, keepdims=True)                    # (..., 1) >= 1 unless every entry is -inf
    return e / xp.where(total == 0, 1, total)


def softmax_backward(dy, y, axis=-1):
    """dx = y * (dy - sum(dy * y)) along `axis`.

    The Jacobian of softmax is diag(y) - y y^T; applied to dy it gives the line above without
    ever building the S x S matrix. Rows where y is all zeros (no allowed entry) get zero gradient.
    """
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))


# ----------------------------------------------------------------------------------------------------
# Masks and input checks


def causal_mask(T, S=None, xp=np):
    """Boolean (T, S): query i may attend key j iff j <= i + (S - T) (bottom-right aligned)."""
    S = T if S is None else S
    i = xp.arange(T)[:, None]                                  # (T, 1) query positions
    j = xp.arange(S)[None, :]                                  # (1, S) key positions
    return j <= i + (S - T)


def _check_float(name, x):
    if not hasattr(x, "dtype") or x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got {getattr(x, 'dtype', type(x))}")


def check_attention_inputs(q, k, v, mask=None, bias=None):
    """Raise ValueError/TypeError naming the argument, the shape it got and the shape it needs.

    Shared by every attention implementation in the project (flash.py uses it too).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x)
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape (..., length, width), got {x.shape}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    T, S = q.shape[-2], k.shape[-2]
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have shape (..., S, {q.shape[-1]}) to match q {q.shape}, got {k.shape}")
    if v.shape[-2] != S:
        raise ValueError(f"v must have shape (..., {S}, Dv) to match k {k.shape}, got {v.shape}")
    try:
        lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(f"leading axes of q {q.shape}, k {k.shape}, v {v.shape} do not broadcast") from None
    for name, x, kind in (("mask", mask, "b"), ("bias", bias, "f")):
        if x is None:
            continue
        if not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array broadcastable to (..., T, S), got {type(x).__name__}")
        if x.dtype.kind != kind:
            need = "boolean (True = may attend)" if kind == "b" else "floating-point"
            raise TypeError(f"{name} must be {need}, got dtype {x.dtype}")
        try:
            np.broadcast_shapes(x.shape, lead + (T, S))
        except ValueError:
            raise ValueError(f"{name} must broadcast to (..., T, S) = {lead + (T, S)}, got {x.shape}") from None


def sum_to_shape(g, shape):
    """Sum a gradient over the axes that broadcasting added or stretched, back to `shape`."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


# ----------------------------------------------------------------------------------------------------
# Attention


def attention_forward(q, k, v, mask=None, causal=False, bias=None, scale=None):
    """out = softmax(q k^T * scale + bias, masked) v.

    q (..., T, Dk), k (..., S, Dk), v (..., S, Dv); leading axes broadcast.
    mask: bool, broadcastable to (..., T, S), True = may attend. causal: AND-ed with mask.
    bias: float, broadcastable to (..., T, S), added to the scores (ALiBi uses it).
    scale: defaults to 1 / sqrt(Dk).
    Returns out (..., T, Dv) and cache = {'q', 'k', 'v', 'weights', 'scale'}.
    The attention weights (..., T, S), for plots, are cache['weights']: non-negative, each row with an
    allowed key sums to 1, rows with none are all zero.
    """
    check_attention_inputs(q, k, v, mask, bias)
    xp = get_xp(q, k, v)
    T, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    scores = (q @ xp.swapaxes(k, -1, -2)) * scale              # (..., T, S)
    if bias is not None:
        scores = scores + bias.astype(scores.dtype, copy=False)   # a float64 table must not upcast float32
    allowed = mask
    if causal:
        allowed = causal_mask(T, S, xp) if allowed is None else allowed & causal_mask(T, S, xp)
    if allowed is not None:
        scores = xp.where(allowed, scores, -xp.inf)            # masked keys get exp(-inf) = 0 weight
    weights = softmax(scores, axis=-1)                         # (..., T, S)
    out = weights @ v                                          # (..., T, Dv)
    cache = {"q": q, "k": k, "v": v, "weights": weights, "scale": scale}
    return out, cache


def attention_backward(dout, cache):
    """dq, dk, dv of attention_forward, given dout (..., T, Dv).

    Masked entries have weight 0, so softmax_backward gives them dscores = 0: masked keys and empty
    rows receive no gradient without any extra masking here.
    """
    q, k, v, weights, scale = cache["q"], cache["k"], cache["v"], cache["weights"], cache["scale"]
    xp = get_xp(dout)
    weights_t = xp.swapaxes(weights, -1, -2)                   # (..., S, T)
    dv = weights_t @ dout                                      # (..., S, Dv)  out = weights v
    dweights = dout @ xp.swapaxes(v, -1, -2)                   # (..., T, S)
    dscores = softmax_backward(dweights, weights, axis=-1)     # (..., T, S)  weights = softmax(scores)
    dq = (dscores @ k) * scale                                 # (..., T, Dk) scores = q k^T * scale
    dk = (xp.swapaxes(dscores, -1, -2) @ q) * scale            # (..., S, Dk)
    # Leading axes that were broadcast in the forward (say one k shared by all heads) sum back.
    return sum_to_shape(dq, q.shape), sum_to_shape(dk, k.shape), sum_to_shape(dv, v.shape)


# ----------------------------------------------------------------------------------------------------
# Demo


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    tokens = ["the", "cat", "sat", "down", "<pad>"]
    T, Dk = len(tokens), 4
    x = rng.standard_normal((T, Dk))
    np.set_printoptions(precision=2, suppress=True)

    def show(title, weights):
        print(title)
        print("        " + " ".join(f"{t:>6}" for t in tokens))
        for t, row in zip(tokens, weights):
            print(f"{t:>6}  " + " ".join(f"{w:6.2f}" for w in row))
        print()

    _, cache = attention_forward(x, x, x)
    show("Self-attention weights (row = query, column = key; each row sums to 1):", cache["weights"])
    np.testing.assert_allclose(cache["weights"].sum(-1), 1.0)

    _, cache = attention_forward(x, x, x, causal=True)
    show("Causal: a query sees only itself and earlier keys (zeros above the diagonal):", cache["weights"])
    assert np.all(np.triu(cache["weights"], 1) == 0)

    padding = np.array([True, True, True, True, False])        # the last token is padding
    _, cache = attention_forward(x, x, x, mask=padding)
    show("Padding mask: no query attends <pad> (its column is zero):", cache["weights"])
    assert np.all(cache["weights"][:, -1] == 0)
    np.testing.assert_allclose(cache["weights"].sum(-1), 1.0)

    print("Every allowed row sums to 1 and masked entries are exactly 0.")

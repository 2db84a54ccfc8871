"""Scaled dot-product attention, forward and backward by hand.

Each query asks "which keys look like me?", turns the answers into weights that sum to one, and returns
the weighted average of the values (Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762):

    scores  = Q K^T * scale + bias           scale = 1 / sqrt(Dk) by default          (..., T, S)
    scores  = -inf where the key may not be attended (mask False, a future key when causal, outside the window)
    weights = softmax(scores)                 over the key axis S, each allowed row sums to 1
    out     = weights V                                                                 (..., T, Dv)

Backward, with dweights the gradient flowing into `weights`:

    dV       = weights^T dout
    dweights = dout V^T
    dscores  = weights * (dweights - rowsum(dweights * weights))       (softmax backward)
    dQ       = dscores K * scale,     dK = dscores^T Q * scale

Masks are boolean and True means "may attend". Causal means query i may attend key j iff
j <= i + (S - T): aligned at the bottom-right, so the last query sees every key (with T < S the
queries are the newest T positions of a longer sequence, as in cached decoding). A sliding window
(Longformer, arXiv:2004.05150; Mistral 7B, arXiv:2310.06825) window = (left, right) lets query i, at the
aligned position p = i + (S - T), attend key j iff p - left <= j <= p + right (None: unbounded on that
side), so the cost can fall from O(T S) to O(T (left + right + 1)) (flash.py skips the tiles outside it).
This is FlashAttention-2's window_size: window = (w, 0) attends w + 1 keys, the query's own included;
Mistral's eager code calls the same thing a window of w + 1 (the two disagree by one). A query row with no
allowed key returns zeros and passes zero gradient, never NaN. A key that no query may attend (padding)
changes nothing whatever its k and v hold, NaN and inf included: its k and v rows are set to 0 before
the products, since a weight of 0 times NaN would still be NaN. A key masked for some queries only is
excluded from their rows exactly as long as its k and v are finite (0 * inf = NaN in weights V, and in
dscores K in the backward).

Shapes: q (..., T, Dk), k (..., S, Dk), v (..., S, Dv); any leading batch/head axes that broadcast.
Bad input raises ValueError or TypeError naming the argument, what it got and what it needs.
Imports no project file. Runs on NumPy or CuPy arrays unchanged.
"""
import math
import numbers
import sys

import numpy as np


def get_xp(*arrays):
    """The array module of the inputs: cupy for CuPy arrays, numpy otherwise.

    attention.py, positional.py, training.py and erf.py each define this helper: they import no project file.
    """
    cupy = sys.modules.get("cupy")  # no CuPy array exists unless cupy was imported; a failed import costs ~50 us
    return np if cupy is None else cupy.get_array_module(*arrays)


# ----------------------------------------------------------------------------------------------------
# Softmax


def softmax(x, axis=-1):
    """y = exp(x - max(x)) / sum(exp(x - max(x))) along `axis`.

    Subtracting the row max changes nothing mathematically (it cancels between numerator and
    denominator) but keeps exp() from overflowing: the largest exponent is exp(0) = 1.
    A row that is entirely -inf (no allowed entry) gives zeros instead of 0/0 = NaN.
    """
    check_float_array("x", x, "(..., S)")
    check_axis(axis, x)
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
    check_float_array("y", y, "(..., S)")
    check_axis(axis, y)
    check_upstream("dy", dy, y)
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))


# ----------------------------------------------------------------------------------------------------
# Masks


def causal_mask(T, S=None, xp=np):
    """Boolean (T, S): query i may attend key j iff j <= i + (S - T) (bottom-right aligned)."""
    return sliding_window_mask(T, S, left=None, right=0, xp=xp)


def sliding_window_mask(T, S=None, left=None, right=None, global_tokens=(), xp=np):
    """Boolean (T, S): query i, at p = i + (S - T), may attend key j iff p - left <= j <= p + right.

    left, right: integers >= 0, or None for no bound on that side; (None, 0) is causal_mask, and (w, 0)
    lets each query see w + 1 keys, its own included (FlashAttention-2's window_size convention).
    global_tokens: Longformer's global positions (integers in [0, T), needs T == S): their rows and
    columns are all True, so they see every key and every query sees them. Pass the result as `mask`.
    """
    check_size("T", T, 0)
    S = T if S is None else S
    check_size("S", S, 0)
    for name, side in (("left", left), ("right", right)):
        if not is_window_side(side):
            raise ValueError(f"{name} must be an integer >= 0 or None (unbounded), got {describe(side)}")
    check_global_tokens(global_tokens, T, S)
    check_array_module(xp)
    left, right = (None if side is None else min(int(side), T + S) for side in (left, right))  # T + S: all keys
    p = xp.arange(T)[:, None] + (S - T)                        # (T, 1) aligned query positions
    j = xp.arange(S)[None, :]                                  # (1, S) key positions
    allowed = xp.ones((T, S), dtype=bool)                      # (T, S)
    if left is not None:
        allowed &= j >= p - left
    if right is not None:
        allowed &= j <= p + right
    if len(global_tokens):
        is_global = (xp.arange(T)[:, None] == xp.asarray(list(global_tokens))[None, :]).any(axis=1)  # (T,)
        allowed |= is_global[:, None] | is_global[None, :]     # global rows see all, every row sees them
    return allowed


# ----------------------------------------------------------------------------------------------------
# Attention


def attention_forward(q, k, v, mask=None, causal=False, bias=None, scale=None, window=None):
    """out = softmax(q k^T * scale + bias, masked) v.

    q (..., T, Dk), k (..., S, Dk), v (..., S, Dv); leading axes broadcast, Dk >= 1.
    mask: bool, broadcastable to (..., T, S) (the leading axes of q, k, v; a mask cannot add any),
      True = may attend. causal: True or False, AND-ed with mask.
    bias: float, broadcastable to (..., T, S) like mask, added to the scores (ALiBi uses it); cast to
      q's dtype, so a float64 table cannot upcast float32 attention.
    scale: a finite number > 0; defaults to 1 / sqrt(Dk) (the query/key width, not Dv).
    window: None, or (left, right) with each an integer >= 0 or None: query i (at p = i + (S - T)) may
      attend key j iff p - left <= j <= p + right; AND-ed with mask and causal. (w, 0) sees w + 1 keys.
    Returns out (..., T, Dv) and cache = {'q', 'k', 'v', 'weights', 'scale'}: the inputs (k and v with
    the keys no query may attend set to 0), the weights and the scale used.
    The attention weights (..., T, S), for plots, are cache['weights']: non-negative, each row with an
    allowed key sums to 1, rows with none are all zero.
    """
    check_attention_inputs(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, window=window)
    xp = get_xp(q, k, v)
    T, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    allowed = mask
    if causal or window is not None:
        left, right = (None, None) if window is None else window
        band = sliding_window_mask(T, S, left, 0 if causal else right, xp=xp)   # (T, S) causal: j <= p
        allowed = band if allowed is None else allowed & band
    if mask is not None or window is not None:
        # Keys that no query may attend: zero their k and v, so NaN or inf there cannot reach out or the
        # gradients through 0 * NaN = NaN (their weight is 0 anyway). Causal alone leaves none: the last
        # query sees every key; a window can leave some (the keys before the first query's window).
        attended = xp.broadcast_to(allowed, allowed.shape[:-2] + (T, S)).any(axis=-2)   # (..., S)
        k, v = zero_unattended_keys(k, attended), zero_unattended_keys(v, attended)
    scores = (q @ xp.swapaxes(k, -1, -2)) * scale              # (..., T, S)
    if bias is not None:
        scores = scores + bias.astype(scores.dtype, copy=False)   # a float64 table must not upcast float32
    if allowed is not None:
        scores = xp.where(allowed, scores, -xp.inf)            # masked keys get exp(-inf) = 0 weight
    weights = softmax(scores, axis=-1)                         # (..., T, S)
    out = weights @ v                                          # (..., T, Dv)
    cache = {"q": q, "k": k, "v": v, "weights": weights, "scale": scale}
    return out, cache


def attention_backward(dout, cache):
    """dq, dk, dv of attention_forward, given dout (..., T, Dv) of the output's shape and dtype.

    Masked entries have weight 0, so softmax_backward gives them dscores = 0: masked keys and empty
    rows receive no gradient without any extra masking here.
    """
    if not isinstance(cache, dict) or set(cache) != {"q", "k", "v", "weights", "scale"}:
        raise TypeError(f"cache must be the dict attention_forward returned, got {describe(cache)}")
    q, k, v, weights, scale = cache["q"], cache["k"], cache["v"], cache["weights"], cache["scale"]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])   # out's leading axes (v may add some)
    check_upstream("dout", dout, q, shape=lead + (q.shape[-2], v.shape[-1]))
    xp = get_xp(dout)
    weights = xp.broadcast_to(weights, lead + weights.shape[-2:])   # (..., T, S) a view, where v added axes
    weights_t = xp.swapaxes(weights, -1, -2)                   # (..., S, T)
    dv = weights_t @ dout                                      # (..., S, Dv)  out = weights v
    dweights = dout @ xp.swapaxes(v, -1, -2)                   # (..., T, S)
    dscores = softmax_backward(dweights, weights, axis=-1)     # (..., T, S)  weights = softmax(scores)
    dq = (dscores @ k) * scale                                 # (..., T, Dk) scores = q k^T * scale
    dk = (xp.swapaxes(dscores, -1, -2) @ q) * scale            # (..., S, Dk)
    # Leading axes that were broadcast in the forward (say one k shared by all heads) sum back.
    return sum_to_shape(dq, q.shape), sum_to_shape(dk, k.shape), sum_to_shape(dv, v.shape)


# ----------------------------------------------------------------------------------------------------
# Broadcasting helpers


def sum_to_shape(g, shape):
    """Sum a gradient over the axes that broadcasting added or stretched, back to `shape`."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


def zero_unattended_keys(x, attended):
    """x (..., S, width) with the rows of keys that no query attends set to 0.

    attended (..., S) bool. Where x is shared across a leading axis (size 1 there, or no such axis),
    a row is kept if a query anywhere along that axis attends it, so x keeps its own shape.
    """
    xp = get_xp(x)
    lead = x.shape[:-1]                                        # (..., S)
    attended = attended.reshape((1,) * (len(lead) - attended.ndim) + attended.shape)  # at least x's axes
    attended = sum_to_shape(attended, lead) > 0                # any() over the axes x is shared across
    return xp.where(attended[..., None], x, x.dtype.type(0))   # (..., S, width)


# ----------------------------------------------------------------------------------------------------
# Input checks: every public function above calls these first. Errors read
# "{name} must be {what it needs}, got {what it got}".


def describe(x):
    """What a bad argument is, for an error message: an array's module, dtype and shape; a list's or
    a tuple's length; anything else's repr."""
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"{type(x).__module__.split('.')[0]} array of dtype {x.dtype}, shape {tuple(x.shape)}"
    if isinstance(x, (list, tuple, dict)):
        return f"{type(x).__name__} of length {len(x)}"
    text = repr(x)
    return text if len(text) <= 60 else f"{type(x).__name__} {text[:50]}..."


def check_size(name, value, minimum):
    """A length, width or count: an integer (not a bool) >= minimum."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {describe(value)}")


def check_axis(axis, x):
    """An axis of x: an integer in [-x.ndim, x.ndim)."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be an integer in [{-x.ndim}, {x.ndim}) for shape {x.shape}, got {describe(axis)}")


def check_array_module(xp):
    """xp, where a function builds a table, must be an array module: numpy or cupy."""
    if not all(hasattr(xp, name) for name in ("arange", "asarray", "ndarray")):
        raise TypeError(f"xp must be an array module (numpy or cupy), got {describe(xp)}")


def check_float_array(name, x, need, like=None, like_name=None):
    """x must be a floating-point array of the shape written `need`; with `like` (called `like_name`),
    also of like's dtype and on like's array module."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape") or x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array {need}, got {describe(x)}")
    if like is not None:
        check_same_array_module(name, x, like, like_name)
        if x.dtype != like.dtype:
            raise TypeError(f"{name} must have dtype {like.dtype} ({like_name}'s), got {x.dtype}")


def check_same_array_module(name, x, like, like_name):
    """x must live where `like` does (NumPy or CuPy): no function here moves data between devices."""
    if get_xp(x) is not get_xp(like):
        raise TypeError(f"{name} must be a {get_xp(like).__name__} array like {like_name}, got {describe(x)}")


def check_upstream(name, d, like, shape=None):
    """The upstream gradient d must have exactly the forward output's shape and `like`'s dtype and
    array module: a wrong shape would broadcast silently or sum an axis away, another dtype would turn
    float32 gradients into float64 ones."""
    shape = like.shape if shape is None else shape
    if not hasattr(d, "dtype") or not hasattr(d, "shape"):
        raise TypeError(f"{name} must be an array of dtype {like.dtype}, got {describe(d)}")
    check_same_array_module(name, d, like, "the forward's inputs")
    if d.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype} (the forward's), got {d.dtype}")
    if tuple(d.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the forward output's), got {tuple(d.shape)}")


def check_flag(name, value):
    """An on/off option must be True or False: an array or a number there is a mistake."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")


def check_attention_inputs(q, k, v, mask=None, bias=None, causal=False, scale=None, window=None):
    """Raise ValueError/TypeError naming the argument, what it got and what it needs.

    Shared by every attention implementation in the project (flash.py uses it too).
    """
    check_float_array("q", q, "(..., T, Dk)")
    check_float_array("k", k, "(..., S, Dk)", like=q, like_name="q")
    check_float_array("v", v, "(..., S, Dv)", like=q, like_name="q")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape (..., length, width), got {x.shape}")
    T, S = q.shape[-2], k.shape[-2]
    if q.shape[-1] == 0:
        raise ValueError(f"q must have a width Dk >= 1 (shape (..., T, Dk)), got {q.shape}")
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
        need = "boolean (True = may attend)" if kind == "b" else "floating-point"
        if not hasattr(x, "dtype") or not hasattr(x, "shape"):
            raise TypeError(f"{name} must be a {need} array broadcastable to (..., T, S), got {describe(x)}")
        check_same_array_module(name, x, q, "q")
        if x.dtype.kind != kind:
            raise TypeError(f"{name} must be {need}, got dtype {x.dtype}")
        target = lead + (T, S)
        try:
            fits = np.broadcast_shapes(x.shape, target) == target
        except ValueError:
            fits = False
        if not fits:   # a mask or bias may not add a leading axis that q, k, v do not have
            raise ValueError(f"{name} must broadcast to (..., T, S) = {target}, got {x.shape}")
    check_flag("causal", causal)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a number (or None for 1 / sqrt(Dk)), got {describe(scale)}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if window is not None:
        check_window(window)


def is_window_side(side):
    """One side of a sliding window: an integer >= 0 (not a bool), or None for no bound."""
    return side is None or (isinstance(side, (int, np.integer)) and not isinstance(side, bool) and side >= 0)


def check_window(window):
    """A sliding window (left, right): a pair, each side an integer >= 0 or None (unbounded)."""
    if not isinstance(window, (tuple, list)) or len(window) != 2 or not all(map(is_window_side, window)):
        got = repr(tuple(window)) if isinstance(window, (tuple, list)) else describe(window)
        raise ValueError(f"window must be a pair (left, right) of integers >= 0 or None, got {got}")


def check_global_tokens(global_tokens, T, S):
    """Longformer's global tokens: a sequence of integer positions in [0, T), and T == S (self-attention)."""
    if not isinstance(global_tokens, (tuple, list, range)) or not all(
            isinstance(g, (int, np.integer)) and not isinstance(g, bool) and 0 <= g < T for g in global_tokens):
        got = repr(list(global_tokens)) if isinstance(global_tokens, (tuple, list)) else describe(global_tokens)
        raise ValueError(f"global_tokens must be a sequence of integer positions in [0, {T}), got {got}")
    if len(global_tokens) and T != S:
        raise ValueError(f"global_tokens need T == S (each is both a query and a key), got T = {T}, S = {S}")


# ----------------------------------------------------------------------------------------------------
# Demo


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")   # small matrices: a second BLAS thread would only wait (spinning)
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

    _, cache = attention_forward(x, x, x, causal=True, window=(1, 0))
    show("Sliding window (1, 0): each query sees itself and one key before it, 2 keys (FlashAttention-2's count):",
         cache["weights"])
    assert ((cache["weights"] > 0).sum(-1) == [1, 2, 2, 2, 2]).all()

    print("Every allowed row sums to 1 and masked entries are exactly 0.")

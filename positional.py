"""Positional information for attention: sinusoidal, learned, rotary (RoPE) and linear biases (ALiBi).

Attention by itself is blind to order: permute the tokens and the outputs are permuted the same way
(it is permutation equivariant), so "the dog chased the cat" and "the cat chased the dog" look alike to
it. The four standard fixes below put the position back in, either into the tokens or into the scores.

Sinusoidal encoding (Vaswani et al. 2017, arXiv:1706.03762), added to the token embeddings:

    PE[pos, 2i]   = sin(pos / base^(2i/D))
    PE[pos, 2i+1] = cos(pos / base^(2i/D))          interleaved, base = 10000
    Each (sin, cos) pair turns at its own frequency w_i = base^(-2i/D), so shifting pos by k rotates
    every pair by the angle k * w_i: PE[pos + k] = PE[pos] @ M_k, a rotation that depends on k only.
    For odd D the last column is a sine with no cosine partner (the formula as written, column by column).

Learned absolute positions (as in BERT and GPT-2): a table (max_len, D) of trainable vectors.

    out = x + table[:T]                      dx = dout,  dtable[:T] = dout summed over leading axes

Rotary position embedding, RoPE (Su et al., "RoFormer", arXiv:2104.09864), applied to q and k:

    theta_i = (offset + t) * base^(-2i/Dh)                      for the pair (x[2i], x[2i+1]) at row t
    out[2i]   = x[2i] cos(theta_i) - x[2i+1] sin(theta_i)
    out[2i+1] = x[2i] sin(theta_i) + x[2i+1] cos(theta_i)
    A rotation R(p) of each pair, so <R(i) q, R(j) k> = <q, R(j - i) k>: scores depend on i - j only.
    Backward: the Jacobian of a rotation is the rotation, so dx = R(p)^T dout = R(-p) dout.

ALiBi, attention with linear biases (Press et al. 2022, arXiv:2108.12409), added to the scores:

    bias[h, i, j] = -slope_h * |i + (S - T) - j|       (passed to attention_forward as `bias`)
    slopes for H a power of two: 2^(-8/H), 2^(-16/H), ..., 2^(-8) (H=8: 1/2, 1/4, ..., 1/256)

Shapes: x (..., T, D) for sinusoidal/learned, x (..., T, Dh) for RoPE (Dh even), bias (H, T, S).
Tables are computed in float64 and cast to their `dtype` argument (pass your data's dtype), and RoPE
casts its cos/sin to x's dtype, so float32 in gives float32 out.
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
# Sinusoidal encoding


def sinusoidal_encoding(T, D, base=10000.0, dtype=np.float32, xp=np):
    """PE (T, D): PE[pos, 2i] = sin(pos / base^(2i/D)), PE[pos, 2i+1] = cos(pos / base^(2i/D)).

    Columns 2i and 2i+1 share the frequency base^(-2i/D). With odd D the last column, 2i = D - 1,
    is sin(pos / base^((D-1)/D)) alone; the shift-is-a-rotation property then holds for the first
    D - 1 columns. Angles are computed in float64 and the table cast to `dtype` at the end.
    """
    _check_size("T", T, 0)
    _check_size("D", D, 1)
    _check_base(base)
    _check_float_dtype(dtype, xp)
    column = xp.arange(D)                                      # (D,)
    two_i = column - column % 2                                # (D,) 0, 0, 2, 2, 4, 4, ...
    inv_freq = base ** (-two_i / D)                            # (D,) float64, from 1 down to ~1/base
    angles = xp.arange(T, dtype=xp.float64)[:, None] * inv_freq   # (T, D) pos / base^(2i/D)
    pe = xp.where(column % 2 == 0, xp.sin(angles), xp.cos(angles))  # (T, D) even: sin, odd: cos
    return pe.astype(dtype)


# ----------------------------------------------------------------------------------------------------
# Learned absolute positions


def init_learned_positions(max_len, D, rng, dtype=np.float32):
    """A (max_len, D) table drawn from N(0, 0.02^2).

    Standard deviation 0.02 is what nanoGPT and Hugging Face's GPT-2 use for the position table
    (OpenAI's original GPT-2 code drew its `wpe` with 0.01): small next to unit-scale activations.

    rng: a numpy.random.Generator. The table is a NumPy array; move it with cupy.asarray for the GPU.
    """
    _check_size("max_len", max_len, 1)
    _check_size("D", D, 1)
    _check_float_dtype(dtype)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (numpy.random.default_rng(seed)), got {_got(rng)}")
    return (0.02 * rng.standard_normal((max_len, D))).astype(dtype)   # (max_len, D)


def learned_position_forward(x, table):
    """out = x + table[:T]: row t of the table is added to the token at position t.

    x (..., T, D), table (max_len, D) with T <= max_len, the same dtype as x and on x's array module.
    Returns out (..., T, D) and cache = {'x_shape', 'table_shape', 'dtype'}: where the gradient goes
    (the backward needs no array, only shapes: out is linear in both inputs with coefficient 1).
    """
    _check_sequence("x", x, "(..., T, D)")
    _check_sequence("table", table, "(max_len, D)", like=x)
    T, D = x.shape[-2:]
    if table.ndim != 2 or table.shape[1] != D:
        raise ValueError(f"table must have shape (max_len, {D}) to match x {x.shape}, got {table.shape}")
    if T > table.shape[0]:
        raise ValueError(f"x has T={T} positions (shape {x.shape}) but table holds only "
                         f"max_len={table.shape[0]} (shape {table.shape})")
    cache = {"x_shape": x.shape, "table_shape": table.shape, "dtype": x.dtype}
    return x + table[:T], cache                                # (..., T, D)


def learned_position_backward(dout, cache):
    """dx = dout; dtable[:T] = dout summed over every leading axis, dtable[T:] = 0.

    One table row feeds every sequence of the batch at that position, so its gradient is the sum
    over the batch. Rows beyond T were not used and get zero gradient.
    """
    _check_cache(cache, ("x_shape", "table_shape", "dtype"), "learned_position_forward")
    _check_upstream(dout, cache["x_shape"], cache["dtype"])
    xp = get_xp(dout)
    T = dout.shape[-2]
    dtable = xp.zeros(cache["table_shape"], dtype=dout.dtype)  # (max_len, D)
    dtable[:T] = dout.sum(axis=tuple(range(dout.ndim - 2)))    # (T, D) sum over the batch (T = 0 too)
    return dout.copy(), dtable                                 # a copy: callers may add into dx


# ----------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE)


def _rotate_pairs(x, cos, sin):
    """Rotate each interleaved pair (x[2i], x[2i+1]) by the angle whose cosine and sine are given."""
    xp = get_xp(x)
    even, odd = x[..., 0::2], x[..., 1::2]                     # (..., T, Dh/2) each
    out_even = even * cos - odd * sin                          # (..., T, Dh/2)
    out_odd = even * sin + odd * cos                           # (..., T, Dh/2)
    return xp.stack([out_even, out_odd], axis=-1).reshape(x.shape)   # (..., T, Dh) interleaved again


def rope_forward(x, offset=0, base=10000.0):
    """Rotate the pair (x[2i], x[2i+1]) in row t by theta_i = (offset + t) * base^(-2i/Dh).

    x (..., T, Dh) with Dh even (>= 2): queries or keys, any leading batch/head axes. `offset` (an
    integer >= 0) is the position of row 0, so the new rows of cached decoding are rotated as if the
    sequence were whole. base: a finite number > 0.
    The angles are computed in float64 and only their cos/sin cast to x.dtype. A float32 angle could
    not be right however it were computed: near position 10^5 the fast pairs' angles (3e4 to 1e5 rad)
    lie where float32 numbers are 2^-9 to 2^-7 apart, so rounding alone moves them by up to ~1e-3 rad
    (Dh = 16) to ~4e-3 rad (Dh >= 64), whereas this way float32 RoPE agrees with float64 RoPE to 1e-5.
    Returns out (..., T, Dh) and cache = {'cos', 'sin', 'x_shape'}: cos and sin (T, Dh/2) in x.dtype,
    the rotation backward undoes, and x's shape (the shape dout must have).
    """
    _check_sequence("x", x, "(..., T, Dh)")
    T, Dh = x.shape[-2:]
    if Dh % 2 or Dh == 0:
        raise ValueError(f"x must have an even head width Dh >= 2 (RoPE rotates pairs), got shape {x.shape}")
    _check_size("offset", offset, 0)
    _check_base(base)
    xp = get_xp(x)
    inv_freq = base ** (-xp.arange(0, Dh, 2, dtype=xp.float64) / Dh)      # (Dh/2,) base^(-2i/Dh)
    position = offset + xp.arange(T, dtype=xp.float64)                     # (T,)
    angles = position[:, None] * inv_freq                                  # (T, Dh/2) float64
    cos, sin = xp.cos(angles).astype(x.dtype), xp.sin(angles).astype(x.dtype)  # (T, Dh/2) each
    return _rotate_pairs(x, cos, sin), {"cos": cos, "sin": sin, "x_shape": x.shape}


def rope_backward(dout, cache):
    """dx = R^T dout: each pair rotated back by -theta (cos unchanged, sin negated).

    The forward is linear, out = R x with R a rotation, so dx = R^T dout, and R^T = R^-1.
    """
    _check_cache(cache, ("cos", "sin", "x_shape"), "rope_forward")
    _check_upstream(dout, cache["x_shape"], cache["cos"].dtype, like=cache["cos"])
    return _rotate_pairs(dout, cache["cos"], -cache["sin"])    # (..., T, Dh)


# ----------------------------------------------------------------------------------------------------
# ALiBi


def alibi_slopes(H, dtype=np.float32):
    """The ALiBi paper's per-head slopes (H,), a geometric sequence.

    H a power of two: slope_h = 2^(-8 (h+1) / H), h = 0..H-1; H=8 gives 1/2, 1/4, ..., 1/256 and
    H=16 gives 1/2^0.5, 1/2^1, ..., 1/2^8.
    Otherwise (the rule of the paper's reference code): with P the largest power of two below H,
    the P slopes for P heads, followed by every other slope of the 2P-head sequence (its 1st, 3rd,
    5th, ...) until there are H. H=6: 1/4, 1/16, 1/64, 1/256, then 1/2, 1/8.
    H=12: 1/2, ..., 1/256, then 1/2^0.5, 1/2^1.5, 1/2^2.5, 1/2^3.5.
    """
    _check_size("H", H, 1)
    _check_float_dtype(dtype)

    def power_of_two_slopes(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    P = 1 << (int(H).bit_length() - 1)                         # largest power of two <= H (NumPy ints too)
    slopes = power_of_two_slopes(P) + power_of_two_slopes(2 * P)[0::2][:H - P]
    return np.asarray(slopes, dtype=dtype)                     # (H,)


def alibi_bias(H, T, S, dtype=np.float32, xp=np):
    """bias (H, T, S) = -slope_h * |i + (S - T) - j|, to add to the attention scores.

    Query i sits at position i + (S - T) of the keys (bottom-right aligned, as causal masking), so
    the last query is at the last key and the bias is zero on that diagonal. Keys on either side
    are penalised by their distance; masking future keys is the caller's business (causal=True).
    """
    _check_size("T", T, 0)
    _check_size("S", S, 0)
    _check_float_dtype(dtype, xp)
    slopes = xp.asarray(alibi_slopes(H, dtype=np.float64))     # (H,)
    query_position = xp.arange(T)[:, None] + (S - T)           # (T, 1)
    key_position = xp.arange(S)[None, :]                       # (1, S)
    distance = xp.abs(query_position - key_position)           # (T, S) integers
    # slope * (-distance) rather than -(slope * distance): the aligned diagonal is then +0.0, not -0.0.
    return (slopes[:, None, None] * -distance).astype(dtype)   # (H, T, S)


# ----------------------------------------------------------------------------------------------------
# Input checks (below the math they guard). Errors read "{name} must be {need}, got {got}".


def _got(x):
    """An argument as an error message shows it: an array's dtype and shape, a list's length, else repr."""
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"{type(x).__module__.split('.')[0]} array of dtype {x.dtype}, shape {tuple(x.shape)}"
    return f"{type(x).__name__} of length {len(x)}" if isinstance(x, (list, tuple, dict)) else repr(x)[:60]


def _check_size(name, value, minimum):
    """A length, width, head count or position: an integer (not a bool) >= minimum."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {_got(value)}")


def _check_base(base):
    """The frequency base: a finite number > 0 (base^(-2i/D) is then a finite positive frequency)."""
    if isinstance(base, bool) or not isinstance(base, numbers.Real):
        raise TypeError(f"base must be a number, got {_got(base)}")
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a finite number > 0, got {base!r}")


def _check_float_dtype(dtype, xp=np):
    """A table's dtype (None would silently mean float64) and the array module that builds it."""
    try:
        kind = None if dtype is None else np.dtype(dtype).kind
    except TypeError:
        kind = None
    if kind != "f":
        got = np.dtype(dtype) if kind else _got(dtype)
        raise TypeError(f"dtype must be a floating-point dtype such as numpy.float32, got {got}")
    if not all(hasattr(xp, name) for name in ("arange", "asarray", "ndarray")):
        raise TypeError(f"xp must be an array module (numpy or cupy), got {_got(xp)}")


def _check_sequence(name, x, need, like=None):
    """x must be a float array of shape (..., T, width) (`need`, written out for errors); with `like`
    (the array x), also of like's dtype and array module."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape") or x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array {need}, got {_got(x)}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape {need}, got {x.shape}")
    if like is not None and get_xp(x) is not get_xp(like):
        raise TypeError(f"{name} must be a {get_xp(like).__name__} array like x, got {_got(x)}")
    if like is not None and x.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype} (x's), got {x.dtype}")


def _check_cache(cache, fields, forward):
    if not isinstance(cache, dict) or set(cache) != set(fields):
        raise TypeError(f"cache must be the dict {forward} returned, got {_got(cache)}")


def _check_upstream(dout, shape, dtype, like=None):
    """dout must have exactly the forward output's shape and dtype (and `like`'s array module): a wrong
    shape would broadcast silently or sum an axis away, another dtype would turn float32 into float64."""
    if not hasattr(dout, "dtype") or not hasattr(dout, "shape"):
        raise TypeError(f"dout must be an array of dtype {dtype}, got {_got(dout)}")
    if like is not None and get_xp(dout) is not get_xp(like):
        raise TypeError(f"dout must be a {get_xp(like).__name__} array like the forward's inputs, got {_got(dout)}")
    if dout.dtype != dtype:
        raise TypeError(f"dout must have dtype {dtype} (the forward's), got {dout.dtype}")
    if tuple(dout.shape) != tuple(shape):
        raise ValueError(f"dout must have shape {tuple(shape)} (the forward output's), got {tuple(dout.shape)}")


# ----------------------------------------------------------------------------------------------------
# Demo


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")   # small matrices: a second BLAS thread would only wait (spinning)
    rng = np.random.default_rng(0)
    D = 8
    vocabulary = {word: rng.standard_normal(D) for word in ["the", "dog", "cat", "chased"]}
    sentence_a = "the dog chased the cat".split()
    sentence_b = "the cat chased the dog".split()             # the same tokens, dog and cat swapped
    x_a = np.stack([vocabulary[w] for w in sentence_a])        # (T, D)
    x_b = np.stack([vocabulary[w] for w in sentence_b])        # (T, D)

    def attend_and_pool(q, k, v):
        """Self-attention followed by a mean over positions: one vector per sentence.

        Written out here, not imported from attention.py, because positional.py imports no project file.
        """
        scores = q @ k.T / np.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        return (weights / weights.sum(-1, keepdims=True) @ v).mean(axis=0)

    pe = sinusoidal_encoding(len(sentence_a), D, dtype=np.float64)
    pooled = {
        "no positions": (attend_and_pool(x_a, x_a, x_a), attend_and_pool(x_b, x_b, x_b)),
        "sinusoidal": (attend_and_pool(x_a + pe, x_a + pe, x_a + pe),
                       attend_and_pool(x_b + pe, x_b + pe, x_b + pe)),
        "RoPE on q, k": (attend_and_pool(rope_forward(x_a)[0], rope_forward(x_a)[0], x_a),
                         attend_and_pool(rope_forward(x_b)[0], rope_forward(x_b)[0], x_b)),
    }
    print(f"'{' '.join(sentence_a)}' vs '{' '.join(sentence_b)}':")
    print("distance between the two sentences' pooled self-attention outputs")
    gaps = {name: np.linalg.norm(pooled_a - pooled_b) for name, (pooled_a, pooled_b) in pooled.items()}
    for name in gaps:
        print(f"  {name:>14}: {gaps[name]:.2e}")
    assert gaps["no positions"] < 1e-12, "without positions the two sentences must look identical"
    assert gaps["sinusoidal"] > 1e-2 and gaps["RoPE on q, k"] > 1e-2
    print("Without positions attention sees a bag of words; with sinusoids or RoPE it sees the order.")

    print("\nALiBi slopes for 8 heads:", alibi_slopes(8), "(1/2 ... 1/256)")
    assert np.array_equal(alibi_slopes(8, dtype=np.float64), 0.5 ** np.arange(1, 9))
    print("ALiBi bias of head 0 (1/2) for T=3 queries at the end of S=5 keys:")
    print(alibi_bias(8, 3, 5)[0])

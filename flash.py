"""Flash attention: exact attention without ever holding the T x S score matrix.

Full attention (attention.py) builds scores = Q K^T of shape (T, S), which for long sequences is far
more memory than Q, K, V and the output together. Flash attention (Dao et al. 2022, arXiv:2205.14135;
the loop order of FlashAttention-2, arXiv:2307.08691) walks over tiles of keys and values and keeps,
for every query row, a running maximum m, a running sum l and an unnormalised output O: the *online
softmax*. When a new tile raises the maximum, what was accumulated is rescaled by exp(m_old - m_new),
so the result is exactly softmax(scores) V. The forward stores only the per-row log-sum-exp
lse = m + log(l) (length T); the backward recomputes each tile's probabilities from it.

Forward, for each query tile Q_i (block_q rows), starting from m = -inf, l = 0, O = 0:
    for each key/value tile K_j, V_j (block_k rows), skipping tiles entirely in the causal future:
        S_ij  = Q_i K_j^T * scale              (-inf where causal forbids)     (block_q, block_k)
        m_new = max(m, rowmax(S_ij))
        P_ij  = exp(S_ij - m_new)
        alpha = exp(m - m_new)                  rescales what came before
        l     = alpha * l + rowsum(P_ij)
        O     = alpha * O + P_ij V_j
        m     = m_new
    O_i   = O / l
    lse_i = m + log(l)

Backward by recomputation, with delta = rowsum(dO * O), for each key tile K_j, V_j and query tile Q_i:
    P   = exp(S_ij - lse_i)                     the forward's softmax probabilities, tile by tile
    dV_j += P^T dO_i
    dP   = dO_i V_j^T
    dS   = P * (dP - delta_i)                   softmax backward: delta_i = rowsum(dP * P) = rowsum(dO * O)
    dQ_i += dS K_j * scale
    dK_j += dS^T Q_i * scale

Semantics are attention.py's: causal means query i may attend key j iff j <= i + (S - T); any T and S
(neither a multiple of the tiles), T != S; a row with no allowed key gives zeros, lse = -inf and zero
gradient. Extra memory beyond inputs and outputs is O(T) for m, l, lse and O(block_q * block_k) for one
tile of scores, never O(T * S).

Shapes: q (..., T, Dh), k (..., S, Dh), v (..., S, Dh). NumPy arrays take the tiled NumPy path below.
Imports attention.py (input checks and the array-module helper).
"""
import math

import numpy as np

from attention import check_attention_inputs, get_xp, sum_to_shape


def _causal_tile(r0, r1, c0, c1, T, S, xp):
    """Boolean (r1 - r0, c1 - c0): query r may attend key c iff c <= r + (S - T), absolute indices."""
    rows = xp.arange(r0, r1)[:, None]                          # (block_q, 1)
    cols = xp.arange(c0, c1)[None, :]                          # (1, block_k)
    return cols <= rows + (S - T)


def _tile_is_future(r1, c0, T, S):
    """True when every key of a tile starting at c0 lies after what the last query r1 - 1 may see."""
    return c0 > (r1 - 1) + (S - T)


def _check_blocks(block_q, block_k):
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"{name} must be a positive integer, got {b!r}")


# ----------------------------------------------------------------------------------------------------
# The NumPy path: the algorithm above, loop for loop.


def _flash_forward_numpy(q, k, v, causal, scale, block_q, block_k):
    xp = get_xp(q)
    T, S = q.shape[-2], k.shape[-2]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    out = xp.zeros(lead + (T, v.shape[-1]), dtype=q.dtype)    # (..., T, Dh)
    lse = xp.zeros(lead + (T,), dtype=q.dtype)                 # (..., T)
    neg_inf = q.dtype.type(-np.inf)
    for r0 in range(0, T, block_q):
        r1 = min(r0 + block_q, T)                              # the last tile may be partial
        Q_i = q[..., r0:r1, :]                                 # (..., bq, Dh)
        m = xp.full(lead + (r1 - r0,), neg_inf, dtype=q.dtype)  # (..., bq) running row max
        l = xp.zeros(lead + (r1 - r0,), dtype=q.dtype)         # (..., bq) running row sum
        O = xp.zeros(lead + (r1 - r0, v.shape[-1]), dtype=q.dtype)  # (..., bq, Dh) unnormalised
        for c0 in range(0, S, block_k):
            if causal and _tile_is_future(r1, c0, T, S):
                break                                          # every later tile is further in the future
            c1 = min(c0 + block_k, S)
            K_j, V_j = k[..., c0:c1, :], v[..., c0:c1, :]      # (..., bk, Dh)
            S_ij = (Q_i @ xp.swapaxes(K_j, -1, -2)) * scale    # (..., bq, bk)
            if causal:
                S_ij = xp.where(_causal_tile(r0, r1, c0, c1, T, S, xp), S_ij, neg_inf)
            m_new = xp.maximum(m, S_ij.max(axis=-1))           # (..., bq)
            # A row that has seen only -inf so far keeps m_new = -inf; shifting by 0 instead keeps
            # exp(-inf - 0) = 0 where exp(-inf - (-inf)) would be NaN.
            m_safe = xp.where(xp.isneginf(m_new), 0, m_new)    # (..., bq)
            P_ij = xp.exp(S_ij - m_safe[..., None])            # (..., bq, bk)
            alpha = xp.exp(m - m_safe)                         # (..., bq) 0 on the first tile
            l = alpha * l + P_ij.sum(axis=-1)                  # (..., bq)
            O = alpha[..., None] * O + P_ij @ V_j              # (..., bq, Dh)
            m = m_new
        empty = l == 0                                         # rows with no allowed key
        out[..., r0:r1, :] = O / xp.where(empty, 1, l)[..., None]
        lse[..., r0:r1] = xp.where(empty, neg_inf, m + xp.log(xp.where(empty, 1, l)))
    return out, lse


def _flash_backward_numpy(dout, q, k, v, out, lse, causal, scale, block_q, block_k):
    xp = get_xp(dout)
    T, S = q.shape[-2], k.shape[-2]
    lead = out.shape[:-2]
    dq = xp.zeros(lead + q.shape[-2:], dtype=q.dtype)          # (..., T, Dh)
    dk = xp.zeros(lead + k.shape[-2:], dtype=k.dtype)          # (..., S, Dh)
    dv = xp.zeros(lead + v.shape[-2:], dtype=v.dtype)          # (..., S, Dh)
    delta = (dout * out).sum(axis=-1)                          # (..., T) rowsum(dO * O)
    lse_safe = xp.where(xp.isneginf(lse), 0, lse)              # empty rows: their S_ij are all -inf anyway
    for c0 in range(0, S, block_k):
        c1 = min(c0 + block_k, S)
        K_j, V_j = k[..., c0:c1, :], v[..., c0:c1, :]          # (..., bk, Dh)
        for r0 in range(0, T, block_q):
            r1 = min(r0 + block_q, T)
            if causal and _tile_is_future(r1, c0, T, S):
                continue                                       # this query tile sees none of these keys
            Q_i, dO_i = q[..., r0:r1, :], dout[..., r0:r1, :]  # (..., bq, Dh)
            S_ij = (Q_i @ xp.swapaxes(K_j, -1, -2)) * scale    # (..., bq, bk) recomputed
            if causal:
                S_ij = xp.where(_causal_tile(r0, r1, c0, c1, T, S, xp), S_ij, -xp.inf)
            P = xp.exp(S_ij - lse_safe[..., r0:r1, None])      # (..., bq, bk) = forward's softmax
            dv[..., c0:c1, :] += xp.swapaxes(P, -1, -2) @ dO_i  # (..., bk, Dh)
            dP = dO_i @ xp.swapaxes(V_j, -1, -2)               # (..., bq, bk)
            dS = P * (dP - delta[..., r0:r1, None])            # (..., bq, bk)
            dq[..., r0:r1, :] += (dS @ K_j) * scale            # (..., bq, Dh)
            dk[..., c0:c1, :] += (xp.swapaxes(dS, -1, -2) @ Q_i) * scale  # (..., bk, Dh)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Public functions: the same contract as attention_forward / attention_backward.


def flash_attention_forward(q, k, v, causal=False, scale=None, block_q=128, block_k=128):
    """out = softmax(q k^T * scale, causal) v, computed tile by tile (see the module docstring).

    q (..., T, Dh), k (..., S, Dh), v (..., S, Dh); leading axes broadcast.
    block_q, block_k: tile sizes of the NumPy path (any positive integers; T and S need not be
    multiples of them).
    Returns out (..., T, Dh) and cache = {'q', 'k', 'v', 'out', 'lse', 'causal', 'scale',
    'block_q', 'block_k'}: cache['lse'] (..., T) is the per-row log-sum-exp, the only statistic the
    backward needs (T numbers, not the T x S weights). Rows with no allowed key have lse = -inf.
    """
    check_attention_inputs(q, k, v)
    _check_blocks(block_q, block_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _flash_forward_numpy(q, k, v, causal, scale, block_q, block_k)
    cache = {"q": q, "k": k, "v": v, "out": out, "lse": lse, "causal": causal, "scale": scale,
             "block_q": block_q, "block_k": block_k}
    return out, cache


def flash_attention_backward(dout, cache):
    """dq, dk, dv of flash_attention_forward, by recomputing each tile's probabilities from lse."""
    q, k, v, out = cache["q"], cache["k"], cache["v"], cache["out"]
    if dout.shape != out.shape:
        raise ValueError(f"dout must have the output's shape {out.shape}, got {dout.shape}")
    dq, dk, dv = _flash_backward_numpy(dout, q, k, v, out, cache["lse"], cache["causal"],
                                       cache["scale"], cache["block_q"], cache["block_k"])
    # Leading axes that were broadcast in the forward (one k shared by all heads, say) sum back.
    return sum_to_shape(dq, q.shape), sum_to_shape(dk, k.shape), sum_to_shape(dv, v.shape)


# ----------------------------------------------------------------------------------------------------
# Demo


if __name__ == "__main__":
    import argparse
    import time

    from attention import attention_forward

    parser = argparse.ArgumentParser(description="Flash attention equals full attention, in less memory.")
    parser.add_argument("--T", type=int, default=1000, help="sequence length (not a multiple of the tile)")
    parser.add_argument("--Dh", type=int, default=64, help="head width")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, args.T, args.Dh)).astype(np.float32) for _ in range(3))
    for causal in (False, True):
        start = time.perf_counter()
        full, _ = attention_forward(q, k, v, causal=causal)
        mid = time.perf_counter()
        flash, cache = flash_attention_forward(q, k, v, causal=causal, block_q=128, block_k=128)
        end = time.perf_counter()
        err = float(np.abs(full - flash).max())
        print(f"causal={causal!s:5}  T={args.T}  max |flash - full| = {err:.1e}  "
              f"full {mid - start:.3f} s, flash {end - mid:.3f} s; flash kept lse {cache['lse'].shape} "
              f"instead of weights {(2, args.T, args.T)}")
        assert err < 1e-5, "float32 flash and full attention must agree to rounding"  # sums of <= T terms
    print("Flash attention gives the same output as full attention without the T x S matrix.")

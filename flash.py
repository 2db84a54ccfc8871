"""Flash attention: exact attention without ever holding the T x S score matrix.

Full attention (attention.py) builds scores = Q K^T of shape (T, S), which for long sequences is far
more memory than Q, K, V and the output together. Flash attention (Dao et al. 2022, arXiv:2205.14135;
the loop order of FlashAttention-2, arXiv:2307.08691) walks over tiles of keys and values and keeps,
for every query row, a running maximum m, a running sum l and an unnormalised output O: the *online
softmax*. When a new tile raises the maximum, what was accumulated is rescaled by exp(m_old - m_new),
so the result is exactly softmax(scores) V. The forward stores only the per-row log-sum-exp
lse = m + log(l) (length T); the backward recomputes each tile's probabilities from it.

Forward, for each query tile Q_i (block_q rows), starting from m = -inf, l = 0, O = 0:
    for each key/value tile K_j, V_j (block_k rows) holding a key some row of Q_i may attend:
        S_ij  = Q_i K_j^T * scale              (-inf where not allowed)        (block_q, block_k)
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

Semantics are attention.py's. Query i, at p = i + (S - T), may attend key j iff p - left <= j <= p + right:
window = (left, right) (None: unbounded; FlashAttention-2's window_size, so (w, 0) sees w + 1 keys), and
causal caps right at 0. So the keys of a query tile form one band; the key tiles wholly outside it are
never visited (nor, in the backward, the query tiles outside a key tile's band), the partial tiles at its
edges are visited and masked: a window of w costs O(T w) time, not O(T S). Any T and S; a row with no
allowed key gives zeros, lse = -inf and zero gradient. Extra memory beyond inputs and outputs is O(T) for
m, l, lse and O(block_q * block_k) for one tile of scores, never O(T * S).

Accuracy in float32 (u = 2^-24; tests/test_flash.py checks both bounds on inputs built to meet them):
- Huge logits. Rounding moves a score s by a few u |s|, and so its weight by a factor up to exp(8 u |s|)
  (most of the 8 is the kernels' base-2 exponentials), for flash and full attention alike: out is exact
  only to max|V| (exp(16 u max|s| + 3 (S + 4) u) - 1), about 16 u max|s| max|V| for scores in the
  thousands (plus the rounding of the scores q . k themselves, when they are not exact).
- Saturated logits. When one key wins a row by a wide margin, softmax is one-hot, O_i = V_j*, and the exact
  dS_ij = P_ij (dP_ij - delta_i) is 0 since dP_ij* = dO_i . V_j* and delta_i = dO_i . O_i are the same
  number. Rounded, they are two sums of Dh products in different orders, whose difference dQ_i = scale
  sum_j dS_ij K_j multiplies by scale |K|:  |dq_i - exact dq_i| <= scale max|K| (2 Dh + 4) u sum_d |dO_id|
  max|V| (the exact dq_i is ~0), and likewise dK_j with scale |Q|. So dq is exact in absolute terms only,
  the price of taking delta from O (one pass over dO and O); FlashAttention-2 does the same. Full
  attention (attention.py) takes delta from the rounded dP itself and does not show it.

Shapes: q (..., T, Dh), k (..., S, Dh), v (..., S, Dv). NumPy arrays (and CuPy float64 ones) take the
tiled loops below; CuPy float32 arrays run the CUDA kernels of the appendix (Dv = Dh <= 128), built for
sm_80 (A100) and sm_90 (H100, H200). With Dh > 64 a block needs 92 to 150 KiB of shared memory, more than
consumer GPUs (sm_86, sm_89: 99 KiB) give one, so there keep Dh <= 64. tests/cuda runs the same kernels on
a CPU.
Imports attention.py (get_xp, sum_to_shape and its input checks; the demo also attention_forward).
"""
import collections
import functools
import math
import string

import numpy as np

from attention import check_attention_inputs, check_size, check_upstream, describe, get_xp, sum_to_shape

# ----------------------------------------------------------------------------------------------------
# The algorithm: the equations above, loop for loop (NumPy, or CuPy float64 on a GPU).


def _flash_forward_tiled(q, k, v, band, scale, block_q, block_k):
    """The forward of the module docstring: out and lse, one query tile Q_i at a time.

    q (..., T, Dh), k (..., S, Dh), v (..., S, Dv), leading axes broadcast; band = (left, right) from _band;
    block_q, block_k any positive tile sizes (the last tile of each sequence may be partial).
    Returns out (..., T, Dv) and lse (..., T); a row with no allowed key gets out = 0 and lse = -inf.
    Besides out and lse it holds, per query tile, m and l (block_q,), O (block_q, Dv) and one tile of
    scores S_ij (block_q, block_k): never T x S.
    """
    xp = get_xp(q)
    T, S = q.shape[-2], k.shape[-2]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    out = xp.zeros(lead + (T, v.shape[-1]), dtype=q.dtype)    # (..., T, Dv)
    lse = xp.zeros(lead + (T,), dtype=q.dtype)                 # (..., T)
    for r0 in range(0, T, block_q):
        r1 = min(r0 + block_q, T)                              # the last tile may be partial
        Q_i = q[..., r0:r1, :]                                 # (..., bq, Dh)
        m = xp.full(lead + (r1 - r0,), -np.inf, dtype=q.dtype)  # (..., bq) running row max
        l = xp.zeros(lead + (r1 - r0,), dtype=q.dtype)         # (..., bq) running row sum
        O = xp.zeros(lead + (r1 - r0, v.shape[-1]), dtype=q.dtype)  # (..., bq, Dv) unnormalised
        for c0 in _tiles_seen(r0, r1, T, S, band, block_k):   # only the key tiles inside the band
            c1 = min(c0 + block_k, S)
            K_j, V_j = k[..., c0:c1, :], v[..., c0:c1, :]      # (..., bk, Dh), (..., bk, Dv)
            S_ij = _tile_scores(Q_i, K_j, r0, c0, T, S, band, scale)  # (..., bq, bk)
            m_new = xp.maximum(m, S_ij.max(axis=-1))           # (..., bq)
            # A row that has seen only -inf so far keeps m_new = -inf; shifting by 0 instead keeps
            # exp(-inf - 0) = 0 where exp(-inf - (-inf)) would be NaN.
            m_safe = xp.where(xp.isneginf(m_new), 0, m_new)    # (..., bq)
            P_ij = xp.exp(S_ij - m_safe[..., None])            # (..., bq, bk)
            alpha = xp.exp(m - m_safe)                         # (..., bq) 0 on the first tile
            l = alpha * l + P_ij.sum(axis=-1)                  # (..., bq)
            O = alpha[..., None] * O + P_ij @ V_j              # (..., bq, Dv)
            m = m_new
        empty = l == 0                                         # rows with no allowed key
        out[..., r0:r1, :] = O / xp.where(empty, 1, l)[..., None]  # O_i = O / l
        lse[..., r0:r1] = xp.where(empty, -xp.inf, m + xp.log(xp.where(empty, 1, l)))  # lse_i = m + log(l)
    return out, lse


def _flash_backward_tiled(dout, q, k, v, out, lse, band, scale, block_q, block_k):
    """The backward of the module docstring: dq, dk, dv, recomputing each tile's P from lse.

    dout, out (..., T, Dv), lse (..., T) have the forward's broadcast leading axes; q, k, v are its inputs.
    Key tiles outside, query tiles inside (the dK, dV kernel's order): dK_j and dV_j are finished tile by
    tile, dQ_i gathers a term from every key tile of its band. Returns dq (..., T, Dh), dk (..., S, Dh),
    dv (..., S, Dv) with out's leading axes; the caller sums the axes that were broadcast.
    """
    xp = get_xp(dout)
    T, S = q.shape[-2], k.shape[-2]
    lead = out.shape[:-2]
    dq = xp.zeros(lead + q.shape[-2:], dtype=q.dtype)          # (..., T, Dh)
    dk = xp.zeros(lead + k.shape[-2:], dtype=k.dtype)          # (..., S, Dh)
    dv = xp.zeros(lead + v.shape[-2:], dtype=v.dtype)          # (..., S, Dv)
    delta = (dout * out).sum(axis=-1)                          # (..., T) rowsum(dO * O)
    # A row with no allowed key (causal with T > S, or a window past the keys) has lse = -inf and every
    # S_ij = -inf; shifting it by 0 gives P = exp(-inf) = 0 instead of NaN.
    lse_safe = xp.where(xp.isneginf(lse), 0, lse)              # (..., T)
    for c0 in range(0, S, block_k):
        c1 = min(c0 + block_k, S)
        K_j, V_j = k[..., c0:c1, :], v[..., c0:c1, :]          # (..., bk, Dh), (..., bk, Dv)
        # The query tiles that see K_j: the same band seen from the keys (T, S and left, right swapped).
        for r0 in _tiles_seen(c0, c1, S, T, band[::-1], block_q):
            r1 = min(r0 + block_q, T)
            Q_i, dO_i = q[..., r0:r1, :], dout[..., r0:r1, :]  # (..., bq, Dh), (..., bq, Dv)
            S_ij = _tile_scores(Q_i, K_j, r0, c0, T, S, band, scale)  # (..., bq, bk) recomputed
            P = xp.exp(S_ij - lse_safe[..., r0:r1, None])      # (..., bq, bk) = forward's softmax
            dv[..., c0:c1, :] += xp.swapaxes(P, -1, -2) @ dO_i  # (..., bk, Dv)
            dP = dO_i @ xp.swapaxes(V_j, -1, -2)               # (..., bq, bk)
            dS = P * (dP - delta[..., r0:r1, None])            # (..., bq, bk)
            dq[..., r0:r1, :] += (dS @ K_j) * scale            # (..., bq, Dh)
            dk[..., c0:c1, :] += (xp.swapaxes(dS, -1, -2) @ Q_i) * scale  # (..., bk, Dh)
    return dq, dk, dv


def _tile_scores(Q_i, K_j, r0, c0, T, S, band, scale):
    """S_ij = Q_i K_j^T * scale for the tile whose first query is r0 and first key c0, -inf where query r
    may not attend key c: allowed iff p - left <= c <= p + right, p = r + (S - T) (absolute positions)."""
    xp = get_xp(Q_i)
    S_ij = (Q_i @ xp.swapaxes(K_j, -1, -2)) * scale            # (..., bq, bk)
    p = r0 + (S - T) + xp.arange(Q_i.shape[-2])[:, None]       # (bq, 1) aligned query positions
    c = c0 + xp.arange(K_j.shape[-2])[None, :]                 # (1, bk) key positions
    return xp.where((p - band[0] <= c) & (c <= p + band[1]), S_ij, -xp.inf)


def _band(T, S, causal, window):
    """(left, right) as integers: None (unbounded) becomes T + S, which reaches every key from every
    query (and fits the kernels' int32); causal caps right at 0."""
    left, right = (min(T + S, side) if side is not None else T + S for side in (window or (None, None)))
    return left, (min(right, 0) if causal else right)


def _tiles_seen(r0, r1, T, S, band, block):
    """Starts of the block-row tiles of keys that queries r0 .. r1 - 1 may attend between them: keys p0 - left
    to p1 + right (p = i + (S - T)), one unbroken band since each row's window is one step right of the
    previous row's. Tiles wholly outside it are not visited."""
    lo, hi = max(0, r0 + (S - T) - band[0]), min(S, r1 - 1 + (S - T) + band[1] + 1)   # keys [lo, hi)
    return range(lo - lo % block, hi, block) if lo < hi else range(0)


# ----------------------------------------------------------------------------------------------------
# The public functions: attention.py's contract. NumPy arrays (and CuPy float64) run the loops above,
# CuPy float32 arrays the CUDA kernels of the appendix.


def flash_attention_forward(q, k, v, causal=False, scale=None, window=None, block_q=128, block_k=128):
    """out = softmax(q k^T * scale, causal, window) v, computed tile by tile (see the module docstring).

    q (..., T, Dh), k (..., S, Dh), v (..., S, Dv); leading axes broadcast. causal: True or False.
    scale: a positive number, 1 / sqrt(Dh) by default. window: None or (left, right) as in attention.py.
    block_q, block_k: tile sizes of the tiled loops (positive integers; T and S need not be multiples of
    them). CuPy float32 inputs run the CUDA kernels instead, with their own 64 x 64 tiles; they need
    Dv = Dh <= 128 (ValueError otherwise). CuPy float64 inputs run the tiled loops on the GPU; other
    CuPy dtypes raise TypeError.
    Returns out (..., T, Dv) and cache, a dict:
        'q', 'k', 'v'   the inputs, as given (the backward recomputes the scores from them)
        'out'           the output (..., T, Dv), for delta = rowsum(dout * out)
        'lse'           (..., T) the per-row log-sum-exp of the scores, the only statistic the backward
                        needs (T numbers, not the T x S weights); -inf on rows with no allowed key
        'band'          (left, right) from _band (causal included): the backward visits the same tiles
        'scale', 'block_q', 'block_k'   the options, so the backward tiles the same way
    """
    _check_forward_inputs(q, k, v, causal, scale, window, block_q, block_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    band = _band(q.shape[-2], k.shape[-2], causal, window)
    if _uses_kernels(q):
        out, lse = _flash_forward_cuda(q, k, v, band, scale)
    else:
        out, lse = _flash_forward_tiled(q, k, v, band, scale, block_q, block_k)
    cache = {"q": q, "k": k, "v": v, "out": out, "lse": lse, "band": band, "scale": scale,
             "block_q": block_q, "block_k": block_k}
    return out, cache


def flash_attention_backward(dout, cache):
    """dq, dk, dv of flash_attention_forward, by recomputing each tile's probabilities from lse.

    dout: the gradient of out, with out's shape, dtype and array module (ValueError / TypeError otherwise).
    """
    fields = {"q", "k", "v", "out", "lse", "band", "scale", "block_q", "block_k"}
    if not isinstance(cache, dict) or set(cache) != fields:
        raise TypeError(f"cache must be the dict flash_attention_forward returned, got {describe(cache)}")
    q, k, v, out = cache["q"], cache["k"], cache["v"], cache["out"]
    check_upstream("dout", dout, out)
    if _uses_kernels(q):
        dq, dk, dv = _flash_backward_cuda(dout, q, k, v, out, cache["lse"], cache["band"], cache["scale"])
    else:
        dq, dk, dv = _flash_backward_tiled(dout, q, k, v, out, cache["lse"], cache["band"],
                                           cache["scale"], cache["block_q"], cache["block_k"])
    # Leading axes that were broadcast in the forward (one k shared by all heads, say) sum back.
    return sum_to_shape(dq, q.shape), sum_to_shape(dk, k.shape), sum_to_shape(dv, v.shape)


# ----------------------------------------------------------------------------------------------------
# Input checks: ValueError / TypeError "{name} must be {need}, got {got}". attention.py checks what
# every attention function takes; these add what flash's options and its CUDA kernels need.


def _uses_kernels(q):
    """True for CuPy float32 arrays, the CUDA kernels' input; CuPy float64 runs the tiled loops."""
    return get_xp(q) is not np and q.dtype == np.float32


def _check_forward_inputs(q, k, v, causal, scale, window, block_q, block_k):
    """attention.py's checks (arrays, shapes, dtypes, causal, scale, window), the tile sizes, and what the
    CUDA kernels need of CuPy inputs."""
    check_attention_inputs(q, k, v, causal=causal, scale=scale, window=window)
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        check_size(name, block, 1)
    if get_xp(q) is not np:
        if q.dtype not in (np.float32, np.float64):
            raise TypeError(f"q must be float32 (the CUDA kernels) or float64 (the tiled loops) as a CuPy "
                            f"array, got {q.dtype}")
        if q.dtype == np.float32:
            _check_kernel_inputs(q, k, v)


def _check_kernel_inputs(q, k, v):
    """What the CUDA kernels take beyond the contract: Dv = Dh <= 128, lengths within CUDA's grid."""
    Dh, widest = q.shape[-1], KERNEL_HEAD_WIDTHS[-1]
    if Dh > widest:
        raise ValueError(f"q must have a head width Dh <= {widest} for the CUDA kernels (CuPy float32; "
                         f"float64 runs the tiled loops), got Dh = {Dh} in shape {q.shape}")
    if v.shape[-1] != Dh:
        raise ValueError(f"v must have q's head width {Dh} for the CUDA kernels (CuPy float32), got shape "
                         f"{v.shape}")
    longest = _MAX_TILES * _TILE                               # one block per tile on the grid's y axis
    for name, n in (("q", q.shape[-2]), ("k", k.shape[-2])):
        if n > longest:
            raise ValueError(f"{name} must have at most {longest} rows for the CUDA kernels ({_MAX_TILES} "
                             f"tiles of {_TILE}, CUDA's grid limit), got {n}")


# ====================================================================================================
# Appendix: the GPU path. The same algorithm as CUDA kernels, for CuPy float32 arrays.
#
# New to CUDA? Read tests/cuda/example_kernels.cu first (a block reduction, a warp-per-row softmax, a
# shared-memory transpose, float4 loads), with the GPU-model table at the top of tests/cuda/cuda_shim.h:
# what a grid, a block, a thread, shared memory, a barrier and a warp shuffle are.
#
# _KERNEL_TEMPLATE holds every kernel, with the Python constants below (_TILE, _THREADS, _PAD,
# KERNEL_HEAD_WIDTHS) written into it, so the compiled source and the launch plans cannot disagree.
# _forward_launches and _backward_launches say how to run the kernels (kernel, grid, block, arguments,
# shared memory) without running anything: the same plan runs on a GPU through CuPy (_run_on_gpu) and on a
# CPU through the C++ shim in tests/cuda. The kernels take (BH, T, Dh) C-contiguous float32 arrays: the
# wrappers at the end flatten the leading axes into BH = batch * heads.

_TILE = 64                               # rows of every query and key tile (BLOCK_Q = BLOCK_K)
_THREADS = 256                           # threads per block
_PAD = 4                                 # floats added to every shared-memory row (bank conflicts)
KERNEL_HEAD_WIDTHS = (32, 64, 96, 128)   # compiled widths; Dh runs on the smallest one >= Dh
_MAX_TILES = 65535                       # CUDA's limit on gridDim.y, where the tiles of a sequence go

_KERNEL_TEMPLATE = string.Template(r"""
// flash.py's CUDA kernels: the algorithm of flash.py's docstring, float32, one symbol for one symbol, with
// $TILE-row tiles, $THREADS threads a block and head widths $WIDTHS (flash.py's Python constants). NVRTC
// (cupy.RawModule) compiles it with no headers; tests/cuda compiles the same text as C++ for a CPU.
// New to CUDA: read tests/cuda/example_kernels.cu and the table at the top of tests/cuda/cuda_shim.h first.
//
// flash_forward:        one block per (batch*head, query tile Q_i), over the key tiles K_j of its band:
//                       the online softmax, then O_i = O / l, lse_i = m + log(l) (no key: 0 and -inf)
// flash_backward_delta: delta = rowsum(dO * O)  (see "Accuracy in float32" in flash.py's docstring)
// flash_backward_dq:    one block per query tile Q_i, over the key tiles of its band:
//                       P = exp(S - lse), dP = dO V^T, dS = P * (dP - delta), dQ_i += dS K_j * scale
// flash_backward_dkdv:  one block per key tile K_j, over the query tiles whose band holds it:
//                       the same P and dS, dV_j += P^T dO, dK_j += dS^T Q_i * scale
// Each block owns every number it writes (the FlashAttention-2 split): no atomics, deterministic.
//
// How a block divides the work (all kernels alike). THREADS = 256 threads own a 64-row tile; they form
// 16 groups of GROUP = 16 lanes (half a warp), and group g owns rows 4g .. 4g + 3 (ROWS = 4).
//   - A 64 x 64 score-like tile (S, P, dP, dS) is register-tiled: a thread holds its 4 rows x 4 columns,
//     column = lane + 16 c. The 16 lanes of a group read 16 different rows of the other operand, whose
//     shared-memory rows are padded by PAD floats so those reads fall in different banks.
//   - A 64 x Dh output-like tile (O, dQ, dK, dV) is register-tiled the same way: 4 rows x HEAD / 16
//     columns, in chunks of VEC adjacent columns (chunk c starts at column (lane + 16 c) * VEC) so they
//     move as float4 (or float2).
//   - A row's max and sum are combined across the 16 lanes of its group with warp shuffles.
// Scores are kept in base 2 (exp(x) = exp2(x * log2 e), one hardware instruction), so m is in base-2
// units; lse is written in natural-log units, as the tiled loops'.
//
// Sizes: a head width Dh runs on the smallest compiled HEAD >= Dh, the extra columns zero in shared memory
// (they add 0 to Q K^T and are never written out). Any T, S: a partial tile is zero-filled and masked.

#ifndef SHARED_MEMORY
#define SHARED_MEMORY(name) extern __shared__ __align__(16) float name[]
#endif

// From flash.py: rows of a query and a key tile, threads per block (8 warps), floats padding a shared row.
constexpr int BLOCK_Q = $TILE, BLOCK_K = $TILE, THREADS = $THREADS, PAD = $PAD;
constexpr int GROUP = 16;               // lanes sharing the same rows
constexpr int ROWS = 4;                 // rows per thread: (THREADS / GROUP) * ROWS = 64
constexpr int COLS_S = 4;               // score columns per thread: GROUP * COLS_S = 64
constexpr int P_STRIDE = BLOCK_K + PAD; // padded row of the shared P (or dS) tile
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
static_assert((THREADS / GROUP) * ROWS == BLOCK_Q && BLOCK_Q == BLOCK_K, "a group's rows tile the block");
static_assert(GROUP * COLS_S == BLOCK_K, "a group's lanes cover the score columns");
// float4 access to shared memory faults on a GPU unless its address is a multiple of 16 bytes (a CPU does
// not care): every shared row, and so every tile, must start on a multiple of 4 floats.
static_assert(P_STRIDE % 4 == 0, "rows of the shared P / dS tile start on 16-byte boundaries");

// Sizes that follow from the compiled head width HEAD.
template <int HEAD>
struct Width {
  static constexpr int STRIDE = HEAD + PAD;                    // padded shared row (16-byte aligned)
  static constexpr int COLS = HEAD / GROUP;                    // output columns per thread
  static constexpr int VEC = COLS % 4 == 0 ? 4 : (COLS % 2 == 0 ? 2 : 1);  // columns per chunk
  static constexpr int CHUNKS = COLS / VEC;
  static constexpr int TILE = BLOCK_Q * STRIDE;                // floats of one shared 64 x HEAD tile
  static constexpr int SLOTS = BLOCK_Q * HEAD / 4 / THREADS;   // float4s per thread in a tile copy
  static_assert(STRIDE % 4 == 0, "rows of a shared tile start on 16-byte boundaries (float4 access)");
};

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float4 load4(const float* p) { return reinterpret_cast<const float4*>(p)[0]; }

// Component i of a float4; after unrolling i is a constant, so this is just a register.
__device__ __forceinline__ float component(const float4& a, int i) {
  return i == 0 ? a.x : i == 1 ? a.y : i == 2 ? a.z : a.w;
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  return fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, acc))));
}

// VEC adjacent floats of shared memory in one load.
template <int VEC>
__device__ __forceinline__ void load_vec(const float* p, float* x) {
  if constexpr (VEC == 4) {
    const float4 t = load4(p); x[0] = t.x; x[1] = t.y; x[2] = t.z; x[3] = t.w;
  } else if constexpr (VEC == 2) {
    const float2 t = reinterpret_cast<const float2*>(p)[0]; x[0] = t.x; x[1] = t.y;
  } else {
    x[0] = p[0];
  }
}

// Max and sum over the 16 lanes of a group (lanes that differ only in their low 4 bits).
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int offset = GROUP / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, offset));
  return x;
}

__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = GROUP / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

// May query i attend key j? Iff p - left <= j <= p + right, p = i + (S - T) (flash.py's _band makes
// causal right = 0 and an unbounded side T + S). Rows i >= T and keys j >= S are the zero padding of a
// partial tile: never.
__device__ __forceinline__ bool allowed(int i, int j, int T, int S, int left, int right) {
  const int p = i + (S - T);
  return i < T && j < S && p - left <= j && j <= p + right;
}

// The 64-row tiles [first, end) of keys that the query tile starting at r0 may attend: keys p0 - left ..
// p1 + right, one unbroken band; tiles wholly outside it are never visited. With (T, S) and (left, right)
// swapped, r0 a key tile: the query tiles that attend it.
__device__ __forceinline__ void tiles_seen(int r0, int T, int S, int left, int right, int& first, int& end) {
  const int lo = max(0, r0 + (S - T) - left), hi = min(S, min(r0 + BLOCK_Q, T) + (S - T) + right);
  first = lo / BLOCK_K;
  end = lo < hi ? (hi + BLOCK_K - 1) / BLOCK_K : first;
}

// ---- Copying a 64 x Dh tile (rows of Dh floats, contiguous in global memory) into shared memory ----
// Rows >= n_rows and columns >= Dh become 0. The copy has two halves, fetch (global -> registers) and
// store (registers -> shared), so the forward fetches its next tile before computing on the current one
// and stores it after: the global-memory latency hides behind arithmetic (software pipelining).
template <int HEAD>
struct TileRegs { float4 x[Width<HEAD>::SLOTS]; };

template <int HEAD>
__device__ __forceinline__ void fetch_tile(TileRegs<HEAD>& regs, const float* src, int n_rows, int Dh) {
  constexpr int ROW_SLOTS = HEAD / 4;
  // float4 loads need Dh % 4 == 0 and a 16-byte aligned base; otherwise four guarded scalar loads.
  const bool vector_ok = Dh % 4 == 0 && reinterpret_cast<unsigned long long>(src) % 16 == 0;
#pragma unroll
  for (int s = 0; s < Width<HEAD>::SLOTS; ++s) {
    const int slot = threadIdx.x + s * THREADS;              // consecutive threads, consecutive columns
    const int r = slot / ROW_SLOTS, c = (slot % ROW_SLOTS) * 4;
    const float* p = src + (long long)r * Dh + c;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < n_rows && vector_ok) {
      if (c < Dh) x = load4(p);
    } else if (r < n_rows) {
      x = make_float4(c < Dh ? p[0] : 0.f, c + 1 < Dh ? p[1] : 0.f, c + 2 < Dh ? p[2] : 0.f,
                      c + 3 < Dh ? p[3] : 0.f);
    }
    regs.x[s] = x;
  }
}

template <int HEAD>
__device__ __forceinline__ void store_tile(float* tile, const TileRegs<HEAD>& regs) {
  constexpr int ROW_SLOTS = HEAD / 4;
#pragma unroll
  for (int s = 0; s < Width<HEAD>::SLOTS; ++s) {
    const int slot = threadIdx.x + s * THREADS;
    const int r = slot / ROW_SLOTS, c = (slot % ROW_SLOTS) * 4;
    reinterpret_cast<float4*>(tile + r * Width<HEAD>::STRIDE + c)[0] = regs.x[s];
  }
}

template <int HEAD>
__device__ __forceinline__ void load_tile(float* tile, const float* src, int n_rows, int Dh) {
  TileRegs<HEAD> regs;
  fetch_tile<HEAD>(regs, src, n_rows, Dh);
  store_tile<HEAD>(tile, regs);
}

// ---- The two register-tiled products every kernel is made of ----

// acc[r][c] += A[row0 + r, :] . B[lane + 16 c, :]: this thread's 4 x 4 block of A B^T (A, B 64 x HEAD
// tiles in shared memory). Each step is 8 float4 loads feeding 64 independent FMAs; the loop stays
// rolled so that HEAD <= 64 fits in 128 registers (register-wise two blocks per SM) and compiles quickly.
template <int HEAD>
__device__ __forceinline__ void rows_dot_rows(float (&acc)[ROWS][COLS_S], const float* A, const float* B,
                                              int row0, int lane) {
  constexpr int STRIDE = Width<HEAD>::STRIDE;
#pragma unroll 1
  for (int d = 0; d < HEAD; d += 4) {
    float4 a[ROWS], b[COLS_S];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) a[r] = load4(A + (row0 + r) * STRIDE + d);   // one address per group
#pragma unroll
    for (int c = 0; c < COLS_S; ++c) b[c] = load4(B + (lane + GROUP * c) * STRIDE + d);
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int c = 0; c < COLS_S; ++c) acc[r][c] = dot4(a[r], b[c], acc[r][c]);
  }
}

// acc[r][:] += W[row0 + r, :] X: W a 64 x 64 tile (P or dS, rows of P_STRIDE), X a 64 x HEAD tile; this
// thread's 4 rows x HEAD / 16 columns. Each step takes 4 rows of X: 4 + 4 * CHUNKS loads, 16 * COLS FMAs.
template <int HEAD>
__device__ __forceinline__ void rows_times_tile(float (&acc)[ROWS][Width<HEAD>::COLS], const float* W,
                                                const float* X, int row0, int lane) {
  using Wd = Width<HEAD>;
#pragma unroll 1
  for (int j = 0; j < BLOCK_K; j += 4) {
    float4 w[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) w[r] = load4(W + (row0 + r) * P_STRIDE + j);   // W[row, j .. j + 3]
#pragma unroll
    for (int jj = 0; jj < 4; ++jj)
#pragma unroll
      for (int ch = 0; ch < Wd::CHUNKS; ++ch) {
        float x[Wd::VEC];
        load_vec<Wd::VEC>(X + (j + jj) * Wd::STRIDE + (lane + GROUP * ch) * Wd::VEC, x);
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
          for (int e = 0; e < Wd::VEC; ++e) {
            float& out = acc[r][ch * Wd::VEC + e];
            out = fmaf(component(w[r], jj), x[e], out);
          }
      }
  }
}

// Write factor * acc, this thread's rows x columns, into a tile of a (rows, Dh) array; rows >= n_rows and
// columns >= Dh are padding and are skipped.
template <int HEAD>
__device__ __forceinline__ void write_rows(float* dst, const float (&acc)[ROWS][Width<HEAD>::COLS], int row0,
                                           int lane, int n_rows, int Dh, float factor) {
  using Wd = Width<HEAD>;
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int ch = 0; ch < Wd::CHUNKS; ++ch)
#pragma unroll
      for (int e = 0; e < Wd::VEC; ++e) {
        const int col = (lane + GROUP * ch) * Wd::VEC + e;
        if (row0 + r < n_rows && col < Dh) dst[(long long)(row0 + r) * Dh + col] = acc[r][ch * Wd::VEC + e] * factor;
      }
}

// ============================================ forward ============================================
// Block (bh = blockIdx.x, query tile). Shared memory: Q_i, K_j, V_j (64 x STRIDE each), P (64 x P_STRIDE).

template <int HEAD>
__device__ __forceinline__ void flash_forward(float* smem, const float* __restrict__ q,
                                              const float* __restrict__ k, const float* __restrict__ v,
                                              float* __restrict__ out, float* __restrict__ lse, int T, int S,
                                              int Dh, int left, int right, float scale) {
  using Wd = Width<HEAD>;
  float *Qs = smem, *Ks = Qs + Wd::TILE, *Vs = Ks + Wd::TILE, *Ps = Vs + Wd::TILE;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BLOCK_Q;      // last tiles first: causal's longest rows
  const int lane = threadIdx.x % GROUP;
  const int row0 = threadIdx.x / GROUP * ROWS;                // this thread's rows: q0 + row0 .. + 3
  const long long bh = blockIdx.x;
  q += (bh * T + q0) * Dh;
  out += (bh * T + q0) * Dh;
  lse += bh * T + q0;
  k += bh * S * Dh;
  v += bh * S * Dh;
  const float scale2 = scale * LOG2E;                         // scores in base-2 units
  int first, end;
  tiles_seen(q0, T, S, left, right, first, end);

  load_tile<HEAD>(Qs, q, T - q0, Dh);
  if (first < end) load_tile<HEAD>(Ks, k + (long long)first * BLOCK_K * Dh, S - first * BLOCK_K, Dh);
  __syncthreads();

  // m = -inf, l = 0, O = 0. Each lane keeps its own share of l (the sum over its columns): the lanes of
  // a group rescale by the same alpha, so the shares stay consistent and are added up once, at the end.
  float m[ROWS], l[ROWS] = {}, O[ROWS][Wd::COLS] = {};
#pragma unroll
  for (int r = 0; r < ROWS; ++r) m[r] = neg_inf();

  TileRegs<HEAD> next;                                        // the tile in flight during the arithmetic
  for (int t = first; t < end; ++t) {
    const int k0 = t * BLOCK_K;
    fetch_tile<HEAD>(next, v + (long long)k0 * Dh, S - k0, Dh);  // V_j arrives while S is computed

    // S = Q_i K_j^T * scale, -inf where not allowed
    float s[ROWS][COLS_S] = {};
    rows_dot_rows<HEAD>(s, Qs, Ks, row0, lane);
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int c = 0; c < COLS_S; ++c)
        s[r][c] = allowed(q0 + row0 + r, k0 + lane + GROUP * c, T, S, left, right) ? s[r][c] * scale2 : neg_inf();

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      // m_new = max(m, rowmax(S))
      static_assert(COLS_S == 4, "the row max below reads exactly four score columns");
      float row_max = fmaxf(fmaxf(s[r][0], s[r][1]), fmaxf(s[r][2], s[r][3]));
      const float m_new = fmaxf(m[r], group_max(row_max));
      // A row that has seen no allowed key has m_new = -inf: shift by 0 instead, so that
      // exp(-inf - 0) = 0 where exp(-inf - (-inf)) would be NaN.
      const float m_safe = m_new == neg_inf() ? 0.f : m_new;
      // alpha = exp(m - m_new)
      const float alpha = exp2f(m[r] - m_safe);
      // P = exp(S - m_new);  l = alpha * l + rowsum(P)
      l[r] *= alpha;
#pragma unroll
      for (int c = 0; c < COLS_S; ++c) {
        const float p = exp2f(s[r][c] - m_safe);
        l[r] += p;
        Ps[(row0 + r) * P_STRIDE + lane + GROUP * c] = p;
      }
      // O = alpha * O   (+ P V_j below)
#pragma unroll
      for (int c = 0; c < Wd::COLS; ++c) O[r][c] *= alpha;
      m[r] = m_new;
    }
    store_tile<HEAD>(Vs, next);
    __syncthreads();                                          // P and V_j visible to the whole block

    if (t + 1 < end) fetch_tile<HEAD>(next, k + (long long)(k0 + BLOCK_K) * Dh, S - k0 - BLOCK_K, Dh);
    // O += P V_j
    rows_times_tile<HEAD>(O, Ps, Vs, row0, lane);
    if (t + 1 < end) store_tile<HEAD>(Ks, next);          // K_j was last read before the barrier above
    __syncthreads();                                          // K_{j+1} visible; P, V_j free to overwrite
  }

  // O_i = O / l,  lse_i = m + log(l) in natural-log units; a row with no allowed key has l = 0: O_i = 0,
  // lse_i = -inf.
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float l_row = group_sum(l[r]);
    const float inv_l = l_row > 0.f ? 1.f / l_row : 0.f;
#pragma unroll
    for (int c = 0; c < Wd::COLS; ++c) O[r][c] *= inv_l;
    if (lane == 0 && q0 + row0 + r < T) lse[row0 + r] = l_row > 0.f ? (m[r] + log2f(l_row)) * LN2 : neg_inf();
  }
  write_rows<HEAD>(out, O, row0, lane, T - q0, Dh, 1.f);
}

// ============================================ backward ============================================

// delta = rowsum(dO * O), one warp per row of the (BH * T, Dh) arrays.
extern "C" __global__ void __launch_bounds__(THREADS)
    flash_backward_delta(const float* __restrict__ out, const float* __restrict__ dout,
                         float* __restrict__ delta, int n_rows, int Dh) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
  float acc = 0.f;
  if (row < n_rows)
    for (int d = lane; d < Dh; d += 32) acc = fmaf(dout[(long long)row * Dh + d], out[(long long)row * Dh + d], acc);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffff, acc, offset);
  if (row < n_rows && lane == 0) delta[row] = acc;
}

// P = exp(S * scale - lse), recomputed from the forward's lse (both in base-2 units here); 0 where the
// key is not allowed, which also covers a row with no allowed key (its lse is -inf).
__device__ __forceinline__ float recomputed_p(float s, float scale2, float lse2, bool is_allowed) {
  return is_allowed ? exp2f(s * scale2 - lse2) : 0.f;
}

// dQ. Block (bh = blockIdx.x, query tile). Shared memory: Q_i, dO_i (kept), K_j, V_j, dS.
template <int HEAD>
__device__ __forceinline__ void flash_backward_dq(float* smem, const float* __restrict__ q,
                                                  const float* __restrict__ k, const float* __restrict__ v,
                                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                                  const float* __restrict__ dout, float* __restrict__ dq, int T,
                                                  int S, int Dh, int left, int right, float scale) {
  using Wd = Width<HEAD>;
  float *Qs = smem, *dOs = Qs + Wd::TILE, *Ks = dOs + Wd::TILE, *Vs = Ks + Wd::TILE, *dSs = Vs + Wd::TILE;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BLOCK_Q;
  const int lane = threadIdx.x % GROUP;
  const int row0 = threadIdx.x / GROUP * ROWS;                // this thread's query rows
  const long long bh = blockIdx.x;
  q += (bh * T + q0) * Dh;
  dout += (bh * T + q0) * Dh;
  dq += (bh * T + q0) * Dh;
  lse += bh * T + q0;
  delta += bh * T + q0;
  k += bh * S * Dh;
  v += bh * S * Dh;
  const float scale2 = scale * LOG2E;
  int first, end;
  tiles_seen(q0, T, S, left, right, first, end);

  load_tile<HEAD>(Qs, q, T - q0, Dh);
  load_tile<HEAD>(dOs, dout, T - q0, Dh);
  float lse2[ROWS], delta_r[ROWS], dQ[ROWS][Wd::COLS] = {};
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const bool real = q0 + row0 + r < T;                      // padding rows are masked, never read
    lse2[r] = real ? lse[row0 + r] * LOG2E : 0.f;
    delta_r[r] = real ? delta[row0 + r] : 0.f;
  }

  for (int t = first; t < end; ++t) {
    const int k0 = t * BLOCK_K;
    __syncthreads();                                          // the previous K_j and dS are no longer read
    load_tile<HEAD>(Ks, k + (long long)k0 * Dh, S - k0, Dh);
    load_tile<HEAD>(Vs, v + (long long)k0 * Dh, S - k0, Dh);
    __syncthreads();

    // S = Q_i K_j^T,  dP = dO_i V_j^T
    float s[ROWS][COLS_S] = {}, dP[ROWS][COLS_S] = {};
    rows_dot_rows<HEAD>(s, Qs, Ks, row0, lane);
    rows_dot_rows<HEAD>(dP, dOs, Vs, row0, lane);
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int c = 0; c < COLS_S; ++c) {
        // P = exp(S * scale - lse);  dS = P * (dP - delta)
        const bool ok = allowed(q0 + row0 + r, k0 + lane + GROUP * c, T, S, left, right);
        const float P = recomputed_p(s[r][c], scale2, lse2[r], ok);
        dSs[(row0 + r) * P_STRIDE + lane + GROUP * c] = P * (dP[r][c] - delta_r[r]);
      }
    __syncthreads();                                          // dS visible to the whole block
    // dQ_i += dS K_j   (times scale once, at the end)
    rows_times_tile<HEAD>(dQ, dSs, Ks, row0, lane);
  }
  write_rows<HEAD>(dq, dQ, row0, lane, T - q0, Dh, scale);
}

// dK, dV. Block (bh = blockIdx.x, key tile). A thread's rows are keys and its score columns are queries:
// it works on the transposed tiles S^T = K_j Q_i^T, P^T, dP^T, dS^T. Shared memory: K_j, V_j (kept),
// Q_i, dO_i, one 64 x P_STRIDE tile holding P^T and then dS^T, and lse, delta of the query tile.
template <int HEAD>
__device__ __forceinline__ void flash_backward_dkdv(float* smem, const float* __restrict__ q,
                                                    const float* __restrict__ k, const float* __restrict__ v,
                                                    const float* __restrict__ lse,
                                                    const float* __restrict__ delta,
                                                    const float* __restrict__ dout, float* __restrict__ dk,
                                                    float* __restrict__ dv, int T, int S, int Dh, int left,
                                                    int right, float scale) {
  using Wd = Width<HEAD>;
  float *Ks = smem, *Vs = Ks + Wd::TILE, *Qs = Vs + Wd::TILE, *dOs = Qs + Wd::TILE;
  float* Ws = dOs + Wd::TILE;                                 // P^T, then dS^T
  float* lse2s = Ws + BLOCK_K * P_STRIDE;                     // (64,) lse * log2(e) of the query tile
  float* deltas = lse2s + BLOCK_Q;                            // (64,) delta of the query tile
  const int k0 = blockIdx.y * BLOCK_K;                        // first tiles first: causal's longest
  const int lane = threadIdx.x % GROUP;
  const int row0 = threadIdx.x / GROUP * ROWS;                // this thread's key rows
  const long long bh = blockIdx.x;
  k += (bh * S + k0) * Dh;
  v += (bh * S + k0) * Dh;
  dk += (bh * S + k0) * Dh;
  dv += (bh * S + k0) * Dh;
  q += bh * T * Dh;
  dout += bh * T * Dh;
  lse += bh * T;
  delta += bh * T;
  const float scale2 = scale * LOG2E;
  int first, end;
  tiles_seen(k0, S, T, right, left, first, end);              // the query tiles whose band holds K_j

  load_tile<HEAD>(Ks, k, S - k0, Dh);
  load_tile<HEAD>(Vs, v, S - k0, Dh);
  float dK[ROWS][Wd::COLS] = {}, dV[ROWS][Wd::COLS] = {};

  for (int i = first; i < end; ++i) {
    const int q0 = i * BLOCK_Q;
    __syncthreads();                                          // the previous Q_i, dO_i, dS^T no longer read
    load_tile<HEAD>(Qs, q + (long long)q0 * Dh, T - q0, Dh);
    load_tile<HEAD>(dOs, dout + (long long)q0 * Dh, T - q0, Dh);
    for (int r = threadIdx.x; r < BLOCK_Q; r += THREADS) {
      lse2s[r] = q0 + r < T ? lse[q0 + r] * LOG2E : 0.f;      // padding rows are masked, never read
      deltas[r] = q0 + r < T ? delta[q0 + r] : 0.f;
    }
    __syncthreads();

    // S^T = K_j Q_i^T;  P^T = exp(S^T * scale - lse)
    float P[ROWS][COLS_S] = {};
    rows_dot_rows<HEAD>(P, Ks, Qs, row0, lane);
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int c = 0; c < COLS_S; ++c) {
        const int query = lane + GROUP * c;
        const bool ok = allowed(q0 + query, k0 + row0 + r, T, S, left, right);
        P[r][c] = recomputed_p(P[r][c], scale2, lse2s[query], ok);
        Ws[(row0 + r) * P_STRIDE + query] = P[r][c];
      }
    // dP^T = V_j dO_i^T
    float dP[ROWS][COLS_S] = {};
    rows_dot_rows<HEAD>(dP, Vs, dOs, row0, lane);
    __syncthreads();                                          // P^T visible to the whole block
    // dV_j += P^T dO_i
    rows_times_tile<HEAD>(dV, Ws, dOs, row0, lane);
    __syncthreads();                                          // P^T no longer read
    // dS^T = P^T * (dP^T - delta)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int c = 0; c < COLS_S; ++c) {
        const int query = lane + GROUP * c;
        Ws[(row0 + r) * P_STRIDE + query] = P[r][c] * (dP[r][c] - deltas[query]);
      }
    __syncthreads();                                          // dS^T visible to the whole block
    // dK_j += dS^T Q_i   (times scale once, at the end)
    rows_times_tile<HEAD>(dK, Ws, Qs, row0, lane);
  }
  write_rows<HEAD>(dk, dK, row0, lane, S - k0, Dh, scale);
  write_rows<HEAD>(dv, dV, row0, lane, S - k0, Dh, 1.f);
}

// ---- The kernels CuPy launches: one set per compiled head width ----
// Up to HEAD = 64 a thread needs at most 128 registers, so registers allow two blocks per SM. Shared memory
// allows it too for the forward (HEAD = 64: 68 KiB a block); the backward kernels' 85 KiB a block fit
// twice in an sm_90 SM (228 KiB) but once in an sm_80 one (164 KiB).
#define FLASH_KERNELS(HEAD)                                                                              \
  extern "C" __global__ void __launch_bounds__(THREADS, HEAD <= 64 ? 2 : 1)                              \
      flash_forward_##HEAD(const float* q, const float* k, const float* v, float* out, float* lse,       \
                           int T, int S, int Dh, int left, int right, float scale) {                     \
    SHARED_MEMORY(smem);                                                                                 \
    flash_forward<HEAD>(smem, q, k, v, out, lse, T, S, Dh, left, right, scale);                         \
  }                                                                                                      \
  extern "C" __global__ void __launch_bounds__(THREADS, HEAD <= 64 ? 2 : 1)                              \
      flash_backward_dq_##HEAD(const float* q, const float* k, const float* v, const float* lse,         \
                               const float* delta, const float* dout, float* dq, int T, int S, int Dh,   \
                               int left, int right, float scale) {                                       \
    SHARED_MEMORY(smem);                                                                                 \
    flash_backward_dq<HEAD>(smem, q, k, v, lse, delta, dout, dq, T, S, Dh, left, right, scale);         \
  }                                                                                                      \
  extern "C" __global__ void __launch_bounds__(THREADS, HEAD <= 64 ? 2 : 1)                              \
      flash_backward_dkdv_##HEAD(const float* q, const float* k, const float* v, const float* lse,       \
                                 const float* delta, const float* dout, float* dk, float* dv, int T,     \
                                 int S, int Dh, int left, int right, float scale) {                      \
    SHARED_MEMORY(smem);                                                                                 \
    flash_backward_dkdv<HEAD>(smem, q, k, v, lse, delta, dout, dk, dv, T, S, Dh, left, right, scale);  \
  }

$KERNELS
""")

FLASH_KERNEL_SOURCE = _KERNEL_TEMPLATE.substitute(
    TILE=_TILE, THREADS=_THREADS, PAD=_PAD, WIDTHS=", ".join(map(str, KERNEL_HEAD_WIDTHS)),
    KERNELS="\n".join(f"FLASH_KERNELS({width})" for width in KERNEL_HEAD_WIDTHS))

_P_TILE = _TILE * (_TILE + _PAD)         # floats of the shared P / dS tile (rows padded)

# One kernel launch, kernel<<<grid, block, shared_mem>>>(*args): what CuPy runs, and what tests/cuda runs
# on a CPU (tests/cuda/cpu_cuda.py imports this definition).
Launch = collections.namedtuple("Launch", "kernel grid block args shared_mem")


def _sizes(q, k, band, scale):
    """BH, T, S of q (BH, T, Dh) and k (BH, S, Dh); the compiled width Dh runs on (its extra columns zero
    padding); the floats of one shared 64 x width tile (rows padded); the kernels' size arguments."""
    (BH, T, Dh), S = q.shape, k.shape[1]
    width = next(width for width in KERNEL_HEAD_WIDTHS if Dh <= width)
    args = (np.int32(T), np.int32(S), np.int32(Dh), np.int32(band[0]), np.int32(band[1]), np.float32(scale))
    return BH, T, S, width, _TILE * (width + _PAD), args


def _forward_launches(q, k, v, out, lse, band, scale):
    """The forward as launches: q (BH, T, Dh), k, v (BH, S, Dh) in; out (BH, T, Dh), lse (BH, T) out;
    band = (left, right) from _band. One block per 64-row tile (ceil(T / 64)) along the grid's y axis."""
    BH, T, S, width, tile, sizes = _sizes(q, k, band, scale)
    launches = [Launch(f"flash_forward_{width}", (BH, -(-T // _TILE), 1), (_THREADS, 1, 1),
                       (q, k, v, out, lse) + sizes, 4 * (3 * tile + _P_TILE))]   # Q_i, K_j, V_j, P
    return [launch for launch in launches if min(launch.grid) > 0]   # no rows: nothing to launch


def _backward_launches(q, k, v, out, lse, dout, dq, dk, dv, band, scale):
    """The backward as launches: delta = rowsum(dO * O), then dQ per query tile, dK and dV per key tile.

    delta (BH, T) is allocated here, with the arrays' own module. Every entry of dq, dk, dv is written.
    """
    BH, T, S, width, tile, sizes = _sizes(q, k, band, scale)
    delta = get_xp(q).empty((BH, T), dtype=np.float32)         # (BH, T)
    rows_per_block = _THREADS // 32                            # one warp per row
    launches = [
        Launch("flash_backward_delta", (-(-BH * T // rows_per_block), 1, 1), (_THREADS, 1, 1),
               (out, dout, delta, np.int32(BH * T), np.int32(q.shape[2])), 0),
        Launch(f"flash_backward_dq_{width}", (BH, -(-T // _TILE), 1), (_THREADS, 1, 1),
               (q, k, v, lse, delta, dout, dq) + sizes, 4 * (4 * tile + _P_TILE)),   # Q_i, dO_i, K_j, V_j, dS
        Launch(f"flash_backward_dkdv_{width}", (BH, -(-S // _TILE), 1), (_THREADS, 1, 1),
               (q, k, v, lse, delta, dout, dk, dv) + sizes,
               4 * (4 * tile + _P_TILE + 2 * _TILE)),          # K_j, V_j, Q_i, dO_i, P/dS, lse, delta
    ]
    return [launch for launch in launches if min(launch.grid) > 0]


CUDA_COMPILE_OPTIONS = ("--std=c++17",)  # NVRTC options of the kernels (tests/cuda compiles with the same)


@functools.cache
def _cuda_module(options=CUDA_COMPILE_OPTIONS):
    """FLASH_KERNEL_SOURCE as a cupy.RawModule, compiled on first use (importing flash.py compiles nothing)
    and kept for the life of the process, one per option set. NVRTC takes about half a minute; CuPy keeps
    the binary in its on-disk kernel cache, so later processes skip that."""
    import cupy
    return cupy.RawModule(code=FLASH_KERNEL_SOURCE, options=options)


def _run_on_gpu(launches):
    import cupy
    runtime = cupy.cuda.runtime
    # Beyond 48 KiB a block's shared memory is opt-in, up to a per-GPU limit (sm_80: 163 KiB, sm_90:
    # 227 KiB, sm_86 / sm_89: 99 KiB). Past it the launch fails with a bare CUDA "invalid argument".
    limit = runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, cupy.cuda.Device().id)
    needed = max((launch.shared_mem for launch in launches), default=0)
    if needed > limit:
        raise ValueError(f"q must have a head width whose kernels fit this GPU: they need {needed} bytes of "
                         f"shared memory a block, this GPU gives at most {limit}; use a narrower head or "
                         f"float64 (the tiled loops)")
    module = _cuda_module()
    for launch in launches:
        kernel = module.get_function(launch.kernel)
        if launch.shared_mem > 48 * 1024:                      # beyond 48 KiB a kernel must opt in
            kernel.max_dynamic_shared_size_bytes = launch.shared_mem
        kernel(launch.grid, launch.block, launch.args, shared_mem=launch.shared_mem)


def _as_heads(x, lead):
    """x (..., n, Dh) broadcast to lead + (n, Dh) and flattened to a C-contiguous (BH, n, Dh)."""
    xp = get_xp(x)
    shape = lead + x.shape[-2:]
    return xp.ascontiguousarray(xp.broadcast_to(x, shape)).reshape((math.prod(lead),) + x.shape[-2:])


def _flash_forward_cuda(q, k, v, band, scale):
    """out, lse of CuPy float32 q, k, v (checked by _check_kernel_inputs), with the broadcast leading axes."""
    xp, lead = get_xp(q), np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    (T, Dh), BH = q.shape[-2:], math.prod(lead)
    with q.device:                                             # allocate and launch on q's GPU
        out = xp.empty((BH, T, Dh), dtype=np.float32)          # (BH, T, Dh) every entry written
        lse = xp.empty((BH, T), dtype=np.float32)              # (BH, T)
        _run_on_gpu(_forward_launches(*(_as_heads(x, lead) for x in (q, k, v)), out, lse, band, scale))
    return out.reshape(lead + (T, Dh)), lse.reshape(lead + (T,))


def _flash_backward_cuda(dout, q, k, v, out, lse, band, scale):
    """dq, dk, dv with the leading axes of the (broadcast) output; the caller sums them back."""
    xp, lead, (T, Dh), S = get_xp(q), out.shape[:-2], q.shape[-2:], k.shape[-2]
    with q.device:                                             # allocate and launch on q's GPU
        q3, k3, v3, out3, dout3 = (_as_heads(x, lead) for x in (q, k, v, out, dout))
        dq, dk, dv = (xp.empty_like(x) for x in (q3, k3, v3))  # (BH, T, Dh), (BH, S, Dh) x 2
        lse2 = lse.reshape(math.prod(lead), T)                 # (BH, T)
        _run_on_gpu(_backward_launches(q3, k3, v3, out3, lse2, dout3, dq, dk, dv, band, scale))
    return dq.reshape(lead + (T, Dh)), dk.reshape(lead + (S, Dh)), dv.reshape(lead + (S, Dh))


# ----------------------------------------------------------------------------------------------------
# Demo


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")   # small matrices: a second BLAS thread would only wait (spinning)
    import argparse

    from attention import attention_forward

    parser = argparse.ArgumentParser(description="Flash attention equals full attention, in less memory.")
    parser.add_argument("--T", type=int, default=1000, help="sequence length (not a multiple of the tile)")
    parser.add_argument("--Dh", type=int, default=64, help="head width")
    args = parser.parse_args()

    # Times belong in benchmarks/bench_flash_cpu.py (warm-up, best of several runs); this shows equality.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, args.T, args.Dh)).astype(np.float32) for _ in range(3))
    # A bound from the float32 format (u = 2^-24) rather than one machine's rounding: each score
    # q.k * scale is off by at most Dh u scale sum_d |q_d k_d| (a dot product of Dh terms), which moves
    # its weight by that much relatively; the weighted sum of S values adds S u max|v|.
    u = 2.0 ** -24
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    score_error = args.Dh * u * float((np.abs(q64) @ np.abs(k64).swapaxes(1, 2)).max()) / np.sqrt(args.Dh)
    bound = float(np.abs(v64).max()) * (2 * score_error + 2 * args.T * u)
    for causal, window in ((False, None), (True, None), (True, (100, 0))):   # (100, 0): Mistral-style, 101 keys
        exact, _ = attention_forward(q64, k64, v64, causal=causal, window=window)
        full, full_cache = attention_forward(q, k, v, causal=causal, window=window)
        flash, cache = flash_attention_forward(q, k, v, causal=causal, window=window, block_q=128, block_k=128)
        err = float(np.abs(full - flash).max())
        print(f"causal={causal!s:5} window={window!s:8} T={args.T}  max |flash - full| = {err:.1e};  full "
              f"attention kept weights {full_cache['weights'].shape}, flash kept only lse {cache['lse'].shape}")
        for name, out in (("flash", flash), ("full", full)):
            assert np.abs(out - exact).max() <= bound, f"float32 {name} attention is beyond the rounding bound"
        assert cache["lse"].shape == (2, args.T) and "weights" not in cache
    print(f"Both are within the float32 rounding bound {bound:.1e} of float64 attention.")
    print("Flash attention gives the same output as full attention without the T x S matrix.")

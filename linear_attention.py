"""Linear attention: softmax's exp(q . k) replaced by a kernel phi(q) . phi(k), so the sums over keys
can be taken once and shared by every query (Katharopoulos et al. 2020, "Transformers are RNNs: Fast
Autoregressive Transformers with Linear Attention", arXiv:2006.16236).

Softmax attention weighs key j for query i by exp(q_i . k_j) and must hold all T x S of them. Writing the
similarity as phi(q_i) . phi(k_j) with a positive feature map lets the product be regrouped:

    phi(x)   = elu(x) + 1 = x + 1 if x > 0 else exp(x)      > 0 (a ReLU map could make a row's sum 0)
    KV       = sum_j phi(k_j) v_j^T                                                         (..., Dk, Dv)
    z        = sum_j phi(k_j)                                                               (..., Dk)
    out_i    = phi(q_i) KV / (phi(q_i) . z + eps)                                           (..., T, Dv)

the sums over the keys j that query i may attend: all of them, or, when causal, j <= i + (S - T)
(aligned at the bottom-right, as attention.py's causal_mask). Cost O((T + S) Dk Dv) time and no T x S
matrix: linear in the length where softmax attention is quadratic. What it costs: everything the keys
told the queries is squeezed into KV, a Dk x Dv matrix whatever S is, and the weights phi(q_i) . phi(k_j)
(all features positive) are smooth, never close to one-hot, so a query asking for one key among n gets
a blur of all n values: at Dk = 64 recall fails from a few dozen keys on, where softmax attention still
recalls among a thousand (the demo and experiments/efficiency_table.py measure both sides).

Backward, with den_i = phi(q_i) . z + eps, dnum_i = dout_i / den_i and dden_i = -(dout_i . out_i) / den_i:

    dphi(q_i) = dnum_i KV^T + dden_i z                 dKV = sum_i phi(q_i) dnum_i^T,  dz = sum_i dden_i phi(q_i)
    dphi(k_j) = v_j dKV^T + dz                          dv_j = dKV^T phi(k_j)
    dx        = dphi * phi'(x),   phi'(x) = min(phi(x), 1)   (1 where x > 0, exp(x) = phi(x) where x <= 0)

with the sums over the queries i that may attend key j.

Causal: the running sums KV_i = sum_{j <= i + S - T} phi(k_j) v_j^T differ per query. Keeping all of them
(a cumulative sum over positions) is O(T Dk Dv) memory, more than softmax attention's O(T S) once
Dk Dv > S. Instead (the paper's Algorithm 1) the forward keeps only phi(q), phi(k), v, out and den, and the
backward recomputes the running sums: forwards over the positions for dphi(q), backwards for dphi(k), dv.
Both sweeps go over blocks of `block` positions: a carried state (KV, z, or dKV, dz) holds what the keys
before the block contribute, and the keys inside the block enter through a masked (block x block) product
phi(Q_b) phi(K_b)^T, the same masked-quadratic form softmax attention uses, only block-sized. So the
Python loop has T / block steps and each is a few matrix products: O((T + S) Dk Dv + T block (Dk + Dv))
time, fast enough for T = 16k in NumPy (experiments/efficiency_table.py times it).

The recurrent view (linear_attention_step): with state = {'S': KV, 'z': z}, one new token updates
S += phi(k) v^T, z += phi(k) and reads out phi(q) S / (phi(q) . z + eps). A fixed-size state whatever the
length: an RNN (rnn.py), whose hidden state is a matrix updated by an outer product.

Shapes: q (..., T, Dk), k (..., S, Dk), v (..., S, Dv); leading axes broadcast. A query with no allowed key
(T > S, causal) returns zeros: its sums are empty, 0 / (0 + eps) = 0, and eps > 0 is required for that.
Imports attention.py (get_xp, sum_to_shape and its input checks; the demo also attention_forward) and
training.py (check_cache).
"""
import math
import numbers

import numpy as np

from attention import (check_attention_inputs, check_float_array, check_size, check_upstream, describe,
                       get_xp, sum_to_shape)
from training import check_cache

# ----------------------------------------------------------------------------------------------------
# The feature map


def feature_map_forward(x):
    """phi = elu(x) + 1: x + 1 where x > 0, exp(x) where x <= 0; strictly positive (until exp underflows).

    x (..., D) float. Returns phi (..., D) and cache = {'phi'}: phi alone gives the derivative.
    """
    check_float_array("x", x, "(..., D)")
    xp = get_xp(x)
    phi = xp.where(x > 0, x + 1, xp.exp(xp.minimum(x, 0)))     # (..., D) minimum: no overflow in the unused branch
    return phi, {"phi": phi}


def feature_map_backward(dphi, cache):
    """dx = dphi * min(phi, 1): phi' is 1 where x > 0 (there phi > 1) and exp(x) = phi where x <= 0 (phi <= 1)."""
    check_cache(cache, "feature_map_forward", {"phi"})
    phi = cache["phi"]
    check_upstream("dphi", dphi, phi)
    xp = get_xp(phi)
    return dphi * xp.minimum(phi, 1)                           # (..., D)


# ----------------------------------------------------------------------------------------------------
# Linear attention


def linear_attention_forward(q, k, v, causal=False, eps=1e-6, block=64):
    """out_i = phi(q_i) . sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j) + eps), j over the allowed keys.

    q (..., T, Dk), k (..., S, Dk), v (..., S, Dv), leading axes broadcast. causal: True or False
    (j <= i + (S - T)). eps: a finite number > 0. block: positions per step of the causal sweeps (an
    integer >= 1; changes the rounding, not the result).
    Returns out (..., T, Dv) and cache = {'map_q', 'map_k', 'v', 'out', 'den', 'causal', 'block'}: the
    feature maps' caches (phi(q), phi(k)), v, the output, den = phi(q_i) . z_i + eps (..., T), and the
    options. O((T + S)(Dk + Dv)) numbers: never a T x S matrix, and no running sum per position.
    """
    check_attention_inputs(q, k, v, causal=causal)
    check_eps(eps)
    check_size("block", block, 1)
    phi_q, map_q = feature_map_forward(q)                      # (..., T, Dk)
    phi_k, map_k = feature_map_forward(k)                      # (..., S, Dk)
    if causal:
        num, den = _causal_sums(phi_q, phi_k, v, eps, block)
    else:
        xp = get_xp(q)
        KV = xp.swapaxes(phi_k, -1, -2) @ v                    # (..., Dk, Dv) sum_j phi(k_j) v_j^T
        z = phi_k.sum(axis=-2)                                 # (..., Dk)     sum_j phi(k_j)
        num = phi_q @ KV                                       # (..., T, Dv)
        den = (phi_q @ z[..., None])[..., 0] + eps             # (..., T)
    out = num / den[..., None]                                 # (..., T, Dv)
    cache = {"map_q": map_q, "map_k": map_k, "v": v, "out": out, "den": den, "causal": bool(causal),
             "block": block}
    return out, cache


def linear_attention_backward(dout, cache):
    """dq, dk, dv of linear_attention_forward (the module docstring's equations), given dout (..., T, Dv).

    Causal: two sweeps over blocks recompute the running sums instead of reading stored ones.
    """
    check_cache(cache, "linear_attention_forward", {"map_q", "map_k", "v", "out", "den", "causal", "block"})
    phi_q, phi_k, v, out, den = (cache["map_q"]["phi"], cache["map_k"]["phi"], cache["v"], cache["out"],
                                 cache["den"])
    check_upstream("dout", dout, out)
    xp = get_xp(dout)
    dnum = dout / den[..., None]                               # (..., T, Dv)  out = num / den
    dden = -(dout * out).sum(axis=-1) / den                    # (..., T)      d(num / den)/dden = -out / den
    if cache["causal"]:
        dphi_q, dphi_k, dv = _causal_sums_backward(dnum, dden, phi_q, phi_k, v, cache["block"])
    else:
        KV = xp.swapaxes(phi_k, -1, -2) @ v                    # (..., Dk, Dv) recomputed: cheaper than storing
        z = phi_k.sum(axis=-2)                                 # (..., Dk)
        dphi_q = dnum @ xp.swapaxes(KV, -1, -2) + dden[..., None] * z[..., None, :]   # (..., T, Dk)
        dKV = xp.swapaxes(phi_q, -1, -2) @ dnum                # (..., Dk, Dv) num = phi_q KV
        dz = (xp.swapaxes(phi_q, -1, -2) @ dden[..., None])[..., 0]   # (..., Dk)  den = phi_q . z + eps
        dphi_k = v @ xp.swapaxes(dKV, -1, -2) + dz[..., None, :]      # (..., S, Dk)  KV = phi_k^T v, z = sum phi_k
        dv = phi_k @ dKV                                       # (..., S, Dv)
    dq = feature_map_backward(sum_to_shape(dphi_q, phi_q.shape), cache["map_q"])   # (..., T, Dk)
    dk = feature_map_backward(sum_to_shape(dphi_k, phi_k.shape), cache["map_k"])   # (..., S, Dk)
    return dq, dk, sum_to_shape(dv, v.shape)


def _blocks(T, S, block):
    """The causal sweep's steps: query rows [i0, i1) and the keys [j0, j1) that enter with them.

    Query i may attend key j iff j <= i + (S - T). Keys before max(S - T, 0) are seen by every query (the
    prefix of cached decoding, T < S); the rest enter block by block, key j with query j - (S - T). With
    T > S the first T - S queries see no key (their key range is empty).
    """
    offset = S - T
    for i0 in range(0, T, block):
        i1 = min(i0 + block, T)
        yield i0, i1, min(max(i0 + offset, 0), S), min(max(i1 + offset, 0), S)


def _block_mask(i0, i1, j0, j1, offset, xp):
    """(i1 - i0, j1 - j0) bool: query i may attend key j within the block, j <= i + offset."""
    return xp.arange(j0, j1)[None, :] <= xp.arange(i0, i1)[:, None] + offset


def _causal_sums(phi_q, phi_k, v, eps, block):
    """num_i = phi(q_i) KV_i and den_i = phi(q_i) . z_i + eps with the causal running sums, block by block.

    Holds one carried (KV, z) and one (block x block) product at a time, never one KV per position.
    """
    xp = get_xp(phi_q)
    T, S = phi_q.shape[-2], phi_k.shape[-2]
    prefix = max(S - T, 0)                                     # keys every query sees (T < S)
    KV = xp.swapaxes(phi_k[..., :prefix, :], -1, -2) @ v[..., :prefix, :]   # (..., Dk, Dv) carried state
    z = phi_k[..., :prefix, :].sum(axis=-2)                   # (..., Dk)
    lead = np.broadcast_shapes(phi_q.shape[:-2], KV.shape[:-2])
    num = xp.zeros(lead + (T, v.shape[-1]), dtype=phi_q.dtype)   # (..., T, Dv)
    den = xp.zeros(lead + (T,), dtype=phi_q.dtype)             # (..., T)
    for i0, i1, j0, j1 in _blocks(T, S, block):
        Q_b, K_b, V_b = phi_q[..., i0:i1, :], phi_k[..., j0:j1, :], v[..., j0:j1, :]
        A = xp.where(_block_mask(i0, i1, j0, j1, S - T, xp),
                     Q_b @ xp.swapaxes(K_b, -1, -2), 0)        # (..., bq, bk) in-block weights, future = 0
        num[..., i0:i1, :] = Q_b @ KV + A @ V_b                # keys before the block + keys inside it
        den[..., i0:i1] = (Q_b @ z[..., None])[..., 0] + A.sum(axis=-1) + eps
        KV = KV + xp.swapaxes(K_b, -1, -2) @ V_b               # the block's keys join the state
        z = z + K_b.sum(axis=-2)
    return num, den


def _causal_sums_backward(dnum, dden, phi_q, phi_k, v, block):
    """dphi_q, dphi_k, dv of _causal_sums, recomputing its running sums (the paper's Algorithm 1).

    Forwards: KV_i, z_i rebuilt block by block give dphi(q_i) = dnum_i KV_i^T + dden_i z_i.
    Backwards: dKV, dz carry sum over the later queries of phi(q_i) dnum_i^T and dden_i phi(q_i), so key j
    gets dphi(k_j) = v_j dKV^T + dz and dv_j = dKV^T phi(k_j) from the queries that see it.
    """
    xp = get_xp(dnum)
    T, S = phi_q.shape[-2], phi_k.shape[-2]
    prefix = max(S - T, 0)
    blocks = list(_blocks(T, S, block))
    lead = dnum.shape[:-2]
    dphi_q = xp.zeros(lead + phi_q.shape[-2:], dtype=dnum.dtype)   # (..., T, Dk)
    KV = xp.swapaxes(phi_k[..., :prefix, :], -1, -2) @ v[..., :prefix, :]   # (..., Dk, Dv)
    z = phi_k[..., :prefix, :].sum(axis=-2)                   # (..., Dk)
    for i0, i1, j0, j1 in blocks:                              # forwards: the queries' gradients
        Q_b, K_b, V_b = phi_q[..., i0:i1, :], phi_k[..., j0:j1, :], v[..., j0:j1, :]
        mask = _block_mask(i0, i1, j0, j1, S - T, xp)          # (bq, bk)
        dA = xp.where(mask, dnum[..., i0:i1, :] @ xp.swapaxes(V_b, -1, -2) + dden[..., i0:i1, None], 0)
        dphi_q[..., i0:i1, :] = (dnum[..., i0:i1, :] @ xp.swapaxes(KV, -1, -2)       # through KV_i
                                 + dden[..., i0:i1, None] * z[..., None, :]          # through z_i
                                 + dA @ K_b)                                          # through the block
        KV = KV + xp.swapaxes(K_b, -1, -2) @ V_b
        z = z + K_b.sum(axis=-2)
    dphi_k = xp.zeros(lead + phi_k.shape[-2:], dtype=dnum.dtype)   # (..., S, Dk)
    dv = xp.zeros(lead + v.shape[-2:], dtype=dnum.dtype)           # (..., S, Dv)
    dKV = xp.zeros(lead + (phi_q.shape[-1], v.shape[-1]), dtype=dnum.dtype)   # (..., Dk, Dv) later queries
    dz = xp.zeros(lead + (phi_q.shape[-1],), dtype=dnum.dtype)               # (..., Dk)
    for i0, i1, j0, j1 in reversed(blocks):                    # backwards: the keys' gradients
        Q_b, K_b, V_b = phi_q[..., i0:i1, :], phi_k[..., j0:j1, :], v[..., j0:j1, :]
        dnum_b, dden_b = dnum[..., i0:i1, :], dden[..., i0:i1]
        mask = _block_mask(i0, i1, j0, j1, S - T, xp)
        A = xp.where(mask, Q_b @ xp.swapaxes(K_b, -1, -2), 0)                     # (..., bq, bk)
        dA = xp.where(mask, dnum_b @ xp.swapaxes(V_b, -1, -2) + dden_b[..., None], 0)
        dphi_k[..., j0:j1, :] = V_b @ xp.swapaxes(dKV, -1, -2) + dz[..., None, :] + xp.swapaxes(dA, -1, -2) @ Q_b
        dv[..., j0:j1, :] = K_b @ dKV + xp.swapaxes(A, -1, -2) @ dnum_b
        dKV = dKV + xp.swapaxes(Q_b, -1, -2) @ dnum_b          # this block's queries see every earlier key
        dz = dz + (xp.swapaxes(Q_b, -1, -2) @ dden_b[..., None])[..., 0]
    # The prefix keys (T < S) are seen by every query: by now dKV, dz hold the sums over all of them.
    dphi_k[..., :prefix, :] = v[..., :prefix, :] @ xp.swapaxes(dKV, -1, -2) + dz[..., None, :]
    dv[..., :prefix, :] = phi_k[..., :prefix, :] @ dKV
    return dphi_q, dphi_k, dv


# ----------------------------------------------------------------------------------------------------
# The recurrent view


def linear_attention_step(q, k, v, state=None, eps=1e-6):
    """One new token of causal linear attention: S' = S + phi(k) v^T, z' = z + phi(k),
    out = phi(q) S' / (phi(q) . z' + eps).

    q (..., 1, Dk), k (..., 1, Dk), v (..., 1, Dv); state = {'S': (..., Dk, Dv), 'z': (..., Dk)} or None
    (no key yet: zeros). Returns out (..., 1, Dv) and the new state (the old one is not modified). Fed the
    tokens one by one, it gives linear_attention_forward(..., causal=True) row for row: the same attention
    as an RNN whose state has a fixed size however long the sequence grows.
    """
    check_attention_inputs(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape[-2] != 1:
            raise ValueError(f"{name} must hold one token, shape (..., 1, width), got {x.shape}")
    check_eps(eps)
    if state is not None:
        check_state(state, k, v)
    xp = get_xp(q, k, v)
    phi_q, _ = feature_map_forward(q)                          # (..., 1, Dk)
    phi_k, _ = feature_map_forward(k)                          # (..., 1, Dk)
    S_new = xp.swapaxes(phi_k, -1, -2) @ v                     # (..., Dk, Dv) this token's outer product
    z_new = phi_k[..., 0, :]                                   # (..., Dk)
    if state is not None:
        S_new, z_new = state["S"] + S_new, state["z"] + z_new
    out = (phi_q @ S_new) / ((phi_q @ z_new[..., None]) + eps)   # (..., 1, Dv)
    return out, {"S": S_new, "z": z_new}


# ----------------------------------------------------------------------------------------------------
# Input checks. Errors read "{name} must be {what it needs}, got {what it got}".


def check_eps(eps):
    """eps keeps a row with no key at 0 / eps = 0: a finite number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number, got {describe(eps)}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def check_state(state, k, v):
    """state = {'S': (..., Dk, Dv), 'z': (..., Dk)} of k's dtype and array module."""
    if not isinstance(state, dict) or set(state) != {"S", "z"}:
        raise TypeError(f"state must be None or a dict {{'S', 'z'}}, got "
                        f"{sorted(state) if isinstance(state, dict) else describe(state)}")
    Dk, Dv = k.shape[-1], v.shape[-1]
    for name, x, tail in (("S", state["S"], (Dk, Dv)), ("z", state["z"], (Dk,))):
        check_float_array(f"state['{name}']", x, f"(..., {', '.join(map(str, tail))})", like=k, like_name="k")
        if tuple(x.shape[x.ndim - len(tail):]) != tail:
            raise ValueError(f"state['{name}'] must have shape (..., {', '.join(map(str, tail))}) for k "
                             f"{k.shape} and v {v.shape}, got {x.shape}")


# ----------------------------------------------------------------------------------------------------
# Demo


if __name__ == "__main__":
    import time
    import tracemalloc

    from threadpoolctl import threadpool_limits

    from attention import attention_backward, attention_forward
    threadpool_limits(limits=1, user_api="blas")   # small matrices: a second BLAS thread would only wait (spinning)

    def forward_backward(forward, backward, q, k, v):
        """Seconds and peak bytes (tracemalloc sees NumPy's buffers) of one causal forward + backward."""
        tracemalloc.start()
        start = time.perf_counter()
        out, cache = forward(q, k, v, causal=True)
        backward(out, cache)                                   # any upstream gradient of out's shape will do
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return seconds, peak

    rng = np.random.default_rng(0)
    D = 32
    print(f"Causal self-attention, forward + backward, one head of width {D}, float32:")
    print(f"{'T':>6} {'full ms':>9} {'full MiB':>9} {'linear ms':>10} {'linear MiB':>11}")
    peaks = {}
    for T in (256, 512, 1024, 2048, 4096):
        x = rng.standard_normal((T, D)).astype(np.float32)
        full_s, full_peak = forward_backward(attention_forward, attention_backward, x, x, x)
        linear_s, linear_peak = forward_backward(linear_attention_forward, linear_attention_backward, x, x, x)
        peaks[T] = full_peak, linear_peak
        print(f"{T:6d} {1e3 * full_s:9.1f} {full_peak / 2**20:9.2f} "
              f"{1e3 * linear_s:10.1f} {linear_peak / 2**20:11.2f}")
    # Four times the length: full attention's T x T matrices take 16 times the memory, linear's arrays 4 times.
    full_growth, linear_growth = (peaks[4096][n] / peaks[1024][n] for n in (0, 1))
    print(f"Peak memory from T = 1024 to 4096: full x{full_growth:.1f} (T^2), linear x{linear_growth:.1f} (T)\n")
    assert full_growth > 12 and linear_growth < 6

    # The RNN view: the recurrent step, one token at a time, gives the parallel causal form's outputs.
    q, k, v = (rng.standard_normal((2, 50, D)).astype(np.float32) for _ in range(3))
    parallel, _ = linear_attention_forward(q, k, v, causal=True)
    state, steps = None, []
    for t in range(50):
        out, state = linear_attention_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state)
        steps.append(out)
    gap = np.abs(np.concatenate(steps, axis=1) - parallel).max()
    print(f"Recurrent steps vs parallel causal form: max |difference| = {gap:.1e} (float32 rounding); "
          f"the state is {state['S'].shape[1:]} + {state['z'].shape[1:]} numbers at every length\n")
    assert gap < 1e-5

    # The price: retrieve the value of one key among n (the query is that key). Softmax weights can be
    # nearly one-hot; phi(q) . phi(k) weights stay smooth, so the planted value drowns as n grows.
    Dk, trials = 64, 64
    print(f"Recall of one key among n (width {Dk}, {trials} trials; chance is 1/n):")
    print(f"{'n':>6} {'full':>6} {'linear':>7}")
    recall = {}
    for n in (4, 16, 64, 256, 1024):
        keys = rng.standard_normal((trials, n, Dk))
        values = rng.standard_normal((trials, n, Dk))
        target = rng.integers(0, n, trials)
        query = keys[np.arange(trials), target][:, None, :]    # (trials, 1, Dk)
        for name, forward in (("full", attention_forward), ("linear", linear_attention_forward)):
            out = forward(query, keys, values)[0][:, 0]        # (trials, Dk)
            similarity = np.einsum("bd,bnd->bn", out, values) / np.linalg.norm(values, axis=-1)
            recall[name, n] = (similarity.argmax(axis=-1) == target).mean()
        print(f"{n:6d} {recall['full', n]:6.2f} {recall['linear', n]:7.2f}")
    assert all(recall["full", n] == 1 for n in (4, 16, 64, 256, 1024))
    assert recall["linear", 4] > 0.5 and recall["linear", 64] < 0.2 and recall["linear", 256] < 0.1
    print("Softmax attention recalls every planted key; linear attention's smooth weights lose it from a few "
          "dozen keys on.")

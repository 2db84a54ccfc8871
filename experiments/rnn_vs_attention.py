"""Why attention replaced recurrence: two measurements on rnn.py and attention.py.

1. The bottleneck. An encoder-decoder RNN (Sutskever et al. 2014, arXiv:1409.3215; Cho et al. 2014,
   arXiv:1406.1078) learns to copy a sequence of L random symbols. The encoder's final state is all the
   decoder ever sees of the source, so as L grows that one fixed-size vector must hold more and accuracy
   falls. The same decoder given attention over every encoder state (Bahdanau et al. 2014, arXiv:1409.0473)
   reads the symbol it needs directly, and its accuracy stays up. We use the simpler form of Luong et al.
   (2015, arXiv:1508.04025): their "dot" score, and the context joins the decoder state at the output
   instead of feeding the recurrence, so one attention_forward call (attention.py's) serves every step:

       enc_hs = GRU_enc(embed[src])                                   (B, L, Hd)  all encoder states
       dec_hs = GRU_dec(embed[[start, tgt_1, ..., tgt_{L-1}]], h0 = enc_hs[:, -1])   teacher forcing
       plain:      logits = dec_hs W_out + b_out                      W_out (Hd, K)
       attention:  context = softmax(dec_hs enc_hs^T) enc_hs          (B, L, Hd)
                   logits = [dec_hs, context] W_out + b_out           W_out (2Hd, K)

   GRU states lie in [-1, 1], so with attention.py's default scale 1/sqrt(Hd) every score lies within
   +-sqrt(Hd); the unscaled dot score (scale = 1) lets the same states give sharper weights.

2. Sequential cost. The recurrence takes T dependent steps, each a small matrix product; attention over
   the same sequence is one call of two large matrix products. The script counts, by running both on
   arrays that record every matrix product, the arithmetic each does and its longest chain of products
   that must wait for one another (T against 2), and asserts those counts: they hold on every machine. At
   T = D both do the same arithmetic (4 T D^2 = 4 T^2 D), so what differs is the chain. It also prints
   wall-clock times, which depend on the machine (and its load) and are not asserted.

Run: python experiments/rnn_vs_attention.py   (about 20 s of CPU time: 18 s user measured with `time`)
Imports rnn.py, attention.py and training.py from the repository root.
Shapes: B batch, L sequence length, K symbols, E embedding width, Hd hidden width.
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from attention import attention_backward, attention_forward  # noqa: E402
from rnn import (cell_backward, cell_forward, init_cell, init_rnn, matmul_over_time, param_shapes,  # noqa: E402
                 rnn_forward, zero_state)
from training import (adam_init, adam_step, check_cache, check_ids, check_tree, clip_gradients,  # noqa: E402
                      cross_entropy_backward, cross_entropy_forward, embedding_backward, embedding_forward, get_xp,
                      tree_map)

CELL = "gru"


# ----------------------------------------------------------------------------------------------------
# The encoder-decoder, with and without attention


def init_seq2seq(K, E, Hd, rng, attend, dtype=np.float32):
    """{'embed' (K + 1, E), 'encoder', 'decoder': GRU params, 'W_out' (Hd or 2Hd, K), 'b_out' (K,)}.

    Row K of embed is the start symbol the decoder reads first; the table is shared by both sides.
    """
    width = 2 * Hd if attend else Hd
    bound = 1 / np.sqrt(width)
    return {"embed": (0.1 * rng.standard_normal((K + 1, E))).astype(dtype),
            "encoder": init_cell(CELL, E, Hd, rng, dtype), "decoder": init_cell(CELL, E, Hd, rng, dtype),
            "W_out": rng.uniform(-bound, bound, size=(width, K)).astype(dtype), "b_out": np.zeros(K, dtype)}


def copy_batch(rng, B, L, K):
    """A batch of the copy task: B sequences of L random symbols; the target is the source."""
    src = rng.integers(0, K, size=(B, L))
    return src, src.copy()


def _encode(x, params):
    """Encoder states (B, L, Hd), the final state tuple and the cache, for embedded sources x (B, L, E)."""
    xp = get_xp(x)
    Hd = params["encoder"]["W_h"].shape[0]
    start = zero_state(CELL, x.shape[0], Hd, xp, x.dtype)
    return cell_forward(x, start, params["encoder"], CELL)


def _readout(dec_hs, enc_hs, attend):
    """features (B, L, Hd or 2Hd) the output layer reads, and the attention cache (None without)."""
    xp = get_xp(dec_hs)
    if not attend:
        return dec_hs, None
    context, attention_cache = attention_forward(dec_hs, enc_hs, enc_hs, scale=1.0)  # (B, L, Hd)
    return xp.concatenate([dec_hs, context], axis=-1), attention_cache


def seq2seq_forward(src, tgt, params, attend):
    """Teacher-forced mean cross-entropy of tgt given src; src, tgt int (B, L).

    Returns loss and cache = {'src_embed', 'dec_embed': embedding caches, 'encoder', 'decoder': the GRUs'
    caches, 'attn': attention cache (None without attention), 'features' (B, L, Hd or 2Hd), 'loss':
    cross-entropy cache (its 'probs' (B, L, K) is softmax(logits)), 'params'}.
    """
    K, E, Hd = params["b_out"].shape[0], params["embed"].shape[1], params["encoder"]["W_h"].shape[0]
    gru, width = param_shapes(CELL, E, Hd), 2 * Hd if attend else Hd   # params trained with another attend:
    check_tree("params", params, {"embed": (K + 1, E), "encoder": gru, "decoder": gru, "W_out": (width, K),
                                  "b_out": (K,)}, dtype=params["embed"].dtype)          # refused by W_out's shape
    check_ids("src", src, K)                                   # symbols 0..K-1; K is the start symbol
    check_ids("tgt", tgt, K, src.shape)
    xp = get_xp(params["embed"])
    dec_in = xp.concatenate([xp.full((src.shape[0], 1), K), tgt[:, :-1]], axis=1)  # (B, L) start, then tgt
    src_x, src_embed = embedding_forward(src, params["embed"])             # (B, L, E)
    dec_x, dec_embed = embedding_forward(dec_in, params["embed"])          # (B, L, E) the same table
    enc_hs, enc_final, enc_cache = _encode(src_x, params)                  # (B, L, Hd)
    # The bottleneck: the only path from source to decoder is enc_final (and, with attention, enc_hs).
    dec_hs, _, dec_cache = cell_forward(dec_x, enc_final, params["decoder"], CELL)
    features, attention_cache = _readout(dec_hs, enc_hs, attend)     # (B, L, Hd or 2Hd)
    loss, loss_cache = cross_entropy_forward(features @ params["W_out"] + params["b_out"], tgt)
    return loss, {"src_embed": src_embed, "dec_embed": dec_embed, "encoder": enc_cache, "decoder": dec_cache,
                  "attn": attention_cache, "features": features, "loss": loss_cache, "params": params}


def seq2seq_backward(dloss, cache):
    """Gradient tree of seq2seq_forward's loss (dloss = 1.0 when it is what is minimised), walking the
    forward in reverse."""
    check_cache(cache, "seq2seq_forward", {"src_embed", "dec_embed", "encoder", "decoder", "attn", "features",
                                           "loss", "params"})
    params, features = cache["params"], cache["features"]
    Hd = params["encoder"]["W_h"].shape[0]
    dlogits = cross_entropy_backward(dloss, cache["loss"])     # (B, L, K)
    xp = get_xp(dlogits)
    dfeatures = dlogits @ params["W_out"].T                    # (B, L, Hd or 2Hd)
    ddec_hs = dfeatures[..., :Hd]                              # (B, L, Hd)
    if cache["attn"] is None:
        denc_hs = xp.zeros_like(ddec_hs)                       # without attention only enc_final is used
    else:
        dq, dk, dv = attention_backward(dfeatures[..., Hd:], cache["attn"])
        ddec_hs = ddec_hs + dq                                 # dec_hs is the output's input and the query
        denc_hs = dk + dv                                      # enc_hs served as keys and as values
    ddec_x, denc_final, ddecoder = cell_backward(ddec_hs, cache["decoder"])   # denc_final = d(dec h0)
    denc_x, _, dencoder = cell_backward(denc_hs, cache["encoder"], denc_final)
    dembed_src = embedding_backward(denc_x, cache["src_embed"])   # (K + 1, E)
    dembed_dec = embedding_backward(ddec_x, cache["dec_embed"])   # (K + 1, E)
    return {"embed": dembed_src + dembed_dec,                  # one table used twice: the gradients add
            "encoder": dencoder, "decoder": ddecoder,
            "W_out": matmul_over_time(features, dlogits),
            "b_out": dlogits.sum(axis=(0, 1))}


def greedy_decode(src, params, attend):
    """The model's own output (B, L): each step feeds back its most likely symbol (no teacher)."""
    xp = get_xp(params["embed"])
    K = params["b_out"].shape[0]
    enc_hs, state, _ = _encode(params["embed"][src], params)
    previous = xp.full(src.shape[0], K)                        # (B,) the start symbol
    outputs = []
    for _ in range(src.shape[1]):
        dec_h, state, _ = cell_forward(params["embed"][previous][:, None], state, params["decoder"], CELL)
        features, _ = _readout(dec_h, enc_hs, attend)  # (B, 1, Hd or 2Hd)
        previous = (features[:, 0] @ params["W_out"] + params["b_out"]).argmax(axis=-1)  # (B,)
        outputs.append(previous)
    return xp.stack(outputs, axis=1)


def train_copy(attend, steps, lengths, K=8, E=16, Hd=32, B=32, lr=1e-2, seed=0):
    """Train on copy batches whose length is drawn from `lengths`; returns params."""
    rng = np.random.default_rng(seed)
    params = init_seq2seq(K, E, Hd, rng, attend)
    optimizer = adam_init(params)
    for _ in range(steps):
        src, tgt = copy_batch(rng, B, int(rng.choice(lengths)), K)
        _, cache = seq2seq_forward(src, tgt, params, attend)
        grads, _ = clip_gradients(seq2seq_backward(1.0, cache), max_norm=1.0)
        params, optimizer = adam_step(params, grads, optimizer, lr=lr)
    return params


def accuracy_by_length(params, attend, lengths, n=200, K=8, seed=1):
    """{L: fraction of symbols greedy decoding copies correctly}, on n fresh sequences per length."""
    rng = np.random.default_rng(seed)
    accuracy = {}
    for L in lengths:
        src, tgt = copy_batch(rng, n, L, K)
        accuracy[L] = float((greedy_decode(src, params, attend) == tgt).mean())
    return accuracy


# ----------------------------------------------------------------------------------------------------
# Sequential cost


def count_matrix_products(fn, *trees):
    """Run fn(*trees) on NumPy arrays that record every matrix product computed from them.

    trees: arrays or params dicts. Returns {'products', 'flops', 'depth'}: how many matrix products ran,
    their arithmetic (2 m k n for an (m, k) @ (k, n) product, over any batch axes), and the depth, the
    longest chain of products in which each needs the result of the one before. Products in a chain cannot
    overlap on any hardware; the depth is a property of the algorithm, the same on every machine.
    """
    log = []                                                   # (flops, depth) of every product

    class Traced(np.ndarray):
        depth = 0                                              # products on the longest chain behind this array

        def __array_finalize__(self, source):
            self.depth = getattr(source, "depth", 0)           # views and slices keep their array's depth

        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            plain = [a.view(np.ndarray) if isinstance(a, Traced) else a for a in inputs]
            depth = max(getattr(a, "depth", 0) for a in inputs) + (ufunc is np.matmul)
            result = np.asarray(getattr(ufunc, method)(*plain, **kwargs))
            if ufunc is np.matmul:
                log.append((2 * result.size * plain[0].shape[-1], depth))
            result = result.view(Traced)
            result.depth = depth
            return result

    fn(*(tree_map(lambda a: a.view(Traced), tree) for tree in trees))
    return {"products": len(log), "flops": sum(f for f, _ in log), "depth": max((d for _, d in log), default=0)}


def _best_time(fn, repeats):
    fn()                                                       # warm-up: caches, allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)                                          # the least disturbed run


def recurrence_vs_attention(lengths, D=64, repeats=7, seed=0):
    """For one sequence (B = 1) of each length T and width D: rnn_forward (T dependent steps) against
    attention_forward(x, x, x) (one call), counted and timed.

    Returns {T: {'rnn': ..., 'attention': ...}}, each {'products', 'flops', 'depth'} from
    count_matrix_products and 'seconds', the best of `repeats` runs. The counts follow from the algorithms:
    the recurrence does 2 T D^2 for x W_xh and 2 D^2 per step for h W_hh, T products in a chain;
    attention does 2 T^2 D for q k^T and 2 T^2 D for weights v, a chain of 2 whatever T is.
    """
    rng = np.random.default_rng(seed)
    params = init_rnn(D, D, rng, np.float32)
    results = {}
    for T in lengths:
        x = rng.standard_normal((1, T, D)).astype(np.float32)  # (1, T, D)
        h0 = np.zeros((1, D), dtype=np.float32)
        rnn = count_matrix_products(rnn_forward, x, h0, params)
        attention = count_matrix_products(attention_forward, x, x, x)
        rnn["seconds"] = _best_time(lambda: rnn_forward(x, h0, params), repeats)
        attention["seconds"] = _best_time(lambda: attention_forward(x, x, x), repeats)
        results[T] = {"rnn": rnn, "attention": attention}
    return results


# ----------------------------------------------------------------------------------------------------
# Demo


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")   # small matrices: a second BLAS thread would only wait (spinning)
    import argparse

    parser = argparse.ArgumentParser(description="Encoder-decoder RNN with and without attention; timing.")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per model")
    args = parser.parse_args()

    train_lengths = list(range(3, 25))
    test_lengths = [4, 8, 12, 16, 20, 24]
    print(f"1. Copying L random symbols (K = 8) with a GRU encoder-decoder, Hd = 32, trained {args.steps} "
          f"steps on lengths {train_lengths[0]}..{train_lengths[-1]}")
    print("   accuracy = fraction of symbols right under greedy decoding, 200 fresh sequences per length")
    table = {}
    for attend in (False, True):
        start = time.perf_counter()
        params = train_copy(attend, args.steps, train_lengths)
        table[attend] = accuracy_by_length(params, attend, test_lengths)
        print(f"   {'with attention' if attend else 'plain'}: trained in {time.perf_counter() - start:.1f} s")
    print("   L:               " + "".join(f"{L:>7d}" for L in test_lengths))
    for attend, name in ((False, "plain encoder-decoder"), (True, "with attention")):
        print(f"   {name:22s}" + "".join(f"{table[attend][L]:7.2f}" for L in test_lengths))
    plain, attention = table[False], table[True]
    longest = test_lengths[-1]
    assert plain[test_lengths[0]] > plain[longest] + 0.3, "the plain model should fall with length"
    assert min(attention.values()) > 0.9, "the attention model should copy every length"
    assert attention[longest] > plain[longest] + 0.4
    print(f"   The fixed-size state loses the source as L grows (plain: {plain[test_lengths[0]]:.2f} -> "
          f"{plain[longest]:.2f}); attention reads it back ({min(attention.values()):.2f} or better).")

    print("\n2. One sequence of width D = 64: rnn_forward (T dependent steps) vs one attention_forward call")
    print("   counted: matrix products, their FLOPs and the longest chain of products that wait for each other;")
    print("   timed: the best of 7 runs on this machine (timings vary between machines; the counts do not)")
    results = recurrence_vs_attention([64, 256, 1024, 2048], D=64)
    print("       T   rnn chain   attention chain   rnn MFLOP   attention MFLOP     rnn ms   attention ms")
    for T, r in results.items():
        rnn, att = r["rnn"], r["attention"]
        print(f"   {T:5d} {rnn['depth']:11d} {att['depth']:17d} {rnn['flops'] / 1e6:11.2f} {att['flops'] / 1e6:17.2f}"
              f" {rnn['seconds'] * 1e3:10.2f} {att['seconds'] * 1e3:14.2f}")
    D = 64
    for T, r in results.items():
        assert r["rnn"]["depth"] == T and r["attention"]["depth"] == 2, "chains: T steps against 2 products"
        assert r["rnn"]["flops"] == 4 * T * D * D and r["attention"]["flops"] == 4 * T * T * D
    equal = results[D]                                         # T = D: 4 T D^2 = 4 T^2 D, the same arithmetic
    last = max(results)
    print(f"   At T = D = {D} both do the same arithmetic, but the recurrence's {D} products each wait for the one")
    print(f"   before, against attention's 2 (here {equal['rnn']['seconds'] / equal['attention']['seconds']:.1f}x "
          f"the time). At T = {last} attention does {last // D}x the recurrence's arithmetic,")
    print(f"   in a chain of 2 products that parallel hardware can spread out; the recurrence's chain is {last} long.")

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
   the same sequence is one call of large matrix products. The script times both against T. At T = D they
   do the same arithmetic (4 T D^2 = 4 T^2 D), so the difference in time is the cost of doing it in sequence.

Run: python experiments/rnn_vs_attention.py   (about 15 s on an idle 2-core CPU)
Imports rnn.py, attention.py and training.py from the repository root.
Shapes: B batch, L sequence length, K symbols, E embedding width, Hd hidden width.
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from attention import attention_backward, attention_forward  # noqa: E402
from rnn import cell_backward, cell_forward, init_cell, init_rnn, matmul_over_time, rnn_forward, zero_state  # noqa: E402
from training import (adam_init, adam_step, check_ids, clip_gradients, cross_entropy_backward,  # noqa: E402
                      cross_entropy_forward, embedding_backward, embedding_forward, get_xp)

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
    return cell_forward(CELL, x, start, params["encoder"])


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
    K = params["b_out"].shape[0]
    check_ids("src", src, K)                                   # symbols 0..K-1; K is the start symbol
    check_ids("tgt", tgt, K, src.shape)
    xp = get_xp(params["embed"])
    dec_in = xp.concatenate([xp.full((src.shape[0], 1), K), tgt[:, :-1]], axis=1)  # (B, L) start, then tgt
    src_x, src_embed = embedding_forward(src, params["embed"])             # (B, L, E)
    dec_x, dec_embed = embedding_forward(dec_in, params["embed"])          # (B, L, E) the same table
    enc_hs, enc_final, enc_cache = _encode(src_x, params)                  # (B, L, Hd)
    # The bottleneck: the only path from source to decoder is enc_final (and, with attention, enc_hs).
    dec_hs, _, dec_cache = cell_forward(CELL, dec_x, enc_final, params["decoder"])
    features, attention_cache = _readout(dec_hs, enc_hs, attend)     # (B, L, Hd or 2Hd)
    loss, loss_cache = cross_entropy_forward(features @ params["W_out"] + params["b_out"], tgt)
    return loss, {"src_embed": src_embed, "dec_embed": dec_embed, "encoder": enc_cache, "decoder": dec_cache,
                  "attn": attention_cache, "features": features, "loss": loss_cache, "params": params}


def seq2seq_backward(cache):
    """Gradient tree of seq2seq_forward's loss, walking the forward in reverse."""
    params, features = cache["params"], cache["features"]
    Hd = params["encoder"]["W_h"].shape[0]
    dlogits = cross_entropy_backward(cache["loss"])            # (B, L, K)
    xp = get_xp(dlogits)
    dfeatures = dlogits @ params["W_out"].T                    # (B, L, Hd or 2Hd)
    ddec_hs = dfeatures[..., :Hd]                              # (B, L, Hd)
    if cache["attn"] is None:
        denc_hs = xp.zeros_like(ddec_hs)                       # without attention only enc_final is used
    else:
        dq, dk, dv = attention_backward(dfeatures[..., Hd:], cache["attn"])
        ddec_hs = ddec_hs + dq                                 # dec_hs is the output's input and the query
        denc_hs = dk + dv                                      # enc_hs served as keys and as values
    ddec_x, denc_final, ddecoder = cell_backward(CELL, ddec_hs, cache["decoder"])   # denc_final = d(dec h0)
    denc_x, _, dencoder = cell_backward(CELL, denc_hs, cache["encoder"], denc_final)
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
        dec_h, state, _ = cell_forward(CELL, params["embed"][previous][:, None], state, params["decoder"])
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
        grads, _ = clip_gradients(seq2seq_backward(cache), max_norm=1.0)
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


def _best_time(fn, repeats):
    fn()                                                       # warm-up: caches, allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)                                          # the least disturbed run


def time_recurrence_vs_attention(lengths, D=64, repeats=7, seed=0):
    """For one sequence (B = 1) of each length T: seconds for rnn_forward (T dependent steps) and for
    attention_forward(x, x, x) (one call), and the arithmetic each does.

    Returns {T: (rnn seconds, attention seconds, rnn FLOPs, attention FLOPs)}. FLOPs count the matrix
    products: the recurrence 2 T D^2 for x W_xh plus 2 T D^2 for h W_hh; attention 2 T^2 D for q k^T plus
    2 T^2 D for weights v.
    """
    rng = np.random.default_rng(seed)
    params = init_rnn(D, D, rng, np.float32)
    results = {}
    for T in lengths:
        x = rng.standard_normal((1, T, D)).astype(np.float32)  # (1, T, D)
        h0 = np.zeros((1, D), dtype=np.float32)
        rnn_seconds = _best_time(lambda: rnn_forward(x, h0, params), repeats)
        attention_seconds = _best_time(lambda: attention_forward(x, x, x), repeats)
        results[T] = (rnn_seconds, attention_seconds, 4 * T * D * D, 4 * T * T * D)
    return results


# ----------------------------------------------------------------------------------------------------
# Demo


if __name__ == "__main__":
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
    timings = time_recurrence_vs_attention([64, 256, 1024, 2048], D=64)
    print("       T     rnn ms   rnn us/step   attention ms   attention/rnn time   attention/rnn FLOPs")
    for T, (rnn_s, att_s, rnn_flops, att_flops) in timings.items():
        print(f"   {T:5d} {rnn_s * 1e3:10.2f} {rnn_s / T * 1e6:13.2f} {att_s * 1e3:14.2f}"
              f" {att_s / rnn_s:20.2f} {att_flops / rnn_flops:21.0f}")
    first, last = min(timings), max(timings)
    growth = timings[last][0] / timings[first][0]
    equal = timings[64]                                        # T = D: 4 T D^2 = 4 T^2 D, the same arithmetic
    print(f"   At T = D = 64 both do the same arithmetic; the recurrence takes {equal[0] / equal[1]:.1f}x "
          f"as long: the price of")
    print(f"   64 steps that each wait for the one before. Its time grows {growth:.0f}x for {last // first}x "
          f"the length (a constant cost per step);")
    print(f"   attention's arithmetic grows as T^2 and is {timings[last][3] / timings[last][2]:.0f}x the "
          f"recurrence's at T = {last}: {timings[last][1] / timings[last][0]:.1f}x its time on this machine.")
    assert growth > 0.25 * last / first, "the recurrence's time should grow about linearly with T"
    assert equal[0] > 1.5 * equal[1], "with equal arithmetic the sequential recurrence should be slower"

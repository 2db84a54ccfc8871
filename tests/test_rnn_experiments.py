"""Tests for experiments/rnn_vs_attention.py: the encoder-decoder's gradients with and without attention,
greedy decoding, the bottleneck (attention beats the plain decoder on long sequences) and the counted
chains of dependent matrix products and their arithmetic."""
import os
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rnn
import training
from gradcheck import check_gradients

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import rnn_vs_attention as experiment  # noqa: E402


def tiny_seq2seq(xp, attend, K=4, E=3, Hd=4, B=2, L=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = experiment.init_seq2seq(K, E, Hd, rng, attend, dtype)
    params = {k: ({kk: xp.asarray(vv) for kk, vv in v.items()} if isinstance(v, dict) else xp.asarray(v))
              for k, v in params.items()}
    src = xp.asarray(rng.integers(0, K, size=(B, L)))
    tgt = xp.asarray(rng.integers(0, K, size=(B, L)))
    return params, src, tgt


@pytest.mark.parametrize("attend", [False, True], ids=["plain", "attention"])
def test_seq2seq_gradients_match_finite_differences(xp, attend):
    params, src, tgt = tiny_seq2seq(xp, attend)
    _, cache = experiment.seq2seq_forward(src, tgt, params, attend)
    dloss = float(np.random.default_rng(1).standard_normal())  # a random upstream gradient of the loss
    grads = experiment.seq2seq_backward(dloss, cache)
    assert set(grads) == set(params)
    check_gradients(lambda: dloss * experiment.seq2seq_forward(src, tgt, params, attend)[0], params, grads)


@given(seed=st.integers(0, 2**16), size=st.floats(0.1, 100.0))
def test_gru_states_stay_in_minus_one_to_one_so_scaled_scores_stay_below_sqrt_hd(seed, size):
    # h_t = (1 - z) n + z h_{t-1} mixes tanh(.) and h_{t-1}: from h0 = 0 it never leaves [-1, 1].
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 20, 4)) * size
    params = training.tree_map(lambda w: w * size, rnn.init_gru(4, 8, rng, np.float64))
    hs, _ = rnn.gru_forward(x, np.zeros((3, 8)), params)
    assert np.abs(hs).max() <= 1.0
    scores = hs @ hs.swapaxes(1, 2) / np.sqrt(8)               # attention's default scale 1 / sqrt(Hd)
    assert np.abs(scores).max() <= np.sqrt(8) * (1 + 1e-12)    # rounding of the products


@pytest.mark.parametrize("attend", [False, True], ids=["plain", "attention"])
def test_greedy_decoding_emits_what_teacher_forcing_on_its_own_output_predicts(attend):
    params, src, _ = tiny_seq2seq(np, attend, K=6, Hd=8, B=5, L=6, seed=1)
    decoded = experiment.greedy_decode(src, params, attend)
    _, cache = experiment.seq2seq_forward(src, decoded, params, attend)
    probs = cache["loss"]["probs"]                             # (B, L, K)
    np.testing.assert_array_equal(probs.argmax(axis=-1), decoded)


def test_attention_decoder_beats_the_plain_one_on_long_sequences():
    # Seeded and small (~3 s). Over seeds 0-5 this setting gives plain 0.14-0.20 (chance is 1/8) and
    # attention 0.94-0.99 at L = 16, so thresholds of 0.4 and 0.8 leave a wide margin on both sides.
    lengths, K = list(range(8, 17)), 8
    accuracy = {}
    for attend in (False, True):
        params = experiment.train_copy(attend, steps=400, lengths=lengths, K=K, seed=0)
        accuracy[attend] = experiment.accuracy_by_length(params, attend, [16], n=100, K=K)[16]
    assert accuracy[False] < 0.4 < 0.8 < accuracy[True]


def test_seq2seq_refuses_bad_tokens_params_of_another_shape_and_a_cache_in_the_wrong_place():
    params, src, tgt = tiny_seq2seq(np, attend=True)
    K = params["b_out"].shape[0]
    with pytest.raises(TypeError, match=r"src must be an integer array"):
        experiment.seq2seq_forward(src.astype(np.float64), tgt, params, True)
    with pytest.raises(ValueError, match=r"tgt must have shape \(B, T\) = \(2, 3\), got \(2, 2\)"):
        experiment.seq2seq_forward(src, tgt[:, :2], params, True)
    with pytest.raises(ValueError, match=rf"src must hold ids in \[0, {K}\), got values in \[-1, "):
        experiment.seq2seq_forward(np.where(src == src[0, 0], -1, src), tgt, params, True)
    with pytest.raises(ValueError, match=rf"tgt must hold ids in \[0, {K}\)"):
        experiment.seq2seq_forward(src, np.full_like(tgt, K), params, True)   # K is the start symbol
    with pytest.raises(ValueError, match=r"params\['W_out'\] must be a float64 array of shape \(4, 4\), got .*8, 4"):
        experiment.seq2seq_forward(src, tgt, params, False)    # params made for attention, run without it
    with pytest.raises(ValueError, match=r"params\['decoder'\] must have keys .*missing \['b_x'\]"):
        experiment.seq2seq_forward(src, tgt, dict(params, decoder={k: v for k, v in params["decoder"].items()
                                                                    if k != "b_x"}), True)
    _, cache = experiment.seq2seq_forward(src, tgt, params, True)
    with pytest.raises(TypeError, match=r"cache must be the dict seq2seq_forward returned .*, got float"):
        experiment.seq2seq_backward(cache, 1.0)                # the old order: (dloss, cache) now


def test_counted_chains_and_arithmetic_hold_on_every_machine():
    # What the script asserts instead of wall-clock ratios: the recurrence's chain of dependent matrix
    # products is T long, attention's is 2 for any T, and the FLOPs are 4 T D^2 and 4 T^2 D (equal at T = D).
    D = 16
    results = experiment.recurrence_vs_attention([16, 48], D=D, repeats=1)
    assert sorted(results) == [16, 48]
    for T, r in results.items():
        assert (r["rnn"]["depth"], r["attention"]["depth"]) == (T, 2)
        assert (r["rnn"]["flops"], r["attention"]["flops"]) == (4 * T * D * D, 4 * T * T * D)
        assert r["rnn"]["products"] == T + 1                     # x W_xh once, then h W_hh at every step
        assert r["rnn"]["seconds"] > 0 and r["attention"]["seconds"] > 0
    assert results[16]["rnn"]["flops"] == results[16]["attention"]["flops"]   # T = D: the same arithmetic


def test_counting_matrix_products_follows_the_dependencies_not_the_order_of_the_calls():
    a = np.ones((2, 3))
    independent = experiment.count_matrix_products(lambda a: [a @ a.T for _ in range(4)], a)
    chained = experiment.count_matrix_products(lambda a: (a.T @ a) @ (a.T @ a) @ np.ones((3, 1)), a)
    assert independent == {"products": 4, "flops": 4 * 2 * 2 * 2 * 3, "depth": 1}
    assert chained["products"] == 4 and chained["depth"] == 3   # the two inner products are independent

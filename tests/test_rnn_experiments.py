"""Tests for experiments/rnn_vs_attention.py: the encoder-decoder's gradients with and without attention,
greedy decoding, the bottleneck (attention beats the plain decoder on long sequences) and the timing."""
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
    grads = experiment.seq2seq_backward(cache)
    assert set(grads) == set(params)
    check_gradients(lambda: experiment.seq2seq_forward(src, tgt, params, attend)[0], params, grads)


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


def test_seq2seq_rejects_float_mismatched_or_out_of_range_tokens():
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


def test_the_timing_function_times_both_and_counts_equal_arithmetic_at_T_equal_D():
    # Wall-clock comparisons flap on a busy machine, so they live in the script's printed table
    # (python experiments/rnn_vs_attention.py asserts them there); this checks what the table rests on:
    # a time for each side at every length and the FLOP accounting, equal at T = D.
    timings = experiment.time_recurrence_vs_attention([32, 96], D=32, repeats=2)
    assert sorted(timings) == [32, 96]
    for T, (rnn_s, att_s, rnn_flops, att_flops) in timings.items():
        assert 0 < rnn_s < 10 and 0 < att_s < 10
        assert (rnn_flops, att_flops) == (4 * T * 32 * 32, 4 * T * T * 32)
    assert timings[32][2] == timings[32][3]                    # T = D: the same arithmetic
    assert timings[96][3] == 3 * timings[96][2]                # attention's grows as T^2: 3x at T = 3D

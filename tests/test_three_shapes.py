"""Tests for experiments/three_shapes.py: the grammar's parser and the swap task, the three shapes'
training batches, cached decoding of padded sources, and that each shape learns what it is for (reduced
runs of what `python experiments/three_shapes.py` asserts at full length)."""
import os
import sys

import numpy as np
import pytest

import rnn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import three_shapes as experiment  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return experiment.make_data(seed=0, n_train=1500)


def test_the_parser_accepts_every_generated_sentence_and_nothing_else():
    sentences = experiment.split_sentences(rnn.grammar_text(np.random.default_rng(3), 300))
    assert len(sentences) == 300 and all(map(experiment.is_grammatical, sentences))
    language = experiment.language()
    assert len(set(language)) == len(language) == 6 * 6 * 6 * 4
    assert set(sentences) <= set(language)
    cat = tuple("the cat sees the ball today .".split())
    assert experiment.parse(cat) == (("the", "cat"), ("sees",), ("the", "ball"), ("today", "."))
    for broken in (cat[:-1], cat[1:], cat[:2] + cat[3:], cat[:4] + ("cat",) + cat[5:], cat + (".",)):
        assert not experiment.is_grammatical(broken), broken


def test_the_swap_exchanges_phrases_of_any_length_and_keeps_the_verb_and_ending():
    sentence = tuple("the old man hears a red fish at night .".split())
    assert experiment.swap_subject_object(sentence) == tuple("a red fish hears the old man at night .".split())
    for sentence in experiment.language()[::37]:
        swapped = experiment.swap_subject_object(sentence)
        assert sorted(swapped) == sorted(sentence) and not experiment.is_grammatical(swapped)


def test_held_out_sentences_are_exactly_the_grammar_minus_the_training_text(data):
    train, held_out = set(data["train"]), set(data["held_out"])
    assert len(data["train"]) == 1500 and not train & held_out
    assert train | held_out == set(experiment.language())
    assert 50 < len(held_out) < 300                            # 864 exp(-1500 / 864) = 152 expected
    assert data["vocab"][:4] == ["[PAD]", "[BOS]", "[EOS]", "[MASK]"] and len(set(data["vocab"])) == len(data["vocab"])


@pytest.mark.parametrize("kind", ["encoder", "decoder", "encoder-decoder"])
def test_batches_hold_the_shapes_inputs_and_targets(data, kind):
    tokens, targets, src = experiment.shape_batches(kind, data)(np.random.default_rng(0), 64)
    vocab, L = data["vocab"], data["length"]
    assert tokens.shape == targets.shape and tokens.dtype == targets.dtype == np.int64
    if kind == "encoder":                                      # BERT: targets only where a word was chosen
        assert src is None and tokens.shape == (64, L)
        chosen = targets != -100
        assert 0.08 < chosen.mean() / (tokens != experiment.PAD).mean() < 0.25   # 15 % of the words
        assert (tokens[chosen] == experiment.MASK).mean() > 0.6                  # 80 % of those
        assert (tokens[~chosen] != experiment.MASK).all()
        return
    assert tokens.shape == (64, L + 1) and (tokens[:, 0] == experiment.BOS).all()
    for row in range(64):
        words = experiment.decode(np.where(targets[row] == -100, experiment.PAD, targets[row]), vocab)
        assert experiment.decode(np.append(tokens[row, 1:], experiment.EOS), vocab)[:len(words)] == words
        if kind == "decoder":
            assert src is None and experiment.is_grammatical(words)
        else:                                                  # the target is the source, swapped
            source = experiment.decode(np.append(src[row][src[row] != experiment.PAD], experiment.EOS), vocab)
            assert words == experiment.swap_subject_object(source)


def test_cached_greedy_decoding_of_padded_sources_equals_recomputation(data):
    config = experiment.model_config("encoder-decoder", data, D=16, n_layers=2)
    params = experiment.init_transformer(config, np.random.default_rng(1), np.float64)
    sentences = data["held_out"][:5] + data["train"][:5]       # different lengths: padded sources
    src = experiment.encode(sentences, data["ids"], data["length"])
    assert (src == experiment.PAD).any()
    prompt = np.full((len(sentences), 1), experiment.BOS, dtype=np.int64)
    cached, cached_logits = experiment.generate(prompt, 8, params, config, src=src)
    full, full_logits = experiment.generate(prompt, 8, params, config, src=src, use_cache=False)
    np.testing.assert_array_equal(cached, full)
    np.testing.assert_allclose(cached_logits, full_logits, rtol=0, atol=1e-12)   # float64 rounding of sums


def test_each_shape_learns_what_it_is_for_in_a_short_run(data):
    # A third of the script's 300 steps (about 6 s of CPU). Seed 0 reaches: BERT accuracy 0.74 (the best
    # possible is 0.83 on these sentences) with 0.86 of guesses grammatical, GPT 0.82 of samples grammatical,
    # the swap 1.00 exact; untrained, 0.02 / 0.00 / 0.00. A model that always guesses one word ("the" or
    # ".") gets about 0.13 of masked words right, so the bound 0.2 on "before" says nothing was learned.
    steps, seed, held_out = 100, 0, data["held_out"][::4]     # every 4th: all subjects, not only "the cat"
    before, after, _, _ = experiment.train_and_measure(
        "encoder", data, steps, seed, lambda params, config: experiment.bert_scores(params, config, held_out, data))
    assert before["accuracy"] < 0.2 and after["accuracy"] > 0.5 and after["grammatical"] > 0.6, (before, after)
    before, after, _, _ = experiment.train_and_measure(
        "decoder", data, steps, seed,
        lambda params, config: experiment.gpt_scores(experiment.gpt_samples(params, config, 100, seed), data))
    assert before["grammatical"] < 0.05 and after["grammatical"] > 0.5, (before, after)
    before, after, _, _ = experiment.train_and_measure(
        "encoder-decoder", data, steps, seed,
        lambda params, config: experiment.swap_exact_match(params, config, held_out, data))
    assert before < 0.05 and after > 0.8, (before, after)

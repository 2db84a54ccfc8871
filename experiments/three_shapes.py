"""The three shapes of transformer.py on the same text, each doing what it is for.

One tiny grammar (rnn.GRAMMAR: sentence = subject verb object ending, 864 sentences in all) makes the
text; words are the tokens. The same sentences train three models built from the same parts:

- BERT (kind 'encoder', Devlin et al. 2018, arXiv:1810.04805) sees the whole sentence at once and fills in
  masked words. Trained with mask_tokens (15 % of positions; 80 % [MASK], 10 % random, 10 % kept), scored
  by hiding one word of a held-out sentence at a time:
      guess = argmax_v softmax(logits[i])[v],   input = the sentence with word i replaced by [MASK]
  The grammar picks its slots uniformly, so where k words fit (any of 6 verbs, say) the best any model
  can do is 1/k; "best possible" below is the mean of 1/k, and a guess that fits the grammar counts as
  grammatical.
- GPT (kind 'decoder', Radford et al. 2018/2019) predicts each word from the ones before and so continues
  a prompt: [BOS] w_1 ... w_n [EOS], trained on next-word cross-entropy, sampled by generate (KV cache)
  greedily or at temperature 1. A sample counts if the grammar parses it and it ends with [EOS].
- Encoder-decoder (Vaswani et al. 2017, arXiv:1706.03762; T5's shape) maps one sequence to another: the
  encoder reads a sentence, the decoder writes it with subject and object swapped,
      "the cat sees a red fish today ."  ->  "a red fish sees the cat today ."
  The phrases have 2 or 3 words, so the decoder must find where each starts and ends through
  cross-attention. Scored by exact match of greedy decoding on held-out sentences.

Held-out sentences are the grammar's sentences that never occur in the training text. Every model: pre-LN,
GELU, sinusoidal positions, float32, AdamW with linear warm-up and cosine decay, gradients clipped to 1.

Run: python experiments/three_shapes.py [--steps N] [--seed S]   (about 20 s of CPU, one BLAS thread; README)
Imports transformer.py, training.py and rnn.py (for the grammar) from the repository root.
Shapes: N sentences, B batch, L padded sentence length, V vocabulary.
"""
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from rnn import GRAMMAR, grammar_text  # noqa: E402
from training import adam_init, adam_step, clip_gradients, lr_schedule, weight_decay_mask  # noqa: E402
from transformer import (generate, init_transformer, lm_loss_backward, lm_loss_forward, mask_tokens,  # noqa: E402
                         transformer_forward)

SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[MASK]")
PAD, BOS, EOS, MASK = range(4)
SLOTS = ("subject", "verb", "object", "ending")


# ----------------------------------------------------------------------------------------------------
# The grammar as words: tokens, a parser, the swap, the vocabulary


def words_of(phrase):
    """'the cat' -> ('the', 'cat'); ' at night.' -> ('at', 'night', '.'): the full stop is a word."""
    return tuple(phrase.replace(".", " .").split())


def split_sentences(text):
    """grammar_text's string -> a list of sentences, each a tuple of words ending with '.'."""
    sentences, current = [], []
    for word in words_of(text):
        current.append(word)
        if word == ".":
            sentences.append(tuple(current))
            current = []
    return sentences


def parse(sentence):
    """The grammar's four phrases (subject, verb, object, ending) as word tuples, or None if the grammar
    does not produce this sentence. Tries each phrase of each slot as a prefix of what is left."""
    def rest(words, slots):
        if not slots:
            return () if not words else None
        for phrase in map(words_of, GRAMMAR[slots[0]]):
            if words[:len(phrase)] == phrase:
                tail = rest(words[len(phrase):], slots[1:])
                if tail is not None:
                    return (phrase,) + tail
        return None
    return rest(tuple(sentence), SLOTS)


def is_grammatical(sentence):
    return parse(sentence) is not None


def swap_subject_object(sentence):
    """'the cat sees a red fish today .' -> 'a red fish sees the cat today .' (the encoder-decoder's task)."""
    subject, verb, obj, ending = parse(sentence)
    return obj + verb + subject + ending


def language():
    """Every sentence the grammar can produce (6 * 6 * 6 * 4 = 864), as word tuples."""
    return [sum(map(words_of, phrases), ()) for phrases in itertools.product(*(GRAMMAR[s] for s in SLOTS))]


def vocabulary():
    """The special tokens, then every word of the grammar in sorted order: a list whose index is the id."""
    return list(SPECIALS) + sorted({word for sentence in language() for word in sentence})


def encode(sentences, ids, length, bos=False, eos=False):
    """int (N, length): each sentence's word ids, optionally between [BOS] and [EOS], padded with [PAD]."""
    out = np.full((len(sentences), length), PAD, dtype=np.int64)                # (N, L)
    for row, sentence in enumerate(sentences):
        tokens = [BOS] * bos + [ids[word] for word in sentence] + [EOS] * eos
        out[row, :len(tokens)] = tokens
    return out


def decode(row, vocab):
    """Ids -> the words before the first [EOS]; None if there is none (a sample that never ended)."""
    words = []
    for token in row:
        if token == EOS:
            return tuple(words)
        words.append(vocab[token])
    return None


def make_data(seed, n_train=1500):
    """The shared text: n_train sentences from grammar_text (training) and the grammar's sentences that
    never occur in them (held out; about 864 exp(-n_train / 864) of them)."""
    train = split_sentences(grammar_text(np.random.default_rng(seed), n_train))
    seen, every = set(train), language()
    held_out = [sentence for sentence in every if sentence not in seen]
    vocab = vocabulary()
    return {"train": train, "held_out": held_out, "vocab": vocab, "ids": {w: i for i, w in enumerate(vocab)},
            "length": max(map(len, every)), "language_size": len(every)}       # length: the longest, in words


# ----------------------------------------------------------------------------------------------------
# The three models and their training batches


def model_config(kind, data, D=64, n_layers=2):
    """A small pre-LN GELU transformer of the given kind over the data's vocabulary."""
    return {"kind": kind, "V": len(data["vocab"]), "D": D, "n_heads": 4, "F": 2 * D, "n_layers": n_layers,
            "max_len": data["length"] + 2, "positions": "sinusoidal", "norm_first": True, "activation": "gelu",
            "tied": False, "pad_id": PAD}


def shape_batches(kind, data):
    """batch(rng, B) -> (tokens, targets, src) for lm_loss_forward, drawn from the training sentences.

    encoder:          tokens = the masked sentence, targets = the hidden words (-100 elsewhere), src None
    decoder:          tokens = [BOS] w_1 .. w_n, targets = w_1 .. w_n [EOS] (-100 under padding)
    encoder-decoder:  src = the sentence, tokens = [BOS] + swapped, targets = swapped + [EOS]
    """
    ids, L, V = data["ids"], data["length"], len(data["vocab"])
    if kind == "encoder":
        sentences = encode(data["train"], ids, L)                              # (N, L)
    else:
        swapped = data["train"] if kind == "decoder" else [swap_subject_object(s) for s in data["train"]]
        target = encode(swapped, ids, L + 2, bos=True, eos=True)               # (N, L + 2)
        inputs, targets = target[:, :-1], np.where(target[:, 1:] == PAD, -100, target[:, 1:])  # (N, L + 1)
        sources = encode(data["train"], ids, L)                                # (N, L)

    def batch(rng, B):
        rows = rng.integers(0, len(data["train"]), B)                          # (B,)
        if kind == "encoder":
            tokens, targets_masked = mask_tokens(sentences[rows], rng, V, MASK, keep_ids=(PAD,))
            return tokens, targets_masked, None
        return inputs[rows], targets[rows], (sources[rows] if kind == "encoder-decoder" else None)
    return batch


def train(params, config, batch, steps, seed, B=32, max_lr=3e-3, weight_decay=0.01):
    """AdamW (decay on matrices only, training.weight_decay_mask) with 10 % linear warm-up then cosine
    decay to max_lr / 10, gradients clipped to global norm 1. Returns (params, losses per step)."""
    rng = np.random.default_rng(seed)
    state, decay = adam_init(params), weight_decay_mask(params)
    warmup, losses = max(1, steps // 10), []
    for step in range(steps):
        tokens, targets, src = batch(rng, B)
        loss, cache = lm_loss_forward(tokens, targets, params, config, src)
        grads, _ = clip_gradients(lm_loss_backward(1.0, cache), 1.0)
        lr = lr_schedule(step + 1, max_lr, warmup, steps, min_lr=max_lr / 10)
        params, state = adam_step(params, grads, state, lr=lr, weight_decay=weight_decay, decay=decay)
        losses.append(loss)
    return params, losses


# ----------------------------------------------------------------------------------------------------
# What each shape is for, measured


def masked_word_probs(params, config, tokens, positions):
    """probs (M, V): BERT's distribution over the word at tokens[m, positions[m]] (a [MASK]), tokens (M, L)."""
    logits, _ = transformer_forward(tokens, params, config)                    # (M, L, V)
    logits = logits[np.arange(len(tokens)), positions]                         # (M, V) at the masks
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))                # (M, V)
    return probs / probs.sum(axis=-1, keepdims=True)


def bert_scores(params, config, sentences, data):
    """Every word of every sentence hidden in turn (one [MASK] per input). Returns
    {'accuracy': the top guess is the hidden word, 'grammatical': the sentence with the guess parses,
     'best': mean of 1/k, k = how many words would make it parse (what a perfect model scores)}."""
    rows = np.array([n for n, sentence in enumerate(sentences) for _ in sentence])          # (M,) sentence
    positions = np.array([i for sentence in sentences for i in range(len(sentence))])    # (M,) hidden word
    tokens = encode(sentences, data["ids"], data["length"])[rows]              # (M, L)
    truth = tokens[np.arange(len(rows)), positions]                            # (M,)
    tokens[np.arange(len(rows)), positions] = MASK
    guess = masked_word_probs(params, config, tokens, positions).argmax(axis=-1)   # (M,)
    words = data["vocab"][len(SPECIALS):]
    fits, best = [], []
    for g, n, i in zip(guess, rows, positions):
        fill = lambda word: sentences[n][:i] + (word,) + sentences[n][i + 1:]
        fits.append(is_grammatical(fill(data["vocab"][g])))
        best.append(1 / sum(is_grammatical(fill(word)) for word in words))
    return {"accuracy": float((guess == truth).mean()), "grammatical": float(np.mean(fits)),
            "best": float(np.mean(best))}


def gpt_samples(params, config, n, seed, temperature=1.0):
    """Token rows (n, max_len) continuing [BOS] by generate (KV cache); greedy if temperature is 0."""
    prompt = np.full((n, 1), BOS, dtype=np.int64)                              # (n, 1)
    rng = np.random.default_rng(seed) if temperature > 0 else None
    return generate(prompt, config["max_len"] - 1, params, config, temperature=temperature, rng=rng)[0]


def continue_prompt(params, config, data, prompt_words):
    """The greedy continuation of [BOS] + prompt_words: a token row (max_len,) starting with [BOS]."""
    prompt = np.array([[BOS] + [data["ids"][w] for w in prompt_words]], dtype=np.int64)   # (1, T0)
    return generate(prompt, config["max_len"] - prompt.shape[1], params, config)[0][0]


def show(row, vocab):
    """A generated row as text: the words after [BOS] up to [EOS], or all of them and '...' without one."""
    words = decode(row[1:], vocab)
    return " ".join(words) if words is not None else " ".join(vocab[t] for t in row[1:]) + " ..."


def gpt_scores(samples, data):
    """{'grammatical': fraction of sampled rows (n, max_len) that end with [EOS] and parse, 'novel': the
    fraction that parse and never occur in the training text (a model that only memorised would give 0)}."""
    train, sentences = set(data["train"]), [decode(row[1:], data["vocab"]) for row in samples]
    good = [s for s in sentences if s is not None and is_grammatical(s)]
    return {"grammatical": len(good) / len(sentences), "novel": sum(s not in train for s in good) / len(sentences)}


def translate(params, config, sentences, data):
    """Greedy decoding of the encoder-decoder (generate, KV cache): a word tuple (or None) per sentence."""
    src = encode(sentences, data["ids"], data["length"])                       # (N, L)
    prompt = np.full((len(sentences), 1), BOS, dtype=np.int64)                 # (N, 1)
    tokens, _ = generate(prompt, config["max_len"] - 1, params, config, src=src)
    return [decode(row[1:], data["vocab"]) for row in tokens]


def swap_exact_match(params, config, sentences, data):
    """Fraction of sentences whose greedy translation equals swap_subject_object exactly."""
    outputs = translate(params, config, sentences, data)
    return float(np.mean([out == swap_subject_object(s) for s, out in zip(sentences, outputs)]))


def train_and_measure(kind, data, steps, seed, measure):
    """A fresh float32 model_config(kind, data) drawn from seed, measure(params, config) before and after
    `steps` of train. Returns (before, after, losses, seconds spent training)."""
    config = model_config(kind, data)
    params = init_transformer(config, np.random.default_rng(seed), np.float32)
    before, start = measure(params, config), time.perf_counter()
    params, losses = train(params, config, shape_batches(kind, data), steps, seed)
    seconds = time.perf_counter() - start
    return before, measure(params, config), losses, seconds


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")   # small matrices: a second BLAS thread would only wait (spinning)
    import argparse

    parser = argparse.ArgumentParser(description="BERT, GPT and an encoder-decoder trained on the same grammar.")
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = make_data(args.seed)
    print(f"Text: {len(data['train'])} sentences from rnn.grammar_text (seed {args.seed}), "
          f"{len(set(data['train']))} of the grammar's {data['language_size']} distinct ones; "
          f"{len(data['held_out'])} held out (never in the text). Vocabulary: {len(data['vocab'])} ids = "
          f"{len(SPECIALS)} special + words.")
    config = model_config("encoder", data)
    print(f"Each model: D={config['D']}, {config['n_heads']} heads, F={config['F']}, {config['n_layers']} layers "
          f"per stack, pre-LN, GELU, sinusoidal positions, float32; {args.steps} AdamW steps of 32 sentences.")

    print("\n1. BERT (encoder): fill in a masked word of a held-out sentence")
    examples = [("the", "cat", "[MASK]", "the", "ball", "."), ("the", "[MASK]", "sees", "the", "moon", "today", "."),
                ("my", "sister", "likes", "[MASK]", "red", "fish", "."),
                ("a", "dog", "hears", "the", "little", "boat", "[MASK]", "night", ".")]

    def measure_bert(params, config):
        positions = np.array([sentence.index("[MASK]") for sentence in examples])
        probs = masked_word_probs(params, config, encode(examples, data["ids"], data["length"]), positions)
        return {**bert_scores(params, config, data["held_out"], data), "examples": probs}

    before, after, losses, seconds = train_and_measure("encoder", data, args.steps, args.seed, measure_bert)
    print(f"   loss {losses[0]:.2f} -> {np.mean(losses[-50:]):.2f} nats per masked word ({seconds:.1f} s)")
    print(f"   masked-word accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
          f"(best possible {after['best']:.3f}: where any of k words fit, 1/k);  "
          f"guess fits the grammar {before['grammatical']:.3f} -> {after['grammatical']:.3f}")
    for sentence, p in zip(examples, after["examples"]):
        top = np.argsort(p)[::-1][:3]
        print(f"   {' '.join(sentence):40s} -> " + ", ".join(f"{data['vocab'][v]} {p[v]:.2f}" for v in top))
    assert after["accuracy"] > 0.9 * after["best"] and after["grammatical"] > 0.95, after
    assert before["accuracy"] < 0.2 and before["grammatical"] < 0.3, before   # one word always: about 0.13

    print("\n2. GPT (decoder): continue a prompt; 200 samples from [BOS] at temperature 1, and greedy")
    prompts = (("the", "cat"), ("my", "sister", "hears"), ("a", "small", "bird", "draws", "the"))

    def measure_gpt(params, config):
        samples = gpt_samples(params, config, 200, args.seed)
        greedy = [continue_prompt(params, config, data, prompt) for prompt in prompts]
        return {**gpt_scores(samples, data), "samples": samples[:3], "greedy": greedy}

    before, after, losses, seconds = train_and_measure("decoder", data, args.steps, args.seed, measure_gpt)
    entropy = np.log(data["language_size"]) / np.mean([len(s) + 1 for s in language()])   # words + [EOS]
    for stage, result in (("before", before), ("after", after)):
        print(f"   {stage} training, sampled: " + " | ".join(show(row, data["vocab"]) for row in result["samples"]))
        for prompt, row in zip(prompts, result["greedy"]):
            print(f"   {stage} training, greedy:  {' '.join(prompt):24s} -> {show(row, data['vocab'])}")
    print(f"   loss {losses[0]:.2f} -> {np.mean(losses[-50:]):.2f} nats per word ({seconds:.1f} s); the grammar's "
          f"own entropy (what knowing the grammar exactly scores on fresh text): {entropy:.2f}")
    print(f"   samples the grammar accepts {before['grammatical']:.3f} -> {after['grammatical']:.3f}; accepted "
          f"and not in the training text: {after['novel']:.3f} (the held-out share of the grammar is "
          f"{len(data['held_out']) / data['language_size']:.3f})")
    assert after["grammatical"] > 0.9 and before["grammatical"] < 0.05, (before, after)
    assert after["novel"] > 0.05, "the model should make new sentences, not only repeat the training text"

    print("\n3. Encoder-decoder: swap subject and object, greedy decoding of held-out sentences")
    shown = data["held_out"][::len(data["held_out"]) // 3][:3]

    def measure_swap(params, config):
        return swap_exact_match(params, config, data["held_out"], data), translate(params, config, shown, data)

    (before, _), (after, outputs), losses, seconds = train_and_measure("encoder-decoder", data, args.steps,
                                                                       args.seed, measure_swap)
    print(f"   loss {losses[0]:.2f} -> {np.mean(losses[-50:]):.3f} nats per word ({seconds:.1f} s)")
    print(f"   exact match {before:.3f} -> {after:.3f} on {len(data['held_out'])} held-out sentences")
    for sentence, out in zip(shown, outputs):
        print(f"   {' '.join(sentence):42s} -> {' '.join(out) if out is not None else '(no [EOS])'}")
    assert after > 0.95 and before < 0.05, (before, after)

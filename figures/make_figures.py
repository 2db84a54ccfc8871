"""The README's figures, all made by one command, each by one small piece of code.

    python figures/make_figures.py                     # every figure into figures/ (several minutes on 2 cores)
    python figures/make_figures.py attention_masks     # only the named ones
    python figures/make_figures.py --list              # the names

Needs matplotlib (`python -m pip install matplotlib`). No concept file imports matplotlib: each figure is a
function `name(path, quick=False)` decorated with `@figure`, which writes figures/<name>.png. It calls the
file that owns the numbers (its public functions, the demo's training run included) rather than copy its
code, so the picture and the numbers the demo prints come from the same place. `quick=True` draws it from
tiny sizes, so that tests/test_figures.py checks in seconds that it still runs (the picture is then
meaningless).
Keep each PNG small (about 600 x 400 pixels, under 100 KB; the test checks the size) and show it in the
README next to its numbers (the test checks that too).
"""
import functools
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))              # figures/
ROOT = os.path.dirname(HERE)                                   # the repository root
for folder in (ROOT, os.path.join(ROOT, "experiments"), os.path.join(ROOT, "benchmarks")):
    if folder not in sys.path:
        sys.path.insert(0, folder)

FIGURES = {}                                                   # name -> function(path, quick=False)



def figure(function):
    """Register `function` as the figure figures/<its name>.png."""
    FIGURES[function.__name__] = function
    return function


def pyplot():
    """matplotlib.pyplot drawing to files only (no window), imported when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


# ----------------------------------------------------------------------------------------------------
# The figures, in the README's order


# ---- rnn.py ----------------------------------------------------------------------------------------


@figure
def rnn_gradient_norms(path, quick=False):
    """||d h_T / d h_t|| against T - t, the numbers `python rnn.py` prints (rnn.gradient_norm_curves, same
    sizes and seed): a tanh RNN with ||W_hh||_2 = 0.9 under its bound 0.9^(T-t) and with 6.0 exploding, the
    LSTM vanishing unless its forget bias is +3, the GRU vanishing."""
    from rnn import gradient_norm_curves
    T, D, Hd = (6, 3, 4) if quick else (60, 32, 32)
    small = 0.9
    curves = gradient_norm_curves(T, D, Hd, spectral_norms=(small, 6.0))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, norms in curves.items():
        ax.semilogy(norms, label=label)
    ax.semilogy(small ** np.arange(T + 1), "k--", label=f"bound {small}^(T-t) for ||W_hh||_2 = {small}")
    ax.set(xlabel="T - t", ylabel="||d h_T / d h_t||_2", title=f"Gradient reaching h_t from h_T (Hd = {Hd})")
    ax.legend(fontsize=8)
    save(fig, path)


# ---- end of rnn.py's figures -----------------------------------------------------------------------


@figure
def copy_accuracy(path, quick=False):
    """Copy-task accuracy by length L, GRU encoder-decoder with and without attention, trained as
    experiments/rnn_vs_attention.py trains them (same steps, lengths and seeds, so the same numbers)."""
    from rnn_vs_attention import accuracy_by_length, train_copy
    steps, train_lengths, test_lengths, n = ((5, [3, 4], [4, 8], 8) if quick else
                                             (2000, list(range(3, 25)), [4, 8, 12, 16, 20, 24], 200))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for attend, label, style, offset in ((False, "plain encoder-decoder", "o-", -13),
                                         (True, "with attention", "s-", 6)):
        params = train_copy(attend, steps, train_lengths)
        accuracy = accuracy_by_length(params, attend, test_lengths, n=n)
        ax.plot(test_lengths, [accuracy[L] for L in test_lengths], style, label=label)
        for L in test_lengths:
            ax.annotate(f"{accuracy[L]:.2f}", (L, accuracy[L]), textcoords="offset points", xytext=(0, offset),
                        ha="center", fontsize=8)
    ax.axhline(1 / 8, color="grey", ls=":", label="chance (K = 8 symbols)")
    ax.set_xticks(test_lengths)
    ax.set(xlabel="sequence length L (greedy decoding, fresh sequences)", ylabel="symbols copied correctly",
           ylim=(0, 1.1),
           title=f"Copy task, GRU Hd = 32, {steps} steps on L = {train_lengths[0]}..{train_lengths[-1]}")
    ax.legend(loc="lower left", fontsize=8)
    save(fig, path)


@figure
def attention_masks(path, quick=False):
    """attention.py's demo drawn: the weights of a 5-token self-attention, then with a causal mask, then with
    a padding mask; hatched cells are the ones the mask forbids (their weight is exactly 0)."""
    from attention import attention_forward, causal_mask
    tokens = ["the", "cat", "sat", "down", "<pad>"]
    T = len(tokens)
    x = np.random.default_rng(0).standard_normal((T, 4))      # (T, Dk) as in the demo
    padding = np.array([True, True, True, True, False])        # the last token is padding
    panels = [("no mask", {}, np.ones((T, T), bool)),
              ("causal=True", {"causal": True}, causal_mask(T)),
              ("mask = padding", {"mask": padding}, np.broadcast_to(padding, (T, T)))]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.5))
    for ax, (title, options, allowed) in zip(axes, panels):
        _, cache = attention_forward(x, x, x, **options)
        weights = cache["weights"]                             # (T, T) row = query, column = key
        ax.imshow(weights, cmap="Blues", vmin=0, vmax=1)
        for i in range(T):
            for j in range(T):
                if allowed[i, j]:
                    ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if weights[i, j] > 0.6 else "black")
                else:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                               edgecolor="grey", lw=0))
        ax.set_xticks(range(T), tokens, fontsize=7)
        ax.set_yticks(range(T), tokens, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key", fontsize=8)
    axes[0].set_ylabel("query", fontsize=8)
    fig.suptitle("attention_forward(x, x, x): each row sums to 1; hatched = masked, weight exactly 0",
                 fontsize=10)
    save(fig, path)


@figure
def flash_memory(path, quick=False):
    """Peak memory of one causal forward pass against T, full attention (attention.py) and flash attention
    (flash.py), measured as benchmarks/bench_flash_cpu.py measures it (its peak_bytes, tracemalloc), for T up
    to 4096 so that it runs in seconds; the README's table and benchmarks/RESULTS.md go to T = 16384."""
    from attention import attention_forward
    from bench_flash_cpu import peak_bytes
    from flash import flash_attention_forward
    lengths = [64, 128] if quick else [256, 512, 1024, 2048, 4096]
    Dh, block = 64, 256
    rng = np.random.default_rng(0)
    full_mib, flash_mib = [], []
    for T in lengths:
        q, k, v = (rng.standard_normal((1, T, Dh)).astype(np.float32) for _ in range(3))  # (1, T, Dh) each
        full = lambda: attention_forward(q, k, v, causal=True)[0]  # noqa: E731
        flash = lambda: flash_attention_forward(q, k, v, causal=True, block_q=block, block_k=block)[0]  # noqa: E731
        full(), flash()                                        # warm-up: first-call imports are not the method's
        full_mib.append(peak_bytes(full) / 2**20)
        flash_mib.append(peak_bytes(flash) / 2**20)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, mib, style, offset in (("full attention (T x T scores)", full_mib, "o-", 7),
                                      (f"flash attention ({block} x {block} tiles)", flash_mib, "s-", -13)):
        ax.loglog(lengths, mib, style, label=label)
        for T, m in zip(lengths, mib):
            ax.annotate(f"{m:.3g}", (T, m), textcoords="offset points", xytext=(0, offset), ha="center",
                        fontsize=8)
    ax.minorticks_off()
    ax.set_xticks(lengths, [str(T) for T in lengths])
    ax.set_yticks([1, 10, 100], ["1", "10", "100"])
    ax.set(xlabel="sequence length T = S", ylabel="peak memory (MiB, tracemalloc)", ylim=(0.3, 600),
           title=f"Causal attention, one head, Dh = {Dh}, float32, NumPy")
    ax.text(0.98, 0.04, f"full grows as T^2, flash as T;\nT = {lengths[0]}..{lengths[-1]} only (seconds to run)",
            transform=ax.transAxes, ha="right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    save(fig, path)


# ----------------------------------------------------------------------------------------------------
# Figures of the model files' demos, drawn here from each file's public functions (the demo itself
# prints and asserts the numbers; no model file imports matplotlib). One sub-block per model file.


# --- vit.py -----------------------------------------------------------------------------------------

@figure
def vit_rollout(path, quick=False):
    """vit.py's demo drawn: held-out same/different images (top, the two marked patches outlined) and the
    class token's attention rollout over the patches (bottom), for the ViT that `python vit.py` trains
    (train_same_different, 1500 steps, seed 0, the same held-out images: the same numbers)."""
    from matplotlib.patches import Rectangle

    from vit import (DEMO_CONFIG, attention_rollout, attention_weights, same_different_images, train_same_different,
                     vit_forward)
    (_, H, _), P = DEMO_CONFIG["image_shape"], DEMO_CONFIG["P"]
    grid = H // P
    params = train_same_different(5 if quick else 1500, seed=0)
    images, labels, marked = same_different_images(64 if quick else 1000, np.random.default_rng(1), grid=grid, P=P)
    logits, cache = vit_forward(images, params, DEMO_CONFIG)
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    cls_map = attention_rollout(attention_weights(cache))[:, 0, 1:]    # (n, N) the class token's row, patches only
    show = np.concatenate([np.flatnonzero(labels == 1)[:2], np.flatnonzero(labels == 0)[:2]])
    plt = pyplot()
    fig, axes = plt.subplots(2, len(show), figsize=(2.2 * len(show), 4.6), squeeze=False)
    for column, i in enumerate(show):
        for row, (picture, scale) in enumerate(((images[i, 0], P), (cls_map[i].reshape(grid, grid), 1))):
            ax = axes[row, column]
            ax.imshow(picture, cmap="gray" if row == 0 else "viridis")
            for cell in marked[i]:                             # outline the two marked patches
                y, x = divmod(int(cell), grid)
                ax.add_patch(Rectangle((x * scale - 0.5, y * scale - 0.5), scale, scale, fill=False, ec="red", lw=1.5))
            ax.set_xticks([]), ax.set_yticks([])
        axes[0, column].set_title("same" if labels[i] else "different")
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("class-token rollout")
    fig.suptitle(f"ViT, held-out accuracy {accuracy:.1%} (chance 50 %); red: the two marked patches")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- transformer.py: its demo's training run (train_reversal, the same steps and seeds as `python transformer.py`) ---


@functools.lru_cache(maxsize=2)
def reversal_run(quick=False):
    """params, config and learning curve of transformer.train_reversal, trained once for both figures."""
    from transformer import train_reversal
    return train_reversal(steps=4, every=2) if quick else train_reversal()


@figure
def transformer_learning_curve(path, quick=False):
    """Training loss and held-out exact match of the demo's encoder-decoder learning to reverse 8 symbols."""
    _, _, curve = reversal_run(quick)
    steps, losses, accuracies = zip(*curve)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, losses, "o-", label="training loss (nats/token)")
    ax.plot(steps, accuracies, "s-", label="held-out exact match")
    ax.set_xlabel("step")
    ax.legend()
    save(fig, path)


@figure
def transformer_cross_attention(path, quick=False):
    """Where output position t looks: the trained demo model's last decoder layer, cross-attention averaged
    over heads, for the first held-out sequence (the demo asserts its mirrored mass is above 0.5)."""
    from transformer import reversal_batch, reversal_cross_attention
    params, config, _ = reversal_run(quick)
    T = config["max_len"]
    src, _, targets = reversal_batch(np.random.default_rng(1), 1, T, config["V"] - 2)    # the demo's held-out row 0
    cross = reversal_cross_attention(params, config, src[0], targets[0])                # (T, S)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cross, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(T), [str(s) for s in src[0]])
    ax.set_yticks(range(T), [str(s) for s in targets[0]])
    ax.set_xlabel("source symbol (key)")
    ax.set_ylabel("output symbol (query)")
    ax.set_title("cross-attention, last decoder layer")
    save(fig, path)


# ----------------------------------------------------------------------------------------------------
# The efficiency table: the growth half of experiments/efficiency_table.py


@figure
def efficiency_table(path, quick=False):
    """Seconds and peak memory of one causal forward + backward against T, log-log, for every row of
    experiments/efficiency_table.py (full, flash, sliding window, window + global token, linear attention,
    GRU), measured by its growth() at the table's lengths (T up to 16384: about two minutes on 2 cores), the
    fitted exponent of each in the legend."""
    from efficiency_table import FULL, QUICK, exponent, growth, one_blas_thread
    config = dict(QUICK, lengths=[64, 128]) if quick else FULL
    with one_blas_thread():
        measured = growth(config["lengths"], config["D"], config["w"])
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for (name, m), style in zip(measured.items(), ["o-", "s--", "^-", "v--", "D-", "x-"]):
        for ax, what, scale in ((axes[0], "seconds", 1.0), (axes[1], "bytes", 2.0**-20)):
            ax.loglog(m["T"], np.array(m[what]) * scale, style, ms=4,   # flash and window share memory
                      label=f"{name} (T^{exponent(m['T'], m[what]):.1f})")
    for ax, ylabel in zip(axes, ("forward + backward (CPU s)", "peak memory (MiB, tracemalloc)")):
        ax.minorticks_off()
        ax.set_xticks(config["lengths"], [str(T) for T in config["lengths"]], fontsize=7)
        ax.set(xlabel="sequence length T", ylabel=ylabel)
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"Causal attention, one head, D = {config['D']}, float32, NumPy, one BLAS thread "
                 f"(window w = {config['w']})", fontsize=9)
    save(fig, path)


# ----------------------------------------------------------------------------------------------------
# Command


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Draw the README's figures into figures/.")
    parser.add_argument("names", nargs="*", metavar="name", help="figures to draw (default: all)")
    parser.add_argument("--out", default=HERE, help="folder to write the PNGs to (default: figures/)")
    parser.add_argument("--list", action="store_true", help="print the figure names and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(FIGURES))
        sys.exit(0)
    unknown = [name for name in args.names if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {unknown}; choose from {list(FIGURES)}")
    pyplot()                                                   # fails here, not after a minute, without matplotlib
    os.makedirs(args.out, exist_ok=True)
    for name in args.names or FIGURES:
        start = time.perf_counter()
        path = os.path.join(args.out, f"{name}.png")
        FIGURES[name](path)
        print(f"{path}  {os.path.getsize(path) / 1024:.0f} KB  {time.perf_counter() - start:.1f} s")

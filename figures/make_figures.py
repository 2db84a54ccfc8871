"""The README's figures, all made by one command, each by one small piece of code.

    python figures/make_figures.py                     # every figure into figures/ (a minute on 2 cores)
    python figures/make_figures.py attention_masks     # only the named ones
    python figures/make_figures.py --list              # the names

Needs matplotlib (`python -m pip install matplotlib`). Two kinds of figure, both easy to add:
- A figure a demo already draws stays the demo's: add its command line to DEMO_FIGURES, with the PNGs it
  writes. Its own test runs the same command into a temporary folder.
- Any other: a function `name(path, quick=False)` decorated with `@figure`, which writes figures/<name>.png.
  It calls the file that owns the numbers (its public functions) rather than copy its code, so the picture
  and the README's numbers come from the same place. `quick=True` draws it from tiny sizes, so that
  tests/test_figures.py checks in seconds that it still runs (the picture is then meaningless).
Keep each PNG small (about 600 x 400 pixels, under 100 KB; the test checks the size) and show it in the
README next to its numbers (the test checks that too).
"""
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))              # figures/
ROOT = os.path.dirname(HERE)                                   # the repository root
for folder in (ROOT, os.path.join(ROOT, "experiments"), os.path.join(ROOT, "benchmarks")):
    if folder not in sys.path:
        sys.path.insert(0, folder)

FIGURES = {}                                                   # name -> function(path, quick=False)

# Figures a demo draws itself: the PNGs (figures/<name>.png) -> the demo's command, {out} standing for the
# folder the PNGs go to.
DEMO_FIGURES = {
    ("rnn_gradient_norms",): ["rnn.py", "--figure", "{out}/rnn_gradient_norms.png"],
    ("transformer_cross_attention", "transformer_learning_curve"): ["transformer.py", "--figures", "{out}"],
    ("vit_rollout",): ["vit.py", "--figure", "{out}/vit_rollout.png"],
}


def figure(function):
    """Register `function` as the figure figures/<its name>.png."""
    FIGURES[function.__name__] = function
    return function


def run_demo_figures(command, out):
    """Run a DEMO_FIGURES command from the repository root, its figures written into the folder `out`;
    returns the command line it ran.

    One BLAS thread unless the caller chose: on 2 cores two threads spin on the demos' small matrices
    (vit.py takes minutes with two, under a minute with one)."""
    env = dict(os.environ, MPLBACKEND="Agg")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = [arg.replace("{out}", os.path.abspath(out)) for arg in command]
    subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return argv


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
# efficiency_table (linear_attention.py's branch): the growth half of experiments/efficiency_table.py


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

    demo_names = {name: command for names, command in DEMO_FIGURES.items() for name in names}
    parser = argparse.ArgumentParser(description="Draw the README's figures into figures/.")
    parser.add_argument("names", nargs="*", metavar="name", help="figures to draw (default: all)")
    parser.add_argument("--out", default=HERE, help="folder to write the PNGs to (default: figures/)")
    parser.add_argument("--list", action="store_true", help="print the figure names and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join([*demo_names, *FIGURES]))
        sys.exit(0)
    unknown = [name for name in args.names if name not in FIGURES and name not in demo_names]
    if unknown:
        parser.error(f"unknown figure {unknown}; choose from {[*demo_names, *FIGURES]}")
    pyplot()                                                   # fails here, not after a minute, without matplotlib
    os.makedirs(args.out, exist_ok=True)
    names = args.names or [*demo_names, *FIGURES]
    commands = dict.fromkeys(tuple(demo_names[name]) for name in names if name in demo_names)  # each once
    for command in commands:
        start = time.perf_counter()
        argv = run_demo_figures(command, args.out)
        print(f"python {' '.join(argv)}  {time.perf_counter() - start:.1f} s")
    for name in (name for name in names if name in FIGURES):
        start = time.perf_counter()
        path = os.path.join(args.out, f"{name}.png")
        FIGURES[name](path)
        print(f"{path}  {os.path.getsize(path) / 1024:.0f} KB  {time.perf_counter() - start:.1f} s")

"""What the efficient attentions buy and what they cost: one table, every number measured here.

Six ways to let T tokens read each other, all causal, one head of width D, float32, NumPy, one BLAS thread:

    full attention     attention.py                       exact; T x T scores: time and memory ~ T^2
    flash attention    flash.py (NumPy tiles)             exact; time ~ T^2, memory ~ T (no T x T matrix)
    sliding window     flash.py, window=(w, 0)            each query sees its w + 1 latest keys: ~ T w
    window + global    attention.py, sliding_window_mask(..., global_tokens=(0,)) as a dense mask: token 0
                       sees and is seen by every token (Longformer). Dense here, so it costs what full
                       attention costs; a banded kernel would cost ~ T (w + 1 + globals)
    linear attention   linear_attention.py                phi(q) . phi(k) weights, running sums: ~ T D^2
    GRU                rnn.py (gru_forward/gru_backward)  the recurrent row: a fixed-size state, ~ T D^2

Three measurements:

(a) Growth. CPU seconds and peak memory of one forward + backward (a random upstream gradient) as T
    grows, self-attention q = k = v of shape (1, T, D) (the GRU reads the same x). CPU time
    (time.process_time, this process only, with one BLAS thread) rather than wall-clock time, so that other
    work on a shared machine slows the numbers less. Peak memory is tracemalloc's,
    which sees every NumPy buffer, in a run apart from the timed one. The growth exponent of each is the
    slope of a least-squares line through log(cost) against log(T). Dense rows stop where their T x T
    arrays would not fit in half the memory the machine has free.
(b) Exactness. The largest |out - full attention's out| on the same inputs (T = the smallest length).
    Exact methods differ by float32 rounding; the approximations by what they leave out.
(c) Recall. One query must fetch the value of one key among n stored keys: keys and values standard
    normal of width D, the query equal to the key planted at distance d before it (the query sits at the
    end, so every key is in its causal past). Recalled if the output is more similar (cosine) to the planted
    value than to every other stored value; the fraction over `trials` problems. Softmax weights can be
    nearly one-hot, so full and flash attention recall at any d and n. A window of w cannot see a key
    planted further back than w, unless it sits on a global token (the far probe plants it at token 0).
    Linear attention's weights phi(q) . phi(k) are smooth and all it keeps of the keys is a D x D state, so
    its recall falls as n grows. The GRU would have to be trained to keep anything: no recall entry.

The script asserts what it claims, with bounds wide enough for any machine: time exponents (full run
only: in --quick the lengths are too short for timing to mean anything) > 1.5 for full and flash, < 1.4
for window, linear and GRU; memory exponents (tracemalloc counts bytes, the same everywhere) > 1.5 for the
dense rows, < 1.3 for the others; flash within float32 rounding of full; the recall pattern above.

Run: python experiments/efficiency_table.py           (T = 1024 ... 16384, D = 64, w = 128; 2 min of
                                                      CPU, user + sys with `time`; longer on a busy machine)
     python experiments/efficiency_table.py --quick   (T = 256 ... 1024, D = 64, w = 32; seconds, for tests)
Imports attention.py, flash.py, linear_attention.py, rnn.py and training.py (through them) from the
repository root, and benchmarks/bench_flash_cpu.py's peak_bytes. Prints the table as Markdown.
"""
import argparse
import contextlib
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                                        # the concept files
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from attention import attention_backward, attention_forward, sliding_window_mask  # noqa: E402
from bench_flash_cpu import peak_bytes  # noqa: E402
from flash import flash_attention_backward, flash_attention_forward  # noqa: E402
from linear_attention import linear_attention_backward, linear_attention_forward  # noqa: E402
from rnn import gru_backward, gru_forward, init_gru  # noqa: E402

FULL = dict(lengths=[1024, 2048, 4096, 8192, 16384], D=64, w=128, trials=64, keys=[4, 64, 1024], near=8)
QUICK = dict(lengths=[256, 512, 1024], D=64, w=32, trials=32, keys=[4, 64, 256], near=4)


# ----------------------------------------------------------------------------------------------------
# The rows: forward(q, k, v) -> out, cache and backward(dout, cache), all causal


def methods(w):
    """{name: (forward, backward, dense)}; dense rows hold T x S arrays. The GRU reads q as its input x."""
    def window_global(q, k, v):
        T, S = q.shape[-2], k.shape[-2]
        # Global token 0 needs the square (S, S) pattern; the queries are its last T rows (bottom-right).
        mask = sliding_window_mask(S, S, left=w, right=0, global_tokens=(0,))[S - T:]   # (T, S)
        return attention_forward(q, k, v, mask=mask, causal=True)

    def gru(q, k, v):
        params = init_gru(q.shape[-1], q.shape[-1], np.random.default_rng(0), q.dtype)
        return gru_forward(q, np.zeros((q.shape[0], q.shape[-1]), q.dtype), params)

    return {
        "full attention": (lambda q, k, v: attention_forward(q, k, v, causal=True), attention_backward, True),
        "flash attention": (lambda q, k, v: flash_attention_forward(q, k, v, causal=True),
                            flash_attention_backward, False),
        f"sliding window w={w}": (lambda q, k, v: flash_attention_forward(q, k, v, causal=True, window=(w, 0)),
                                  flash_attention_backward, False),
        f"window w={w} + global token": (window_global, attention_backward, True),
        "linear attention": (lambda q, k, v: linear_attention_forward(q, k, v, causal=True),
                             linear_attention_backward, False),
        "GRU (recurrent)": (gru, gru_backward, False),
    }


# ----------------------------------------------------------------------------------------------------
# (a) Growth with T


def fits_in_memory(T, itemsize):
    """Whether a handful of T x T arrays (full attention holds about 4 at its peak) fit in half the memory
    this machine has free now."""
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 5 * T * T * itemsize < free / 2


def growth(lengths, D, w, seed=0):
    """{name: {'T': [...], 'seconds': [...], 'bytes': [...]}} for one forward + backward at each length.

    Seconds: CPU time (process_time), the best of 3 runs up to T = 2048, one run beyond (after a warm-up
    run at the first length).
    Bytes: tracemalloc's peak over one forward + backward, in a run of its own.
    """
    rng = np.random.default_rng(seed)
    results = {}
    for name, (forward, backward, dense) in methods(w).items():
        results[name] = {"T": [], "seconds": [], "bytes": []}
        for n, T in enumerate(lengths):
            if dense and not fits_in_memory(T, np.dtype(np.float32).itemsize):
                break
            x = rng.standard_normal((1, T, D)).astype(np.float32)   # (1, T, D) q = k = v
            dout = rng.standard_normal((1, T, D)).astype(np.float32)

            def run():
                out, cache = forward(x, x, x)
                return backward(dout, cache)

            if n == 0:
                run()                                          # warm-up: first-call imports and caches
            seconds = []
            for _ in range(3 if T <= 2048 else 1):
                start = time.process_time()
                run()
                seconds.append(time.process_time() - start)
            results[name]["T"].append(T)
            results[name]["seconds"].append(min(seconds))
            results[name]["bytes"].append(peak_bytes(run))
    return results


def one_blas_thread():
    """A context with one BLAS thread (threadpoolctl's threadpool_limits), or none when threadpoolctl is not
    installed (then OPENBLAS_NUM_THREADS=1 is the caller's to set): on a busy machine more threads spin and
    make the timings noise."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def exponent(lengths, costs):
    """The slope of the least-squares line through (log T, log cost): cost ~ T^slope."""
    return float(np.polyfit(np.log(lengths), np.log(costs), 1)[0])


# ----------------------------------------------------------------------------------------------------
# (b) Exactness and (c) recall


def exactness(T, D, w, seed=0):
    """{name: max |out - full attention's out|} on the same random q, k, v (1, T, D); None for the GRU."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, T, D)).astype(np.float32) for _ in range(3))
    rows = methods(w)
    full, _ = rows["full attention"][0](q, k, v)
    return {name: None if name.startswith("GRU") else float(np.abs(forward(q, k, v)[0] - full).max())
            for name, (forward, _, _) in rows.items()}


def window_against_its_dense_mask(T, D, w, seed=0):
    """max |flash's window=(w, 0) - attention_forward(..., window=(w, 0))|: the window row is exact for the
    keys it keeps (its difference from full attention is what it leaves out)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, T, D)).astype(np.float32) for _ in range(3))
    banded, _ = methods(w)[f"sliding window w={w}"][0](q, k, v)
    dense, _ = attention_forward(q, k, v, causal=True, window=(w, 0))
    return float(np.abs(banded - dense).max())


def recall(n, d, D, w, trials, seed=0):
    """{name: the fraction of `trials` problems where the query fetches the planted value}; None for the GRU.

    n keys and values (trials, n, D), standard normal; the query (trials, 1, D) is the key at position
    n - 1 - d, so at distance d before the query's own position n - 1 (it sits at the end, bottom-right).
    """
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((trials, n, D)).astype(np.float32)
    values = rng.standard_normal((trials, n, D)).astype(np.float32)
    planted = n - 1 - d
    query = keys[:, planted:planted + 1]                       # (trials, 1, D)
    cosine_norm = np.linalg.norm(values, axis=-1)              # (trials, n)
    fractions = {}
    for name, (forward, _, _) in methods(w).items():
        if name.startswith("GRU"):
            fractions[name] = None
            continue
        out = forward(query, keys, values)[0][:, 0]            # (trials, D)
        similarity = np.einsum("bd,bnd->bn", out, values) / cosine_norm   # (trials, n) cosine up to |out|
        fractions[name] = float((similarity.argmax(axis=-1) == planted).mean())
    return fractions


# ----------------------------------------------------------------------------------------------------
# The table


def run(quick=False):
    """Every measurement of the table: {'config', 'growth', 'exponents', 'exactness', 'recall'}."""
    config = QUICK if quick else FULL
    D, w = config["D"], config["w"]
    measured = growth(config["lengths"], D, w)
    exponents = {name: {what: exponent(m["T"], m[what]) for what in ("seconds", "bytes")}
                 for name, m in measured.items()}
    probes = {f"d={min(config['near'], n - 1)}, n={n}": recall(n, min(config["near"], n - 1), D, w, config["trials"])
              for n in config["keys"]}                         # near: within every window
    n_far = config["keys"][-1]
    probes[f"d={n_far - 1}, n={n_far}"] = recall(n_far, n_far - 1, D, w, config["trials"])
    return {"config": config, "growth": measured, "exponents": exponents,
            "exactness": exactness(config["lengths"][0], D, w), "recall": probes,
            "window_exact": window_against_its_dense_mask(config["lengths"][0], D, w)}


def markdown(results):
    """The table as Markdown, one row per method."""
    config, measured = results["config"], results["growth"]
    T_max = config["lengths"][-1]
    probe_names = list(results["recall"])
    lines = [f"| method | time ~ T^a | memory ~ T^b | CPU s, T={T_max} | peak MiB, T={T_max} "
             f"| max abs diff from full (T={config['lengths'][0]}) "
             + "".join(f"| recall {p} " for p in probe_names) + "|",
             "|---" * (6 + len(probe_names)) + "|"]
    for name, m in measured.items():
        T = m["T"][-1]
        at = "" if T == T_max else f" (T={T})"
        diff = results["exactness"][name]
        row = (f"| {name} | {results['exponents'][name]['seconds']:.2f} | {results['exponents'][name]['bytes']:.2f} "
               f"| {m['seconds'][-1]:.2f}{at} | {m['bytes'][-1] / 2**20:.1f}{at} "
               f"| {'n/a' if diff is None else f'{diff:.1e}'} ")
        for p in probe_names:
            value = results["recall"][p][name]
            row += f"| {'n/a' if value is None else f'{value:.2f}'} "
        lines.append(row + "|")
    return "\n".join(lines)


def check(results, quick):
    """Assert the claims of the module docstring."""
    config, exponents, exact = results["config"], results["exponents"], results["exactness"]
    w = config["w"]
    window, global_row = f"sliding window w={w}", f"window w={w} + global token"
    dense, banded = ["full attention", global_row], ["flash attention", window, "linear attention", "GRU (recurrent)"]
    for name in dense:
        assert exponents[name]["bytes"] > 1.5, (name, exponents[name])
    for name in banded:
        assert exponents[name]["bytes"] < 1.3, (name, exponents[name])
    if not quick:
        for name in ("full attention", "flash attention"):
            assert exponents[name]["seconds"] > 1.5, (name, exponents[name])
        for name in (window, "linear attention", "GRU (recurrent)"):
            assert exponents[name]["seconds"] < 1.4, (name, exponents[name])
    # float32 rounding: outputs are averages of values of size ~1, summed in another order (a few ulps).
    assert exact["flash attention"] < 1e-5, exact
    assert min(exact[window], exact[global_row], exact["linear attention"]) > 1e-3, exact   # approximations
    assert results["window_exact"] < 1e-5, results["window_exact"]                          # same rounding
    near = [p for p in results["recall"] if not p.startswith(f"d={config['keys'][-1] - 1},")]
    far = f"d={config['keys'][-1] - 1}, n={config['keys'][-1]}"
    for probe, fractions in results["recall"].items():
        for name in ("full attention", "flash attention", global_row):
            assert fractions[name] >= 0.95, (probe, name, fractions)
        assert fractions[window] >= 0.95 if probe in near else fractions[window] <= 0.1, (probe, fractions)
    linear = [results["recall"][p]["linear attention"] for p in near]  # n growing
    assert linear[0] >= 0.5 and linear[-1] <= 0.1 and linear[0] > linear[-1] + 0.3, linear
    assert results["recall"][far]["linear attention"] <= 0.1, results["recall"][far]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds (for tests)")
    args = parser.parse_args()
    start = time.perf_counter()
    with one_blas_thread():
        results = run(quick=args.quick)
    config = results["config"]
    print(f"Causal attention, one head, D = {config['D']}, float32, NumPy, T = {config['lengths'][0]} ... "
          f"{config['lengths'][-1]}, window w = {config['w']} (w + 1 keys), recall over {config['trials']} "
          f"problems (d = distance of the planted key, n = keys stored)\n")
    print(markdown(results))
    print(f"\nThe sliding window row equals attention_forward(..., window=(w, 0)), the same mask computed "
          f"densely, within {results['window_exact']:.1e}: exact for the keys it keeps.")
    check(results, args.quick)
    print(f"\nAll claims hold ({time.perf_counter() - start:.0f} s).")


if __name__ == "__main__":
    main()

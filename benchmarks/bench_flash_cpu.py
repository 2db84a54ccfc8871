"""CPU benchmark: full attention (attention.py) versus tiled flash attention (flash.py), in NumPy.

For each sequence length T (T = S, one batch*head, Dh = 64, float32; non-causal, causal, and causal with a
sliding window of --window keys before each query, Mistral-style, FlashAttention-2's count) it prints
the forward time of each (best of a few runs after a warm-up), the peak memory each allocates
(tracemalloc, which sees every NumPy allocation, measured in a separate run so it does not slow the
timing), and the ratios. The points to see: full attention's memory grows as T^2, flash's as T; with a
window of w, flash's time grows as T w (it skips the tiles outside the band), full attention's still as T^2.

    python benchmarks/bench_flash_cpu.py                  # T = 256 ... 16384, a few minutes
    python benchmarks/bench_flash_cpu.py --T 256 1024     # quick
"""
import argparse
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attention import attention_forward  # noqa: E402
from flash import flash_attention_forward  # noqa: E402


def best_time(fn, repeats):
    fn()                                                       # warm-up: first-touch allocations, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_bytes(fn):
    tracemalloc.start()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--Dh", type=int, default=64)
    parser.add_argument("--block", type=int, default=256, help="flash tile size (block_q = block_k)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=256, help="w of the window rows: window = (w, 0)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, NumPy {np.__version__}, "
          f"float32, Dh={args.Dh}, flash tiles {args.block}x{args.block}, {time.strftime('%Y-%m-%d')}")
    print(f"{'T':>6} {'mask':>8} | {'full s':>8} {'flash s':>8} {'flash/full':>10} | "
          f"{'full MiB':>9} {'flash MiB':>9} {'full/flash':>10} | {'max |diff|':>10}")
    for T in args.T:
        q, k, v = (rng.standard_normal((1, T, args.Dh)).astype(np.float32) for _ in range(3))
        repeats = args.repeats if T <= 4096 else 1
        for label, causal, window in (("none", False, None), ("causal", True, None),
                                      (f"w={args.window}", True, (args.window, 0))):
            full = lambda: attention_forward(q, k, v, causal=causal, window=window)[0]  # noqa: E731
            flash = lambda: flash_attention_forward(q, k, v, causal=causal, window=window,  # noqa: E731
                                                    block_q=args.block, block_k=args.block)[0]
            diff = float(np.abs(full() - flash()).max())
            assert diff < 1e-4, f"flash and full attention disagree by {diff}"  # float32 rounding only
            t_full, t_flash = best_time(full, repeats), best_time(flash, repeats)
            m_full, m_flash = peak_bytes(full) / 2**20, peak_bytes(flash) / 2**20
            print(f"{T:>6} {label:>8} | {t_full:>8.3f} {t_flash:>8.3f} {t_flash / t_full:>10.2f} | "
                  f"{m_full:>9.1f} {m_flash:>9.1f} {m_full / m_flash:>10.1f} | {diff:>10.1e}", flush=True)


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")   # both methods alike, and unslowed by other work
    main()

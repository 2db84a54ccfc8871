"""GPU benchmark: flash.py's CUDA kernels versus PyTorch's scaled_dot_product_attention and full attention.

For head widths Dh = 64 and 128, T = S = 1k ... 16k, causal and not, all float32, it prints the forward
and forward+backward speed in TFLOP/s of

    flash  flash_attention_forward / _backward on CuPy float32 arrays (this project's kernels)
    sdpa   torch.nn.functional.scaled_dot_product_attention in float32 (if torch with CUDA is installed),
           held to its memory-efficient backend: the only fused one that takes float32 (flash and cuDNN
           take 16-bit floats only), O(T) memory like ours. On sm_80+ its CUTLASS products use 3xTF32
           ("FastF32"), float32-accurate whatever torch.backends.cuda.matmul.allow_tf32 says; that flag,
           which the math backend would obey, is set False anyway.
    full   attention_forward / _backward from attention.py on CuPy arrays (the T x S matrices in memory),
           float32 cuBLAS products (CuPy uses TF32 only with CUPY_TF32=1, which is reported)

and the ratios flash/sdpa and flash/full, then the longest T each one can run before the GPU is out of
memory. FLOPs are counted as in the FlashAttention papers: 4 * B * H * T * S * Dh for the forward (two
matrix products), 2.5 times that for the backward (five), so 3.5 times for forward+backward; causal
halves both. Each time is the median of --repeats runs after --warmup runs (the first run compiles the
kernels), measured with CUDA events on the GPU. Batch and heads: B = max(1, tokens // T) sequences of
H = 2048 // Dh heads, so every T does the same number of tokens of a 2048-wide model.

    python benchmarks/bench_flash_gpu.py                          # the full table, a few minutes
    python benchmarks/bench_flash_gpu.py --T 1024 4096 --Dh 64    # a quick look
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attention import attention_backward, attention_forward  # noqa: E402
from flash import flash_attention_backward, flash_attention_forward  # noqa: E402


def gpu_available():
    try:
        import cupy
        return bool(cupy.is_available())
    except Exception:  # no CuPy, or a CuPy that finds no driver: no GPU for this benchmark
        return False


def load_torch():
    """torch, if it is installed with CUDA and torch.nn.attention; else None (no sdpa column)."""
    try:
        import torch
        import torch.nn.attention  # noqa: F401  sdpa_kernel, to hold sdpa to one backend (torch >= 2.3)
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False              # the default; said here, not assumed
    return torch


def flops(B, H, T, S, Dh, causal, backward):
    forward = 4 * B * H * T * S * Dh
    total = forward * 3.5 if backward else forward
    return total / 2 if causal else total


# ----------------------------------------------------------------------------------------------------
# Each method is a function (q, k, v, dout, causal, backward) -> out, given CuPy float32 arrays of shape
# (B, H, T, Dh). torch reads the same GPU memory through DLPack, so all three see identical inputs.


def run_flash(q, k, v, dout, causal, backward):
    out, cache = flash_attention_forward(q, k, v, causal=causal)
    if backward:
        flash_attention_backward(dout, cache)
    return out


def run_full(q, k, v, dout, causal, backward):
    out, cache = attention_forward(q, k, v, causal=causal)
    if backward:
        attention_backward(dout, cache)
    return out


def make_run_sdpa(torch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run_sdpa(q, k, v, dout, causal, backward):
        # T == S here, so is_causal's top-left alignment is the same mask as this project's.
        q, k, v, dout = (torch.from_dlpack(x) for x in (q, k, v, dout))
        # Only the memory-efficient backend: were it unable to run, torch raises instead of silently
        # timing the O(T^2) math backend.
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            if not backward:
                with torch.no_grad():
                    return sdpa(q, k, v, is_causal=causal)
            q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
            out = sdpa(q, k, v, is_causal=causal)
            torch.autograd.grad(out, (q, k, v), dout)
            return out.detach()

    return run_sdpa


def gpu_seconds(fn, warmup, repeats):
    """Median seconds of fn() on the GPU, timed with CUDA events on the current stream.

    CuPy's and torch's default streams are both CUDA's legacy default stream, so these events also
    bracket torch's kernels.
    """
    import cupy
    for _ in range(warmup):
        fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)   # milliseconds -> seconds
    return statistics.median(times)


def free_memory(torch):
    """Give the memory pools back, so that one method's cached blocks cannot starve the next."""
    import cupy
    cupy.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()


def is_out_of_memory(error, torch):
    """CuPy's or torch's out-of-memory error, or a library (cuBLAS) that failed to allocate its workspace."""
    import cupy
    if isinstance(error, cupy.cuda.memory.OutOfMemoryError):
        return True
    if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    message = str(error).lower()
    return "out of memory" in message or "alloc_failed" in message


def measure(method, inputs, causal, backward, args, torch):
    """Seconds per call, or None when the GPU runs out of memory."""
    try:
        return gpu_seconds(lambda: method(*inputs, causal, backward), args.warmup, args.repeats)
    except Exception as error:
        if not is_out_of_memory(error, torch):
            raise
        return None
    finally:
        free_memory(torch)


def random_inputs(B, H, T, Dh, seed=0):
    import cupy
    rng = cupy.random.default_rng(seed)
    return [rng.standard_normal((B, H, T, Dh), dtype=cupy.float32) for _ in range(4)]  # q, k, v, dout


def max_difference(a, b):
    import cupy
    return float(cupy.abs(cupy.asarray(a) - cupy.asarray(b)).max())


def fails_at(method, T, Dh, torch):
    """None if forward+backward at B = H = 1 and length T runs; else why not ('out of memory', ...)."""
    import cupy
    try:
        method(*random_inputs(1, 1, T, Dh), False, True)
        cupy.cuda.Device().synchronize()
        return None
    except Exception as error:  # out of memory, or a limit of the method (grid size, say): report it
        return "out of memory" if is_out_of_memory(error, torch) else f"{type(error).__name__}: {error}"
    finally:
        free_memory(torch)


def longest(method, Dh, start, cap, torch):
    """The longest T = start * 2^n <= cap that `method` runs, and what stopped it at 2T."""
    T, best = start, None
    while T <= cap:
        reason = fails_at(method, T, Dh, torch)
        if reason is not None:
            return f"{best if best else f'< {start}'} ({reason} at T = {T})"
        best, T = T, 2 * T
    return f">= {best} (the cap)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--Dh", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tokens", type=int, default=16384, help="B * T, the tokens per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--longest-start", type=int, default=16384, help="first T of the longest-T search")
    parser.add_argument("--longest-cap", type=int, default=262144,
                        help="last T of the longest-T search (flash and sdpa need only O(T) memory)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's float32 peak, to print flash as a fraction of it (H100 SXM: 66.9)")
    args = parser.parse_args()

    if not gpu_available():
        print("No CUDA GPU is visible to CuPy (cupy.is_available() is False): nothing to benchmark. "
              "Run this on a machine with an NVIDIA GPU and cupy-cuda12x/13x installed.")
        return
    import cupy
    torch = load_torch()
    methods = {"flash": run_flash, "full": run_full}
    if torch is not None:
        methods["sdpa"] = make_run_sdpa(torch)

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    gpu_name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"# {gpu_name}, {time.strftime('%Y-%m-%d')}, CuPy {cupy.__version__} "
          f"(CUPY_TF32={os.environ.get('CUPY_TF32', '0')}), "
          + (f"torch {torch.__version__} (sdpa: memory-efficient backend, allow_tf32="
             f"{torch.backends.cuda.matmul.allow_tf32})" if torch is not None
             else "no torch with CUDA (no sdpa column)"))
    print(f"# float32; TFLOP/s with forward = 4*B*H*T*S*Dh, forward+backward = 3.5x, causal halved; "
          f"median of {args.repeats} after {args.warmup} warm-up runs, CUDA events; '-' = out of memory")
    header = (f"{'Dh':>4} {'T':>6} {'B':>3} {'H':>3} {'causal':>6} {'pass':>8} | {'flash':>7} {'sdpa':>7} "
              f"{'full':>7} TFLOP/s | {'flash/sdpa':>10} {'flash/full':>10} | {'max|flash-sdpa|':>15}")
    if args.peak_tflops:
        header += f" | {'flash/peak':>10}"
    print(header)

    for Dh in args.Dh:
        H = max(1, 2048 // Dh)
        for T in args.T:
            B = max(1, args.tokens // T)
            inputs = random_inputs(B, H, T, Dh)
            for causal in (False, True):
                # The kernels must agree with sdpa before their speed means anything: both are float32-
                # accurate (~1e-6 apart); a wrong tile or mask is off by O(0.1).
                difference = float("nan")
                if torch is not None:
                    try:
                        difference = max_difference(run_flash(*inputs, causal, False),
                                                    methods["sdpa"](*inputs, causal, False))
                    except Exception as error:
                        if not is_out_of_memory(error, torch):
                            raise
                    finally:
                        free_memory(torch)
                    assert not difference > 1e-3, f"flash and sdpa disagree by {difference} (Dh={Dh}, T={T})"
                for backward in (False, True):
                    seconds = {name: measure(method, inputs, causal, backward, args, torch)
                               for name, method in methods.items()}
                    work = flops(B, H, T, T, Dh, causal, backward)
                    tflops = {name: (work / s / 1e12 if s else None) for name, s in seconds.items()}

                    def cell(name):
                        value = tflops.get(name)
                        return f"{value:>7.2f}" if value is not None else f"{'-':>7}"

                    def ratio(other):
                        if tflops["flash"] is None or tflops.get(other) is None:
                            return f"{'-':>10}"
                        return f"{tflops['flash'] / tflops[other]:>10.2f}"

                    line = (f"{Dh:>4} {T:>6} {B:>3} {H:>3} {causal!s:>6} {'fwd+bwd' if backward else 'fwd':>8} | "
                            f"{cell('flash')} {cell('sdpa')} {cell('full')}         | "
                            f"{ratio('sdpa')} {ratio('full')} | {difference:>15.1e}")
                    if args.peak_tflops and tflops["flash"] is not None:
                        line += f" | {tflops['flash'] / args.peak_tflops:>10.1%}"
                    print(line, flush=True)
            del inputs
            free_memory(torch)

    print(f"\n# Longest T = S with B = H = 1, forward+backward, non-causal (doubling from "
          f"{args.longest_start} up to {args.longest_cap}):")
    for Dh in args.Dh:
        for name, method in methods.items():
            found = longest(method, Dh, args.longest_start, args.longest_cap, torch)
            print(f"Dh={Dh:<4} {name:>5}: T {found}", flush=True)


if __name__ == "__main__":
    main()

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
H = 2048 // Dh heads, so every T does the same number of tokens of a 2048-wide model (--tokens and
--model-width change those).

Before timing a (Dh, T, causal) case, flash's forward is compared with sdpa's on the same inputs: both are
float32-accurate, so they must agree to 1e-3 (a wrong tile or mask is off by O(0.1)). A case that
disagrees is marked in the table and JSON, and the script exits 1 at the end.

--json and --text write the results (rewritten after every row, so a run stopped midway keeps what it
measured); --table-budget and --longest-budget (seconds) skip what would start after them, and say so;
--first-T measures that length first for every Dh (benchmarks/gpu_check.py asks for 4096, its headline).

    python benchmarks/bench_flash_gpu.py                          # the full table, a few minutes
    python benchmarks/bench_flash_gpu.py --T 1024 4096 --Dh 64    # a quick look
Without a GPU it says so and exits 0.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attention import attention_backward, attention_forward  # noqa: E402
from flash import flash_attention_backward, flash_attention_forward  # noqa: E402

AGREEMENT = 1e-3        # max |flash - sdpa| allowed: both float32-accurate (~1e-6 apart), a bug is ~1e-1
PASSES = ("fwd", "fwd+bwd")
NO_GPU_MESSAGE = ("No CUDA GPU is visible to CuPy (no CuPy, or cupy.is_available() is False): nothing to "
                  "benchmark. Run this on a machine with an NVIDIA GPU and cupy-cuda12x/13x installed.")

# What the benchmark needs from the machine, so that tests can run it on CuPy on a CPU with a fake clock:
#   seconds(fn, warmup, repeats) -> median seconds of fn();  free() gives pooled memory back;
#   inputs(B, H, T, Dh) -> q, k, v, dout;  synchronize() waits for the device;
#   out_of_memory(error) -> True if error means the device ran out of memory.
Device = collections.namedtuple("Device", "seconds free inputs synchronize out_of_memory")


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


# ----------------------------------------------------------------------------------------------------
# The GPU as a Device


def cuda_event_seconds(fn, warmup, repeats):
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


def gpu_device(torch):
    """The Device of a CUDA GPU through CuPy (and torch, whose memory pool is emptied too)."""
    import cupy

    def free():
        """Give the memory pools back, so that one method's cached blocks cannot starve the next."""
        cupy.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            torch.cuda.empty_cache()

    def inputs(B, H, T, Dh, seed=0):
        rng = cupy.random.default_rng(seed)
        return [rng.standard_normal((B, H, T, Dh), dtype=cupy.float32) for _ in range(4)]  # q, k, v, dout

    def out_of_memory(error):
        """CuPy's or torch's out-of-memory error, or a library (cuBLAS) that failed to allocate its workspace."""
        if isinstance(error, cupy.cuda.memory.OutOfMemoryError):
            return True
        if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
            return True
        message = str(error).lower()
        return "out of memory" in message or "alloc_failed" in message

    return Device(seconds=cuda_event_seconds, free=free, inputs=inputs,
                  synchronize=lambda: cupy.cuda.Device().synchronize(), out_of_memory=out_of_memory)


def describe_gpu(torch):
    """The header line's facts: GPU, date, CuPy, TF32 settings, torch."""
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return {"gpu": name, "date": time.strftime("%Y-%m-%d"), "cupy": cupy.__version__,
            "cupy_tf32": os.environ.get("CUPY_TF32", "0"),
            "torch": torch.__version__ if torch is not None else None,
            "torch_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if torch is not None else None}


# ----------------------------------------------------------------------------------------------------
# Measuring


def unless_out_of_memory(fn, device):
    """fn(), or None when the device runs out of memory (any other error is raised); memory freed after."""
    try:
        return fn()
    except Exception as error:
        if not device.out_of_memory(error):
            raise
        return None
    finally:
        device.free()


def measure(method, inputs, causal, backward, args, device):
    """Seconds per call, or None when the device runs out of memory."""
    return unless_out_of_memory(
        lambda: device.seconds(lambda: method(*inputs, causal, backward), args.warmup, args.repeats), device)


def max_difference(a, b):
    """max |a - b| of two device arrays (a CuPy array and a torch tensor read through DLPack)."""
    import cupy
    return float(cupy.abs(cupy.asarray(a) - cupy.asarray(b)).max())


def agreement(methods, inputs, causal, device, difference=max_difference):
    """max |flash - sdpa| of the forward outputs, or None without sdpa or when either runs out of memory."""
    if "sdpa" not in methods:
        return None
    return unless_out_of_memory(
        lambda: difference(methods["flash"](*inputs, causal, False), methods["sdpa"](*inputs, causal, False)), device)


def measure_case(methods, Dh, T, args, device, difference=max_difference):
    """The four rows (causal or not, fwd or fwd+bwd) of one (Dh, T), one by one as they are measured:
    seconds and TFLOP/s of every method, and how far flash's forward is from sdpa's."""
    H = max(1, args.model_width // Dh)
    B = max(1, args.tokens // T)
    inputs = device.inputs(B, H, T, Dh)
    for causal in (False, True):
        diff = agreement(methods, inputs, causal, device, difference)
        for backward in (False, True):
            seconds = {name: measure(method, inputs, causal, backward, args, device)
                       for name, method in methods.items()}
            work = flops(B, H, T, T, Dh, causal, backward)
            yield {"Dh": Dh, "T": T, "B": B, "H": H, "causal": causal, "pass": PASSES[backward],
                   "seconds": seconds,
                   "tflops": {name: (work / s / 1e12 if s else None) for name, s in seconds.items()},
                   "max_diff_vs_sdpa": diff, "agrees": diff is None or diff <= AGREEMENT}
    del inputs
    device.free()


def fails_at(method, T, Dh, device):
    """None if forward+backward at B = H = 1 and length T runs; else why not ('out of memory', ...)."""
    try:
        method(*device.inputs(1, 1, T, Dh), False, True)
        device.synchronize()
        return None
    except Exception as error:  # out of memory, or a limit of the method (grid size, say): report it
        return "out of memory" if device.out_of_memory(error) else f"{type(error).__name__}: {error}"
    finally:
        device.free()


def longest(method, Dh, start, cap, device, deadline=None):
    """The longest T = start * 2^n <= cap that `method` runs: {'T': longest that ran or None, 'why': what
    stopped the search}. The search stops at the cap, at the first failure, or past `deadline`
    (time.monotonic()), whichever comes first."""
    T, best = start, None
    while T <= cap:
        if deadline is not None and time.monotonic() > deadline:
            return {"T": best, "why": f"time budget spent before T = {T}"}
        reason = fails_at(method, T, Dh, device)
        if reason is not None:
            return {"T": best, "why": f"{reason} at T = {T}"}
        best, T = T, 2 * T
    return {"T": best, "why": f"the cap, {cap}"}


def case_order(Dhs, Ts, first_T=None):
    """(Dh, T) in the order to measure: (Dh, first_T) for every Dh first (so a time budget that runs out
    still leaves the headline), then the rest, Dh by Dh, T by T."""
    cases = [(Dh, T) for Dh in Dhs for T in Ts]
    return [case for case in cases if case[1] == first_T] + [case for case in cases if case[1] != first_T]


# ----------------------------------------------------------------------------------------------------
# Reporting


def format_header(meta, methods, args):
    torch_part = (f"torch {meta['torch']} (sdpa: memory-efficient backend, allow_tf32={meta['torch_allow_tf32']})"
                  if "sdpa" in methods else "no torch with CUDA (no sdpa column)")
    return [f"# {meta['gpu']}, {meta['date']}, CuPy {meta['cupy']} (CUPY_TF32={meta['cupy_tf32']}), {torch_part}",
            f"# float32; TFLOP/s with forward = 4*B*H*T*S*Dh, forward+backward = 3.5x, causal halved; median of "
            f"{args.repeats} after {args.warmup} warm-up runs; '-' = out of memory (or not run)",
            f"{'Dh':>4} {'T':>6} {'B':>3} {'H':>3} {'causal':>6} {'pass':>8} | {'flash':>7} {'sdpa':>7} {'full':>7} "
            f"TFLOP/s | {'flash/sdpa':>10} {'flash/full':>10} | {'max|flash-sdpa|':>15}"
            + (f" | {'flash/peak':>10}" if args.peak_tflops else "")]


def ratio(row, other):
    """flash's TFLOP/s over `other`'s in one row, or None where either is missing."""
    mine, theirs = row["tflops"].get("flash"), row["tflops"].get(other)
    return mine / theirs if mine and theirs else None


def format_row(row, peak_tflops=None):
    def cell(value, width, spec):
        return f"{value:>{width}{spec}}" if value is not None else f"{'-':>{width}}"

    tflops = row["tflops"]
    line = (f"{row['Dh']:>4} {row['T']:>6} {row['B']:>3} {row['H']:>3} {row['causal']!s:>6} {row['pass']:>8} | "
            f"{cell(tflops.get('flash'), 7, '.2f')} {cell(tflops.get('sdpa'), 7, '.2f')} "
            f"{cell(tflops.get('full'), 7, '.2f')}         | "
            f"{cell(ratio(row, 'sdpa'), 10, '.2f')} {cell(ratio(row, 'full'), 10, '.2f')} | "
            f"{cell(row['max_diff_vs_sdpa'], 15, '.1e')}")
    if peak_tflops:
        line += f" | {cell(tflops['flash'] / peak_tflops if tflops.get('flash') else None, 10, '.1%')}"
    if not row["agrees"]:
        line += f"  <- flash and sdpa disagree by more than {AGREEMENT}"
    return line


def format_longest(entry):
    T = entry["T"]
    return f"Dh={entry['Dh']:<4} {entry['method']:>5}: T {T if T else '-'} (stopped by {entry['why']})"


def format_report(report, args):
    """The whole table as text, rows sorted by Dh, T, causal, pass (whatever order they were measured in)."""
    order = {name: i for i, name in enumerate(PASSES)}
    rows = sorted(report["rows"], key=lambda r: (r["Dh"], r["T"], r["causal"], order[r["pass"]]))
    lines = format_header(report["meta"], report["methods"], args)
    lines += [format_row(row, args.peak_tflops) for row in rows]
    lines += [f"# not measured: Dh={s['Dh']} T={s['T']} ({s['why']})" for s in report["skipped"]]
    lines += ["", f"# Longest T = S with B = H = 1, forward+backward, non-causal (doubling from "
                  f"{args.longest_start} up to {args.longest_cap}):"]
    lines += [format_longest(entry) for entry in report["longest"]]
    return "\n".join(lines) + "\n"


def write_atomically(path, text):
    """Write text to path through a temporary file, so that a reader (or a kill) never sees half a file."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, path)


def save(report, args):
    if args.json:
        write_atomically(args.json, json.dumps(report, indent=1) + "\n")
    if args.text:
        write_atomically(args.text, format_report(report, args))


# ----------------------------------------------------------------------------------------------------


def run_benchmark(args, methods, device, meta, emit=print, difference=max_difference):
    """Measure every case and the longest T, calling save() after each row; returns the report dict.

    report = {'meta', 'methods', 'rows': [row, ...], 'skipped': [{'Dh', 'T', 'why'}], 'longest':
    [{'Dh', 'method', 'T', 'why'}], 'complete': bool (nothing cut by a budget)}; a row is measure_case's dict.
    """
    table_deadline = time.monotonic() + args.table_budget if args.table_budget is not None else None
    report = {"meta": meta, "methods": list(methods), "rows": [], "skipped": [], "longest": [], "complete": False}
    for line in format_header(meta, methods, args):
        emit(line)
    for Dh, T in case_order(args.Dh, args.T, args.first_T):
        if table_deadline is not None and time.monotonic() > table_deadline:
            report["skipped"].append({"Dh": Dh, "T": T, "why": f"table budget of {args.table_budget} s spent"})
            emit(f"# skipped Dh={Dh} T={T}: table budget of {args.table_budget} s spent")
            continue
        for row in measure_case(methods, Dh, T, args, device, difference):
            report["rows"].append(row)
            emit(format_row(row, args.peak_tflops))
            save(report, args)
    emit(f"\n# Longest T = S with B = H = 1, forward+backward, non-causal (doubling from "
         f"{args.longest_start} up to {args.longest_cap}):")
    # The search's budget starts where the table's ended, so time the table left over is the search's too.
    longest_deadline = None
    if args.longest_budget is not None:
        longest_deadline = (table_deadline if table_deadline is not None else time.monotonic()) + args.longest_budget
    for Dh in args.Dh:
        for name, method in methods.items():
            found = longest(method, Dh, args.longest_start, args.longest_cap, device, longest_deadline)
            entry = {"Dh": Dh, "method": name, **found}
            report["longest"].append(entry)
            emit(format_longest(entry))
            save(report, args)
    report["complete"] = not report["skipped"] and not any("time budget" in entry["why"] for entry in report["longest"])
    save(report, args)
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--Dh", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tokens", type=int, default=16384, help="B * T, the tokens per measurement")
    parser.add_argument("--model-width", type=int, default=2048, help="H * Dh, the heads per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--longest-start", type=int, default=16384, help="first T of the longest-T search")
    parser.add_argument("--longest-cap", type=int, default=262144,
                        help="last T of the longest-T search (flash and sdpa need only O(T) memory)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's float32 peak, to print flash as a fraction of it (H100 SXM: 66.9)")
    parser.add_argument("--first-T", type=int, default=None, help="measure this T first for every Dh")
    parser.add_argument("--table-budget", type=float, default=None,
                        help="seconds: cases that would start later are skipped (and listed)")
    parser.add_argument("--longest-budget", type=float, default=None,
                        help="seconds after the table's budget (or the start) for the longest-T search")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--text", default=None, help="write the table here as text")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not gpu_available():
        print(NO_GPU_MESSAGE)
        if args.json:
            write_atomically(args.json, json.dumps({"error": NO_GPU_MESSAGE}) + "\n")
        return 0
    torch = load_torch()
    methods = {"flash": run_flash, "full": run_full}
    if torch is not None:
        methods["sdpa"] = make_run_sdpa(torch)
    report = run_benchmark(args, methods, gpu_device(torch), describe_gpu(torch),
                           emit=lambda line: print(line, flush=True))
    if not all(row["agrees"] for row in report["rows"]):
        print(f"FAILED: flash and sdpa disagree by more than {AGREEMENT} in the rows marked above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

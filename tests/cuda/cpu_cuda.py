"""Run CUDA kernels on a CPU: compile the unchanged kernel source as C++ and launch it from Python.

A CUDA kernel is C++ plus a few words (threadIdx, __shared__, __syncthreads, ...). cuda_shim.h gives
those words a CPU meaning (every CUDA thread a real thread, every barrier a real barrier, blocks one after
another); cuda_launcher.h launches a kernel the way cuLaunchKernel does. This file glues them together:

    lib = load_kernels(source)          # g++ compiles shim + source + launcher into a shared library
    run_launches(lib, launches)         # the same (kernel, grid, block, args, shared_mem) list that
                                        # flash.py hands to CuPy, run on NumPy arrays through ctypes

The same source built with -fsanitize=thread or -fsanitize=address checks the kernels for data races
(a missing __syncthreads) and out-of-bounds accesses. A sanitized library must run in a Python started
with the sanitizer's runtime loaded first, so run_under_sanitizer sends the launches to a fresh one.

Run `python tests/cuda/cpu_cuda.py` to watch flash.py's CUDA kernels match the NumPy path on a CPU (add
`--causal`, or `--window 20 0` for a sliding window), and `python tests/cuda/cpu_cuda.py --sanitizer thread`
(or address) to run them under a sanitizer.
"""
import ctypes
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

SHIM_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(os.path.dirname(SHIM_DIR))
if REPO_DIR not in sys.path:                 # run as a script, or in the process run_under_sanitizer starts
    sys.path.insert(0, REPO_DIR)
import flash  # noqa: E402  (flash.py: Launch, and the kernels this file runs from the command line)
from flash import Launch  # noqa: E402,F401  kernel<<<grid, block, shared_mem>>>(*args), one definition

CXX = os.environ.get("CXX", "g++")
# -O0: a build takes about a second (the kernels' speed on a CPU means nothing) and the sanitizers see
# every memory access; -g: their reports name file:line of the kernel source; -fno-strict-aliasing: the
# kernels read float arrays through float4 pointers.
FLAGS = ["-std=c++17", "-O0", "-g", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing"]
SANITIZER_FLAGS = {None: [], "thread": ["-fsanitize=thread"],
                   "address": ["-fsanitize=address", "-fno-omit-frame-pointer"]}
# Sanitizer settings for the process that runs a sanitized library: stop at the first report (one bug
# at a time), and no leak report (the Python interpreter keeps memory until exit by design).
SANITIZER_OPTIONS = {"thread": ("TSAN_OPTIONS", "halt_on_error=1"),
                     "address": ("ASAN_OPTIONS", "halt_on_error=1:detect_leaks=0")}
# The most dynamic shared memory one block may ask for on the oldest GPU we support (sm_80: 163 KiB).
MAX_SHARED_BYTES = 163 * 1024

def kernel_names(source):
    """Names of the `__global__ void name(` kernels in a CUDA source, after its macros are expanded
    (a kernel source may stamp out one kernel per head width with a macro)."""
    expanded = subprocess.run([CXX, "-E", "-P", "-x", "c++", "-"], input=source,
                              capture_output=True, text=True, check=True).stdout
    bounds = r"(?:__launch_bounds__\s*\([^)]*\)\s*)?"
    return re.findall(r"__global__\s+" + bounds + r"void\s+" + bounds + r"(\w+)\s*\(", expanded)


def build(source, build_dir=None, sanitizer=None):
    """Compile `source` with the shim into a shared library; return its path.

    The library's name is a hash of everything that goes into it, so a second call with the same source
    and flags finds it already built (one compile per variant, even across test sessions).
    """
    if not shutil.which(CXX):
        raise RuntimeError(f"no C++ compiler: {CXX} is not on PATH")
    build_dir = build_dir or os.path.join(tempfile.gettempdir(), f"cpu_cuda-{os.getuid()}")
    os.makedirs(build_dir, exist_ok=True)
    flags = FLAGS + SANITIZER_FLAGS[sanitizer]
    shim_files = [open(os.path.join(SHIM_DIR, name)).read() for name in ("cuda_shim.h", "cuda_launcher.h")]
    key = hashlib.sha256("\0".join([source, *shim_files, CXX, *flags]).encode()).hexdigest()[:16]
    library = os.path.join(build_dir, f"kernels-{key}.so")
    if os.path.exists(library):
        return library

    kernel_file = os.path.join(build_dir, f"kernels-{key}.cu")    # the source, byte for byte
    with open(kernel_file, "w") as f:
        f.write(source)
    main_file = os.path.join(build_dir, f"kernels-{key}.cpp")
    with open(main_file, "w") as f:
        f.write('#include "cuda_shim.h"\n')
        f.write(f'#include "{os.path.basename(kernel_file)}"\n')
        f.write('#include "cuda_launcher.h"\n')
        f.writelines(f"EXPORT_KERNEL({name})\n" for name in kernel_names(source))
    partial = f"{library}.{os.getpid()}.tmp"                      # renamed when complete
    result = subprocess.run([CXX, *flags, "-I", SHIM_DIR, main_file, "-o", partial],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{CXX} could not compile the kernels as C++:\n{result.stderr}")
    os.replace(partial, library)
    return library


_loaded = {}


def load_kernels(source, build_dir=None):
    """The kernels of `source` as a ctypes library in this process (built without sanitizers)."""
    path = build(source, build_dir)
    if path not in _loaded:
        _loaded[path] = ctypes.CDLL(path)
    return _loaded[path]


def _parameter_value(kernel, i, arg, parameter):
    """The ctypes object holding argument i, after checking it matches the kernel's parameter type."""
    where = f"{kernel} argument {i} ({parameter})"
    if parameter.endswith("*"):
        if not isinstance(arg, np.ndarray) or arg.dtype != np.float32 or not arg.flags.c_contiguous:
            raise TypeError(f"{where}: needs a C-contiguous float32 NumPy array, got "
                            f"{type(arg).__name__} {getattr(arg, 'dtype', '')}")
        if not parameter.startswith("const") and not arg.flags.writeable:
            raise ValueError(f"{where}: the kernel writes to it, but the array is read-only")
        return ctypes.c_void_p(arg.ctypes.data)
    # Scalars are passed by value; like CuPy, the NumPy type says how many bytes: int32 or float32.
    scalars = {"int": (np.int32, ctypes.c_int32), "float": (np.float32, ctypes.c_float)}
    if parameter not in scalars:
        raise TypeError(f"{where}: the shim passes float*, const float*, int and float parameters only")
    numpy_type, c_type = scalars[parameter]
    if not isinstance(arg, numpy_type):
        raise TypeError(f"{where}: needs a numpy.{numpy_type.__name__}, got {type(arg).__name__}")
    return c_type(arg.item())


def run_kernel(lib, kernel, grid, block, args, shared_mem=0):
    """Launch one kernel: kernel<<<grid, block, shared_mem>>>(*args), on the CPU."""
    if not hasattr(lib, f"launch_{kernel}"):
        raise ValueError(f"the kernel source has no `__global__ void {kernel}(...)`")
    signature = getattr(lib, f"signature_{kernel}")
    signature.restype = ctypes.c_char_p
    parameters = signature().decode().split(",")
    if len(args) != len(parameters):
        raise TypeError(f"{kernel} takes {len(parameters)} arguments ({', '.join(parameters)}), "
                        f"got {len(args)}")
    for name, dims in (("grid", grid), ("block", block)):
        if len(dims) != 3 or any(int(d) < 1 for d in dims):
            raise ValueError(f"{kernel}: {name} must be three positive ints, got {dims}")
    if int(np.prod(block)) > 1024:
        raise ValueError(f"{kernel}: a block has at most 1024 threads, got block {block}")
    if not 0 <= shared_mem <= MAX_SHARED_BYTES:
        raise ValueError(f"{kernel}: shared_mem must be 0 to {MAX_SHARED_BYTES} bytes, got {shared_mem}")

    values = [_parameter_value(kernel, i, a, p) for i, (a, p) in enumerate(zip(args, parameters))]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    launch = getattr(lib, f"launch_{kernel}")
    launch.restype = ctypes.c_char_p
    error = launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                   ctypes.c_size_t(shared_mem), pointers)
    if error:
        raise RuntimeError(f"{kernel}<<<{tuple(grid)}, {tuple(block)}, {shared_mem}>>>: {error.decode()}")


def run_launches(lib, launches):
    """Run a list of Launch(kernel, grid, block, args, shared_mem) in order, as the CuPy path does."""
    for launch in launches:
        run_kernel(lib, launch.kernel, launch.grid, launch.block, launch.args, launch.shared_mem)


# ----------------------------------------------------------------------------------------------------
# Sanitizers


def sanitizer_environment(sanitizer):
    """Environment for a Python that runs a library built with `sanitizer` (its runtime preloaded)."""
    runtime = subprocess.run([CXX, f"-print-file-name=lib{sanitizer[0]}san.so"],
                             capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(runtime):                                  # g++ echoes the bare name if it has none
        raise RuntimeError(f"{CXX} has no {sanitizer} sanitizer runtime (lib{sanitizer[0]}san.so)")
    name, options = SANITIZER_OPTIONS[sanitizer]
    return dict(os.environ, LD_PRELOAD=runtime, **{name: options}, OPENBLAS_NUM_THREADS="1")


def run_under_sanitizer(sanitizer, library, launches, outputs):
    """Run `launches` with `library` (built with `sanitizer`) in a fresh Python, the sanitizer preloaded.

    outputs: a dict of the arrays the launches write. Launches and outputs travel to the new process in
    one pickle, which keeps them the same arrays there, and come back after the run.
    Returns the finished process (its stderr holds the sanitizer's report) and the outputs as the kernels
    left them (None if the process died, as AddressSanitizer makes it at the first error).
    """
    with tempfile.TemporaryDirectory() as folder:
        job = os.path.join(folder, "job.pickle")
        with open(job, "wb") as f:
            pickle.dump((library, launches, outputs), f)
        process = subprocess.run([sys.executable, os.path.abspath(__file__), "--replay", job],
                                 env=sanitizer_environment(sanitizer), capture_output=True, text=True)
        with open(job, "rb") as f:
            library_run, _, outputs = pickle.load(f)
    return process, outputs if library_run is None else None


def _replay(job):
    """The sanitized process: run the pickled launches, then pickle the outputs back."""
    with open(job, "rb") as f:
        library, launches, outputs = pickle.load(f)
    run_launches(ctypes.CDLL(library), launches)
    with open(job, "wb") as f:
        pickle.dump((None, launches, outputs), f)                   # library None: the run finished


# ----------------------------------------------------------------------------------------------------
# flash.py's kernels


def flash_inputs(BH, T, S, Dh, seed=0):
    """Random q (BH, T, Dh), k, v (BH, S, Dh) and an upstream gradient dout (BH, T, Dh), float32."""
    rng = np.random.default_rng(seed)
    q, dout = (rng.standard_normal((BH, T, Dh), dtype=np.float32) for _ in range(2))
    k, v = (rng.standard_normal((BH, S, Dh), dtype=np.float32) for _ in range(2))
    return q, k, v, dout


def flash_reference(q, k, v, dout, causal=False, window=None):
    """out, lse, dq, dk, dv of flash.py's tiled NumPy path in float64 (itself tested against attention.py)."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    out, cache = flash.flash_attention_forward(q, k, v, causal=causal, window=window)
    return (out, cache["lse"], *flash.flash_attention_backward(dout, cache))


def flash_launches(q, k, v, dout, causal=False, scale=None, window=None):
    """flash.py's forward and backward launches for these inputs, and the outputs they write.

    q (BH, T, Dh), k and v (BH, S, Dh), dout (BH, T, Dh): C-contiguous float32 NumPy arrays.
    Returns (launches, {'out', 'lse', 'dq', 'dk', 'dv'}). The outputs start as NaN, as cupy.empty may
    hold anything: an entry the kernels never write shows up.
    """
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    out = np.full(q.shape, np.nan, dtype=np.float32)                  # (BH, T, Dh)
    lse = np.full(q.shape[:-1], np.nan, dtype=np.float32)             # (BH, T)
    dq, dk, dv = (np.full(x.shape, np.nan, dtype=np.float32) for x in (q, k, v))
    band = flash._band(q.shape[1], k.shape[1], causal, window)        # (left, right), as flash.py passes it
    launches = (flash._forward_launches(q, k, v, out, lse, band, scale)
                + flash._backward_launches(q, k, v, out, lse, dout, dq, dk, dv, band, scale))
    return launches, {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def run_flash_attention(lib, q, k, v, dout, causal=False, scale=None, window=None):
    """flash.py's forward and backward kernels on the CPU: out, lse, dq, dk, dv (see flash_launches)."""
    launches, outputs = flash_launches(q, k, v, dout, causal, scale, window)
    run_launches(lib, launches)
    return tuple(outputs.values())


def main():
    import argparse
    parser = argparse.ArgumentParser(description="Run flash.py's CUDA kernels on the CPU and compare "
                                                 "them with the NumPy path.")
    parser.add_argument("--T", type=int, default=70, help="query length")
    parser.add_argument("--S", type=int, default=45, help="key length")
    parser.add_argument("--Dh", type=int, default=40, help="head width")
    parser.add_argument("--BH", type=int, default=2, help="batch * heads")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--window", type=int, nargs=2, metavar=("LEFT", "RIGHT"), help="a sliding window")
    parser.add_argument("--sanitizer", choices=["thread", "address"], help="build with -fsanitize=...")
    parser.add_argument("--replay", help=argparse.SUPPRESS)         # run_under_sanitizer's new process
    args = parser.parse_args()
    if args.replay:
        return _replay(args.replay)

    q, k, v, dout = flash_inputs(args.BH, args.T, args.S, args.Dh)
    launches, outputs = flash_launches(q, k, v, dout, args.causal, window=args.window)
    library = build(flash.FLASH_KERNEL_SOURCE, sanitizer=args.sanitizer)
    if args.sanitizer:
        process, outputs = run_under_sanitizer(args.sanitizer, library, launches, outputs)
        sys.stderr.write(process.stderr)
        assert process.returncode == 0 and outputs is not None, f"the {args.sanitizer} sanitizer reports errors"
    else:
        run_launches(ctypes.CDLL(library), launches)

    print(f"flash.py's CUDA kernels on the CPU, BH={args.BH} T={args.T} S={args.S} Dh={args.Dh} "
          f"causal={args.causal} window={args.window}"
          + (f", {args.sanitizer} sanitizer: clean" if args.sanitizer else ""))
    for (name, got), want in zip(outputs.items(), flash_reference(q, k, v, dout, args.causal, args.window)):
        finite = np.isfinite(want)                                    # lse is -inf on rows with no key
        assert np.array_equal(finite, np.isfinite(got)), f"{name}: non-finite entries differ"
        err = float(np.abs(got[finite] - want[finite]).max(initial=0))
        print(f"  max |kernel - numpy| {name:>3} = {err:.1e}")
        assert err < 1e-4, f"{name} differs from the NumPy path"     # float32 sums of at most S terms
    print("The kernels agree with the NumPy path.")


if __name__ == "__main__":
    main()

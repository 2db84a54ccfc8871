"""Compile CUDA source with NVRTC, the compiler behind cupy.RawModule, on a machine without a GPU.

NVRTC is a library (the nvidia-cuda-nvrtc wheel) and CuPy binds it (cupy.cuda.nvrtc); compiling needs
no GPU. NVRTC is the compiler that counts: it rejects things g++ and even nvcc accept (the INFINITY
macro, any #include of a CUDA header it cannot find). Compiling for a real architecture (sm_80, not
compute_80) also runs ptxas, the assembler, so its errors show up here too, and `--ptxas-options=-v`
makes it report, for every kernel, the registers each thread uses and the bytes it spills to local
memory (spills are slow: they go through the cache hierarchy instead of staying in registers).

    python tests/cuda/nvrtc_compile.py     # flash.py's kernels for sm_80 and sm_90: registers and spills
"""
import os
import re
import sys
import threading

ARCHITECTURES = ("sm_80", "sm_90")     # A100 and H100: the GPUs the project supports
# What cupy.RawModule adds to the caller's options (CuPy 13 and 14, NVRTC, no jitify): flush denormals to
# zero, and __device__ for functions without an execution-space keyword.
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def nvrtc_missing():
    """Why NVRTC cannot be used here, or None if it can."""
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as error:                  # ImportError, or a wheel without the NVRTC library
        return f"needs CuPy and NVRTC (pip install cupy-cuda13x nvidia-cuda-nvrtc): {error}"
    return None


def compile_with_nvrtc(source, arch, options=()):
    """Compile `source` for `arch`; returns (ok, log): NVRTC's verdict and its log, which holds the
    errors and warnings, and ptxas's report of registers and spills."""
    from cupy.cuda import nvrtc
    program = nvrtc.createProgram(source, "kernels.cu", [], [])
    try:
        nvrtc.compileProgram(program, [f"--gpu-architecture={arch}", "--ptxas-options=-v",
                                       *CUPY_OPTIONS, *options])
        ok = True
    except nvrtc.NVRTCError:
        ok = False
    log = nvrtc.getProgramLog(program).rstrip("\0")
    nvrtc.destroyProgram(program)
    return ok, log


def compile_for_every_architecture(source, options=()):
    """{arch: (ok, log)} for ARCHITECTURES, compiled at the same time (NVRTC releases the GIL)."""
    results = {}

    def compile_one(arch):
        results[arch] = compile_with_nvrtc(source, arch, options)

    threads = [threading.Thread(target=compile_one, args=(arch,)) for arch in ARCHITECTURES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {arch: results[arch] for arch in ARCHITECTURES}


def ptxas_usage(log):
    """{kernel: {'registers', 'stack', 'spill_stores', 'spill_loads'}} from ptxas -v's lines:

        ptxas info    : Compiling entry function 'flash_forward_64' for 'sm_80'
        ptxas info    : Function properties for flash_forward_64
        ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 128 registers, used 1 barriers, 412 bytes cmem[0]
    """
    usage, entry, function = {}, None, None
    for line in log.splitlines():
        if match := re.search(r"Compiling entry function '(\w+)'", line):
            entry = match.group(1)
        elif match := re.search(r"Function properties for (\w+)", line):
            function = match.group(1)           # an entry, or a device function that was not inlined
        elif match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            stack, stores, loads = map(int, match.groups())
            usage.setdefault(function, {}).update(stack=stack, spill_stores=stores, spill_loads=loads)
        elif match := re.search(r"Used (\d+) registers", line):
            usage.setdefault(entry, {})["registers"] = int(match.group(1))
    return usage


def flash_options():
    """The options flash.py compiles its kernels with."""
    import flash
    return flash.CUDA_COMPILE_OPTIONS


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import flash
    for arch, (ok, log) in compile_for_every_architecture(flash.FLASH_KERNEL_SOURCE, flash_options()).items():
        assert ok, f"NVRTC could not compile flash.py's kernels for {arch}:\n{log}"
        print(f"{arch}: {'kernel':<26} registers  stack  spill stores  spill loads")
        for kernel, u in sorted(ptxas_usage(log).items()):
            print(f"       {kernel:<26} {u.get('registers', '-'):>9}  {u.get('stack', 0):>5}  "
                  f"{u.get('spill_stores', 0):>12}  {u.get('spill_loads', 0):>11}")

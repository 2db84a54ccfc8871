"""flash.py's CUDA kernels compile with NVRTC, the compiler cupy.RawModule uses, for sm_80 and sm_90.

NVRTC needs no GPU, so this runs in CI. It is the compiler that counts: g++ (the CPU tests) and even nvcc
accept things NVRTC rejects. ptxas's report (registers per thread, spills) is parsed too: no kernel may
spill, since a spill sends a register through local memory and the project's speed target rules that out.
The registers of every kernel are recorded as test properties (`--junitxml`) and printed by
`python tests/cuda/nvrtc_compile.py`.
"""
import os

import numpy as np
import pytest

import flash
import nvrtc_compile  # tests/cuda is not a package: conftest.py puts it on the path
from nvrtc_compile import ARCHITECTURES

pytestmark = pytest.mark.skipif(nvrtc_compile.nvrtc_missing() is not None,
                                reason=str(nvrtc_compile.nvrtc_missing()))

@pytest.fixture(scope="module")
def compiled():
    """{arch: (ok, log)} for flash.py's source: both architectures at once, once per test session (~1 min)."""
    return nvrtc_compile.compile_for_every_architecture(flash.FLASH_KERNEL_SOURCE, nvrtc_compile.flash_options())


def launched_kernels():
    """Every kernel name flash.py's launch plans use, over head widths that reach each compiled width."""
    names = set()
    for Dh in range(1, 129):
        q, k = np.empty((1, 3, Dh), np.float32), np.empty((1, 2, Dh), np.float32)
        band = flash._band(3, 2, True, None)
        launches = (flash._forward_launches(q, k, k, q, q[..., 0], band, 1.0)
                    + flash._backward_launches(q, k, k, q, q[..., 0], q, q, k, k, band, 1.0))
        names |= {launch.kernel for launch in launches}
    return names


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_flash_kernels_compile_with_nvrtc_without_warnings(compiled, arch):
    ok, log = compiled[arch]
    assert ok, f"NVRTC could not compile flash.py's kernels for {arch}:\n{log}"
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, f"NVRTC warns for {arch}:\n" + "\n".join(warnings)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_launched_flash_kernel_is_compiled_and_none_spills_registers(compiled, arch, record_property):
    usage = nvrtc_compile.ptxas_usage(compiled[arch][1])
    missing = launched_kernels() - set(usage)
    assert not missing, f"flash.py launches kernels that the source does not define for {arch}: {missing}"
    record_property(f"registers {arch}", {kernel: u.get("registers") for kernel, u in sorted(usage.items())})
    spills = {kernel: u for kernel, u in usage.items() if u["spill_stores"] or u["spill_loads"]}
    assert not spills, f"kernels that spill registers to local memory on {arch}: {spills}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_example_kernels_compile_with_nvrtc(arch):
    with open(os.path.join(os.path.dirname(nvrtc_compile.__file__), "example_kernels.cu")) as f:
        ok, log = nvrtc_compile.compile_with_nvrtc(f.read(), arch)
    assert ok, log
    assert set(nvrtc_compile.ptxas_usage(log)) == {"block_sum", "row_softmax", "transpose", "axpy4"}


def test_nvrtc_rejects_the_infinity_macro_that_gcc_accepts():
    # The CPU build includes math.h, where INFINITY is defined; NVRTC compiles without headers.
    source = 'extern "C" __global__ void fill(float* x) { x[threadIdx.x] = -INFINITY; }'
    ok, log = nvrtc_compile.compile_with_nvrtc(source, ARCHITECTURES[0])
    assert not ok and "INFINITY" in log


def test_ptxas_report_shows_the_spills_of_a_kernel_short_of_registers():
    # 64 live values per thread, but 2 blocks of 1024 threads leave each thread 32 registers: ptxas must
    # spill, and the parser must see it (so the no-spill test above could fail).
    source = r"""
    extern "C" __global__ void __launch_bounds__(1024, 2) hungry(const float* x, float* y) {
        float acc[64];
    #pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = x[i * 1024 + threadIdx.x];
        for (int round = 0; round < 8; ++round)
    #pragma unroll
            for (int i = 0; i < 64; ++i) acc[i] = fmaf(acc[i], acc[(i + 1) % 64], x[round]);
    #pragma unroll
        for (int i = 0; i < 64; ++i) y[i * 1024 + threadIdx.x] = acc[i];
    }"""
    ok, log = nvrtc_compile.compile_with_nvrtc(source, ARCHITECTURES[0])
    usage = nvrtc_compile.ptxas_usage(log)["hungry"]
    assert ok and usage["registers"] <= 32 and usage["spill_stores"] > 0 and usage["spill_loads"] > 0

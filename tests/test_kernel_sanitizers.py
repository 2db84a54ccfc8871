"""The CUDA kernels under ThreadSanitizer and AddressSanitizer: clean as written, caught when a bug is planted.

On the CPU every CUDA thread is a real thread and every __syncthreads a real barrier (tests/cuda), so
ThreadSanitizer sees exactly the synchronisation a kernel asks for: a missing barrier is a data race.
AddressSanitizer puts poisoned "redzones" around every heap allocation; NumPy arrays and the block's
dynamic shared memory are exact-size heap allocations, so one element past the end is caught.
Each planted bug is a string edit of a copy of the source; the test first asserts the edit applied, so a
rewrite of the kernels cannot silently turn a planted-bug test into a test of the unchanged source.
"""
import functools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cpu_cuda  # tests/cuda is not a package: conftest.py puts it on the path
import flash
from helpers import run_demo


@functools.cache
def sanitizer_missing(sanitizer):
    """Why `sanitizer` cannot run here (no compiler, no runtime, or Python fails to start with it), or None."""
    if shutil.which(cpu_cuda.CXX) is None:
        return f"needs a C++ compiler ({cpu_cuda.CXX})"
    try:
        environment = cpu_cuda.sanitizer_environment(sanitizer)
    except RuntimeError as error:
        return str(error)
    probe = subprocess.run([sys.executable, "-c", "import numpy"], env=environment, capture_output=True, text=True)
    if probe.returncode != 0:
        return f"Python does not start under the {sanitizer} sanitizer here: {probe.stderr.strip()[-300:]}"
    return None


@pytest.fixture
def sanitizer(request):
    """The sanitizer a test runs under (parametrized with indirect=True); skips where it cannot run."""
    missing = sanitizer_missing(request.param)
    if missing:
        pytest.skip(missing)
    return request.param


with open(os.path.join(cpu_cuda.SHIM_DIR, "example_kernels.cu")) as f:
    EXAMPLES = f.read()

RACE = "WARNING: ThreadSanitizer: data race"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cuda"))


def planted(source, old, new, count=1):
    """A copy of `source` with `old` replaced by `new` (the first `count` times, -1 for all)."""
    assert old in source, f"the kernel source no longer contains {old!r}: update this planted bug"
    return source.replace(old, new, count)


def assert_clean(process):
    assert process.returncode == 0 and "Sanitizer" not in process.stderr, process.stderr[-4000:]


def assert_reported(process, *needles):
    for needle in needles:
        assert needle in process.stderr, f"no {needle!r} in the sanitizer's output:\n{process.stderr[-4000:]}"


def run_sanitized(sanitizer, source, build_dir, problems):
    """Build `source` with `sanitizer` and run the launches of problems() in a sanitized Python.

    problems() returns (launches, outputs, expected); returns (process, outputs as the kernels left them,
    expected).
    """
    library = cpu_cuda.build(source, build_dir, sanitizer)
    launches, outputs, expected = problems()
    process, outputs = cpu_cuda.run_under_sanitizer(sanitizer, library, launches, outputs)
    return process, outputs, expected


def assert_outputs_match(outputs, expected):
    for name, want in expected.items():
        # float32 kernels against float64 references: sums of up to 1000 terms (block_sum) or dot products
        # and softmax sums over at most a few hundred keys (flash); errors ~1e-6, relative ~1000 * 6e-8.
        np.testing.assert_allclose(outputs[name], want, rtol=1e-4, atol=2e-5, err_msg=name)


# ----------------------------------------------------------------------------------------------------
# The example kernels


def examples():
    """Every example kernel once, on shapes with partial tiles: (launches, outputs, expected outputs)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    matrix = rng.standard_normal((45, 70)).astype(np.float32)
    outputs = {"total": np.zeros(1, np.float32), "softmax": np.zeros_like(matrix),
               "transposed": np.zeros((70, 45), np.float32), "axpy": np.ones(100, np.float32)}
    launches = [
        cpu_cuda.Launch("block_sum", (3, 1, 1), (128, 1, 1), (x, outputs["total"], np.int32(1000)), 0),
        cpu_cuda.Launch("row_softmax", (12, 1, 1), (32, 4, 1),
                        (matrix, outputs["softmax"], np.int32(45), np.int32(70)), 0),
        cpu_cuda.Launch("transpose", (3, 2, 1), (32, 8, 1),
                        (matrix, outputs["transposed"], np.int32(45), np.int32(70)), 32 * 33 * 4),
        cpu_cuda.Launch("axpy4", (1, 1, 1), (32, 1, 1), (x[:100], outputs["axpy"], np.float32(2), np.int32(100)), 0),
    ]
    e = np.exp(matrix - matrix.max(axis=1, keepdims=True))
    expected = {"total": x.sum(dtype=np.float64, keepdims=True), "softmax": e / e.sum(axis=1, keepdims=True),
                "transposed": matrix.T, "axpy": 2 * x[:100] + 1}
    return launches, outputs, expected


@pytest.mark.parametrize("sanitizer", ["thread", "address"], indirect=True)
def test_example_kernels_are_clean_under_the_sanitizer(sanitizer, build_dir):
    process, outputs, expected = run_sanitized(sanitizer, EXAMPLES, build_dir, examples)
    assert_clean(process)
    assert_outputs_match(outputs, expected)


@pytest.mark.parametrize("sanitizer", ["thread"], indirect=True)
def test_thread_sanitizer_catches_a_missing_syncthreads_in_an_example(sanitizer, build_dir):
    # Without the barrier, warps read partial sums that other warps may not have written yet.
    source = planted(EXAMPLES, "partial[threadIdx.x] = value;\n    __syncthreads();",
                     "partial[threadIdx.x] = value;\n")
    process, _, _ = run_sanitized(sanitizer, source, build_dir, examples)
    assert_reported(process, RACE, "in block_sum")


@pytest.mark.parametrize("sanitizer", ["address"], indirect=True)
def test_address_sanitizer_catches_a_read_past_the_end_in_an_example(sanitizer, build_dir):
    # `i <= n` reads x[n], one float past the end of the 1000-float array.
    source = planted(EXAMPLES, "i < n; i += blockDim.x * gridDim.x", "i <= n; i += blockDim.x * gridDim.x")
    process, outputs, _ = run_sanitized(sanitizer, source, build_dir, examples)
    assert_reported(process, "ERROR: AddressSanitizer: heap-buffer-overflow", "READ of size 4", "in block_sum")
    assert outputs is None                                      # AddressSanitizer stops at the first error


# ----------------------------------------------------------------------------------------------------
# flash.py's kernels


def flash_problems():
    """Three small problems in one run: causal with T > S (rows with no key, skipped tiles, partial tiles of
    both lengths), not causal with T < S and a head width that is not a multiple of 4, and a sliding window
    whose band skips key tiles on both sides (loops that start mid-sequence, in every kernel)."""
    cases = [dict(BH=1, T=90, S=75, Dh=40, causal=True), dict(BH=2, T=30, S=70, Dh=7, causal=False),
             dict(BH=1, T=150, S=150, Dh=8, causal=False, window=(10, 20))]
    launches, outputs, expected = [], {}, {}
    for i, case in enumerate(cases):
        q, k, v, dout = cpu_cuda.flash_inputs(case["BH"], case["T"], case["S"], case["Dh"], seed=i)
        window = case.get("window")
        case_launches, case_outputs = cpu_cuda.flash_launches(q, k, v, dout, case["causal"], window=window)
        launches += case_launches
        reference = cpu_cuda.flash_reference(q, k, v, dout, case["causal"], window)
        for (name, array), want in zip(case_outputs.items(), reference):
            outputs[f"{name} {i}"], expected[f"{name} {i}"] = array, want
    return launches, outputs, expected


@pytest.mark.parametrize("sanitizer", ["thread", "address"], indirect=True)
def test_flash_kernels_are_clean_under_the_sanitizer(sanitizer, build_dir):
    process, outputs, expected = run_sanitized(sanitizer, flash.FLASH_KERNEL_SOURCE, build_dir, flash_problems)
    assert_clean(process)
    assert_outputs_match(outputs, expected)


@pytest.mark.parametrize("sanitizer", ["thread"], indirect=True)
def test_thread_sanitizer_catches_a_missing_syncthreads_in_flash(sanitizer, build_dir):
    # The forward's first barrier publishes the Q_i and K_0 tiles that every warp helped load; without it
    # a warp reads shared rows that another warp may still be writing.
    source = planted(flash.FLASH_KERNEL_SOURCE, "__syncthreads();", "")
    process, _, _ = run_sanitized(sanitizer, source, build_dir, flash_problems)
    assert_reported(process, RACE, "flash_forward")


@pytest.mark.parametrize("sanitizer", ["address"], indirect=True)
@pytest.mark.parametrize("old, new, access", [
    ("(r < n_rows", "(r <= n_rows", "READ of size"),                   # tile loads read one row too many
    ("row0 + r < n_rows", "row0 + r <= n_rows", "WRITE of size"),      # outputs write one row too many
])
def test_address_sanitizer_catches_a_broken_bounds_check_in_flash(sanitizer, build_dir, old, new, access):
    source = planted(flash.FLASH_KERNEL_SOURCE, old, new, count=-1)
    process, outputs, _ = run_sanitized(sanitizer, source, build_dir, flash_problems)
    assert_reported(process, "ERROR: AddressSanitizer: heap-buffer-overflow", access)
    assert outputs is None


@pytest.mark.parametrize("sanitizer", ["address"], indirect=True)
def test_the_command_line_runs_flash_under_a_sanitizer(sanitizer, tmp_path):
    result = run_demo("tests/cuda/cpu_cuda.py", "--sanitizer", sanitizer, "--T", "20", "--S", "9",
                      "--window", "3", "2", env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert f"{sanitizer} sanitizer: clean" in result.stdout and "agree with the NumPy path" in result.stdout

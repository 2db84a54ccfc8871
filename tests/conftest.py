"""Test harness shared by every test file.

- Hypothesis profiles: "fast" (default) and "thorough" (HYPOTHESIS_PROFILE=thorough python -m pytest).
- The `gpu` marker: such tests are skipped unless CuPy is installed *and* sees a CUDA device
  (importing cupy succeeds without a GPU, so importorskip would not be enough).
- The `xp` fixture: runs a test with NumPy arrays, with "CuPy on a CPU" (tests/cuda/cupy_on_cpu.py: a
  `cupy` whose arrays live in host memory and whose RawKernels run on the CPU), and with CuPy arrays on
  a GPU (marked `gpu`). So the CuPy path of every file runs in every test session, and on a GPU too.
"""
import os
import shutil
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Tests import the concept files from the repository root, as a student running `python -m pytest` would;
# tests/cuda holds the tools that run CUDA kernels on a CPU (not a package: found through the path).
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TESTS))
sys.path.insert(0, os.path.join(TESTS, "cuda"))

settings.register_profile("fast", max_examples=12, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


def cuda_available():
    """True when CuPy is installed and can use a CUDA device."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:  # a broken CUDA install is the same as no GPU for our purposes
        return False


def pytest_collection_modifyitems(config, items):
    import cpu_cuda
    skips = {"gpu": (not cuda_available(), "needs CuPy with a CUDA device (cupy.is_available() is False)"),
             "cupy_on_cpu": (shutil.which(cpu_cuda.CXX) is None,
                             f"CuPy on a CPU needs a C++ compiler ({cpu_cuda.CXX}) to run CUDA kernels")}
    for marker, (skip, reason) in skips.items():
        if skip:
            for item in items:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))


# The array modules a test taking `xp` runs on. "cupy-on-cpu" carries the marker `cupy_on_cpu`: while such
# a test runs (and only then), `import cupy` gives the stand-in, so get_xp and flash.py's dispatch see a
# CuPy array.
CUPY_ON_CPU = pytest.param("cupy-on-cpu", marks=pytest.mark.cupy_on_cpu)
CUPY_ON_GPU = pytest.param("cupy", marks=pytest.mark.gpu)
ARRAY_MODULES = ["numpy", CUPY_ON_CPU, CUPY_ON_GPU]


def array_module(name):
    if name == "numpy":
        return np
    if name == "cupy-on-cpu":
        import cupy_on_cpu
        return cupy_on_cpu
    import cupy
    return cupy


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Run a `cupy_on_cpu` test, its fixtures' set-up and tear-down included, with the stand-in installed
    as `cupy` (a hook, not a fixture: hypothesis refuses function-scoped fixtures, and the swap must not
    outlive the test)."""
    if item.get_closest_marker("cupy_on_cpu") is None:
        yield
        return
    import cupy_on_cpu
    with cupy_on_cpu.installed():
        yield


@pytest.fixture(scope="session", params=ARRAY_MODULES)
def xp(request):
    """The array module a test runs on: numpy, CuPy on a CPU, and cupy where a GPU is present."""
    return array_module(request.param)


# One BLAS thread for the whole session: the tests' matrices are small, and on a machine with other work a
# second OpenBLAS thread spins while it waits (the suite took 213 s with two threads under load, 111 s with one).
@pytest.fixture(scope="session", autouse=True)
def one_blas_thread():
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        yield

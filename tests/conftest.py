"""Test harness shared by every test file.

- Hypothesis profiles: "fast" (default) and "thorough" (HYPOTHESIS_PROFILE=thorough python -m pytest).
- The `gpu` marker: such tests are skipped unless CuPy is installed *and* sees a CUDA device
  (importing cupy succeeds without a GPU, so importorskip would not be enough).
- The `xp` fixture: runs a test once with NumPy arrays and once with CuPy arrays (the CuPy run is
  marked `gpu`), so the CuPy path of every file is tested by the same test.
"""
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Tests import the concept files from the repository root, as a student running `python -m pytest` would.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy with a CUDA device (cupy.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module a test runs on: numpy, and cupy where a GPU is present."""
    if request.param == "numpy":
        return np
    import cupy
    return cupy

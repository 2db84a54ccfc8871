"""CuPy on a CPU: a stand-in for the `cupy` module, so that the CuPy path of every file runs without a GPU.

Real CuPy imports on a machine without a GPU, but it cannot make an array there, so the code that only
runs on CuPy arrays (flash.py's dispatch to its CUDA kernels, every `xp = get_xp(x)` branch) would never
run in CI. This module is a `cupy` that keeps its arrays in host memory and behaves like CuPy where a
mistake in our code would show:

- Device arrays are their own type. `ndarray` is a NumPy array subclass, so `get_array_module` picks
  this module for it, and an operation that mixes a device array with a NumPy array raises TypeError,
  as CuPy's do. Code that builds a NumPy array by mistake (np.zeros where xp.zeros was meant) fails here
  as it would on a GPU.
- Data moves only on request: `asarray` / `array` copy host data in, `asnumpy` and `ndarray.get` copy
  it out; every other function refuses NumPy arrays. Reductions return 0-d device arrays, as CuPy's do.
- RawModule compiles the CUDA source for the CPU with cpu_cuda.py, and its kernels check what a CUDA
  launch checks: arguments (device arrays, numpy.int32 and numpy.float32 scalars), grid limits, dynamic
  shared memory beyond 48 KiB only after opting in through max_dynamic_shared_size_bytes, and never beyond
  the device's limit.
- cuda.Device and cuda.runtime.deviceGetAttribute describe one device with the shared-memory limit of
  the oldest GPU the kernels support (sm_80, 163 KiB a block).
- Where real CuPy is installed, a name it lacks is missing here too (AttributeError).

Not modelled: speed, memory limits, streams, CuPy's own summation orders, and one rule: numpy.asarray
(device array) quietly works here, where CuPy raises TypeError.

Use it by putting it in sys.modules as "cupy" (the `installed` context manager); tests/conftest.py does
this for the tests that run on "cupy-on-cpu".
"""
import contextlib
import sys
import types

import numpy as np

import cpu_cuda

try:
    import cupy as _real_cupy   # only to offer exactly the names real CuPy has
except ImportError:
    _real_cupy = None

_STANDIN = sys.modules[__name__]


# ----------------------------------------------------------------------------------------------------
# Arrays


def _is_host_array(x):
    return isinstance(x, np.ndarray) and not isinstance(x, ndarray)


def _refuse_host_arrays(tree, what):
    """TypeError if a NumPy array is anywhere in `tree` (nested tuples, lists, dicts): CuPy's rule."""
    if _is_host_array(tree):
        raise TypeError(f"{what}: unsupported type {type(tree)} (a NumPy array given to CuPy; copy it to the "
                        f"device with cupy.asarray, or the device array to the host with cupy.asnumpy)")
    if isinstance(tree, (tuple, list)):
        for item in tree:
            _refuse_host_arrays(item, what)
    elif isinstance(tree, dict):
        for item in tree.values():
            _refuse_host_arrays(item, what)


def _to_host(tree):
    """Device arrays in `tree` as plain NumPy views of the same memory (what NumPy computes with)."""
    if isinstance(tree, ndarray):
        return tree.view(np.ndarray)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_to_host(item) for item in tree)
    if isinstance(tree, dict):
        return {key: _to_host(item) for key, item in tree.items()}
    return tree


def _to_device(tree):
    """NumPy results as device arrays; NumPy scalars (from reductions) as 0-d device arrays, like CuPy's."""
    if isinstance(tree, np.ndarray):
        return tree if isinstance(tree, ndarray) else tree.view(ndarray)
    if isinstance(tree, np.generic):
        return np.asarray(tree).view(ndarray)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_to_device(item) for item in tree)
    return tree


class ndarray(np.ndarray):
    """An array on the (pretend) device: NumPy computes with it, but never together with a NumPy array."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _refuse_host_arrays((inputs, out or ()), f"{ufunc.__name__}.{method}")
        if out is not None:
            kwargs["out"] = _to_host(out)
        result = getattr(ufunc, method)(*_to_host(inputs), **kwargs)
        if out is not None:                         # in place (x += y): hand back the arrays given
            return out[0] if len(out) == 1 else out
        return _to_device(result)

    def __array_function__(self, func, types, args, kwargs):
        _refuse_host_arrays((args, kwargs), func.__name__)
        return _to_device(func(*_to_host(args), **_to_host(kwargs)))

    @property
    def device(self):
        """The device the array lives on: usable as `with x.device:`, like CuPy's."""
        return cuda.Device(0)

    def get(self):
        """A NumPy copy of the array (CuPy's device-to-host copy)."""
        return np.array(self.view(np.ndarray))


def asarray(a, dtype=None, order=None):
    """Host data is copied to the device; a device array of the right dtype is returned as it is."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return np.array(a, dtype=dtype, order=order if order else "K").view(ndarray)


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    return np.array(_to_host(obj), dtype=dtype, copy=copy, order=order, ndmin=ndmin).view(ndarray)


def asnumpy(a):
    """A NumPy copy of a device array; NumPy input is returned as an array."""
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def get_array_module(*args):
    """This module if any argument is a device array, else numpy: what cupy.get_array_module does."""
    return _STANDIN if any(isinstance(a, ndarray) for a in args) else np


def is_available():
    return True


# ----------------------------------------------------------------------------------------------------
# Every other NumPy function, taking and giving device arrays


def _device_function(name, numpy_function):
    def function(*args, **kwargs):
        _refuse_host_arrays((args, kwargs), name)
        return _to_device(numpy_function(*_to_host(args), **_to_host(kwargs)))
    function.__name__ = name
    return function


def _module_of_device_functions(name, numpy_module, real_module):
    """A module whose functions are numpy_module's, on device arrays; names real CuPy lacks are missing."""
    module = types.ModuleType(name)

    def __getattr__(attribute):
        if attribute.startswith("__") or not hasattr(numpy_module, attribute) or (
                real_module is not None and not hasattr(real_module, attribute)):
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}")
        value = getattr(numpy_module, attribute)
        # Types (float32, dtype) and constants (inf, newaxis) are CuPy's too; functions move to the device.
        return _device_function(attribute, value) if callable(value) and not isinstance(value, type) else value

    module.__getattr__ = __getattr__
    return module


linalg = _module_of_device_functions("cupy.linalg", np.linalg, getattr(_real_cupy, "linalg", None))
_numpy_names = _module_of_device_functions("cupy", np, _real_cupy)


def __getattr__(name):                              # module attributes not defined above (PEP 562)
    return getattr(_numpy_names, name)


class testing:
    """cupy.testing's assertions: device or host arrays, compared on the host."""

    @staticmethod
    def assert_allclose(actual, desired, rtol=1e-7, atol=0, err_msg="", verbose=True):
        np.testing.assert_allclose(asnumpy(actual), asnumpy(desired), rtol=rtol, atol=atol, err_msg=err_msg,
                                   verbose=verbose)

    @staticmethod
    def assert_array_equal(x, y, err_msg="", verbose=True):
        np.testing.assert_array_equal(asnumpy(x), asnumpy(y), err_msg=err_msg, verbose=verbose)


# ----------------------------------------------------------------------------------------------------
# The device, and kernels compiled for the CPU


class cuda:
    """cupy.cuda: one device, its runtime attributes, and the driver's error type."""

    class runtime:
        cudaDevAttrMaxSharedMemoryPerBlockOptin = 97            # CUDA's number for this attribute
        _attributes = {97: cpu_cuda.MAX_SHARED_BYTES}          # sm_80: 163 KiB of shared memory a block

        @staticmethod
        def deviceGetAttribute(attribute, device):
            return cuda.runtime._attributes[attribute]

    class driver:
        class CUDADriverError(RuntimeError):
            pass

    class Device:
        def __init__(self, device=0):
            if device != 0:
                raise cuda.runtime.CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
            self._id = device

        @property
        def id(self):
            return self._id

        @property
        def attributes(self):
            runtime = cuda.runtime
            return {"MaxSharedMemoryPerBlockOptin": runtime.deviceGetAttribute(
                runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, self.id)}

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            return False


cuda.runtime.CUDARuntimeError = type("CUDARuntimeError", (RuntimeError,), {})


def _shared_memory_limit():
    runtime = cuda.runtime     # looked up at each launch, so a test may pretend to be a smaller GPU
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, 0)


class RawKernel:
    """One kernel of a RawModule, launched as kernel(grid, block, args, shared_mem=...) like CuPy's."""

    def __init__(self, library, name):
        self._library, self.name = library, name
        self._max_dynamic_shared = 48 * 1024                   # what a kernel may use without opting in

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, size):             # cudaFuncSetAttribute
        if not 0 <= size <= _shared_memory_limit():
            raise cuda.driver.CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {self.name} cannot opt in to {size} "
                                              f"bytes of shared memory (the device allows {_shared_memory_limit()})")
        self._max_dynamic_shared = size

    def __call__(self, grid, block, args, *, shared_mem=0):
        if shared_mem > self._max_dynamic_shared:
            raise cuda.driver.CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {self.name} asks for {shared_mem} bytes "
                                              f"of shared memory, above its opt-in of {self._max_dynamic_shared}")
        if not (len(grid) == 3 and grid[0] < 2**31 and grid[1] <= 65535 and grid[2] <= 65535):
            raise cuda.driver.CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: grid {grid} is beyond CUDA's limits")
        for i, arg in enumerate(args):
            if _is_host_array(arg):
                raise TypeError(f"{self.name} argument {i}: unsupported type {type(arg)} (a NumPy array)")
        cpu_cuda.run_kernel(self._library, self.name, tuple(grid), tuple(block), _to_host(list(args)), shared_mem)


class RawModule:
    """A CUDA source compiled for the CPU (cpu_cuda.load_kernels); get_function gives its kernels."""

    def __init__(self, code, options=(), **unused):
        self.code, self.options = code, options
        self._library = cpu_cuda.load_kernels(code)

    def get_function(self, name):
        if not hasattr(self._library, f"launch_{name}"):
            raise cuda.driver.CUDADriverError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        return RawKernel(self._library, name)


# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def installed():
    """`import cupy` gives this module inside the block; the real one (or none) again after it.

    flash.py keeps its compiled kernels (flash._cuda_module) for the life of the process; the cache is
    emptied on the way in and out, so that kernels built for one `cupy` are never launched by the other.
    """
    def forget_compiled_kernels():
        flash = sys.modules.get("flash")
        if flash is not None and hasattr(flash, "_cuda_module"):
            flash._cuda_module.cache_clear()

    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = _STANDIN
    forget_compiled_kernels()
    try:
        yield _STANDIN
    finally:
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved
        forget_compiled_kernels()

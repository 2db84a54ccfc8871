"""CuPy on a CPU: a stand-in for the `cupy` module, so that the CuPy path of every file runs without a GPU.

Real CuPy imports on a machine without a GPU, but it cannot make an array there, so the code that only
runs on CuPy arrays (flash.py's dispatch to its CUDA kernels, every `xp = get_xp(x)` branch) would never
run in CI. This module is a `cupy` that keeps its arrays in host memory and behaves like CuPy where a
mistake in our code would show:

- A device array is not a NumPy array. `ndarray` holds a NumPy array inside and lets NumPy compute with
  it only through the protocols CuPy implements (__array_ufunc__, __array_function__), so:
  - an operation that mixes a device array with a NumPy array or a list raises TypeError, as CuPy's do;
  - turning a device array into a NumPy array implicitly (numpy.asarray(d), host[...] = d) raises
    CuPy's TypeError, and writing a NumPy array into a device array (d[...] = host) CuPy's ValueError.
  Code that builds a NumPy array by mistake (np.zeros where xp.zeros was meant) fails here as on a GPU.
- Data moves only on request: `asarray` / `array` copy host data in, `asnumpy` and `ndarray.get` copy it
  out; every other function refuses NumPy arrays. Reductions and scalar indexing give 0-d device arrays,
  as CuPy's do, not NumPy scalars.
- Only CuPy's names: where real CuPy is installed, a function, submodule or array attribute it lacks is
  missing here too (AttributeError), and a NumPy function it does not implement refuses device arrays
  (TypeError), as it would on a GPU.
- RawModule compiles the CUDA source for the CPU with cpu_cuda.py, and its kernels check what a CUDA
  launch checks: arguments (device arrays, numpy.int32 and numpy.float32 scalars), grid limits, dynamic
  shared memory beyond 48 KiB only after opting in through max_dynamic_shared_size_bytes, and never beyond
  the device's limit.
- cuda.Device and cuda.runtime.deviceGetAttribute describe one device with the shared-memory limit of
  the oldest GPU the kernels support (sm_80, 163 KiB a block).

Not modelled: speed, memory limits, streams, random numbers (cupy.random and the other submodules but
linalg are missing), CuPy's own summation orders, and a kernel's __launch_bounds__ (the CPU shim ignores
them, so a block larger than a kernel's bound runs here and fails on a GPU).

Use it by putting it in sys.modules as "cupy" (the `installed` context manager); tests/conftest.py does
this for the tests that run on "cupy-on-cpu".
"""
import contextlib
import sys
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

import cpu_cuda

try:
    import cupy as _real_cupy   # only to offer exactly the names real CuPy has
except ImportError:
    _real_cupy = None

_STANDIN = sys.modules[__name__]


# ----------------------------------------------------------------------------------------------------
# Arrays


def _refuse_host_arrays(tree, what):
    """TypeError if a NumPy array is anywhere in `tree` (nested tuples, lists, dicts): CuPy's rule."""
    if isinstance(tree, np.ndarray):
        raise TypeError(f"{what}: unsupported type {type(tree)} (a NumPy array given to CuPy; copy it to the "
                        f"device with cupy.asarray, or the device array to the host with cupy.asnumpy)")
    if isinstance(tree, (tuple, list)):
        for item in tree:
            _refuse_host_arrays(item, what)
    elif isinstance(tree, dict):
        for item in tree.values():
            _refuse_host_arrays(item, what)


def _refuse_sequences(operands, what):
    """TypeError for a list or tuple used as an operand of an elementwise operation: CuPy's rule."""
    for x in operands:
        if isinstance(x, (list, tuple)):
            raise TypeError(f"{what}: unsupported type {type(x)} (CuPy takes arrays and scalars here)")


def _map(function, tree):
    """function applied to every leaf of nested tuples (named ones too), lists and dicts."""
    if isinstance(tree, dict):
        return {key: _map(function, item) for key, item in tree.items()}
    if isinstance(tree, (tuple, list)):
        items = [_map(function, item) for item in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return function(tree)


def _to_host(tree):
    """Device arrays in `tree` as the NumPy arrays they hold (what NumPy computes with)."""
    return _map(lambda x: x._data if isinstance(x, ndarray) else x, tree)


def _to_device(tree):
    """NumPy arrays in `tree` as device arrays; NumPy scalars as 0-d device arrays, as CuPy gives them."""
    def one(x):
        if isinstance(x, np.ndarray):
            return ndarray(x)
        if isinstance(x, np.generic):
            return ndarray(np.asarray(x))
        return x
    return _map(one, tree)


def _cupy_has(module_name, name):
    """Does real CuPy have `name` where NumPy has it in module_name? numpy -> cupy, numpy.linalg ->
    cupy.linalg, numpy.ndarray -> cupy.ndarray. (True where real CuPy is not installed.)"""
    if _real_cupy is None:
        return True
    module = _real_cupy
    for part in module_name.split(".")[1:]:                 # numpy.linalg -> cupy.linalg
        module = getattr(module, part, None)
    return module is not None and hasattr(module, name)


class ndarray(NDArrayOperatorsMixin):
    """An array on the (pretend) device: a NumPy array inside, reached only the ways CuPy allows.

    The operators (+, *, @, +=, ==, ...) come from NDArrayOperatorsMixin, which turns each into its ufunc,
    and so into __array_ufunc__ below.
    """

    def __init__(self, data):
        self._data = data                                   # the NumPy array: the device's memory

    # --- NumPy computing with device arrays ---

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        what = f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__
        _refuse_host_arrays((inputs, kwargs), what)
        _refuse_sequences(inputs, what)
        out = kwargs.get("out")
        result = getattr(ufunc, method)(*_to_host(inputs), **_to_host(kwargs))
        if out is not None:                                 # in place (x += y): hand back the arrays given
            return out[0] if len(out) == 1 else out
        return _to_device(result)

    def __array_function__(self, func, types, args, kwargs):
        if not _cupy_has(func.__module__, func.__name__):
            return NotImplemented                           # NumPy then raises TypeError, as with CuPy
        _refuse_host_arrays((args, kwargs), func.__name__)
        return _to_device(func(*_to_host(args), **_to_host(kwargs)))

    def __array__(self, dtype=None, copy=None):             # numpy.asarray(d), host[...] = d
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")

    # --- indexing ---

    def __getitem__(self, index):
        return _to_device(self._data[_to_host(index)])     # a view, or a 0-d device array for one entry

    def __setitem__(self, index, value):
        if isinstance(value, np.ndarray) and value.ndim > 0:
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")   # CuPy's words
        self._data[_to_host(index)] = _to_host(value)

    # --- what the rest of Python asks of an array ---

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)
    T = property(lambda self: ndarray(self._data.T))

    @property
    def device(self):
        """The device the array lives on: usable as `with x.device:`, like CuPy's."""
        return cuda.Device(0)

    def get(self):
        """A NumPy copy of the array (CuPy's device-to-host copy)."""
        return self._data.copy()

    def __getattr__(self, name):                            # every other attribute and method: NumPy's
        if name.startswith("__") or name == "_data" or not _cupy_has("numpy.ndarray", name):   # cupy.ndarray
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")
        value = getattr(self._data, name)
        return _device_function(f"ndarray.{name}", value) if callable(value) else _to_device(value)

    def __len__(self):
        return len(self._data)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __bool__(self):
        return bool(self._data)

    def __float__(self):
        return float(self._data)

    def __int__(self):
        return int(self._data)

    def __index__(self):
        return self._data.__index__()

    def __format__(self, spec):
        return format(self._data.item() if self.ndim == 0 else self._data, spec)

    def __repr__(self):
        return repr(self._data)


def asarray(a, dtype=None, order=None):
    """Host data is copied to the device; a device array that needs no change is returned as it is."""
    if isinstance(a, ndarray):
        data = np.asarray(a._data, dtype=dtype, order=order)
        return a if data is a._data else ndarray(data)
    return ndarray(np.array(_to_host(a), dtype=dtype, order=order or "K", copy=True))


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    """A device array; host data is always copied (it has to cross to the device)."""
    copy = copy or not isinstance(obj, ndarray)
    return ndarray(np.array(_to_host(obj), dtype=dtype, copy=copy, order=order, ndmin=ndmin))


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
    """numpy_function on device arrays: NumPy arrays refused (and lists, for elementwise ufuncs)."""
    def function(*args, **kwargs):
        _refuse_host_arrays((args, kwargs), name)
        if isinstance(numpy_function, np.ufunc):
            _refuse_sequences(args, name)
        return _to_device(numpy_function(*_to_host(args), **_to_host(kwargs)))
    function.__name__ = name
    if isinstance(numpy_function, np.ufunc):
        function.at = _ufunc_at(name, numpy_function)
    return function


def _ufunc_at(name, ufunc):
    """cupy.add.at and the like: ufunc.at(a, indices, b) on device arrays, in place on a, every repeated index
    applied (a scatter-add for add)."""
    def at(a, indices, b=None):
        _refuse_host_arrays((a, indices, b), f"{name}.at")
        ufunc.at(a._data, _to_host(indices), *(() if b is None else (_to_host(b),)))
    return at


def _module_of_device_functions(name, numpy_module, real_module):
    """A module whose functions are numpy_module's, on device arrays; names real CuPy lacks are missing."""
    module = types.ModuleType(name)

    def __getattr__(attribute):
        value = getattr(numpy_module, attribute, AttributeError)
        if attribute.startswith("__") or value is AttributeError or isinstance(value, types.ModuleType) or (
                real_module is not None and not hasattr(real_module, attribute)):
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}" + (
                " (the CPU stand-in does not model this submodule)" if isinstance(value, types.ModuleType) else ""))
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
        class CUDARuntimeError(RuntimeError):
            pass

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
        if not all(isinstance(x, tuple) for x in (grid, block, args)):
            raise TypeError(f"{self.name}: grid, block and args must be tuples (CuPy's signature)")
        if shared_mem > self._max_dynamic_shared:
            raise cuda.driver.CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {self.name} asks for {shared_mem} bytes "
                                              f"of shared memory, above its opt-in of {self._max_dynamic_shared}")
        if not (len(grid) == 3 and grid[0] <= 2**31 - 1 and grid[1] <= 65535 and grid[2] <= 65535):
            raise cuda.driver.CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: grid {grid} is beyond CUDA's limits")
        for i, arg in enumerate(args):
            if isinstance(arg, np.ndarray):
                raise TypeError(f"{self.name} argument {i}: unsupported type {type(arg)} (a NumPy array)")
        cpu_cuda.run_kernel(self._library, self.name, grid, block, _to_host(args), shared_mem)


class RawModule:
    """A CUDA source compiled for the CPU (cpu_cuda.load_kernels); get_function gives its kernels."""

    def __init__(self, *, code, options=()):               # CuPy's arguments are keyword-only
        if not isinstance(options, tuple):
            raise TypeError(f"options must be a tuple (CuPy's signature), got {type(options).__name__}")
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

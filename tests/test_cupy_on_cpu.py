"""tests/cuda/cupy_on_cpu.py behaves like CuPy where our code could go wrong.

The "cupy-on-cpu" runs of the other tests are only worth something if the stand-in refuses what CuPy
refuses and offers only what CuPy offers; these tests prove each rule its docstring states.
"""
import os
import shutil
import sys

import numpy as np
import pytest

import cpu_cuda
import cupy_on_cpu as cp

EXAMPLES = os.path.join(cpu_cuda.SHIM_DIR, "example_kernels.cu")
needs_compiler = pytest.mark.skipif(shutil.which(cpu_cuda.CXX) is None,
                                    reason=f"needs a C++ compiler ({cpu_cuda.CXX}) to build kernels for the CPU")


def real_cupy():
    cupy = pytest.importorskip("cupy", reason="compares the stand-in's names with real CuPy's")
    assert cupy is not cp, "`import cupy` gave the stand-in: these tests need the real one"
    return cupy


# ----------------------------------------------------------------------------------------------------
# Arrays


def test_get_array_module_picks_the_stand_in_for_device_arrays_only():
    device, host = cp.zeros(3), np.zeros(3)
    assert cp.get_array_module(device) is cp and cp.get_array_module(host, device) is cp
    assert cp.get_array_module(host) is np and cp.get_array_module(1.0) is np
    assert not isinstance(device, np.ndarray)             # like a CuPy array: NumPy cannot take it as one


@pytest.mark.parametrize("mix", [
    lambda d, h: d + h,                                  # a ufunc, device array first
    lambda d, h: h * d,                                  # a ufunc, host array first
    lambda d, h: np.concatenate([d, h]),                 # a NumPy function given both
    lambda d, h: cp.concatenate([d, h]),                 # a CuPy function given a host array
    lambda d, h: cp.exp(h),                              # a CuPy function given only a host array
    lambda d, h: cp.where(d > 0, h, d),
    lambda d, h: np.add(d, d, out=h),                    # writing into a host array
])
def test_an_operation_mixing_device_and_host_arrays_raises_type_error(mix):
    with pytest.raises(TypeError, match="NumPy array given to CuPy"):
        mix(cp.ones(4), np.ones(4))


@pytest.mark.parametrize("convert", [
    lambda d, h: np.asarray(d),
    lambda d, h: np.array(d),
    lambda d, h: h.__setitem__(slice(None), d),          # host[:] = device
])
def test_implicit_conversion_of_a_device_array_to_numpy_raises_cupys_type_error(convert):
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        convert(cp.ones(4), np.ones(4))


def test_writing_a_numpy_array_into_a_device_array_raises_cupys_value_error():
    d = cp.zeros(4)
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        d[:2] = np.ones(2)
    d[:2] = cp.ones(2)                                    # device to device, and scalars, are fine
    d[3] = np.float64(5.0)
    cp.testing.assert_array_equal(d, [1, 1, 0, 5])


@pytest.mark.parametrize("mix", [lambda d: d + [1.0, 2.0], lambda d: cp.exp([1.0, 2.0])])
def test_a_list_as_an_elementwise_operand_raises_type_error(mix):
    with pytest.raises(TypeError, match="unsupported type <class 'list'>"):
        mix(cp.ones(2))


def test_device_arrays_stay_device_arrays_through_numpy_functions_methods_and_scalars():
    d = cp.arange(6.0).reshape(2, 3)
    for result in (d + 1, np.exp(d), np.swapaxes(d, 0, 1), d.T, d[0], d.astype(np.float32), d * np.float32(2),
                   cp.linalg.svd(d).S):                  # named-tuple results too
        assert type(result) is cp.ndarray
    # CuPy gives 0-d arrays, not NumPy scalars, for reductions, arg-reductions and single entries.
    for result, value in ((d.sum(), 15.0), (d.argmax(), 5), (d[1, 2], 5.0), (np.max(d), 5.0)):
        assert type(result) is cp.ndarray and result.shape == () and float(result) == value


def test_in_place_operations_keep_the_array_object_and_views_share_memory():
    d = cp.zeros((2, 3))
    before = d
    d += 1
    d[0][1] = 7.0                                        # through a view, as on a GPU
    assert d is before
    cp.testing.assert_array_equal(d, [[1, 7, 1], [1, 1, 1]])


def test_asarray_copies_host_data_in_and_asnumpy_and_get_copy_it_out():
    host = np.arange(4.0)
    for device in (cp.asarray(host), cp.array(host, copy=False)):
        device[0] = 100.0                                 # the device copy is its own memory
        assert host[0] == 0.0 and cp.asarray(device) is device
    for out in (cp.asnumpy(device), device.get()):
        assert type(out) is np.ndarray and out[0] == 100.0
        out[1] = -1.0
    assert float(device[1]) == 1.0                        # and so is each host copy
    assert cp.asarray(device, dtype=np.float32).dtype == np.float32
    assert cp.asarray(device.T, order="C").flags.c_contiguous


def test_testing_asserts_compare_device_and_host_arrays():
    cp.testing.assert_allclose(cp.ones(3), np.ones(3) + 1e-9, rtol=1e-6)
    with pytest.raises(AssertionError):
        cp.testing.assert_array_equal(cp.ones(3), np.zeros(3))


def test_installed_gives_the_stand_in_as_cupy_inside_the_block_and_forgets_flashs_compiled_kernels():
    import flash
    before = sys.modules.get("cupy")
    flash._cuda_module.cache_clear()
    with cp.installed():
        import cupy
        assert cupy is cp
        if shutil.which(cpu_cuda.CXX):
            flash._cuda_module()                          # kernels built for the stand-in ...
            assert flash._cuda_module.cache_info().currsize == 1
    assert sys.modules.get("cupy") is before
    assert flash._cuda_module.cache_info().currsize == 0  # ... are not kept for a real GPU after it


# ----------------------------------------------------------------------------------------------------
# Kernels


@pytest.fixture(scope="module")
def module():
    return cp.RawModule(code=open(EXAMPLES).read())


@needs_compiler
def test_a_raw_kernel_runs_on_device_arrays(module):
    x, y = cp.asarray(np.arange(100, dtype=np.float32)), cp.ones(100, dtype=np.float32)
    module.get_function("axpy4")((1, 1, 1), (32, 1, 1), (x, y, np.float32(2), np.int32(100)))
    cp.testing.assert_array_equal(y, 2 * np.arange(100, dtype=np.float32) + 1)


@needs_compiler
def test_a_raw_kernel_refuses_host_arrays(module):
    x, y = np.zeros(8, dtype=np.float32), cp.zeros(8, dtype=np.float32)
    with pytest.raises(TypeError, match="argument 0: unsupported type"):
        module.get_function("axpy4")((1, 1, 1), (32, 1, 1), (x, y, np.float32(2), np.int32(8)))


@needs_compiler
def test_more_than_48_kib_of_shared_memory_needs_the_opt_in_and_the_device_caps_it(module):
    x = cp.asarray(np.arange(6.0, dtype=np.float32).reshape(2, 3))
    y = cp.zeros((3, 2), dtype=np.float32)
    transpose = module.get_function("transpose")
    args = ((1, 1, 1), (32, 8, 1), (x, y, np.int32(2), np.int32(3)))
    with pytest.raises(cp.cuda.driver.CUDADriverError, match="above its opt-in of 49152"):
        transpose(*args, shared_mem=64 * 1024)
    transpose.max_dynamic_shared_size_bytes = 64 * 1024
    transpose(*args, shared_mem=64 * 1024)
    cp.testing.assert_array_equal(y, cp.asnumpy(x).T)
    limit = cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    with pytest.raises(cp.cuda.driver.CUDADriverError, match="cannot opt in"):
        transpose.max_dynamic_shared_size_bytes = limit + 1


@needs_compiler
@pytest.mark.parametrize("grid", [(2**31, 1, 1), (1, 65536, 1), (1, 1, 65536)])
def test_grids_beyond_cudas_limits_raise(module, grid):
    x, y = cp.zeros(4, dtype=np.float32), cp.zeros(4, dtype=np.float32)
    with pytest.raises(cp.cuda.driver.CUDADriverError, match="beyond CUDA's limits"):
        module.get_function("axpy4")(grid, (32, 1, 1), (x, y, np.float32(1), np.int32(4)))


@needs_compiler
def test_unknown_kernels_and_arguments_off_cupys_signatures_raise(module):
    with pytest.raises(cp.cuda.driver.CUDADriverError, match="named symbol not found"):
        module.get_function("no_such_kernel")
    with pytest.raises(TypeError, match="must be tuples"):
        module.get_function("axpy4")([1, 1, 1], (32, 1, 1), ())
    with pytest.raises(TypeError):
        cp.RawModule(open(EXAMPLES).read())                  # CuPy takes code= by keyword only
    with pytest.raises(TypeError, match="options must be a tuple"):
        cp.RawModule(code="", options=["--std=c++17"])


def test_the_device_reports_the_shared_memory_limit_of_sm_80():
    runtime = cp.cuda.runtime
    limit = runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, cp.cuda.Device().id)
    assert limit == cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"] == 163 * 1024
    with cp.cuda.Device(0) as device:
        assert device.id == 0


# ----------------------------------------------------------------------------------------------------
# The same names as CuPy


# Every name the stand-in writes by hand (the rest are NumPy's, filtered by real CuPy's names).
MODELLED = ["ndarray", "ndarray.device", "ndarray.get", "ndarray.shape", "ndarray.dtype", "ndarray.T",
            "asarray", "array", "asnumpy", "get_array_module", "is_available", "testing.assert_allclose",
            "testing.assert_array_equal", "linalg", "cuda.Device", "cuda.Device.id", "cuda.Device.attributes",
            "cuda.runtime.deviceGetAttribute", "cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin",
            "cuda.runtime.CUDARuntimeError", "cuda.driver.CUDADriverError", "RawModule",
            "RawModule.get_function", "RawKernel", "RawKernel.max_dynamic_shared_size_bytes"]


def lookup(root, dotted):
    for name in dotted.split("."):
        root = getattr(root, name)
    return root


@pytest.mark.parametrize("name", MODELLED)
def test_every_name_the_stand_in_models_exists_in_real_cupy(name):
    real = real_cupy()
    lookup(real, name)                                    # AttributeError if CuPy has no such name
    lookup(cp, name)


def test_the_attribute_number_is_cudas():
    assert cp.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin == \
        real_cupy().cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin


def test_names_real_cupy_lacks_are_missing_from_the_stand_in_too():
    real = real_cupy()
    functions = [name for name in ("nanpercentile", "block", "busday_count") if not hasattr(real, name)]
    attributes = [name for name in ("ctypes", "itemset", "setflags") if not hasattr(real.ndarray, name)]
    assert functions and attributes, "CuPy now has all of these; pick other NumPy names it lacks"
    for name in functions:
        with pytest.raises(AttributeError):
            getattr(cp, name)                             # cupy.nanpercentile
    for name in attributes:
        with pytest.raises(AttributeError):
            getattr(cp.ones(2), name)                     # cupy.ndarray.ctypes
    with pytest.raises(AttributeError, match="does not model"):
        cp.random                                         # noqa: B018  (CuPy has it; the stand-in does not)


def test_a_numpy_function_cupy_does_not_implement_refuses_device_arrays():
    if hasattr(real_cupy(), "nanpercentile"):
        pytest.skip("CuPy now has nanpercentile; pick another NumPy function it lacks")
    with pytest.raises(TypeError, match="no implementation found"):
        np.nanpercentile(cp.ones(4), 50)                  # NumPy would hand it to CuPy, which has none

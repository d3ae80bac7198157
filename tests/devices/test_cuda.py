"""The CUDA memory interface: what happens without the bindings (CPU), and an array's round
trip host -> device -> host through each binding installed (GPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from devices.cuda import (
    CudaApi,
    CudaError,
    _import_cuda_runtime,
    _native_handle_getter,
    driver_mismatch_hint,
    load_cuda,
)
from devices.platform import detect_platform
from tests.devices.fake_pycuda import FakePycuda

BINDINGS = ("cuda-python", "pycuda")
BINDING_MODULES = ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart",
                   "pycuda", "pycuda.driver")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _hide_bindings(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    # A None entry in sys.modules makes `import` raise ModuleNotFoundError, as on a machine
    # where the package was never installed.
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_importing_the_devices_package_imports_no_vendor_library():
    code = ("import sys, devices, devices.platform, devices.profiles, devices.cuda\n"
            "heavy = {'cuda', 'pycuda', 'pynvml', 'tensorrt', 'runtime', 'exporters'}\n"
            "assert not heavy & set(sys.modules), heavy & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_either_binding_the_error_names_both_extras(monkeypatch):
    _hide_bindings(monkeypatch, *BINDING_MODULES)
    with pytest.raises(ImportError) as caught:
        load_cuda()
    message = str(caught.value)
    assert "pip install 'sightline[tensorrt]'" in message
    assert "pip install 'sightline[pycuda]'" in message
    assert "cuda-python" in message and "pycuda" in message


@pytest.mark.parametrize("prefer", BINDINGS)
def test_preferring_a_missing_binding_falls_back_and_still_names_the_extras(monkeypatch, prefer):
    _hide_bindings(monkeypatch, *BINDING_MODULES)
    with pytest.raises(ImportError, match=r"sightline\[tensorrt\].*sightline\[pycuda\]"):
        load_cuda(prefer)


def test_unknown_binding_name_is_refused():
    with pytest.raises(ValueError, match="unknown CUDA binding 'cupy'"):
        load_cuda("cupy")


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-python not installed")
@pytest.mark.skipif(detect_platform().has_nvidia_gpu, reason="needs a machine without a GPU")
def test_cuda_python_without_a_driver_raises_cudas_own_error_name():
    with pytest.raises(CudaError) as caught:
        load_cuda("cuda-python")
    assert caught.value.name.startswith("cudaError")  # e.g. cudaErrorInsufficientDriver
    assert caught.value.call == "cudaGetDeviceCount"


# GPU: tests/conftest.py skips these where detect_platform() finds no NVIDIA GPU.

@pytest.fixture(params=BINDINGS)
def api(request) -> Iterator[CudaApi]:
    binding = request.param
    module = "cuda" if binding == "cuda-python" else "pycuda"
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{binding} is not installed")
    opened = load_cuda(binding)
    assert opened.name == binding
    yield opened
    opened.close()


@pytest.mark.gpu
def test_array_round_trips_host_to_device_to_host(api: CudaApi):
    frame = np.random.default_rng(0).random((3, 480, 640), dtype=np.float32)
    stream = api.stream()
    device = api.device_buffer(frame.nbytes)
    back = np.zeros_like(frame)
    api.copy_htod_async(device, frame, stream)
    api.copy_dtoh_async(back, device, stream)
    stream.synchronize()
    np.testing.assert_array_equal(back, frame)


@pytest.mark.gpu
def test_pinned_arrays_round_trip_and_can_be_freed_early(api: CudaApi):
    src = api.pinned_host((2, 3, 4), np.float16)
    dst = api.pinned_host((2, 3, 4), np.float16)
    assert src.shape == (2, 3, 4) and src.dtype == np.float16 and src.flags.c_contiguous
    src[...] = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    stream = api.stream()
    device = api.device_buffer(src.nbytes)
    api.copy_htod_async(device, src, stream)
    api.copy_dtoh_async(dst, device, stream)
    stream.synchronize()
    np.testing.assert_array_equal(dst, src)
    api.free_pinned(src)
    api.free_pinned(src)  # a second free is a no-op, not a double free


@pytest.mark.gpu
def test_stream_handle_is_an_int_tensorrt_can_take(api: CudaApi):
    stream = api.stream()
    assert isinstance(stream.handle, int) and stream.handle != 0  # not the legacy stream


@pytest.mark.gpu
def test_device_buffer_frees_once_and_refuses_copies_afterwards(api: CudaApi):
    stream = api.stream()
    buffer = api.device_buffer(1024)
    assert buffer.ptr and buffer.nbytes == 1024
    buffer.free()
    buffer.free()
    assert buffer.ptr == 0
    with pytest.raises(ValueError, match="freed"):
        api.copy_htod_async(buffer, np.zeros(16, np.uint8), stream)


@pytest.mark.gpu
def test_copies_that_would_overrun_or_read_strided_memory_are_refused(api: CudaApi):
    stream = api.stream()
    small = api.device_buffer(64)
    with pytest.raises(ValueError, match="holds 64"):
        api.copy_htod_async(small, np.zeros(65, np.uint8), stream)
    with pytest.raises(ValueError, match="holds 64"):
        api.copy_dtoh_async(np.zeros(65, np.uint8), small, stream)
    with pytest.raises(ValueError, match="C-contiguous"):
        api.copy_htod_async(small, np.zeros((8, 8), np.uint8)[:, ::2], stream)


@pytest.mark.gpu
def test_impossible_allocation_raises_cudas_error_name(api: CudaApi):
    with pytest.raises(CudaError) as caught:
        api.device_buffer(1 << 50)  # 1 PiB
    assert caught.value.name in ("cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY")


# cuda-python 12 and 13: what a CPU can check.

@pytest.mark.parametrize(("runtime", "driver", "expected"), [
    (13050, 12060, "built for CUDA 13.5; this driver supports CUDA 12.6: "
                   "pip install 'cuda-python==12.*'"),
    (12090, 0, "built for CUDA 12.9; no NVIDIA driver could be loaded"),
    (12060, 13000, "built for CUDA 12.6; this driver supports CUDA 13.0"),
])
def test_driver_mismatch_hint_names_the_cuda_python_major_to_install(runtime, driver, expected):
    hint = driver_mismatch_hint(runtime, driver)
    assert expected in hint
    assert ("pip install" in hint) == (driver and driver // 1000 < runtime // 1000)


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-python not installed")
def test_the_installed_cuda_python_is_reached_through_its_own_module_layout():
    # 13.x and 12.6.1+ have cuda.bindings.runtime (13.x nothing else); older 12.x only cuda.cudart
    has_bindings = _has_module("cuda.bindings")
    runtime = _import_cuda_runtime()
    assert runtime.__name__ == ("cuda.bindings.runtime" if has_bindings else "cuda.cudart")
    has_utils = _has_module("cuda.bindings.utils")
    getter = _native_handle_getter()
    assert (getter is int) == (not has_utils)
    assert getter(runtime.cudaStream_t(0x1234)) == 0x1234


@pytest.mark.skipif(not _has_module("cuda.bindings"),
                    reason="needs cuda-python >= 12.6.1 (older ones cannot be called without a "
                           "driver)")
@pytest.mark.skipif(detect_platform().has_nvidia_gpu, reason="needs a machine without a GPU")
def test_every_runtime_call_devices_cuda_makes_accepts_its_argument_types():
    # Without a driver each call still parses its arguments and returns (error, ...): a
    # signature that changed between cuda-python 12 and 13 would raise TypeError here.
    rt = _import_cuda_runtime()
    stream = rt.cudaStream_t(0x1234)
    calls = {
        "cudaRuntimeGetVersion": (), "cudaDriverGetVersion": (), "cudaGetDeviceCount": (),
        "cudaSetDevice": (0,), "cudaStreamCreateWithFlags": (rt.cudaStreamNonBlocking,),
        "cudaMalloc": (16,), "cudaHostAlloc": (16, rt.cudaHostAllocDefault),
        "cudaMemcpyAsync": (0x1000, 0x2000, 16, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                            0x1234),
        "cudaStreamSynchronize": (stream,), "cudaStreamDestroy": (stream,),
        "cudaFree": (0x1000,), "cudaFreeHost": (0x1000,),
        "cudaGetErrorName": (rt.cudaError_t.cudaErrorMemoryAllocation,),
    }
    for name, args in calls.items():
        result = getattr(rt, name)(*args)
        assert isinstance(result, tuple) and isinstance(result[0], rt.cudaError_t), name
    assert rt.cudaGetErrorName(rt.cudaError_t.cudaErrorMemoryAllocation)[1] \
        == b"cudaErrorMemoryAllocation"


def test_cuda_python_missing_is_an_import_error_naming_it(monkeypatch):
    _hide_bindings(monkeypatch, *BINDING_MODULES)
    with pytest.raises(ImportError, match="cuda-python is not importable"):
        _import_cuda_runtime()


# pycuda from the daemon's threads. The fake keeps the driver API's per-thread context rule
# (see fake_pycuda.py); test_api_serves_other_threads below is the same on a real GPU.

def _in_thread(name: str, fn) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join(10)
    if errors:
        raise errors[0]


def _round_trip_across_threads(api: CudaApi) -> list[np.ndarray]:
    """Open-side allocations on this thread, copies on an infer thread, close on a third."""
    frame = np.random.default_rng(1).random((3, 48, 64), dtype=np.float32)
    host = api.pinned_host(frame.shape, frame.dtype)
    host[...] = frame
    device = api.device_buffer(frame.nbytes)
    stream = api.stream()
    seen: list[np.ndarray] = []

    def infer() -> None:
        back = np.zeros_like(frame)
        api.copy_htod_async(device, host, stream)
        api.copy_dtoh_async(back, device, stream)
        stream.synchronize()
        seen.append(back)
        api.device_buffer(64)  # allocations from the infer thread too (a swap re-opens)

    _in_thread("sightline-infer-test", infer)
    _in_thread("sightline-close-test", api.close)
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], frame)
    return seen


def test_pycuda_api_opened_on_one_thread_serves_the_infer_thread_and_closes_anywhere(
        monkeypatch):
    fake = FakePycuda()
    fake.install(monkeypatch)
    api = load_cuda("pycuda")
    assert fake.stacks_left() == {}  # opening leaves no context pushed on the opening thread
    _round_trip_across_threads(api)
    assert fake.stacks_left() == {}  # pycuda aborts at exit if a stack is left non-empty


def test_pycuda_api_refuses_calls_after_close(monkeypatch):
    FakePycuda().install(monkeypatch)
    api = load_cuda("pycuda")
    api.close()
    api.close()  # a second close is a no-op
    with pytest.raises(CudaError, match="closed"):
        api.stream()


@pytest.mark.gpu
def test_api_serves_other_threads(api: CudaApi):
    _round_trip_across_threads(api)

"""Moving tensors between host and GPU: streams, device buffers, page-locked host arrays and
async copies, behind one small interface over cuda-python or pycuda. Usable from any thread,
not only the one that opened it (the daemon opens engines on one thread, infers on another).

cuda-python first (it shares the runtime's primary context with TensorRT), both majors,
branched at import rather than pinned: 13.x has only `cuda.bindings.runtime` (it removed
`cuda.cudart`); 12.6.1-12.9 have both; 12.0-12.6.0 only `cuda.cudart`, and raise
RuntimeError instead of an error code when no driver loads. The calls used here kept their
signatures and (error, value) returns across both; native handles come from
`cuda.bindings.utils.get_cuda_native_handle` where it exists (13.0 deprecated `int(handle)`).
The major must suit the driver (13.x needs a CUDA 13 driver; JetPack 6 is CUDA 12.6, so
`cuda-python==12.*`); a mismatch raises cudaErrorInsufficientDriver saying which to install.
pycuda (for images that ship it) pushes the primary context around each call. Both are
imported inside `load_cuda` only; a missing one is an ImportError naming the extra. Every
failing CUDA call raises CudaError carrying CUDA's own error name.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

INSTALL_HINT = "pip install 'sightline[tensorrt]' (cuda-python) or pip install 'sightline[pycuda]'"


class CudaError(RuntimeError):
    """A CUDA call failed. `name` is CUDA's error name, e.g. "cudaErrorMemoryAllocation"
    (runtime API, cuda-python) or "CUDA_ERROR_OUT_OF_MEMORY" (driver API, pycuda)."""

    def __init__(self, call: str, name: str, detail: str = "") -> None:
        self.call = call
        self.name = name
        super().__init__(f"{call} failed: {name}" + (f" ({detail})" if detail else ""))


class Stream(Protocol):
    handle: int  # the cudaStream_t as an int: TensorRT's execute_async_v3(stream_handle)

    def synchronize(self) -> None: ...


class DeviceBuffer(Protocol):
    ptr: int  # device address; 0 once freed
    nbytes: int

    def free(self) -> None: ...


class CudaApi(Protocol):
    name: str  # "cuda-python" | "pycuda"

    def stream(self) -> Stream: ...

    def device_buffer(self, nbytes: int) -> DeviceBuffer: ...

    def pinned_host(self, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised page-locked array, freed by `free_pinned` or `close`."""
        ...

    def free_pinned(self, array: np.ndarray) -> None: ...

    def copy_htod_async(self, dst: DeviceBuffer, src: np.ndarray, stream: Stream) -> None: ...

    def copy_dtoh_async(self, dst: np.ndarray, src: DeviceBuffer, stream: Stream) -> None: ...

    def close(self) -> None:
        """Free every stream, buffer and pinned array this API made. Arrays from
        `pinned_host` must not be touched afterwards."""
        ...


def load_cuda(prefer: str | None = None, *, device: int = 0) -> CudaApi:
    """Open a CUDA binding on GPU `device`: `prefer` first ("cuda-python" or "pycuda"), then
    the other. ImportError (naming the extras) when neither is installed; CudaError when one
    is installed but CUDA itself fails (no driver, no device).

    The API may be used from any thread, not only the one that opened it.
    """
    if prefer is not None and prefer not in _OPENERS:
        raise ValueError(f"unknown CUDA binding {prefer!r}; choose from {', '.join(_OPENERS)}")
    order = [prefer] if prefer else []
    order += [name for name in _OPENERS if name not in order]
    reasons = []
    for name in order:
        try:
            return _OPENERS[name](device)
        except ImportError as exc:
            reasons.append(f"{name}: {exc}")
    raise ImportError(f"no CUDA binding could be imported ({'; '.join(reasons)}): {INSTALL_HINT}")


# Both backends check sizes and layout before a copy: an async copy past a buffer's end
# corrupts device memory silently, long after the call that caused it.
def _check_htod(dst: DeviceBuffer, src: np.ndarray) -> None:
    if not src.flags.c_contiguous:
        raise ValueError("copy_htod_async needs a C-contiguous source array")
    if src.nbytes > dst.nbytes:
        raise ValueError(f"source is {src.nbytes} bytes; the device buffer holds {dst.nbytes}")
    if not dst.ptr:
        raise ValueError("the device buffer has been freed")


def _check_dtoh(dst: np.ndarray, src: DeviceBuffer) -> None:
    if not (dst.flags.c_contiguous and dst.flags.writeable):
        raise ValueError("copy_dtoh_async needs a writeable C-contiguous destination array")
    if dst.nbytes > src.nbytes:
        raise ValueError(f"destination is {dst.nbytes} bytes; the device buffer holds {src.nbytes}")
    if not src.ptr:
        raise ValueError("the device buffer has been freed")


def _shape_and_bytes(
    shape: int | tuple[int, ...], dtype: Any
) -> tuple[tuple[int, ...], np.dtype, int]:
    dims = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    dtype = np.dtype(dtype)
    return dims, dtype, math.prod(dims) * dtype.itemsize


# {{{ cuda-python (CUDA runtime API)

class _RuntimeStream:
    __slots__ = ("_api", "_stream", "handle")

    def __init__(self, api: _CudaPythonApi, stream: Any) -> None:
        self._api = api
        self._stream = stream
        self.handle = api._native_handle(stream)

    def synchronize(self) -> None:
        self._api._call("cudaStreamSynchronize", self._api._rt.cudaStreamSynchronize, self._stream)


class _RuntimeBuffer:
    __slots__ = ("_api", "ptr", "nbytes")

    def __init__(self, api: _CudaPythonApi, ptr: int, nbytes: int) -> None:
        self._api = api
        self.ptr = ptr
        self.nbytes = nbytes

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self._api._buffers.discard(self)
            self._api._call("cudaFree", self._api._rt.cudaFree, ptr)


class _PinnedMemory:
    """Owns a cudaHostAlloc block; numpy arrays made from it keep it as their `.base`."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.ptr = ptr
        self.__array_interface__ = {
            "shape": shape, "typestr": dtype.str, "descr": dtype.descr,
            "data": (ptr, False), "strides": None, "version": 3,
        }


class _CudaPythonApi:
    name = "cuda-python"

    def __init__(self, device: int) -> None:
        runtime = _import_cuda_runtime()
        self._rt = runtime
        self._device = device
        self._streams: list[_RuntimeStream] = []
        self._buffers: set[_RuntimeBuffer] = set()
        self._pinned: dict[int, _PinnedMemory] = {}  # id(owner) -> owner
        self._native_handle = _native_handle_getter()
        # The CUDA version the bindings were built for (13050 = 13.5): no driver needed.
        self.runtime_version = int(self._call("cudaRuntimeGetVersion",
                                              runtime.cudaRuntimeGetVersion))
        try:
            count = self._call("cudaGetDeviceCount", runtime.cudaGetDeviceCount)
        except CudaError as exc:
            if exc.name != "cudaErrorInsufficientDriver":
                raise
            raise CudaError(exc.call, exc.name,
                            driver_mismatch_hint(self.runtime_version, self._driver_version())
                            ) from None
        except RuntimeError as exc:  # cuda-python < 12.6.1: "Failed to dlopen libcuda.so.1"
            raise CudaError("cudaGetDeviceCount", "cudaErrorInsufficientDriver",
                            f"{exc}; {driver_mismatch_hint(self.runtime_version, 0)}") from None
        if device >= count:
            raise CudaError("cudaSetDevice", "cudaErrorInvalidDevice",
                            f"device {device} asked for, {count} present")
        self._call("cudaSetDevice", runtime.cudaSetDevice, device)

    def _driver_version(self) -> int:
        try:
            return int(self._call("cudaDriverGetVersion", self._rt.cudaDriverGetVersion))
        except (CudaError, RuntimeError):
            return 0

    def _call(self, call: str, fn: Callable[..., tuple], *args: Any) -> Any:
        err, *values = fn(*args)
        if err != self._rt.cudaError_t.cudaSuccess:
            raise CudaError(call, _runtime_error_name(self._rt, err))
        return values[0] if len(values) == 1 else tuple(values)

    def stream(self) -> _RuntimeStream:
        # cudaSetDevice is per host thread; allocations may come from a thread other than
        # the one that opened the API.
        self._call("cudaSetDevice", self._rt.cudaSetDevice, self._device)
        # Non-blocking: no implicit synchronisation with the legacy default stream.
        raw = self._call("cudaStreamCreateWithFlags", self._rt.cudaStreamCreateWithFlags,
                         self._rt.cudaStreamNonBlocking)
        stream = _RuntimeStream(self, raw)
        self._streams.append(stream)
        return stream

    def device_buffer(self, nbytes: int) -> _RuntimeBuffer:
        self._call("cudaSetDevice", self._rt.cudaSetDevice, self._device)
        # At least one byte: cudaMalloc(0) gives a null pointer, which reads as "freed".
        ptr = int(self._call("cudaMalloc", self._rt.cudaMalloc, max(nbytes, 1)))
        buffer = _RuntimeBuffer(self, ptr, nbytes)
        self._buffers.add(buffer)
        return buffer

    def pinned_host(self, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
        shape, dtype, nbytes = _shape_and_bytes(shape, dtype)
        # Page-locked for the current device's context only: make it ours on this thread.
        self._call("cudaSetDevice", self._rt.cudaSetDevice, self._device)
        ptr = int(self._call("cudaHostAlloc", self._rt.cudaHostAlloc, max(nbytes, 1),
                             self._rt.cudaHostAllocDefault))
        memory = _PinnedMemory(ptr, shape, dtype)
        self._pinned[id(memory)] = memory
        return np.asarray(memory)

    def free_pinned(self, array: np.ndarray) -> None:
        memory = _pop_pinned_owner(self._pinned, array)
        if memory is not None:
            self._call("cudaFreeHost", self._rt.cudaFreeHost, memory.ptr)

    def copy_htod_async(self, dst: DeviceBuffer, src: np.ndarray, stream: Stream) -> None:
        _check_htod(dst, src)
        self._call("cudaMemcpyAsync", self._rt.cudaMemcpyAsync, dst.ptr, src.ctypes.data,
                   src.nbytes, self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle)

    def copy_dtoh_async(self, dst: np.ndarray, src: DeviceBuffer, stream: Stream) -> None:
        _check_dtoh(dst, src)
        self._call("cudaMemcpyAsync", self._rt.cudaMemcpyAsync, dst.ctypes.data, src.ptr,
                   dst.nbytes, self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle)

    def close(self) -> None:
        # Streams first: their pending copies may still read the buffers freed below.
        errors = []
        for stream in self._streams:
            errors += _attempt(stream.synchronize)
            errors += _attempt(self._call, "cudaStreamDestroy", self._rt.cudaStreamDestroy,
                               stream._stream)
        self._streams.clear()
        for buffer in list(self._buffers):
            errors += _attempt(buffer.free)
        for memory in list(self._pinned.values()):
            errors += _attempt(self._call, "cudaFreeHost", self._rt.cudaFreeHost, memory.ptr)
        self._pinned.clear()
        if errors:
            raise errors[0]


def _runtime_error_name(runtime: Any, err: Any) -> str:
    name = getattr(err, "name", None)  # cudaError_t is an IntEnum in cuda-python
    if name:
        return name
    _, text = runtime.cudaGetErrorName(err)
    return text.decode() if isinstance(text, bytes) else str(text)



def _import_cuda_runtime() -> Any:
    """cuda-python's runtime module: `cuda.bindings.runtime` (12.6.1 and later, the only one
    in 13.x), else `cuda.cudart` (12.0 to 12.9; removed in 13.0)."""
    try:
        from cuda.bindings import runtime
    except ImportError as first:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise ImportError(f"cuda-python is not importable ({first})") from first
    return runtime


def _native_handle_getter() -> Callable[[Any], int]:
    try:  # cuda-python 12.9+; 13.0 deprecated int(handle) for it
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int
    return get_cuda_native_handle


def driver_mismatch_hint(runtime_version: int, driver_version: int) -> str:
    """What to do when the bindings need a newer driver than this one (CUDA versions as
    cudaRuntimeGetVersion / cudaDriverGetVersion give them: 12060 = 12.6; 0 = no driver)."""
    built = f"cuda-python here is built for CUDA {_cuda_version_text(runtime_version)}"
    if not driver_version:
        return f"{built}; no NVIDIA driver could be loaded on this machine"
    wanted = driver_version // 1000
    if wanted < runtime_version // 1000:
        return (f"{built}; this driver supports CUDA {_cuda_version_text(driver_version)}: "
                f"pip install 'cuda-python=={wanted}.*' (or update the driver)")
    return f"{built}; this driver supports CUDA {_cuda_version_text(driver_version)}"


def _cuda_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


# }}}

# {{{ pycuda (CUDA driver API)

class _PycudaStream:
    __slots__ = ("_api", "_stream", "handle")

    def __init__(self, api: _PycudaApi, stream: Any) -> None:
        self._api = api
        self._stream = stream
        self.handle = int(stream.handle)

    def synchronize(self) -> None:
        with self._api._active():
            self._api._call(self._stream.synchronize)


class _PycudaBuffer:
    __slots__ = ("_api", "_allocation", "ptr", "nbytes")

    def __init__(self, api: _PycudaApi, allocation: Any, nbytes: int) -> None:
        self._api = api
        self._allocation = allocation
        self.ptr = int(allocation)
        self.nbytes = nbytes

    def free(self) -> None:
        if self.ptr:
            self.ptr = 0
            self._api._buffers.discard(self)
            with self._api._active():
                self._api._call(self._allocation.free)


class _PycudaApi:
    """The driver API needs a current context on the calling thread, and pycuda refuses to
    free an object from a thread other than its context's creator unless that context is
    current there ("cannot activate out-of-thread context"). So every call pushes the
    primary context and pops it again: the API works from any thread, and no thread is left
    with a pushed context (pycuda aborts at exit if the opening thread's stack is not empty).
    """

    name = "pycuda"

    def __init__(self, device: int) -> None:
        try:
            import pycuda.driver as driver
        except ImportError as exc:
            raise ImportError(f"pycuda is not importable ({exc})") from exc
        self._drv = driver
        self._streams: list[_PycudaStream] = []
        self._buffers: set[_PycudaBuffer] = set()
        self._pinned: dict[int, Any] = {}  # id(HostAllocation) -> HostAllocation
        self._call(driver.init)
        # The device's primary context, the one the CUDA runtime (and so TensorRT) uses, not
        # a new context as pycuda.autoinit would make: buffers must be valid in both.
        self._context = self._call(driver.Device(device).retain_primary_context)

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        if self._context is None:
            raise CudaError("cuCtxPushCurrent", "CUDA_ERROR_INVALID_CONTEXT",
                            "this CUDA API has been closed")
        self._call(self._context.push)
        try:
            yield
        finally:
            self._call(self._drv.Context.pop)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._drv.Error as exc:
            # pycuda's message is "<driver call> failed: <cuGetErrorString text>"
            call, _, detail = str(exc).partition(" failed: ")
            name = _driver_error_names().get(detail.split(" - ")[0].strip())
            raise CudaError(call or getattr(fn, "__name__", "pycuda"),
                            name or type(exc).__name__, detail) from exc

    def stream(self) -> _PycudaStream:
        with self._active():
            stream = _PycudaStream(self, self._call(self._drv.Stream))
        self._streams.append(stream)
        return stream

    def device_buffer(self, nbytes: int) -> _PycudaBuffer:
        with self._active():
            allocation = self._call(self._drv.mem_alloc, max(nbytes, 1))  # cuMemAlloc(0) fails
        buffer = _PycudaBuffer(self, allocation, nbytes)
        self._buffers.add(buffer)
        return buffer

    def pinned_host(self, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
        shape, dtype, _ = _shape_and_bytes(shape, dtype)
        with self._active():
            array = self._call(self._drv.pagelocked_empty, shape, dtype)
        self._pinned[id(array.base)] = array.base
        return array

    def free_pinned(self, array: np.ndarray) -> None:
        allocation = _pop_pinned_owner(self._pinned, array)
        if allocation is not None:
            with self._active():
                self._call(allocation.free)

    def copy_htod_async(self, dst: DeviceBuffer, src: np.ndarray, stream: Stream) -> None:
        _check_htod(dst, src)
        with self._active():
            self._call(self._drv.memcpy_htod_async, dst.ptr, src, stream._stream)  # type: ignore[attr-defined]

    def copy_dtoh_async(self, dst: np.ndarray, src: DeviceBuffer, stream: Stream) -> None:
        _check_dtoh(dst, src)
        with self._active():
            self._call(self._drv.memcpy_dtoh_async, dst, src.ptr, stream._stream)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._context is None:
            return
        errors = []
        for stream in self._streams:
            errors += _attempt(stream.synchronize)
        for buffer in list(self._buffers):
            errors += _attempt(buffer.free)
        with self._active():
            # pycuda destroys a Stream when its last reference goes: here, in its context.
            self._streams.clear()
            for allocation in list(self._pinned.values()):
                errors += _attempt(self._call, allocation.free)
            self._pinned.clear()
        context, self._context = self._context, None
        errors += _attempt(self._call, context.detach)
        if errors:
            raise errors[0]


@functools.lru_cache(maxsize=1)
def _driver_error_names() -> dict[str, str]:
    """cuGetErrorString text -> cuGetErrorName name, from the driver itself (pycuda reports
    only the text). Both calls work before cuInit; built once, on the first error."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return {}
    names = {}
    for code in range(1000):
        text, name = ctypes.c_char_p(), ctypes.c_char_p()
        if (lib.cuGetErrorString(code, ctypes.byref(text)) == 0
                and lib.cuGetErrorName(code, ctypes.byref(name)) == 0
                and text.value and name.value):
            names[text.value.decode()] = name.value.decode()
    return names


# }}}


def _pop_pinned_owner(pinned: dict[int, Any], array: np.ndarray) -> Any:
    """Remove and return the page-locked block under `array` (a view of it, too), or None
    when this API did not make it or has already freed it."""
    base: Any = array
    while base is not None:
        if pinned.get(id(base)) is base:
            return pinned.pop(id(base))
        base = getattr(base, "base", None)
    return None


def _attempt(fn: Callable[..., Any], *args: Any) -> list[Exception]:
    """Run one clean-up step; return its error instead of skipping the steps after it."""
    try:
        fn(*args)
    except Exception as exc:
        return [exc]
    return []


_OPENERS: dict[str, Callable[[int], CudaApi]] = {
    "cuda-python": _CudaPythonApi,
    "pycuda": _PycudaApi,
}

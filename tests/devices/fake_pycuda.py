"""A stand-in for `pycuda.driver` on machines without a GPU, keeping the one rule that
matters to devices.cuda: CUDA's driver API needs a current context *on the calling thread*.

It follows pycuda's src/cpp/cuda.hpp: contexts live on a per-thread stack (`push`, static
`pop`, which refuses an empty stack: "cannot pop non-current context"); memory copies,
allocations and streams fail without a current context; freeing an allocation from a
thread that is neither its context's creator nor has it current fails ("cannot activate
out-of-thread context"). Device memory is host memory here. The real path runs in the GPU
tests (tests/devices/test_cuda.py) and in bench/gpu_check.sh.
"""

from __future__ import annotations

import itertools
import sys
import threading
import types

import numpy as np

INVALID_CONTEXT = "invalid device context"


class FakePycuda:
    def __init__(self) -> None:
        self._local = threading.local()
        self._stacks: dict[str, list] = {}  # thread name -> that thread's context stack
        self._memory: dict[int, np.ndarray] = {}  # device address -> its bytes
        self._addresses = itertools.count(0x7F00_0000_0000, 0x1_0000)
        self.driver = self._module()

    def stacks_left(self) -> dict[str, int]:
        """Threads that still have a context pushed, and how many."""
        return {name: len(stack) for name, stack in self._stacks.items() if stack}

    def install(self, monkeypatch) -> None:
        package = types.ModuleType("pycuda")
        package.driver = self.driver
        monkeypatch.setitem(sys.modules, "pycuda", package)
        monkeypatch.setitem(sys.modules, "pycuda.driver", self.driver)

    # {{{ the driver module

    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
            self._stacks[threading.current_thread().name] = self._local.stack
        return self._local.stack

    def _module(self) -> types.ModuleType:
        fake = self
        driver = types.ModuleType("pycuda.driver")

        class Error(Exception):
            pass

        def require_current(call: str) -> None:
            if not fake._stack():
                raise Error(f"{call} failed: {INVALID_CONTEXT}")

        class Context:
            def __init__(self) -> None:
                self.thread = threading.current_thread()
                self.valid = True

            def push(self) -> None:
                if not self.valid:
                    raise Error("cuCtxPushCurrent failed: context is destroyed")
                fake._stack().append(self)

            @staticmethod
            def pop() -> None:
                stack = fake._stack()
                if not stack:
                    raise Error("context::pop failed: invalid device context - "
                                "cannot pop non-current context")
                stack.pop()

            def detach(self) -> None:
                self.valid = False

        class Device:
            def __init__(self, ordinal: int) -> None:
                if ordinal != 0:
                    raise Error("cuDeviceGet failed: invalid device ordinal")

            def retain_primary_context(self) -> Context:
                return Context()

        def scoped_activation(context: Context) -> None:
            if context not in fake._stack() and context.thread is not threading.current_thread():
                raise Error("cannot activate out-of-thread context")

        class Stream:
            def __init__(self) -> None:
                require_current("cuStreamCreate")
                self.handle = next(fake._addresses)

            def synchronize(self) -> None:
                require_current("cuStreamSynchronize")

        class DeviceAllocation:
            def __init__(self, nbytes: int) -> None:
                require_current("cuMemAlloc")
                self.context = fake._stack()[-1]
                self.address = next(fake._addresses)
                fake._memory[self.address] = np.zeros(nbytes, np.uint8)

            def __int__(self) -> int:
                return self.address

            def free(self) -> None:
                scoped_activation(self.context)
                fake._memory.pop(self.address, None)

        class HostAllocation:
            def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
                require_current("cuMemHostAlloc")
                self.context = fake._stack()[-1]
                self._backing = np.zeros(shape, dtype)
                self.__array_interface__ = self._backing.__array_interface__

            def free(self) -> None:
                scoped_activation(self.context)

        def pagelocked_empty(shape, dtype) -> np.ndarray:
            return np.asarray(HostAllocation(tuple(shape), np.dtype(dtype)))

        def memcpy_htod_async(dest: int, src: np.ndarray, stream: Stream) -> None:
            require_current("cuMemcpyHtoDAsync")
            flat = np.frombuffer(src.tobytes(), np.uint8)
            fake._memory[int(dest)][: flat.size] = flat

        def memcpy_dtoh_async(dest: np.ndarray, src: int, stream: Stream) -> None:
            require_current("cuMemcpyDtoHAsync")
            dest.reshape(-1).view(np.uint8)[...] = fake._memory[int(src)][: dest.nbytes]

        driver.Error = Error
        driver.init = lambda: None
        driver.Context = Context
        driver.Device = Device
        driver.Stream = Stream
        driver.mem_alloc = DeviceAllocation
        driver.pagelocked_empty = pagelocked_empty
        driver.memcpy_htod_async = memcpy_htod_async
        driver.memcpy_dtoh_async = memcpy_dtoh_async
        return driver

    # }}}

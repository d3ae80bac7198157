"""Native TensorRT backend: the same Engine interface as ONNX Runtime, on a compiled engine.

Everything per-call is preallocated at load: device buffers and pinned host buffers sized
for the profile's largest shapes, one CUDA stream per engine, tensor addresses bound once.
A call sets the input shapes (checked against the profile), copies in asynchronously,
runs `execute_async_v3`, copies out and synchronises. CUDA goes through devices.cuda
(cuda-python first, pycuda where that is what the device image has).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from runtime.engines.seam import Dim, TensorSpec
from runtime.errors import EngineError
from runtime.models.engine_cache import EngineRecord

INSTALL_HINT = "pip install 'sightline[tensorrt]' (on Jetson, TensorRT comes with JetPack)"


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError(f"TensorRT is not installed here ({exc}); {INSTALL_HINT}") from None
    return tensorrt


def spec_shape(dims) -> tuple[Dim, ...]:
    """An engine's tensor shape as TensorSpec has it: TensorRT marks a dynamic dimension
    -1, TensorSpec (like ONNX Runtime's specs) None."""
    return tuple(None if int(d) < 0 else int(d) for d in dims)


class TensorRTEngine:
    def __init__(self, record: EngineRecord) -> None:
        from devices.cuda import load_cuda

        trt = import_tensorrt()
        self._cuda = load_cuda()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(record.path.read_bytes())
        if self._engine is None:
            raise EngineError(f"TensorRT could not deserialize {record.path}; rebuild it with "
                              "`sightline compile`")
        self._context = self._engine.create_execution_context()
        self._stream = self._cuda.stream()
        self._record = record
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._limits = {n: self._engine.get_tensor_profile_shape(n, 0)
                        for n in names if is_input[n]}
        # Size every buffer for the largest profile shape: set max input shapes, read outputs.
        for name, (_, _, hi) in self._limits.items():
            self._context.set_input_shape(name, tuple(hi))
        max_shapes = {n: tuple(self._context.get_tensor_shape(n)) for n in names}
        self._host: dict[str, np.ndarray] = {}
        self._device = {}
        for name in names:
            count = int(np.prod(max_shapes[name]))
            self._host[name] = self._cuda.pinned_host((count,), dtypes[name])
            self._device[name] = self._cuda.device_buffer(count * dtypes[name].itemsize)
            self._context.set_tensor_address(name, self._device[name].ptr)
        self._input_names = [n for n in names if is_input[n]]
        self._output_names = [n for n in names if not is_input[n]]
        self._inputs = tuple(TensorSpec(n, dtypes[n], spec_shape(self._engine.get_tensor_shape(n)))
                             for n in self._input_names)
        self._outputs = tuple(TensorSpec(n, dtypes[n], spec_shape(self._engine.get_tensor_shape(n)))
                              for n in self._output_names)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def provider(self) -> str:
        target = self._record.key.target
        where = f"DLA {target.dla_core}" if target.dla_core is not None else target.gpu_name
        return f"TensorRT {target.tensorrt_version} ({where}, {self._record.key.precision})"

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in self._input_names:
            array = feeds[name]
            lo, _, hi = self._limits[name]
            if len(array.shape) != len(hi) or any(
                    not (a <= s <= b) for a, s, b in zip(lo, array.shape, hi, strict=True)):
                raise EngineError(f"input {name!r} shape {array.shape} is outside the engine's "
                                  f"profile {tuple(lo)}..{tuple(hi)}")
            self._context.set_input_shape(name, array.shape)
            staged = self._host[name][: array.size].reshape(array.shape)
            np.copyto(staged, array, casting="same_kind")
            self._cuda.copy_htod_async(self._device[name], staged, self._stream)
        if not self._context.execute_async_v3(self._stream.handle):
            raise EngineError("TensorRT execution failed")
        results = {}
        for name in self._output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            host = self._host[name][: int(np.prod(shape))].reshape(shape)
            self._cuda.copy_dtoh_async(host, self._device[name], self._stream)
            results[name] = host
        self._stream.synchronize()
        # Copies: the pinned buffers are reused by the next call.
        return {name: value.copy() for name, value in results.items()}

    def close(self) -> None:
        for buffer in self._device.values():
            buffer.free()
        self._device.clear()
        self._host.clear()
        self._context = None
        self._engine = None
        self._cuda.close()

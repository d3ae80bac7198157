"""ONNX Runtime backend: serves wherever TensorRT is absent, CPU included.

Execution providers are chosen by what this machine has (TensorRT EP, CUDA EP, CPU),
unless the config names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from devices.platform import detect_platform
from runtime.engines.seam import EngineSettings, TensorSpec
from runtime.errors import EngineError

PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def choose_providers(requested: tuple[str, ...], available: list[str], has_gpu: bool) -> list[str]:
    """Requested providers must all exist; else GPU providers are used only with a GPU present."""
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise EngineError(
                f"execution provider(s) {', '.join(missing)} requested but this onnxruntime build "
                f"offers only {', '.join(available)}; install onnxruntime-gpu for CUDA/TensorRT "
                "or remove `providers` from the engine config"
            )
        return list(requested)
    return [
        p for p in PREFERRED_PROVIDERS if p in available and (has_gpu or p not in GPU_PROVIDERS)
    ]


def session_options(settings: EngineSettings, cpu_count: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = settings.intra_op_threads or cpu_count
    options.inter_op_num_threads = settings.inter_op_threads
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0"
    )
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    return options


def _spec(arg: ort.NodeArg) -> TensorSpec:
    return TensorSpec(arg.name, np.dtype(_ORT_TYPES.get(arg.type, np.float32)), tuple(arg.shape))


class OnnxRuntimeEngine:
    def __init__(self, onnx_path: Path, settings: EngineSettings) -> None:
        platform = detect_platform()
        providers = choose_providers(
            settings.providers, ort.get_available_providers(), platform.has_nvidia_gpu
        )
        try:
            self._session = ort.InferenceSession(
                str(onnx_path),
                sess_options=session_options(settings, platform.cpu_count),
                providers=providers,
            )
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise EngineError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc
        self._inputs = tuple(_spec(a) for a in self._session.get_inputs())
        self._outputs = tuple(_spec(a) for a in self._session.get_outputs())
        self._output_names = [o.name for o in self._outputs]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def provider(self) -> str:
        return self._session.get_providers()[0]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(self._output_names, dict(feeds))
        except Exception as exc:
            raise EngineError(f"inference failed: {exc}") from exc
        return dict(zip(self._output_names, values, strict=True))

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]

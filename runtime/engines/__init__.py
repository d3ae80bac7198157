"""The Engine seam: one small protocol every inference backend implements.

Backends live one per module (`onnxruntime.py`, later `tensorrt.py`); `open_engine`
picks one. Backend modules are imported lazily so GPU stacks stay optional.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from runtime.errors import EngineError

Dim = int | str | None  # a fixed size, a named dynamic axis, or unknown


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]


@runtime_checkable
class Engine(Protocol):
    """What the pipeline needs from a backend; nothing more."""

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def provider(self) -> str:
        """The execution provider or device actually running the model."""
        ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class EngineSettings(BaseModel):
    """Engine choices a device operator may override in the daemon config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["auto", "onnxruntime"] = "auto"
    # Empty means: pick by what this machine has (TensorRT EP, then CUDA EP, then CPU).
    providers: tuple[str, ...] = ()
    intra_op_threads: int = Field(default=0, ge=0, description="0: one per available core")
    inter_op_threads: int = Field(default=1, ge=1)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # ORT worker threads busy-wait between ops by default; that steals the cores the
    # decode/preprocess stage needs on small edge CPUs, so it is off unless asked for.
    allow_spinning: bool = False


# backend name -> "module:class"; add a backend by adding a module and a line here.
BACKENDS = {
    "onnxruntime": "runtime.engines.onnxruntime:OnnxRuntimeEngine",
}


def open_engine(onnx_path: Path, settings: EngineSettings | None = None) -> Engine:
    settings = settings or EngineSettings()
    backend = "onnxruntime" if settings.backend == "auto" else settings.backend
    module_name, class_name = BACKENDS[backend].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(f"backend {backend!r} is not installed here: {exc}") from exc
    return getattr(module, class_name)(onnx_path, settings)

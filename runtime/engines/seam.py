"""The Engine seam: the protocol every inference backend implements, the settings an
operator may override, and the builder a caller may hand in for TensorRT engines.

Backends import this module, never the package's selector (runtime/engines/__init__.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from runtime.models.bundle import Bundle

if TYPE_CHECKING:
    from runtime.engines.tensorrt_target import CompileOptions
    from runtime.models.engine_cache import EngineCache, EngineRecord, TargetDevice

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


class EngineBuilder(Protocol):
    """Builds (or finds cached) a TensorRT engine for a bundle on this device."""

    def __call__(self, bundle: Bundle, cache: EngineCache, options: CompileOptions, *,
                 target: TargetDevice) -> EngineRecord: ...


class EngineSettings(BaseModel):
    """Engine choices a device operator may override in the daemon config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # auto: a compiled TensorRT engine where TensorRT and a GPU are present, else ONNX
    # Runtime (whose providers are in turn chosen by what the machine has).
    backend: Literal["auto", "tensorrt", "onnxruntime"] = "auto"
    # Empty means: pick by what this machine has (TensorRT EP, then CUDA EP, then CPU).
    providers: tuple[str, ...] = ()
    intra_op_threads: int = Field(default=0, ge=0, description="0: one per available core")
    inter_op_threads: int = Field(default=1, ge=1)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # auto: the bundle's preprocessing and box decoding run inside the engine as ONNX
    # operators where they can be expressed (runtime/fusion); off: in Python (the reference).
    fused: Literal["auto", "off"] = "auto"
    # ORT worker threads busy-wait between ops by default; that steals the cores the
    # decode/preprocess stage needs on small edge CPUs, so it is off unless asked for.
    allow_spinning: bool = False
    # TensorRT: build a missing engine at start-up (minutes on a Jetson) instead of failing,
    # and rebuild one compiled for another GPU/TensorRT/ONNX instead of refusing it.
    build_missing_engines: bool = False
    rebuild_mismatched: bool = False
    dla_core: int | None = Field(default=None, ge=0)
    engine_cache: str | None = Field(default=None, description="default: <cache dir>/engines")

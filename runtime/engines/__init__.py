"""The Engine seam: one small protocol every inference backend implements.

Backends live one per module (`onnxruntime.py`, `tensorrt.py`); `open_bundle_engine`
picks one. Backend modules are imported lazily so GPU stacks stay optional.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from runtime.bundle import Bundle
from runtime.errors import EngineError, EngineMismatch

log = logging.getLogger(__name__)

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

    # auto: a compiled TensorRT engine where TensorRT and a GPU are present, else ONNX
    # Runtime (whose providers are in turn chosen by what the machine has).
    backend: Literal["auto", "tensorrt", "onnxruntime"] = "auto"
    # Empty means: pick by what this machine has (TensorRT EP, then CUDA EP, then CPU).
    providers: tuple[str, ...] = ()
    intra_op_threads: int = Field(default=0, ge=0, description="0: one per available core")
    inter_op_threads: int = Field(default=1, ge=1)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # ORT worker threads busy-wait between ops by default; that steals the cores the
    # decode/preprocess stage needs on small edge CPUs, so it is off unless asked for.
    allow_spinning: bool = False
    # TensorRT: build a missing engine at start-up (minutes on a Jetson) instead of failing,
    # and rebuild one compiled for another GPU/TensorRT/ONNX instead of refusing it.
    build_missing_engines: bool = False
    rebuild_mismatched: bool = False
    dla_core: int | None = Field(default=None, ge=0)
    engine_cache: str | None = Field(default=None, description="default: <cache dir>/engines")


def open_engine(onnx_path: Path, settings: EngineSettings | None = None) -> Engine:
    """An ONNX Runtime engine for one ONNX file (no bundle, no TensorRT cache)."""
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(onnx_path, settings or EngineSettings())


def open_bundle_engine(bundle: Bundle, settings: EngineSettings | None = None) -> Engine:
    """The best engine for this bundle on this machine, by `settings.backend`.

    auto: TensorRT when it is installed, a GPU is present and an engine for this device
    is cached (or may be built); otherwise ONNX Runtime. An engine built for another
    device is never used: with auto the refusal is logged and ONNX Runtime serves.
    """
    settings = settings or EngineSettings()
    if settings.backend in ("auto", "tensorrt"):
        try:
            return _open_tensorrt(bundle, settings)
        except EngineError as exc:
            if settings.backend == "tensorrt":
                raise
            log.log(logging.WARNING if isinstance(exc, EngineMismatch) else logging.INFO,
                    "%s: TensorRT not used (%s); serving with ONNX Runtime", bundle.name, exc)
    return open_engine(bundle.onnx_path, settings)


def _open_tensorrt(bundle: Bundle, settings: EngineSettings) -> Engine:
    from devices.platform import detect_platform

    if not detect_platform().has_nvidia_gpu:
        raise EngineError("no NVIDIA GPU on this machine")
    from exporters.tensorrt_build import CompileOptions, compile_bundle, detect_target, engine_key
    from runtime.engine_cache import EngineCache
    from runtime.engines.tensorrt import TensorRTEngine
    from runtime.model_zoo import cache_dir

    cache = EngineCache(Path(settings.engine_cache) if settings.engine_cache
                        else cache_dir() / "engines")
    options = CompileOptions(dla_core=settings.dla_core)
    key = engine_key(bundle, detect_target(settings.dla_core), options)
    try:
        record = cache.find(bundle.name, key)
    except EngineMismatch:
        if not settings.rebuild_mismatched:
            raise
        log.warning("%s: rebuilding the TensorRT engine for this device", bundle.name)
        record = compile_bundle(bundle, cache, options, target=key.target)
    if record is None:
        if not settings.build_missing_engines:
            raise EngineError(f"no TensorRT engine for {bundle.name} on this device; run "
                              f"`sightline compile {bundle.directory}` or set "
                              "engine.build_missing_engines = true")
        record = compile_bundle(bundle, cache, options, target=key.target)
    return TensorRTEngine(record)

"""Engines: pick the best backend for a bundle on this machine.

The seam (the Engine protocol, TensorSpec, EngineSettings, EngineBuilder) is in seam.py;
backends live one per module (`onnxruntime.py`, `tensorrt.py`) and are imported lazily so
GPU stacks stay optional. Building a TensorRT engine is not the runtime's job: a caller
that may build (the `serve` command) hands in an `EngineBuilder`
(exporters.tensorrt_build.compile_bundle is one).
"""

from __future__ import annotations

import logging
from pathlib import Path

from runtime.engines.seam import Dim, Engine, EngineBuilder, EngineSettings, TensorSpec
from runtime.errors import EngineError, EngineMismatch
from runtime.models.bundle import Bundle

__all__ = ["Dim", "Engine", "EngineBuilder", "EngineSettings", "TensorSpec", "open_engine",
           "open_bundle_engine"]

log = logging.getLogger(__name__)


def open_engine(onnx_path: Path, settings: EngineSettings | None = None) -> Engine:
    """An ONNX Runtime engine for one ONNX file (no bundle, no TensorRT cache)."""
    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(onnx_path, settings or EngineSettings())


def open_bundle_engine(bundle: Bundle, settings: EngineSettings | None = None,
                       builder: EngineBuilder | None = None) -> Engine:
    """The best engine for this bundle on this machine, by `settings.backend`.

    auto: TensorRT when it is installed, a GPU is present and an engine for this device
    is cached (or may be built with `builder`); otherwise ONNX Runtime. An engine built
    for another device is never used: with auto the refusal is logged and ONNX Runtime
    serves.
    """
    settings = settings or EngineSettings()
    if settings.backend in ("auto", "tensorrt"):
        try:
            return _open_tensorrt(bundle, settings, builder)
        except EngineError as exc:
            if settings.backend == "tensorrt":
                raise
            log.log(logging.WARNING if isinstance(exc, EngineMismatch) else logging.INFO,
                    "%s: TensorRT not used (%s); serving with ONNX Runtime", bundle.name, exc)
    return open_engine(bundle.onnx_path, settings)


def _open_tensorrt(bundle: Bundle, settings: EngineSettings,
                   builder: EngineBuilder | None) -> Engine:
    from devices.platform import detect_platform

    if not detect_platform().has_nvidia_gpu:
        raise EngineError("no NVIDIA GPU on this machine")
    from runtime.engines.tensorrt import TensorRTEngine
    from runtime.engines.tensorrt_target import CompileOptions, detect_target, engine_key
    from runtime.models.assets import cache_dir
    from runtime.models.engine_cache import EngineCache

    def build(target):
        if builder is None:
            raise EngineError(f"{bundle.name}: a TensorRT engine must be built for this "
                              f"device; run `sightline compile {bundle.directory}`")
        return builder(bundle, cache, options, target=target)

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
        record = build(key.target)
    if record is None:
        if not settings.build_missing_engines:
            raise EngineError(f"no TensorRT engine for {bundle.name} on this device; run "
                              f"`sightline compile {bundle.directory}` or set "
                              "engine.build_missing_engines = true")
        record = build(key.target)
    return TensorRTEngine(record)

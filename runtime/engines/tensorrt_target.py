"""Which TensorRT engine this device needs: its GPU and TensorRT version, and the cache key
an engine for a bundle must match. The daemon needs this to find an engine; building one
is the exporters' job (exporters/tensorrt_build.py), handed in as an EngineBuilder.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.engines.tensorrt import import_tensorrt
from runtime.errors import EngineError
from runtime.models.bundle import Bundle
from runtime.models.engine_cache import EngineKey, TargetDevice, derive_profile


@dataclass(frozen=True)
class CompileOptions:
    workspace_mb: int = 1024
    dla_core: int | None = None
    frame_size: tuple[int, int] = (640, 480)  # the profile is optimised for this frame size
    max_batch: int = 1
    force: bool = False  # rebuild even when the cache has this engine


def detect_target(dla_core: int | None = None) -> TargetDevice:
    """This machine's GPU and TensorRT version, as an engine cache key part."""
    trt = import_tensorrt()
    from devices.platform import current_gpu

    try:
        name, capability = current_gpu()
    except RuntimeError as exc:
        raise EngineError(str(exc)) from None
    return TargetDevice(gpu_name=name, compute_capability=capability,
                        tensorrt_version=trt.__version__, dla_core=dla_core)


def engine_key(bundle: Bundle, target: TargetDevice, options: CompileOptions) -> EngineKey:
    return EngineKey(
        onnx_sha256=bundle.manifest.onnx.sha256,
        precision=bundle.manifest.precision,
        profile=derive_profile(bundle.manifest, options.frame_size, options.max_batch),
        target=target,
    )

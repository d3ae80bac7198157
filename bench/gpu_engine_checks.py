"""The GPU kit's engine steps: the auto backend, TensorRT, ONNX Runtime's GPU providers and
the fused engine's GPU flavour, each served from an infer thread and compared with ONNX
Runtime on the CPU. Project imports stay inside the checks (the kit starts without them).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpu_kit import PROJECT_MODULES, Skip, in_thread, missing_modules


class _TinyModel:
    """A Conv+Relu bundle (tests/onnx_models.py) and its ONNX Runtime CPU reference output."""

    def __init__(self, work: Path) -> None:
        missing = missing_modules(PROJECT_MODULES[:-1])
        if missing:
            raise Skip(f"project dependencies missing here: {', '.join(missing)}")
        import numpy as np

        from exporters.onnx_import import ImportOptions, import_onnx
        from runtime.engines import EngineSettings, open_engine
        from tests.onnx_models import conv_relu_model, save

        source = save(conv_relu_model(), work / "conv.onnx")
        self.bundle = import_onnx(source, ImportOptions(task="raw", name="gpu-check-conv"),
                                  work / "bundle").bundle
        self.input = self.bundle.manifest.input.name
        self.tensor = np.random.default_rng(3).random((1, 3, 96, 128), dtype=np.float32)
        cpu = open_engine(self.bundle.onnx_path,
                          EngineSettings(providers=("CPUExecutionProvider",)))
        self.reference = cpu.infer({self.input: self.tensor})
        cpu.close()

    def serve_and_compare(self, engine: Any, atol: float) -> str:
        import numpy as np

        provider = engine.provider
        try:
            outputs = in_thread("sightline-infer-gpucheck",
                                lambda: [engine.infer({self.input: self.tensor})
                                         for _ in range(3)])
        finally:
            engine.close()
        worst = 0.0
        for result in outputs:
            for name, expected in self.reference.items():
                np.testing.assert_allclose(result[name], expected, atol=atol, rtol=atol)
                worst = max(worst, float(np.max(np.abs(result[name] - expected))))
        return (f"{provider}: 3 calls on the infer thread match ONNX Runtime CPU "
                f"(max |diff| {worst:.2e}, atol {atol})")


def check_engine_auto(model: Callable[[], _TinyModel], work: Path) -> str:
    tiny = model()  # first: it skips where the project's dependencies are missing
    from runtime.engines import EngineSettings, open_bundle_engine

    engine = open_bundle_engine(tiny.bundle, EngineSettings(engine_cache=str(work / "engines")))
    return "auto chose " + tiny.serve_and_compare(engine, atol=1e-2)


def check_engine_tensorrt(model: Callable[[], _TinyModel], work: Path) -> str:
    if importlib.util.find_spec("tensorrt") is None:
        raise Skip("TensorRT is not installed (pip install 'sightline[tensorrt]')")
    tiny = model()
    from exporters.tensorrt_build import compile_bundle
    from runtime.engines import EngineSettings, open_bundle_engine

    settings = EngineSettings(backend="tensorrt", engine_cache=str(work / "engines"),
                              build_missing_engines=True)
    return tiny.serve_and_compare(open_bundle_engine(tiny.bundle, settings, compile_bundle),
                                  atol=1e-2)


def check_engine_ort_provider(provider: str, model: Callable[[], _TinyModel]) -> str:
    if importlib.util.find_spec("onnxruntime") is None:
        raise Skip("onnxruntime is not installed")
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise Skip(f"this onnxruntime ({ort.__version__}) offers only {', '.join(available)}; "
                   "onnxruntime-gpu has the GPU providers")
    tiny = model()
    from runtime.engines import EngineSettings, open_engine

    engine = open_engine(tiny.bundle.onnx_path, EngineSettings(providers=(provider,)))
    if engine.provider != provider:
        raise AssertionError(f"asked for {provider}, the session runs {engine.provider}")
    return tiny.serve_and_compare(engine, atol=1e-2 if "Tensorrt" in provider else 1e-4)


def check_fusion_on_provider(provider: str, work: Path) -> str:
    """The fused graph (resize, pad, colour, normalise, NMS in the engine: the GPU flavour)
    on the GPU provider against the same graph on the CPU, and against the Python steps."""
    missing = missing_modules(PROJECT_MODULES[:-1])
    if missing:
        raise Skip(f"project dependencies missing here: {', '.join(missing)}")
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        raise Skip(f"this onnxruntime ({ort.__version__}) offers only "
                   f"{', '.join(ort.get_available_providers())}")
    import numpy as np

    from runtime.daemon.frame_paths import FusedFrames, PythonFrames
    from runtime.engines import EngineSettings, open_engine
    from runtime.fusion.open import fused_bundle
    from runtime.fusion.parity import check_frames
    from tests.runtime.test_fusion import _detector

    bundle = _detector(work / f"fusion-{provider}")
    fused, spec = fused_bundle(bundle, resize_in_graph=True, decode=True, cast_first=True,
                               root=work / "fused")  # checked on the CPU first
    cpu = open_engine(fused.onnx_path, EngineSettings(providers=("CPUExecutionProvider",)))
    gpu = open_engine(fused.onnx_path, EngineSettings(providers=(provider,)))
    python_engine = open_engine(bundle.onnx_path,
                                EngineSettings(providers=("CPUExecutionProvider",)))
    if gpu.provider != provider:
        raise AssertionError(f"asked for {provider}, the session runs {gpu.provider}")
    frames = FusedFrames(bundle.manifest, resize_in_graph=True, decodes=True)
    python = PythonFrames(bundle.manifest)
    compared = 0
    try:
        for image, color in check_frames(bundle.manifest):
            feeds, transform = frames.feeds(image, color)
            on_cpu = frames.decode(cpu.infer(feeds), transform).detections
            on_gpu = frames.decode(in_thread("sightline-infer-fusion",
                                             lambda f=feeds: gpu.infer(f)), transform).detections
            tensor_feeds, _ = python.feeds(image, color)
            reference = python.decode(python_engine.infer(tensor_feeds), transform).detections
            for got in (on_gpu, reference):
                if len(got) != len(on_cpu):
                    raise AssertionError(f"{len(got)} boxes against {len(on_cpu)} on the CPU")
                for a, b in zip(on_cpu, got, strict=True):
                    np.testing.assert_allclose(a.box, b.box, atol=1e-2)
                    np.testing.assert_allclose(a.score, b.score, atol=1e-4)
            compared += len(on_cpu)
    finally:
        for engine in (cpu, gpu, python_engine):
            engine.close()
    return (f"{provider}: {compared} kept boxes over {len(check_frames(bundle.manifest))} "
            "frames match the CPU fused graph and the Python steps (atol 1e-2 px, 1e-4 score)")

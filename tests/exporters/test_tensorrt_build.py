"""`sightline compile` and the TensorRT engine. The GPU tests need an NVIDIA GPU with
TensorRT and CUDA Python bindings; the rest checks what a CPU-only machine can."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from runtime.engines import EngineSettings, open_bundle_engine, open_engine
from runtime.models.engine_cache import EngineCache
from runtime.models.preprocess import Preprocessor
from tests.conftest import SIGHTLINE


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


needs_tensorrt = pytest.mark.skipif(not _has_tensorrt(), reason="TensorRT is not installed")


def test_compile_without_tensorrt_says_which_extra_to_install(centerface_bundle):
    if _has_tensorrt():
        pytest.skip("TensorRT is installed here")
    done = subprocess.run([*SIGHTLINE, "compile", str(centerface_bundle.directory)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "pip install 'sightline[tensorrt]'" in done.stderr


@pytest.mark.gpu
@needs_tensorrt
def test_compiled_engine_matches_onnxruntime_and_is_reused(centerface_bundle, tmp_path,
                                                           astronaut_640x480):
    from exporters.tensorrt_build import CompileOptions, compile_bundle

    cache = EngineCache(tmp_path)
    record = compile_bundle(centerface_bundle, cache, CompileOptions(workspace_mb=512))
    assert record.path.is_file() and record.key.target.compute_capability.startswith("sm_")
    again = compile_bundle(centerface_bundle, cache, CompileOptions(workspace_mb=512))
    assert again.built_at == record.built_at  # served from the cache, not rebuilt
    assert cache.timing_cache_path(record.key.target).is_file()

    manifest = centerface_bundle.manifest
    tensor, _ = Preprocessor(manifest.input, manifest.preprocess)(astronaut_640x480, "bgr")
    reference = open_engine(centerface_bundle.onnx_path).infer({manifest.input.name: tensor})
    settings = EngineSettings(backend="tensorrt", engine_cache=str(tmp_path))
    engine = open_bundle_engine(centerface_bundle, settings)
    assert engine.provider.startswith("TensorRT")
    for _ in range(2):  # buffers are reused across calls
        outputs = engine.infer({manifest.input.name: tensor})
        for name, expected in reference.items():
            np.testing.assert_allclose(outputs[name], expected, atol=2e-2, rtol=2e-2)
    small, _ = Preprocessor(manifest.input, manifest.preprocess)(astronaut_640x480[:240, :320],
                                                                 "bgr")
    assert engine.infer({manifest.input.name: small})[manifest.outputs["heatmap"]].shape[2:] \
        == (60, 80)
    engine.close()

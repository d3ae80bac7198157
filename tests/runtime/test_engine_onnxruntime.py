"""The ONNX Runtime engine: tensor specs, exact inference, provider choice, session options."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime.engines import Engine, EngineSettings, TensorSpec, open_engine
from runtime.engines.onnxruntime import choose_providers, session_options
from runtime.errors import EngineError
from tests.onnx_models import affine_argmax_model, custom_op_model, save

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
CPU_ONLY = EngineSettings(providers=(CPU,), intra_op_threads=1)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Iterator[Engine]:
    path = save(affine_argmax_model(), tmp_path_factory.mktemp("engine") / "affine.onnx")
    engine = open_engine(path, CPU_ONLY)
    yield engine
    engine.close()


def test_engine_describes_inputs_and_outputs(engine):
    assert isinstance(engine, Engine)
    assert engine.inputs == (TensorSpec("x", np.dtype(np.float32), ("batch", 3, "h", "w")),)
    assert engine.outputs == (
        TensorSpec("scaled", np.dtype(np.float32), ("batch", 3, "h", "w")),
        TensorSpec("best", np.dtype(np.int64), ("batch", "h", "w")),
    )
    assert engine.provider == CPU


def test_infer_returns_exact_values_by_output_name(engine):
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 7)).astype(np.float32)
    outputs = engine.infer({"x": x})
    assert list(outputs) == ["scaled", "best"]
    np.testing.assert_array_equal(outputs["scaled"], x * np.float32(2) + np.float32(1))
    assert outputs["best"].dtype == np.int64
    np.testing.assert_array_equal(outputs["best"], x.argmax(axis=1))


def test_infer_with_a_wrong_feed_is_an_engine_error(engine):
    with pytest.raises(EngineError, match="inference failed"):
        engine.infer({"not_x": np.zeros((1, 3, 2, 2), np.float32)})
    with pytest.raises(EngineError, match="inference failed"):
        engine.infer({"x": np.zeros((1, 4, 2, 2), np.float32)})  # 4 channels, model wants 3


@pytest.mark.parametrize(
    "write",
    [
        lambda path: path.write_bytes(b"definitely not a protobuf" * 10),
        lambda path: save(custom_op_model(), path),
        lambda path: None,  # no file at all
    ],
    ids=["garbage", "custom-op", "missing"],
)
def test_unloadable_model_is_an_engine_error_naming_the_file(tmp_path, write):
    path = tmp_path / "broken.onnx"
    write(path)
    with pytest.raises(EngineError, match=f"ONNX Runtime cannot load {path}"):
        open_engine(path, CPU_ONLY)


def test_requesting_a_provider_this_build_lacks_fails_at_open(tmp_path):
    path = save(affine_argmax_model(), tmp_path / "affine.onnx")
    with pytest.raises(EngineError, match="NoSuchExecutionProvider"):
        open_engine(path, EngineSettings(providers=("NoSuchExecutionProvider",)))


# -- provider choice (pure) --------------------------------------------------------------------


def test_missing_requested_provider_names_what_is_available():
    with pytest.raises(EngineError) as caught:
        choose_providers((CUDA, CPU), ["AzureExecutionProvider", CPU], has_gpu=True)
    message = str(caught.value)
    assert f"provider(s) {CUDA} requested" in message
    assert f"offers only AzureExecutionProvider, {CPU}" in message
    assert "onnxruntime-gpu" in message


def test_requested_providers_are_used_in_the_order_given():
    available = [TRT, CUDA, CPU]
    assert choose_providers((CPU, CUDA), available, has_gpu=False) == [CPU, CUDA]


def test_gpu_providers_are_not_picked_without_a_gpu():
    assert choose_providers((), [TRT, CUDA, "AzureExecutionProvider", CPU], has_gpu=False) == [CPU]


def test_gpu_providers_are_picked_in_preference_order_with_a_gpu():
    available = ["AzureExecutionProvider", CPU, CUDA, TRT]
    assert choose_providers((), available, has_gpu=True) == [TRT, CUDA, CPU]
    assert choose_providers((), [CPU, CUDA], has_gpu=True) == [CUDA, CPU]
    assert choose_providers((), [CPU], has_gpu=True) == [CPU]


# -- session options ---------------------------------------------------------------------------


def test_session_options_set_threads_and_spinning_as_configured():
    settings = EngineSettings(intra_op_threads=3, inter_op_threads=2, allow_spinning=True,
                              graph_optimization="basic")
    options = session_options(settings, cpu_count=16)
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_default_session_options_use_every_core_without_spinning():
    options = session_options(EngineSettings(), cpu_count=6)
    assert options.intra_op_num_threads == 6
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_engine_session_runs_with_the_configured_threads(tmp_path: Path):
    path = save(affine_argmax_model(), tmp_path / "affine.onnx")
    engine = open_engine(path, EngineSettings(providers=(CPU,), intra_op_threads=2,
                                              graph_optimization="disable"))
    try:
        options = engine._session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    finally:
        engine.close()

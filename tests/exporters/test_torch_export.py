"""`sightline export`: real PyTorch models become verified bundles, or fail saying why."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporters.onnx_import import ImportOptions
from exporters.torch_export import ExportOptions, ExportResult, VerificationError, export_torch
from runtime.client import Client
from runtime.errors import BundleError
from runtime.models.bundle import Bundle
from runtime.models.preprocess import Preprocessor
from runtime.tasks.detect import DetectionDecoder
from tests.conftest import SIGHTLINE
from tests.exporters.torch_models import (
    DETECTOR_LABELS,
    SegmentAndClassify,
    TinyDetector,
)

MODELS = "tests.exporters.torch_models"
SIZE = (64, 64)  # small: export and verification stay fast; dynamic bundles run at any size
# A 640x480 frame maps 1:1 onto the detector's input (both dims are multiples of 32), so
# these are the boxes in model and in frame pixels alike: one 32x32 cell each.
SQUARES = {"bright": ((320, 160, 352, 192), (255, 255, 255)),
           "red": ((64, 288, 96, 320), (0, 0, 255))}  # BGR


def export(out: Path, model: str, task: str = "raw", labels=None, **options) -> ExportResult:
    options.setdefault("input_size", SIZE)
    bundle = ImportOptions(task=task, name=out.name, labels=labels)
    return export_torch(ExportOptions(model=model, bundle=bundle, **options), out)


def run_onnx(bundle: Bundle, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {bundle.manifest.input.name: x})


def run_torch(module: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(torch.from_numpy(x))
    values = out.values() if isinstance(out, dict) else [out]
    return [v.numpy() for v in values]


def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value
            for d in value_info.type.tensor_type.shape.dim]


def squares_frame() -> np.ndarray:
    frame = np.zeros((480, 640, 3), np.uint8)
    for (x1, y1, x2, y2), bgr in SQUARES.values():
        frame[y1:y2, x1:x2] = bgr
    return frame


def assert_squares_detected(detections, tolerance: float = 0.01, min_score: float = 0.99) -> None:
    found = {d.label: d for d in detections}
    assert sorted(found) == sorted(SQUARES), detections
    for label, (box, _) in SQUARES.items():
        assert found[label].box == pytest.approx(box, abs=tolerance)
        assert found[label].score > min_score


@pytest.fixture(scope="module")
def detector_bundle(tmp_path_factory) -> ExportResult:
    out = tmp_path_factory.mktemp("export") / "detector"
    return export(out, f"{MODELS}:tiny_detector", task="detect", labels=list(DETECTOR_LABELS))


# -- (1) a detector whose decoded output is known ------------------------------------------


def test_detector_bundle_decodes_the_squares_in_a_frame_to_labelled_boxes(detector_bundle):
    bundle = detector_bundle.bundle
    manifest = bundle.manifest
    assert manifest.task == "detect" and manifest.outputs == {"predictions": "output0"}
    assert manifest.labels == DETECTOR_LABELS
    assert manifest.source["torch_model"] == f"{MODELS}:tiny_detector"
    assert "dynamo" in manifest.source["exporter"] and manifest.source["opset"] == "18"
    (verification,) = [v for v in detector_bundle.verifications if v.stage == "bundled"]
    assert verification.passed
    assert any(label.startswith("astronaut.png") for label in verification.inputs)
    assert "random 1x3x32x96" in verification.inputs  # another spatial size
    assert "random 2x3x64x64" in verification.inputs  # another batch

    tensor, transform = Preprocessor(manifest.input, manifest.preprocess)(squares_frame(), "bgr")
    assert tensor.shape == (1, 3, 480, 640)
    (predictions,) = run_onnx(bundle, tensor)
    assert predictions.shape == (1, 4 + len(DETECTOR_LABELS), 15 * 20)
    result = DetectionDecoder(manifest)({"output0": predictions}, transform)
    assert_squares_detected(result.detections)


# -- (2) more than one output ---------------------------------------------------------------


def test_model_with_two_named_outputs_keeps_both_names_and_verifies_each(tmp_path):
    result = export(tmp_path / "segment", f"{MODELS}:segment_and_classify")
    model = onnx.load(result.bundle.onnx_path)
    assert [o.name for o in model.graph.output] == ["mask", "logits"]
    assert [o.name for o in result.verifications[-1].outputs] == ["mask", "logits"]
    x = np.random.default_rng(3).uniform(0, 1, (1, 3, 96, 128)).astype(np.float32)
    mask, logits = run_onnx(result.bundle, x)
    assert mask.shape == (1, 1, 48, 64) and logits.shape == (1, 5)
    want_mask, want_logits = run_torch(SegmentAndClassify(), x)
    np.testing.assert_allclose(mask, want_mask, atol=1e-5)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)


# -- (3) dynamic and static axes ------------------------------------------------------------


def test_dynamic_export_runs_at_other_sizes_and_batches(detector_bundle):
    bundle = detector_bundle.bundle
    model = onnx.load(bundle.onnx_path)
    assert dims(model.graph.input[0]) == ["batch", 3, "height", "width"]
    assert bundle.manifest.input.size.mode == "dynamic"
    rng = np.random.default_rng(4)
    for shape in [(2, 3, 64, 64), (1, 3, 96, 160), (3, 3, 32, 32), (1, 3, 480, 640)]:
        x = rng.uniform(0, 1, shape).astype(np.float32)
        (got,) = run_onnx(bundle, x)
        (want,) = run_torch(TinyDetector(), x)
        assert got.shape == (shape[0], 6, shape[2] // 32 * shape[3] // 32)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_static_export_fixes_the_spatial_dims_and_keeps_the_batch_free(tmp_path):
    result = export(tmp_path / "static", f"{MODELS}:tiny_detector", task="detect",
                    dynamic=False)
    size = result.bundle.manifest.input.size
    assert (size.mode, size.width, size.height) == ("fixed", 64, 64)
    model = onnx.load(result.bundle.onnx_path)
    assert dims(model.graph.input[0]) == ["batch", 3, 64, 64]
    (got,) = run_onnx(result.bundle, np.zeros((2, 3, 64, 64), np.float32))
    assert got.shape == (2, 6, 4)


# -- (4) a numerically wrong export is caught -------------------------------------------------


def test_export_that_froze_a_shape_branch_fails_naming_the_wrong_output(tmp_path,
                                                                        detector_bundle):
    out = tmp_path / "net"
    shutil.copytree(detector_bundle.bundle.directory, out)  # a good bundle already there
    with pytest.raises(VerificationError) as caught:
        export(out, f"{MODELS}:height_specialised")
    message = str(caught.value)
    assert "output 'mask'" in message and "random 1x3x32x96" in message
    assert "'features'" not in message
    assert "froze at 64x64" in message and "No bundle was written" in message
    checks = {o.name: o for o in caught.value.verification.outputs}
    assert checks["features"].passed and checks["features"].max_abs < 1e-4
    assert not checks["mask"].passed and checks["mask"].max_abs > 0.1
    assert Bundle.load(out).name == "detector"  # the previous bundle is untouched


def test_data_dependent_control_flow_is_refused_with_the_line_that_does_it(tmp_path):
    source = tmp_path / "branchy.py"
    source.write_text(
        "import torch\n\n"
        "class Branchy(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.mean() > 0.5:\n"
        "            return x * 2\n"
        "        return x\n")
    with pytest.raises(BundleError) as caught:
        export(tmp_path / "branchy", f"{source}:Branchy")
    message = str(caught.value)
    assert f"{source}:5" in message and "if x.mean() > 0.5:" in message
    assert "torch.where or torch.cond" in message


def test_unsupported_operator_is_named_in_the_error(tmp_path):
    with pytest.raises(BundleError, match="operator sightline_tests::wiggle at opset 18"):
        export(tmp_path / "custom", f"{MODELS}:custom_op_net")


# -- (5) tolerances ---------------------------------------------------------------------------


def test_tolerances_decide_whether_a_one_percent_difference_fails(tmp_path):
    model = f"{MODELS}:height_specialised_by_one_percent"
    with pytest.raises(VerificationError, match="output 'mask'"):
        export(tmp_path / "strict", model)
    relaxed = export(tmp_path / "relative", model, rtol=0.02)
    mask = {o.name: o for o in relaxed.verifications[-1].outputs}["mask"]
    assert mask.passed and mask.max_rel == pytest.approx(0.01, rel=0.01)
    assert mask.worst_input == "random 1x3x32x96"


def test_tolerance_flags_on_the_command_line(tmp_path):
    # In-process (click's runner): the one subprocess export is the end-to-end test's.
    from click.testing import CliRunner

    from runtime.cli import main

    args = ["export", f"{MODELS}:height_specialised_by_one_percent", "--task", "raw",
            "--input-size", "64x64", "--out"]
    failed = CliRunner().invoke(main, [*args, str(tmp_path / "strict"), "--rtol", "0.005"])
    assert failed.exit_code == 2, failed.output
    assert "error: verification failed" in failed.stderr and "rtol 0.005" in failed.stderr
    assert "output 'mask'" in failed.stderr and "FAIL" in failed.stderr  # table, then error
    assert not (tmp_path / "strict").exists()
    passed = CliRunner().invoke(main, [*args, str(tmp_path / "relaxed"), "--atol", "0.02"])
    assert passed.exit_code == 0, passed.stderr
    assert "bundle height_specialised_by_one_percent@1 (raw) written" in passed.stdout


# -- (6) TorchScript ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_torchscript_file_exports_like_the_module_it_was_traced_from(tmp_path):
    path = tmp_path / "detector.pt"
    torch.jit.trace(TinyDetector(), torch.rand(1, 3, 64, 64)).save(str(path))
    result = export(tmp_path / "scripted", str(path), task="detect")
    assert "TorchScript" in result.exporter
    assert result.bundle.manifest.source["torch_model"] == "detector.pt"
    assert result.verifications[-1].passed
    x = np.random.default_rng(5).uniform(0, 1, (2, 3, 96, 64)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(result.bundle, x)[0], run_torch(TinyDetector(), x)[0],
                               atol=1e-4, rtol=1e-4)


def test_a_state_dict_given_as_torchscript_says_how_to_export_it(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(TinyDetector().state_dict(), path)
    with pytest.raises(BundleError, match="is not a TorchScript file.*--weights"):
        export(tmp_path / "x", str(path))


# -- (7) a model file with a factory, and a state dict --------------------------------------

MODEL_FILE = """\
from torch import nn

from blocks import ConvReLU  # a sibling module next to this file


def build():
    net = nn.Sequential(ConvReLU())
    nn.init.zeros_(net[0].conv.weight)  # the state dict, not this, must decide the output
    nn.init.zeros_(net[0].conv.bias)
    return net
"""
BLOCKS_FILE = """\
from torch import nn


class ConvReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).relu()
"""


def test_model_file_factory_with_state_dict_weights(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    (tmp_path / "blocks.py").write_text(BLOCKS_FILE)
    weight = torch.linspace(-1, 1, 4 * 3 * 3 * 3).reshape(4, 3, 3, 3)
    bias = torch.tensor([0.1, -0.2, 0.3, 0.0])
    torch.save({"state_dict": {"0.conv.weight": weight, "0.conv.bias": bias}},
               tmp_path / "trained.pth")  # wrapped, as training checkpoints are
    result = export(tmp_path / "net", f"{tmp_path}/net.py:build",
                    weights=tmp_path / "trained.pth")
    assert result.bundle.manifest.source["weights"] == "trained.pth"
    assert str(tmp_path) not in sys.path  # only while the model was being built
    x = np.random.default_rng(6).uniform(0, 1, (1, 3, 32, 48)).astype(np.float32)
    want = torch.nn.functional.conv2d(torch.from_numpy(x), weight, bias, padding=1).relu()
    (got,) = run_onnx(result.bundle, x)
    assert np.abs(got).max() > 0.1
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    (tmp_path / "blocks.py").write_text(BLOCKS_FILE)
    torch.save({"0.conv.weight": torch.zeros(4, 3, 3, 3), "head.weight": torch.zeros(1)},
               tmp_path / "other.pth")
    with pytest.raises(BundleError) as caught:
        export(tmp_path / "net", f"{tmp_path}/net.py:build", weights=tmp_path / "other.pth")
    message = str(caught.value)
    assert "does not fit the model: missing keys: 0.conv.bias; unexpected keys: head.weight" \
        in message


# -- simplification ---------------------------------------------------------------------------


def test_simplified_graph_is_verified_as_well(tmp_path):
    result = export(tmp_path / "simple", f"{MODELS}:segment_and_classify", simplify=True)
    assert [v.stage for v in result.verifications] == ["exported", "simplified"]
    assert all(v.passed for v in result.verifications)
    assert result.bundle.manifest.source["simplifier"] == result.simplifier


def test_without_onnxsim_onnx_runtime_simplifies_to_standard_onnx(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxsim", None)  # import onnxsim -> ImportError
    result = export(tmp_path / "simple", f"{MODELS}:tiny_detector", task="detect",
                    simplify=True)
    assert result.simplifier.startswith("onnxruntime")
    model = onnx.load(result.bundle.onnx_path)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert result.verifications[-1].stage == "simplified" and result.verifications[-1].passed


# -- (8) end to end: CLI export, daemon, client ------------------------------------------------


def test_cli_export_then_serve_and_detect_the_squares(tmp_path, daemon_factory):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(DETECTOR_LABELS) + "\n")
    out = tmp_path / "tiny"
    done = subprocess.run(
        [*SIGHTLINE, "export", f"{MODELS}:tiny_detector", "--task", "detect", "--labels",
         str(labels), "--input-size", "320x320", "--name", "tiny", "--version", "2", "--out",
         str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"bundle tiny@2 (detect) written to {out}" in done.stdout
    assert "bundled graph" in done.stderr and "output0" in done.stderr  # the table

    daemon = daemon_factory("--model", str(out))
    with Client(daemon.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        frame = squares_frame()
        deadline = time.monotonic() + 5
        while client.send(frame) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        reply = client.recv(15)
    assert reply is not None and reply.kind == "result", reply
    assert reply.message["model"] == "tiny" and reply.message["model_version"] == "2"
    assert_squares_detected(reply.detections)

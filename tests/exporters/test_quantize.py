"""Precision variants: real INT8 Q/DQ and FP16 graphs that serve, keep faces, report costs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters.onnx_import import ImportOptions, import_onnx
from exporters.quantize import (
    REPORT_NAME,
    QuantizationError,
    QuantizeResult,
    match_detections,
    quantize_bundle,
)
from runtime.engines import EngineSettings, open_engine
from runtime.errors import BundleError
from runtime.models.bundle import Bundle, preferred_variant
from runtime.models.preprocess import Preprocessor
from runtime.results import Detection
from runtime.tasks import make_decoder
from tests.conftest import SIGHTLINE
from tests.onnx_models import conv_relu_model, save

RUNS = 5  # latency samples: enough to exercise the interleaved timing, cheap on 2 cores
CPU = EngineSettings(providers=("CPUExecutionProvider",))


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory, astronaut: np.ndarray) -> Path:
    """A handful of 320x240 views of the astronaut photo, as .png and .jpg."""
    directory = tmp_path_factory.mktemp("calib")
    views = [astronaut, astronaut[0:400, 50:500], cv2.flip(astronaut, 1), astronaut[100:512, 0:450]]
    for i, view in enumerate(views):
        cv2.imwrite(str(directory / f"view{i}.{'png' if i % 2 else 'jpg'}"),
                    cv2.resize(view, (320, 240)))
    return directory


@pytest.fixture(scope="module")
def centerface_int8(tmp_path_factory, centerface_bundle, calib_dir) -> QuantizeResult:
    out = tmp_path_factory.mktemp("variants") / "centerface-int8"
    return quantize_bundle(centerface_bundle, "int8", calib_dir, out, runs=RUNS)


@pytest.fixture(scope="module")
def centerface_fp16(tmp_path_factory, centerface_bundle, calib_dir) -> QuantizeResult:
    out = tmp_path_factory.mktemp("variants") / "centerface-fp16"
    return quantize_bundle(centerface_bundle, "fp16", calib_dir, out, runs=RUNS)


@pytest.fixture
def conv_bundle(tmp_path: Path) -> Bundle:
    """A small raw-task bundle: image -> Conv -> Relu."""
    source = save(conv_relu_model(), tmp_path / "conv.onnx")
    return import_onnx(source, ImportOptions(task="raw", name="conv"), tmp_path / "conv").bundle


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def faces(bundle: Bundle, image: np.ndarray) -> tuple[Detection, ...]:
    """The bundle served as the daemon serves it: preprocessing, ORT engine, task decoder."""
    engine = open_engine(bundle.onnx_path, CPU)
    try:
        tensor, transform = Preprocessor(bundle.manifest.input, bundle.manifest.preprocess)(
            image, "bgr")
        outputs = engine.infer({bundle.manifest.input.name: tensor})
    finally:
        engine.close()
    return make_decoder(bundle.manifest)(outputs, transform).detections


# -- INT8 -----------------------------------------------------------------------------------


def test_int8_graph_is_explicit_qdq_with_symmetric_per_channel_conv_weights(centerface_int8):
    model = onnx.load(str(centerface_int8.bundle.onnx_path))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    weights = initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    quantized = 0
    for conv in convs:
        dq = producers.get(conv.input[1])
        if dq is None:  # the output heads stay in float on purpose
            continue
        assert dq.op_type == "DequantizeLinear"
        weight, scale, zero = (weights[name] for name in dq.input)
        assert weight.dtype == np.int8
        assert scale.shape == (weight.shape[0],)  # one scale per output channel
        assert not zero.any()  # symmetric: TensorRT accepts zero points of 0 only
        assert {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
        quantized += 1
    assert quantized >= len(convs) - 4  # all but the (at most four) output heads
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":  # activations: int8, zero point 0
            zero = weights[node.input[2]]
            assert zero.dtype == np.int8 and not zero.any()


def test_int8_variant_is_a_bundle_that_loads_and_serves_on_onnxruntime(
        centerface_int8, centerface_bundle, astronaut):
    variant = Bundle.load(centerface_int8.bundle.directory)  # sha256 verified
    manifest, original = variant.manifest, centerface_bundle.manifest
    assert manifest.precision == "int8"
    assert (manifest.name, manifest.version, manifest.task) == (original.name, original.version,
                                                                 original.task)
    assert manifest.onnx.sha256 != original.onnx.sha256
    assert manifest.source["variant_of_sha256"] == original.onnx.sha256
    [reference], [found] = faces(centerface_bundle, astronaut), faces(variant, astronaut)
    assert match_detections([reference], [found], 0.8)


# -- FP16 -----------------------------------------------------------------------------------


def test_fp16_variant_keeps_float32_io_and_holds_float16_weights(centerface_fp16, astronaut):
    model = onnx.load(str(centerface_fp16.bundle.onnx_path))
    onnx.checker.check_model(model, full_check=True)  # includes topological order
    float32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [float32]
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {float32}
    assert {i.data_type for i in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert "Cast" in {n.op_type for n in model.graph.node}
    variant = Bundle.load(centerface_fp16.bundle.directory)
    assert variant.manifest.precision == "fp16"
    assert len(faces(variant, astronaut)) == 1


# -- the check against FP32 -----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["centerface_int8", "centerface_fp16"])
def test_centerface_variants_keep_the_astronaut_face(variant, request):
    report = request.getfixturevalue(variant).report
    boxes = report.boxes
    assert boxes.reference == 4  # one face in each of the four views
    assert boxes.recall == 1.0 and boxes.precision == 1.0
    assert boxes.mean_iou > (0.95 if report.precision == "fp16" else 0.8)


@pytest.mark.parametrize("variant", ["centerface_int8", "centerface_fp16"])
def test_report_is_written_into_the_variant_and_its_figures_are_sane(variant, request, calib_dir):
    result = request.getfixturevalue(variant)
    report = result.report
    on_disk = json.loads((result.bundle.directory / REPORT_NAME).read_text())
    assert on_disk == json.loads(json.dumps(report.to_json()))
    assert on_disk["variant"]["sha256"] == result.bundle.manifest.onnx.sha256
    assert report.evaluation.images == 4 and report.in_sample
    assert report.evaluation.directory == str(calib_dir)
    if report.precision == "int8":
        assert report.calibration.images == 4
        assert report.variant.bytes < report.source.bytes / 3  # int8 weights
    else:
        assert report.calibration is None
        assert report.variant.bytes < report.source.bytes * 0.55  # fp16 weights
    assert {o.role for o in report.outputs} == {"heatmap", "scale", "offset", "landmarks"}
    for out in report.outputs:
        assert 0 <= out.mean_abs <= out.max_abs < 5
        assert out.relative is not None and 0 <= out.relative < 1
    if report.precision == "fp16":
        assert max(o.relative for o in report.outputs) < 0.02
    lat = report.latency
    assert lat.samples == RUNS and report.provider == "CPUExecutionProvider"
    assert 0 < lat.fp32_p50_ms <= lat.fp32_p99_ms and 0 < lat.variant_p50_ms <= lat.variant_p99_ms
    assert lat.ratio_p50 == pytest.approx(lat.variant_p50_ms / lat.fp32_p50_ms)


def test_raw_task_variant_has_output_errors_but_no_box_agreement(conv_bundle, calib_dir, tmp_path):
    result = quantize_bundle(conv_bundle, "int8", calib_dir, tmp_path / "conv-int8", runs=2)
    assert result.report.boxes is None
    [output] = result.report.outputs
    assert output.relative < 0.05  # one conv, symmetric int8: a percent or so
    assert Bundle.load(result.bundle.directory).manifest.precision == "int8"


def test_images_that_do_not_decode_are_skipped_and_named(conv_bundle, calib_dir, tmp_path):
    frames = tmp_path / "frames"
    shutil.copytree(calib_dir, frames)
    (frames / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))  # header only
    report = quantize_bundle(conv_bundle, "int8", frames, tmp_path / "conv-int8", runs=1).report
    assert report.calibration.images == 4 and report.calibration.skipped == ("truncated.png",)
    assert report.evaluation.skipped == ("truncated.png",)


def test_matching_is_one_to_one_and_by_class():
    a = Detection((0, 0, 10, 10), 0.9, "a", 0)
    a_shifted = Detection((1, 0, 11, 10), 0.8, "a", 0)
    b_same_place = Detection((0, 0, 10, 10), 0.9, "b", 1)
    assert match_detections([a], [a_shifted, a]) == [1.0]
    assert match_detections([a], [b_same_place]) == []
    assert match_detections([a, b_same_place], []) == []


# -- refusals -------------------------------------------------------------------------------


def test_calibration_folder_without_readable_images_is_refused(centerface_bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QuantizationError, match="no readable images"):
        quantize_bundle(centerface_bundle, "int8", empty, tmp_path / "out")
    (empty / "notes.txt").write_text("not an image")
    (empty / "broken.jpg").write_text("not a jpeg either")
    with pytest.raises(QuantizationError, match="none readable"):
        quantize_bundle(centerface_bundle, "int8", empty, tmp_path / "out")
    with pytest.raises(QuantizationError, match="no such folder"):
        quantize_bundle(centerface_bundle, "fp16", tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_variant_is_not_quantised_again(centerface_int8, calib_dir, tmp_path):
    with pytest.raises(BundleError, match="already an int8 variant"):
        quantize_bundle(centerface_int8.bundle, "fp16", calib_dir, tmp_path / "again")


def test_an_existing_folder_that_is_not_a_variant_is_never_replaced(conv_bundle, calib_dir,
                                                                    tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    with pytest.raises(QuantizationError, match="not a bundle"):
        quantize_bundle(conv_bundle, "fp16", calib_dir, mine)
    fp32_copy = tmp_path / "conv-copy"
    shutil.copytree(conv_bundle.directory, fp32_copy)
    with pytest.raises(QuantizationError, match="another bundle"):
        quantize_bundle(conv_bundle, "fp16", calib_dir, fp32_copy)
    with pytest.raises(QuantizationError, match="source bundle itself"):
        quantize_bundle(conv_bundle, "fp16", calib_dir, conv_bundle.directory)
    assert (mine / "keep.txt").read_text() == "user data"
    assert Bundle.load(fp32_copy).manifest.precision == "fp32"


# -- the command line -----------------------------------------------------------------------


def test_cli_quantize_writes_the_variant_beside_the_bundle_and_prints_the_check(
        centerface_bundle, calib_dir, tmp_path):
    source = tmp_path / "centerface"
    shutil.copytree(centerface_bundle.directory, source)
    done = subprocess.run([*SIGHTLINE, "quantize", str(source), "--precision", "int8",
                           "--calib", str(calib_dir), "--runs", "3"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    variant = tmp_path / "centerface-int8"
    # beside the bundle, where `serve` picks a variant by the device's precision
    assert preferred_variant(Bundle.load(source), "int8").directory == variant
    report = json.loads((variant / REPORT_NAME).read_text())
    assert report["boxes"]["recall"] == 1.0
    for text in ("heatmap", "recall / precision", "latency p50 ms", "written to"):
        assert text in done.stdout


def test_cli_quantize_errors_are_one_red_line(centerface_bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    done = subprocess.run([*SIGHTLINE, "quantize", str(centerface_bundle.directory),
                           "--precision", "fp16", "--calib", str(tmp_path / "empty"),
                           "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and "no readable images" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

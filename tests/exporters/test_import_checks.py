"""`sightline import` refuses what would fail on every frame, in one line saying what to
type instead; and the per-axis input size rules a text-line model needs."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.models.bundle import InputSpec, SizePolicy
from runtime.models.preprocess import input_size
from tests.onnx_models import _model, constant_output_model, conv_relu_model, save
from tests.test_cli import run


def one_line_error(done) -> str:
    """The CLI failed with exit 2 and exactly one stderr line (no ONNX Runtime log lines)."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    (line,) = done.stderr.strip().splitlines()
    return line


def test_detect_on_a_two_class_classifier_is_refused_pointing_at_classify(tmp_path):
    model = save(constant_output_model(np.array([[0.2, 0.8]])), tmp_path / "cls.onnx")
    line = one_line_error(run("import", str(model), "--task", "detect",
                              "--out", str(tmp_path / "b")))
    assert "--task detect needs an output [N, 4+C, anchors]" in line
    assert "[1, 2]" in line and "--task classify" in line
    assert not (tmp_path / "b").exists()


def test_a_task_whose_decoder_fails_on_the_outputs_is_refused_at_import(tmp_path):
    # roles named by hand skip the shape guess: the decoder itself is tried on the outputs
    model = save(constant_output_model(np.array([[0.2, 0.8]])), tmp_path / "cls.onnx")
    line = one_line_error(run("import", str(model), "--task", "detect", "--output",
                              "predictions=output0", "--out", str(tmp_path / "b")))
    assert "--task detect cannot decode this model's outputs" in line


def test_classifier_imports_with_its_labels_in_the_manifest(tmp_path):
    model = save(constant_output_model(np.array([[0.2, 0.8]])), tmp_path / "cls.onnx")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    done = run("import", str(model), "--task", "classify", "--labels", str(labels),
               "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["labels"] == ["cat", "dog"] and manifest["outputs"] == {"scores": "output0"}


def test_gray_on_a_three_channel_model_is_refused(tmp_path):
    model = save(conv_relu_model(), tmp_path / "rgb.onnx")
    line = one_line_error(run("import", str(model), "--task", "raw", "--color", "gray",
                              "--out", str(tmp_path / "b")))
    assert "--color gray feeds 1 channel but the model's input has 3" in line


def test_an_nhwc_model_given_as_nchw_is_refused_and_found_without_the_flag(tmp_path):
    model = save(conv_relu_model(layout="NHWC", height=32, width=32), tmp_path / "nhwc.onnx")
    line = one_line_error(run("import", str(model), "--task", "raw", "--layout", "NCHW",
                              "--out", str(tmp_path / "b")))
    assert "which is NHWC" in line and "--layout NHWC" in line
    done = run("import", str(model), "--task", "raw", "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["input"]["layout"] == "NHWC"


def test_a_users_mean_for_three_channels_is_never_replaced_on_a_grey_model(tmp_path):
    model = save(conv_relu_model(channels=1), tmp_path / "grey.onnx")
    line = one_line_error(run("import", str(model), "--task", "raw", "--mean",
                              "0.485,0.456,0.406", "--out", str(tmp_path / "b")))
    assert "--mean has 3 different values (0.485,0.456,0.406)" in line
    done = run("import", str(model), "--task", "raw", "--mean", "0.5,0.5,0.5", "--std",
               "0.25,0.25,0.25", "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    preprocess = json.loads((tmp_path / "b" / "manifest.json").read_text())["preprocess"]
    assert (preprocess["color"], preprocess["mean"], preprocess["std"]) == ("gray", [0.5],
                                                                           [0.25])


def text_line_model(height: int = 48) -> onnx.ModelProto:
    """A recogniser-like model that runs only at height 48 (a per-row bias), any width."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["image", "rows"], ["biased"]),
         helper.make_node("ReduceMean", ["biased"], ["columns"], axes=[1, 2], keepdims=0)],
        "text_line",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, height, "width"])],
        [helper.make_tensor_value_info("columns", TensorProto.FLOAT, [1, "width"])],
        initializer=[numpy_helper.from_array(
            np.linspace(0, 1, height, dtype=np.float32).reshape(1, 1, height, 1), "rows")])
    return _model(graph)


def test_fixed_height_with_dynamic_width_imports_a_text_line_model(tmp_path):
    model = save(text_line_model(), tmp_path / "line.onnx")
    # without flags: the height fixed in the file stays fixed (not rounded to 64)
    done = run("import", str(model), "--task", "raw", "--out", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    size = json.loads((tmp_path / "a" / "manifest.json").read_text())["input"]["size"]
    assert (size["mode"], size["height"], size["width"]) == ("dynamic", 48, None)
    line = one_line_error(run("import", str(model), "--task", "raw", "--fixed-height", "64",
                              "--out", str(tmp_path / "c")))
    assert "input height is fixed at 48 but --fixed-height 64" in line
    done = run("import", str(model), "--task", "raw", "--fixed-height", "48", "--multiple-of",
               "16", "--out", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    size = json.loads((tmp_path / "b" / "manifest.json").read_text())["input"]["size"]
    assert (size["mode"], size["height"], size["width"]) == ("dynamic", 48, None)
    spec = InputSpec(name="image", size=SizePolicy.model_validate(size))
    assert input_size(spec, 300, 60) == (240, 48)  # a wide crop: scaled to 48 high
    assert input_size(spec, 50, 20) == (128, 48)  # a small crop: scaled up to 48 high
    assert input_size(spec, 8000, 48) == (1920, 48)  # capped at the maximum width


def test_fixed_width_with_dynamic_height_and_upscaling():
    spec = InputSpec(name="x", size=SizePolicy(mode="dynamic", width=64, multiple_of=8,
                                               max_height=512))
    assert input_size(spec, 32, 100) == (64, 200)
    grow = InputSpec(name="x", size=SizePolicy(mode="dynamic", upscale=True, max_width=640,
                                               max_height=480))
    assert input_size(grow, 100, 50) == (640, 320)  # small crops scaled up to the maximum
    plain = InputSpec(name="x", size=SizePolicy(mode="dynamic", max_width=640, max_height=480))
    assert input_size(plain, 100, 50) == (128, 64)  # the default: fed near their own size


def test_old_manifests_keep_their_size_behaviour_and_serialisation():
    size = SizePolicy(mode="dynamic")
    assert "upscale" not in size.model_dump()
    assert input_size(InputSpec(name="x", size=size), 640, 480) == (640, 480)

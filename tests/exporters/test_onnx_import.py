"""ONNX import: real exporter defects are repaired, unusable models are refused with a reason."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporters.onnx_import import ImportOptions, ImportResult, import_onnx
from runtime.errors import BundleError
from runtime.models.assets import CENTERFACE_ONNX, fetch_asset
from runtime.models.bundle import Bundle, Preprocess, SizePolicy, Thresholds
from tests.onnx_models import (
    CONV_OUT_CHANNELS,
    affine_argmax_model,
    branch_on_initializer_model,
    constant_output_model,
    conv_pool_model,
    conv_reference,
    conv_relu_model,
    custom_op_model,
    probability_map_model,
    save,
    sequence_input_model,
    two_input_model,
)


def do_import(tmp_path: Path, model: onnx.ModelProto, task: str = "raw", name: str = "imported",
              **options) -> ImportResult:
    source = save(model, tmp_path / "source.onnx")
    return import_onnx(source, ImportOptions(task=task, name=name, **options), tmp_path / "bundle")


def run(bundle: Bundle, feed: np.ndarray) -> list[np.ndarray]:
    """The bundle's ONNX file in a plain ONNX Runtime session."""
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {bundle.manifest.input.name: feed})


def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value
            for d in value_info.type.tensor_type.shape.dim]


def image(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


# -- repairs ------------------------------------------------------------------------------------


def test_initializers_listed_as_inputs_are_removed_and_ir_raised(tmp_path):
    legacy = conv_relu_model(ir_version=3, opset=8, initializers_as_inputs=True,
                             batch=10, height=32, width=32)
    assert [i.name for i in legacy.graph.input] == ["image", "W", "B"]
    result = do_import(tmp_path, legacy)
    model = onnx.load(result.bundle.onnx_path)
    assert model.ir_version == 4
    assert [i.name for i in model.graph.input] == ["image"]
    assert {i.name for i in model.graph.initializer} == {"W", "B"}
    assert result.repairs[:2] == [
        "removed 2 initializers listed as graph inputs",
        "raised IR version to 4 (needed for initializers that are not inputs)",
    ]
    x = image(1, 3, 32, 32)
    np.testing.assert_allclose(run(result.bundle, x)[0], conv_reference(x), atol=1e-5)


def test_initializer_inputs_of_a_newer_ir_are_removed_without_touching_the_ir(tmp_path):
    result = do_import(tmp_path, conv_relu_model(initializers_as_inputs=True))
    model = onnx.load(result.bundle.onnx_path)
    assert model.ir_version == 8
    assert [i.name for i in model.graph.input] == ["image"]
    assert "removed 2 initializers listed as graph inputs" in result.repairs
    assert not any("IR version" in r for r in result.repairs)


def test_frozen_batch_and_spatial_dims_become_dynamic_and_run_at_other_sizes(tmp_path):
    result = do_import(tmp_path, conv_relu_model(batch=10, height=32, width=32))
    assert "made input dims dynamic (were batch=10, height=32, width=32)" in result.repairs
    assert result.bundle.manifest.input.size.mode == "dynamic"
    model = onnx.load(result.bundle.onnx_path)
    assert dims(model.graph.input[0]) == ["batch", 3, "height", "width"]
    for shape in [(1, 3, 48, 80), (2, 3, 64, 32), (1, 3, 32, 32)]:
        x = image(*shape)
        (features,) = run(result.bundle, x)
        assert features.shape == (shape[0], CONV_OUT_CHANNELS, *shape[2:])
        np.testing.assert_allclose(features, conv_reference(x), atol=1e-5)


def test_frozen_classifier_with_global_pooling_runs_at_other_sizes(tmp_path):
    result = do_import(tmp_path, conv_pool_model(batch=10, height=32, width=32))
    model = onnx.load(result.bundle.onnx_path)
    assert dims(model.graph.input[0]) == ["batch", 3, "height", "width"]
    assert dims(model.graph.output[0])[1] == CONV_OUT_CHANNELS
    x = image(1, 3, 96, 64)
    (logits,) = run(result.bundle, x)
    np.testing.assert_allclose(logits, conv_reference(x, relu=False).mean(axis=(2, 3)),
                               atol=1e-5)


def test_nhwc_input_gets_its_own_axes_freed(tmp_path):
    result = do_import(tmp_path, conv_relu_model(layout="NHWC", batch=4, height=32, width=32),
                       layout="NHWC")
    model = onnx.load(result.bundle.onnx_path)
    assert dims(model.graph.input[0]) == ["batch", "height", "width", 3]
    assert result.bundle.manifest.input.layout == "NHWC"
    x = image(1, 40, 56, 3)
    np.testing.assert_allclose(run(result.bundle, x)[0],
                               conv_reference(x.transpose(0, 3, 1, 2)), atol=1e-5)


def test_missing_value_info_is_added_by_shape_inference(tmp_path):
    model = conv_relu_model()
    assert len(model.graph.value_info) == 0
    result = do_import(tmp_path, model)
    inferred = {vi.name: vi for vi in onnx.load(result.bundle.onnx_path).graph.value_info}
    assert list(inferred) == ["conv"]
    assert inferred["conv"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(inferred["conv"])[:2] == ["batch", CONV_OUT_CHANNELS]
    assert "added shape information for 1 tensors" in result.repairs


def test_value_info_recorded_at_the_frozen_size_is_recomputed(tmp_path):
    result = do_import(tmp_path, conv_relu_model(batch=10, height=32, width=32, value_info=True))
    (conv,) = onnx.load(result.bundle.onnx_path).graph.value_info
    assert dims(conv)[:2] == ["batch", CONV_OUT_CHANNELS]
    assert 32 not in dims(conv)
    x = image(1, 3, 64, 96)
    np.testing.assert_allclose(run(result.bundle, x)[0], conv_reference(x), atol=1e-5)


def test_unused_initializers_are_removed(tmp_path):
    result = do_import(tmp_path, conv_relu_model(unused_initializer=True))
    model = onnx.load(result.bundle.onnx_path)
    assert {i.name for i in model.graph.initializer} == {"W", "B"}
    assert "removed 1 initializers no node uses" in result.repairs


def test_initializers_read_only_inside_subgraphs_are_kept(tmp_path):
    result = do_import(tmp_path, branch_on_initializer_model())
    model = onnx.load(result.bundle.onnx_path)
    assert {i.name for i in model.graph.initializer} == {"flag", "then_gain", "else_gain"}
    assert not any("no node uses" in r for r in result.repairs)
    x = image(1, 3, 32, 64)
    np.testing.assert_allclose(run(result.bundle, x)[0], 3 * x, rtol=1e-6)


def test_imported_bundle_is_verified_and_records_its_source(tmp_path):
    result = do_import(tmp_path, conv_relu_model(batch=10, height=32, width=32))
    bundle = Bundle.load(result.bundle.directory)
    assert bundle.manifest == result.bundle.manifest
    source = (tmp_path / "source.onnx").read_bytes()
    assert bundle.manifest.source == {"file": "source.onnx",
                                      "sha256": hashlib.sha256(source).hexdigest()}
    assert (bundle.name, bundle.version, bundle.manifest.task) == ("imported", "1", "raw")
    onnx.checker.check_model(onnx.load(bundle.onnx_path), full_check=True)


def test_one_channel_model_gets_gray_preprocessing(tmp_path):
    result = do_import(tmp_path, conv_relu_model(channels=1))
    pre = result.bundle.manifest.preprocess
    assert (pre.color, pre.mean, pre.std) == ("gray", (0.0,), (1.0,))
    assert (pre.scale, pre.resize) == (1 / 255, "letterbox")  # the rest of the defaults kept
    x = image(1, 1, 32, 64)
    np.testing.assert_allclose(run(result.bundle, x)[0], conv_reference(x), atol=1e-5)


# -- fixed size ---------------------------------------------------------------------------------


def test_fixed_size_keeps_spatial_dims_and_frees_only_the_batch(tmp_path):
    result = do_import(tmp_path, conv_relu_model(batch=10, height=32, width=32), dynamic=False)
    assert result.bundle.manifest.input.size == SizePolicy(mode="fixed", height=32, width=32)
    assert "made input dims dynamic (were batch=10)" in result.repairs
    model = onnx.load(result.bundle.onnx_path)
    assert dims(model.graph.input[0]) == ["batch", 3, 32, 32]
    x = image(1, 3, 32, 32)
    np.testing.assert_allclose(run(result.bundle, x)[0], conv_reference(x), atol=1e-5)
    with pytest.raises(Exception, match="(?i)invalid dimensions"):
        run(result.bundle, image(1, 3, 64, 64))


def test_explicit_fixed_size_matching_the_model_is_used(tmp_path):
    size = SizePolicy(mode="fixed", height=32, width=48)
    result = do_import(tmp_path, conv_relu_model(batch=10, height=32, width=48),
                       dynamic=False, size=size)
    assert result.bundle.manifest.input.size == size
    assert dims(onnx.load(result.bundle.onnx_path).graph.input[0]) == ["batch", 3, 32, 48]


def test_fixed_size_for_a_model_with_free_dims_is_taken_as_given(tmp_path):
    size = SizePolicy(mode="fixed", height=64, width=96)
    result = do_import(tmp_path, conv_relu_model(), dynamic=False, size=size)
    assert result.bundle.manifest.input.size == size
    assert run(result.bundle, image(1, 3, 64, 96))[0].shape == (1, CONV_OUT_CHANNELS, 64, 96)


def test_fixed_size_other_than_the_models_frozen_size_is_refused(tmp_path):
    size = SizePolicy(mode="fixed", height=64, width=64)
    with pytest.raises(BundleError, match=r"fixed at 32x32 but a fixed size of 64x64"):
        do_import(tmp_path, conv_relu_model(height=32, width=32), dynamic=False, size=size)


def test_fixed_size_without_fixed_dims_or_a_size_is_refused(tmp_path):
    with pytest.raises(BundleError, match="spatial dims are not fixed"):
        do_import(tmp_path, conv_relu_model(), dynamic=False)


# -- task defaults and outputs ----------------------------------------------------------------


def test_detect_model_gets_its_output_role_and_numbered_labels(tmp_path):
    result = do_import(tmp_path, constant_output_model(np.zeros((1, 4 + 3, 20))), task="detect")
    manifest = result.bundle.manifest
    assert manifest.outputs == {"predictions": "output0"}
    assert manifest.labels == ("class0", "class1", "class2")
    assert manifest.preprocess == Preprocess(color="rgb", scale=1 / 255, resize="letterbox")
    assert manifest.thresholds == Thresholds(score=0.25, iou=0.45)


def test_given_labels_and_thresholds_win_over_the_defaults(tmp_path):
    thresholds = Thresholds(score=0.6, iou=0.5, max_detections=7)
    result = do_import(tmp_path, constant_output_model(np.zeros((1, 6, 20))), task="detect",
                       labels=["cat", "dog"], thresholds=thresholds)
    assert result.bundle.manifest.labels == ("cat", "dog")
    assert result.bundle.manifest.thresholds == thresholds


def test_detect_model_with_several_outputs_is_refused(tmp_path):
    with pytest.raises(BundleError, match=r"needs one output .*; it has \['scaled', 'best'\]"):
        do_import(tmp_path, affine_argmax_model(), task="detect")


def test_face_outputs_that_cannot_be_told_apart_are_refused(tmp_path):
    with pytest.raises(BundleError, match="cannot tell which face output is which"):
        do_import(tmp_path, conv_relu_model(), task="face")


def test_output_role_naming_a_missing_tensor_is_refused(tmp_path):
    with pytest.raises(BundleError, match=r"\['nope'\] are not outputs of the model"):
        do_import(tmp_path, conv_relu_model(), outputs={"logits": "nope"})


def test_resize_to_source_is_recorded_for_a_spatial_output(tmp_path):
    bundle = do_import(tmp_path, probability_map_model(), resize_to_source=("prob",)).bundle
    assert bundle.manifest.resize_to_source == ("prob",)


def test_resize_to_source_naming_a_missing_output_is_refused(tmp_path):
    with pytest.raises(BundleError, match=r"--resize-to-source names \['map'\] are not outputs"):
        do_import(tmp_path, probability_map_model(), resize_to_source=("map",))


def test_resize_to_source_of_an_output_that_is_not_a_map_is_refused(tmp_path):
    with pytest.raises(BundleError, match="logits: its shape .* has no \\(H, W\\) dims|"
                                          "logits: shape .* is not a \\(..., H, W\\) map"):
        do_import(tmp_path, conv_pool_model(), resize_to_source=("logits",))
    assert not (tmp_path / "bundle").exists()


def test_resize_to_source_for_a_task_other_than_raw_is_refused(tmp_path):
    with pytest.raises(BundleError, match="resize_to_source: .* expected none"):
        do_import(tmp_path, conv_relu_model(), task="detect", resize_to_source=("features",),
                  outputs={"predictions": "features"})


# -- refusals -----------------------------------------------------------------------------------


def test_file_that_is_not_onnx_is_refused(tmp_path):
    path = tmp_path / "photo.onnx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is a picture, not a model" * 8)
    with pytest.raises(BundleError, match="is not a readable ONNX model"):
        import_onnx(path, ImportOptions(task="raw", name="x"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(BundleError, match="no such file"):
        import_onnx(tmp_path / "absent.onnx", ImportOptions(task="raw", name="x"), tmp_path / "o")


def test_model_with_two_real_inputs_is_refused_naming_them(tmp_path):
    with pytest.raises(BundleError, match="exactly one image input, the model has: image, bias"):
        do_import(tmp_path, two_input_model())


def test_model_with_a_3d_input_is_refused(tmp_path):
    with pytest.raises(BundleError, match="input 'tokens' is not 4-D"):
        do_import(tmp_path, sequence_input_model())


def test_model_with_an_op_onnx_runtime_lacks_is_refused(tmp_path):
    with pytest.raises(BundleError, match="ONNX Runtime cannot load the model.*FancyUpsample"):
        do_import(tmp_path, custom_op_model())
    assert not (tmp_path / "bundle").exists()


def test_model_with_non_finite_output_is_refused(tmp_path):
    values = np.zeros((1, 6, 4), np.float32)
    values[0, 2, 1] = np.inf
    with pytest.raises(BundleError, match="output 'output0' is not finite"):
        do_import(tmp_path, constant_output_model(values))


def test_bad_bundle_name_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="(?s)cannot make a bundle manifest.*name"):
        do_import(tmp_path, conv_relu_model(), name="my model")


# -- the real CenterFace file ------------------------------------------------------------------


def test_centerface_bundle_maps_output_roles_and_has_dynamic_dims(centerface_bundle):
    manifest = centerface_bundle.manifest
    assert manifest.outputs == {"heatmap": "537", "scale": "538", "offset": "539",
                                "landmarks": "540"}
    assert manifest.input.size.mode == "dynamic"
    model = onnx.load(centerface_bundle.onnx_path)
    (image_input,) = model.graph.input
    assert image_input.name == manifest.input.name == "input.1"
    assert dims(image_input) == ["batch", 3, "height", "width"]


def test_centerface_bundle_runs_in_onnx_runtime_at_640x480(centerface_bundle):
    outputs = dict(zip(["537", "538", "539", "540"],
                       run(centerface_bundle, image(1, 3, 480, 640, seed=1) * 255), strict=True))
    assert {name: value.shape for name, value in outputs.items()} == {
        "537": (1, 1, 120, 160), "538": (1, 2, 120, 160),
        "539": (1, 2, 120, 160), "540": (1, 10, 120, 160)}
    assert all(np.all(np.isfinite(v)) for v in outputs.values())
    assert outputs["537"].min() >= 0 and outputs["537"].max() <= 1  # a sigmoid heatmap


def test_centerface_file_carries_the_real_world_defects_and_they_are_repaired(tmp_path):
    source = fetch_asset(CENTERFACE_ONNX, show_progress=False)
    result = import_onnx(source, ImportOptions(task="face", name="centerface"), tmp_path / "cf")
    repairs = "\n".join(result.repairs)
    assert "initializers listed as graph inputs" in repairs
    assert "initializers no node uses" in repairs
    assert "made input dims dynamic (were batch=10, height=32, width=32)" in repairs
    assert "added shape information" in repairs
    assert result.bundle.manifest.outputs["heatmap"] == "537"

"""Fused engines: the bundle's preprocessing and box decoding inside the ONNX graph agree
with the Python reference, through real ONNX Runtime sessions, and a disagreeing graph is
caught before it serves."""

from __future__ import annotations

import hashlib
import logging

import cv2
import numpy as np
import onnx
import pytest

from runtime.daemon.inference import FrameJob, LoadedModel, infer, prepare
from runtime.engines import EngineSettings
from runtime.fusion.compose import FusionUnavailable, compose, prefix_only
from runtime.fusion.graph import GraphWriter
from runtime.fusion.open import FusedEngine, fused_bundle, open_serving_engine
from runtime.fusion.parity import FusionMismatch, check_fusion
from runtime.fusion.prefix import FRAME, build_prefix
from runtime.models.bundle import (
    Bundle,
    InputSpec,
    Manifest,
    OnnxFile,
    Preprocess,
    SizePolicy,
    Thresholds,
    write_bundle,
)
from runtime.protocol import FrameHeader
from tests.onnx_models import constant_output_model, conv_relu_model


def _bundle(directory, model: onnx.ModelProto, *, task="raw", input_name="image",
            layout="NCHW", size=None, preprocess=None, outputs=None, labels=(),
            thresholds=None) -> Bundle:
    data = model.SerializeToString()
    manifest = Manifest(
        name=f"m{abs(hash(str(directory))) % 10_000}", version="1", task=task,
        input=InputSpec(name=input_name, layout=layout,
                        size=size or SizePolicy(mode="fixed", width=96, height=64)),
        preprocess=preprocess or Preprocess(), outputs=outputs or {}, labels=labels,
        thresholds=thresholds or Thresholds(),
        onnx=OnnxFile(sha256=hashlib.sha256(data).hexdigest()))
    return write_bundle(directory, manifest, data)


def _detector(directory, **kwargs) -> Bundle:
    """A detect-task bundle whose model outputs fixed YOLO-style predictions with many
    overlapping boxes of three classes (the decoding is what is under test)."""
    rng = np.random.default_rng(3)
    anchors = 600
    centre = np.stack([rng.uniform(0, 96, anchors), rng.uniform(0, 64, anchors),
                       rng.uniform(4, 40, anchors), rng.uniform(4, 30, anchors)])
    predictions = np.concatenate([centre, rng.random((3, anchors)) ** 3])[None]
    model = constant_output_model(predictions, output="preds", input_shape=(1, 3, 64, 96))
    return _bundle(directory, model, task="detect", outputs={"predictions": "preds"},
                   labels=("cat", "dog", "cup"), **kwargs)


@pytest.mark.parametrize("resize_in_graph", [False, True], ids=["host-resize", "graph-resize"])
def test_centerface_fused_graph_matches_python_preprocessing_and_decoding(
        centerface_bundle, resize_in_graph, tmp_path):
    fused, spec = fused_bundle(centerface_bundle, resize_in_graph=resize_in_graph,
                               root=tmp_path)
    report = spec.report
    assert spec.decodes and report.frames == 4
    assert report.preprocess_max_error <= report.preprocess_tolerance
    if not resize_in_graph:
        assert report.preprocess_max_error == 0.0  # the same uint8 pixels, the same float ops
    assert report.boxes_compared >= 100  # the synthetic maps really exercise NMS and top-K
    assert report.worst_iou >= 0.99 and report.worst_score_error <= 1e-4
    inputs = [i.name for i in onnx.load(str(fused.onnx_path)).graph.input]
    assert inputs[0] == FRAME and centerface_bundle.manifest.input.name not in inputs


@pytest.mark.parametrize("size", [(640, 480), (512, 512), (1280, 720), (333, 251)])
def test_fused_centerface_finds_the_same_face_as_the_python_path(centerface_bundle, astronaut,
                                                                 size):
    python = LoadedModel.of(centerface_bundle,
                            open_serving_engine(centerface_bundle, EngineSettings(fused="off")))
    engine = open_serving_engine(centerface_bundle, EngineSettings())
    assert isinstance(engine, FusedEngine)
    fused = LoadedModel.of(centerface_bundle, engine)
    frame = cv2.resize(astronaut, size)
    results = []
    for model in (python, fused):
        feeds, transform = model.frames.feeds(frame, "bgr")
        results.append(model.frames.decode(model.engine.infer(feeds), transform))
    want, got = results
    assert len(want.detections) == len(got.detections) >= 1
    for a, b in zip(want.detections, got.detections, strict=True):
        assert b.box == pytest.approx(a.box, abs=0.05)
        assert b.score == pytest.approx(a.score, abs=1e-4)
        assert np.allclose(b.landmarks, a.landmarks, atol=0.05)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
@pytest.mark.parametrize("resize_in_graph,cast_first", [(False, False), (False, True),
                                                        (True, True)],
                         ids=["host-resize", "host-resize-cast-first", "graph-resize"])
def test_raw_model_fused_preprocessing_matches_python(tmp_path, layout, resize,
                                                      resize_in_graph, cast_first):
    model = conv_relu_model(height=64, width=96, layout=layout)
    bundle = _bundle(tmp_path / "b", model, layout=layout,
                     preprocess=Preprocess(color="rgb", scale=1 / 255, mean=(0.485, 0.456, 0.406),
                                           std=(0.229, 0.224, 0.225), resize=resize,
                                           pad_value=100))
    fused, spec = fused_bundle(bundle, resize_in_graph=resize_in_graph, cast_first=cast_first,
                               root=tmp_path / "fused")
    assert not spec.decodes
    assert spec.report.preprocess_max_error <= spec.report.preprocess_tolerance


def test_gray_model_takes_colour_and_gray_frames(tmp_path):
    model = conv_relu_model(height=64, width=96, channels=1)
    bundle = _bundle(tmp_path / "b", model,
                     preprocess=Preprocess(color="gray", mean=(0.5,), std=(0.25,)))
    engine = open_serving_engine(bundle, EngineSettings())
    assert isinstance(engine, FusedEngine)
    python = LoadedModel.of(bundle, open_serving_engine(bundle, EngineSettings(fused="off")))
    fused = LoadedModel.of(bundle, engine)
    frame = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (100, 150, 3), np.uint8),
                             (0, 0), 2)
    for image, color in ((frame, "bgr"), (cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), "gray")):
        want = python.engine.infer(python.frames.feeds(image, color)[0])
        got = fused.engine.infer(fused.frames.feeds(image, color)[0])
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=1e-4)


def test_detector_fused_nms_keeps_the_python_decoders_boxes_classes_and_order(tmp_path):
    bundle = _detector(tmp_path / "b", thresholds=Thresholds(score=0.3, iou=0.5,
                                                             max_detections=25))
    python = LoadedModel.of(bundle, open_serving_engine(bundle, EngineSettings(fused="off")))
    engine = open_serving_engine(bundle, EngineSettings())
    assert isinstance(engine, FusedEngine) and engine.fusion.decodes
    assert {o.name for o in engine.outputs} >= {"sightline_boxes", "sightline_scores"}
    fused = LoadedModel.of(bundle, engine)
    frame = np.full((120, 200, 3), 80, np.uint8)
    results = []
    for model in (python, fused):
        feeds, transform = model.frames.feeds(frame, "bgr")
        results.append(model.frames.decode(model.engine.infer(feeds), transform))
    want, got = results
    assert len(want.detections) == 25  # cut to max_detections after suppression
    assert [d.label for d in got.detections] == [d.label for d in want.detections]
    for a, b in zip(want.detections, got.detections, strict=True):
        assert b.box == pytest.approx(a.box, abs=1e-3)
        assert b.score == pytest.approx(a.score, abs=1e-6)


def _prefix_with_the_wrong_scale(manifest: Manifest) -> onnx.ModelProto:
    """A plausible fusion bug: pixels scaled to [0, 1] for a model that takes [0, 255]."""
    wrong = manifest.model_copy(update={"preprocess": manifest.preprocess.model_copy(
        update={"scale": 1 / 255})})
    return prefix_only(wrong, resize_in_graph=False)


def test_a_fused_graph_that_disagrees_with_the_python_reference_is_caught(centerface_bundle,
                                                                          tmp_path, caplog):
    bad = _prefix_with_the_wrong_scale(centerface_bundle.manifest)
    with pytest.raises(FusionMismatch, match="preprocessing differs from the Python reference"):
        fused_bundle(centerface_bundle, resize_in_graph=False, root=tmp_path, prefix=bad)
    assert not any(tmp_path.iterdir())  # nothing unchecked is left in the cache

    def fuse(bundle, **kwargs):
        return fused_bundle(bundle, root=tmp_path, prefix=bad, **kwargs)

    with pytest.raises(FusionMismatch):  # OTA validation: the update is refused
        open_serving_engine(centerface_bundle, EngineSettings(), strict=True, fuse=fuse)
    with caplog.at_level(logging.WARNING):  # start-up: the Python steps serve instead
        engine = open_serving_engine(centerface_bundle, EngineSettings(), fuse=fuse)
    assert not isinstance(engine, FusedEngine)
    assert "serving with the Python steps" in caplog.text


def test_a_decoder_that_disagrees_is_caught_too(tmp_path):
    bundle = _detector(tmp_path / "b")
    model = compose(onnx.load(str(bundle.onnx_path)), bundle.manifest, resize_in_graph=False,
                    decode=True)
    looser = bundle.manifest.model_copy(update={"thresholds": Thresholds(iou=0.9)})
    wrong = compose(onnx.load(str(bundle.onnx_path)), looser, resize_in_graph=False,
                    decode=True)
    check_fusion(bundle, model, resize_in_graph=False)
    with pytest.raises(FusionMismatch, match="in-graph decoding"):
        check_fusion(bundle, wrong, resize_in_graph=False)


def test_the_fused_model_is_cached_under_a_key_that_covers_the_recipe(centerface_bundle,
                                                                      tmp_path):
    first, a = fused_bundle(centerface_bundle, resize_in_graph=False, root=tmp_path)
    again, b = fused_bundle(centerface_bundle, resize_in_graph=False, root=tmp_path)
    assert again.directory == first.directory and a.digest == b.digest
    _, graph = fused_bundle(centerface_bundle, resize_in_graph=True, root=tmp_path)
    stricter = Bundle(centerface_bundle.directory, centerface_bundle.manifest.model_copy(
        update={"thresholds": Thresholds(score=0.7, iou=0.3)}))
    _, other = fused_bundle(stricter, resize_in_graph=False, root=tmp_path)
    assert len({a.digest, graph.digest, other.digest}) == 3
    assert first.manifest.source["fused_from"] == centerface_bundle.manifest.onnx.sha256
    # a restart trusts what passed; an OTA validation (recheck) checks the cached one again
    bad = _prefix_with_the_wrong_scale(centerface_bundle.manifest)
    _, trusted = fused_bundle(centerface_bundle, resize_in_graph=False, root=tmp_path,
                              recheck=False, prefix=bad)
    assert trusted.report == a.report
    with pytest.raises(FusionMismatch):
        fused_bundle(centerface_bundle, resize_in_graph=False, root=tmp_path, prefix=bad)
    # a damaged cache entry is rebuilt, not served
    (first.directory / first.manifest.onnx.file).write_bytes(b"garbage")
    rebuilt, _ = fused_bundle(centerface_bundle, resize_in_graph=False, root=tmp_path)
    assert Bundle.load(rebuilt.directory).manifest.onnx.sha256 == first.manifest.onnx.sha256


def test_fused_frames_batch_into_one_call_with_per_frame_results(centerface_bundle, astronaut):
    engine = open_serving_engine(centerface_bundle, EngineSettings())
    model = LoadedModel.of(centerface_bundle, engine, buffers=6)
    frames = [cv2.resize(astronaut, (640, 480)), np.zeros((480, 640, 3), np.uint8),
              cv2.resize(astronaut[:, ::-1], (640, 480))]

    def job(image: np.ndarray, seq: int) -> FrameJob:
        header = FrameHeader(seq=seq, capture_ts=0.0, width=640, height=480, encoding="bgr8")
        return FrameJob(header, image.tobytes(), 0.0)

    prepared = [prepare(model, b"c%d" % i, job(f, i), 0.0) for i, f in enumerate(frames)]
    together = infer(prepared)
    alone = [infer([p])[0] for p in prepared]
    assert [len(r.detections) for r in together] == [1, 0, 1]
    for a, b in zip(alone, together, strict=True):
        assert np.allclose([d.box for d in a.detections], [d.box for d in b.detections])


def test_a_model_fusion_cannot_lift_is_served_with_the_python_steps(tmp_path, caplog):
    model = conv_relu_model(height=64, width=96, opset=19)
    bundle = _bundle(tmp_path / "b", model)
    with pytest.raises(FusionUnavailable, match="opset 19"):
        fused_bundle(bundle, resize_in_graph=False, root=tmp_path / "fused")
    with caplog.at_level(logging.INFO):
        engine = open_serving_engine(bundle, EngineSettings())
    assert not isinstance(engine, FusedEngine) and "run in Python" in caplog.text


def test_prefix_builder_emits_only_what_the_manifest_needs():
    identity = Manifest(name="m", version="1", task="raw",
                        input=InputSpec(name="x", size=SizePolicy(mode="fixed", width=8,
                                                                  height=8)),
                        preprocess=Preprocess(scale=1.0), onnx=OnnxFile(sha256="0" * 64))
    w = GraphWriter("pre")
    build_prefix(w, identity, resize_in_graph=False)
    assert [n.op_type for n in w.nodes] == ["Transpose", "Gather", "Cast", "Identity"]


def test_a_tensorrt_profile_for_a_fused_bundle_names_the_uint8_frame(centerface_bundle, tmp_path):
    from runtime.models.engine_cache import derive_profile

    fused, spec = fused_bundle(centerface_bundle, resize_in_graph=False, decode=False,
                               cast_first=True, root=tmp_path)
    assert not spec.decodes  # native TensorRT: Python decoding (no output allocator for NMS)
    ((name, lo, opt, hi),) = derive_profile(fused.manifest, (640, 480), max_batch=2)
    assert (name, lo, opt, hi) == ("sightline_frame", (1, 32, 32, 1), (1, 480, 640, 3),
                                   (2, 1088, 1920, 3))
    first = onnx.load(str(fused.onnx_path)).graph.node[0]
    assert first.op_type == "Cast"  # before any layer TensorRT would have to run on uint8


def _pointwise_conv_model(pads: int) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    kernel = 1 if pads == 0 else 3
    weight = rng.uniform(-1, 1, (4, 3, kernel, kernel)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "W", "B"], ["features"], pads=[pads] * 4)],
        "conv", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 96])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 4, 64, 96])],
        initializer=[numpy_helper.from_array(weight, "W"),
                     numpy_helper.from_array(np.full(4, 0.25, np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("pads,left", [(0, []), (1, ["Add"])],
                         ids=["unpadded-folds-gain-and-bias", "padded-folds-gain-only"])
def test_normalisation_folds_into_the_first_convolution(tmp_path, pads, left):
    bundle = _bundle(tmp_path / "b", _pointwise_conv_model(pads),
                     preprocess=Preprocess(color="rgb", scale=1 / 255, mean=(0.485, 0.456, 0.406),
                                           std=(0.229, 0.224, 0.225)))
    fused, spec = fused_bundle(bundle, resize_in_graph=False, root=tmp_path / "fused")
    prefix_ops = [n.op_type for n in onnx.load(str(fused.onnx_path)).graph.node
                  if n.name.startswith("sightline_pre")]
    assert [op for op in prefix_ops if op in ("Mul", "Add")] == left
    # the composition check compared the folded model with the model on the Python tensor
    python = LoadedModel.of(bundle, open_serving_engine(bundle, EngineSettings(fused="off")))
    served = LoadedModel.of(bundle, open_serving_engine(bundle, EngineSettings()))
    frame = cv2.GaussianBlur(np.random.default_rng(2).integers(0, 256, (64, 96, 3), np.uint8),
                             (0, 0), 1)
    want = python.engine.infer(python.frames.feeds(frame, "bgr")[0])["features"]
    got = served.engine.infer(served.frames.feeds(frame, "bgr")[0])["features"]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_the_gain_folds_through_an_average_pool_into_the_convolution(tmp_path):
    from runtime.tools.fast_model import fast_model_bytes

    model = onnx.load_from_string(fast_model_bytes(96, 64))
    bundle = _bundle(tmp_path / "b", model, preprocess=Preprocess(color="rgb", scale=1 / 255))
    fused, spec = fused_bundle(bundle, resize_in_graph=False, root=tmp_path / "fused")
    ops = [n.op_type for n in onnx.load(str(fused.onnx_path)).graph.node]
    assert ops == ["Transpose", "Gather", "Cast", "Identity", "AveragePool", "Conv"]
    assert spec.report.frames == 4  # and the composition check passed on the folded model


def test_an_unwritable_cache_serves_the_python_steps_with_the_reason(centerface_bundle,
                                                                    tmp_path, caplog):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory should be")
    with pytest.raises(FusionUnavailable, match="cannot be cached"):
        fused_bundle(centerface_bundle, resize_in_graph=False, root=blocked)

    def fuse(bundle, **kwargs):
        return fused_bundle(bundle, root=blocked, **kwargs)

    with caplog.at_level(logging.INFO):
        engine = open_serving_engine(centerface_bundle, EngineSettings(), fuse=fuse)
    assert not isinstance(engine, FusedEngine) and "SIGHTLINE_CACHE_DIR" in caplog.text

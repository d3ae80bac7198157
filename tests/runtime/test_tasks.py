"""Task decoders: CenterFace maps and YOLOv8 predictions to source-frame boxes; raw as is."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from runtime.engines import EngineSettings, open_engine
from runtime.errors import EngineError
from runtime.models.bundle import InputSpec, Manifest, OnnxFile, Preprocess, SizePolicy, Thresholds
from runtime.models.preprocess import FrameTransform, Preprocessor
from runtime.results import Detection, TaskResult
from runtime.tasks import make_decoder
from runtime.tasks.detect import DetectionDecoder
from runtime.tasks.face import FaceDecoder
from runtime.tasks.raw import RawDecoder
from tests.onnx_models import constant_output_model, save

FACE_OUTPUTS = {"heatmap": "537", "scale": "538", "offset": "539", "landmarks": "540"}


def manifest(task: str, outputs: dict[str, str], *, width: int = 64, height: int = 64,
             labels: tuple[str, ...] = (), resize: str = "stretch",
             thresholds: Thresholds | None = None) -> Manifest:
    return Manifest(
        name="test", version="1", task=task,
        input=InputSpec(name="image", size=SizePolicy(mode="fixed", width=width, height=height)),
        preprocess=Preprocess(resize=resize), outputs=outputs, labels=labels,
        thresholds=thresholds or Thresholds(),
        onnx=OnnxFile(sha256="0" * 64),
    )


def identity(width: int, height: int) -> FrameTransform:
    return FrameTransform(1.0, 1.0, 0.0, 0.0, width, height, width, height)


# -- CenterFace ------------------------------------------------------------------------------

LANDMARKS_YX = np.array([0.30, 0.25, 0.30, 0.75, 0.55, 0.50, 0.80, 0.30, 0.80, 0.70])


class FaceMaps:
    """CenterFace outputs for a 64x64 input (16x16 cells at stride 4), faces placed by hand."""

    def __init__(self, cells: int = 16) -> None:
        self.cells = cells
        self.heatmap = np.zeros((1, 1, cells, cells), np.float32)
        self.scale = np.zeros((1, 2, cells, cells), np.float32)
        self.offset = np.zeros((1, 2, cells, cells), np.float32)
        self.landmarks = np.zeros((1, 10, cells, cells), np.float32)

    def face(self, row: int, col: int, score: float, height: float, width: float,
             offset_yx: tuple[float, float] = (0.0, 0.0)) -> FaceMaps:
        self.heatmap[0, 0, row, col] = score
        self.scale[0, :, row, col] = (math.log(height / 4), math.log(width / 4))
        self.offset[0, :, row, col] = offset_yx
        self.landmarks[0, :, row, col] = LANDMARKS_YX
        return self

    @property
    def outputs(self) -> dict[str, np.ndarray]:
        return dict(zip(FACE_OUTPUTS.values(),
                        (self.heatmap, self.scale, self.offset, self.landmarks), strict=True))


def expected_face(row: int, col: int, height: float, width: float, offset_yx=(0.0, 0.0),
                  size: int = 64):
    """The reference CenterFace decode (Star-Clouds/CenterFace `decode`) for one cell."""
    cx = (col + offset_yx[1] + 0.5) * 4
    cy = (row + offset_yx[0] + 0.5) * 4
    x1, y1 = min(max(0.0, cx - width / 2), size), min(max(0.0, cy - height / 2), size)
    box = (x1, y1, min(x1 + width, size), min(y1 + height, size))
    points = [(LANDMARKS_YX[2 * j + 1] * width + x1, LANDMARKS_YX[2 * j] * height + y1)
              for j in range(5)]
    return box, points


def assert_face(detection: Detection, box, points, score: float) -> None:
    assert detection.box == pytest.approx(box, abs=1e-4)
    assert detection.score == pytest.approx(score)
    assert detection.label == "face"
    assert len(detection.landmarks) == 5
    for got, want in zip(detection.landmarks, points, strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_face_peak_becomes_the_centerface_box_and_landmarks():
    maps = FaceMaps().face(5, 7, 0.9, height=24, width=20, offset_yx=(0.25, -0.1))
    result = FaceDecoder(manifest("face", FACE_OUTPUTS))(maps.outputs, identity(64, 64))
    (face,) = result.detections
    box, points = expected_face(5, 7, 24, 20, (0.25, -0.1))
    assert box == pytest.approx((19.6, 11.0, 39.6, 35.0))  # the formula, worked by hand
    assert_face(face, box, points, 0.9)


def test_neighbouring_duplicate_peak_is_suppressed_but_a_distant_face_is_kept():
    maps = (FaceMaps()
            .face(5, 7, 0.9, height=24, width=20)
            .face(5, 8, 0.7, height=24, width=20)  # IoU 0.67 with the first: suppressed
            .face(12, 2, 0.6, height=16, width=12))
    result = FaceDecoder(manifest("face", FACE_OUTPUTS))(maps.outputs, identity(64, 64))
    assert [d.score for d in result.detections] == pytest.approx([0.9, 0.6])
    assert_face(result.detections[0], *expected_face(5, 7, 24, 20), 0.9)
    assert_face(result.detections[1], *expected_face(12, 2, 16, 12), 0.6)


def test_overlap_under_the_iou_threshold_keeps_both_faces():
    maps = (FaceMaps()
            .face(5, 7, 0.9, height=8, width=8)
            .face(5, 8, 0.8, height=8, width=8))  # IoU 1/3: kept at 0.4, not at 0.3
    thresholds = Thresholds(score=0.5, iou=0.4)
    result = FaceDecoder(manifest("face", FACE_OUTPUTS, thresholds=thresholds))(
        maps.outputs, identity(64, 64))
    assert len(result.detections) == 2


@pytest.mark.parametrize(("score", "found"), [(0.49, False), (0.5, False), (0.51, True)])
def test_face_score_must_exceed_the_threshold(score, found):
    maps = FaceMaps().face(8, 8, score, height=16, width=16)
    result = FaceDecoder(manifest("face", FACE_OUTPUTS))(maps.outputs, identity(64, 64))
    assert len(result.detections) == int(found)


def test_no_face_gives_an_empty_result():
    result = FaceDecoder(manifest("face", FACE_OUTPUTS))(FaceMaps().outputs, identity(64, 64))
    assert result == TaskResult()


def test_face_boxes_map_back_through_a_stretch_transform():
    # A 160x96 frame stretched to 64x64: x scaled by 0.4, y by 2/3.
    transform = Preprocessor(manifest("face", FACE_OUTPUTS).input, Preprocess(resize="stretch"))(
        np.zeros((96, 160, 3), np.uint8), "bgr")[1]
    assert (transform.scale_x, transform.scale_y) == (0.4, 64 / 96)
    maps = FaceMaps().face(5, 7, 0.9, height=24, width=20, offset_yx=(0.25, -0.1))
    (face,) = FaceDecoder(manifest("face", FACE_OUTPUTS))(maps.outputs, transform).detections
    (x1, y1, x2, y2), points = expected_face(5, 7, 24, 20, (0.25, -0.1))
    sx, sy = 1 / 0.4, 96 / 64
    assert face.box == pytest.approx((x1 * sx, y1 * sy, x2 * sx, y2 * sy), abs=1e-3)
    for got, (px, py) in zip(face.landmarks, points, strict=True):
        assert got == pytest.approx((px * sx, py * sy), abs=1e-3)


def test_face_at_the_frame_edge_stays_inside_the_frame():
    maps = FaceMaps().face(0, 15, 0.9, height=40, width=40)
    (face,) = FaceDecoder(manifest("face", FACE_OUTPUTS))(maps.outputs, identity(64, 64)).detections
    x1, y1, x2, y2 = face.box
    assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64


def test_face_detections_are_capped_at_max_detections():
    maps = FaceMaps()
    for i, col in enumerate(range(1, 16, 3)):  # five separate faces, descending scores
        maps.face(8, col, 0.95 - i * 0.05, height=8, width=8)
    thresholds = Thresholds(score=0.5, iou=0.3, max_detections=3)
    result = FaceDecoder(manifest("face", FACE_OUTPUTS, thresholds=thresholds))(
        maps.outputs, identity(64, 64))
    assert [d.score for d in result.detections] == pytest.approx([0.95, 0.9, 0.85])


# -- YOLOv8 detection --------------------------------------------------------------------------

LABELS = ("person", "cup", "dog")
# (cx, cy, w, h, class, score) in 640x640 input pixels; every other class scores 0.05.
ANCHORS = [
    (320, 320, 100, 50, 0, 0.90),  # person
    (325, 320, 100, 50, 1, 0.80),  # cup on the person box: other class, kept
    (330, 322, 100, 50, 0, 0.70),  # same person again: suppressed
    (500, 100, 40, 40, 2, 0.20),  # dog under the score threshold
    (100, 200, 40, 60, 2, 0.60),  # dog
    (600, 450, 20, 20, 0, 0.26),  # small person just over the threshold
]


def predictions() -> np.ndarray:
    values = np.full((1, 4 + len(LABELS), len(ANCHORS)), 0.05, np.float32)
    for i, (cx, cy, w, h, class_id, score) in enumerate(ANCHORS):
        values[0, :4, i] = (cx, cy, w, h)
        values[0, 4 + class_id, i] = score
    return values


def source_box(index: int) -> tuple[float, float, float, float]:
    """Anchor `index` on a 1280x720 frame letterboxed into 640x640: scale 0.5, 140 px bars."""
    cx, cy, w, h = ANCHORS[index][:4]
    return ((cx - w / 2) / 0.5, (cy - h / 2 - 140) / 0.5,
            (cx + w / 2) / 0.5, (cy + h / 2 - 140) / 0.5)


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory) -> Path:
    return save(constant_output_model(predictions(), output="output0"),
                tmp_path_factory.mktemp("detect") / "yolo.onnx")


def detect(detector_path: Path, thresholds: Thresholds, labels=LABELS) -> TaskResult:
    """A 1280x720 frame through the real pipeline stages: preprocess, ORT, decode."""
    spec = manifest("detect", {"predictions": "output0"}, width=640, height=640, labels=labels,
                    resize="letterbox", thresholds=thresholds)
    frame = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    tensor, transform = Preprocessor(spec.input, spec.preprocess)(frame, "bgr")
    engine = open_engine(detector_path, EngineSettings(intra_op_threads=1))
    try:
        outputs = engine.infer({"image": tensor})
    finally:
        engine.close()
    np.testing.assert_array_equal(outputs["output0"], predictions())
    return make_decoder(spec)(outputs, transform)


def test_detections_are_labelled_source_pixel_boxes_after_class_aware_nms(detector_path):
    result = detect(detector_path, Thresholds(score=0.25, iou=0.45))
    expected = [(0, "person", 0), (1, "cup", 1), (4, "dog", 2), (5, "person", 0)]
    assert [(d.label, d.class_id) for d in result.detections] == [e[1:] for e in expected]
    for detection, (index, _, _) in zip(result.detections, expected, strict=True):
        assert detection.box == pytest.approx(source_box(index), abs=1e-3)
        assert detection.score == pytest.approx(ANCHORS[index][5])
        assert detection.landmarks == ()
    assert result.detections[0].box == pytest.approx((540.0, 310.0, 740.0, 410.0))


def test_higher_score_threshold_drops_weaker_detections(detector_path):
    result = detect(detector_path, Thresholds(score=0.65, iou=0.45))
    assert [d.label for d in result.detections] == ["person", "cup"]


def test_iou_threshold_above_the_overlap_keeps_the_same_class_duplicate(detector_path):
    result = detect(detector_path, Thresholds(score=0.5, iou=0.95))
    assert [d.score for d in result.detections] == pytest.approx([0.9, 0.8, 0.7, 0.6])


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_max_detections_keeps_the_best_after_suppression(detector_path, limit):
    # With 3, the suppressed duplicate (0.7) must not take the dog's place.
    result = detect(detector_path, Thresholds(score=0.25, iou=0.45, max_detections=limit))
    assert [d.score for d in result.detections] == pytest.approx([0.9, 0.8, 0.6][:limit])


def test_class_without_a_label_is_named_by_its_index(detector_path):
    result = detect(detector_path, Thresholds(score=0.5, iou=0.45), labels=("person",))
    assert [d.label for d in result.detections] == ["person", "class1", "class2"]


def test_nothing_over_the_threshold_gives_an_empty_result():
    values = predictions()
    values[0, 4:] = 0.1
    decoder = DetectionDecoder(manifest("detect", {"predictions": "p"}, labels=LABELS))
    assert decoder({"p": values}, identity(640, 640)) == TaskResult()


def test_malformed_detector_output_is_an_engine_error():
    decoder = DetectionDecoder(manifest("detect", {"predictions": "p"}))
    with pytest.raises(EngineError, match=r"expected \[4 \+ classes, anchors\]"):
        decoder({"p": np.zeros((1, 4, 100), np.float32)}, identity(640, 640))


# -- raw ---------------------------------------------------------------------------------------


def test_raw_task_returns_every_output_tensor_as_is():
    outputs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2])}
    result = RawDecoder(manifest("raw", {}))(outputs, identity(64, 64))
    assert result.detections == ()
    assert result.tensors.keys() == outputs.keys()
    assert all(result.tensors[name] is outputs[name] for name in outputs)


def test_raw_task_result_carries_the_frames_transform():
    transform = FrameTransform(0.5, 0.5, 0.0, 4.0, 128, 112, 64, 64)
    result = RawDecoder(manifest("raw", {}))({"map": np.ones((1, 1, 16, 16), np.float32)},
                                             transform)
    assert result.transform is transform and result.in_source == frozenset()


def test_raw_task_resizes_only_the_outputs_the_bundle_names_back_to_the_source_frame():
    transform = FrameTransform(0.5, 0.5, 0.0, 4.0, 128, 112, 64, 64)
    wanted = manifest("raw", {}).model_copy(update={"resize_to_source": ("map",)})
    outputs = {"map": np.ones((1, 2, 32, 32), np.float32), "logits": np.ones((1, 5), np.float32)}
    result = RawDecoder(wanted)(outputs, transform)
    assert result.tensors["map"].shape == (1, 2, 112, 128)
    assert result.tensors["logits"] is outputs["logits"]
    assert result.in_source == {"map"}


def test_raw_task_with_named_outputs_returns_only_those():
    outputs = {"a": np.zeros(3), "b": np.ones(2)}
    result = make_decoder(manifest("raw", {"logits": "b"}))(outputs, identity(64, 64))
    assert list(result.tensors) == ["b"] and result.tensors["b"] is outputs["b"]


@pytest.mark.parametrize(("task", "outputs", "decoder"), [
    ("face", FACE_OUTPUTS, FaceDecoder),
    ("detect", {"predictions": "p"}, DetectionDecoder),
    ("raw", {}, RawDecoder),
])
def test_manifest_task_picks_its_decoder(task, outputs, decoder):
    assert isinstance(make_decoder(manifest(task, outputs)), decoder)

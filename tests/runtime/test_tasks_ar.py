"""The AR task decoders: classify (top-k with confidence), segment (a source-sized mask sent
as PNG), landmarks (points in source pixels) and SSD anchors (MediaPipe's palm/face)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import BundleError
from runtime.models.bundle import (
    Anchors,
    InputSpec,
    Manifest,
    OnnxFile,
    Preprocess,
    SizePolicy,
    Thresholds,
)
from runtime.models.preprocess import FrameTransform
from runtime.protocol import decode_reply, encode_result
from runtime.results import Classification, Detection, Mask, TaskResult
from runtime.tasks import default_roles, make_decoder
from runtime.tasks.ssd import anchor_centres


def manifest(task: str, outputs: dict[str, str], *, labels=(), layout="NHWC", size=64,
             thresholds: Thresholds | None = None, **extra) -> Manifest:
    return Manifest(name="t", version="1", task=task, input=InputSpec(
        name="x", layout=layout, size=SizePolicy(mode="fixed", width=size, height=size)),
        preprocess=Preprocess(), outputs=outputs, labels=labels,
        thresholds=thresholds or Thresholds(),
        onnx=OnnxFile(sha256="0" * 64), **extra)


# letterboxed: a 200x100 frame in a 64x64 input, scale 0.32, 16 px bands top and bottom
LETTERBOX = FrameTransform(0.32, 0.32, 0.0, 16.0, 200, 100, 64, 64)


def test_classify_turns_logits_into_confidences_with_labels_best_first():
    decode = make_decoder(manifest("classify", {"scores": "s"}, labels=("cat", "dog", "owl"),
                                   thresholds=Thresholds(score=0.0, max_detections=2)))
    result = decode({"s": np.array([[1.0, 3.0, 2.0]])}, LETTERBOX)
    assert [c.label for c in result.classes] == ["dog", "owl"]
    expected = np.exp([3.0, 2.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    assert [c.score for c in result.classes] == pytest.approx(expected)


def test_classify_keeps_probabilities_as_they_are_and_applies_the_score_floor():
    decode = make_decoder(manifest("classify", {"scores": "s"},
                                   thresholds=Thresholds(score=0.25, max_detections=5)))
    result = decode({"s": np.array([[0.1, 0.7, 0.2]])}, LETTERBOX)
    assert result.classes == (Classification("class1", pytest.approx(0.7), 1),)


def test_classify_refuses_a_model_without_a_score_vector():
    with pytest.raises(BundleError, match="--task classify needs one output of class scores"):
        default_roles("classify", {"a": (1, 8, 8, 3)})


def test_segment_mask_covers_the_source_frame_and_survives_the_wire():
    probability = np.zeros((1, 64, 64, 1), np.float32)
    probability[0, 16:48, 0:32, 0] = 1.0  # the left half of the content
    decode = make_decoder(manifest("segment", {"mask": "m"}, labels=("person",)))
    mask = decode({"m": probability}, LETTERBOX).mask
    assert mask.values.shape == (100, 200) and mask.values.dtype == np.uint8
    assert mask.values[2:-2, :95].min() == 255 and mask.values[:, 105:].max() == 0
    back = Mask.from_wire(mask.to_wire())
    np.testing.assert_array_equal(back.values, mask.values)
    assert len(mask.to_wire()["data"]) < mask.values.size / 20  # PNG: compact


def test_segment_logits_get_a_sigmoid_and_classes_an_argmax():
    logits = np.full((1, 64, 64, 1), -10.0, np.float32)
    decode = make_decoder(manifest("segment", {"mask": "m"}))
    assert decode({"m": logits}, LETTERBOX).mask.values.max() == 0
    scores = np.zeros((1, 3, 64, 64), np.float32)
    scores[0, 2, 16:48, 32:] = 5.0
    classes = make_decoder(manifest("segment", {"mask": "m"}, layout="NCHW"))(
        {"m": scores}, LETTERBOX).mask
    assert classes.kind == "classes"
    assert classes.values[50, 150] == 2 and classes.values[50, 20] == 0


def test_landmarks_map_points_to_source_with_presence_and_handedness():
    points = np.array([[[10.0, 16.0, 0.0], [42.0, 48.0, 0.5]]]).reshape(1, 6)
    decode = make_decoder(manifest("landmarks", {"points": "p", "presence": "h",
                                                 "handedness": "s"},
                                   labels=("Left", "Right"), skeleton=((0, 1),)))
    result = decode({"p": points, "h": np.array([[0.9]]), "s": np.array([[0.8]])}, LETTERBOX)
    (hand,) = result.detections
    assert hand.label == "Right" and hand.score == pytest.approx(0.9)
    assert hand.landmarks == (pytest.approx((31.25, 0.0)), pytest.approx((131.25, 100.0)))
    assert result.skeleton == ((0, 1),)
    absent = decode({"p": points, "h": np.array([[0.1]]), "s": np.array([[0.8]])}, LETTERBOX)
    assert absent.detections == ()


def test_ssd_anchor_grids_match_mediapipes_palm_and_face_detectors():
    assert len(anchor_centres(Anchors(), 192, 192)) == 2016  # palm_detection_full
    assert len(anchor_centres(Anchors(), 128, 128)) == 896  # face_detection_short_range
    centres = anchor_centres(Anchors(), 192, 192)
    assert tuple(centres[0]) == (4.0, 4.0) and tuple(centres[2]) == (12.0, 4.0)
    assert tuple(centres[1152]) == (8.0, 8.0)  # stride-16 grid, 6 anchors per cell


def test_ssd_decodes_box_and_keypoints_as_offsets_from_the_anchor():
    raw = np.zeros((1, 896, 8), np.float32)
    logits = np.full((1, 896, 1), -20.0, np.float32)
    index = 16 * 5 * 2 + 3 * 2  # stride 8, row 5, column 3: centre (28, 44)
    raw[0, index] = [2.0, -4.0, 20.0, 10.0, 1.0, 1.0, -1.0, -1.0]
    logits[0, index] = 3.0
    decode = make_decoder(manifest("ssd", {"boxes": "b", "scores": "c"}, size=128,
                                   labels=("palm",), anchors=Anchors(keypoints=2)))
    identity = FrameTransform(1.0, 1.0, 0.0, 0.0, 128, 128, 128, 128)
    (palm,) = decode({"b": raw, "c": logits}, identity).detections
    assert palm.box == pytest.approx((20.0, 35.0, 40.0, 45.0))
    assert palm.landmarks == ((29.0, 45.0), (27.0, 43.0))
    assert palm.score == pytest.approx(1 / (1 + np.exp(-3.0)))


def test_new_result_fields_reach_the_reply_and_read_back():
    child = Detection((1, 2, 3, 4), 0.9, "Right", landmarks=((1.0, 2.0),),
                      landmark_scores=(0.5,))
    face = Detection((0, 0, 10, 10), 0.8, "face", classes=(Classification("happy", 0.99, 3),),
                     children=(child,))
    result = TaskResult(detections=(face,), classes=(Classification("dog", 0.7, 1),),
                        skeleton=((0, 1),), detector_skipped=True)
    from runtime.protocol import FrameHeader

    header = FrameHeader(seq=1, capture_ts=0.0, width=10, height=10, encoding="bgr8")
    message = decode_reply(encode_result(header, "m", "1", result, {}, 0))
    assert Detection.from_wire(message["detections"][0]) == face
    assert message["classes"][0]["label"] == "dog" and message["skeleton"] == [[0, 1]]
    assert message["detector_skipped"] is True

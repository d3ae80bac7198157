"""The cascade's re-run policy on tracker ids, and its refusals, with the real emotion model
as the second stage (the first stage's results are given: the policy is what is tested)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.config import CascadeSettings
from runtime.daemon.cascade import Cascade, crop_for
from runtime.daemon.inference import FrameJob, LoadedModel, Prepared
from runtime.engines import open_engine
from runtime.errors import ConfigError
from runtime.protocol import FrameHeader
from runtime.results import Detection, TaskResult

FACE = (178.0, 82.0, 271.0, 175.0)


@pytest.fixture
def emotion(tflite_bundles):
    bundle = tflite_bundles["emotion"]
    engine = open_engine(bundle.onnx_path)
    yield LoadedModel.of(bundle, engine)
    engine.close()


def frame(image: np.ndarray, seq: int) -> Prepared:
    header = FrameHeader(seq=seq, capture_ts=seq / 30, width=image.shape[1],
                         height=image.shape[0], encoding="bgr8")
    return Prepared(None, b"client", FrameJob(header, b"", 0.0), np.zeros(1), None, {}, image,
                    None)


def run(cascade: Cascade, image, boxes_per_frame):
    replies = []
    for seq, boxes in enumerate(boxes_per_frame):
        detections = tuple(Detection(box, 0.9, "face") for box in boxes)
        (result,) = cascade.infer([frame(image, seq)],
                                  lambda group, d=detections: [TaskResult(detections=d)])
        replies.append(result)
    return replies


def test_second_stage_reruns_on_new_tracks_growth_and_every_n_frames(emotion, astronaut):
    cascade = Cascade(CascadeSettings(on="face", run="emotion", margin=0.0, every=4,
                                      rerun_growth=0.2), emotion)
    grown = (FACE[0] - 15, FACE[1] - 15, FACE[2] + 15, FACE[3] + 15)  # area +70%
    results = run(cascade, astronaut, [[FACE]] * 6 + [[grown]])
    # frame 0: new track; 1-3 reuse; 4: the 4th frame since; 5 reuse; 6: the box grew
    assert (cascade.counters.child_runs, cascade.counters.child_reused) == (3, 4)
    assert all(r.detections[0].classes[0].label == "happy" for r in results)


def test_labels_and_minimum_size_choose_the_objects(emotion, astronaut):
    cascade = Cascade(CascadeSettings(on="face", run="emotion", labels=("face",),
                                      min_size=50), emotion)
    (result,) = cascade.infer([frame(astronaut, 0)], lambda group: [TaskResult(detections=(
        Detection(FACE, 0.9, "face"), Detection((0, 0, 30, 30), 0.9, "face"),
        Detection((300, 300, 400, 400), 0.9, "hand")))])
    assert [bool(d.classes) for d in result.detections] == [True, False, False]
    assert cascade.counters.child_runs == 1


def test_a_detector_bundle_cannot_be_a_second_stage(tflite_bundles):
    bundle = tflite_bundles["palm-detection"]
    engine = open_engine(bundle.onnx_path)
    try:
        with pytest.raises(ConfigError, match="'ssd' bundle cannot be a second stage"):
            Cascade(CascadeSettings(on="x", run="palm"), LoadedModel.of(bundle, engine))
    finally:
        engine.close()


def test_crop_rotation_turns_the_keypoint_line_upright():
    # keypoint 0 -> 1 points right (+x): the crop's up axis must point along +x
    crop = crop_for((0, 0, 100, 100), ((50, 50), (90, 50)), 0.0, 0.0, (0, 1))
    matrix = crop.to_source((100, 100))
    top_centre = matrix @ np.array([50, 0, 1.0])  # the crop's top edge, middle
    assert top_centre == pytest.approx((100.0, 50.0))

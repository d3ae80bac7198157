"""MediaPipe's and fer's models through a real `sightline serve` and the client SDK:
person segmentation, a classifier's labels, and the two cascades AR apps are built from
(palm -> hand landmarks with ROI tracking, face -> emotion)."""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from runtime.client import Client
from runtime.daemon.cascade import crop_for
from runtime.tools.hand_scene import draw_hand

HAND_CASCADE = """models = ["{palm}"]
[[cascades]]
on = "palm-detection"
run = "{hand}"
margin = 0.8
shift_y = -0.5
rotate_from = [0, 2]
{roi}
"""
ROI = "track_roi = 0.5\nroi_margin = 0.5\nroi_shift_y = -0.1\nroi_rotate_from = [0, 9]"


def serve(daemon_factory, tmp_path, config: str):
    path = tmp_path / "serve.toml"
    path.write_text(config)
    return daemon_factory("--config", str(path))


def ask(client: Client, image: np.ndarray, ts: float = 0.0):
    assert client.wait_connected(10)
    client.send(image, capture_ts=ts)
    reply = client.recv(timeout=30)
    assert reply is not None and reply.ok, reply and reply.error
    return reply


def session(bundle) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])


def test_selfie_segmentation_mask_matches_onnx_runtime_and_covers_the_astronaut(
        tflite_bundles, daemon_factory, short_tmp, astronaut):
    bundle = tflite_bundles["selfie-segmentation"]
    daemon = daemon_factory("--model", str(bundle.directory))
    with Client(daemon.endpoint) as client:
        mask = ask(client, astronaut).mask()
    assert mask is not None and mask.values.shape == astronaut.shape[:2]
    # the reference: ONNX Runtime on the same (square: no letterbox) input, by hand
    feed = (cv2.resize(astronaut, (256, 256))[:, :, ::-1] / 255.0).astype(np.float32)[None]
    probability = session(bundle).run(None, {bundle.manifest.input.name: feed})[0][0, :, :, 0]
    reference = cv2.resize(probability, (512, 512), interpolation=cv2.INTER_LINEAR) > 0.5
    served = mask.probability() > 0.5
    iou = (served & reference).sum() / (served | reference).sum()
    assert iou >= 0.98, iou
    person = mask.probability()
    assert person[300:500, 100:400].mean() > 0.9  # the suit
    assert person[60:180, 160:300].mean() > 0.7  # the face
    assert person[20:100, 400:500].mean() < 0.05  # the background, top right


def test_classifier_reply_carries_labels_and_confidence(tflite_bundles, daemon_factory,
                                                         astronaut):
    daemon = daemon_factory("--model", str(tflite_bundles["emotion"].directory))
    with Client(daemon.endpoint) as client:
        reply = ask(client, np.ascontiguousarray(astronaut[82:175, 178:271]))
    best = reply.classes[0]
    assert (best.label, best.class_id) == ("happy", 3) and best.score >= 0.99
    assert len(reply.classes) == 3  # the bundle's top-k


def test_face_detector_then_emotion_classifier_on_the_astronaut(
        tflite_bundles, daemon_factory, short_tmp, astronaut):
    config = (f'models = ["{tflite_bundles["face-detection-short"].directory}"]\n'
              "[[cascades]]\n"
              'on = "face-detection-short"\n'
              f'run = "{tflite_bundles["emotion"].directory}"\n'
              "margin = 0.0\n")
    daemon = serve(daemon_factory, short_tmp, config)
    with Client(daemon.endpoint) as client:
        reply = ask(client, astronaut)
    (face,) = reply.detections
    assert face.label == "face" and face.score > 0.8
    assert face.classes[0].label == "happy" and face.classes[0].score >= 0.99


def direct_hand_run(tflite_bundles, image: np.ndarray) -> np.ndarray:
    """Palm detection then hand landmarks with ONNX Runtime sessions and no daemon: the
    letterbox, the anchor decoding and the crop done here, the same geometry the cascade
    uses (crop_for), so any difference is the serving path's."""
    from runtime.models.preprocess import FrameTransform
    from runtime.tasks import make_decoder

    palm_bundle, hand_bundle = tflite_bundles["palm-detection"], tflite_bundles["hand-landmarks"]
    height, width = image.shape[:2]
    ratio = 192 / max(width, height)
    new_w, new_h = round(width * ratio), round(height * ratio)
    pad_x, pad_y = (192 - new_w) // 2, (192 - new_h) // 2
    canvas = np.zeros((192, 192, 3), np.uint8)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = cv2.resize(image, (new_w, new_h))
    feed = (canvas[:, :, ::-1] / 255.0).astype(np.float32)[None]
    outputs = dict(zip(["Identity", "Identity_1"], session(palm_bundle).run(None, {
        "input_1": feed}), strict=True))
    transform = FrameTransform(new_w / width, new_h / height, pad_x, pad_y, width, height,
                               192, 192)
    (palm,) = make_decoder(palm_bundle.manifest)(outputs, transform).detections
    to_source = crop_for(palm.box, palm.landmarks, 0.8, -0.5, (0, 2)).to_source((224, 224))
    crop = cv2.warpAffine(image, to_source, (224, 224),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    feed = (crop[:, :, ::-1] / 255.0).astype(np.float32)[None]
    points = session(hand_bundle).run(["Identity"], {"input_1": feed})[0].reshape(21, 3)
    return points[:, :2] @ to_source[:, :2].T + to_source[:, 2]


def test_palm_detector_then_hand_landmarks_on_a_synthetic_hand(
        tflite_bundles, daemon_factory, short_tmp):
    image, silhouette = draw_hand()
    config = HAND_CASCADE.format(palm=tflite_bundles["palm-detection"].directory,
                                 hand=tflite_bundles["hand-landmarks"].directory, roi="")
    daemon = serve(daemon_factory, short_tmp, config)
    with Client(daemon.endpoint) as client:
        reply = ask(client, image)
    (palm,) = reply.detections
    assert palm.label == "palm" and palm.score > 0.8
    (hand,) = palm.children
    assert hand.score > 0.5 and len(hand.landmarks) == 21
    points = np.array(hand.landmarks)
    assert all(silhouette[int(y), int(x)] for x, y in points), points
    assert np.abs(points - direct_hand_run(tflite_bundles, image)).max() <= 3.0
    assert len(reply.skeleton) == 0 or max(max(pair) for pair in reply.skeleton) == 20


@pytest.mark.parametrize("roi", [True, False], ids=["roi-tracking", "detector-every-frame"])
def test_hand_roi_tracking_skips_the_palm_detector_on_a_steady_sequence(
        tflite_bundles, daemon_factory, short_tmp, roi):
    image, silhouette = draw_hand()
    config = HAND_CASCADE.format(palm=tflite_bundles["palm-detection"].directory,
                                 hand=tflite_bundles["hand-landmarks"].directory,
                                 roi=ROI if roi else "")
    daemon = serve(daemon_factory, short_tmp, config)
    detector_runs = 0
    with Client(daemon.endpoint) as client:
        for i in range(100):
            reply = ask(client, image, ts=i / 30)
            detector_runs += not reply.detector_skipped
            (palm,) = reply.detections
            (hand,) = palm.children
            points = np.array(hand.landmarks)
            assert all(silhouette[int(y), int(x)] for x, y in points), (i, points)
    assert detector_runs <= 10 if roi else detector_runs == 100


@pytest.mark.parametrize("task", ["hands", "segment", "emotion"])
def test_demo_task_streams_and_writes_what_each_ar_task_found(tflite_bundles, tmp_path, task):
    import json

    from tests.test_cli import run

    done = run("demo", "--task", task, "--frames", "8", "--fps", "8", "--out",
               str(tmp_path / "out"), timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").open()]
    results = [r for r in records if r["kind"] == "result"]
    assert len(results) >= 7  # one skipped frame is tolerated on a busy machine
    if task == "hands":
        assert all(len(r["detections"][0]["children"][0]["landmarks"]) == 21 for r in results)
        assert sum(r.get("detector_skipped", False) for r in results) >= len(results) - 2
    elif task == "segment":
        assert all(r["mask"]["width"] == 640 and r["mask"]["height"] == 480 for r in results)
    else:
        assert all(r["detections"][0]["classes"][0]["label"] == "happy" for r in results)
    assert cv2.imread(str(tmp_path / "out" / "strip.jpg")) is not None

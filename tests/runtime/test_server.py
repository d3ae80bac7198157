"""End-to-end: `sightline serve` as a separate process, real sockets, the real CenterFace model."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from runtime.client import Client, query_info
from runtime.protocol import STAGES


def _one(client: Client, timeout: float = 10.0):
    reply = client.recv(timeout)
    assert reply is not None, "no reply from the daemon"
    return reply


def _send(client: Client, image: np.ndarray, **kwargs) -> int:
    assert client.wait_connected(10), "client never connected"
    deadline = time.monotonic() + 5
    while (seq := client.send(image, **kwargs)) is None:
        assert time.monotonic() < deadline, "in-flight window never freed"
        time.sleep(0.005)
    return seq


def test_astronaut_face_comes_back_with_box_and_five_landmarks(daemon, astronaut_640x480):
    with Client(daemon.endpoint, max_in_flight=1) as client:
        seq = _send(client, astronaut_640x480)
        reply = _one(client)
    assert reply.kind == "result", reply.message
    assert reply.seq == seq
    assert reply.message["model"] == "centerface" and reply.message["model_version"] == "1.5.0"
    (face,) = reply.detections
    x1, y1, x2, y2 = face.box
    # The astronaut's face, measured on the photograph (512x512) and scaled to 640x480.
    assert 200 < x1 < 260 and 30 < y1 < 80 and 310 < x2 < 360 and 150 < y2 < 200
    assert face.score > 0.8
    assert len(face.landmarks) == 5
    for x, y in face.landmarks:
        assert x1 <= x <= x2 and y1 <= y <= y2
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0]
    assert nose[1] < (mouth_left[1] + mouth_right[1]) / 2


def test_boxes_are_in_source_frame_pixels_whatever_the_frame_size(daemon, astronaut):
    small = cv2.resize(astronaut, (256, 256))  # half size: the box must halve too
    with Client(daemon.endpoint, max_in_flight=1) as client:
        _send(client, astronaut)
        full = _one(client).detections[0].box
        _send(client, small)
        half = _one(client).detections[0].box
    assert np.allclose(np.array(half) * 2, full, atol=8)


def test_reply_carries_every_stage_timestamp_in_order(daemon, astronaut_640x480):
    with Client(daemon.endpoint, max_in_flight=1) as client:
        _send(client, astronaut_640x480, capture_ts=123.5)
        reply = _one(client)
    stamps = [reply.stamps[s] for s in STAGES]
    assert stamps == sorted(stamps)
    assert reply.message["ts"] == 123.5


def test_pose_and_intrinsics_are_echoed(daemon, astronaut_640x480):
    pose = [float(i) for i in range(16)]
    intrinsics = [500.0, 500.0, 320.0, 240.0]
    with Client(daemon.endpoint, max_in_flight=1) as client:
        _send(client, astronaut_640x480, pose=pose, intrinsics=intrinsics)
        reply = _one(client)
    assert "pose" in reply.message, reply.message
    assert reply.message["pose"] == pose and reply.message["intrinsics"] == intrinsics


@pytest.mark.parametrize("encoding", ["rgb8", "gray8", "jpeg"])
def test_other_pixel_encodings_find_the_same_face(daemon, astronaut_640x480, encoding):
    with Client(daemon.endpoint, max_in_flight=1) as client:
        if encoding == "rgb8":
            _send(client, cv2.cvtColor(astronaut_640x480, cv2.COLOR_BGR2RGB), encoding="rgb8")
        elif encoding == "gray8":
            _send(client, cv2.cvtColor(astronaut_640x480, cv2.COLOR_BGR2GRAY))
        else:
            ok, jpeg = cv2.imencode(".jpg", astronaut_640x480, [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert client.wait_connected(10)
            client.send_jpeg(jpeg.tobytes(), 640, 480)
        reply = _one(client)
    assert reply.kind == "result", reply.message
    assert len(reply.detections) == 1
    assert 200 < reply.detections[0].box[0] < 260


def test_ping_lists_the_served_models(daemon):
    pong = query_info(daemon.endpoint)
    assert pong["type"] == "pong"
    (model,) = pong["models"]
    assert model["name"] == "centerface" and model["default"] and model["task"] == "face"
    assert model["precision"] == "fp32"  # documented in protocol.md §5.4


def test_sigterm_shuts_down_cleanly(daemon):
    assert daemon.stop(15) == 0
    assert "stopped cleanly" in daemon.log

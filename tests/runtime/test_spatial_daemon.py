"""Spatial results through a live `sightline serve` with the real face model: depth frames
in, world anchors, track ids and planes out; without Open3D the daemon still serves 2D."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.client import Client

INTRINSICS = [600.0, 600.0, 320.0, 240.0]
WORLD_FROM_CAMERA = np.array([[1, 0, 0, 1.0], [0, 1, 0, 2.0], [0, 0, 1, 3.0], [0, 0, 0, 1]],
                             dtype=float)


def _depth_mm(value_m: float = 0.6) -> np.ndarray:
    depth = np.full((240, 320), int(value_m * 1000), np.uint16)  # half resolution, registered
    depth[:20, :] = 0  # a hole band, ignored
    return depth


def _ask(endpoint: str, frame: np.ndarray, **kwargs):
    with Client(endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        client.send(frame, intrinsics=INTRINSICS, pose=WORLD_FROM_CAMERA.ravel().tolist(),
                    **kwargs)
        reply = client.recv(30)
    assert reply is not None and reply.ok, reply
    return reply


def test_face_with_a_depth_frame_comes_back_with_a_world_anchor(daemon, astronaut_640x480):
    reply = _ask(daemon.endpoint, astronaut_640x480, depth=_depth_mm(), spatial=True,
                 planes=True)
    (track,) = reply.tracks
    assert isinstance(track["track_id"], int)
    anchor = track["anchor"]
    assert anchor["depth_m"] == np.float64(anchor["depth_m"])
    assert abs(anchor["depth_m"] - 0.6) < 0.01
    camera = np.array(anchor["camera_xyz"])
    world = np.array(anchor["world_xyz"])
    np.testing.assert_allclose(world, camera + [1.0, 2.0, 3.0], atol=1e-6)
    # the face's box centre back-projected at 0.6 m
    x1, y1, x2, y2 = track["detection"]["box"]
    assert abs(camera[0] - ((x1 + x2) / 2 - 320) / 600 * 0.6) < 0.03
    assert anchor["obb"] is not None  # Open3D is installed here
    (plane,) = reply.planes  # the flat depth is one wall facing the camera
    assert abs(abs(plane["normal"][2]) - 1) < 0.01
    assert "spatial" in reply.stamps and reply.stamps["spatial"] >= reply.stamps["postprocessed"]
    assert "spatial_error" not in reply.message


def test_track_id_stays_across_frames(daemon, astronaut_640x480):
    with Client(daemon.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        ids = []
        for _ in range(3):
            client.send(astronaut_640x480, spatial=True)
            reply = client.recv(30)
            assert reply.ok
            ids.append(reply.tracks[0]["track_id"])
    assert len(set(ids)) == 1
    assert "no depth frame" in reply.message["spatial_error"]  # anchors need depth: said so


def test_annotated_reply_is_a_jpeg_of_the_frame(daemon, astronaut_640x480):
    reply = _ask(daemon.endpoint, astronaut_640x480, depth=_depth_mm(), spatial=True,
                 annotate=True)
    image = reply.annotated
    assert image is not None and image.shape == astronaut_640x480.shape
    assert np.abs(image.astype(int) - astronaut_640x480).mean() > 0.5  # overlays were drawn


def test_depth_part_of_the_wrong_size_is_an_error_reply(daemon, astronaut_640x480):
    import msgpack
    import zmq

    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(daemon.endpoint)
    header = msgpack.packb({"v": 1, "seq": 5, "w": 640, "h": 480, "enc": "bgr8",
                            "depth": {"w": 320, "h": 240, "enc": "u16mm"}, "spatial": True})
    socket.send_multipart([header, astronaut_640x480.tobytes(), b"\x00" * 100])
    assert socket.poll(10_000)
    reply = msgpack.unpackb(socket.recv())
    socket.close()
    assert reply["code"] == "BAD_PAYLOAD_SIZE" and "depth" in reply["message"]


def test_without_open3d_2d_results_still_flow_and_the_reply_says_why(daemon_factory, tmp_path,
                                                                    astronaut_640x480,
                                                                    monkeypatch):
    # A stand-in `open3d` that fails to import, first on the daemon's path: what a machine
    # without the [spatial] extra (or without libusb) looks like to the daemon.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "open3d.py").write_text("raise ImportError('No module named open3d')\n")
    monkeypatch.setenv("PYTHONPATH", f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    daemon = daemon_factory()
    reply = _ask(daemon.endpoint, astronaut_640x480, depth=_depth_mm(), spatial=True,
                 planes=True)
    assert len(reply.detections) == 1  # 2D results as always
    (track,) = reply.tracks
    assert abs(track["anchor"]["depth_m"] - 0.6) < 0.01  # anchors are numpy-only
    assert track["anchor"]["obb"] is None
    assert "sightline[spatial]" in reply.message["spatial_error"]
    assert "planes" not in reply.message
    assert Path(shadow / "open3d.py").exists()

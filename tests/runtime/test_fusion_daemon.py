"""Through real `sightline serve` processes: a daemon with the fused engine (the default)
finds the same faces as one running the Python steps, on the demo sequence, raw and JPEG."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from runtime.client import Client
from runtime.tasks.boxes import box_iou
from runtime.tools.demo_frames import astronaut_sequence

FRAMES = 16


def _stream(endpoint: str, frames: list[np.ndarray], encoding: str) -> list:
    results = []
    with Client(endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        for frame in frames:
            deadline = time.monotonic() + 10
            while True:
                if encoding == "jpeg":
                    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])
                    seq = client.send_jpeg(data.tobytes(), frame.shape[1], frame.shape[0])
                else:
                    seq = client.send(frame)
                if seq is not None:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.005)
            reply = client.recv(15)
            assert reply is not None and reply.kind == "result", reply and reply.message
            results.append(reply.detections)
    return results


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_fused_daemon_finds_the_same_faces_as_the_python_steps_on_the_demo_sequence(
        daemon_factory, short_tmp, encoding):
    config = short_tmp / "python-steps.toml"
    config.write_text('[engine]\nfused = "off"\n')
    python = daemon_factory("--config", str(config), endpoint=f"ipc://{short_tmp}/python.sock")
    fused = daemon_factory(endpoint=f"ipc://{short_tmp}/fused.sock")
    frames = list(astronaut_sequence(FRAMES))
    want = _stream(python.endpoint, frames, encoding)
    got = _stream(fused.endpoint, frames, encoding)
    assert sum(len(d) for d in want) >= FRAMES  # the astronaut's face in every frame
    for frame_want, frame_got in zip(want, got, strict=True):
        assert len(frame_got) == len(frame_want)
        for a, b in zip(frame_want, frame_got, strict=True):
            assert box_iou(np.array([a.box]), np.array([b.box]))[0, 0] >= 0.99
            assert abs(a.score - b.score) <= 1e-4
    assert "fused into the engine" in fused.log and "fused into the engine" not in python.log

"""Hostile and broken input against a live daemon: each case gets a clear error reply,
nothing else happens, and the daemon keeps serving everyone else."""

from __future__ import annotations

import time

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from runtime.client import Client


def _dealer(endpoint: str) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    return socket


def _exchange(endpoint: str, parts: list[bytes], timeout_ms: int = 10_000) -> dict:
    socket = _dealer(endpoint)
    try:
        socket.send_multipart(parts)
        assert socket.poll(timeout_ms), "the daemon did not answer"
        return msgpack.unpackb(socket.recv(), raw=False)
    finally:
        socket.close()


def _header(**fields) -> bytes:
    base = {"v": 1, "type": "frame", "seq": 7, "w": 64, "h": 48, "enc": "bgr8"}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not None})


def _assert_still_serves(endpoint: str, frame: np.ndarray) -> None:
    with Client(endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        client.send(frame)
        reply = client.recv(10)
    assert reply is not None and reply.ok, reply
    assert len(reply.detections) == 1


BGR_64x48 = bytes(64 * 48 * 3)

CASES = {
    "header that is not msgpack": ([b"\xc1\xff\x00garbage", BGR_64x48], "MALFORMED"),
    "header that is a list": ([msgpack.packb([1, 2, 3]), BGR_64x48], "MALFORMED"),
    # §3.1: keys are msgpack str; a bin key (b"...") is not, even beside valid str keys
    "header with a bin key": ([msgpack.packb({"v": 1, "seq": 7, "w": 64, "h": 48,
                                              "enc": "bgr8", b"extra": 1}), BGR_64x48],
                              "MALFORMED"),
    "unknown protocol version": ([_header(v=99), BGR_64x48], "UNSUPPORTED_VERSION"),
    "missing sequence number": ([_header(seq=None), BGR_64x48], "BAD_HEADER"),
    "unknown pixel encoding": ([_header(enc="yuv420"), BGR_64x48], "BAD_HEADER"),
    "payload size differs from shape": ([_header(), BGR_64x48[:-5]], "BAD_PAYLOAD_SIZE"),
    "frame part missing": ([_header()], "MALFORMED"),
    "extra message parts": ([_header(), BGR_64x48, b"x"], "MALFORMED"),
    "undecodable jpeg": ([_header(enc="jpeg"), b"\xff\xd8not a jpeg"], "DECODE_FAILED"),
    "frame larger than the limit": ([_header(w=100_000, h=100_000), b""], "FRAME_TOO_LARGE"),
    "unknown model": ([_header(model="no-such-model"), BGR_64x48], "UNKNOWN_MODEL"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_message_gets_error_reply_and_daemon_keeps_serving(daemon, astronaut_640x480, case):
    parts, code = CASES[case]
    reply = _exchange(daemon.endpoint, parts)
    assert reply["type"] == "error"
    assert reply["code"] == code
    assert reply["message"]  # a human-readable reason
    _assert_still_serves(daemon.endpoint, astronaut_640x480)
    assert daemon.process.poll() is None


def test_error_reply_echoes_the_sequence_number_when_readable(daemon):
    reply = _exchange(daemon.endpoint, [_header(seq=4242, enc="yuv420"), BGR_64x48])
    assert reply["seq"] == 4242


def test_client_that_never_reads_does_not_stall_other_clients(daemon, astronaut_640x480):
    rude = _dealer(daemon.endpoint)
    header = _header(w=640, h=480)
    for seq in range(200):  # floods frames and never reads a reply
        rude.send_multipart([_header(seq=seq, w=640, h=480), astronaut_640x480.tobytes()])
    del header
    try:
        with Client(daemon.endpoint, max_in_flight=1) as polite:
            assert polite.wait_connected(10)
            latencies = []
            for _ in range(5):
                polite.send(astronaut_640x480)
                reply = polite.recv(10)
                assert reply is not None and reply.ok, reply
                latencies.append(reply.round_trip_s)
    finally:
        rude.close()
    assert daemon.process.poll() is None


def test_client_that_vanishes_mid_stream_does_not_disturb_the_daemon(daemon, astronaut_640x480):
    for _ in range(3):
        ghost = _dealer(daemon.endpoint)
        for seq in range(5):
            ghost.send_multipart([_header(seq=seq, w=640, h=480), astronaut_640x480.tobytes()])
        ghost.close()  # gone without reading, replies are undeliverable
    time.sleep(0.5)
    _assert_still_serves(daemon.endpoint, astronaut_640x480)


def test_jpeg_whose_size_differs_from_the_header_is_rejected(daemon, astronaut_640x480):
    ok, jpeg = cv2.imencode(".jpg", astronaut_640x480)
    reply = _exchange(daemon.endpoint, [_header(enc="jpeg", w=320, h=240), jpeg.tobytes()])
    assert reply["code"] == "BAD_PAYLOAD_SIZE"
    assert "640x480" in reply["message"]

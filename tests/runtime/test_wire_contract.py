"""docs/protocol.md word for word, through a real `sightline serve`: replies belong to the
connection that sent the frame, pings never wait behind a model, `received` is not late,
and counters, ids and the bad-request budget follow the one per-headset rule."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from runtime.client import Client, apply_curve, curve_options
from tests.conftest import SIGHTLINE
from tests.onnx_models import fixed_raw_bundle, slow_conv_model

SMALL = np.zeros((48, 64, 3), np.uint8)
SLOW = np.zeros((128, 128, 3), np.uint8)


def _config(path: Path, **server) -> str:
    path.write_text("[server]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"')
                                           for k, v in server.items()))
    return str(path)


def _dealer(endpoint: str, keys: dict | None = None) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if keys:
        apply_curve(socket, curve_options(keys["server_key"], keys["client_key"]))
    socket.connect(endpoint)
    return socket


def _frame(socket: zmq.Socket, seq: int, image: np.ndarray = SMALL, **fields) -> None:
    header = {"v": 1, "seq": seq, "w": image.shape[1], "h": image.shape[0], "enc": "bgr8",
              **fields}
    socket.send_multipart([msgpack.packb(header), image.tobytes()])


def _drain(socket: zmq.Socket, quiet_ms: int = 1500, limit_s: float = 20) -> list[dict]:
    """Every reply until none came for `quiet_ms`."""
    replies = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and socket.poll(quiet_ms):
        replies.append(msgpack.unpackb(socket.recv(), raw=False))
    return replies


@pytest.fixture
def slow_bundle(short_tmp):
    """A raw model that takes 100 to 300 ms a frame on the development machine."""
    return fixed_raw_bundle(short_tmp / "slow", slow_conv_model(layers=10), "slow", "x",
                            128, 128)


def test_replies_to_a_replaced_connections_frames_never_reach_its_successor(
        daemon_factory, curve_keys, slow_bundle, short_tmp):
    # the model on its own thread: frames are read (and slots filled) as they arrive
    config = _config(short_tmp / "c.toml", deadline_ms=5000.0, inline_inference="off")
    daemon = daemon_factory("--model", str(slow_bundle.directory), "--config", config,
                            curve=curve_keys)
    keys = curve_keys.client_kwargs()
    old, new = _dealer(daemon.endpoint, keys), _dealer(daemon.endpoint, keys)
    try:
        _frame(old, 1000, SLOW)  # the headset is served on `old` first
        assert any(r["type"] == "result" for r in _drain(old, 1000))
        # `old` has one frame in the engine and one waiting when `new` takes over.
        _frame(old, 1001, SLOW)
        time.sleep(0.03)
        _frame(old, 1002, SLOW)
        time.sleep(0.03)  # read before `new`'s frames (the ROUTER reads fairly, not in order)
        _frame(new, 2001, SLOW)
        _frame(new, 2002, SLOW)
        got_old, got_new = _drain(old), _drain(new)
    finally:
        old.close()
        new.close()
    assert {r["seq"] for r in got_new} <= {2001, 2002}, got_new
    # 1001 was in the engine when `new` took over: its result still reaches `old`; 1002
    # waited in the slot and `new`'s frame superseded it: `old` is told so.
    assert {(r["seq"], r["type"]) for r in got_old} >= {(1001, "result"), (1002, "dropped")}, \
        got_old
    assert any(r.get("code") == "REPLACED" and r["seq"] is None for r in got_old), got_old
    assert any(r["type"] == "result" and r["seq"] == 2002 for r in got_new)


def test_a_ping_is_answered_while_a_slow_model_runs_even_if_inline_is_asked_for(
        daemon_factory, slow_bundle, short_tmp):
    config = _config(short_tmp / "c.toml", inline_inference="on", deadline_ms=5000.0)
    daemon = daemon_factory("--model", str(slow_bundle.directory), "--config", config)
    socket = _dealer(daemon.endpoint)
    try:
        order = []
        for seq in range(3):
            _frame(socket, 10 * seq, SLOW)
            time.sleep(0.03)  # the daemon has read the frame and started the model
            socket.send(msgpack.packb({"v": 1, "type": "ping", "seq": 10 * seq + 1}))
            while len(order) < 2 * (seq + 1) and socket.poll(10_000):
                order.append(msgpack.unpackb(socket.recv(), raw=False)["type"])
    finally:
        socket.close()
    assert order == ["pong", "result"] * 3, order
    assert "not inline" in daemon.log


def test_a_frame_waiting_behind_another_is_stamped_received_when_it_arrived(
        daemon_factory, slow_bundle, short_tmp):
    config = _config(short_tmp / "c.toml", inline_inference="on", deadline_ms=5000.0)
    daemon = daemon_factory("--model", str(slow_bundle.directory), "--config", config)
    with Client(daemon.endpoint, reply_timeout=10) as one, \
            Client(daemon.endpoint, reply_timeout=10) as other:
        assert one.wait_connected(10) and other.wait_connected(10)
        one.send(SLOW)
        time.sleep(0.03)  # the daemon has started on it
        other.send(SLOW)  # it waits while the first one is inferred
        first, second = one.recv(10), other.recv(10)
    assert first is not None and second is not None and first.ok and second.ok
    busy = first.stamps["inferred"] - first.stamps["started"]
    # §8: network + ZeroMQ = round trip - (sent - received). The wait is the daemon's.
    network = second.round_trip_s - (second.stamps["sent"] - second.stamps["received"])
    assert second.stamps["received"] < first.stamps["inferred"], (first.stamps, second.stamps)
    assert network < busy / 2, (network, busy)
    # its wait (from arriving until the engine was free) lies inside decoded - received
    assert second.stamps["taken"] >= first.stamps["inferred"], (first.stamps, second.stamps)


def test_a_headsets_dropped_count_is_one_count_across_idle_and_reconnects(
        daemon_factory, curve_keys, short_tmp):
    config = _config(short_tmp / "c.toml", client_timeout_s=0.5)
    daemon = daemon_factory("--config", config, curve=curve_keys)
    keys = curve_keys.client_kwargs()
    counts: list[tuple[str, int]] = []
    for first_seq in (0, 100):
        socket = _dealer(daemon.endpoint, keys)
        try:
            for seq in range(first_seq, first_seq + 6):
                _frame(socket, seq)
            counts += [(r["type"], r["dropped"]) for r in _drain(socket)
                       if r["type"] in ("result", "dropped")]
        finally:
            socket.close()
        time.sleep(2.0)  # idle for longer than client_timeout_s: the slot is freed
    dropped = [n for kind, n in counts if kind == "dropped"]
    assert dropped and dropped == sorted(dropped), counts  # one running count
    assert counts[-1] == ("result", max(dropped)), counts


def test_track_ids_belong_to_the_headset_across_reconnects(daemon_factory, curve_keys,
                                                          astronaut_640x480):
    daemon = daemon_factory(curve=curve_keys)
    keys = curve_keys.client_kwargs()
    tracks = []
    for _ in range(2):  # a reconnect: a new connection with the same key
        with Client(daemon.endpoint, max_in_flight=1, **keys) as client:
            assert client.wait_connected(10)
            client.send(astronaut_640x480, spatial=True)
            reply = client.recv(20)
            assert reply is not None and reply.ok, reply
            tracks.append(reply.message["tracks"][0])
    assert tracks[0]["track_id"] == tracks[1]["track_id"]
    assert (tracks[0]["hits"], tracks[1]["hits"]) == (1, 2)  # the same track, continued


def test_the_bad_request_budget_holds_from_a_connections_first_message(daemon):
    socket = _dealer(daemon.endpoint)
    try:
        for seq in range(150):
            socket.send_multipart([msgpack.packb({"v": 1, "seq": seq, "w": 64, "h": 48,
                                                  "enc": "yuv"}), SMALL.tobytes()])
        _frame(socket, 999)  # at once: the bucket refills at bad_requests_per_s
        replies = _drain(socket, 1000)
    finally:
        socket.close()
    assert [r.get("code") for r in replies].count("BAD_HEADER") == 150
    (reply,) = [r for r in replies if r["seq"] == 999]
    assert reply["seq"] == 999 and reply.get("code") == "RATE_LIMITED", reply


def test_sightline_ping_prints_its_round_trip_over_count_pings(daemon):
    done = subprocess.run([*SIGHTLINE, "ping", daemon.endpoint, "--count", "5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "centerface@" in done.stdout
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("round trip")]
    assert "over 5 pings" in line and "min" in line and "median" in line and "max" in line

"""Real-time scheduling through a live daemon: newest frame wins, deadlines, fairness,
one reply per frame, and client reconnection after a daemon restart."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from runtime.client import Client


def _drain(client: Client, expected: int, timeout: float = 20.0) -> list:
    replies = []
    deadline = time.monotonic() + timeout
    while len(replies) < expected and time.monotonic() < deadline:
        reply = client.recv(0.5)
        if reply is not None:
            replies.append(reply)
    return replies


def test_newest_frame_wins_when_client_outpaces_engine(daemon, astronaut_640x480):
    burst = 12
    with Client(daemon.endpoint, max_in_flight=burst) as client:
        assert client.wait_connected(10)
        seqs = [client.send(astronaut_640x480) for _ in range(burst)]
        assert None not in seqs
        replies = _drain(client, burst)
    by_seq = {r.seq: r for r in replies}
    # exactly one reply per frame, whatever happened to it
    assert sorted(by_seq) == sorted(seqs) and len(replies) == burst
    kinds = [by_seq[s].kind for s in seqs]
    assert kinds.count("dropped") >= burst // 2, kinds  # the engine cannot keep up with a burst
    assert all(by_seq[s].message["reason"] == "superseded"
               for s in seqs if by_seq[s].kind == "dropped")
    assert kinds[-1] == "result"  # the newest frame is always served
    results = [by_seq[s] for s in seqs if by_seq[s].kind == "result"]
    # the daemon tells the client how many of its frames it dropped so far
    assert results[-1].message["dropped"] == kinds.count("dropped")


def test_frames_older_than_the_deadline_are_dropped_not_inferred(daemon_factory,
                                                                 astronaut_640x480):
    # 10 ms: long enough to decode and preprocess a frame, far shorter than one inference,
    # so the frame prepared during the first inference has expired by the time it is up.
    daemon = daemon_factory("--deadline-ms", "10")
    with Client(daemon.endpoint, max_in_flight=8) as client:
        assert client.wait_connected(10)
        for _ in range(8):
            client.send(astronaut_640x480)
        replies = _drain(client, 8)
    expired = [r for r in replies if r.kind == "dropped" and r.message["reason"] == "expired"]
    assert len(replies) == 8
    assert expired, [r.kind for r in replies]


def test_two_clients_are_served_fairly(daemon, astronaut_640x480):
    with Client(daemon.endpoint, max_in_flight=2) as a, \
            Client(daemon.endpoint, max_in_flight=2) as b:
        assert a.wait_connected(10) and b.wait_connected(10)
        counts = {"a": 0, "b": 0}
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            for name, client in (("a", a), ("b", b)):
                client.send(astronaut_640x480)
                reply = client.recv(0.01)
                if reply is not None and reply.ok:
                    counts[name] += 1
        for name, client in (("a", a), ("b", b)):
            counts[name] += sum(1 for r in _drain(client, client.in_flight, 5) if r.ok)
    assert min(counts.values()) > 0
    assert min(counts.values()) / max(counts.values()) > 0.5, counts


def test_client_reconnects_after_daemon_restart(daemon_factory, astronaut_640x480):
    daemon = daemon_factory()
    with Client(daemon.endpoint, max_in_flight=1, reply_timeout=1.0) as client:
        assert client.wait_connected(10)
        client.send(astronaut_640x480)
        assert client.recv(10).ok
        daemon.stop(9)  # killed, not a clean stop: the in-flight frame is lost
        client.send(astronaut_640x480)
        restarted = daemon_factory(endpoint=daemon.endpoint)
        deadline = time.monotonic() + 20
        got = None
        while time.monotonic() < deadline:
            client.send(astronaut_640x480)
            reply = client.recv(0.5)
            if reply is not None and reply.ok:
                got = reply
                break
        assert got is not None, "no result after the daemon came back"
        assert got.detections
    assert restarted.process.poll() is None


def test_send_returns_none_when_the_in_flight_window_is_full(daemon, astronaut_640x480):
    with Client(daemon.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        assert client.send(astronaut_640x480) is not None
        assert client.send(astronaut_640x480) is None
        assert client.counters.not_sent == 1
        assert client.recv(10).ok


def test_callback_mode_delivers_every_reply(daemon, astronaut_640x480):
    received = []
    with Client(daemon.endpoint, max_in_flight=4, on_reply=received.append) as client:
        assert client.wait_connected(10)
        sent = [client.send(astronaut_640x480) for _ in range(4)]
        deadline = time.monotonic() + 15
        while len(received) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sorted(r.seq for r in received) == sorted(sent)
    assert any(r.ok for r in received)



def test_stage_timestamps_allow_latency_math(daemon, astronaut_640x480):
    with Client(daemon.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        client.send(astronaut_640x480)
        reply = client.recv(10)
    stamps = reply.stamps
    assert 0 < stamps["sent"] - stamps["received"] < reply.round_trip_s + 1.0
    assert np.isfinite(list(stamps.values())).all()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_daemon_memory_stays_bounded_however_fast_clients_send(daemon, astronaut_640x480):
    import msgpack
    import zmq

    with Client(daemon.endpoint, max_in_flight=1) as warm:  # load the model, touch buffers
        assert warm.wait_connected(10)
        for _ in range(3):
            warm.send(astronaut_640x480)
            assert warm.recv(10).ok
    baseline = _rss_mb(daemon.process.pid)
    payload = astronaut_640x480.tobytes()
    floods = []
    for _ in range(3):
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 100_000)
        socket.connect(daemon.endpoint)
        floods.append(socket)
    # 3 clients x 150 frames x 900 KB = 400 MB offered, never reading a reply.
    for seq in range(150):
        header = msgpack.packb({"v": 1, "seq": seq, "w": 640, "h": 480, "enc": "bgr8"})
        for socket in floods:
            socket.send_multipart([header, payload], copy=False)
    time.sleep(3)
    peak = _rss_mb(daemon.process.pid)
    for socket in floods:
        socket.close()
    assert peak - baseline < 120, f"daemon RSS grew from {baseline:.0f} to {peak:.0f} MB"
    with Client(daemon.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        client.send(astronaut_640x480)
        assert client.recv(10).ok

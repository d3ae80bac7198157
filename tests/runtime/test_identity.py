"""A headset is its key, not its connection: against a real CURVE `sightline serve`, slots,
frame-rate buckets and counters follow the enrolled key across reconnects; the newest
connection with a key wins; unknown keys and handshake floods are refused at the handshake."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

from runtime.client import Client, apply_curve, curve_options, query_info
from runtime.daemon.control import query_status
from tests.conftest import SIGHTLINE

SMALL = np.zeros((48, 64, 3), np.uint8)


def _config(path: Path, **tables: dict) -> str:
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {v}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _dealer(endpoint: str, keys: dict) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    apply_curve(socket, curve_options(keys["server_key"], keys["client_key"]))
    socket.connect(endpoint)
    return socket


def _burst(socket: zmq.Socket, first_seq: int, count: int) -> list[str]:
    """Send `count` small frames at once; the replies' codes (or types), in arrival order."""
    for seq in range(first_seq, first_seq + count):
        socket.send_multipart([msgpack.packb({"v": 1, "seq": seq, "w": 64, "h": 48,
                                              "enc": "bgr8"}), SMALL.tobytes()])
    codes: list[str] = []
    deadline = time.monotonic() + 15
    while len(codes) < count and time.monotonic() < deadline:
        if socket.poll(500):
            reply = msgpack.unpackb(socket.recv())
            if reply["type"] == "dropped":
                continue  # superseded: its frame was admitted; the newer one answers
            codes.append(reply.get("code", reply["type"]))
        elif codes and "result" in codes:
            break
    return codes


def _headset(status: dict, name: str) -> dict:
    (entry,) = [h for h in status["headsets"] if h["name"] == name]
    return entry


def test_reconnecting_headset_keeps_its_counters_and_is_rate_limited_across_reconnects(
        daemon_factory, curve_keys, short_tmp):
    daemon = daemon_factory("--config", _config(short_tmp / "c.toml",
                                                server={"max_fps_per_client": 4}),
                            curve=curve_keys)
    keys = curve_keys.client_kwargs()
    first = _dealer(daemon.endpoint, keys)
    codes_first = _burst(first, 0, 12)
    first.close()
    # A new connection, at once: with a bucket per connection it would start full again.
    second = _dealer(daemon.endpoint, keys)
    codes_second = _burst(second, 100, 12)
    second.close()
    assert codes_first.count("RATE_LIMITED") >= 6, codes_first
    assert codes_second.count("RATE_LIMITED") >= 10, codes_second
    status = query_status(daemon.control)
    headset = _headset(status, "quest-01")
    assert headset["connections"] == 2
    assert headset["rate_limited"] == (codes_first + codes_second).count("RATE_LIMITED")
    assert headset["frames"] == 24 - headset["rate_limited"]
    assert status["clients"] == 1 and status["identity"] == "key"


def test_two_connections_with_the_same_key_end_with_one_slot_and_the_old_one_is_told(
        daemon_factory, curve_keys, astronaut_640x480):
    daemon = daemon_factory(curve=curve_keys)
    keys = curve_keys.client_kwargs()
    with Client(daemon.endpoint, max_in_flight=1, **keys) as old, \
            Client(daemon.endpoint, max_in_flight=1, **keys) as new:
        assert old.wait_connected(10) and new.wait_connected(10)
        old.send(astronaut_640x480)
        assert old.recv(10).ok
        new.send(astronaut_640x480)
        assert new.recv(10).ok
        told = old.recv(5)
        assert told is not None and told.kind == "error", told
        assert told.message["code"] == "REPLACED" and "quest-01" in told.message["message"]
        status = query_status(daemon.control)
        assert status["clients"] == 1
        headset = _headset(status, "quest-01")
        assert headset["connections"] == 2 and headset["replaced"] == 1
        # the replaced connection stays refused; the newest keeps its service
        old.send(astronaut_640x480)
        again = old.recv(5)
        assert again is not None and again.message.get("code") == "REPLACED"
        new.send(astronaut_640x480)
        assert new.recv(10).ok
    assert len(query_status(daemon.control)["headsets"]) == 1


def test_unknown_key_is_refused_at_the_handshake_and_costs_no_decode(
        daemon_factory, curve_keys, short_tmp):
    from runtime.curve_keys import create_keypair

    daemon = daemon_factory(curve=curve_keys)
    _, stranger = create_keypair(short_tmp / "stranger", "stranger")
    before = query_status(daemon.control)["handshakes"]["refused"].get("unknown_key", 0)
    socket = _dealer(daemon.endpoint, {"server_key": curve_keys.daemon_public,
                                       "client_key": stranger})
    for seq in range(20):
        socket.send_multipart([msgpack.packb({"v": 1, "seq": seq, "w": 64, "h": 48,
                                              "enc": "bgr8"}), SMALL.tobytes()], zmq.NOBLOCK)
    assert not socket.poll(1500), "a stranger got a reply"
    socket.close()
    status = query_status(daemon.control)
    assert status["handshakes"]["refused"].get("unknown_key", 0) > before
    # nothing of it reached the frame path: no frame counted, no error reply, no decode
    assert status["counters"]["frames"] == 0 and status["counters"]["errors"] == {}
    assert all(m["results"] == 0 and m["errors"] == 0 for m in status["models"])
    assert status["headsets"] == []


def test_handshakes_over_the_per_key_rate_are_refused_and_the_open_connection_kept(
        daemon_factory, curve_keys, short_tmp, astronaut_640x480):
    from runtime.curve_keys import HEADSETS_DIR, create_keypair, enroll

    # A headset of its own: the fixture's start-up pings spent quest-01's handshakes.
    public, secret = create_keypair(short_tmp / "quest-02", "quest-02")
    enroll(public, curve_keys.keys_dir / HEADSETS_DIR)
    config = _config(short_tmp / "c.toml",
                     security={"handshakes_per_s_per_key": 0.2, "handshake_burst": 3})
    daemon = daemon_factory("--config", config, curve=curve_keys)
    keys = curve_keys.client_kwargs(secret)
    with Client(daemon.endpoint, max_in_flight=1, **keys) as headset:
        assert headset.wait_connected(10)
        answered = [query_info(daemon.endpoint, 1.0, **keys) is not None for _ in range(4)]
        assert not all(answered), answered
        headset.send(astronaut_640x480)
        assert headset.recv(10).ok
    refused = query_status(daemon.control)["handshakes"]["refused"]
    assert refused.get("key_rate", 0) >= 1, refused


def test_status_shows_per_headset_figures_by_enrolled_name(daemon_factory, curve_keys,
                                                           astronaut_640x480):
    daemon = daemon_factory(curve=curve_keys)
    for _ in range(2):  # two connections, one after the other: one headset
        with Client(daemon.endpoint, max_in_flight=1, **curve_keys.client_kwargs()) as client:
            assert client.wait_connected(10)
            client.send(astronaut_640x480)
            assert client.recv(10).ok
    done = subprocess.run([*SIGHTLINE, "status", "--control", daemon.control],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "headsets, by enrolled key" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("quest-01"))
    # headset, state, frames, dropped, rate-limited, connections, replaced (the daemon cannot
    # tell a closed connection from an open one: the second superseded the first)
    assert row.split() == ["quest-01", "connected", "2", "0", "0", "2", "1"]
    done = subprocess.run([*SIGHTLINE, "status", "--control", daemon.control, "--json"],
                          capture_output=True, text=True, timeout=30)
    (headset,) = json.loads(done.stdout)["headsets"]
    assert headset["name"] == "quest-01" and headset["frames"] == 2


def test_plain_mode_keeps_the_connection_as_the_identity(daemon, astronaut_640x480):
    for _ in range(2):
        with Client(daemon.endpoint, max_in_flight=1) as client:
            assert client.wait_connected(10)
            client.send(astronaut_640x480)
            assert client.recv(10).ok
    status = query_status(daemon.control)
    assert status["identity"] == "connection"
    names = [h["name"] for h in status["headsets"]]
    assert len(names) == 2 and all(n.startswith("conn-") for n in names)


def test_an_address_over_its_open_connection_limit_is_refused_until_it_closes_some(
        daemon_factory, curve_keys, short_tmp):
    import socket as socket_module

    from tests.runtime.test_security import _free_port

    port = _free_port()
    config = _config(short_tmp / "c.toml", security={"max_connections_per_address": 2})
    daemon = daemon_factory("--config", config, endpoint=f"tcp://127.0.0.1:{port}",
                            curve=curve_keys)
    keys = curve_keys.client_kwargs()
    idle = [socket_module.create_connection(("127.0.0.1", port)) for _ in range(3)]
    deadline = time.monotonic() + 10
    while query_status(daemon.control)["connections"]["open"] < 3:  # seen as accepted
        assert time.monotonic() < deadline, "the daemon never saw the connections"
        time.sleep(0.1)
    assert query_info(daemon.endpoint, 1.5, **keys) is None
    refused = query_status(daemon.control)["handshakes"]["refused"]
    assert refused.get("address_connections", 0) >= 1, refused
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + 10
    while query_info(daemon.endpoint, 1.0, **keys) is None:
        assert time.monotonic() < deadline, "the address stayed refused after closing"
    assert query_status(daemon.control)["connections"]["open"] <= 2


def test_a_headset_whose_requests_keep_failing_has_its_frames_refused_before_decoding(
        daemon_factory, curve_keys, short_tmp, astronaut_640x480):
    from runtime.curve_keys import HEADSETS_DIR, create_keypair, enroll

    public, secret = create_keypair(short_tmp / "quest-02", "quest-02")
    enroll(public, curve_keys.keys_dir / HEADSETS_DIR)
    config = _config(short_tmp / "c.toml",
                     server={"bad_requests_per_s": 1, "bad_request_burst": 5})
    daemon = daemon_factory("--config", config, curve=curve_keys)
    bad = _dealer(daemon.endpoint, curve_keys.client_kwargs(secret))
    assert _burst(bad, 0, 1) == ["result"]  # it holds a slot
    for _ in range(20):  # garbage headers, each an error reply
        bad.send(b"\xc1 not msgpack")
    codes = [msgpack.unpackb(bad.recv())["code"] for _ in range(20) if bad.poll(5000)]
    assert codes == ["MALFORMED"] * 20
    assert _burst(bad, 100, 3) == ["RATE_LIMITED"] * 3  # well-formed now, but refused
    bad.close()
    status = query_status(daemon.control)
    failing = _headset(status, "quest-02")
    assert failing["bad_requests"] == 20 and failing["frames"] == 1
    # the other headset is unaffected
    with Client(daemon.endpoint, max_in_flight=1, **curve_keys.client_kwargs()) as good:
        assert good.wait_connected(10)
        good.send(astronaut_640x480)
        assert good.recv(10).ok

"""The headset link against a real `sightline serve`: CurveZMQ encryption, enrolled headsets
only, revocation without restart, and the limits a hostile client cannot get around."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from runtime.client import Client, query_info
from runtime.curve_keys import DAEMON_KEY_NAME, create_keypair
from tests.conftest import SIGHTLINE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(client: Client, frame: np.ndarray, timeout: float = 10.0):
    assert client.wait_connected(timeout), "no CURVE handshake with the daemon"
    client.send(frame)
    return client.recv(timeout)


def test_enrolled_headset_streams_and_gets_results(daemon_factory, curve_keys,
                                                   astronaut_640x480):
    daemon = daemon_factory(curve=curve_keys)
    with Client(daemon.endpoint, max_in_flight=1, **curve_keys.client_kwargs()) as client:
        reply = _result(client, astronaut_640x480)
    assert reply.ok and len(reply.detections) == 1
    assert "PLAIN MODE" not in daemon.log


def test_headset_with_an_unknown_key_is_refused(daemon_factory, curve_keys, short_tmp):
    daemon = daemon_factory(curve=curve_keys)
    _, stranger = create_keypair(short_tmp / "stranger", "stranger")
    assert query_info(daemon.endpoint, 1.5, **curve_keys.client_kwargs(stranger)) is None
    with Client(daemon.endpoint, **curve_keys.client_kwargs(stranger)) as client:
        assert not client.wait_connected(1.5)
    # the enrolled headset is unaffected
    assert query_info(daemon.endpoint, 5, **curve_keys.client_kwargs()) is not None


def test_client_refuses_a_daemon_with_another_key(daemon_factory, curve_keys, short_tmp):
    daemon = daemon_factory(curve=curve_keys)
    impostor_public, _ = create_keypair(short_tmp / "impostor", DAEMON_KEY_NAME)
    kwargs = {"server_key": impostor_public, "client_key": curve_keys.headset_secret}
    with Client(daemon.endpoint, **kwargs) as client:
        assert not client.wait_connected(1.5)
        assert client.send(np.zeros((48, 64, 3), np.uint8)) is not None
        assert client.recv(1.0).kind == "not_sent"  # nothing went to the wrong daemon


def test_plain_client_cannot_talk_to_a_curve_daemon(daemon_factory, curve_keys):
    daemon = daemon_factory(curve=curve_keys)
    assert query_info(daemon.endpoint, 1.5) is None


def test_revoked_headset_is_refused_without_a_daemon_restart(daemon_factory, curve_keys,
                                                             astronaut_640x480):
    daemon = daemon_factory(curve=curve_keys)
    with Client(daemon.endpoint, max_in_flight=1, **curve_keys.client_kwargs()) as client:
        assert _result(client, astronaut_640x480).ok
        done = subprocess.run([*SIGHTLINE, "keys", "revoke", "quest-01", "--keys",
                               str(curve_keys.keys_dir)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        reply = None
        while time.monotonic() < deadline:
            client.send(astronaut_640x480)
            reply = client.recv(5)
            if reply is not None and reply.kind == "error":
                break
            time.sleep(0.2)
        assert reply is not None and reply.message["code"] == "NOT_ENROLLED", reply
    # and a new connection with the revoked key is refused at the handshake
    assert query_info(daemon.endpoint, 1.5, **curve_keys.client_kwargs()) is None
    assert daemon.process.poll() is None


class RecordingProxy:
    """A TCP relay between client and daemon that keeps every byte it forwards."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.captured = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    self.captured += data
                sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("mode", ["curve", "plain"])
def test_frame_pixels_never_cross_the_network_in_clear(daemon_factory, curve_keys, mode):
    port = _free_port()
    curve = curve_keys if mode == "curve" else None
    daemon = daemon_factory(endpoint=f"tcp://127.0.0.1:{port}", curve=curve)
    proxy = RecordingProxy(port)
    marker = np.frombuffer(b"SIGHTLINE-SECRET-PIXELS!" * 4, np.uint8)
    frame = np.tile(marker, (64 * 64 * 3) // marker.size + 1)[: 64 * 64 * 3].reshape(64, 64, 3)
    kwargs = curve_keys.client_kwargs() if curve else {}
    with Client(f"tcp://127.0.0.1:{proxy.port}", max_in_flight=1, **kwargs) as client:
        reply = _result(client, frame)
    proxy.close()
    assert reply is not None and reply.kind == "result"
    in_clear = b"SIGHTLINE-SECRET-PIXELS!" in proxy.captured
    # plain mode proves the check can see pixels; CURVE must hide them
    assert in_clear == (mode == "plain")
    assert daemon.process.poll() is None


def test_plain_mode_must_be_asked_for_and_warns(daemon_factory, short_tmp):
    done = subprocess.run([*SIGHTLINE, "serve", "--bind", f"ipc://{short_tmp}/x.sock",
                           "--keys", str(short_tmp / "no-keys-here")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "sightline keys daemon" in done.stderr and "--plain" in done.stderr
    daemon = daemon_factory()  # the fixture's default is --plain
    assert "PLAIN MODE" in daemon.log


# -- limits a hostile client cannot get around -------------------------------------------------

def _config(path: Path, **server) -> str:
    lines = ["[server]"] + [f"{k} = {v}" for k, v in server.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_frame_rate_cap_answers_the_excess_and_spares_other_clients(daemon_factory, short_tmp,
                                                                    astronaut_640x480):
    daemon = daemon_factory("--config", _config(short_tmp / "c.toml", max_fps_per_client=5))
    flooder = zmq.Context.instance().socket(zmq.DEALER)
    flooder.setsockopt(zmq.LINGER, 0)
    flooder.connect(daemon.endpoint)
    small = np.zeros((48, 64, 3), np.uint8).tobytes()
    for seq in range(40):
        flooder.send_multipart([msgpack.packb({"v": 1, "seq": seq, "w": 64, "h": 48,
                                               "enc": "bgr8"}), small])
    codes = []
    deadline = time.monotonic() + 10
    while len(codes) < 40 and time.monotonic() < deadline:
        if flooder.poll(500):
            reply = msgpack.unpackb(flooder.recv())
            codes.append(reply.get("code", reply["type"]))
    flooder.close()
    assert codes.count("RATE_LIMITED") >= 30, codes
    with Client(daemon.endpoint, max_in_flight=1) as polite:
        assert _result(polite, astronaut_640x480).ok


def test_client_over_the_client_limit_is_told_and_the_first_keeps_its_service(
        daemon_factory, short_tmp, astronaut_640x480):
    daemon = daemon_factory("--config", _config(short_tmp / "c.toml", max_clients=1))
    with Client(daemon.endpoint, max_in_flight=1) as first:
        assert _result(first, astronaut_640x480).ok
        with Client(daemon.endpoint, max_in_flight=1) as second:
            reply = _result(second, astronaut_640x480)
            assert reply.kind == "error" and reply.message["code"] == "TOO_MANY_CLIENTS"
        assert _result(first, astronaut_640x480).ok


def test_oversized_message_drops_only_that_connection(daemon_factory, short_tmp,
                                                      astronaut_640x480):
    daemon = daemon_factory("--config", _config(short_tmp / "c.toml", max_frame_bytes=100_000))
    with Client(daemon.endpoint, max_in_flight=1, reply_timeout=1.0) as big:
        assert big.wait_connected(10)
        big.send(astronaut_640x480)  # 921,600 bytes > 100,000 + 64 KiB: libzmq drops the peer
        reply = big.recv(5)
        assert reply is not None and reply.kind == "lost"
    with Client(daemon.endpoint, max_in_flight=1) as other:
        reply = _result(other, astronaut_640x480[:200, :160].copy())
        assert reply.ok
    assert daemon.process.poll() is None


def test_peer_that_never_completes_the_handshake_is_disconnected(daemon_factory, curve_keys,
                                                                 astronaut_640x480):
    port = _free_port()
    daemon = daemon_factory(endpoint=f"tcp://127.0.0.1:{port}", curve=curve_keys)
    silent = socket.create_connection(("127.0.0.1", port))
    silent.settimeout(15)
    started = time.monotonic()
    with Client(daemon.endpoint, max_in_flight=1, **curve_keys.client_kwargs()) as client:
        assert _result(client, astronaut_640x480).ok  # served while the silent peer waits
    try:
        leftover = silent.recv(4096)  # the daemon's greeting, then the close
        while leftover:
            leftover = silent.recv(4096)
    except ConnectionResetError:
        pass
    waited = time.monotonic() - started
    silent.close()
    assert waited < 12, f"silent peer kept for {waited:.1f} s (handshake timeout is 5 s)"


def test_curve_daemon_refuses_an_inproc_endpoint_it_could_not_authenticate(short_tmp,
                                                                         curve_keys):
    done = subprocess.run([*SIGHTLINE, "serve", "--keys", str(curve_keys.keys_dir), "--bind",
                           "inproc://sightline", "--control", f"ipc://{short_tmp}/c.sock"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "inproc" in done.stderr and "plain" in done.stderr


def test_connections_sending_bare_headers_cannot_take_the_client_slots(
        daemon_factory, short_tmp, astronaut_640x480):
    daemon = daemon_factory("--config", _config(short_tmp / "c.toml", max_clients=4))
    squatters = []
    for seq in range(8):  # twice the limit, each a header without its pixel part
        socket_ = zmq.Context.instance().socket(zmq.DEALER)
        socket_.setsockopt(zmq.LINGER, 0)
        socket_.connect(daemon.endpoint)
        socket_.send(msgpack.packb({"v": 1, "seq": seq, "w": 640, "h": 480, "enc": "bgr8"}))
        assert socket_.poll(10_000)
        assert msgpack.unpackb(socket_.recv())["code"] == "MALFORMED"
        squatters.append(socket_)
    with Client(daemon.endpoint, max_in_flight=1) as headset:
        assert _result(headset, astronaut_640x480).ok
    for socket_ in squatters:
        socket_.close()

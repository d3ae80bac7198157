"""Fixtures that start real mosquitto brokers (own port, own config, always stopped),
an MQTT observer standing in for the cloud, and a throw-away PKI for the TLS tests.

Never touches the machine's own broker on 1883: every broker here listens on a free
loopback port with a config file written by the fixture.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.cloud_sync.mosquitto import Mosquitto, MosquittoError, free_port, mosquitto_path


def mosquitto_binary() -> str:
    try:
        return mosquitto_path()
    except MosquittoError as exc:
        pytest.fail(str(exc), pytrace=False)


class Broker(Mosquitto):
    """The tests' broker: persistence on, so queued messages survive a restart; every
    packet logged; `extra` replaces anonymous access (TLS listeners, ACLs)."""

    def __init__(self, directory: Path, port: int, extra: str = "") -> None:
        super().__init__(directory, port,
                         "persistence true\n"
                         f"persistence_location {directory}/\n"
                         "log_type all\n"
                         "max_queued_messages 10000\n"
                         + (extra or "allow_anonymous true\n"))

    def start(self, timeout: float = 10.0) -> Broker:
        try:
            return super().start(timeout)
        except MosquittoError as exc:
            pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def work_dir() -> Iterator[Path]:
    # Short, private and removed afterwards (mosquitto and SQLite files live here).
    path = Path(tempfile.mkdtemp(prefix="sl-mqtt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def broker_factory(work_dir: Path) -> Iterator[Callable[..., Broker]]:
    """Start mosquitto brokers: factory(extra_config=...) -> a started Broker."""
    mosquitto_binary()
    started: list[Broker] = []

    def factory(extra: str = "", port: int | None = None) -> Broker:
        broker = Broker(work_dir / f"broker{len(started)}", port or free_port(), extra)
        started.append(broker)
        return broker.start()

    yield factory
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    return broker_factory()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    dup: bool


class Observer:
    """A paho client standing in for the cloud: subscribes and records what arrives."""

    def __init__(self, port: int, filters: list[str], *, client_id: str = "",
                 persistent: bool = False, tls: dict | None = None) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self._filters = filters
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(1, 1)
        if tls:
            self.client.tls_set(**tls)
        properties = Properties(PacketTypes.CONNECT)
        if persistent:
            properties.SessionExpiryInterval = 3600
        self.subscribed = threading.Event()
        self.client.connect(  # noqa: S104 - loopback only
            "127.0.0.1", port, keepalive=5, clean_start=not persistent, properties=properties)
        self.client.loop_start()
        assert self.subscribed.wait(5), "observer did not connect and subscribe"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        if self._filters:
            client.subscribe([(topic, 1) for topic in self._filters])
        else:
            self.subscribed.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.subscribed.set()

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append(Received(message.topic, bytes(message.payload),
                                          bool(message.retain), bool(message.dup)))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0
                 ) -> list[Received]:
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self.messages), timeout)
            snapshot = list(self.messages)
        assert ok, f"timed out; received: {[(m.topic, m.payload[:80]) for m in snapshot]}"
        return snapshot

    def everything(self) -> list[Received]:
        with self._cond:
            return list(self.messages)

    def on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def observer_factory() -> Iterator[Callable[..., Observer]]:
    observers: list[Observer] = []

    def factory(port: int, filters: list[str], **kwargs) -> Observer:
        observer = Observer(port, filters, **kwargs)
        observers.append(observer)
        return observer

    yield factory
    for observer in observers:
        observer.close()


class Child:
    """A Python child process (tests/cloud_sync/child.py) that prints one line per event."""

    def __init__(self, *args: str) -> None:
        import sys

        repo = Path(__file__).resolve().parents[2]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.cloud_sync.child", *args], cwd=repo,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[str] = []

    def read_until(self, prefix: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"child exited ({self.process.wait()}): "
                                     f"{self.process.stderr.read()}")
            self.lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return line.rstrip("\n")
        raise AssertionError(f"child printed no {prefix!r} within {timeout} s")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture
def child_factory() -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def factory(*args: str) -> Child:
        child = Child(*args)
        children.append(child)
        return child

    yield factory
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGCONT)
        child.kill()


class FakeV311Broker:
    """Just enough of an MQTT 3.1.1-only broker for the protocol-fallback edge: it answers
    an MQTT 5 CONNECT with 3.1.1's "unacceptable protocol version" (return code 1), a
    3.1.1 CONNECT with "accepted", QoS 1 PUBLISH with PUBACK and PINGREQ with PINGRESP."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.levels: list[int] = []
        self.published: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-broker", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.server.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_packet(conn: socket.socket) -> tuple[int, bytes]:
        def read(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    raise ConnectionError
                data += chunk
            return data

        header = read(1)[0]
        length, shift = 0, 0
        while True:
            byte = read(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return header, read(length)

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    header, body = self._read_packet(conn)
                except TimeoutError:
                    continue
                except (ConnectionError, OSError):
                    return
                kind = header >> 4
                if kind == 1:  # CONNECT: protocol name (2 + 4 bytes), then the level
                    level = body[6]
                    self.levels.append(level)
                    if level != 4:
                        conn.sendall(b"\x20\x02\x00\x01")
                        return
                    conn.sendall(b"\x20\x02\x00\x00")
                elif kind == 3:  # PUBLISH
                    topic_len = int.from_bytes(body[:2], "big")
                    self.published.append(body[2:2 + topic_len].decode())
                    if (header >> 1) & 3:
                        packet_id = body[2 + topic_len:4 + topic_len]
                        conn.sendall(b"\x40\x02" + packet_id)
                elif kind == 12:  # PINGREQ
                    conn.sendall(b"\xd0\x00")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()


@pytest.fixture
def fake_v311_broker() -> Iterator[FakeV311Broker]:
    fake = FakeV311Broker()
    yield fake
    fake.close()

"""Fixtures that start real mosquitto brokers (own port, own config, always stopped),
an MQTT observer standing in for the cloud, and a throw-away PKI for the TLS tests.

Never touches the machine's own broker on 1883: every broker here listens on a free
loopback port with a config file written by the fixture.
"""

from __future__ import annotations

import getpass
import os
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

INSTALL_HINT = ("mosquitto is not installed: the cloud_sync tests start real brokers. "
                "Install the Debian/Ubuntu package `mosquitto` (apt-get install mosquitto; "
                "it is started per test on a free port, the system service is not needed)")


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(INSTALL_HINT, pytrace=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert port != 1883
    return port


class Broker:
    """One mosquitto process on 127.0.0.1:port; stop()/start() keep port and data."""

    def __init__(self, directory: Path, port: int, extra: str = "") -> None:
        self.directory = directory
        self.port = port
        self.config_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)
        # `user`: run as root, mosquitto would switch to user "mosquitto", which cannot
        # write this directory. Persistence on, so queued messages survive a restart.
        self.config_path.write_text(
            f"listener {port} 127.0.0.1\n"
            f"user {getpass.getuser()}\n"
            "persistence true\n"
            f"persistence_location {directory}/\n"
            f"log_dest file {self.log_path}\n"
            "log_type all\n"
            "max_queued_messages 10000\n"
            + (extra or "allow_anonymous true\n"))

    def start(self, timeout: float = 10.0) -> Broker:
        assert self.process is None or self.process.poll() is not None
        mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = subprocess.Popen([mosquitto_binary(), "-c", str(self.config_path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode(errors="replace")
                pytest.fail(f"mosquitto exited at start ({self.process.returncode}): {stderr}"
                            f"\n{self.log_tail()}", pytrace=False)
            if self.log_path.exists():
                with open(self.log_path, "rb") as log:
                    log.seek(mark)
                    if b" running" in log.read():
                        return self
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"mosquitto did not start within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM: a clean broker shutdown (closes connections, saves persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no mosquitto log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


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

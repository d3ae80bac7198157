"""Test parts: a small simulated fleet (bench/fleet_sim.py's real device stack with a
stand-in engine) and `sightline cloud serve` as a child process that can be SIGKILLed."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from bench.fleet_sim import SimDevice, build_bundles
from cloud_sync.fleet import FleetWatcher
from cloud_sync.operator import OperatorConfig, publish_bytes
from cloud_sync.ota import OtaSettings
from cloud_sync.signing import TrustedKeys, generate_signing_key, load_private_key
from tests.cloud_sync.mosquitto import free_port
from tests.conftest import SIGHTLINE


class SimFleet:
    """`count` devices sim-01 ... in group "fleet", telemetry every `interval_s`;
    `host_options` go to each SimHost (slowdown, noise; seed is per device)."""

    def __init__(self, work: Path, port: int, count: int, *, interval_s: float = 0.2,
                 probation_s: float = 1.0, **host_options) -> None:
        self.port = port
        self.seed, self.archive = build_bundles(work, pad_kb=0)
        private, public = generate_signing_key(work / "keys", "ops")
        self.key_path = private
        self.key = load_private_key(private)
        trusted = TrustedKeys.load([public])
        ota = OtaSettings(probation_s=probation_s, stall_timeout_s=30.0)
        self.devices = [SimDevice(f"sim-{i:02d}", ("fleet",), work / "devices" / f"sim-{i:02d}",
                                  port, self.seed, trusted, ota, interval_s,
                                  rng_seed=i, **host_options)
                        for i in range(1, count + 1)]
        self.watcher: FleetWatcher | None = None

    def start(self) -> SimFleet:
        for device in self.devices:
            device.start_link()
        for device in self.devices:
            assert device.link.wait_connected(15), f"{device.device_id} did not connect"
        for device in self.devices:
            device.telemetry.start()
        self.watcher = FleetWatcher(OperatorConfig(host="127.0.0.1", port=self.port,
                                                   client_id_prefix="test-ops"))
        self.watcher.start()
        ids = {d.device_id for d in self.devices}
        assert self.watcher.state.wait_until(
            lambda: ids <= {r.device_id for r in self.watcher.state.rows() if r.online}, 15)
        return self

    @staticmethod
    def publish(client, topic: str, payload: bytes, retain: bool = False) -> None:
        publish_bytes(client, topic, payload, retain=retain, timeout_s=30)

    def stop(self) -> None:
        for device in self.devices:
            device.telemetry.stop()
        for device in self.devices:
            device.updater.stop()
        for device in self.devices:
            device.link.stop()
        if self.watcher is not None:
            self.watcher.stop()


class ServiceProcess:
    """`sightline cloud serve` on the test broker; its log goes to a file."""

    def __init__(self, work: Path, db_url: str, broker_port: int, *extra: str) -> None:
        self.work = work
        self.db_url = db_url
        self.broker_port = broker_port
        self.extra = extra
        self.http_port = free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 30.0) -> ServiceProcess:
        self.starts += 1
        log = self.work / f"service-{self.starts}.log"
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [*SIGHTLINE, "cloud", "serve", "--db", self.db_url,
                 "--broker", f"127.0.0.1:{self.broker_port}",
                 "--http", f"127.0.0.1:{self.http_port}", "--client-id", "test-cloud",
                 *self.extra], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log.read_text()
            if "recording into" in text:
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"sightline cloud serve exited: {text}")
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"sightline cloud serve did not start: {log.read_text()}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            body = response.read()
        return json.loads(body) if path != "/metrics" else body.decode()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.terminate()
        return self.process.wait(30)

"""OTA against real processes: `sightline serve --broker` on a real mosquitto, updates
packaged, signed and published by the operator code, frames streamed by the client SDK."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from cloud_sync.topics import Channel, device_topics, fleet_filter
from runtime.client import Client
from tests.cloud_sync.ota_harness import MODEL, Operator, frame_64, tiny_bundle

DEVICE = "edge-01"


@pytest.fixture
def operator(broker, observer_factory, short_tmp: Path) -> Operator:
    observer = observer_factory(broker.port, [fleet_filter(Channel.OTA_PROGRESS),
                                              fleet_filter(Channel.STATUS)])
    return Operator(short_tmp / "ops", observer)


@pytest.fixture
def device(broker, daemon_factory, operator, short_tmp: Path):
    """Start `sightline serve` for tiny@1.0 as DEVICE; returns a starter for restarts."""
    seed = tiny_bundle(short_tmp / "seed", "1.0")
    state = short_tmp / "state"

    def start(env: dict | None = None, probation_s: float = 1.0):
        config = short_tmp / "cloud.toml"
        config.write_text(f"[cloud]\ntelemetry_interval_s = 1\n"
                          f"[cloud.ota]\nprobation_s = {probation_s}\nstall_timeout_s = 10\n")
        return daemon_factory("--config", str(config), "--model", str(seed.directory),
                              "--broker", f"127.0.0.1:{broker.port}", "--device-id", DEVICE,
                              "--group", "lab", "--state-dir", str(state),
                              "--trusted-key", str(operator.public_path),
                              endpoint=f"ipc://{short_tmp}/d-{time.monotonic_ns()}.sock", env=env)

    return start


def _version(daemon) -> str:
    with Client(daemon.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        client.send(frame_64())
        reply = client.recv(timeout=10)
    assert reply is not None and reply.ok, reply
    return reply.message["model_version"]


def test_signed_update_swaps_while_a_client_streams_and_no_frame_fails(
        device, operator, short_tmp):
    daemon = device()
    replies = []
    stop = threading.Event()

    def stream() -> None:
        with Client(daemon.endpoint, max_in_flight=1) as client:
            assert client.wait_connected(10)
            while not stop.is_set():
                client.send(frame_64())
                reply = client.recv(timeout=10)
                replies.append(reply)
                time.sleep(0.02)  # a 50 fps headset, under the daemon's per-client cap

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        time.sleep(0.5)
        command = operator.push(tiny_bundle(short_tmp / "v2", "2.0"), DEVICE)
        done = operator.wait_state(DEVICE, command.update_id, "confirmed", "failed", timeout=60)
        time.sleep(0.5)
    finally:
        stop.set()
        streamer.join()
    assert done["state"] == "confirmed", operator.progress(DEVICE)
    states = operator.states(DEVICE, command.update_id)
    steps = [s for s in states if s != "downloading"]
    assert steps == ["accepted", "downloaded", "unpacked", "prepared", "validated", "active",
                     "confirmed"], states
    failed = [(r.kind, r.message) for r in replies if r is None or not r.ok]
    assert not failed, failed[:3]
    versions = [r.message["model_version"] for r in replies]
    assert versions[0] == "1.0" and versions[-1] == "2.0"
    assert versions == sorted(versions), "once swapped, every reply comes from the new model"
    status = json.loads(operator.observer.on(device_topics(DEVICE).status)[-1].payload)
    assert status["models"][MODEL]["version"] == "2.0"
    assert status["models"][MODEL]["previous"] == "1.0"

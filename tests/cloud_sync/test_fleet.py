"""The operator's fleet view and MQTT session, against a real mosquitto: devices are
plain paho clients publishing what a Sightline device publishes."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from rich.console import Console

from cloud_sync.fleet import DeviceRow, FleetState, FleetWatcher, render_fleet, watch_fleet
from cloud_sync.operator import (
    OperatorConfig,
    OperatorError,
    connect,
    disconnect,
    publish_json,
)
from cloud_sync.topics import device_topics

A, B = device_topics("edge-01"), device_topics("edge-02")


def status(state: str, ts: float, **extra) -> dict:
    return {"state": state, "ts": ts, "outbox": {"queued": 0}, **extra}


def telemetry(ts: float, fps: float, *p99s: float) -> dict:
    return {"schema": "sightline.telemetry", "ts": ts, "fps": fps, "clients": 1,
            "models": [{"name": f"m{i}", "version": "1", "fps": fps,
                        "latency_ms": {"total": {"n": 120, "p50": 1.0, "p95": 2.0,
                                                 "p99": p99}}}
                       for i, p99 in enumerate(p99s)]}


def progress(ts: float, update_id: str, state: str, **extra) -> dict:
    return {"ts": ts, "update_id": update_id, "model": "centerface", "version": "1.1",
            "state": state, **extra}


class Device:
    """Publishes as a device would (QoS 1), waiting for each PUBACK."""

    def __init__(self, observer) -> None:
        self.client = observer.client

    def send(self, topic: str, payload: dict | bytes, retain: bool = False) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, body, qos=1, retain=retain).wait_for_publish(5)


@pytest.fixture
def device(broker, observer_factory) -> Device:
    return Device(observer_factory(broker.port, []))


@pytest.fixture
def config(broker) -> OperatorConfig:
    return OperatorConfig(port=broker.port)


@pytest.fixture
def watcher(config) -> Iterator[FleetWatcher]:
    with FleetWatcher(config) as fleet:
        yield fleet


def wait_rows(state: FleetState, predicate, timeout: float = 5.0) -> list[DeviceRow]:
    assert state.wait_until(lambda: predicate({r.device_id: r for r in state.rows()}),
                            timeout), f"timed out; rows: {state.rows()}"
    return state.rows()


def test_status_and_telemetry_become_one_row_per_device(device, watcher):
    device.send(A.status, status("online", 100.0, device_id="edge-01", groups=["lab", "eu"],
                                 models={"centerface": {"version": "1.1", "previous": "1.0",
                                                        "probation": True}}), retain=True)
    device.send(B.status, status("online", 101.0), retain=True)
    device.send(A.telemetry, telemetry(105.0, 29.5, 31.2, 48.0, 12.5))
    rows = wait_rows(watcher.state, lambda r: r.get("edge-01") and r["edge-01"].fps
                     and "edge-02" in r)
    assert [r.device_id for r in rows] == ["edge-01", "edge-02"]
    first, second = rows
    assert first == DeviceRow("edge-01", True, ("lab", "eu"), ("centerface@1.1",), 29.5,
                              48.0, None, 105.0)
    assert second.online is True and second.fps is None and second.p99_ms is None
    assert second.groups == () and second.models == ()


def test_retained_offline_status_flips_device_to_offline(device, watcher):
    device.send(A.status, status("online", 100.0), retain=True)
    wait_rows(watcher.state, lambda r: "edge-01" in r and r["edge-01"].online)
    # The Last Will's ts is the connect's, older than "online": arrival order decides.
    device.send(A.status, status("offline", 99.0, reason="connection-lost"), retain=True)
    rows = wait_rows(watcher.state, lambda r: r["edge-01"].online is False)
    assert rows[0].last_seen == 100.0


def test_after_a_last_will_the_row_shows_what_the_device_last_said_it_served(
        device, watcher, config):
    served = {"centerface": {"version": "1.2", "previous": "1.1", "probation": True}}
    device.send(A.status, status("online", 100.0, groups=["lab"], models=served, ota={
        "update_id": "u-9", "model": "centerface", "version": "1.2", "state": "active",
        "ts": 100.0}), retain=True)
    device.send(A.telemetry, telemetry(101.0, 30.0, 5.0))  # m0@1: older than the status
    wait_rows(watcher.state, lambda r: "edge-01" in r and r["edge-01"].fps is not None)
    will = {"state": "offline", "reason": "connection-lost", "ts": 90.0,
            "device_id": "edge-01", "groups": ["lab"]}
    device.send(A.status, will, retain=True)
    (row,) = wait_rows(watcher.state, lambda r: r["edge-01"].online is False)
    assert row.models == ("centerface@1.2",) and row.ota == "centerface@1.2 active"
    assert row.groups == ("lab",)
    with FleetWatcher(config) as late:  # started after the Will: no version to show
        (row,) = wait_rows(late.state, lambda r: "edge-01" in r)
    assert row.online is False and row.models == () and row.groups == ("lab",)


def test_newest_ota_information_wins_between_status_and_progress(device, watcher):
    state = watcher.state
    device.send(A.status, status("online", 100.0, ota={
        "update_id": "u-6", "model": "centerface", "version": "1.0", "state": "confirmed",
        "ts": 100.0}), retain=True)
    wait_rows(state, lambda r: "edge-01" in r)
    assert state.rows()[0].ota == "centerface@1.0 confirmed"

    long_reason = "signature does not verify against the fleet key " + "x" * 80
    device.send(A.ota_progress, progress(200.0, "u-7", "downloading", percent=40))
    wait_rows(state, lambda r: "downloading" in (r["edge-01"].ota or ""))
    assert state.rows()[0].ota == "centerface@1.1 downloading 40%"
    device.send(A.ota_progress, progress(210.0, "u-7", "failed", detail=long_reason))
    rows = wait_rows(state, lambda r: "failed" in (r["edge-01"].ota or ""))
    ota = rows[0].ota
    assert ota.startswith("centerface@1.1 failed: signature does not verify")
    assert len(ota) < len("centerface@1.1 failed: ") + 61 and ota.endswith("…")

    # A newer status document (a later update, confirmed) now wins over the progress.
    device.send(A.status, status("online", 300.0, ota={
        "update_id": "u-8", "model": "centerface", "version": "1.2", "state": "confirmed",
        "ts": 300.0}), retain=True)
    rows = wait_rows(state, lambda r: "1.2" in (r["edge-01"].ota or ""))
    assert rows[0].ota == "centerface@1.2 confirmed"


def test_progress_keeps_the_last_document_per_device_and_update(device, watcher):
    state = watcher.state
    device.send(A.ota_progress, progress(10.0, "u-7", "downloading", percent=40))
    device.send(A.ota_progress, progress(11.0, "u-7", "accepted"))
    device.send(A.ota_progress, progress(10.0, "u-7", "downloading", percent=40))  # re-sent
    device.send(A.ota_progress, progress(12.0, "u-8", "current"))
    device.send(B.ota_progress, progress(13.0, "u-7", "rejected", detail="too old"))
    assert state.wait_until(lambda: len(state.all_progress("u-7")) == 2
                            and state.progress("edge-01", "u-8") is not None, 5)
    assert state.progress("edge-01", "u-7")["state"] == "accepted"
    assert {d: p["state"] for d, p in state.all_progress("u-7").items()} == {
        "edge-01": "accepted", "edge-02": "rejected"}
    assert state.progress("edge-02", "u-8") is None
    record = state.device("edge-01")
    assert set(record.progress) == {"u-7", "u-8"} and record.status is None
    record.progress["u-7"]["state"] = "changed by caller"  # a copy: the state is unharmed
    assert state.progress("edge-01", "u-7")["state"] == "accepted"


def test_non_json_payloads_and_foreign_topics_are_ignored(broker, device, observer_factory):
    everything = observer_factory(broker.port, ["#"])
    device.send("other/app/devices/edge-05/status", status("online", 1.0))
    device.send("sightline/v1/devices/edge-06/status", b"\xff\x00 not json", retain=True)
    device.send("sightline/v1/devices/edge-07/telemetry", b"[1, 2, 3]")
    device.send("sightline/v1/devices/edge-08/ota/command", {"update_id": "u-1"})
    device.send("sightline/v1/devices/edge-08/ota/progress", {"ts": 1.0, "state": "x"})
    device.send(A.status, status("online", 2.0), retain=True)
    messages = everything.wait_for(lambda ms: any(m.topic == A.status for m in ms))
    state = FleetState()
    for message in messages:
        state.apply(message.topic, message.payload)
    assert [row.device_id for row in state.rows()] == ["edge-01"]


def test_empty_retained_status_removes_a_retired_device(device, watcher):
    device.send(A.status, status("online", 1.0), retain=True)
    device.send(B.status, status("online", 1.0), retain=True)
    wait_rows(watcher.state, lambda r: len(r) == 2)
    device.send(A.status, b"", retain=True)
    rows = wait_rows(watcher.state, lambda r: list(r) == ["edge-02"])
    assert rows[0].device_id == "edge-02"


def test_watcher_sees_retained_status_of_devices_that_published_before_it(
        broker, observer_factory, config):
    early = Device(observer_factory(broker.port, []))
    early.send(A.status, status("offline", 50.0, groups=["lab"]), retain=True)
    early.send(B.status, status("online", 60.0), retain=True)
    early.client.disconnect()
    with FleetWatcher(config) as watcher:
        rows = wait_rows(watcher.state, lambda r: len(r) == 2)
    assert [(r.device_id, r.online, r.groups) for r in rows] == [
        ("edge-01", False, ("lab",)), ("edge-02", True, ())]


def test_render_fleet_shows_every_column():
    rows = [
        DeviceRow("edge-01", True, ("lab", "eu"), ("centerface@1.1",), 29.5, 31.2,
                  "centerface@1.1 confirmed", 997.0),
        DeviceRow("edge-02", False, (), (), None, None,
                  "u-7 failed: signature does not verify", 1000.0 - 7200),
        DeviceRow("edge-03", None, (), (), None, None, None, 1000.0),
    ]
    console = Console(record=True, width=200)
    console.print(render_fleet(rows, now=1000.0))
    text = console.export_text()
    for heading in ("device", "online", "groups", "model", "fps", "p99 ms", "last OTA",
                    "seen"):
        assert heading in text
    lines = {line.split()[1]: line for line in text.splitlines() if "edge-0" in line}
    assert all(part in lines["edge-01"] for part in (
        "online", "lab, eu", "centerface@1.1", "29.5", "31.2", "confirmed", "3s ago"))
    assert "offline" in lines["edge-02"] and "2h ago" in lines["edge-02"]
    assert "u-7 failed: signature does not verify" in lines["edge-02"]
    assert "?" in lines["edge-03"]
    assert "3 devices, 1 online" in text


def test_watch_fleet_once_prints_the_table_and_returns_rows(device, config):
    device.send(A.status, status("online", time.time()), retain=True)
    console = Console(record=True, width=200)
    rows = watch_fleet(config, console, once_after_s=0.5)
    assert [(r.device_id, r.online) for r in rows] == [("edge-01", True)]
    assert "edge-01" in console.export_text()


def test_connect_to_a_port_with_nothing_listening_names_the_address():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OperatorError, match=f"cannot reach the broker at 127.0.0.1:{port}"):
        connect(OperatorConfig(port=port), "test-op", timeout_s=2)


def test_connect_refused_by_the_broker_points_at_credentials(broker_factory):
    closed = broker_factory("allow_anonymous false\n")
    with pytest.raises(OperatorError, match="broker refused the connection: .*--username"):
        connect(OperatorConfig(port=closed.port), "test-op", timeout_s=5)


def test_publish_json_returns_after_the_puback(broker, config, observer_factory):
    observer = observer_factory(broker.port, [A.ota_command])
    client = connect(config, "test-op")
    try:
        assert client.protocol == MQTTProtocolVersion.MQTTv5
        publish_json(client, A.ota_command, {"update_id": "u-7", "version": "1.1"},
                     retain=True)
    finally:
        disconnect(client)
    received = observer.wait_for(lambda ms: bool(ms))
    assert json.loads(received[0].payload) == {"update_id": "u-7", "version": "1.1"}
    assert not client.is_connected()


def test_publish_json_raises_when_the_acl_refuses_the_message(broker_factory, work_dir):
    # Anonymous clients (the rules before any `user` line) may read but not write.
    acl = work_dir / "read-only.acl"
    acl.write_text("topic read sightline/v1/#\n")
    read_only = broker_factory(f"allow_anonymous true\nacl_file {acl}\n")
    client = connect(OperatorConfig(port=read_only.port), "test-op")
    try:
        with pytest.raises(OperatorError, match="refused the message on .*Not authorized"):
            publish_json(client, A.ota_command, {"update_id": "u-7"})
    finally:
        disconnect(client)


def test_connect_falls_back_to_311_when_the_broker_refuses_v5(fake_v311_broker):
    client = connect(OperatorConfig(port=fake_v311_broker.port), "test-op", timeout_s=5)
    try:
        assert client.protocol == MQTTProtocolVersion.MQTTv311
        assert fake_v311_broker.levels == [5, 4]
        publish_json(client, A.ota_command, {"update_id": "u-7"}, timeout_s=5)
    finally:
        disconnect(client)

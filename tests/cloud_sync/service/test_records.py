"""What each message does to the database: the history outcomes with their reasons,
duplicates dropped, restarts counted, rollouts followed from the devices' reports."""

from __future__ import annotations

import json

import pytest

from cloud_sync.service.api import device_history, rollout_detail
from cloud_sync.service.database import open_database
from cloud_sync.service.models import Device, Message, OtaEvent, TelemetrySample
from cloud_sync.service.records import Delivered, apply_batch
from cloud_sync.topics import device_topics


def status(device, state="online", ts=100.0, **extra):
    document = {"state": state, "ts": ts, "device_id": device, "groups": ["lab"],
                "outbox": {"queued": 0, "dropped_telemetry": 0, "rejected_by_broker": 0},
                "models": {"tiny": {"version": "1.0", "previous": None, "probation": False}},
                "ota": None, **extra}
    return Delivered(device_topics(device).status, json.dumps(document).encode(), ts)


def telemetry(device, ts, uptime, fps=30.0, p99=14.0, version="1.0"):
    document = {"ts": ts, "sequence": int(ts), "uptime_s": uptime, "fps": fps,
                "frames": {"received": int(ts) * 10, "dropped": 1},
                "models": [{"name": "tiny", "version": version, "fps": fps, "errors": 0,
                            "results": int(ts) * 10,
                            "latency_ms": {"total": {"n": 9, "p50": 8.0, "p95": 9.0,
                                                     "p99": p99}}}]}
    return Delivered(device_topics(device).telemetry, json.dumps(document).encode(), ts)


def progress(device, update_id, state, ts, **extra):
    document = {"ts": ts, "update_id": update_id, "model": "tiny", "version": "2.0",
                "state": state, "serving": {"tiny": "1.0"}, **extra}
    return Delivered(device_topics(device).ota_progress, json.dumps(document).encode(), ts)


@pytest.fixture
def sessions(db_url):
    engine, sessions = open_database(db_url)
    yield sessions
    engine.dispose()


def test_each_change_records_how_it_ended_with_the_devices_reason(sessions):
    batch = [status("edge-a"), status("edge-b"),
             *(telemetry("edge-a", t, uptime=t) for t in (101.0, 102.0, 103.0)),
             progress("edge-a", "u1", "accepted", 110.0),
             progress("edge-a", "u1", "active", 111.0),
             progress("edge-a", "u1", "confirmed", 112.0, detail="healthy for 60 s"),
             progress("edge-b", "u1", "accepted", 110.0),
             progress("edge-b", "u1", "active", 111.0),
             progress("edge-b", "u1", "rolled_back", 113.0,
                      detail="probation: 7 of 20 frames failed"),
             progress("edge-b", "u2", "rejected", 120.0, check="downgrade",
                      detail="2.0 is older than 3.0")]
    with sessions() as session:
        result = apply_batch(session, batch)
    assert result.stored == {"status": 2, "telemetry": 3, "ota/progress": 7}
    with sessions() as session:
        a, b = device_history(session, "edge-a"), device_history(session, "edge-b")
        assert [(c["update_id"], c["outcome"], c["from_version"], c["to_version"])
                for c in a] == [("u1", "confirmed", "1.0", "2.0")]
        assert a[0]["fps_before"] == 30.0 and a[0]["p99_before"] == 14.0
        assert [(c["update_id"], c["outcome"], c["reason"]) for c in b] == [
            ("u2", "rejected", "downgrade: 2.0 is older than 3.0"),
            ("u1", "rolled_back", "probation: 7 of 20 frames failed")]
        rollout = rollout_detail(session, "u1")
        assert rollout["state"] == "failed"  # one device rolled back
        assert {s["device_id"]: s["state"] for s in rollout["steps"]} == {
            "edge-a": "confirmed", "edge-b": "rolled_back"}
        assert device_history(session, "nobody") is None


def test_a_redelivered_message_changes_nothing(sessions):
    batch = [status("edge-a"), telemetry("edge-a", 101.0, 1.0),
             progress("edge-a", "u1", "accepted", 110.0)]
    with sessions() as session:
        apply_batch(session, batch)
    with sessions() as session:
        again = apply_batch(session, [*batch, batch[1]])
        assert again.duplicates == 4 and again.stored == {}
        assert session.query(Message).count() == 3
        assert session.query(TelemetrySample).count() == 1
        assert session.query(OtaEvent).count() == 1


def test_an_untrusted_command_reaches_the_history_but_a_canarys_replay_does_not(sessions):
    untrusted = Delivered(device_topics("edge-a").ota_progress, json.dumps(
        {"ts": 130.0, "state": "rejected", "check": "signature", "detail": "unknown key_id",
         "unverified": {"model": "tiny", "version": "9.9"}}).encode(), 130.0)
    replay = Delivered(device_topics("edge-a").ota_progress, json.dumps(
        {"ts": 131.0, "state": "rejected", "check": "replay", "detail": "seen before",
         "replay_of": {"type": "update", "update_id": "u1", "model": "tiny"}}).encode(), 131.0)
    with sessions() as session:
        apply_batch(session, [status("edge-a"), untrusted, replay])
        history = device_history(session, "edge-a")
        assert [(c["outcome"], c["to_version"], c["reason"]) for c in history] == [
            ("rejected", "9.9", "signature: unknown key_id")]
        assert session.query(OtaEvent).count() == 2  # both events are kept


def test_a_daemon_restart_is_counted_from_its_uptime_and_the_will_marks_it_offline(sessions):
    batch = [status("edge-a"), telemetry("edge-a", 101.0, uptime=500.0),
             telemetry("edge-a", 102.0, uptime=501.0),
             status("edge-a", "offline", 90.0, reason="connection-lost"),
             telemetry("edge-a", 120.0, uptime=3.0)]
    with sessions() as session:
        apply_batch(session, batch)
        device = session.get(Device, "edge-a")
        assert device.restarts == 1
        assert device.online is False and device.offline_reason == "connection-lost"


def test_a_canary_stage_that_ended_is_reopened_by_the_rest_of_the_rollout(sessions):
    with sessions() as session:
        apply_batch(session, [progress("edge-a", "u1", "confirmed", 110.0)])
        assert rollout_detail(session, "u1")["state"] == "completed"
        apply_batch(session, [progress("edge-b", "u1", "accepted", 120.0)])
        assert rollout_detail(session, "u1")["state"] == "running"

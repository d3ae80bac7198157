"""Telemetry publisher: the JSON envelope, the interval, and failures that are counted and
logged but never raised into the daemon."""

from __future__ import annotations

import json
import logging
import math
import threading
import time

import pytest

from cloud_sync.telemetry import SCHEMA, SCHEMA_VERSION, TelemetryPublisher
from runtime.daemon.metrics import Metrics

STATUS = {
    "version": "0.1.0", "uptime_s": 30.0, "clients": 1,
    "counters": {"frames": 50, "superseded": 4, "errors": {"RATE_LIMITED": 2}},
    "models": [{"name": "centerface", "version": "1.5.0", "task": "face", "provider": "CPU",
                "default": True, "results": 44, "expired": 1, "errors": 0}],
}


def daemon_snapshot() -> dict:
    metrics = Metrics()
    start = time.time()
    metrics.observe_frame("centerface", {
        "received": start, "decoded": start + 0.002, "preprocessed": start + 0.003,
        "inferred": start + 0.025, "postprocessed": start + 0.0255, "sent": start + 0.026})
    return metrics.collect_snapshot(STATUS)


def test_payload_is_versioned_json_with_the_daemon_figures():
    sent: list[bytes] = []
    publisher = TelemetryPublisher(daemon_snapshot, sent.append, 10, device_id="edge-07",
                                   clock=lambda: 1_767_225_600.25)
    assert publisher.publish_once()
    (raw,) = sent
    assert isinstance(raw, bytes)
    payload = json.loads(raw)
    assert payload["schema"] == SCHEMA == "sightline.telemetry"
    assert payload["schema_version"] == SCHEMA_VERSION == 1
    assert payload["device_id"] == "edge-07" and payload["sequence"] == 1
    assert payload["ts"] == 1_767_225_600.25
    assert payload["time"] == "2026-01-01T00:00:00.250+00:00"
    assert payload["interval_s"] == 10
    (model,) = payload["models"]
    assert (model["name"], model["version"]) == ("centerface", "1.5.0")
    assert set(model["latency_ms"]) == {"decode", "preprocess", "inference", "postprocess",
                                        "total"}
    assert set(model["latency_ms"]["inference"]) == {"n", "p50", "p95", "p99"}
    assert model["latency_ms"]["inference"]["p50"] == pytest.approx(22.0, abs=1e-3)
    assert "fps" in model and "fps" in payload
    assert payload["frames"]["dropped"] == 5 and payload["clients"] == 1
    assert payload["errors"] == {"RATE_LIMITED": 2}
    assert "host" in payload and "jetson" in payload
    assert payload["telemetry"] == {"published": 0, "failures": 0}


def test_non_finite_numbers_become_null_and_envelope_keys_win():
    sent: list[bytes] = []
    snapshot = {"fps": math.nan, "host": {"temperatures_c": {"x": math.inf}},
                "device_id": "spoofed", "models": [{"fps": -math.inf}]}
    TelemetryPublisher(lambda: snapshot, sent.append, device_id="edge-07").publish_once()
    payload = json.loads(sent[0])
    assert payload["fps"] is None and payload["host"]["temperatures_c"]["x"] is None
    assert payload["models"][0]["fps"] is None
    assert payload["device_id"] == "edge-07"


def test_publishes_every_interval_on_a_named_thread_and_stops():
    sent: list[tuple[float, bytes]] = []
    publisher = TelemetryPublisher(lambda: {"fps": 1.0},
                                   lambda payload: sent.append((time.monotonic(), payload)),
                                   interval_s=0.1, device_id="edge-07")
    started = time.monotonic()
    publisher.start()
    names = [t.name for t in threading.enumerate()]
    assert "sightline-telemetry" in names
    time.sleep(0.55)
    publisher.stop()
    assert "sightline-telemetry" not in [t.name for t in threading.enumerate()]
    count = len(sent)
    assert 3 <= count <= 6, count
    assert sent[0][0] - started >= 0.09  # the first one after one interval
    gaps = [b[0] - a[0] for a, b in zip(sent, sent[1:], strict=False)]
    assert all(0.05 < gap < 0.3 for gap in gaps), gaps
    assert [json.loads(p)["sequence"] for _, p in sent] == list(range(1, count + 1))
    time.sleep(0.25)
    assert len(sent) == count  # nothing after stop()


def test_failures_are_counted_logged_once_and_never_raised(caplog):
    calls = {"snapshot": 0, "publish": 0}
    sent: list[bytes] = []

    def snapshot():
        calls["snapshot"] += 1
        if calls["snapshot"] == 2:
            raise RuntimeError("status socket closed")
        return {"fps": 2.0}

    def publish(payload: bytes):
        calls["publish"] += 1
        if calls["publish"] in (2, 3):
            raise ConnectionError("broker unreachable")
        sent.append(payload)

    publisher = TelemetryPublisher(snapshot, publish, 0.05, device_id="edge-07")
    with caplog.at_level(logging.DEBUG, logger="cloud_sync.telemetry"):
        results = [publisher.publish_once() for _ in range(5)]
    assert results == [True, False, False, False, True]
    assert publisher.failures == 3 and publisher.published == 2
    assert publisher.last_error == "ConnectionError: broker unreachable"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info  # the first failure of the run, once
    assert any("published again" in r.getMessage() for r in caplog.records)
    assert json.loads(sent[-1])["telemetry"] == {"published": 1, "failures": 3}


def test_a_failing_thread_keeps_running():
    attempts = []

    def publish(payload: bytes):
        attempts.append(payload)
        raise OSError("outbox disk full")

    with TelemetryPublisher(lambda: {}, publish, 0.05, device_id="edge-07") as publisher:
        deadline = time.monotonic() + 5
        while len(attempts) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(attempts) >= 3 and publisher.failures >= 3


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        TelemetryPublisher(dict, print, 0, device_id="edge-07")
    with pytest.raises(ValueError):
        TelemetryPublisher(dict, print, 1, device_id="")

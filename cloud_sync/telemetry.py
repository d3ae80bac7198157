"""Telemetry up: every few seconds, the daemon's figures as one JSON message for the cloud.

`TelemetryPublisher` owns one named thread. Each turn it takes a snapshot (in the daemon:
`Metrics.collect_snapshot` over `DaemonStatus`), wraps it in the versioned envelope below and
hands the UTF-8 JSON to `publish_fn` (in the daemon `lambda payload:
link.publish(Channel.TELEMETRY, payload)`, which queues it in the outbox). A failing
snapshot or publish is logged and counted, never raised: telemetry must not hurt serving.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = "sightline.telemetry"
SCHEMA_VERSION = 1


class TelemetryPublisher:
    """Publish `snapshot_fn()` every `interval_s` seconds through `publish_fn(payload)`.

    The payload is compact UTF-8 JSON (bytes): `schema`, `schema_version`, `device_id`,
    `sequence`, `ts` (Unix seconds, as MqttLink.publish stamps mappings) and `time` (ISO
    8601, UTC), `interval_s`, the publisher's own `telemetry` counters, then every key of
    the snapshot (`models` with versions, fps and p50/p95/p99 per stage, `frames` with
    dropped/superseded/expired, `clients`, `errors` by code, `host`, `jetson`). Non-finite
    floats become null. The first message goes out one interval after `start()`.
    """

    def __init__(self, snapshot_fn: Callable[[], Mapping[str, Any]],
                 publish_fn: Callable[[bytes], object], interval_s: float = 10.0, *,
                 device_id: str, clock: Callable[[], float] = time.time) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if not device_id:
            raise ValueError("telemetry needs a device id")
        self.interval_s = interval_s
        self.device_id = device_id
        self._snapshot = snapshot_fn
        self._publish = publish_fn
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sequence = 0  # messages built, published or not
        self.published = 0
        self.failures = 0  # snapshots or publishes that raised
        self.last_error: str | None = None
        self._failing = False

    def start(self) -> TelemetryPublisher:
        if self._thread is not None:
            raise RuntimeError("the telemetry publisher is already started")
        self._thread = threading.Thread(target=self._run, name="sightline-telemetry",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Signal the thread and join it (a publish in progress is waited for, up to
        `timeout_s`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("telemetry thread still busy after %.1f s (a slow publish?)",
                            timeout_s)

    def __enter__(self) -> TelemetryPublisher:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def build_payload(self) -> dict[str, Any]:
        """One envelope around a fresh snapshot (raises what snapshot_fn raises)."""
        snapshot = dict(self._snapshot())
        now = self._clock()
        self.sequence += 1
        envelope = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "device_id": self.device_id,
            "sequence": self.sequence,
            "ts": round(now, 3),  # the key MqttLink.publish adds to mappings
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
            "interval_s": self.interval_s,
            "telemetry": {"published": self.published, "failures": self.failures},
        }
        for key in envelope:
            snapshot.pop(key, None)  # the envelope's keys are the envelope's
        return _finite({**envelope, **snapshot})

    def publish_once(self) -> bool:
        """Build and publish one message now; False (counted and logged) if it failed."""
        try:
            payload = json.dumps(self.build_payload(), separators=(",", ":"),
                                 allow_nan=False).encode()
            self._publish(payload)
        except Exception as exc:  # never into the daemon: count, log, carry on
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if not self._failing:  # the first of a run of failures with its traceback
                log.warning("telemetry not published: %s", self.last_error, exc_info=True)
            else:
                log.debug("telemetry not published: %s", self.last_error)
            self._failing = True
            return False
        if self._failing:
            log.info("telemetry published again (%d failures so far)", self.failures)
            self._failing = False
        self.published += 1
        return True

    def _run(self) -> None:
        due = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            self.publish_once()
            # Fixed rate; after a stall (slow publish, suspended device) skip the missed
            # turns rather than sending a burst.
            due += self.interval_s
            now = time.monotonic()
            if due <= now:
                due = now + self.interval_s


def _finite(value: Any) -> Any:
    """The same structure with NaN and infinities as None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

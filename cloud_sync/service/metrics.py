"""Fleet metrics for Prometheus, read from the database at scrape time.

Read from the database, not from this instance's memory: with several instances
splitting telemetry (shared subscription), each one's /metrics shows the whole fleet.

Label cardinality is bounded by design: `device` (the fleet's size), `model` (models per
device, a handful), `state`/`outcome` (fixed enums). The model *version* appears only on
the info metric and the per-version aggregates, so an update replaces a series instead
of adding one per device per version. With one model per device that is 22 series a
device: 220,000 for 10,000 devices (docs/cloud-service.md has the measured scrape cost).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from sqlalchemy import func, select

from cloud_sync.service.figures import figures
from cloud_sync.service.models import Device, VersionChange
from cloud_sync.service.records import OUTCOMES

OTA_STATES = ("accepted", "downloading", "downloaded", "unpacked", "prepared", "validated",
              "active", "confirmed", "failed", "rejected", "rolled_back", "interrupted",
              "current")


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


class FleetCollector:
    """A prometheus_client collector over the service's database."""

    def __init__(self, sessions, budgets: Mapping[str, float] | None = None,
                 ingest_counters=None) -> None:
        self._sessions = sessions
        self._budgets = dict(budgets or {})
        self._counters = ingest_counters

    def describe(self):
        return []  # collected on demand: no registration-time scrape of the database

    def collect(self) -> Iterator:
        now = time.time()
        with self._sessions() as session:
            devices = session.scalars(select(Device)).all()
            outcomes = session.execute(
                select(VersionChange.device_id, VersionChange.outcome, func.count())
                .group_by(VersionChange.device_id, VersionChange.outcome)).all()
            crash_loops = session.execute(
                select(VersionChange.device_id, func.count())
                .where(VersionChange.outcome == "rolled_back",
                       VersionChange.reason.like("%crash loop%"))
                .group_by(VersionChange.device_id)).all()
            latest = _latest_changes(session)
        yield from self._fleet(devices, now)
        yield from self._per_device(devices, now)
        yield from self._ota(devices, outcomes, crash_loops, latest)
        yield from self._per_version(devices)
        budget = GaugeMetricFamily("sightline_model_latency_budget_ms",
                                   "The p99 round-trip budget of a model (service config).",
                                   labels=["model"])
        for model, ms in sorted(self._budgets.items()):
            budget.add_metric([model], ms)
        yield budget
        yield from self._service()

    def _fleet(self, devices, now: float) -> Iterator:
        by_state = defaultdict(int)
        for device in devices:
            by_state["online" if device.online else "offline" if device.online is False
                     else "unknown"] += 1
        total = GaugeMetricFamily("sightline_fleet_devices", "Devices by status.",
                                  labels=["state"])
        for state in ("online", "offline", "unknown"):
            total.add_metric([state], by_state[state])
        yield total

    def _per_device(self, devices, now: float) -> Iterator:
        def gauge(name, text, labels=("device",)):
            return GaugeMetricFamily(name, text, labels=list(labels))

        def counter(name, text):
            return CounterMetricFamily(name, text, labels=["device"])

        online = gauge("sightline_device_online", "1 while the device's status is online.")
        age = gauge("sightline_device_last_seen_age_seconds",
                    "Seconds since the service last received anything from the device.")
        stale = gauge("sightline_device_telemetry_age_seconds",
                      "Seconds since the service last received the device's telemetry.")
        info = InfoMetricFamily("sightline_device_model", "The model versions a device serves.",
                                labels=["device", "model"])
        fps = gauge("sightline_device_fps", "Frames per second, per model.", ("device", "model"))
        p50 = gauge("sightline_device_latency_p50_ms", "End-to-end p50, per model.",
                    ("device", "model"))
        p99 = gauge("sightline_device_latency_p99_ms", "End-to-end p99, per model.",
                    ("device", "model"))
        received = counter("sightline_device_frames_received",
                           "Frames the daemon received (since it started).")
        dropped = counter("sightline_device_frames_dropped",
                          "Frames dropped: superseded by a newer one or expired.")
        results = counter("sightline_device_results", "Frames answered, all models.")
        errors = counter("sightline_device_errors", "Frames that failed, all models.")
        restarts = counter("sightline_device_restarts",
                           "Daemon restarts the service saw (uptime went backwards).")
        for device in devices:
            d = device.device_id
            if device.online is not None:
                online.add_metric([d], 1.0 if device.online else 0.0)
            age.add_metric([d], max(0.0, now - device.last_heard))
            if device.last_telemetry is not None:
                stale.add_metric([d], max(0.0, now - device.last_telemetry))
            restarts.add_metric([d], device.restarts)
            for name, served in sorted((device.models or {}).items()):
                version = served.get("version") if isinstance(served, dict) else served
                if isinstance(version, str):
                    info.add_metric([d, name], {"version": version})
            telemetry = device.latest_telemetry
            if not telemetry:
                continue
            for model in telemetry.get("models") or []:
                if not isinstance(model, dict) or not isinstance(model.get("name"), str):
                    continue
                labels = [d, model["name"]]
                if _number(model.get("fps")) is not None:
                    fps.add_metric(labels, model["fps"])
                total = (model.get("latency_ms") or {}).get("total") or {}
                if _number(total.get("p50")) is not None:
                    p50.add_metric(labels, total["p50"])
                if _number(total.get("p99")) is not None:
                    p99.add_metric(labels, total["p99"])
            reduced = figures(telemetry)
            for family, value in ((received, reduced.received), (dropped, reduced.dropped),
                                  (results, reduced.results), (errors, reduced.errors)):
                family.add_metric([d], value or 0)
        yield from (online, age, stale, info, fps, p50, p99, received, dropped, results,
                    errors, restarts)

    def _ota(self, devices, outcomes, crash_loops, latest) -> Iterator:
        state = GaugeMetricFamily("sightline_device_ota_state",
                                  "1 for the state of the device's last OTA outcome.",
                                  labels=["device", "state"])
        ended = CounterMetricFamily("sightline_device_update_outcomes",
                                    "Updates and rollbacks by how they ended.",
                                    labels=["device", "outcome"])
        loops = CounterMetricFamily("sightline_device_crash_loops",
                                    "Versions rolled back because the daemon crash-looped.",
                                    labels=["device"])
        counts = {(d, o): n for d, o, n in outcomes}
        looped = dict(crash_loops)
        for device in devices:
            d = device.device_id
            last = (device.last_ota or {}).get("state")
            if last in OTA_STATES:
                state.add_metric([d, last], 1.0)
            for outcome in OUTCOMES.values():
                ended.add_metric([d, outcome], counts.get((d, outcome), 0))
            loops.add_metric([d], looped.get(d, 0))
        changed = GaugeMetricFamily(
            "sightline_device_version_changed_timestamp_seconds",
            "When the device's current model version was first reported (device clock).",
            labels=["device", "model"])
        before = GaugeMetricFamily(
            "sightline_device_fps_before_version_change",
            "The device's average fps over the 10 minutes before its current version.",
            labels=["device", "model"])
        for change in latest:
            labels = [change.device_id, change.model or ""]
            changed.add_metric(labels, change.started_at)
            if change.fps_before is not None:
                before.add_metric(labels, change.fps_before)
        yield from (state, ended, loops, changed, before)

    def _per_version(self, devices) -> Iterator:
        count = GaugeMetricFamily("sightline_model_version_devices",
                                  "Devices serving each model version.",
                                  labels=["model", "version"])
        fps = GaugeMetricFamily("sightline_model_version_fps_avg",
                                "Average fps of the devices serving each model version.",
                                labels=["model", "version"])
        p99 = GaugeMetricFamily("sightline_model_version_latency_p99_ms_max",
                                "Worst p99 among the devices serving each model version.",
                                labels=["model", "version"])
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for device in devices:
            for model in (device.latest_telemetry or {}).get("models") or []:
                if isinstance(model, dict) and isinstance(model.get("name"), str):
                    groups[(model["name"], str(model.get("version")))].append(model)
        for key, models in sorted(groups.items()):
            count.add_metric(list(key), len(models))
            values = [m["fps"] for m in models if _number(m.get("fps")) is not None]
            if values:
                fps.add_metric(list(key), sum(values) / len(values))
            p99s = [((m.get("latency_ms") or {}).get("total") or {}).get("p99") for m in models]
            p99s = [v for v in p99s if _number(v) is not None]
            if p99s:
                p99.add_metric(list(key), max(p99s))
        yield from (count, fps, p99)

    def _service(self) -> Iterator:
        if self._counters is None:
            return
        stored = CounterMetricFamily("sightline_service_messages_stored",
                                     "Messages this instance recorded, by channel.",
                                     labels=["channel"])
        for channel in ("status", "telemetry", "ota/progress"):
            stored.add_metric([channel], self._counters.stored.get(channel, 0))
        yield stored
        yield CounterMetricFamily("sightline_service_messages_duplicate",
                                  "Re-deliveries this instance dropped (already recorded).",
                                  value=self._counters.duplicates)
        yield CounterMetricFamily("sightline_service_write_failures",
                                  "Database writes that failed and were retried.",
                                  value=self._counters.failures)


def _latest_changes(session) -> list[VersionChange]:
    """Per device and model, the newest change that put a version in service."""
    rows = session.scalars(select(VersionChange).where(
        VersionChange.outcome.in_(("pending", "confirmed")),
        VersionChange.to_version.is_not(None)).order_by(VersionChange.started_at)).all()
    newest: dict[tuple[str, str | None], VersionChange] = {}
    for row in rows:
        if row.outcome == "confirmed" or row.last_state == "active":  # serving, not fetching
            newest[(row.device_id, row.model)] = row
    return list(newest.values())

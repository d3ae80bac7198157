"""Telemetry retention: raw samples for a while, then per-bucket rollups, then nothing.

Raw samples older than `raw_s` are folded into rollups `bucket_s` wide (average fps,
worst and average p99, the increase of the drop and error counters) and deleted with
their ledger rows; rollups older than `rollup_s` are deleted. Status and OTA rows are
history and are kept. Runs every `every_s` on the service's `sightline-cloud-retention`
thread; each pass is one transaction, so a kill mid-pass leaves the raw rows in place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import delete, select

from cloud_sync.service.models import Message, TelemetryRollup, TelemetrySample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retention:
    raw_s: float = 7 * 86400.0
    bucket_s: float = 300.0
    rollup_s: float = 90 * 86400.0
    every_s: float = 600.0


def _increase(values: list[int | None]) -> int | None:
    """Counter increase over a run of cumulative values, counting a reset as a restart."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    total = 0
    for previous, current in zip(values, values[1:], strict=False):
        total += current - previous if current >= previous else current
    return total


def downsample(session, policy: Retention, now: float | None = None) -> tuple[int, int]:
    """One pass; returns (raw samples folded, rollups deleted). Commits."""
    now = time.time() if now is None else now
    cutoff = now - policy.raw_s
    # Whole buckets only: a bucket that straddles the cutoff waits for the next pass.
    cutoff -= cutoff % policy.bucket_s
    samples = session.scalars(select(TelemetrySample).where(TelemetrySample.ts < cutoff)
                              .order_by(TelemetrySample.device_id, TelemetrySample.ts)).all()
    buckets: dict[tuple[str, float], list[TelemetrySample]] = defaultdict(list)
    for sample in samples:
        buckets[(sample.device_id, sample.ts - sample.ts % policy.bucket_s)].append(sample)
    for (device_id, start), rows in buckets.items():
        fps = [r.fps for r in rows if r.fps is not None]
        p99 = [r.p99_ms for r in rows if r.p99_ms is not None]
        existing = session.scalars(select(TelemetryRollup).where(
            TelemetryRollup.device_id == device_id, TelemetryRollup.bucket_start == start,
            TelemetryRollup.bucket_s == policy.bucket_s)).first()
        if existing is not None:  # a late sample for a bucket already folded: keep both
            existing.samples += len(rows)
            continue
        session.add(TelemetryRollup(
            device_id=device_id, bucket_start=start, bucket_s=policy.bucket_s,
            samples=len(rows), models=rows[-1].models,
            fps_avg=sum(fps) / len(fps) if fps else None,
            p99_ms_max=max(p99) if p99 else None,
            p99_ms_avg=sum(p99) / len(p99) if p99 else None,
            dropped=_increase([r.dropped for r in rows]),
            errors=_increase([r.errors for r in rows])))
    if samples:
        session.execute(delete(TelemetrySample).where(TelemetrySample.ts < cutoff))
        session.execute(delete(Message).where(Message.channel == "telemetry",
                                              Message.ts < cutoff))
    gone = session.execute(delete(TelemetryRollup).where(
        TelemetryRollup.bucket_start < now - policy.rollup_s)).rowcount
    session.commit()
    return len(samples), gone or 0


class RetentionThread:
    def __init__(self, sessions, policy: Retention) -> None:
        self._sessions = sessions
        self.policy = policy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sightline-cloud-retention",
                                        daemon=True)

    def start(self) -> RetentionThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.policy.every_s):
            try:
                with self._sessions() as session:
                    folded, gone = downsample(session, self.policy)
                if folded or gone:
                    log.info("retention: %d raw samples folded into rollups, %d rollups "
                             "deleted", folded, gone)
            except Exception:
                log.exception("retention pass failed; trying again in %.0f s",
                              self.policy.every_s)

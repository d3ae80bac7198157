"""Telemetry retention: old raw samples become per-bucket rollups, old rollups go."""

from __future__ import annotations

from cloud_sync.service.database import open_database
from cloud_sync.service.models import Message, TelemetryRollup, TelemetrySample
from cloud_sync.service.records import apply_batch
from cloud_sync.service.retention import Retention, downsample
from tests.cloud_sync.service.test_records import telemetry


def test_old_samples_are_folded_into_buckets_and_recent_ones_stay_raw(db_url):
    engine, sessions = open_database(db_url)
    try:
        # 0..590 s every 10 s, p99 rising; "now" is 1000 s, raw kept 600 s, 300 s buckets
        with sessions() as session:
            apply_batch(session, [telemetry("edge-a", float(t), uptime=float(t),
                                            p99=10.0 + t / 100, fps=30.0)
                                  for t in range(0, 600, 10)])
        policy = Retention(raw_s=600.0, bucket_s=300.0, rollup_s=3600.0)
        with sessions() as session:
            folded, gone = downsample(session, policy, now=1000.0)
        assert (folded, gone) == (30, 0)  # the bucket 0-300 s; 300-600 straddles the cutoff
        with sessions() as session:
            rollups = session.query(TelemetryRollup).all()
            assert [(r.bucket_start, r.samples, r.fps_avg) for r in rollups] == [(0.0, 30, 30.0)]
            assert rollups[0].p99_ms_max == 10.0 + 290 / 100
            assert rollups[0].dropped == 0  # the counter did not move
            assert session.query(TelemetrySample).count() == 30
            assert session.query(Message).count() == 30  # the ledger shrinks with it
        with sessions() as session:
            assert downsample(session, policy, now=3700.0) == (30, 1)  # the first rollup aged out
            assert session.query(TelemetryRollup).count() == 1
    finally:
        engine.dispose()

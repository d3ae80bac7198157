"""The service's tables, declared once (SQLAlchemy 2). Changed only through a migration
in migrations/versions/: the models and the newest migration must describe the same
schema (tests/cloud_sync/service/test_database.py compares them).

Portable types only (no JSONB, no arrays): the same schema runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Device(Base):
    """The registry: one row per device ever heard from, with its latest state."""

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)  # newest device `ts` of any message
    last_heard: Mapped[float] = mapped_column(Float)  # service clock, last message received
    last_telemetry: Mapped[float | None] = mapped_column(Float, default=None)  # service clock
    online: Mapped[bool | None] = mapped_column(default=None)
    offline_reason: Mapped[str | None] = mapped_column(String(64), default=None)
    groups: Mapped[list] = mapped_column(JSON, default=list)
    models: Mapped[dict] = mapped_column(JSON, default=dict)  # status `models`
    last_ota: Mapped[dict | None] = mapped_column(JSON, default=None)
    restarts: Mapped[int] = mapped_column(Integer, default=0)  # uptime went backwards
    last_uptime_s: Mapped[float | None] = mapped_column(Float, default=None)
    latest_telemetry: Mapped[dict | None] = mapped_column(JSON, default=None)


class Message(Base):
    """Every message the broker delivered, once: the ledger the counts are checked on.

    `digest` (sha256 of topic and payload) makes a re-delivery (QoS 1 is at least once)
    a no-op instead of a second row.
    """

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    channel: Mapped[str] = mapped_column(String(16))  # status, telemetry, ota/progress
    ts: Mapped[float | None] = mapped_column(Float)  # the device's time
    received_at: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("ix_messages_channel_device", "channel", "device_id"),)


class OtaEvent(Base):
    """One OTA progress document (an update's or a rollback's step)."""

    __tablename__ = "ota_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), unique=True)
    device_id: Mapped[str] = mapped_column(String(64))
    update_id: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    check: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
    ts: Mapped[float | None] = mapped_column(Float)
    __table_args__ = (Index("ix_ota_events_device_ts", "device_id", "ts"),)


class VersionChange(Base):
    """A device's model version history: one row per update or rollback it ran, and how
    it ended (pending, confirmed, rolled_back, rejected, failed, interrupted, current)."""

    __tablename__ = "version_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    update_id: Mapped[str] = mapped_column(String(64))  # or a rollback's command_id
    model: Mapped[str | None] = mapped_column(String(128))
    from_version: Mapped[str | None] = mapped_column(String(64))
    to_version: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, default=None)
    last_state: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16), default="pending")
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    # The device's figures over the 10 minutes before the change (for "fps down after a
    # version change"): computed once, when the change is first reported.
    fps_before: Mapped[float | None] = mapped_column(Float, default=None)
    p99_before: Mapped[float | None] = mapped_column(Float, default=None)
    __table_args__ = (UniqueConstraint("device_id", "update_id"),
                      Index("ix_version_changes_device", "device_id", "started_at"))


class Rollout(Base):
    """An update as the operator pushed it (or, without `push --db`, as devices reported
    it): state running, completed, halted or failed, and the gate's decision."""

    __tablename__ = "rollouts"

    update_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, default=None)
    state: Mapped[str] = mapped_column(String(16), default="running")
    canaries: Mapped[list] = mapped_column(JSON, default=list)
    targets: Mapped[list] = mapped_column(JSON, default=list)
    decision: Mapped[str | None] = mapped_column(Text, default=None)


class RolloutStep(Base):
    """One device's part in a rollout: its latest OTA state (its stage, canary or rest,
    is whether Rollout.canaries names it)."""

    __tablename__ = "rollout_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    update_id: Mapped[str] = mapped_column(ForeignKey("rollouts.update_id"))
    device_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str | None] = mapped_column(String(16), default=None)
    detail: Mapped[str | None] = mapped_column(Text, default=None)
    updated_at: Mapped[float] = mapped_column(Float)
    __table_args__ = (UniqueConstraint("update_id", "device_id"),)


class GateCheck(Base):
    """One metric of one canary as the telemetry gate judged it, with the figures."""

    __tablename__ = "gate_checks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    update_id: Mapped[str] = mapped_column(ForeignKey("rollouts.update_id"))
    device_id: Mapped[str] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(32))
    before: Mapped[float | None] = mapped_column(Float)
    after: Mapped[float | None] = mapped_column(Float)
    peers: Mapped[float | None] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    worse: Mapped[bool] = mapped_column()
    note: Mapped[str | None] = mapped_column(Text, default=None)
    decided_at: Mapped[float] = mapped_column(Float)


class TelemetrySample(Base):
    """One telemetry message, reduced to the figures the service charts and gates on
    (the full document is in Device.latest_telemetry for the newest one only).

    Raw rows (and their ledger rows) are kept for `raw_retention_s`; older ones are
    folded into TelemetryRollup.
    """

    __tablename__ = "telemetry_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)
    sequence: Mapped[int | None] = mapped_column(Integer)
    models: Mapped[str | None] = mapped_column(String(255))  # "name@version,..."
    fps: Mapped[float | None] = mapped_column(Float)
    p50_ms: Mapped[float | None] = mapped_column(Float)
    p99_ms: Mapped[float | None] = mapped_column(Float)
    received: Mapped[int | None] = mapped_column(Integer)  # cumulative counters
    results: Mapped[int | None] = mapped_column(Integer)
    dropped: Mapped[int | None] = mapped_column(Integer)
    errors: Mapped[int | None] = mapped_column(Integer)
    __table_args__ = (Index("ix_telemetry_device_ts", "device_id", "ts"),)


class TelemetryRollup(Base):
    """Downsampled telemetry: per device and bucket (`bucket_s` wide), kept for
    `rollup_retention_s`."""

    __tablename__ = "telemetry_rollups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    bucket_start: Mapped[float] = mapped_column(Float)
    bucket_s: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    models: Mapped[str | None] = mapped_column(String(255))
    fps_avg: Mapped[float | None] = mapped_column(Float)
    p99_ms_max: Mapped[float | None] = mapped_column(Float)
    p99_ms_avg: Mapped[float | None] = mapped_column(Float)
    dropped: Mapped[int | None] = mapped_column(Integer)  # increase over the bucket
    errors: Mapped[int | None] = mapped_column(Integer)
    __table_args__ = (UniqueConstraint("device_id", "bucket_start", "bucket_s"),)

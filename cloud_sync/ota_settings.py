"""The `[cloud.ota]` config table: the update policy (docs/configuration.md, docs/mqtt.md §9)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from runtime.models.bundle import MAX_UNPACKED_BYTES


class OtaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A new version serves "on probation" this long; errors, a stalled pipeline or a crash
    # loop meanwhile roll it back. A restart (clean or not) starts the probation again.
    probation_s: float = Field(default=60.0, ge=0)
    # During probation: a pipeline loop that has not turned this long (a hung engine call,
    # a dead thread) is a stall. Idle (no clients) is not: idle loops still turn.
    probation_stall_s: float = Field(default=5.0, gt=0)
    # Restarts during probation before it is a crash loop (then the previous version serves).
    max_boots: int = Field(default=2, ge=0)
    keep_versions: int = Field(default=3, ge=1)
    max_bundle_bytes: int = Field(default=MAX_UNPACKED_BYTES, gt=0)
    stall_timeout_s: float = Field(default=60.0, gt=0)
    # CA bundle for https:// deliveries from a private CA (default: the system's).
    http_ca_file: Path | None = None
    validation_runs: int = Field(default=5, ge=1)
    # During probation: roll back when at least this many frames failed and they are at
    # least this share of the frames served.
    probation_min_errors: int = Field(default=5, ge=1)
    probation_error_share: float = Field(default=0.2, gt=0, le=1)
    # Replay protection: refuse commands signed longer ago than this (default: the MQTT
    # session expiry, so a command queued for a device that was offline still applies),
    # or dated further ahead of this device's clock than the skew.
    max_command_age_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    max_clock_skew_s: float = Field(default=300.0, ge=0)
    # Accepted commands waiting behind the one running, journaled in state_dir/ota/queue/;
    # one more is refused (check "queue") and not remembered, so it can be sent again.
    max_queued_commands: int = Field(default=16, ge=1, le=1000)
    # A command (the signed envelope as received) longer than this is refused unread
    # (check "oversize"). 1 MiB holds the chunk hashes of a bundle of several GB.
    max_command_bytes: int = Field(default=1024 * 1024, ge=1024)

"""A version on probation: what it is compared against, and when it fails or has served out.

Pure judgement over the pipeline's health counters; the updater (cloud_sync/ota.py) acts
on it. A stopping pipeline is never judged: shutting down says nothing about the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloud_sync.commands import UpdateCommand
from cloud_sync.ota_settings import OtaSettings
from runtime.daemon.model_host import ModelHealth, PipelineState


@dataclass
class Probation:
    """`command` is None when the journal was lost: the store alone says what to watch."""

    model: str
    version: str
    update_id: str | None
    command: UpdateCommand | None
    baseline: ModelHealth  # the counters when the probation (re)started
    until: float  # time.monotonic() deadline

    def fields(self) -> dict[str, Any]:
        """How its reports are correlated when there is no command to report against."""
        return {} if self.command is not None else {
            "update_id": self.update_id, "model": self.model, "version": self.version}

    def failure(self, health: ModelHealth, settings: OtaSettings) -> str | None:
        """Why the version fails its probation now, or None: a stalled pipeline, or too
        many failed frames since it started. An idle or a stopping pipeline never fails."""
        if health.state is PipelineState.STOPPED:
            return None
        if health.state is PipelineState.STALLED:
            return (f"its pipeline stalled (no turn for {settings.probation_stall_s:g} s or a "
                    "thread died)")
        errors = health.errors - self.baseline.errors
        frames = errors + health.results - self.baseline.results
        if (errors >= settings.probation_min_errors
                and errors >= settings.probation_error_share * frames):
            return f"{errors} of {frames} frames failed"
        return None

    def served_out(self, now: float) -> bool:
        return now >= self.until

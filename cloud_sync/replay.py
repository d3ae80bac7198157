"""Replay protection for signed OTA commands: too old, from the future, or seen before.

A signature proves who wrote a command, not when it was meant to run: a captured command
(an update to a version later found bad, a rollback) could be published again. Every
command carries a signed `issued_at`; the device refuses one older than
`ota.max_command_age_s` or issued more than `ota.max_clock_skew_s` ahead of its clock,
and any id it accepted before. Accepted ids are persisted (state_dir/ota/seen.json) and
forgotten only once their command would be refused as too old anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from runtime.errors import UpdateRejected
from runtime.models.store import read_json, write_json_atomic

MAX_REMEMBERED = 10_000  # ids, a bound on the file whatever the age setting


class CommandRefused(UpdateRejected):
    """A correctly signed command refused by policy; `check` names which rule."""

    def __init__(self, message: str, check: str) -> None:
        super().__init__(message)
        self.check = check


class ReplayGuard:
    """The ids accepted so far; the limits are the caller's (OtaSettings), per call."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._seen = self._load()

    def _load(self) -> dict[str, float]:
        document = read_json(self._path)
        if isinstance(document, list):  # before issued_at was kept: ids only
            now = self._clock()
            return {str(command_id): now for command_id in document}
        return {str(k): float(v) for k, v in (document or {}).items()}

    def check(self, command_id: str, issued_at: float, *, max_age_s: float,
              max_skew_s: float) -> None:
        """Raise CommandRefused (check "replay", "expired" or "clock") unless the command
        may run now."""
        if command_id in self._seen:
            raise CommandRefused(
                f"command {command_id} was accepted on this device before; a replayed "
                "command is never applied twice (send a new command with a new id)", "replay")
        now = self._clock()
        age = now - issued_at
        if age > max_age_s:
            raise CommandRefused(
                f"command {command_id} was issued {age:.0f} s ago, more than "
                f"ota.max_command_age_s ({max_age_s:g} s); sign a fresh one", "expired")
        if -age > max_skew_s:
            raise CommandRefused(
                f"command {command_id} is issued {-age:.0f} s in the future, more than "
                f"ota.max_clock_skew_s ({max_skew_s:g} s); check the clocks of the "
                "operator and of this device (NTP)", "clock")

    def remember(self, command_id: str, issued_at: float, *, keep_s: float) -> None:
        """Persist `command_id` (before it runs: a command runs at most once); ids issued
        more than `keep_s` ago are forgotten (the age check refuses them anyway)."""
        horizon = self._clock() - keep_s
        seen = {k: v for k, v in self._seen.items() if v >= horizon}
        seen[command_id] = issued_at
        if len(seen) > MAX_REMEMBERED:
            seen = dict(sorted(seen.items(), key=lambda item: item[1])[-MAX_REMEMBERED:])
        write_json_atomic(self._path, seen)
        self._seen = seen

    def __contains__(self, command_id: str) -> bool:
        return command_id in self._seen

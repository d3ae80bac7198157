"""The OTA commands a device accepted and has not finished: a bounded FIFO journaled on disk.

A command is written here (one file per command, crash-safe) before the MQTT link
acknowledges it and before its id is remembered as seen, so an acknowledged command
survives any restart and the next start runs it. Its file goes only when the command has
ended or has handed over to the update journal (ota/inflight.json). This module keeps
commands in order; it does not know what they do (cloud_sync/ota.py runs them).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from cloud_sync.commands import RollbackCommand, UpdateCommand, command_id, parse_command
from runtime.errors import SightlineError, UpdateRejected
from runtime.models.store import fsync_dir, read_json, write_json_atomic

log = logging.getLogger(__name__)


class QueueFull(SightlineError):
    """`max_queued_commands` commands are waiting already: refuse this one (check "queue")."""


@dataclass(frozen=True)
class Queued:
    command: UpdateCommand | RollbackCommand
    path: Path | None  # None: resumed from the update journal, which is its record


class CommandQueue:
    """Commands waiting for the OTA worker, oldest first; the one running is not counted."""

    def __init__(self, directory: Path, maxsize: int) -> None:
        self._dir = directory
        self.maxsize = maxsize
        self._cond = threading.Condition()
        self._waiting: deque[Queued] = deque()
        self._next = 1
        # Read now, not at the updater's start: the link may hand over a command before
        # that, and its file must neither reuse a number nor be read twice.
        self.recovered: tuple[Queued, ...] = tuple(self._load())
        self._waiting.extend(self.recovered)

    def _load(self) -> list[Queued]:
        """What the last run accepted and did not finish, in acceptance order."""
        entries = []
        for path in sorted(self._dir.glob("*.json")) if self._dir.is_dir() else ():
            try:
                self._next = max(self._next, int(path.stem) + 1)
                entries.append(Queued(parse_command(read_json(path)["command"]), path))
            except (ValueError, KeyError, TypeError, UpdateRejected) as exc:
                # Written atomically by this module, so only another version's format gets
                # here: kept aside for a person, never run half-understood.
                aside = path.with_suffix(".unreadable")
                path.replace(aside)
                log.error("queued OTA command %s cannot be read (%s); kept as %s", path.name,
                          exc, aside.name)
        return entries

    def put(self, command: UpdateCommand | RollbackCommand) -> Queued:
        """Journal `command` and queue it; QueueFull (nothing written) when the queue is full.

        Called from one thread only (the link's downlink thread), so the check and the
        write need no lock between them."""
        with self._cond:
            if len(self._waiting) >= self.maxsize:
                raise QueueFull(f"{len(self._waiting)} commands are queued already "
                                f"(ota.max_queued_commands)")
            number, self._next = self._next, self._next + 1
        path = self._dir / f"{number:09d}.json"
        write_json_atomic(path, {"command": command.model_dump(mode="json")})
        entry = Queued(command, path)
        with self._cond:
            self._waiting.append(entry)
            self._cond.notify_all()
        return entry

    def resume(self, command: UpdateCommand) -> None:
        """Queue an update the update journal resumes, ahead of everything else."""
        with self._cond:
            self._waiting.appendleft(Queued(command, None))
            self._cond.notify_all()

    def drop(self, ids: set[str]) -> None:
        """Forget waiting commands with these ids (the update journal has taken them over)."""
        with self._cond:
            gone = [e for e in self._waiting if command_id(e.command) in ids and e.path]
            for entry in gone:
                self._waiting.remove(entry)
        for entry in gone:
            self.done(entry)

    def get(self, timeout: float) -> Queued | None:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._waiting), timeout):
                return None
            return self._waiting.popleft()

    def done(self, entry: Queued) -> None:
        """The command ended (or its update journal holds it now): forget its file."""
        if entry.path is not None:
            entry.path.unlink(missing_ok=True)
            fsync_dir(entry.path.parent)

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

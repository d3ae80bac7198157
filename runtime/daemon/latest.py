"""Newest-frame-wins slots: one pending frame per client, served round-robin.

A stale frame is worth nothing in AR, so a client's new frame replaces its waiting one
(the replaced one is returned to the caller to be reported as dropped). Memory is
bounded by the number of clients, however fast they send.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

Job = TypeVar("Job")


class LatestSlots(Generic[Job]):
    def __init__(self) -> None:
        self._pending: OrderedDict[bytes, Job] = OrderedDict()
        self._dropped: dict[bytes, int] = {}
        self._cond = threading.Condition()

    def put(self, client: bytes, job: Job) -> Job | None:
        """Queue `job` as the client's newest frame; return the frame it superseded."""
        with self._cond:
            # Replacing keeps the client's place in the round-robin order.
            superseded = self._pending.get(client)
            self._pending[client] = job
            if superseded is not None:
                self._dropped[client] = self._dropped.get(client, 0) + 1
            self._cond.notify()
            return superseded

    def take(self, timeout: float) -> tuple[bytes, Job] | None:
        """The next client's newest frame (oldest-waiting client first), or None on timeout."""
        with self._cond:
            if not self._pending and not self._cond.wait(timeout):
                return None
            if not self._pending:
                return None
            return self._pending.popitem(last=False)

    def take_more(self, limit: int) -> list[tuple[bytes, Job]]:
        """Up to `limit` more waiting frames at once, without waiting (to fill a batch)."""
        with self._cond:
            taken = []
            while self._pending and len(taken) < limit:
                taken.append(self._pending.popitem(last=False))
            return taken

    def waiting(self) -> int:
        return len(self._pending)  # len() of a dict is atomic; a hint, not a promise

    def count_drop(self, client: bytes) -> int:
        with self._cond:
            self._dropped[client] = self._dropped.get(client, 0) + 1
            return self._dropped[client]

    def dropped(self, client: bytes) -> int:
        with self._cond:
            return self._dropped.get(client, 0)

    def forget(self, client: bytes) -> Job | None:
        with self._cond:
            self._dropped.pop(client, None)
            return self._pending.pop(client, None)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

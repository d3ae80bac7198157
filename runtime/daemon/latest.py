"""Newest-frame-wins slots: one pending frame per client, served round-robin.

A stale frame is worth nothing in AR, so a client's new frame replaces its waiting one
(the replaced one is returned to the caller to be reported as dropped). Memory is
bounded by the number of clients, however fast they send. The dropped counts live in one
DropCounts per daemon, shared by every model's slots, so `dropped` and `result` replies
carry the same running count for a headset (§6.2 of docs/protocol.md).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

Job = TypeVar("Job")


class DropCounts:
    """Frames dropped (superseded or expired) per client key, over every model. The owner
    of the keys forgets a count (DropCounts.forget) only when it forgets the client: under
    CURVE a headset's count outlives its idle slots and reconnects."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[bytes, int] = {}

    def add(self, client: bytes) -> int:
        with self._lock:
            total = self._counts[client] = self._counts.get(client, 0) + 1
            return total

    def get(self, client: bytes) -> int:
        return self._counts.get(client, 0)  # one dict read: atomic

    def forget(self, client: bytes) -> None:
        with self._lock:
            self._counts.pop(client, None)


class LatestSlots(Generic[Job]):
    def __init__(self, drops: DropCounts | None = None) -> None:
        self._pending: OrderedDict[bytes, Job] = OrderedDict()
        self._drops = drops if drops is not None else DropCounts()
        self._cond = threading.Condition()

    def put(self, client: bytes, job: Job) -> Job | None:
        """Queue `job` as the client's newest frame; return the frame it superseded."""
        with self._cond:
            # Replacing keeps the client's place in the round-robin order.
            superseded = self._pending.get(client)
            self._pending[client] = job
            self._cond.notify()
        if superseded is not None:
            self._drops.add(client)
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
        return self._drops.add(client)

    def dropped(self, client: bytes) -> int:
        return self._drops.get(client)

    def forget(self, client: bytes) -> Job | None:
        """Free the client's waiting frame (its dropped count is the DropCounts owner's)."""
        with self._cond:
            return self._pending.pop(client, None)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

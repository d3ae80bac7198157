"""Persistent store-and-forward queue for upward MQTT messages, in one SQLite file.

A message is in the outbox from the moment `put()` returns until the broker has
acknowledged it (`remove()`), across broker outages and process crashes. The file is
bounded: when full, the oldest telemetry goes first and the drop is counted on disk;
OTA progress is never dropped to make room. It knows nothing about MQTT or topics.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO

from runtime.errors import SightlineError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    -- AUTOINCREMENT: ids are never reused, even after the newest row is deleted, so
    -- "id order" is publish order across restarts and the link's "sent up to" mark.
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT    NOT NULL,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    retain  INTEGER NOT NULL,
    created REAL    NOT NULL,
    size    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_kind ON messages (kind, id);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

DROPPED = "dropped_telemetry"
REJECTED = "rejected_by_broker"


class OutboxError(SightlineError):
    """The outbox file cannot be opened or a message cannot be stored."""


class OutboxFull(OutboxError):
    """No room for a message that must not be dropped (nothing droppable is left)."""


class MessageKind(str, Enum):
    TELEMETRY = "telemetry"  # dropped, oldest first, when the outbox is full
    PROGRESS = "progress"  # OTA progress: kept; put() raises OutboxFull instead


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    kind: MessageKind
    topic: str
    payload: bytes
    retain: bool
    created: float


@dataclass(frozen=True)
class OutboxStats:
    messages: int
    bytes: int  # topic + payload bytes of the stored messages (what max_bytes bounds)
    dropped_telemetry: int  # since the file was created
    rejected_by_broker: int  # acknowledged with an error reason code, so never delivered
    max_messages: int
    max_bytes: int


class Outbox:
    """A bounded, crash-safe FIFO of messages waiting for the broker's acknowledgement.

    Thread-safe: one connection behind one lock (paho's network thread and the link's
    sender thread both call it). One process at a time: a second `Outbox` on the same
    file raises OutboxError instead of double-sending.

    Durability: WAL with synchronous=FULL, so a message whose `put()` returned survives
    a killed process *and* a power cut (a headset's battery pulled), at the cost of one
    fsync per put; uplink messages are small and a few per second at most. NORMAL would
    survive a killed process only.
    """

    def __init__(self, path: str | Path, *, max_messages: int = 10_000,
                 max_bytes: int = 16 * 1024 * 1024) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise OutboxError("outbox bounds must be positive (max_messages, max_bytes)")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._dropping = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = _exclusive_lock(self.path.with_name(self.path.name + ".lock"))
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=5.0)
            self._setup()
        except sqlite3.Error as exc:
            self._lock_file.close()
            raise OutboxError(f"cannot open the outbox {self.path}: {exc} — delete the file "
                              "to start an empty outbox (queued messages are lost)") from exc

    def _setup(self) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL is needed")
        db.execute("PRAGMA synchronous=FULL")
        # The WAL is truncated back to this after checkpoints, so the file pair stays
        # near max_bytes plus SQLite's page overhead.
        db.execute("PRAGMA journal_size_limit=1048576")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"schema version {version}, this code reads "
                                        f"{SCHEMA_VERSION}")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        count, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
        self._count, self._bytes = int(count), int(size)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def put(self, kind: MessageKind, topic: str, payload: bytes, *,
            retain: bool = False) -> int | None:
        """Store a message durably; return its id, or None if it was itself dropped.

        When the outbox is full the oldest telemetry is deleted (and counted) until the
        new message fits. A telemetry message that still does not fit (everything left
        is OTA progress) is dropped and counted; any other kind raises OutboxFull.
        """
        kind = MessageKind(kind)
        payload = bytes(payload)
        size = len(topic.encode()) + len(payload)
        if size > self.max_bytes:
            raise OutboxError(f"a {size}-byte message can never fit an outbox of "
                              f"{self.max_bytes} bytes; raise max_bytes or send less")
        with self._lock:
            count, total, dropped = self._count, self._bytes, 0
            new_id: int | None = None
            with self._transaction() as db:
                while count + 1 > self.max_messages or total + size > self.max_bytes:
                    oldest = db.execute("SELECT id, size FROM messages WHERE kind = ? "
                                        "ORDER BY id LIMIT 1", (MessageKind.TELEMETRY.value,)
                                        ).fetchone()
                    if oldest is None:
                        break
                    db.execute("DELETE FROM messages WHERE id = ?", (oldest[0],))
                    count, total, dropped = count - 1, total - oldest[1], dropped + 1
                fits = count + 1 <= self.max_messages and total + size <= self.max_bytes
                if fits:
                    new_id = db.execute(
                        "INSERT INTO messages (kind, topic, payload, retain, created, size) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (kind.value, topic, payload, int(retain), time.time(), size),
                    ).lastrowid
                    count, total = count + 1, total + size
                elif kind is MessageKind.TELEMETRY:
                    dropped += 1
                else:
                    raise OutboxFull(
                        f"outbox {self.path} is full ({count} messages, {total} bytes) with "
                        f"messages that are never dropped; cannot store {kind.value} for "
                        f"{topic} — raise the outbox bounds or restore the broker link")
                if dropped:
                    _add_counter(db, DROPPED, dropped)
            self._count, self._bytes = count, total
            if dropped and not self._dropping:
                log.warning("outbox %s full (%d messages, %d bytes): dropping the oldest "
                            "telemetry until the broker acknowledges messages again",
                            self.path, count, total)
            self._dropping = self._dropping or dropped > 0
            return new_id

    def peek(self, after_id: int = 0, limit: int = 100) -> list[OutboxMessage]:
        """The oldest `limit` messages with an id greater than `after_id`, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, topic, payload, retain, created FROM messages "
                "WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [OutboxMessage(row[0], MessageKind(row[1]), row[2], bytes(row[3]), bool(row[4]),
                              row[5]) for row in rows]

    def newest_id(self) -> int:
        """The id of the newest stored message (0 when empty)."""
        with self._lock:
            return int(self._db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0])

    def remove(self, ids: Iterable[int]) -> None:
        """Delete acknowledged messages (ids already gone, e.g. dropped, are ignored)."""
        self._delete(ids, counter=None)

    def reject(self, ids: Iterable[int]) -> None:
        """Delete messages the broker refused for good, counting them."""
        self._delete(ids, counter=REJECTED)

    def _delete(self, ids: Iterable[int], counter: str | None) -> None:
        ids = list(ids)
        if not ids:
            return
        with self._lock:
            with self._transaction() as db:
                gone, gone_bytes = 0, 0
                for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                    chunk = ids[start:start + 500]
                    marks = ",".join("?" * len(chunk))
                    found, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM "
                                             f"messages WHERE id IN ({marks})", chunk).fetchone()
                    db.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
                    gone, gone_bytes = gone + found, gone_bytes + size
                if counter and gone:
                    _add_counter(db, counter, gone)
            self._count, self._bytes = self._count - gone, self._bytes - gone_bytes
            if gone:
                self._dropping = False

    def stats(self) -> OutboxStats:
        with self._lock:
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            return OutboxStats(self._count, self._bytes, counters.get(DROPPED, 0),
                               counters.get(REJECTED, 0), self.max_messages, self.max_bytes)

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        with self._lock:
            if not isinstance(self._db, _Closed):
                self._db.close()
                self._db = _Closed(self.path)  # type: ignore[assignment]
                self._lock_file.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Closed:
    """Stands in for the connection after close(), so late calls fail with a message."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def execute(self, *args: object) -> None:
        raise OutboxError(f"the outbox {self.path} is closed")

    def close(self) -> None:
        pass


def _add_counter(db: sqlite3.Connection, name: str, amount: int) -> None:
    db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
               "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value", (name, amount))


def _exclusive_lock(path: Path) -> BinaryIO:
    """Hold an exclusive advisory lock on `path` for the outbox's lifetime (released by
    the kernel if the process dies, so a crash never leaves the outbox locked)."""
    handle = open(path, "a+b")  # noqa: SIM115 - closed in Outbox.close()
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process guard
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise OutboxError(f"the outbox {path.with_suffix('')} is in use by another process; "
                          "run one cloud link per outbox file") from exc
    return handle

"""Fetch an update's bundle from its retained chunks on the broker, resumably.

Chunks live once per update on `updates/{update_id}/chunks/{index}` (retained), so a
device subscribes to a small window of the chunks it still lacks; each one is checked
against its sha256 in the signed command and written at its offset. After a reconnect
or a restart, the chunks already on disk are found by hashing them again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cloud_sync.commands import MqttChunks, UpdateCommand
from cloud_sync.delivery import DeliveryError
from cloud_sync.topics import chunk_topic

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    """What the delivery needs from the MQTT link."""

    def subscribe(self, filters: list[str]) -> None: ...

    def unsubscribe(self, filters: list[str]) -> None: ...

    @property
    def connected(self) -> bool: ...


def chunk_ranges(size: int, chunk_size: int) -> list[tuple[int, int]]:
    """(offset, length) of every chunk of a `size`-byte bundle."""
    return [(offset, min(chunk_size, size - offset)) for offset in range(0, size, chunk_size)]


def chunks_on_disk(path: Path, delivery: MqttChunks, size: int) -> set[int]:
    """Indices of the chunks already written correctly (resume after reconnect or restart)."""
    if not path.exists():
        return set()
    have = set()
    with open(path, "rb") as f:
        for index, (offset, length) in enumerate(chunk_ranges(size, delivery.chunk_size)):
            f.seek(offset)
            if hashlib.sha256(f.read(length)).hexdigest() == delivery.chunk_sha256[index]:
                have.add(index)
    return have


class MqttChunkDelivery:
    """One transfer at a time. `on_chunk` is fed from the link's downlink thread."""

    def __init__(self, link: Subscriber, *, window: int = 8, stall_timeout_s: float = 60.0,
                 max_corrupt: int = 3) -> None:
        self._link = link
        self._window = window
        self._stall_timeout_s = stall_timeout_s  # counted only while the link is up
        self._max_corrupt = max_corrupt
        self._lock = threading.Lock()
        self._update_id: str | None = None
        self._arrivals: queue.Queue[tuple[int, bytes]] = queue.Queue(maxsize=4 * window)

    def on_chunk(self, update_id: str, index: int, payload: bytes) -> None:
        with self._lock:
            if update_id != self._update_id:
                return  # a chunk of an update we are not fetching (retained, late)
        try:
            self._arrivals.put((index, payload), timeout=5.0)
        except queue.Full:
            log.warning("chunk %d of %s dropped: the writer is stuck", index, update_id)

    def fetch(self, command: UpdateCommand, dest: Path, progress: Callable[[int, int], None],
              stop: threading.Event) -> None:
        delivery = command.delivery
        assert isinstance(delivery, MqttChunks)
        ranges = chunk_ranges(command.size, delivery.chunk_size)
        if len(ranges) != len(delivery.chunk_sha256):
            raise DeliveryError(f"the command lists {len(delivery.chunk_sha256)} chunk digests "
                                f"for {len(ranges)} chunks of {delivery.chunk_size} bytes")
        have = chunks_on_disk(dest, delivery, command.size)
        if have:
            log.info("%s: resuming with %d of %d chunks on disk", command.update_id, len(have),
                     len(ranges))
        missing = [i for i in range(len(ranges)) if i not in have]
        corrupt: dict[int, int] = {}
        subscribed: set[int] = set()
        with self._lock:
            self._update_id = command.update_id
        while not self._arrivals.empty():  # leftovers of an earlier transfer
            self._arrivals.get_nowait()
        mode = "r+b" if dest.exists() else "w+b"
        try:
            with open(dest, mode) as f:
                f.truncate(command.size)
                done_bytes = sum(ranges[i][1] for i in have)
                progress(done_bytes, command.size)
                quiet_since = time.monotonic()
                while missing or subscribed:
                    if stop.is_set():
                        raise DeliveryError("cancelled")
                    wanted = [i for i in missing if i not in subscribed][
                        :max(0, self._window - len(subscribed))]
                    if wanted:
                        self._link.subscribe([chunk_topic(command.update_id, i) for i in wanted])
                        subscribed.update(wanted)
                    try:
                        index, payload = self._arrivals.get(timeout=0.5)
                    except queue.Empty:
                        if not self._link.connected:
                            quiet_since = time.monotonic()  # an outage is not a stall
                        elif time.monotonic() - quiet_since > self._stall_timeout_s:
                            raise DeliveryError(
                                f"no chunk of {command.update_id} arrived for "
                                f"{self._stall_timeout_s:g} s ({len(ranges) - len(missing)} of "
                                f"{len(ranges)} received); are its retained chunks still on "
                                "the broker?") from None
                        continue
                    quiet_since = time.monotonic()
                    if index not in subscribed:
                        continue  # a duplicate (QoS 1 re-send, re-subscription)
                    offset, length = ranges[index]
                    digest = hashlib.sha256(payload).hexdigest()
                    if len(payload) != length or digest != delivery.chunk_sha256[index]:
                        corrupt[index] = corrupt.get(index, 0) + 1
                        topic = chunk_topic(command.update_id, index)
                        if corrupt[index] >= self._max_corrupt:
                            raise DeliveryError(
                                f"chunk {index} of {len(ranges)} ({len(payload)} bytes) does not "
                                f"match its sha256 in the signed command, {corrupt[index]} "
                                "times; the chunk on the broker is corrupt: push the update again")
                        log.warning("chunk %d of %s is corrupt; fetching it again", index,
                                    command.update_id)
                        self._link.unsubscribe([topic])
                        self._link.subscribe([topic])  # the broker sends the retained one again
                        continue
                    f.seek(offset)
                    f.write(payload)
                    subscribed.discard(index)
                    missing.remove(index)
                    self._link.unsubscribe([chunk_topic(command.update_id, index)])
                    done_bytes += length
                    progress(done_bytes, command.size)
                f.flush()
                os.fsync(f.fileno())
        finally:
            if subscribed:
                self._link.unsubscribe([chunk_topic(command.update_id, i) for i in subscribed])
            with self._lock:
                self._update_id = None

"""Who may open a connection, decided at the CURVE handshake, before a frame is read.

`HandshakeAdmission` is the ZAP thread's policy: refuse keys that are not enrolled, then
per-key and per-source-address handshake rates, then open connections per source address.
`ConnectionMonitor` is the I/O thread's side: it follows the ROUTER socket's monitor events
(accepted / disconnected, with the connection's fd) and publishes open connections per
address to the policy as an immutable snapshot. Nothing here runs per frame.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter, OrderedDict
from types import MappingProxyType

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)
# Token buckets kept per key and per address; the least recently used are forgotten first,
# so a flood from many addresses cannot grow the tables without bound.
MAX_BUCKETS = 4096
NO_ADDRESS = "local"  # ipc:// peers, and fds whose peer could not be read


class RateLimiter:
    """Token bucket: `rate` events per second on average, bursts of up to `burst` (default
    one second's worth)."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self.tokens = self.burst
        self.last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def empty(self) -> bool:
        """True while under one token (refilled now, none taken)."""
        if self.tokens >= 1.0:
            return False
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        return self.tokens < 1.0


class _Buckets:
    """One token bucket per name, at most MAX_BUCKETS of them (LRU)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, RateLimiter] = OrderedDict()

    def allow(self, name: str) -> bool:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = RateLimiter(self.rate, self.burst)
            if len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(name)
        return bucket.allow()

    def __len__(self) -> int:
        return len(self._buckets)


class HandshakeAdmission:
    """The ZAP handler's decision for one CURVE handshake. Called on the ZAP thread only;
    its counters are ints that status reads."""

    def __init__(self, *, per_key_rate: float, per_address_rate: float, burst: float,
                 max_per_address: int) -> None:
        self._keys = _Buckets(per_key_rate, burst)
        self._addresses = _Buckets(per_address_rate, burst)
        self._max_per_address = max_per_address
        # Enrolled Z85 key -> headset name; replaced whole when the allow-list is re-read.
        self.names: MappingProxyType[str, str] = MappingProxyType({})
        # Open connections per address, published by the I/O thread's ConnectionMonitor.
        self.open_by_address: MappingProxyType[str, int] = MappingProxyType({})
        self.accepted = 0
        self.refused: Counter = Counter()  # reason -> handshakes refused

    def decide(self, key: str, address: str) -> tuple[bool, str]:
        """(admit?, reason) for a client with Z85 `key` connecting from `address`."""
        name = self.names.get(key)
        if name is None:
            return self._refuse("unknown_key", "Unknown key")
        address = address or NO_ADDRESS
        # The connection being checked is open already: "over" means more than the limit.
        if self.open_by_address.get(address, 0) > self._max_per_address:
            return self._refuse("address_connections", "Too many connections from address")
        if not self._keys.allow(key):
            return self._refuse("key_rate", "Too many handshakes for this key")
        # Only handshakes that would be admitted count against the address, so a flood of
        # unknown keys (refused above, at no further cost) cannot lock out an enrolled
        # headset behind the same address.
        if not self._addresses.allow(address):
            return self._refuse("address_rate", "Too many handshakes from address")
        self.accepted += 1
        return True, name

    def _refuse(self, reason: str, text: str) -> tuple[bool, str]:
        self.refused[reason] += 1
        return False, text

    def figures(self) -> dict:
        return {"accepted": self.accepted, "refused": dict(self.refused)}


def _peer_address(fd: int) -> str:
    """The peer IP of a connection's socket fd, read through a duplicate of the fd."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            peer = sock.getpeername()
    except OSError:  # already closed, or not a socket any more
        return NO_ADDRESS
    return peer[0] if isinstance(peer, tuple) else NO_ADDRESS


class ConnectionMonitor:
    """Open connections per source address, from the ROUTER socket's monitor.

    Owned by the I/O thread: `socket` is polled there and `handle()` called when readable.
    The counts go to `admission.open_by_address` as a new read-only mapping after each
    batch, never as a dict another thread mutates.
    """

    EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED

    def __init__(self, router: zmq.Socket, admission: HandshakeAdmission | None) -> None:
        self.socket = router.get_monitor_socket(self.EVENTS)
        self._admission = admission
        self._by_fd: dict[int, str] = {}
        self._by_address: Counter = Counter()
        self.accepted = 0
        self.disconnected = 0

    @property
    def open_connections(self) -> int:
        return len(self._by_fd)

    def handle(self, batch: int = 256) -> None:
        changed = False
        for _ in range(batch):
            try:
                event = parse_monitor_message(self.socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            fd = event["value"]
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.accepted += 1
                # An fd seen again means its DISCONNECTED event was lost (the monitor's
                # queue overflowed): the table stays bounded by the open fds.
                self._drop(fd)
                address = _peer_address(fd)
                self._by_fd[fd] = address
                self._by_address[address] += 1
                changed = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.disconnected += 1
                changed |= self._drop(fd)
        if changed and self._admission is not None:
            self._admission.open_by_address = MappingProxyType(dict(self._by_address))

    def _drop(self, fd: int) -> bool:
        address = self._by_fd.pop(fd, None)
        if address is None:
            return False
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]
        return True

    def figures(self) -> dict:
        return {"open": self.open_connections, "accepted": self.accepted,
                "disconnected": self.disconnected,
                "addresses": len(self._by_address)}

    def close(self) -> None:
        self.socket.close()

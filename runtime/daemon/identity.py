"""Who a message is from: a headset (its enrolled key) under CURVE, a connection in plain mode.

The I/O thread's table of headsets: the key each has in the pipelines' newest-frame slots,
its frame-rate bucket and counters, and the ZeroMQ connection (routing id) that serves it
now. Under CURVE a headset keeps all of that across reconnects; a second connection with
the same key replaces the first (newest wins) and the old one is answered REPLACED, while
replies to the frames it sent still go to it, never to its successor. Only the I/O thread
calls in; status reads the per-headset figures (ints) from a copied list.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from runtime.daemon.admission import RateLimiter
from runtime.errors import ProtocolError
from runtime.protocol import ErrorCode


@dataclass(slots=True, eq=False)
class Headset:
    name: str  # enrolled name (CURVE), or "conn-<routing id hex>" (plain)
    key: bytes  # its key in the pipelines' slots: stable across reconnects under CURVE
    limiter: RateLimiter
    failures: RateLimiter  # requests answered with an error; empty: frames refused
    route: bytes | None = None  # routing id of the connection that serves it now
    last_seen: float = 0.0  # monotonic; 0: holds no slot
    frames: int = 0
    rate_limited: int = 0
    bad_requests: int = 0
    connections: int = 0
    replaced: int = 0
    first_seen: float = field(default_factory=time.time)


class Identities:
    """Routing id -> headset, and headset -> the routing id its replies go to."""

    def __init__(self, *, by_key: bool, max_clients: int, max_fps: float,
                 bad_per_s: float = 5.0, bad_burst: int = 50) -> None:
        self.by_key = by_key
        self._bad = (bad_per_s, bad_burst)
        self._max_clients = max_clients
        self._max_fps = max_fps
        self._headsets: dict[str, Headset] = {}
        self._routes: dict[bytes, Headset] = {}  # connections that sent a frame, live
        self._by_key: dict[bytes, Headset] = {}
        # Connections replaced by a newer one with the same key: answered REPLACED. Bounded:
        # the oldest are forgotten first (their next message then counts as a new connection).
        self._replaced: OrderedDict[bytes, str] = OrderedDict()
        self._max_replaced = 4 * max_clients + 64
        # Bad-request buckets of headsets that have sent no good frame yet: the budget holds
        # from a connection's first message (§7.2). Bounded like _replaced.
        self._strangers: OrderedDict[str, tuple[RateLimiter, int]] = OrderedDict()
        self.active = 0  # headsets holding a slot

    # -- per message ----------------------------------------------------------------------
    def check_route(self, route: bytes) -> None:
        """Refuse a message from a connection that a newer one with its key replaced."""
        if route in self._replaced:
            raise ProtocolError(ErrorCode.REPLACED, "a newer connection with this headset's "
                                f"key ({self._replaced[route]}) took over; close this one")

    def admit(self, route: bytes, name: str | None) -> tuple[Headset, bytes | None]:
        """The headset a well-formed frame from `route` belongs to (made on first use), and
        the older connection this one replaced, if any (the server tells it why).
        `name` is the enrolled name under CURVE, None in plain mode."""
        headset = self._routes.get(route)
        if headset is not None and headset.last_seen:
            headset.last_seen = time.monotonic()
            return headset, None
        if name is None:
            name = "conn-" + route.hex()
        headset = self._headsets.get(name)
        if headset is None or not headset.last_seen:
            if self.active >= self._max_clients:
                raise ProtocolError(ErrorCode.TOO_MANY_CLIENTS,
                                    f"the daemon already serves {self.active} headsets")
            if headset is None:
                failures, bad = self._strangers.pop(name, (None, 0))
                headset = Headset(name, name.encode() if self.by_key else route,
                                  RateLimiter(self._max_fps), failures or RateLimiter(*self._bad),
                                  bad_requests=bad)
                self._headsets[name] = headset
                self._by_key[headset.key] = headset
            self.active += 1
        replaced = self._take_over(headset, route) if headset.route != route else None
        headset.last_seen = time.monotonic()
        return headset, replaced

    def _take_over(self, headset: Headset, route: bytes) -> bytes | None:
        """Move the headset to `route`; returns the live connection it replaced."""
        old = headset.route
        replaced = None
        if old is not None and self._routes.get(old) is headset:
            del self._routes[old]
            self._replaced[old] = headset.name
            if len(self._replaced) > self._max_replaced:
                self._replaced.popitem(last=False)
            headset.replaced += 1
            replaced = old
        self._replaced.pop(route, None)
        self._routes[route] = headset
        headset.route = route
        headset.connections += 1
        return replaced

    def note_failure(self, route: bytes, name: str | None) -> None:
        """A request from `route` (enrolled as `name`, under CURVE) got an error reply."""
        headset = self._headsets.get(name) if name is not None else self._routes.get(route)
        if headset is not None:
            headset.bad_requests += 1
            headset.failures.allow()
            return
        name = name if name is not None else "conn-" + route.hex()
        failures, bad = self._strangers.pop(name, None) or (RateLimiter(*self._bad), 0)
        failures.allow()
        self._strangers[name] = (failures, bad + 1)
        if len(self._strangers) > self._max_replaced:
            self._strangers.popitem(last=False)

    def find(self, key: bytes) -> Headset | None:
        """The headset whose slot key is `key`, if it is still known."""
        return self._by_key.get(key)

    def delivers(self, route: bytes) -> bool:
        """Whether a pipeline's reply to a frame from `route` is sent: yes while the route
        serves a headset, or was replaced (its own replies still reach it); no once its
        headset was revoked or forgotten as idle."""
        return route in self._routes or route in self._replaced

    # -- slow path (I/O thread, once a second) --------------------------------------------
    def idle(self, timeout_s: float) -> list[Headset]:
        """Headsets silent for `timeout_s`: they give up their slot (the caller frees it in
        the pipelines). Under CURVE their counters stay; in plain mode they are forgotten."""
        horizon = time.monotonic() - timeout_s
        gone = [h for h in self._headsets.values() if h.last_seen and h.last_seen < horizon]
        for headset in gone:
            self._release(headset, keep=self.by_key)
        return gone

    def revoked(self, names: set[str]) -> list[Headset]:
        """Forget the headsets whose key left the allow-list (CURVE); returns them."""
        gone = [h for n, h in self._headsets.items() if n not in names]
        for headset in gone:
            self._release(headset, keep=False)
        if gone:
            for route in [r for r, n in self._replaced.items() if n not in names]:
                del self._replaced[route]  # its frames in flight are answered no more
        return gone

    def _release(self, headset: Headset, keep: bool) -> None:
        if headset.last_seen:
            self.active -= 1
        headset.last_seen = 0.0
        if headset.route is not None and self._routes.get(headset.route) is headset:
            del self._routes[headset.route]
        headset.route = None
        if not keep:
            self._headsets.pop(headset.name, None)
            self._by_key.pop(headset.key, None)

    def headsets(self) -> list[Headset]:
        return list(self._headsets.values())  # one C-level copy: safe from another thread

    @property
    def routes(self) -> int:
        return len(self._routes)

"""Talking to systemd from the daemon: readiness, stopping and watchdog notifications.

The plain sd_notify datagram protocol (no libsystemd needed). Everything here is a
no-op returning False when the process does not run under systemd, so the daemon calls
it unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _notify_address(environ: Mapping[str, str]) -> str | None:
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # abstract namespace
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    if address:  # e.g. vsock:CID:PORT, for VMs: not something an edge daemon runs under
        log.debug("NOTIFY_SOCKET=%s is not an AF_UNIX address; not notifying", address)
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when not under systemd or it failed.

    Never raises: a notification that cannot be sent must not take the daemon down
    (systemd then acts on its own timeouts).
    """
    address = _notify_address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state.split("=", 1)[0], exc)
        return False
    return True


def notify_ready(status: str | None = None) -> bool:
    """Tell systemd start-up is complete (Type=notify): the unit becomes active."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def notify_stopping() -> bool:
    """Tell systemd the daemon is shutting down on purpose."""
    return notify("STOPPING=1")


def notify_status(status: str) -> bool:
    """One line shown by `systemctl status sightline`."""
    return notify(f"STATUS={status}")


class Watchdog:
    """systemd's watchdog (WatchdogSec=): ping at half the interval while healthy.

    Owned by one thread (the daemon's I/O loop): call `ping_if_due()` on every loop turn
    in which the daemon is healthy; a hung or unhealthy daemon stops pinging and systemd
    kills and restarts it.
    """

    def __init__(self, interval_s: float | None, environ: Mapping[str, str] | None = None) -> None:
        self.interval_s = interval_s
        self._environ = environ
        self._last_ping = float("-inf")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None,
                     pid: int | None = None) -> Watchdog:
        """The watchdog systemd asked for, or a disabled one (interval None)."""
        env = os.environ if environ is None else environ
        usec = env.get("WATCHDOG_USEC")
        if not usec:
            return cls(None, environ)
        watchdog_pid = env.get("WATCHDOG_PID")
        if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
            # The variables were inherited from a parent that systemd watches, not us.
            return cls(None, environ)
        try:
            interval = int(usec) / 1e6
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
            return cls(None, environ)
        return cls(interval if interval > 0 else None, environ)

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None

    @property
    def ping_every_s(self) -> float | None:
        """Half the interval, as sd_watchdog_enabled(3) recommends."""
        return None if self.interval_s is None else self.interval_s / 2

    def ping(self, now: float | None = None) -> bool:
        """Send WATCHDOG=1 now; False when disabled, not under systemd, or the send failed."""
        if self.interval_s is None:
            return False
        # Counted as an attempt even when it fails: retried at the next half interval,
        # not on every loop turn (which would flood the log with the same warning).
        self._last_ping = time.monotonic() if now is None else now
        return notify("WATCHDOG=1", self._environ)

    def ping_if_due(self, now: float | None = None) -> bool:
        """Ping when half the interval has passed since the last ping; cheap otherwise."""
        if self.interval_s is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.interval_s / 2:
            return False
        return self.ping(now)

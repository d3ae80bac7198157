"""`sightline serve` as a systemd service would run it: sd_notify READY/WATCHDOG/STOPPING on
a real datagram socket, and `sightline status` over the real control socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import SIGHTLINE


def _datagrams(sock: socket.socket, until: str, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(until in d for d in seen):
            break
    return seen


def test_serve_notifies_systemd_pings_the_watchdog_and_answers_status(short_tmp: Path,
                                                                      centerface_bundle):
    notify_path = short_tmp / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    control = f"ipc://{short_tmp}/control.sock"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    daemon = subprocess.Popen([*SIGHTLINE, "serve", "--plain", "--bind",
                               f"ipc://{short_tmp}/d.sock", "--control", control],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = _datagrams(notify, "READY=1", 60)
        assert any("READY=1" in d for d in seen), seen
        assert any("WATCHDOG=1" in d for d in _datagrams(notify, "WATCHDOG=1", 3))

        done = subprocess.run([*SIGHTLINE, "status", "--control", control, "--json"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert status["pid"] == daemon.pid
        assert [m["name"] for m in status["models"]] == ["centerface"]

        daemon.send_signal(signal.SIGTERM)
        assert any("STOPPING=1" in d for d in _datagrams(notify, "STOPPING=1", 10))
        assert daemon.wait(15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        notify.close()
    done = subprocess.run([*SIGHTLINE, "status", "--control", control], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "sightline serve" in done.stderr

"""One mosquitto process on a loopback port with a config written for it: the brokers of
the cloud_sync tests and of bench/fleet_sim.py. Never the machine's own broker on 1883."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = ("mosquitto is not installed: the cloud_sync tests start real brokers. "
                "Install the Debian/Ubuntu package `mosquitto` (apt-get install mosquitto; "
                "it is started per test on a free port, the system service is not needed)")


class MosquittoError(RuntimeError):
    """mosquitto is missing, or did not start; the message says why."""


def mosquitto_path() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MosquittoError(INSTALL_HINT)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert port != 1883
    return port


class Mosquitto:
    """mosquitto on 127.0.0.1:port; `settings` are config lines for that listener.
    stop()/start() keep the port, the config and (with persistence) the data."""

    def __init__(self, directory: Path, port: int, settings: str) -> None:
        self.directory = directory
        self.port = port
        self.config_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)
        # `user`: run as root, mosquitto would switch to user "mosquitto", which cannot
        # write this directory.
        self.config_path.write_text(f"listener {port} 127.0.0.1\n"
                                    f"user {getpass.getuser()}\n"
                                    f"log_dest file {self.log_path}\n" + settings)

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """Start and wait for its "running" log line; MosquittoError if it does not come."""
        assert self.process is None or self.process.poll() is not None
        mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = subprocess.Popen([mosquitto_path(), "-c", str(self.config_path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode(errors="replace")
                raise MosquittoError(f"mosquitto exited at start ({self.process.returncode}): "
                                     f"{stderr}\n{self.log_tail()}")
            if self.log_path.exists():
                with open(self.log_path, "rb") as log:
                    log.seek(mark)
                    if b" running" in log.read():
                        return self
            time.sleep(0.02)
        self.stop()
        raise MosquittoError(f"mosquitto did not start within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM: a clean broker shutdown (closes connections, saves persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no mosquitto log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

"""A real `sightline serve` child process for the bench scripts, and what /proc says about it.

Starts the daemon exactly as a user would (`python -m runtime.cli serve`), waits for its
pong, samples its RSS, open fds, threads and CPU time from /proc, and stops it with
SIGTERM. Linux only (reads /proc). Used by fuzz_daemon.py and soak_daemon.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from runtime.client import query_info
from runtime.config import ServerSettings, load_config
from runtime.curve_keys import HEADSETS_DIR, create_keypair, enroll, throwaway_keys
from runtime.models.assets import ASTRONAUT_PNG, fetch_asset

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    """One look at the daemon process."""

    at: float  # time.monotonic() of the sample
    rss_kib: int
    peak_rss_kib: int  # VmHWM: the highest RSS so far
    fds: int
    threads: int
    cpu_s: float  # user + system CPU time so far


def astronaut_frame(width: int = 640, height: int = 480) -> np.ndarray:
    """The pinned real test photograph, resized: a BGR frame with one face in it."""
    image = cv2.imread(str(fetch_asset(ASTRONAUT_PNG, show_progress=False)))
    if image is None:
        raise RuntimeError("cannot read the astronaut test image from the asset cache")
    return cv2.resize(image, (width, height))


def server_settings(config: Path | None) -> ServerSettings:
    """The [server] limits the daemon will run with (the same file the daemon reads)."""
    return load_config(config).server


class DaemonProcess:
    """`sightline serve --bind ENDPOINT` in plain mode, or CURVE with throwaway keys."""

    def __init__(self, endpoint: str, workdir: Path, *, curve: bool = False,
                 config: Path | None = None) -> None:
        self.endpoint = endpoint
        self.workdir = Path(workdir)
        self.curve = curve
        self.config = config
        self.log_path = self.workdir / "serve.log"
        # Keyword arguments for Client / query_info: empty in plain mode.
        self.client_keys: dict[str, Path] = {}
        # CURVE: a second enrolled headset for attackers (so the well-behaved one keeps its
        # own key), and a key that is not enrolled. Empty in plain mode.
        self.attacker_keys: dict[str, Path] = {}
        self.stranger_keys: dict[str, Path] = {}
        # a third enrolled headset, for "a headset arriving now" probes
        self.newcomer_keys: dict[str, Path] = {}
        self.control = f"ipc://{self.workdir}/control.sock"
        self._process: subprocess.Popen | None = None

    @property
    def mode(self) -> str:
        return ("CURVE (throwaway keys, an enrolled key per simulated headset)" if self.curve
                else "PLAIN (--plain)")

    def enrol_headset(self, name: str) -> dict[str, Path]:
        """CURVE: a further enrolled headset of its own (Client keyword arguments); call
        before start(), or wait a second for the daemon to reload its allow-list. Plain
        mode: {}. One key per simulated headset: two connections with one key replace
        each other (newest wins)."""
        if not self.curve:
            return {}
        public, secret = create_keypair(self.workdir / f"headset-{name}", name)
        enroll(public, self.workdir / "keys" / HEADSETS_DIR)
        return {"server_key": self.workdir / "keys" / "daemon.key", "client_key": secret}

    def status(self, timeout: float = 5.0) -> dict | None:
        """`sightline status` as a document (None when the daemon does not answer)."""
        from runtime.daemon.control import query_status

        return query_status(self.control, timeout)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, timeout: float = 120.0) -> dict:
        """Start the daemon and return its pong; raise RuntimeError if it never answers."""
        command = [sys.executable, "-m", "runtime.cli", "--log-level", "warning", "serve",
                   "--bind", self.endpoint,
                   # its own control socket: a bench may run beside another daemon
                   "--control", self.control]
        if self.curve:
            keys, self.client_keys = throwaway_keys(self.workdir)
            attacker_public, attacker_secret = create_keypair(self.workdir / "attacker",
                                                              "attacker")
            enroll(attacker_public, keys / HEADSETS_DIR)
            newcomer_public, newcomer_secret = create_keypair(self.workdir / "newcomer",
                                                              "newcomer")
            enroll(newcomer_public, keys / HEADSETS_DIR)
            _, stranger_secret = create_keypair(self.workdir / "stranger", "stranger")
            server_key = self.client_keys["server_key"]
            self.attacker_keys = {"server_key": server_key, "client_key": attacker_secret}
            self.stranger_keys = {"server_key": server_key, "client_key": stranger_secret}
            self.newcomer_keys = {"server_key": server_key, "client_key": newcomer_secret}
            command += ["--keys", str(keys)]
        else:
            command.append("--plain")
        if self.config is not None:
            command += ["--config", str(self.config)]
        with open(self.log_path, "w") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"sightline serve exited with {self._process.returncode}:\n"
                                   f"{self.log_path.read_text()}")
            pong = self.ping(0.5)
            if pong is not None:
                return pong
        self._process.kill()
        raise RuntimeError(f"sightline serve did not answer within {timeout:g} s:\n"
                           f"{self.log_path.read_text()}")

    def ping(self, timeout: float = 2.0) -> dict | None:
        return query_info(self.endpoint, timeout, **self.client_keys)

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def sample(self) -> ProcSample:
        status = Path(f"/proc/{self.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        # /proc/PID/stat: the command name may hold spaces, so split after its ')'.
        stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return ProcSample(
            at=time.monotonic(),
            rss_kib=int(fields["VmRSS"].split()[0]),
            peak_rss_kib=int(fields["VmHWM"].split()[0]),
            fds=len(os.listdir(f"/proc/{self.pid}/fd")),
            threads=int(fields["Threads"]),
            cpu_s=(int(stat[11]) + int(stat[12])) / CLOCK_TICKS,  # utime, stime
        )

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then wait; returns the exit code (0 is a clean shutdown)."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
                return None  # did not stop on SIGTERM: a hang, reported as such
        return self._process.returncode

    def log_problems(self) -> dict[str, int]:
        """Counts of tracebacks and ERROR lines in the daemon's log (bugs it survived)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return {"tracebacks": text.count("Traceback (most recent call last)"),
                "error_lines": sum(1 for line in text.splitlines() if " ERROR " in line
                                   or line.startswith("ERROR"))}

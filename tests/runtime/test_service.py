"""systemd integration: sd_notify datagrams, the watchdog, the unit file and its installer."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from runtime import cli
from runtime.config import load_config
from runtime.daemon.service import Watchdog, notify, notify_ready, notify_status, notify_stopping
from runtime.errors import SightlineError
from runtime.tools import service_install
from runtime.tools.service_install import (
    RunCommand,
    WriteFile,
    apply_plan,
    plan_install,
    read_template,
    render_unit,
    sightline_executable,
)
from tests.conftest import SIGHTLINE


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2)

    def next(self) -> str:
        return self.sock.recv(4096).decode()

    def empty(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(2)
        return False


@pytest.fixture
def systemd(short_tmp: Path, monkeypatch) -> Iterator[NotifySocket]:
    path = short_tmp / "notify.sock"
    listener = NotifySocket(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield listener
    listener.sock.close()


def test_ready_watchdog_and_stopping_reach_systemd(systemd: NotifySocket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify_ready("serving centerface")
    assert systemd.next() == "READY=1\nSTATUS=serving centerface"
    assert Watchdog.from_environ().ping()
    assert systemd.next() == "WATCHDOG=1"
    assert notify_status("2 clients")
    assert systemd.next() == "STATUS=2 clients"
    assert notify_stopping()
    assert systemd.next() == "STOPPING=1"


def test_abstract_namespace_notify_socket_is_used(monkeypatch):
    name = f"sightline-test-{uuid.uuid4().hex}"
    listener = NotifySocket("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify_ready()
        assert listener.next() == "READY=1"
    finally:
        listener.sock.close()


def test_everything_is_a_no_op_outside_systemd(monkeypatch):
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    assert notify("READY=1") is False
    assert notify_ready() is False and notify_stopping() is False
    watchdog = Watchdog.from_environ()
    assert not watchdog.enabled and watchdog.ping_every_s is None
    assert watchdog.ping() is False and watchdog.ping_if_due() is False


def test_a_notify_socket_that_went_away_is_reported_not_raised(short_tmp: Path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "gone.sock"))
    assert notify_ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # not AF_UNIX: not ours to speak
    assert notify_ready() is False


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "10000000"}, 10.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "4242"}, 10.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "ten seconds"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_PID": "4242"}, None),
    ({}, None),
])
def test_watchdog_interval_comes_from_watchdog_usec_for_this_pid(env, interval):
    watchdog = Watchdog.from_environ(env, pid=4242)
    assert watchdog.interval_s == interval
    assert watchdog.enabled is (interval is not None)
    assert watchdog.ping_every_s == (None if interval is None else interval / 2)


def test_watchdog_pings_at_half_the_interval(systemd: NotifySocket):
    watchdog = Watchdog(10.0)
    assert watchdog.ping_if_due(now=100.0)  # the first turn pings at once
    assert systemd.next() == "WATCHDOG=1"
    assert not watchdog.ping_if_due(now=101.0)
    assert not watchdog.ping_if_due(now=104.9)
    assert systemd.empty()
    assert watchdog.ping_if_due(now=105.0)
    assert systemd.next() == "WATCHDOG=1"


# -- the unit file ----------------------------------------------------------------------
def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: [Section], Key=Value, keys may repeat, # and ; comment."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


@pytest.fixture(scope="module")
def rendered_unit() -> str:
    return render_unit(sightline_executable(), Path("/etc/sightline/sightline.toml"),
                       "sightline", "sightline")


def test_unit_is_a_hardened_notify_service_with_a_watchdog(rendered_unit: str):
    assert not re.search(r"@[A-Z_]+@", rendered_unit), "a placeholder was left unfilled"
    unit = parse_unit(rendered_unit)
    svc = {key: values[-1] for key, values in unit["Service"].items()}
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "10",
        "Restart": "on-failure", "RestartSec": "2", "User": "sightline", "Group": "sightline",
        "RuntimeDirectory": "sightline", "StateDirectory": "sightline",
        "CacheDirectory": "sightline", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "no",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "no", "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "", "DevicePolicy": "closed",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    }
    assert {key: svc.get(key) for key in expected} == expected
    assert "SIGHTLINE_CACHE_DIR=/var/cache/sightline" in unit["Service"]["Environment"]
    assert "char-nvidia* rw" in unit["Service"]["DeviceAllow"]
    exec_start = svc["ExecStart"]
    assert exec_start == f"{sightline_executable()} serve --config /etc/sightline/sightline.toml"
    assert Path(exec_start.split()[0]).is_absolute()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_passes_systemd_analyze_verify(rendered_unit: str, short_tmp: Path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    path = short_tmp / "sightline.service"
    path.write_text(rendered_unit)
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                          timeout=30)
    # verify exits 0 even on unknown keys and bad values; its complaints name the unit.
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if "sightline.service" in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_default_config_is_valid_and_serves_headsets_over_curve(tmp_path: Path):
    path = tmp_path / "sightline.toml"
    path.write_text(read_template("sightline.toml"))
    config = load_config(path)
    assert config.security.mode == "curve"
    assert config.server.endpoints == ("tcp://0.0.0.0:5555",)


# -- the installer ----------------------------------------------------------------------
def test_service_install_dry_run_prints_every_step_and_changes_nothing(short_tmp: Path):
    config = short_tmp / "etc" / "sightline.toml"
    done = subprocess.run([*SIGHTLINE, "service", "install", "--dry-run", "--user",
                           "sl-test-nobody", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "dry run: nothing is changed" in out
    assert "useradd --system --user-group" in out and "sl-test-nobody" in out
    assert f"write {config} (mode 0644)" in out
    assert "write /etc/systemd/system/sightline.service (mode 0644)" in out
    assert f"| ExecStart={sightline_executable()} serve --config {config}" in out
    assert "| User=sl-test-nobody" in out
    assert "run: systemctl daemon-reload" in out
    assert "systemctl enable --now sightline" in out
    assert not config.exists()


def test_service_install_refuses_without_root(monkeypatch):
    monkeypatch.setattr(service_install.os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(cli.main, ["service", "install"])
    assert result.exit_code == 2
    assert "run it as root (sudo), or add --dry-run" in " ".join(result.output.split())


def test_install_writes_config_and_unit_and_runs_commands_in_order(tmp_path: Path):
    config = tmp_path / "etc" / "sightline" / "sightline.toml"
    unit_path = tmp_path / "systemd" / "sightline.service"
    executable = Path("/opt/sightline/bin/sightline")
    plan = plan_install(user="sl-test-nobody", config=config, executable=executable,
                        unit_path=unit_path)
    ran: list[list[str]] = []

    def run(argv, **_):
        ran.append(argv)
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    apply_plan(plan, echo=lambda _: None, run=run)
    assert config.read_text() == read_template("sightline.toml")
    assert unit_path.stat().st_mode & 0o777 == 0o644
    assert f"ExecStart={executable} serve --config {config}" in unit_path.read_text()
    assert ran[0][:2] == ["useradd", "--system"] and ran[0][-1] == "sl-test-nobody"
    assert [str(executable), "keys", "daemon", "--keys", "/var/lib/sightline/keys"] in ran
    assert ran[-1] == ["systemctl", "daemon-reload"]
    # Run again: the config the admin may have edited since is kept.
    config.write_text("models = ['./mine']\n")
    again = plan_install(user="sl-test-nobody", config=config, executable=executable,
                         unit_path=unit_path)
    assert not any(isinstance(s, WriteFile) and s.path == config for s in again.steps)
    assert any(f"{config} exists; keeping it" in note for note in again.notes)


def test_a_failing_step_stops_the_install_and_says_which(tmp_path: Path):
    plan = plan_install(user="sl-test-nobody", config=tmp_path / "c.toml",
                        executable=Path("/opt/sightline/bin/sightline"),
                        unit_path=tmp_path / "u.service")

    def run(argv, **_):
        return SimpleNamespace(returncode=9, stdout="", stderr="useradd: cannot lock /etc/passwd")

    with pytest.raises(SightlineError, match=r"step 1 failed .*cannot lock /etc/passwd"):
        apply_plan(plan, echo=lambda _: None, run=run)
    assert not (tmp_path / "u.service").exists()


def test_sightline_installed_in_a_home_directory_is_refused(tmp_path: Path):
    plan = plan_install(user="sl-test-nobody", config=tmp_path / "c.toml",
                        executable=Path("/home/ana/.venv/bin/sightline"),
                        unit_path=tmp_path / "u.service")
    assert plan.problems and "ProtectHome=yes" in plan.problems[0]
    with pytest.raises(SightlineError, match="not installing"):
        apply_plan(plan, echo=lambda _: None, run=lambda *a, **k: pytest.fail("ran a step"))
    assert not (tmp_path / "u.service").exists()


def test_plain_config_needs_no_daemon_key(tmp_path: Path):
    config = tmp_path / "plain.toml"
    config.write_text('[security]\nmode = "plain"\n')
    plan = plan_install(user="sl-test-nobody", config=config,
                        executable=Path("/opt/sightline/bin/sightline"),
                        unit_path=tmp_path / "u.service")
    assert not any(isinstance(step, RunCommand) and "keys" in step.argv for step in plan.steps)

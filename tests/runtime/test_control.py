"""The control socket and `sightline status`: real zmq sockets, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
import zmq

from runtime.daemon import control
from runtime.daemon.control import (
    ControlError,
    ControlServer,
    default_control_endpoint,
    find_control_endpoint,
    query_status,
    request,
)
from runtime.daemon.status import DaemonStatus, format_duration
from tests.conftest import SIGHTLINE

STATUS = {
    "version": "0.1.0", "pid": 4242, "started_at": 1.7e9, "uptime_s": 3725.5,
    "endpoints": ["tcp://0.0.0.0:5555", "ipc:///run/sightline/frames.sock"],
    "control": "ipc:///run/sightline/control.sock", "clients": 3, "default_model": "centerface",
    "counters": {"frames": 1200, "superseded": 40, "errors": {"BAD_HEADER": 2}},
    "models": [
        {"name": "centerface", "version": "1.5.0", "task": "face",
         "provider": "CUDAExecutionProvider", "default": True, "results": 1100, "expired": 50,
         "errors": 1},
        {"name": "yolo", "version": "8", "task": "detect", "provider": "CPUExecutionProvider",
         "default": False, "results": 7, "expired": 0, "errors": 0},
    ],
}


@pytest.fixture
def endpoint(short_tmp: Path) -> str:
    return f"ipc://{short_tmp}/run/control.sock"


@pytest.fixture
def server(endpoint: str):
    with ControlServer(endpoint, lambda: STATUS) as running:
        yield running


def _raw(endpoint: str, *parts: bytes, timeout: float = 2.0) -> dict | None:
    """Send arbitrary parts with a REQ socket; the decoded reply or None."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(list(parts))
        if not sock.poll(int(timeout * 1000)):
            return None
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close()


def test_status_request_gets_what_the_status_function_returns(server: ControlServer):
    assert query_status(server.endpoint, timeout=2) == STATUS


def test_control_socket_is_usable_by_owner_and_group_only(server: ControlServer):
    path = Path(server.endpoint.removeprefix("ipc://"))
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_malformed_requests_get_error_replies_and_the_server_keeps_answering(
        server: ControlServer):
    endpoint = server.endpoint
    for parts, expected in [
        ((b"\xc1 not msgpack",), "not valid msgpack"),
        ((msgpack.packb([1, 2, 3]),), "must be a msgpack map"),
        ((msgpack.packb({"cmd": "status"}), b"extra part"), "2 message parts"),
        ((msgpack.packb({"cmd": "reboot"}),), "unknown command 'reboot'"),
        ((msgpack.packb({}),), "unknown command None"),
        ((msgpack.packb({1: "integer key"}),), "not valid msgpack"),
    ]:
        reply = _raw(endpoint, *parts)
        assert reply is not None, f"no reply to {parts!r}"
        assert reply["ok"] is False
        assert expected in reply["error"], reply
    # A DEALER without the REQ envelope is answered too; a message over the size limit
    # makes ZeroMQ drop that connection, and nothing else.
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    dealer.send(b"no envelope")
    assert dealer.poll(2000), "a DEALER peer got no reply"
    assert "not valid msgpack" in msgpack.unpackb(dealer.recv())["error"]
    dealer.send_multipart([b"", b"x" * (control.MAX_REQUEST_BYTES + 1)])
    dealer.close()
    assert _raw(endpoint, b"y" * (control.MAX_REQUEST_BYTES + 1), timeout=0.5) is None
    assert query_status(endpoint, timeout=2) == STATUS
    assert request(endpoint, {"cmd": "ping"}) == {"ok": True}


def test_a_failing_status_function_costs_one_reply_not_the_server(endpoint: str):
    calls = []

    def flaky() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("counter exploded")
        return {"pid": 1, "odd": {1, 2}, "path": Path("/x")}

    with ControlServer(endpoint, flaky) as running:
        with pytest.raises(ControlError, match="counter exploded"):
            query_status(running.endpoint)
        # Values msgpack cannot carry as such are converted, not fatal.
        assert query_status(running.endpoint) == {"pid": 1, "odd": [1, 2], "path": "/x"}


def test_second_daemon_on_the_same_control_socket_is_refused(server: ControlServer):
    with pytest.raises(ControlError, match="another daemon already answers"):
        ControlServer(server.endpoint, dict).start()
    assert query_status(server.endpoint) == STATUS  # the first one still owns it


def test_stale_socket_file_from_a_crashed_daemon_is_replaced(short_tmp: Path):
    path = short_tmp / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a SIGKILLed daemon leaves
    with ControlServer(f"ipc://{path}", lambda: {"fresh": True}) as running:
        assert query_status(running.endpoint) == {"fresh": True}


def test_directory_owned_by_someone_else_is_refused(short_tmp: Path, monkeypatch):
    monkeypatch.setattr(control, "_trusted_owners", lambda: (12345,))
    with pytest.raises(ControlError, match="refusing"):
        ControlServer(f"ipc://{short_tmp}/control.sock", dict).start()


def test_stop_ends_the_thread_and_nothing_answers_afterwards(endpoint: str):
    running = ControlServer(endpoint, lambda: STATUS)
    running.start()
    assert query_status(running.endpoint) == STATUS
    started = time.monotonic()
    running.stop()
    assert time.monotonic() - started < 1.0
    assert not running._thread.is_alive()
    assert not Path(running.endpoint.removeprefix("ipc://")).exists()
    assert query_status(running.endpoint, timeout=0.3) is None


def test_default_endpoint_prefers_systemd_runtime_directory_then_xdg_then_temp(
        tmp_path: Path, monkeypatch):
    monkeypatch.setattr(control, "SYSTEM_RUNTIME_DIR", tmp_path / "absent")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/sightline")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_control_endpoint() == "ipc:///run/sightline/control.sock"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert default_control_endpoint() == "ipc:///run/user/1000/sightline/control.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(control.tempfile, "tempdir", None)
    assert default_control_endpoint() == f"ipc://{tmp_path}/sightline-{os.getuid()}/control.sock"


def test_clients_find_the_system_daemon_from_an_admin_shell(short_tmp: Path, monkeypatch):
    # The admin's shell has its own XDG_RUNTIME_DIR and no RUNTIME_DIRECTORY; the service
    # bound /run/sightline/control.sock.
    system_dir = short_tmp / "run-sightline"
    system_dir.mkdir()
    monkeypatch.setattr(control, "SYSTEM_RUNTIME_DIR", system_dir)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp / "user"))
    with ControlServer(f"ipc://{system_dir}/control.sock", lambda: STATUS):
        assert find_control_endpoint() == f"ipc://{system_dir}/control.sock"


def test_daemon_status_reports_models_clients_and_counters():
    pipeline = SimpleNamespace(
        bundle=SimpleNamespace(version="1.5.0", manifest=SimpleNamespace(task="face")),
        engine=SimpleNamespace(provider="CPUExecutionProvider"),
        counters=SimpleNamespace(results=10, expired=2, errors=1))
    server = SimpleNamespace(
        pipelines={"centerface": pipeline}, default_model="centerface", client_count=2,
        endpoints=["tcp://127.0.0.1:5555"], monitor=None, admission=None,
        identities=SimpleNamespace(by_key=True, headsets=lambda: []),
        counters=SimpleNamespace(frames=13, superseded=1, errors=Counter({"BAD_HEADER": 3})))
    report = DaemonStatus(server, "ipc:///run/sightline/control.sock")()
    assert report["pid"] == os.getpid() and report["clients"] == 2
    assert report["endpoints"] == ["tcp://127.0.0.1:5555"]
    assert report["control"] == "ipc:///run/sightline/control.sock"
    assert report["counters"] == {"frames": 13, "superseded": 1, "errors": {"BAD_HEADER": 3}}
    assert report["models"] == [{
        "name": "centerface", "version": "1.5.0", "task": "face",
        "provider": "CPUExecutionProvider", "default": True, "results": 10, "expired": 2,
        "errors": 1}]
    assert 0 <= report["uptime_s"] < 5
    msgpack.packb(report)  # it must travel as is


def test_durations_read_naturally():
    assert format_duration(42) == "42s"
    assert format_duration(3725.5) == "1h 02m 05s"
    assert format_duration(2 * 86400 + 7200) == "2d 2h 00m"


def _status_cli(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    return subprocess.run([*SIGHTLINE, "status", *args], capture_output=True, text=True,
                          timeout=30, env=env)


def test_status_command_prints_a_summary_of_the_running_daemon(server: ControlServer):
    done = _status_cli("--control", server.endpoint)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "pid 4242" in out and "up 1h 02m 05s" in out
    assert "3 connected" in out
    assert "tcp://0.0.0.0:5555" in out
    assert "1200 received" in out and "BAD_HEADER 2" in out
    line = next(line for line in out.splitlines() if line.startswith("centerface"))
    assert line.split() == ["centerface", "(default)", "1.5.0", "face", "CUDAExecutionProvider",
                            "1100", "50", "1"]
    # A bare path works as well as an ipc:// endpoint; --json gives the document itself.
    done = _status_cli("--control", server.endpoint.removeprefix("ipc://"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == STATUS


def test_status_command_without_a_daemon_says_where_it_looked(short_tmp: Path):
    endpoint = f"ipc://{short_tmp}/control.sock"
    done = _status_cli("--control", endpoint, "--timeout", "0.5")
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert "Is `sightline serve` running?" in message
    assert f"Its control socket is {endpoint}" in message
    assert "there is no socket file" in message
    assert "Traceback" not in done.stderr

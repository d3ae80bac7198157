"""The daemon's local admin socket: answers `{"cmd": "status"}` over an ipc:// endpoint.

One named thread owns a ROUTER socket and serves msgpack requests from `sightline status`
and other local tools. It only calls the `status` callable it was given; it never
touches the frame path's sockets, and no request, however malformed, stops it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from runtime.errors import SightlineError

log = logging.getLogger(__name__)
POLL_MS = 100
SOCKET_NAME = "control.sock"
SYSTEM_RUNTIME_DIR = Path("/run/sightline")  # systemd's RuntimeDirectory=sightline
# Status is local-admin information: owner and group (members of `sightline`) only.
SOCKET_MODE = 0o660
MAX_REQUEST_BYTES = 64 * 1024


class ControlError(SightlineError):
    """The control socket could not be bound, or the daemon answered a request with an error."""


def ipc_path(endpoint: str) -> Path | None:
    """The socket file behind an ipc:// endpoint; None for tcp:// and the like."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return Path(endpoint[len("ipc://"):])
    return None


def as_endpoint(text: str) -> str:
    """Accept a bare socket path as shorthand for ipc://PATH."""
    return text if "://" in text else f"ipc://{Path(text).absolute()}"


def _candidate_dirs() -> list[Path]:
    dirs = []
    # systemd sets RUNTIME_DIRECTORY (colon-separated) for RuntimeDirectory=.
    if os.environ.get("RUNTIME_DIRECTORY"):
        dirs.append(Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        dirs.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "sightline")
    dirs.append(SYSTEM_RUNTIME_DIR)
    dirs.append(Path(tempfile.gettempdir()) / f"sightline-{os.getuid()}")
    return dirs


def default_control_endpoint() -> str:
    """Where a daemon binds its control socket when not told otherwise.

    systemd's RuntimeDirectory (/run/sightline), else $XDG_RUNTIME_DIR/sightline, else
    /run/sightline when it exists and is writable, else a per-user temp directory.
    """
    for directory in _candidate_dirs():
        if directory == SYSTEM_RUNTIME_DIR and not os.access(directory, os.W_OK | os.X_OK):
            continue
        return f"ipc://{directory / SOCKET_NAME}"
    raise AssertionError("unreachable: the temp directory is always a candidate")


def find_control_endpoint() -> str:
    """Where a client should look: the first candidate whose socket file exists.

    An admin's shell has other variables than the service (no RUNTIME_DIRECTORY, its own
    XDG_RUNTIME_DIR), so clients probe every place a daemon may have bound.
    """
    for directory in _candidate_dirs():
        path = directory / SOCKET_NAME
        if path.is_socket():
            return f"ipc://{path}"
    return default_control_endpoint()


def _trusted_owners() -> tuple[int, ...]:
    return (os.getuid(), 0)


def _someone_listens(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _plain(value: Any) -> Any:
    """msgpack fallback for what a status dict may hold: numpy scalars, paths, enums."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def _pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True, default=_plain)


class ControlServer:
    """Serve `status()` on `endpoint` from a background thread until `stop()`."""

    def __init__(self, endpoint: str, status: Callable[[], dict],
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self._status = status
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._inode: int | None = None  # of the socket file we bound, removed on stop
        self._stop = threading.Event()
        # daemon: if start-up fails after start(), the process must still exit (and systemd
        # restart it) rather than hang on this thread.
        self._thread = threading.Thread(target=self._serve, name="sightline-control", daemon=True)

    def start(self) -> str:
        """Bind (in the caller's thread, so errors surface here) and start serving.

        Returns the endpoint as bound. Call it during start-up: the socket file gets its
        restrictive mode from a briefly narrowed umask, which is process-wide.
        """
        path = ipc_path(self.endpoint)
        if path is not None:
            self._prepare_path(path)
        # ROUTER, not REP: no request/reply state machine a broken peer could upset (a
        # DEALER sending without the REQ envelope made REP lose the next good request).
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A local tool sending a huge message gets disconnected instead of using memory.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        previous = os.umask(0o777 & ~SOCKET_MODE)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise ControlError(f"cannot bind the control socket {self.endpoint}: {exc}") from None
        finally:
            os.umask(previous)
        if path is not None:
            os.chmod(path, SOCKET_MODE)  # whatever libzmq did, the mode is ours
            self._inode = path.stat().st_ino
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._socket = sock
        self._thread.start()  # a full memory barrier: the socket is the thread's from here on
        return self.endpoint

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        elif self._socket is not None:  # bound but never served
            self._socket.close()
        self._socket = None
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        # libzmq leaves the file behind until its context ends; `sightline status` should
        # then say "no socket file" rather than wait for an answer that never comes.
        path = ipc_path(self.endpoint)
        if path is None or self._inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == self._inode:
                path.unlink()
        self._inode = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _prepare_path(self, path: Path) -> None:
        directory = path.parent
        if not directory.is_dir():
            directory.mkdir(mode=0o750, parents=True)  # ours: the daemon's user and group only
        owner = directory.lstat().st_uid
        if owner not in _trusted_owners():
            # e.g. someone else created /tmp/sightline-UID first, to intercept status queries
            raise ControlError(f"{directory} belongs to uid {owner}, not to this user; "
                               "refusing to put the control socket there")
        if path.exists() or path.is_socket():
            # libzmq unlinks an existing socket file on bind: a second daemon would
            # silently steal the first one's control socket.
            if _someone_listens(path):
                raise ControlError(f"another daemon already answers on {path}; stop it first, "
                                   "or give this one another control socket")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- control thread -----------------------------------------------------------------
    def _serve(self) -> None:
        sock = self._socket
        try:
            while not self._stop.is_set():
                if not sock.poll(POLL_MS):
                    continue
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                # [peer, b"", request] from REQ clients, [peer, request] from DEALERs.
                cut = 2 if len(parts) >= 3 and parts[1] == b"" else 1
                envelope, body = parts[:cut], parts[cut:]
                # ROUTER drops (never blocks on) replies to gone or non-reading peers.
                sock.send_multipart([*envelope, self._answer(body)], zmq.NOBLOCK)
        finally:
            sock.close()

    def _answer(self, parts: list[bytes]) -> bytes:
        try:
            request = self._parse(parts)
            command = request.get("cmd")
            if command == "status":
                return _pack({"ok": True, "status": self._status()})
            if command == "ping":
                return _pack({"ok": True})
            return _pack({"ok": False, "error": f"unknown command {command!r}; "
                                                "known: status, ping"})
        except ControlError as exc:
            return _pack({"ok": False, "error": str(exc)})
        except Exception as exc:  # a bug in status() must cost one reply, not the socket
            log.exception("control request failed")
            return _pack({"ok": False, "error": f"internal error: {exc}"})

    @staticmethod
    def _parse(parts: list[bytes]) -> dict[str, Any]:
        if len(parts) != 1:
            raise ControlError(f"a request is one msgpack map, got {len(parts)} message parts")
        try:
            request = msgpack.unpackb(parts[0], raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types for garbage
            raise ControlError(f"request is not valid msgpack: {exc}") from None
        if not isinstance(request, dict):
            raise ControlError("a request must be a msgpack map like {\"cmd\": \"status\"}")
        return request


def request(endpoint: str, message: dict[str, Any], timeout: float = 2.0,
            context: zmq.Context | None = None) -> dict[str, Any] | None:
    """Send one control request; the decoded reply, or None when nobody answers in time."""
    context = context or zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(_pack(message))
        if not sock.poll(int(timeout * 1000)):
            return None
        raw = sock.recv()
    finally:
        sock.close()
    try:
        reply = msgpack.unpackb(raw, raw=False)
    except Exception:  # msgpack raises several unrelated types for garbage
        reply = None
    if not isinstance(reply, dict):
        raise ControlError(f"{endpoint} answered with something that is not a control reply; "
                           "is it a sightline control socket?")
    return reply


def query_status(endpoint: str, timeout: float = 2.0,
                 context: zmq.Context | None = None) -> dict[str, Any] | None:
    """A running daemon's status, or None when nothing answers on `endpoint` in time."""
    reply = request(endpoint, {"cmd": "status"}, timeout, context)
    if reply is None:
        return None
    if not reply.get("ok"):
        raise ControlError(f"the daemon could not report its status: {reply.get('error')}")
    return reply["status"]


def unreachable_reason(endpoint: str) -> str | None:
    """Why a client surely cannot reach `endpoint` (missing file, no permission), if known."""
    path = ipc_path(endpoint)
    if path is None:
        return None
    if not path.exists():
        return f"there is no socket file at {path}"
    if not os.access(path, os.W_OK):
        return (f"permission denied on {path}: run as root or as a member of the daemon's group "
                f"(sightline)")
    return None


"""Logging set-up: structured records to journald under systemd, plain lines elsewhere.

The journal handler speaks journald's native datagram protocol, so every record keeps
its level, logger, code location, thread and `extra={"sightline_...": ...}` fields as
searchable journal fields (`journalctl -u sightline SIGHTLINE_MODEL=centerface`).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from pathlib import Path
from typing import IO

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
IDENTIFIER = "sightline"
EXTRA_PREFIX = "sightline_"
STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A datagram that cannot reach journald within this is dropped: a stalled journald
# must not stall frame processing (pipeline threads log per-frame errors).
SEND_TIMEOUT_S = 0.25
_INVALID_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")
_SEALS = ("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE", "F_SEAL_SEAL")


def syslog_priority(levelno: int) -> int:
    """logging level -> syslog priority (journal PRIORITY field)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def field_name(key: str) -> str:
    """A journal field name: upper case letters, digits and '_', not leading '_', <= 64."""
    name = _INVALID_FIELD_CHARS.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "X_" + name
    return name[:64]


def encode_field(name: str, value: str | bytes) -> bytes:
    """One field in the native protocol; values with a newline use the binary form."""
    data = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    """Send records to journald over its native socket (`socket_path` for tests)."""

    def __init__(self, level: int = logging.NOTSET, socket_path: Path | str = JOURNAL_SOCKET,
                 identifier: str = IDENTIFIER) -> None:
        super().__init__(level)
        self.socket_path = str(socket_path)
        self.identifier = identifier
        self.dropped = 0  # records journald did not take in time; reported on the next one
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.settimeout(SEND_TIMEOUT_S)
        # Larger datagrams fail; with a send timeout set, some kernels report that as
        # EAGAIN (indistinguishable from a busy journald) rather than EMSGSIZE.
        self._max_datagram = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 4096

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        fields = [
            ("MESSAGE", self.format(record)),
            ("PRIORITY", str(syslog_priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", self.identifier),
            ("LOGGER", record.name),
            ("CODE_FILE", record.pathname),
            ("CODE_LINE", str(record.lineno)),
            ("CODE_FUNC", record.funcName),
            ("THREAD_NAME", str(record.threadName)),
        ]
        for key, value in record.__dict__.items():
            if key.startswith(EXTRA_PREFIX):
                fields.append((field_name(key), str(value)))
        if self.dropped:
            fields.append(("SIGHTLINE_LOG_DROPPED", str(self.dropped)))
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload = b"".join(encode_field(k, v) for k, v in self.fields(record))
            self._send(payload)
        except (TimeoutError, BlockingIOError):
            self.dropped += 1
            return
        except Exception:
            self.handleError(record)
            return
        self.dropped = 0

    def _send(self, payload: bytes) -> None:
        if len(payload) > self._max_datagram:
            self._send_as_memfd(payload)
            return
        try:
            self._socket.sendto(payload, self.socket_path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_as_memfd(payload)

    def _send_as_memfd(self, payload: bytes) -> None:
        # Too big for one datagram (a long traceback, say): journald takes a sealed memfd
        # passed with SCM_RIGHTS instead, as sd_journal_sendv does.
        fd = os.memfd_create("sightline-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            seals = 0
            for name in _SEALS:
                seals |= getattr(fcntl, name)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            # Not socket.send_fds: in Python 3.11 (at least) it ignores its address argument.
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self._socket.sendmsg([b""], rights, 0, self.socket_path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._socket.close()
        super().close()


def stream_is_journal(stream: IO | None = None, environ: dict[str, str] | None = None) -> bool:
    """True when `stream` (stderr) is the journal stream systemd connected us to.

    JOURNAL_STREAM is "DEV:INODE" of that stream; it is inherited by child processes whose
    stderr may point elsewhere, so it is compared with the stream itself (systemd.exec(5)).
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    stream = sys.stderr if stream is None else stream
    try:
        device, inode = (int(part) for part in value.split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def configure_logging(level: str | int, journal: bool | None = None,
                      socket_path: Path | str = JOURNAL_SOCKET,
                      stream: IO | None = None) -> logging.Handler:
    """Install the root handler: journald or plain stderr lines; returns it.

    journal=None (auto): journald when stderr is systemd's journal stream. journal=True
    (the config asks): journald whenever its socket exists. False: stderr. Calling it
    again replaces the handler it installed before, and leaves others alone.
    """
    stream = sys.stderr if stream is None else stream
    use_journal = stream_is_journal(stream) if journal is None else journal
    handler: logging.Handler
    if use_journal and Path(socket_path).is_socket():
        handler = JournalHandler(socket_path=socket_path)
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    handler._sightline = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_sightline", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if use_journal and not isinstance(handler, JournalHandler):
        logging.getLogger(__name__).warning(
            "journald socket %s not found; logging to stderr instead", socket_path)
    return handler

"""Structured logging to journald, against a real datagram socket standing in for journald."""

from __future__ import annotations

import fcntl
import inspect
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.daemon.journal import (
    JournalHandler,
    configure_logging,
    field_name,
    stream_is_journal,
    syslog_priority,
)


def parse_native(data: bytes) -> dict[str, str]:
    """journald's native protocol: KEY=value\\n, or KEY\\n <u64 LE length> value \\n."""
    fields: dict[str, str] = {}
    while data:
        line_end = data.index(b"\n")
        line = data[:line_end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            data = data[line_end + 1:]
        else:
            key = line
            (size,) = struct.unpack("<Q", data[line_end + 1:line_end + 9])
            value = data[line_end + 9:line_end + 9 + size]
            assert data[line_end + 9 + size:line_end + 10 + size] == b"\n"
            data = data[line_end + 10 + size:]
        assert key.decode() not in fields, f"field {key!r} sent twice"
        fields[key.decode()] = value.decode()
    return fields


class FakeJournald:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(2)

    def receive(self) -> tuple[bytes, dict[str, str]]:
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 1)
        if fds:  # the payload came as a sealed memfd
            (fd,) = fds
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
                data = os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        return data, parse_native(data)


@pytest.fixture
def journald(short_tmp: Path) -> Iterator[FakeJournald]:
    fake = FakeJournald(short_tmp / "journal.sock")
    yield fake
    fake.sock.close()


@pytest.fixture
def logger(journald: FakeJournald) -> Iterator[logging.Logger]:
    log = logging.getLogger("sightline.test.journal")
    handler = JournalHandler(socket_path=journald.path)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    log.removeHandler(handler)
    handler.close()


def test_record_arrives_with_level_logger_code_location_and_sightline_fields(
        journald: FakeJournald, logger: logging.Logger):
    line = inspect.currentframe().f_lineno + 1
    logger.warning("model %s loaded", "centerface",
                   extra={"sightline_model": "centerface", "sightline_frames": 3})
    _, fields = journald.receive()
    assert fields == {
        "MESSAGE": "model centerface loaded",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "sightline",
        "LOGGER": "sightline.test.journal",
        "CODE_FILE": __file__,
        "CODE_LINE": str(line),
        "CODE_FUNC": "test_record_arrives_with_level_logger_code_location_and_sightline_fields",
        "THREAD_NAME": "MainThread",
        "SIGHTLINE_MODEL": "centerface",
        "SIGHTLINE_FRAMES": "3",
    }


def test_levels_map_to_syslog_priorities(journald: FakeJournald, logger: logging.Logger):
    for method, priority in [(logger.debug, "7"), (logger.info, "6"), (logger.warning, "4"),
                             (logger.error, "3"), (logger.critical, "2")]:
        method("x")
        assert journald.receive()[1]["PRIORITY"] == priority
    assert syslog_priority(logging.INFO + 5) == 6 and syslog_priority(1) == 7


def test_multi_line_message_uses_the_binary_length_prefixed_form(
        journald: FakeJournald, logger: logging.Logger):
    try:
        raise ValueError("engine exploded")
    except ValueError:
        logger.exception("inference failed\non two lines")
    raw, fields = journald.receive()
    assert b"\nMESSAGE\n" in b"\n" + raw  # no "MESSAGE=" for a value with newlines
    message = fields["MESSAGE"]
    assert message.startswith("inference failed\non two lines\nTraceback")
    assert "ValueError: engine exploded" in message
    assert fields["PRIORITY"] == "3"


def test_a_record_too_big_for_a_datagram_goes_as_a_sealed_memfd(
        journald: FakeJournald, logger: logging.Logger):
    big = "x" * (4 << 20)
    logger.info(big)
    raw, fields = journald.receive()
    assert fields["MESSAGE"] == big


def test_a_stalled_journald_costs_log_records_not_time_and_says_so(
        journald: FakeJournald, logger: logging.Logger):
    handler = logger.handlers[0]
    handler._socket.settimeout(0.02)
    # journald stops reading: its queue fills (net.unix.max_dgram_qlen), sends time out.
    for number in range(64):
        logger.info("record %d", number)
        if handler.dropped:
            break
    assert handler.dropped == 1
    while True:  # journald catches up
        journald.sock.settimeout(0.05)
        try:
            journald.sock.recv(65536)
        except TimeoutError:
            break
    journald.sock.settimeout(2)
    logger.info("back")
    fields = journald.receive()[1]
    assert fields["MESSAGE"] == "back" and fields["SIGHTLINE_LOG_DROPPED"] == "1"
    assert handler.dropped == 0


def test_field_names_are_made_valid():
    assert field_name("sightline_model") == "SIGHTLINE_MODEL"
    assert field_name("sightline-gpu.temp") == "SIGHTLINE_GPU_TEMP"
    assert field_name("_private") == "PRIVATE"
    assert len(field_name("sightline_" + "a" * 100)) == 64


def test_journald_being_away_never_raises_into_the_caller(short_tmp: Path, capsys):
    handler = JournalHandler(socket_path=short_tmp / "no-journald.sock")
    log = logging.getLogger("sightline.test.journal.away")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.error("nobody listens")  # logging's handleError reports it on stderr
    finally:
        log.removeHandler(handler)
        handler.close()
    assert "nobody listens" in capsys.readouterr().err


# -- choosing the handler -------------------------------------------------------------
@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def _journal_stream_of(stream) -> str:
    stat = os.fstat(stream.fileno())
    return f"{stat.st_dev}:{stat.st_ino}"


def test_under_systemd_logging_goes_to_the_journal(
        journald: FakeJournald, tmp_path: Path, monkeypatch, root_logging):
    with open(tmp_path / "stderr", "w") as stderr:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream_of(stderr))
        handler = configure_logging("info", socket_path=journald.path, stream=stderr)
        assert isinstance(handler, JournalHandler)
        logging.getLogger("sightline.test").info("ready", extra={"sightline_clients": 0})
        fields = journald.receive()[1]
        assert fields["MESSAGE"] == "ready" and fields["SIGHTLINE_CLIENTS"] == "0"
        # Configuring again replaces our handler instead of adding a second one.
        configure_logging("info", socket_path=journald.path, stream=stderr)
        assert sum(isinstance(h, JournalHandler) for h in logging.getLogger().handlers) == 1


def test_inherited_journal_stream_with_redirected_stderr_logs_plain_lines(
        journald: FakeJournald, tmp_path: Path, monkeypatch, root_logging):
    with open(tmp_path / "other", "w") as other, open(tmp_path / "stderr", "w") as stderr:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream_of(other))
        assert not stream_is_journal(stderr)
        handler = configure_logging("warning", socket_path=journald.path, stream=stderr)
        assert not isinstance(handler, JournalHandler)
        logging.getLogger("sightline.test").warning("plain")
    line = (tmp_path / "stderr").read_text()
    assert line.endswith(" WARNING sightline.test: plain\n")
    assert logging.getLogger().level == logging.WARNING


def test_config_can_ask_for_the_journal_and_falls_back_when_it_is_absent(
        journald: FakeJournald, short_tmp: Path, tmp_path: Path, monkeypatch, root_logging):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    with open(tmp_path / "stderr", "w") as stderr:
        assert isinstance(configure_logging("info", journal=True, socket_path=journald.path,
                                            stream=stderr), JournalHandler)
        handler = configure_logging("info", journal=True, socket_path=short_tmp / "none",
                                    stream=stderr)
        assert not isinstance(handler, JournalHandler)
    assert "journald socket" in (tmp_path / "stderr").read_text()

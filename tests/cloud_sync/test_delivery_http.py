"""HTTP(S) delivery of a bundle against a real server on a loopback port: resume with
Range after an interruption, retries with backoff, and never more bytes than the signed
manifest's size."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.delivery import DeliveryError
from cloud_sync.delivery.http import download_http
from tests.cloud_sync.http_server import FileServer, Request, make_tls_files, serve_bytes

PATH = "/updates/u1/model.bundle"
DATA = random.Random(7).randbytes(600_000)
SIZE = len(DATA)
FAST = {"backoff_s": 0.01, "timeout_s": 5.0}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours proxy variables; the test server is on loopback.
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serve_bytes({PATH: DATA}) as server:
        yield server


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "incoming" / "model.bundle"


def test_downloads_the_whole_file_in_one_request(server: FileServer, dest: Path) -> None:
    assert download_http(server.url(PATH), dest, size=SIZE, **FAST) == dest
    assert dest.read_bytes() == DATA
    assert server.requests == [Request(PATH, None)]


def test_resume_from_a_partial_file_asks_only_for_the_missing_bytes(
        server: FileServer, dest: Path) -> None:
    dest.parent.mkdir()
    dest.write_bytes(DATA[:250_000])
    download_http(server.url(PATH), dest, size=SIZE, **FAST)
    assert dest.read_bytes() == DATA
    assert server.requests == [Request(PATH, "bytes=250000-")]
    assert server.bytes_sent == SIZE - 250_000


def test_download_killed_with_sigkill_resumes_from_what_reached_the_disk(
        server: FileServer, dest: Path) -> None:
    server.pace_s = 0.02
    code = ("import sys; from pathlib import Path; from cloud_sync.delivery.http import "
            "download_http; download_http(sys.argv[1], Path(sys.argv[2]), size=int(sys.argv[3]))")
    child = subprocess.Popen([sys.executable, "-c", code, server.url(PATH), str(dest), str(SIZE)],
                             cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 10
        while not (dest.exists() and dest.stat().st_size >= 64 * 1024):
            assert child.poll() is None and time.monotonic() < deadline, "child never wrote"
            time.sleep(0.005)
    finally:
        child.kill()
        child.wait()
    partial = dest.stat().st_size
    assert partial < SIZE
    server.pace_s = 0.0
    download_http(server.url(PATH), dest, size=SIZE, **FAST)
    assert dest.read_bytes() == DATA
    assert server.requests == [Request(PATH, None), Request(PATH, f"bytes={partial}-")]


def test_connection_cut_mid_body_is_retried_and_resumed_where_it_stopped(
        server: FileServer, dest: Path) -> None:
    server.cut_after, server.cut_times = 100_000, 2
    download_http(server.url(PATH), dest, size=SIZE, **FAST)
    assert dest.read_bytes() == DATA
    assert [r.range for r in server.requests] == [None, "bytes=100000-", "bytes=200000-"]
    assert server.bytes_sent == SIZE


def test_stalled_server_times_out_and_the_download_resumes(
        server: FileServer, dest: Path) -> None:
    server.cut_after, server.stall_s = 50_000, 1.0
    download_http(server.url(PATH), dest, size=SIZE, backoff_s=0.01, timeout_s=0.2)
    assert dest.read_bytes() == DATA
    assert server.requests[:2] == [Request(PATH, None), Request(PATH, "bytes=50000-")]


def test_server_ignoring_range_restarts_from_zero_and_gives_identical_bytes(
        server: FileServer, dest: Path) -> None:
    server.ignore_range = True
    dest.parent.mkdir()
    dest.write_bytes(b"\xff" * 250_000)  # not a prefix of DATA: must not survive
    seen: list[int] = []
    download_http(server.url(PATH), dest, size=SIZE, progress=lambda d, s: seen.append(d),
                  **FAST)
    assert dest.read_bytes() == DATA
    assert server.requests == [Request(PATH, "bytes=250000-")]
    assert seen[0] == 0 and seen[-1] == SIZE  # progress restarts from 0 too


def test_missing_bundle_is_a_delivery_error_naming_the_url_without_retrying(
        server: FileServer, dest: Path) -> None:
    url = server.url("/updates/u1/nope.bundle")
    with pytest.raises(DeliveryError, match="not found at .*nope.bundle.*manifest's url"):
        download_http(url, dest, size=SIZE, **FAST)
    assert len(server.requests) == 1


def test_forbidden_is_a_delivery_error_without_retrying(server: FileServer, dest: Path) -> None:
    server.fail_status, server.fail_times = 403, 10
    with pytest.raises(DeliveryError, match="HTTP 403"):
        download_http(server.url(PATH), dest, size=SIZE, **FAST)
    assert len(server.requests) == 1


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "until-close"])
def test_server_sending_more_than_size_fails_without_writing_past_size(
        server: FileServer, dest: Path, send_length: bool) -> None:
    server.send_length = send_length
    size = SIZE - 1000
    with pytest.raises(DeliveryError, match="larger than the signed manifest's size"):
        download_http(server.url(PATH), dest, size=size, **FAST)
    assert dest.stat().st_size <= size


@pytest.mark.parametrize("partial", [0, 100_000], ids=["fresh", "resumed"])
def test_hosted_file_smaller_than_size_is_a_delivery_error(
        server: FileServer, dest: Path, partial: int) -> None:
    dest.parent.mkdir()
    dest.write_bytes(DATA[:partial])
    with pytest.raises(DeliveryError, match="smaller than the signed manifest's size"):
        download_http(server.url(PATH), dest, size=SIZE + 1, **FAST)
    assert len(server.requests) == 1


def test_short_body_without_length_is_resumed_then_found_smaller_than_size(
        server: FileServer, dest: Path) -> None:
    server.send_length = False  # the body just ends: a cut, as far as the device can tell
    with pytest.raises(DeliveryError, match="HTTP 416.*smaller than the signed manifest's"):
        download_http(server.url(PATH), dest, size=SIZE + 1, **FAST)
    assert dest.stat().st_size == SIZE
    assert [r.range for r in server.requests] == [None, f"bytes={SIZE}-"]


def test_resume_past_the_end_of_the_hosted_file_is_a_delivery_error(
        server: FileServer, dest: Path) -> None:
    dest.parent.mkdir()
    dest.write_bytes(DATA + b"x" * 10)
    with pytest.raises(DeliveryError, match="HTTP 416"):
        download_http(server.url(PATH), dest, size=SIZE + 20, **FAST)
    assert server.requests == [Request(PATH, f"bytes={SIZE + 10}-")]


def test_503_is_retried_with_backoff_then_succeeds(server: FileServer, dest: Path) -> None:
    server.fail_status, server.fail_times = 503, 2
    download_http(server.url(PATH), dest, size=SIZE, **FAST)
    assert dest.read_bytes() == DATA
    assert len(server.requests) == 3


def test_gives_up_after_the_retries_naming_url_bytes_and_last_error(
        server: FileServer, dest: Path) -> None:
    server.fail_status, server.fail_times = 503, 100
    url = server.url(PATH)
    with pytest.raises(DeliveryError) as raised:
        download_http(url, dest, size=SIZE, retries=3, **FAST)
    message = str(raised.value)
    assert url in message and f"0 of {SIZE} bytes" in message and "HTTP 503" in message
    assert len(server.requests) == 4


def test_retries_count_only_attempts_that_brought_no_bytes(
        server: FileServer, dest: Path) -> None:
    server.cut_after, server.cut_times = 50_000, 5
    download_http(server.url(PATH), dest, size=SIZE, retries=1, **FAST)
    assert dest.read_bytes() == DATA
    assert len(server.requests) == 6


def test_unreachable_server_is_retried_then_a_delivery_error(dest: Path) -> None:
    with serve_bytes({}) as gone:
        url = gone.url(PATH)
    with pytest.raises(DeliveryError, match="gave up .* last error: cannot connect"):
        download_http(url, dest, size=SIZE, retries=2, **FAST)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/model.bundle",
                                 "/etc/passwd", "data:,hello"])
def test_only_http_and_https_urls_are_fetched(dest: Path, url: str) -> None:
    with pytest.raises(DeliveryError, match="only http:// and https://"):
        download_http(url, dest, size=5)
    assert not dest.exists()


def test_redirect_to_another_http_path_is_followed_and_keeps_range(
        server: FileServer, dest: Path) -> None:
    server.redirects["/latest"] = server.url(PATH)
    dest.parent.mkdir()
    dest.write_bytes(DATA[:1000])
    download_http(server.url("/latest"), dest, size=SIZE, **FAST)
    assert dest.read_bytes() == DATA
    assert server.requests == [Request("/latest", "bytes=1000-"), Request(PATH, "bytes=1000-")]


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/model.bundle"])
def test_redirect_to_a_non_http_url_is_refused(server: FileServer, dest: Path,
                                               target: str) -> None:
    server.redirects["/latest"] = target
    with pytest.raises(DeliveryError, match=f"{re.escape(target)}.*manifest's url"):
        download_http(server.url("/latest"), dest, size=SIZE, **FAST)
    assert len(server.requests) == 1


def test_stop_cancels_a_download_in_progress(server: FileServer, dest: Path) -> None:
    server.pace_s = 0.01
    stop = threading.Event()

    def progress(done: int, size: int) -> None:
        if done >= 64 * 1024:
            stop.set()

    started = time.monotonic()
    with pytest.raises(DeliveryError, match="cancelled"):
        download_http(server.url(PATH), dest, size=SIZE, progress=progress, stop=stop, **FAST)
    assert time.monotonic() - started < 1.0
    assert 64 * 1024 <= dest.stat().st_size < SIZE


def test_stop_cancels_during_a_backoff_wait(server: FileServer, dest: Path) -> None:
    server.fail_status, server.fail_times = 503, 100
    stop = threading.Event()
    timer = threading.Timer(0.1, stop.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="cancelled"):
        download_http(server.url(PATH), dest, size=SIZE, stop=stop, backoff_s=30)
    timer.join()
    assert time.monotonic() - started < 1.0
    assert len(server.requests) == 1


def test_already_complete_file_returns_without_a_request(server: FileServer, dest: Path) -> None:
    dest.parent.mkdir()
    dest.write_bytes(DATA)
    seen: list[tuple[int, int]] = []
    download_http(server.url(PATH), dest, size=SIZE, progress=lambda *a: seen.append(a),
                  **FAST)
    assert dest.read_bytes() == DATA
    assert server.requests == []
    assert seen == [(SIZE, SIZE)]


def test_partial_file_longer_than_size_is_downloaded_again(
        server: FileServer, dest: Path) -> None:
    dest.parent.mkdir()
    dest.write_bytes(b"\xff" * (SIZE + 5))
    download_http(server.url(PATH), dest, size=SIZE, **FAST)
    assert dest.read_bytes() == DATA
    assert server.requests == [Request(PATH, None)]


def test_progress_rises_monotonically_in_throttled_steps_to_size(
        server: FileServer, dest: Path) -> None:
    seen: list[tuple[int, int]] = []
    download_http(server.url(PATH), dest, size=SIZE, progress=lambda *a: seen.append(a),
                  **FAST)
    done = [d for d, _ in seen]
    assert done == sorted(set(done)) and done[-1] == SIZE
    assert {s for _, s in seen} == {SIZE}
    assert len(seen) <= SIZE // (64 * 1024) + 2


def test_https_download_verifies_the_server_against_ca_file(tmp_path: Path, dest: Path) -> None:
    tls = make_tls_files(tmp_path)
    with serve_bytes({PATH: DATA}, tls=tls.server_context()) as server:
        download_http(server.url(PATH), dest, size=SIZE, ca_file=tls.ca, **FAST)
    assert server.url(PATH).startswith("https://")
    assert dest.read_bytes() == DATA


def test_https_server_with_an_unknown_ca_is_refused_without_retrying(
        tmp_path: Path, dest: Path) -> None:
    tls = make_tls_files(tmp_path)
    with serve_bytes({PATH: DATA}, tls=tls.server_context()) as server, \
            pytest.raises(DeliveryError, match="could not be verified.*ca_file"):
        download_http(server.url(PATH), dest, size=SIZE, backoff_s=30)
    assert server.requests == []

"""HTTP(S) delivery of an update's bundle: a resumable download into one file, so a power
cut or a lost network costs only the bytes in flight. It never trusts the server about
the size; the caller checks the signed manifest's size and sha256 (no hashing here).
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cloud_sync.delivery import DeliveryError

log = logging.getLogger(__name__)

_SCHEMES = ("http", "https")
_READ_SIZE = 1 << 20
_PROGRESS_EVERY = 64 * 1024
_MAX_BACKOFF_S = 60.0
# Transient by nature although 4xx: a request timeout, and a CDN asking us to slow down.
_RETRY_4XX = (408, 429)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class _Transient(Exception):
    """A failure worth another attempt (network, timeout, 5xx); never leaves this module."""


def download_http(url: str, dest: Path, *, size: int,
                  progress: Callable[[int, int], None] | None = None,
                  stop: threading.Event | None = None, timeout_s: float = 30.0,
                  retries: int = 5, backoff_s: float = 1.0,
                  ca_file: Path | None = None) -> Path:
    """Download `url` into `dest`, resuming from the bytes `dest` already holds.

    `size` is the signed manifest's size: the file never grows past it, and a server whose
    file is another size is an error. `retries` counts consecutive attempts that brought
    no new bytes; an attempt that made progress resets the count. `progress(done, size)`
    is called as data arrives (it goes back to 0 if a server ignores the range request).
    Setting `stop` cancels between reads and during a backoff (a read that is waiting on a
    silent server ends within `timeout_s`). `dest` is fsynced before this returns.
    Raises DeliveryError.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise DeliveryError(f"refusing to download {url!r}: only http:// and https:// URLs "
                            "are fetched; check the manifest's url")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    context = ssl.create_default_context(cafile=ca_file) if scheme == "https" else None
    download = _Download(url, Path(dest), size, progress, stop, timeout_s, context)
    download.run(retries, backoff_s)
    return Path(dest)


class _OnlyHttpRedirects(urllib.request.HTTPRedirectHandler):
    """urllib refuses redirects to file:// but follows ftp://; a bundle URL may only lead
    to http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in _SCHEMES:
            fp.close()
            raise DeliveryError(f"{req.full_url} redirects to {newurl!r}, which is not an "
                                "http(s) URL; check the manifest's url")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Download:
    def __init__(self, url: str, dest: Path, size: int,
                 progress: Callable[[int, int], None] | None, stop: threading.Event | None,
                 timeout_s: float, context: ssl.SSLContext | None) -> None:
        self.url = url
        self.dest = dest
        self.size = size
        self.progress = progress
        self.stop = stop
        self.timeout_s = timeout_s
        handlers: list[urllib.request.BaseHandler] = [_OnlyHttpRedirects()]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self.opener = urllib.request.build_opener(*handlers)
        self.done = 0
        self.received = 0  # bytes that came in during the current attempt
        self._reported = -1

    def run(self, retries: int, backoff_s: float) -> None:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        failures = 0
        while True:
            self._check_stop()
            self.received = 0
            try:
                self._attempt()
                break
            except _Transient as exc:
                last_error = str(exc)
            failures = 1 if self.received else failures + 1
            if failures > retries:
                raise DeliveryError(
                    f"gave up downloading {self.url} after {failures} failed attempts in a "
                    f"row, with {self._on_disk()} of {self.size} bytes on disk; last error: "
                    f"{last_error}. The next attempt resumes from there")
            delay = min(backoff_s * 2 ** (failures - 1), _MAX_BACKOFF_S)
            log.warning("download of %s interrupted at %d of %d bytes (%s); retrying in %.1fs",
                        self.url, self._on_disk(), self.size, last_error, delay)
            if self.stop is not None:
                if self.stop.wait(delay):
                    self._check_stop()
            else:
                time.sleep(delay)
        self._sync_directory()

    def _attempt(self) -> None:
        start = self._on_disk()
        if start > self.size:
            # Not a prefix of this bundle (another file at the same path): start over.
            log.warning("%s holds %d bytes, more than the %d expected; downloading again",
                        self.dest, start, self.size)
            start = 0
        with self._open_file() as file:
            file.truncate(start)
            self.done = start
            if start == self.size:
                # Complete already (say the process was killed before it could report):
                # the caller's sha256 check decides whether these are the right bytes.
                self._report()
                self._fsync(file)
                return
            request = urllib.request.Request(self.url, headers={"Accept-Encoding": "identity"})
            if start:
                request.add_header("Range", f"bytes={start}-")
            response = self._open(request)
            with response:
                if response.status == 206:
                    self._check_content_range(response, start)
                elif response.status != 200:
                    raise DeliveryError(f"{self.url} answered HTTP {response.status} "
                                        f"{response.reason}, not the bundle's bytes")
                else:
                    self._check_whole_body(response, start)
                    file.truncate(0)
                    self.done = 0
                file.seek(self.done)
                self._report()
                self._receive(response, file)
                self._fsync(file)

    def _open(self, request: urllib.request.Request) -> http.client.HTTPResponse:
        try:
            return self.opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise self._http_error(exc.code, exc.reason) from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise DeliveryError(
                    f"the TLS certificate of {self.url} could not be verified "
                    f"({exc.reason.verify_message}): give the CA that signed the server's "
                    "certificate as ca_file, or fix the server's certificate") from exc
            raise _Transient(f"cannot connect: {exc.reason}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(_describe(exc)) from exc

    def _http_error(self, code: int, reason: str) -> Exception:
        if code >= 500 or code in _RETRY_4XX:
            return _Transient(f"HTTP {code} {reason}")
        if code == 404:
            return DeliveryError(f"bundle not found at {self.url} (HTTP 404): check the "
                                 "manifest's url")
        if 300 <= code < 400:
            return DeliveryError(f"{self.url} answered a redirect the download cannot follow "
                                 f"(HTTP {code}: {reason}); check the manifest's url")
        if code == 416:
            return DeliveryError(
                f"{self.url} has fewer bytes than the {self.done} already downloaded to "
                f"{self.dest} (HTTP 416), so it is smaller than the signed manifest's size "
                f"of {self.size}: the hosted file and the manifest disagree")
        return DeliveryError(f"{self.url} refused the download with HTTP {code} {reason}: "
                             "check the manifest's url and that the device may fetch it")

    def _check_content_range(self, response: http.client.HTTPResponse, start: int) -> None:
        header = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.match(header.strip())
        if match is None or int(match.group(1)) != start:
            raise DeliveryError(
                f"{self.url} answered a request for bytes from {start} with Content-Range "
                f"{header!r}; refusing to splice the wrong bytes into {self.dest}")
        total = match.group(3)
        if total != "*" and int(total) != self.size:
            raise self._wrong_size(int(total))

    def _check_whole_body(self, response: http.client.HTTPResponse, start: int) -> None:
        if start:
            log.info("%s ignored the range request; downloading all %d bytes again",
                     self.url, self.size)
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) != self.size:
            raise self._wrong_size(int(length))

    def _wrong_size(self, server_size: int) -> DeliveryError:
        relation = "larger" if server_size > self.size else "smaller"
        return DeliveryError(
            f"the file at {self.url} is {server_size} bytes, {relation} than the signed "
            f"manifest's size of {self.size}: the hosted file and the manifest disagree")

    def _receive(self, response: http.client.HTTPResponse, file: BinaryIO) -> None:
        while True:
            self._check_stop()
            try:
                # read1: returns what has arrived instead of waiting for a full buffer,
                # so progress and cancellation are checked as data trickles in.
                chunk = response.read1(_READ_SIZE)
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(_describe(exc)) from exc
            if not chunk:
                break
            room = self.size - self.done
            if len(chunk) > room:
                self._write(file, chunk[:room])
                raise DeliveryError(
                    f"{self.url} sent more than {self.size} bytes, so its file is larger "
                    f"than the signed manifest's size: the hosted file and the manifest "
                    "disagree")
            self._write(file, chunk)
            self._report()
        if self.done < self.size:
            raise _Transient(f"connection closed after {self.done} of {self.size} bytes")

    def _write(self, file: BinaryIO, data: bytes) -> None:
        try:
            file.write(data)
        except OSError as exc:
            raise DeliveryError(f"cannot write {self.dest}: {exc.strerror or exc}; check "
                                "free space and permissions") from exc
        self.done += len(data)
        self.received += len(data)

    def _report(self) -> None:
        if self.progress is None or self.done == self._reported:
            return
        # Throttled; but the first value, the last one and a restart from 0 always go out.
        if (self._reported < 0 or self.done == self.size or self.done < self._reported
                or self.done - self._reported >= _PROGRESS_EVERY):
            self._reported = self.done
            self.progress(self.done, self.size)

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise DeliveryError(f"download of {self.url} cancelled with {self._on_disk()} "
                                f"of {self.size} bytes on disk")

    def _on_disk(self) -> int:
        try:
            return self.dest.stat().st_size
        except FileNotFoundError:
            return 0

    def _open_file(self) -> BinaryIO:
        try:
            fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DeliveryError(f"cannot open {self.dest} for writing: "
                                f"{exc.strerror or exc}") from exc
        return os.fdopen(fd, "wb")

    def _fsync(self, file: BinaryIO) -> None:
        # The daemon may be killed (or lose power) right after we return.
        file.flush()
        os.fsync(file.fileno())

    def _sync_directory(self) -> None:
        # A new file's directory entry needs its own fsync to survive a power cut.
        fd = os.open(self.dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

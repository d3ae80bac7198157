"""A real HTTP(S) file server on a free loopback port for the OTA download tests, with
range requests and knobs for the faults a device meets in the field: a server that ignores
Range, connections cut mid-body, 5xx answers. It logs every request it gets.

    with serve_bytes({"/model.bundle": data}) as server:
        download_http(server.url("/model.bundle"), dest, size=len(data))
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_PIECE = 16 * 1024


@dataclass(frozen=True)
class Request:
    path: str
    range: str | None  # the Range header as sent, None when there was none


class FileServer:
    """Serves `files` (path -> bytes). The fault knobs are plain attributes a test may set
    at any time; each counts down over the requests it applies to."""

    def __init__(self, files: dict[str, bytes], tls: ssl.SSLContext | None = None) -> None:
        self.files = dict(files)
        self.ignore_range = False  # answer every request 200 with the whole body
        self.cut_after: int | None = None  # close the connection after this many body bytes
        self.cut_times = 1  # ... for this many requests
        self.fail_status: int | None = None  # answer this status (503, 404 ...)
        self.fail_times = 1  # ... for this many requests
        self.send_length = True  # False: no Content-Length, the body ends at close
        self.stall_s = 0.0  # a cut connection first stays silent this long, then closes
        self.pace_s = 0.0  # pause between 16 KiB pieces of a body
        self.redirects: dict[str, str] = {}  # path -> Location of a 302
        self.requests: list[Request] = []
        self.bytes_sent = 0  # body bytes written to clients, over all requests
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.file_server = self  # type: ignore[attr-defined]
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={
            "poll_interval": 0.05}, name=f"test-http-server-{self.port}", daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        range_header = handler.headers.get("Range")
        with self._lock:
            self.requests.append(Request(handler.path, range_header))
            fail = self.fail_status is not None and self.fail_times > 0
            if fail:
                self.fail_times -= 1
            cut = None
            if self.cut_after is not None and self.cut_times > 0:
                self.cut_times -= 1
                cut = self.cut_after
        if fail:
            _send(handler, self.fail_status, {}, b"")
            return
        if handler.path in self.redirects:
            _send(handler, 302, {"Location": self.redirects[handler.path]}, b"")
            return
        body = self.files.get(handler.path)
        if body is None:
            _send(handler, 404, {}, b"")
            return
        status, headers = 200, {"Accept-Ranges": "bytes"}
        match = _RANGE.match(range_header or "")
        if match and not self.ignore_range:
            first = int(match.group(1))
            last = min(int(match.group(2) or len(body) - 1), len(body) - 1)
            if first >= len(body) or first > last:
                _send(handler, 416, {"Content-Range": f"bytes */{len(body)}"}, b"")
                return
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{len(body)}"
            body = body[first:last + 1]
        if self.send_length:
            headers["Content-Length"] = str(len(body))
        # The headers promise the whole body; a cut sends only its start.
        sent = _send(handler, status, headers, body if cut is None else body[:cut],
                     pace_s=self.pace_s)
        with self._lock:
            self.bytes_sent += sent
        if cut is not None and self.stall_s:
            time.sleep(self.stall_s)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, and a body without Content-Length ends at close.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self.server.file_server._answer(self)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:
        pass  # keep the test output quiet


def _send(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes,
          pace_s: float = 0.0) -> int:
    """Send one response; returns how many body bytes went out."""
    sent = 0
    try:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        if "Content-Length" not in headers and status != 200 and status != 206:
            handler.send_header("Content-Length", "0")
        handler.end_headers()
        for offset in range(0, len(body), _PIECE):
            handler.wfile.write(body[offset:offset + _PIECE])
            sent += len(body[offset:offset + _PIECE])
            if pace_s:
                handler.wfile.flush()
                time.sleep(pace_s)
        handler.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client went away (cancelled, or refused an oversized body)
    return sent


@contextmanager
def serve_bytes(files: dict[str, bytes], *, tls: ssl.SSLContext | None = None
                ) -> Iterator[FileServer]:
    """A started FileServer, always shut down on exit."""
    server = FileServer(files, tls)
    try:
        yield server
    finally:
        server.close()


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_tls_files(directory: Path) -> TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it."""
    from tests.cloud_sync.pki import make_pki

    pki = make_pki(directory)
    return TlsFiles(pki.ca, pki.server_cert, pki.server_key)

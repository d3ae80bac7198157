"""The daemon's side of CURVE: the ZAP handler that follows the allow-list directory.

Every CURVE handshake is decided here, on the ZAP thread, before the
connection may carry a frame: keys not in the allow-list directory (one public certificate
per enrolled headset) are refused, and so are handshakes over the per-key and per-address
limits (runtime/daemon/admission.py). The directory is re-read when it changes, so a
headset is revoked by deleting its certificate, without restarting the daemon.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import MappingProxyType

import zmq
from zmq.utils import z85

from runtime.curve_keys import enrolled
from runtime.daemon.admission import HandshakeAdmission
from runtime.errors import ConfigError

log = logging.getLogger("sightline.zap")
ZAP_VERSION = b"1.0"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by ZMQ RFC 27
POLL_MS = 100


class ZapThread:
    """The ZAP handler: one named thread owning a REP socket on ZAP_ENDPOINT.

    Deliberately not pyzmq's ThreadAuthenticator (an asyncio loop per thread): a handshake
    flood makes this thread busy, and every microsecond it holds the GIL is taken from the
    I/O and pipeline threads serving enrolled headsets. A plain poll loop answers a request
    in a few tens of microseconds. The User-Id it hands libzmq is the Z85 key, which every
    message of the connection then carries (server.py reads it per frame, so a revoked
    key is refused at once).
    """

    def __init__(self, context: zmq.Context, admission: HandshakeAdmission) -> None:
        self.admission = admission
        self._context = context
        self._socket: zmq.Socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="sightline-zap", daemon=True)

    def start(self) -> None:
        """Bind in the caller's thread (so a second handler in this context fails here),
        then serve. Call before the CURVE socket binds: libzmq admits every key while no
        ZAP handler is bound."""
        sock = self._context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close()
            raise ConfigError(f"cannot bind the ZAP handler at {ZAP_ENDPOINT}: {exc}") from None
        self._socket = sock
        self._thread.start()  # a full memory barrier: the socket is the thread's from here on

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        elif self._socket is not None:
            self._socket.close()
        self._socket = None

    def _serve(self) -> None:
        sock = self._socket
        try:
            while not self._stop.is_set():
                if not sock.poll(POLL_MS):
                    continue
                try:
                    request = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                sock.send_multipart(self._answer(request))
        finally:
            sock.close()

    def _answer(self, msg: list[bytes]) -> list[bytes]:
        request_id = msg[1] if len(msg) > 1 else b""
        if len(msg) != 7 or msg[0] != ZAP_VERSION or msg[5] != b"CURVE":
            return [ZAP_VERSION, request_id, b"400", b"CURVE only", b"", b""]
        address, key = msg[3].decode("ascii", "replace"), msg[6]
        z85_key = z85.encode(key).decode("ascii")
        admitted, reason = self.admission.decide(z85_key, address)
        if admitted:
            return [ZAP_VERSION, request_id, b"200", b"OK", z85_key.encode(), b""]
        log.debug("DENIED (CURVE) client_key=%s address=%s reason=%s", z85_key, address, reason)
        return [ZAP_VERSION, request_id, b"400", reason.encode(), b"", b""]


class HeadsetAuthenticator:
    """ZAP authenticator for the daemon's socket, following the allow-list directory."""

    def __init__(self, context: zmq.Context, headsets_dir: Path,
                 admission: HandshakeAdmission) -> None:
        self.headsets_dir = Path(headsets_dir)
        self.headsets_dir.mkdir(parents=True, exist_ok=True)
        self.admission = admission
        self._auth = ZapThread(context, admission)
        self._seen: tuple = ()
        # Z85 public key -> enrolled name, allowed right now; checked per frame so that a
        # revoked headset's open connection is refused too, not only its next handshake.
        self.names: MappingProxyType[str, str] = MappingProxyType({})

    @property
    def allowed(self) -> MappingProxyType[str, str]:
        return self.names

    def start(self) -> None:
        self.refresh(force=True)
        self._auth.start()

    def _snapshot(self) -> tuple:
        return tuple(sorted((p.name, p.stat().st_mtime_ns)
                            for p in self.headsets_dir.glob("*.key")))

    def refresh(self, force: bool = False) -> bool:
        """Re-read the allow-list if it changed; return True when it was reloaded."""
        snapshot = self._snapshot()
        if snapshot == self._seen and not force:
            return False
        self.names = MappingProxyType({key: name for name, key in enrolled(self.headsets_dir)})
        self.admission.names = self.names  # one reference store: the ZAP thread sees either
        self._seen = snapshot
        log.info("allow-list loaded: %d enrolled headset(s) in %s", len(snapshot),
                 self.headsets_dir)
        return True

    def stop(self) -> None:
        self._auth.stop()

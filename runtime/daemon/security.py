"""The daemon's side of CURVE: the ZAP handler that follows the allow-list directory.

Every CURVE handshake is decided here, on pyzmq's authenticator thread, before the
connection may carry a frame: keys not in the allow-list directory (one public certificate
per enrolled headset) are refused, and so are handshakes over the per-key and per-address
limits (runtime/daemon/admission.py). The directory is re-read when it changes, so a
headset is revoked by deleting its certificate, without restarting the daemon.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import MappingProxyType

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from runtime.curve_keys import enrolled
from runtime.daemon.admission import HandshakeAdmission

log = logging.getLogger(__name__)
ZAP_VERSION = b"1.0"


class _ZapHandler(ThreadAuthenticator):
    """pyzmq's ZAP thread with our decision for CURVE: `HandshakeAdmission.decide`.

    The User-Id it hands libzmq is the Z85 key, which every message of the connection
    then carries (server.py reads it per frame, to refuse a revoked key at once).
    """

    def __init__(self, context: zmq.Context, admission: HandshakeAdmission) -> None:
        super().__init__(context, log=logging.getLogger("sightline.zap"))
        self.admission = admission

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) < 6 or msg[0] != ZAP_VERSION or msg[5] != b"CURVE" or len(msg) != 7:
            if len(msg) >= 2:
                self._send_zap_reply(msg[1], b"400", b"CURVE only")
            return
        request_id, address, key = msg[1], msg[3].decode("ascii", "replace"), msg[6]
        z85_key = z85.encode(key).decode("ascii")
        admitted, reason = self.admission.decide(z85_key, address)
        if admitted:
            self._send_zap_reply(request_id, b"200", b"OK", z85_key)
        else:
            self.log.debug("DENIED (CURVE) client_key=%s address=%s reason=%s", z85_key,
                           address, reason)
            self._send_zap_reply(request_id, b"400", reason.encode())


class HeadsetAuthenticator:
    """ZAP authenticator for the daemon's socket, following the allow-list directory."""

    def __init__(self, context: zmq.Context, headsets_dir: Path,
                 admission: HandshakeAdmission) -> None:
        self.headsets_dir = Path(headsets_dir)
        self.headsets_dir.mkdir(parents=True, exist_ok=True)
        self.admission = admission
        self._auth = _ZapHandler(context, admission)
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
        self._auth.thread.name = "sightline-zap"

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

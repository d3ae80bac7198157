"""The daemon's side of CURVE: the ZAP handler that follows the allow-list directory.

pyzmq's ThreadAuthenticator answers ZAP requests from the allow-list directory (one public
certificate per enrolled headset). The directory is re-read when it changes, so a headset
is revoked by deleting its certificate, without restarting the daemon.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from runtime.curve_keys import enrolled

log = logging.getLogger(__name__)


class HeadsetAuthenticator:
    """ZAP authenticator for the daemon's socket, following the allow-list directory."""

    def __init__(self, context: zmq.Context, headsets_dir: Path) -> None:
        self.headsets_dir = Path(headsets_dir)
        self.headsets_dir.mkdir(parents=True, exist_ok=True)
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("sightline.zap"))
        self._seen: tuple = ()
        # Z85 public keys allowed right now; checked per frame so that a revoked headset's
        # open connection is refused too, not only its next handshake.
        self.allowed: frozenset[str] = frozenset()

    def start(self) -> None:
        self._auth.start()
        self.refresh(force=True)

    def _snapshot(self) -> tuple:
        return tuple(sorted((p.name, p.stat().st_mtime_ns)
                            for p in self.headsets_dir.glob("*.key")))

    def refresh(self, force: bool = False) -> bool:
        """Re-read the allow-list if it changed; return True when it was reloaded."""
        snapshot = self._snapshot()
        if snapshot == self._seen and not force:
            return False
        self._auth.configure_curve(domain="*", location=str(self.headsets_dir))
        self.allowed = frozenset(key for _, key in enrolled(self.headsets_dir))
        self._seen = snapshot
        log.info("allow-list loaded: %d enrolled headset(s) in %s", len(snapshot),
                 self.headsets_dir)
        return True

    def stop(self) -> None:
        self._auth.stop()

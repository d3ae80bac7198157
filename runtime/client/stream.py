"""A stand-in headset: stream the astronaut photo to a running daemon at a camera's pace
and report every reply that is not a result, and every change of model version.

For operators checking an update end to end (`sightline stream` while `sightline push`
runs): the new version must appear in the replies without a single failed frame.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2

from runtime.client.sdk import Client
from runtime.models.assets import ASTRONAUT_PNG, fetch_asset


@dataclass
class StreamSummary:
    sent: int = 0
    results: int = 0
    not_results: Counter = field(default_factory=Counter)  # "error:CODE", "dropped", "lost"
    versions: list[str] = field(default_factory=list)  # model@version, in order of appearance

    @property
    def failed(self) -> int:
        return sum(self.not_results.values())


def stream(endpoint: str, *, seconds: float | None, fps: float = 30.0,
           on_event: Callable[[str], None] = print, **client_keys) -> StreamSummary:
    """Send one frame at a time (waiting for its reply) until `seconds` pass or Ctrl-C."""
    frame = cv2.resize(cv2.imread(str(fetch_asset(ASTRONAUT_PNG))), (640, 480))
    summary = StreamSummary()
    deadline = None if seconds is None else time.monotonic() + seconds
    with Client(endpoint, max_in_flight=1, **client_keys) as client:
        if not client.wait_connected(10):
            raise ConnectionError(f"no daemon reachable at {endpoint}")
        try:
            while deadline is None or time.monotonic() < deadline:
                started = time.monotonic()
                client.send(frame)
                summary.sent += 1
                reply = client.recv(timeout=5)
                if reply is not None and reply.ok:
                    summary.results += 1
                    version = f"{reply.message['model']}@{reply.message['model_version']}"
                    if not summary.versions or summary.versions[-1] != version:
                        summary.versions.append(version)
                        on_event(f"frame {summary.sent}: {version}")
                else:
                    kind = "lost" if reply is None else reply.kind
                    if reply is not None and reply.kind == "error":
                        kind = f"error:{reply.message.get('code')}"
                    summary.not_results[kind] += 1
                    on_event(f"frame {summary.sent}: {kind} "
                             f"{reply.message if reply is not None else ''}")
                time.sleep(max(0.0, 1.0 / fps - (time.monotonic() - started)))
        except KeyboardInterrupt:
            pass
    return summary

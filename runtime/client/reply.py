"""What the daemon answered to one frame, as the SDK hands it to the application.

`Reply` wraps the decoded reply map (docs/protocol.md §5, docs/client.md) with typed
accessors; nothing here touches a socket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.protocol import detections_from_reply
from runtime.results import Classification, Detection, Mask, tensor_from_wire
from runtime.transform import FrameTransform


@dataclass(frozen=True)
class Reply:
    """One answer to one frame: kind is result, error, dropped, lost or pong."""

    kind: str
    seq: int | None
    message: dict[str, Any]
    sent_at: float | None = None  # client clock, when the frame was handed to the socket
    received_at: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.kind == "result"

    @property
    def detections(self) -> tuple[Detection, ...]:
        return detections_from_reply(self.message)

    @property
    def classes(self) -> tuple[Classification, ...]:
        """A classify model's top-k, best first (docs/protocol.md §5.1.7)."""
        return tuple(Classification.from_wire(c) for c in self.message.get("classes", ()))

    def mask(self) -> Mask | None:
        """A segment model's mask over the source frame (uint8 [h, w]; `.probability()` for
        0-1 floats), decoded from its PNG; None when the reply has none."""
        wire = self.message.get("mask")
        return None if wire is None else Mask.from_wire(wire)

    @property
    def skeleton(self) -> tuple[tuple[int, int], ...]:
        """Landmark pairs to join when drawing (a landmarks model's, or a cascade's)."""
        return tuple((int(a), int(b)) for a, b in self.message.get("skeleton", ()))

    @property
    def detector_skipped(self) -> bool:
        """A cascade with ROI tracking answered without running its detector."""
        return bool(self.message.get("detector_skipped", False))

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        return {k: tensor_from_wire(v) for k, v in self.message.get("tensors", {}).items()}

    @property
    def transform(self) -> FrameTransform | None:
        """Where the model input lay in the source frame (raw results; None otherwise)."""
        wire = self.message.get("transform")
        return None if wire is None else FrameTransform.from_wire(wire, self.message["w"],
                                                                  self.message["h"])

    def tensor_to_source(self, name: str) -> np.ndarray:
        """Raw output `name`, a (..., H, W) map, as (..., h, w) over the source frame: the
        letterbox border cropped and the rest resized (as is if the daemon already did)."""
        wire = self.message["tensors"][name]
        tensor = tensor_from_wire(wire)
        if wire.get("space") == "source":
            return tensor
        return self._transform_for(name).warp_to_source(tensor)

    def point_to_source(self, name: str, x, y, *, clip: bool = True):
        """A point (or arrays of them) in raw output `name`'s pixel grid -> source pixels.

        x is along the tensor's last dim, y along the one before; element [..., i, j] has its
        centre at (j + 0.5, i + 0.5). Clamped to the frame unless `clip` is False.
        """
        wire = self.message["tensors"][name]
        grid_h, grid_w = wire["shape"][-2:]
        if wire.get("space") == "source":
            xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
            return ((np.clip(xs, 0, grid_w), np.clip(ys, 0, grid_h)) if clip else (xs, ys))
        return self._transform_for(name).grid_to_source(x, y, grid_w, grid_h, clip=clip)

    def _transform_for(self, name: str) -> FrameTransform:
        transform = self.transform
        if transform is None:
            raise ValueError(f"the reply has no transform for tensor {name!r}: the daemon "
                             "predates it (protocol.md §5.1.2); map it yourself")
        return transform

    @property
    def spatial_error(self) -> str | None:
        """Why asked-for spatial results are missing (for logs; wording not stable)."""
        return self.message.get("spatial_error")

    @property
    def tracks(self) -> list[dict[str, Any]]:
        """Tracked detections (track_id, detection, anchor) when spatial results were asked."""
        return self.message.get("tracks", [])

    @property
    def planes(self) -> list[dict[str, Any]]:
        return self.message.get("planes", {}).get("planes", [])

    @property
    def annotated(self) -> np.ndarray | None:
        """The daemon's annotated frame (BGR), when `annotate` was asked for."""
        jpeg = self.message.get("annotated_jpeg")
        if not jpeg:
            return None
        import cv2

        return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)

    @property
    def stamps(self) -> dict[str, float]:
        return self.message.get("t", {})

    @property
    def round_trip_s(self) -> float | None:
        return None if self.sent_at is None else self.received_at - self.sent_at

    @property
    def error(self) -> str | None:
        if self.kind != "error":
            return None
        return f"{self.message.get('code')}: {self.message.get('message')}"


@dataclass
class ClientCounters:
    sent: int = 0
    not_sent: int = 0  # window full or no daemon connected
    results: int = 0
    errors: int = 0
    dropped: int = 0  # superseded or expired at the daemon
    lost: int = 0  # no reply within reply_timeout (daemon restarted or gone)

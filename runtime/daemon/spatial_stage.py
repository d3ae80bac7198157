"""The daemon's spatial stage: per-client tracking, 3D anchors and cached planes.

Runs after output decoding for frames that ask for it (`spatial` / `planes` header flags).
Each client stream has its own Tracker and PlaneCache (neither is thread-safe; only the
model's inference thread touches them). Without Open3D, anchors still come back (numpy),
oriented boxes and planes do not, and the reply says why.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from runtime.protocol import FrameHeader
from runtime.results import TaskResult
from runtime.spatial.anchors import AnchorParams, compute_anchors
from runtime.spatial.camera import DepthFrame, Intrinsics, Pose
from runtime.spatial.errors import SpatialError, SpatialUnavailable
from runtime.spatial.planes import PlaneCache
from runtime.spatial.tracking import Tracker

log = logging.getLogger(__name__)


def open3d_available() -> str | None:
    """None when Open3D imports; else the reason (shown to clients that ask for planes)."""
    from runtime.spatial.open3d_loader import load_open3d

    try:
        load_open3d()  # at start-up: keeps the ~1 s import off the first spatial frame
    except SpatialUnavailable as exc:
        return str(exc)
    return None


class SpatialStage:
    def __init__(self) -> None:
        self._trackers: dict[bytes, Tracker] = {}
        self._clock: dict[bytes, float] = {}  # client -> last timestamp given to its tracker
        self._planes: dict[bytes, PlaneCache] = {}
        self._open3d_problem = open3d_available()
        if self._open3d_problem:
            log.warning("spatial results without planes/oriented boxes: %s", self._open3d_problem)

    def forget(self, client: bytes) -> None:
        self._trackers.pop(client, None)
        self._planes.pop(client, None)
        self._clock.pop(client, None)

    def _timestamp(self, client: bytes, header: FrameHeader) -> float:
        # The tracker's motion model needs the frames' real spacing: the capture time, not
        # when the daemon got round to them (two frames processed 10 ms apart after a stall
        # would look like a huge velocity). Fall back to the daemon clock when the client
        # sends no increasing capture time.
        last = self._clock.get(client)
        if header.capture_ts and (last is None or header.capture_ts > last):
            now = header.capture_ts
        else:
            now = time.monotonic() if last is None else max(time.monotonic(), last + 1e-3)
        self._clock[client] = now
        return now

    def process(self, client: bytes, header: FrameHeader, result: TaskResult,
                depth: np.ndarray | None) -> dict[str, Any]:
        """Reply fields: tracks (and anchors), planes, spatial_error."""
        extra: dict[str, Any] = {}
        problems = []
        frame = None
        if depth is not None:
            if header.intrinsics is None:
                problems.append("a depth frame needs the colour camera's intrinsics")
            else:
                try:
                    frame = DepthFrame(
                        depth, Intrinsics.from_wire(header.intrinsics),
                        (header.width, header.height),
                        Pose.from_wire(header.pose) if header.pose is not None else None)
                except SpatialError as exc:
                    problems.append(str(exc))
        elif header.planes or header.spatial:
            problems.append("no depth frame: anchors and planes need one")
        if header.spatial:
            anchors = None
            if frame is not None:
                params = AnchorParams(oriented_boxes=self._open3d_problem is None)
                anchors = compute_anchors(frame, result.detections, params)
            tracker = self._trackers.get(client)
            if tracker is None:
                tracker = self._trackers[client] = Tracker()
            tracks = tracker.update(result.detections, self._timestamp(client, header), anchors)
            extra["tracks"] = [t.to_wire() for t in tracks]
        if header.planes and frame is not None:
            if self._open3d_problem:
                problems.append(f"planes unavailable: {self._open3d_problem}")
            else:
                cache = self._planes.get(client)
                if cache is None:
                    cache = self._planes[client] = PlaneCache()
                extra["planes"] = cache.update(frame, requested=True).to_wire()
        if problems:
            extra["spatial_error"] = "; ".join(problems)
        return extra

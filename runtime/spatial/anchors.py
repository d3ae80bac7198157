"""Detections lifted into 3D: one anchor per detection from a registered depth frame.

The depth is the median of the valid samples around the landmarks or in the box's central
part; with too few valid samples the anchor says so (`reason="no_depth"`) and never guesses.
numpy only, except the optional oriented box, which imports Open3D when first asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.results import Detection
from runtime.spatial.camera import DepthFrame
from runtime.spatial.open3d_loader import load_open3d

Vec3 = tuple[float, float, float]

# Anchor.reason values.
NO_DEPTH = "no_depth"  # fewer than `min_samples` valid depth samples where the object is
OUTSIDE_FRAME = "outside_frame"  # the box's centre is off the depth image


@dataclass(frozen=True, slots=True)
class AnchorParams:
    min_depth_m: float = 0.1  # samples outside [min, max] are sensor noise, not measurements
    max_depth_m: float = 20.0
    # The central part of the box that is sampled (this fraction of its width and height):
    # a box's edges are mostly background.
    box_fraction: float = 0.5
    # Half-size of the window around each landmark, as a fraction of the box width
    # (at least one depth pixel).
    landmark_window: float = 0.06
    min_samples: int = 10
    max_samples: int = 4096  # larger regions are sampled on a stride down to about this many
    oriented_boxes: bool = True  # needs Open3D
    # Points go into the oriented box when their depth is within this of the anchor's.
    obb_band_m: float = 0.25
    obb_min_points: int = 50
    obb_max_points: int = 1000


@dataclass(frozen=True, slots=True)
class OrientedBox:
    """An oriented 3D box: its axes are the columns of `rotation` (9 floats, row-major) and
    `extent` holds the full side lengths along them, in metres."""

    center: Vec3
    extent: Vec3
    rotation: tuple[float, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"center": list(self.center), "extent": list(self.extent),
                "rotation": list(self.rotation)}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> OrientedBox:
        return cls(tuple(wire["center"]), tuple(wire["extent"]), tuple(wire["rotation"]))


@dataclass(frozen=True, slots=True)
class Anchor:
    """Where a detection is in 3D.

    `camera_xyz` is the point at the robust depth on the ray through the box centre (or the
    landmarks' mean); `world_xyz` the same point through the frame's pose (None without a
    pose). `depth_m` is z-depth; all three are None when `reason` says why. `valid_points`
    counts the depth samples behind the median. `obb` (world coordinates when there is a
    pose, else camera) encloses the box's points near the anchor's depth. `source` says
    where the depth came from: "landmarks" or "box".
    """

    camera_xyz: Vec3 | None
    world_xyz: Vec3 | None
    depth_m: float | None
    valid_points: int
    obb: OrientedBox | None = None
    source: str | None = None
    reason: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "camera_xyz": None if self.camera_xyz is None else list(self.camera_xyz),
            "world_xyz": None if self.world_xyz is None else list(self.world_xyz),
            "depth_m": self.depth_m,
            "valid_points": self.valid_points,
            "obb": None if self.obb is None else self.obb.to_wire(),
            "source": self.source,
            "reason": self.reason,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Anchor:
        def vec(key: str) -> Vec3 | None:
            return None if wire.get(key) is None else tuple(wire[key])

        obb = wire.get("obb")
        return cls(vec("camera_xyz"), vec("world_xyz"), wire.get("depth_m"),
                   wire["valid_points"], None if obb is None else OrientedBox.from_wire(obb),
                   wire.get("source"), wire.get("reason"))


def compute_anchors(frame: DepthFrame, detections: Sequence[Detection],
                    params: AnchorParams = AnchorParams()) -> tuple[Anchor, ...]:
    """One anchor per detection, in the same order."""
    return tuple(compute_anchor(frame, detection, params) for detection in detections)


def compute_anchor(frame: DepthFrame, detection: Detection,
                   params: AnchorParams = AnchorParams()) -> Anchor:
    """The anchor of one detection; raises SpatialUnavailable only for the oriented box
    (`params.oriented_boxes`) when Open3D is missing."""
    x1, y1, x2, y2 = detection.box
    # Box corners in continuous depth-image coordinates.
    (dx1, dx2), (dy1, dy2) = frame.to_depth_pixels((x1, x2), (y1, y2))
    depth = None
    source = None
    if detection.landmarks:
        depth, samples = _landmark_depth(frame, detection.landmarks, dx2 - dx1, params)
        source = "landmarks"
    if depth is None:
        region = _box_region(frame, dx1, dy1, dx2, dy2, params.box_fraction)
        if region is None:
            return Anchor(None, None, None, 0, reason=OUTSIDE_FRAME)
        depth, samples = _region_depth(frame, region, params)
        source = "box"
    if depth is None:
        return Anchor(None, None, None, samples, reason=NO_DEPTH)

    # The ray through the colour pixel: registered depth shares the colour camera's rays.
    if source == "landmarks":
        u, v = np.mean(np.asarray(detection.landmarks, dtype=np.float64), axis=0)
    else:
        u, v = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    camera = frame.intrinsics.backproject(np.array([u]), np.array([v]), np.array([depth]))
    world = None if frame.pose is None else frame.pose.to_world(camera)
    obb = None
    if params.oriented_boxes:
        obb = _oriented_box(frame, dx1, dy1, dx2, dy2, depth, params)
    return Anchor(
        camera_xyz=tuple(camera[0].tolist()),
        world_xyz=None if world is None else tuple(world[0].tolist()),
        depth_m=float(depth),
        valid_points=samples,
        obb=obb,
        source=source,
    )


def _box_region(frame: DepthFrame, x1: float, y1: float, x2: float, y2: float,
                fraction: float) -> tuple[int, int, int, int] | None:
    """Row/column ranges (y0, y1, x0, x1) of the depth pixels whose centres lie in the
    central `fraction` of the box; the centre pixel when that is thinner than a pixel."""
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    hw, hh = (x2 - x1) * fraction / 2.0, (y2 - y1) * fraction / 2.0
    cols = _pixel_range(cx - hw, cx + hw, cx, frame.width)
    rows = _pixel_range(cy - hh, cy + hh, cy, frame.height)
    if cols is None or rows is None:
        return None
    return rows[0], rows[1], cols[0], cols[1]


def _pixel_range(low: float, high: float, centre: float, size: int) -> tuple[int, int] | None:
    start, stop = max(0, math.ceil(low)), min(size, math.floor(high) + 1)
    if start < stop:
        return start, stop
    nearest = round(centre)
    return (nearest, nearest + 1) if 0 <= nearest < size else None


def _region_depth(frame: DepthFrame, region: tuple[int, int, int, int],
                  params: AnchorParams) -> tuple[float | None, int]:
    y0, y1, x0, x1 = region
    stride = max(1, math.ceil(math.sqrt((y1 - y0) * (x1 - x0) / params.max_samples)))
    # Start the stride so the samples sit symmetrically in the region.
    y0 += (y1 - y0 - 1) % stride // 2
    x0 += (x1 - x0 - 1) % stride // 2
    z = frame.metres(frame.depth[y0:y1:stride, x0:x1:stride])
    valid = (z >= params.min_depth_m) & (z <= params.max_depth_m)  # NaN/inf drop out
    # Only samples whose mirror image through the centre is valid too: on a slanted surface
    # a hole on one side would otherwise pull the median towards the other side's depth
    # (up to a centimetre on a poster 3 m away). On a plane, 1/z is linear in the pixel
    # coordinates, so the median of a point-symmetric set is the depth at the centre.
    paired = valid & valid[::-1, ::-1]
    count = int(np.count_nonzero(paired))
    if count >= params.min_samples:
        return float(np.median(z[paired])), count
    return _median_depth(z[valid], params)


def _landmark_depth(frame: DepthFrame, landmarks: Sequence[tuple[float, float]],
                    box_width: float, params: AnchorParams) -> tuple[float | None, int]:
    points = np.asarray(landmarks, dtype=np.float64)
    us, vs = frame.to_depth_pixels(points[:, 0], points[:, 1])
    # A landmark off the image (a partly visible face) has no window, rather than one
    # clamped onto the border.
    inside = (us > -0.5) & (us < frame.width - 0.5) & (vs > -0.5) & (vs < frame.height - 0.5)
    if not inside.any():
        return None, 0
    us, vs = us[inside], vs[inside]
    radius = max(1, round(params.landmark_window * box_width))
    offsets = np.arange(-radius, radius + 1)
    # Every landmark's (2r+1)^2 window at once; windows cut by the image edge are clipped.
    cols = np.clip(np.rint(us)[:, None, None] + offsets[None, None, :], 0, frame.width - 1)
    rows = np.clip(np.rint(vs)[:, None, None] + offsets[None, :, None], 0, frame.height - 1)
    cols, rows = np.broadcast_arrays(cols, rows)
    values = frame.depth[rows.astype(np.intp).ravel(), cols.astype(np.intp).ravel()]
    return _median_depth(frame.metres(values), params)


def _median_depth(z: np.ndarray, params: AnchorParams) -> tuple[float | None, int]:
    valid = z[(z >= params.min_depth_m) & (z <= params.max_depth_m)]  # NaN/inf drop out
    if valid.size < params.min_samples:
        return None, int(valid.size)
    return float(np.median(valid)), int(valid.size)


def _oriented_box(frame: DepthFrame, x1: float, y1: float, x2: float, y2: float,
                  depth: float, params: AnchorParams) -> OrientedBox | None:
    region = _box_region(frame, x1, y1, x2, y2, 1.0)
    if region is None:
        return None
    r0, r1, c0, c1 = region
    stride = max(1, math.ceil(math.sqrt((r1 - r0) * (c1 - c0) / params.obb_max_points)))
    z = frame.metres(frame.depth[r0:r1:stride, c0:c1:stride])
    # The band keeps the object and drops the background seen past its silhouette.
    near = np.abs(z - np.float32(depth)) <= params.obb_band_m
    near &= (z >= params.min_depth_m) & (z <= params.max_depth_m)
    rows, cols = np.nonzero(near)
    if rows.size < params.obb_min_points:
        return None
    points = frame.depth_intrinsics.backproject(c0 + cols * stride, r0 + rows * stride, z[near])
    if frame.pose is not None:
        points = frame.pose.to_world(points)
    o3d = load_open3d()
    # robust=True joggles the points, so a flat patch (a poster, a screen) still gets a box
    # instead of Qhull's "initial simplex is flat" error.
    box = o3d.geometry.OrientedBoundingBox.create_from_points(
        o3d.utility.Vector3dVector(points), robust=True)
    return OrientedBox(tuple(np.asarray(box.center).tolist()),
                       tuple(np.asarray(box.extent).tolist()),
                       tuple(np.asarray(box.R).ravel().tolist()))

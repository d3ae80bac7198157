"""Planes (floor, walls, tables) from a depth frame, with ids that survive camera motion.

RANSAC runs in Open3D (imported when planes are first computed) on a strided point cloud;
`PlaneCache` keeps world-coordinate planes until the camera has moved far enough to be
worth a recompute, so the per-frame cost is a pose comparison. Not thread-safe: one cache
per client stream.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from runtime.spatial.camera import DepthFrame, Pose
from runtime.spatial.open3d_loader import load_open3d

Vec3 = tuple[float, float, float]
UNASSIGNED = -1  # plane_id of a plane fresh from `detect_planes`, before `PlaneIds`


@dataclass(frozen=True, slots=True)
class PlaneParams:
    # Every 6th pixel both ways: ~8500 points from 640x480. Open3D's RANSAC costs ~12 ns
    # a point an iteration, and the least-squares refit recovers what the stride loses.
    stride: int = 6
    voxel_m: float | None = None  # optional voxel_down_sample after the stride
    max_planes: int = 4
    # A plane needs this fraction of the cloud's points, and at least `min_inliers`.
    min_fraction: float = 0.04
    min_inliers: int = 100
    distance_m: float = 0.02  # RANSAC inlier distance (sensor noise is ~0.5% of depth)
    iterations: int = 100
    min_depth_m: float = 0.1
    max_depth_m: float = 8.0  # farther samples are too noisy to place a plane
    seed: int | None = None  # fixes Open3D's (process-wide) RANSAC seed; tests use it


@dataclass(frozen=True, slots=True)
class Plane:
    """n . x + offset = 0 with unit `normal` facing the camera that first measured it.

    `center` is the middle of the inliers' extent on the plane; `extent` their size (metres,
    1st-99th percentile) along `u_axis` and along normal x u_axis. `inliers` counts points of
    the strided cloud.
    """

    plane_id: int
    normal: Vec3
    offset: float
    center: Vec3
    u_axis: Vec3
    extent: tuple[float, float]
    inliers: int

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.plane_id, "normal": list(self.normal), "offset": self.offset,
                "center": list(self.center), "u_axis": list(self.u_axis),
                "extent": list(self.extent), "inliers": self.inliers}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Plane:
        return cls(wire["id"], tuple(wire["normal"]), wire["offset"], tuple(wire["center"]),
                   tuple(wire["u_axis"]), tuple(wire["extent"]), wire["inliers"])


@dataclass(frozen=True, slots=True)
class PlaneSet:
    """What `PlaneCache.update` returns: the planes, in world coordinates when the frame had
    a pose (`frame="world"`) else camera, and whether this call recomputed them (taking
    `compute_ms`) or reused the cache (0.0)."""

    planes: tuple[Plane, ...]
    frame: str
    recomputed: bool
    compute_ms: float

    def to_wire(self) -> dict[str, Any]:
        return {"frame": self.frame, "recomputed": self.recomputed,
                "planes": [plane.to_wire() for plane in self.planes]}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> PlaneSet:
        return cls(tuple(Plane.from_wire(p) for p in wire["planes"]), wire["frame"],
                   wire["recomputed"], 0.0)


def detect_planes(frame: DepthFrame, params: PlaneParams = PlaneParams()) -> tuple[Plane, ...]:
    """Up to `max_planes` planes, largest first, with `plane_id` UNASSIGNED."""
    o3d = load_open3d()
    points = frame.points(params.stride, params.min_depth_m, params.max_depth_m)
    eye = np.zeros(3)
    if frame.pose is not None:
        points = frame.pose.to_world(points)
        eye = frame.pose.translation
    if params.voxel_m:
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
        points = np.asarray(cloud.voxel_down_sample(params.voxel_m).points)
    if params.seed is not None:
        o3d.utility.random.seed(params.seed)
    planes = []
    remaining = points
    least = max(params.min_inliers, math.ceil(params.min_fraction * len(points)))
    while len(planes) < params.max_planes and len(remaining) >= least:
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(remaining))
        _, inliers = cloud.segment_plane(params.distance_m, 3, params.iterations)
        if len(inliers) < least:
            break
        plane, taken = _refine(remaining, remaining[inliers], eye, params.distance_m)
        if plane is None or plane.inliers < least:
            break
        planes.append(plane)
        remaining = remaining[~taken]
    planes.sort(key=lambda p: -p.inliers)
    return tuple(planes)


def _refine(points: np.ndarray, inliers: np.ndarray, eye: np.ndarray,
            distance: float) -> tuple[Plane | None, np.ndarray]:
    """Least-squares plane through RANSAC's inliers, refitted once on the points within
    `distance` of it (RANSAC's three-point plane tilts by a degree or more on noisy depth),
    and the mask of the points it takes out of the cloud."""
    normal, offset = _fit(inliers)
    keep = np.abs(points @ normal + offset) <= distance
    if keep.sum() < 3:
        return None, keep
    members = points[keep]
    normal, offset = _fit(members)
    if normal @ eye + offset < 0:  # face the camera, so the sign is the same every frame
        normal, offset = -normal, -offset
    # Far surfaces are noisier than `distance` (noise grows with depth): the plane takes its
    # noise tail with it, else the tail comes back as a parallel "plane" a few cm away.
    residuals = points @ normal + offset
    rms = float(np.sqrt(np.mean(residuals[keep] ** 2)))
    taken = np.abs(residuals) <= max(2.0 * distance, 3.0 * rms)
    centroid = members.mean(axis=0)
    spread = members - centroid
    # The in-plane direction of largest spread, its sign fixed so it does not flip per frame.
    u_axis = np.linalg.svd(spread - np.outer(spread @ normal, normal),
                           full_matrices=False)[2][0]
    u_axis *= np.sign(u_axis[np.argmax(np.abs(u_axis))])
    v_axis = np.cross(normal, u_axis)
    a_low, a_high = np.percentile(spread @ u_axis, (1, 99))
    b_low, b_high = np.percentile(spread @ v_axis, (1, 99))
    center = centroid + u_axis * (a_low + a_high) / 2 + v_axis * (b_low + b_high) / 2
    center -= normal * (normal @ center + offset)  # onto the plane exactly
    return Plane(UNASSIGNED, tuple(normal.tolist()), float(offset), tuple(center.tolist()),
                 tuple(u_axis.tolist()), (float(a_high - a_low), float(b_high - b_low)),
                 int(keep.sum())), taken


def _fit(points: np.ndarray) -> tuple[np.ndarray, float]:
    centroid = points.mean(axis=0)
    normal = np.linalg.svd(points - centroid, full_matrices=False)[2][2]
    return normal, float(-normal @ centroid)


@dataclass
class _Known:
    plane_id: int
    normal: np.ndarray
    offset: float
    center: np.ndarray
    size: float  # half the extent's diagonal
    seen: int  # the assign() call that last matched it


class PlaneIds:
    """Gives a plane the id of the remembered plane it continues, else a new one.

    Two planes are the same surface when their normals agree within `max_angle_deg`, each
    centre lies within `max_offset_m` of the other plane, and the centres are no farther
    apart than `max_gap_m` plus the larger half-diagonal (a wall's visible part slides as
    the camera pans). Unmatched planes are remembered (up to `memory`), so a table that
    drops out of one computation gets its id back in the next.
    """

    def __init__(self, max_angle_deg: float = 10.0, max_offset_m: float = 0.08,
                 max_gap_m: float = 0.5, memory: int = 32) -> None:
        self._cos = math.cos(math.radians(max_angle_deg))
        self._max_angle = math.radians(max_angle_deg)
        self._max_offset = max_offset_m
        self._max_gap = max_gap_m
        self._memory = memory
        self._known: list[_Known] = []
        self._next_id = 1
        self._calls = 0

    def assign(self, planes: tuple[Plane, ...]) -> tuple[Plane, ...]:
        self._calls += 1
        pairs = []
        for i, plane in enumerate(planes):
            normal, center = np.asarray(plane.normal), np.asarray(plane.center)
            size = math.hypot(*plane.extent) / 2
            for j, known in enumerate(self._known):
                cosine = float(normal @ known.normal)
                if cosine < self._cos:
                    continue
                offset = max(abs(float(known.normal @ center) + known.offset),
                             abs(float(normal @ known.center) + plane.offset))
                gap = float(np.linalg.norm(center - known.center))
                gate = self._max_gap + max(size, known.size)
                if offset > self._max_offset or gap > gate:
                    continue
                angle = math.acos(min(1.0, cosine))
                cost = angle / self._max_angle + offset / self._max_offset + gap / gate
                pairs.append((cost, i, j))
        pairs.sort()
        ids: dict[int, int] = {}
        taken: set[int] = set()
        for _, i, j in pairs:
            if i not in ids and j not in taken:
                ids[i] = self._known[j].plane_id
                taken.add(j)
                self._remember(j, planes[i])
        result = []
        for i, plane in enumerate(planes):
            if i not in ids:
                ids[i] = self._next_id
                self._next_id += 1
                self._known.append(_Known(ids[i], np.zeros(3), 0.0, np.zeros(3), 0.0, 0))
                self._remember(len(self._known) - 1, plane)
            result.append(replace(plane, plane_id=ids[i]))
        if len(self._known) > self._memory:
            self._known.sort(key=lambda k: -k.seen)
            del self._known[self._memory:]
        return tuple(result)

    def forget(self) -> None:
        """Drop the remembered planes (their coordinate frame changed); ids are not reused."""
        self._known.clear()

    def _remember(self, index: int, plane: Plane) -> None:
        known = self._known[index]
        known.normal = np.asarray(plane.normal)
        known.offset = plane.offset
        known.center = np.asarray(plane.center)
        known.size = math.hypot(*plane.extent) / 2
        known.seen = self._calls


class PlaneCache:
    """Planes for a stream of frames, recomputed only when asked and worth it.

    `update(frame, requested=True)` recomputes when there is no cache yet, when the frame
    has no pose (camera-coordinate planes go stale with any motion, which cannot be seen
    without a pose), or when the camera has moved more than `min_translation_m` or turned
    more than `min_rotation_deg` since the last computation; otherwise, and always when
    not requested, it returns the cached planes, which stay valid in world coordinates.
    """

    def __init__(self, params: PlaneParams = PlaneParams(), min_translation_m: float = 0.2,
                 min_rotation_deg: float = 15.0, ids: PlaneIds | None = None) -> None:
        self.params = params
        self.min_translation_m = min_translation_m
        self.min_rotation_deg = min_rotation_deg
        self._ids = ids or PlaneIds()
        self._planes: tuple[Plane, ...] = ()
        self._frame = "camera"
        self._pose: Pose | None = None
        self._computed = False

    def update(self, frame: DepthFrame, requested: bool = True) -> PlaneSet:
        if not requested or not self._stale(frame.pose):
            return PlaneSet(self._planes, self._frame, False, 0.0)
        start = time.perf_counter()
        coordinates = "camera" if frame.pose is None else "world"
        if coordinates != self._frame:
            self._ids.forget()  # world and camera coordinates do not compare
        self._planes = self._ids.assign(detect_planes(frame, self.params))
        elapsed_ms = (time.perf_counter() - start) * 1e3
        self._frame = coordinates
        self._pose = frame.pose
        self._computed = True
        return PlaneSet(self._planes, self._frame, True, elapsed_ms)

    def invalidate(self) -> None:
        """Recompute on the next request however little the camera moved (the scene changed)."""
        self._computed = False

    def _stale(self, pose: Pose | None) -> bool:
        if not self._computed or pose is None or self._pose is None:
            return True
        metres, degrees = self._pose.motion_to(pose)
        return metres > self.min_translation_m or degrees > self.min_rotation_deg

"""Synthetic but physically consistent depth scenes for the spatial tests and bench.

A room is ray-cast in numpy from a known pinhole camera at a known camera-to-world pose:
a floor (z = 0, world z up), a wall at x = 4 m, and flat rectangular objects (a face-sized
card, a poster). Sensor effects are added on top: depth-proportional Gaussian noise,
random zero patches, a dead band at the left edge (stereo sensors have one) and dropped
pixels at depth discontinuities (where real sensors give flying pixels or nothing).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from runtime.results import Detection
from runtime.spatial.camera import DepthFrame, Intrinsics, Pose

FLOOR = (np.array([0.0, 0.0, 1.0]), 0.0)  # n . x + d = 0, normal facing the room
WALL = (np.array([-1.0, 0.0, 0.0]), 4.0)  # x = 4

# A 640x480 depth camera with a typical ~63 degree horizontal field of view, and the colour
# camera it is registered to at twice the resolution (same optics, 2x2 colour pixels per
# depth pixel). The principal point is deliberately off-centre.
COLOR_SIZE = (1280, 960)
DEPTH_SIZE = (640, 480)
COLOR_K = Intrinsics(fx=1050.0, fy=1050.0, cx=652.3, cy=471.9)
# Derived from the sensor geometry, not from the code under test: depth pixel i covers
# colour pixels 2i and 2i+1, so its centre is at colour coordinate 2i + 0.5.
DEPTH_K = Intrinsics(fx=COLOR_K.fx / 2, fy=COLOR_K.fy / 2,
                     cx=(COLOR_K.cx - 0.5) / 2, cy=(COLOR_K.cy - 0.5) / 2)


@dataclass(frozen=True)
class Card:
    """A flat rectangle: centre, unit axes along its width and height, and its size."""

    center: np.ndarray
    right: np.ndarray
    up: np.ndarray
    width: float
    height: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.right, self.up)

    def corners(self) -> np.ndarray:
        half_w, half_h = self.right * self.width / 2, self.up * self.height / 2
        return np.array([self.center + sx * half_w + sy * half_h
                         for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))])

    def point(self, a: float, b: float) -> np.ndarray:
        """The point at fractions (a, b) in [-1, 1] of the half width and half height."""
        return self.center + a * self.right * self.width / 2 + b * self.up * self.height / 2


def facing_camera(center: tuple[float, float, float], width: float, height: float) -> Card:
    """An upright card facing -x (towards a camera near the origin looking along +x)."""
    return Card(np.array(center, dtype=float), np.array([0.0, -1.0, 0.0]),
                np.array([0.0, 0.0, 1.0]), width, height)


FACE = facing_camera((2.0, 0.25, 1.45), 0.16, 0.22)
POSTER = facing_camera((3.2, -0.8, 1.3), 0.30, 0.40)  # a second object, for holes
# Eyes, nose, mouth corners as fractions of the face card's half width / half height.
FACE_LANDMARKS = ((-0.4, 0.3), (0.4, 0.3), (0.0, 0.0), (-0.3, -0.4), (0.3, -0.4))


def look(position: tuple[float, float, float], yaw_deg: float, pitch_deg: float) -> Pose:
    """Camera-to-world pose of an OpenCV camera at `position` looking along +x turned by
    `yaw_deg` (left, about world z) and tilted down by `pitch_deg`."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    forward = np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw),
                        -math.sin(pitch)])
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return Pose.from_rotation_translation(np.column_stack([right, down, forward]), position)


HOME = look((0.0, 0.0, 1.6), 0.0, 20.0)
# Poses from which the face card and poster are fully in view.
POSES = (HOME, look((0.3, -0.4, 1.5), 10.0, 15.0), look((-0.2, 0.5, 1.7), -12.0, 24.0),
         look((0.8, 0.1, 1.6), 5.0, 18.0))

NOTHING = 0
FLOOR_ID, WALL_ID, FACE_ID, POSTER_ID = 1, 2, 3, 4


def raycast(pose: Pose, intrinsics: Intrinsics, us: np.ndarray,
            vs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact z-depth and surface id seen through pixels (us, vs): inf / NOTHING for a miss."""
    rays = np.stack([(us - intrinsics.cx) / intrinsics.fx, (vs - intrinsics.cy) / intrinsics.fy,
                     np.ones_like(us, dtype=float)], axis=-1)
    directions = rays @ pose.rotation.T  # scaled so the hit parameter is the z-depth
    origin = pose.translation
    depth = np.full(us.shape, np.inf)
    surface = np.full(us.shape, NOTHING, dtype=np.int8)

    def hit(normal: np.ndarray, offset: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -(normal @ origin + offset) / (directions @ normal)
        return np.where(t > 0, t, np.inf)

    for ident, (normal, offset) in ((FLOOR_ID, FLOOR), (WALL_ID, WALL)):
        t = hit(normal, offset)
        closer = t < depth
        depth[closer], surface[closer] = t[closer], ident
    for ident, card in ((FACE_ID, FACE), (POSTER_ID, POSTER)):
        t = hit(card.normal, -card.normal @ card.center)
        local = origin + directions * np.where(np.isfinite(t), t, 0)[..., None] - card.center
        inside = ((np.abs(local @ card.right) <= card.width / 2)
                  & (np.abs(local @ card.up) <= card.height / 2))
        closer = inside & (t < depth)
        depth[closer], surface[closer] = t[closer], ident
    return depth, surface


def render(pose: Pose, size: tuple[int, int] = DEPTH_SIZE,
           intrinsics: Intrinsics = DEPTH_K) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free z-depth (metres, inf where nothing) and surface ids of a whole image."""
    width, height = size
    vs, us = np.mgrid[0:height, 0:width].astype(float)
    return raycast(pose, intrinsics, us, vs)


def sensor(depth: np.ndarray, rng: np.random.Generator, noise: float = 0.003,
           holes: int = 12, dead_band: int = 8) -> np.ndarray:
    """A sensor's view of exact depth: float32 metres with 0 where nothing was measured."""
    measured = depth * (1.0 + rng.normal(0.0, noise, depth.shape))
    measured[~np.isfinite(depth)] = 0.0
    height, width = depth.shape
    for _ in range(holes):
        h, w = rng.integers(6, 30, size=2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        measured[y:y + h, x:x + w] = 0.0
    measured[:, :dead_band] = 0.0
    # Depth edges: a pixel whose neighbour is more than 5% nearer or farther is dropped.
    jump = np.zeros(depth.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        dx = np.abs(np.diff(depth, axis=1)) > 0.05 * depth[:, 1:]
        dy = np.abs(np.diff(depth, axis=0)) > 0.05 * depth[1:, :]
    jump[:, 1:] |= dx
    jump[:, :-1] |= dx
    jump[1:, :] |= dy
    jump[:-1, :] |= dy
    measured[jump] = 0.0
    return measured.astype(np.float32)


def millimetres(depth_m: np.ndarray) -> np.ndarray:
    return np.clip(np.round(depth_m * 1000.0), 0, 65535).astype(np.uint16)


def detection_of(card: Card, pose: Pose, intrinsics: Intrinsics = COLOR_K,
                 landmarks: bool = False, label: str = "face") -> Detection:
    """The tight colour-frame box (and optionally landmarks) a detector would report."""
    us, vs = intrinsics.project(pose.to_camera(card.corners()))
    points = ()
    if landmarks:
        lu, lv = intrinsics.project(pose.to_camera(np.array(
            [card.point(a, b) for a, b in FACE_LANDMARKS])))
        points = tuple(zip(lu.tolist(), lv.tolist(), strict=True))
    return Detection(box=(float(us.min()), float(vs.min()), float(us.max()), float(vs.max())),
                     score=0.9, label=label, landmarks=points)


def surface_point(pose: Pose, u: float, v: float,
                  intrinsics: Intrinsics = COLOR_K) -> tuple[np.ndarray, int]:
    """The exact world point (and surface id) seen through colour pixel (u, v)."""
    depth, surface = raycast(pose, intrinsics, np.array([u]), np.array([v]))
    camera = intrinsics.backproject(np.array([u]), np.array([v]), depth)
    return pose.to_world(camera)[0], int(surface[0])


@functools.cache
def exact_view(pose_index: int) -> tuple[np.ndarray, np.ndarray]:
    """`render` of POSES[pose_index], cached: the tests look at the same views many times.
    The arrays are read-only; copy before degrading them."""
    depth, surface = render(POSES[pose_index])
    depth.flags.writeable = surface.flags.writeable = False
    return depth, surface


def depth_frame(pose_index: int = 0, seed: int = 0, noise: float = 0.003, uint16: bool = True,
                with_pose: bool = True) -> DepthFrame:
    """A sensor frame of POSES[pose_index] as the daemon would receive it."""
    depth = sensor(exact_view(pose_index)[0], np.random.default_rng(seed), noise)
    return DepthFrame(millimetres(depth) if uint16 else depth, COLOR_K, COLOR_SIZE,
                      POSES[pose_index] if with_pose else None)

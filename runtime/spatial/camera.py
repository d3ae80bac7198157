"""Camera geometry for the spatial layer: intrinsics, camera-to-world poses, depth frames.

Conventions a client must follow (validated here, at the edge): OpenCV camera axes (x right,
y down, z forward), pixel centres at integer coordinates, depth as z-distance along the
optical axis (what RealSense, Azure Kinect and ARKit report, not the range along the ray),
and poses camera-to-world as 16 row-major floats. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.spatial.errors import SpatialError

# OpenGL / OpenXR / ARKit camera axes (x right, y up, z backward) to OpenCV's.
_OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
# float32 poses from a client are orthonormal to ~1e-7; anything worse is a bug upstream.
_ROTATION_TOLERANCE = 1e-3
# Registered depth keeps the colour frame's aspect; a larger difference means a crop.
_ASPECT_TOLERANCE = 0.02


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


@dataclass(frozen=True, slots=True)
class Intrinsics:
    """Pinhole intrinsics in pixels for one resolution (no distortion: rectified images)."""

    fx: float
    fy: float
    cx: float
    cy: float

    def __post_init__(self) -> None:
        if not _finite(self.fx, self.fy, self.cx, self.cy) or self.fx <= 0 or self.fy <= 0:
            raise SpatialError(
                f"intrinsics must be finite with fx, fy > 0 (got fx={self.fx}, fy={self.fy}, "
                f"cx={self.cx}, cy={self.cy}); send the colour camera's calibrated values"
            )

    def scaled(self, sx: float, sy: float) -> Intrinsics:
        """The same optics sampled with `sx` (`sy`) times as many pixels per row (column).

        Pixel edges scale, centres do not: pixel centre u maps to (u + 0.5) * s - 0.5.
        """
        return Intrinsics(self.fx * sx, self.fy * sy,
                          (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5)

    def backproject(self, us: np.ndarray, vs: np.ndarray, depths: np.ndarray) -> np.ndarray:
        """(N, 3) camera points for pixels (us, vs) at z-depths `depths` in metres."""
        depths = np.asarray(depths, dtype=np.float64)
        points = np.empty((depths.size, 3), dtype=np.float64)
        points[:, 0] = (np.ravel(us) - self.cx) / self.fx * depths.ravel()
        points[:, 1] = (np.ravel(vs) - self.cy) / self.fy * depths.ravel()
        points[:, 2] = depths.ravel()
        return points

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (us, vs) of (N, 3) camera points in front of the camera."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return (points[:, 0] / points[:, 2] * self.fx + self.cx,
                points[:, 1] / points[:, 2] * self.fy + self.cy)

    def to_wire(self) -> list[float]:
        return [self.fx, self.fy, self.cx, self.cy]

    @classmethod
    def from_wire(cls, wire: Sequence[float]) -> Intrinsics:
        if len(wire) != 4:
            raise SpatialError(f"intrinsics are 4 numbers [fx, fy, cx, cy], got {len(wire)}")
        return cls(*(float(v) for v in wire))


@dataclass(frozen=True, eq=False)
class Pose:
    """A rigid camera-to-world transform: world_point = R @ camera_point + t.

    `matrix` is a read-only 4x4 float64 whose rotation is re-orthonormalised on
    construction (clients send float32).
    """

    matrix: np.ndarray

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise SpatialError(f"a pose is a finite 4x4 matrix, got shape {matrix.shape}")
        if not np.allclose(matrix[3], (0.0, 0.0, 0.0, 1.0), atol=1e-6):
            raise SpatialError(
                f"a pose's last row must be [0, 0, 0, 1], got {matrix[3].tolist()}: send the "
                f"4x4 camera-to-world matrix row-major (transpose a column-major one)"
            )
        rotation = matrix[:3, :3]
        error = np.abs(rotation.T @ rotation - np.eye(3)).max()
        if error > _ROTATION_TOLERANCE or np.linalg.det(rotation) <= 0:
            raise SpatialError(
                f"a pose's rotation must be orthonormal with determinant +1 (off by {error:.2g}, "
                f"det {np.linalg.det(rotation):.3g}): scale or a mirrored axis is not a camera pose"
            )
        u, _, vt = np.linalg.svd(rotation)
        matrix[:3, :3] = u @ vt
        matrix.flags.writeable = False
        object.__setattr__(self, "matrix", matrix)

    @classmethod
    def identity(cls) -> Pose:
        return cls(np.eye(4))

    @classmethod
    def from_rotation_translation(cls, rotation: np.ndarray, translation: Sequence[float]) -> Pose:
        matrix = np.eye(4)
        matrix[:3, :3] = rotation
        matrix[:3, 3] = translation
        return cls(matrix)

    @classmethod
    def from_wire(cls, wire: Sequence[float], convention: str = "opencv") -> Pose:
        """16 row-major floats; `convention="opengl"` for OpenXR/ARKit camera axes (y up,
        z backward), which are turned into OpenCV's here."""
        if len(wire) != 16:
            raise SpatialError(f"a pose is 16 row-major floats (4x4), got {len(wire)}")
        matrix = np.asarray(wire, dtype=np.float64).reshape(4, 4)
        if convention == "opengl":
            matrix = matrix @ _OPENGL_TO_OPENCV
        elif convention != "opencv":
            raise SpatialError(f"pose convention must be 'opencv' or 'opengl', got {convention!r}")
        return cls(matrix)

    def to_wire(self) -> list[float]:
        return self.matrix.ravel().tolist()

    @property
    def rotation(self) -> np.ndarray:
        return self.matrix[:3, :3]

    @property
    def translation(self) -> np.ndarray:
        return self.matrix[:3, 3]

    def to_world(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) camera points -> world points."""
        return np.asarray(points, dtype=np.float64) @ self.rotation.T + self.translation

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) world points -> camera points."""
        return (np.asarray(points, dtype=np.float64) - self.translation) @ self.rotation

    def motion_to(self, other: Pose) -> tuple[float, float]:
        """(metres, degrees) the camera moved and turned between this pose and `other`."""
        metres = float(np.linalg.norm(other.translation - self.translation))
        relative = self.rotation.T @ other.rotation
        cosine = np.clip((np.trace(relative) - 1.0) / 2.0, -1.0, 1.0)
        return metres, math.degrees(math.acos(cosine))


@dataclass(frozen=True, eq=False)
class DepthFrame:
    """A depth image registered to the colour frame that the detections refer to.

    Registered means the depth image shares the colour camera's optical centre, orientation
    and field of view (librealsense `align` to colour, Azure Kinect `depth_image_to_color_
    camera`, ARKit's sceneDepth), so a colour pixel maps to a depth pixel by scaling alone,
    even when the resolutions differ. Unregistered depth (a separate IR camera) must be
    aligned before it gets here; a different aspect ratio is rejected as a likely crop.

    `depth` is HxW uint16 in units of `depth_unit_m` (millimetres by default) or float32
    metres; 0, NaN and inf mean no measurement. `intrinsics` are the colour camera's at
    `color_size` (width, height); `pose` is camera-to-world, or None when the client has none.
    """

    depth: np.ndarray
    intrinsics: Intrinsics
    color_size: tuple[int, int]
    pose: Pose | None = None
    depth_unit_m: float = 0.001

    def __post_init__(self) -> None:
        depth = self.depth
        if not isinstance(depth, np.ndarray) or depth.ndim != 2 or min(depth.shape) == 0:
            raise SpatialError("depth must be a non-empty 2D array (height x width)")
        if depth.dtype not in (np.uint16, np.float32):
            raise SpatialError(
                f"depth must be uint16 (millimetres) or float32 (metres), got {depth.dtype}"
            )
        color_w, color_h = self.color_size
        if color_w <= 0 or color_h <= 0:
            raise SpatialError(f"colour frame size must be positive, got {self.color_size}")
        if not (math.isfinite(self.depth_unit_m) and self.depth_unit_m > 0):
            raise SpatialError(f"depth unit must be a positive number of metres, "
                               f"got {self.depth_unit_m}")
        height, width = depth.shape
        sx, sy = width / color_w, height / color_h
        if abs(sx - sy) > _ASPECT_TOLERANCE * max(sx, sy):
            raise SpatialError(
                f"depth {width}x{height} and colour {color_w}x{color_h} differ in aspect ratio: "
                f"send depth registered (aligned) to the colour camera, uncropped"
            )
        object.__setattr__(self, "_scale", (sx, sy))
        object.__setattr__(self, "_depth_intrinsics", self.intrinsics.scaled(sx, sy))

    @property
    def width(self) -> int:
        return self.depth.shape[1]

    @property
    def height(self) -> int:
        return self.depth.shape[0]

    @property
    def depth_intrinsics(self) -> Intrinsics:
        """The colour intrinsics rescaled to the depth image's resolution."""
        return self._depth_intrinsics  # type: ignore[attr-defined]

    def to_depth_pixels(self, us: Any, vs: Any) -> tuple[Any, Any]:
        """Colour-frame pixel coordinates -> depth-image pixel coordinates (floats)."""
        sx, sy = self._scale  # type: ignore[attr-defined]
        return (np.asarray(us) + 0.5) * sx - 0.5, (np.asarray(vs) + 0.5) * sy - 0.5

    def metres(self, values: np.ndarray) -> np.ndarray:
        """Depth samples taken from `depth` (any shape) as float32 metres."""
        if values.dtype == np.uint16:
            return values.astype(np.float32) * np.float32(self.depth_unit_m)
        return values

    def points(self, stride: int, min_m: float, max_m: float) -> np.ndarray:
        """(N, 3) camera points of every `stride`-th valid pixel in both directions."""
        grid = self.depth[::stride, ::stride]
        z = self.metres(grid)
        valid = (z >= min_m) & (z <= max_m)  # NaN compares false; inf fails the maximum
        vs, us = np.nonzero(valid)
        return self.depth_intrinsics.backproject(us * stride, vs * stride, z[valid])

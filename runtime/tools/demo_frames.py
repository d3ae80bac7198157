"""The frame sequences `sightline demo` streams: the astronaut pan-and-zoom, a camera or
video file, and RGB-D recordings on disk. Pure data; nothing here talks to a daemon.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from runtime.errors import SightlineError
from runtime.models.assets import ASTRONAUT_PNG, fetch_asset
from runtime.spatial.camera import Intrinsics, Pose

FRAME_SIZE = (640, 480)


@dataclass(frozen=True, slots=True)
class View:
    """The part of the photo one frame shows: photo point (center_x, center_y) lands on the
    frame centre, magnified `scale` times (frame pixels per photo pixel)."""

    center_x: float
    center_y: float
    scale: float

    def matrix(self, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
        """The 2x3 photo-to-frame warp for cv2.warpAffine (pixel centres at integers)."""
        width, height = size
        return np.array([[self.scale, 0, width / 2 - self.center_x * self.scale],
                         [0, self.scale, height / 2 - self.center_y * self.scale]],
                        dtype=np.float64)


@dataclass(frozen=True, eq=False)
class DemoFrame:
    """A BGR frame and, for spatial runs, its registered depth (uint16 mm or float32 m), the
    colour camera's intrinsics and its camera-to-world pose (None: camera coordinates)."""

    color: np.ndarray
    depth: np.ndarray | None = None
    intrinsics: Intrinsics | None = None
    pose: Pose | None = None


def load_astronaut() -> np.ndarray:
    """scikit-image's astronaut photograph, 512x512 BGR (fetched once into the cache)."""
    photo = cv2.imread(str(fetch_asset(ASTRONAUT_PNG)))
    if photo is None:
        raise SightlineError("the cached astronaut image is unreadable; delete it and retry")
    return photo


def astronaut_views(count: int, size: tuple[int, int] = FRAME_SIZE,
                    photo_width: int = 512) -> list[View]:
    """A smooth pan and zoom: in, then out again, circling the face."""
    views = []
    for i in range(count):
        phase = i / max(1, count - 1)
        zoom = 1.0 + 0.6 * np.sin(np.pi * phase)
        view_w = photo_width / zoom  # the photo region this frame shows, 4:3
        views.append(View(center_x=256 + 40 * np.sin(2 * np.pi * phase),
                          center_y=200 + 25 * np.cos(2 * np.pi * phase),
                          scale=size[0] / view_w))
    return views


def astronaut_sequence(count: int, size: tuple[int, int] = FRAME_SIZE) -> Iterator[np.ndarray]:
    """A smooth pan-and-zoom over scikit-image's astronaut photograph (a real face)."""
    photo = load_astronaut()
    for view in astronaut_views(count, size, photo.shape[1]):
        yield cv2.warpAffine(photo, view.matrix(size), size, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)


def capture_frames(source: str, count: int) -> Iterator[np.ndarray]:
    """Frames from a camera index or a video file."""
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise SightlineError(f"cannot open {source!r} as a camera index or video file")
    try:
        for _ in range(count):
            ok, frame = capture.read()
            if not ok:
                return
            yield frame
    finally:
        capture.release()


def rgbd_recording(directory: Path, count: int) -> list[DemoFrame]:
    """The first `count` frames of an RGB-D recording: DIR/camera.json (fx, fy, cx, cy,
    optional depth_unit_m), DIR/color/NNNN.png, DIR/depth/NNNN.png (uint16, registered),
    optional DIR/poses.json (16 row-major floats per frame, camera-to-world). `sightline
    demo --help` spells the layout out for users."""
    try:
        camera = json.loads((directory / "camera.json").read_text())
        intrinsics = Intrinsics(*(float(camera[key]) for key in ("fx", "fy", "cx", "cy")))
        unit_m = float(camera.get("depth_unit_m", 0.001))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SightlineError(f"{directory}/camera.json must be a JSON object with numbers fx, "
                             f"fy, cx, cy ({exc})") from exc
    if not (math.isfinite(unit_m) and unit_m > 0):
        raise SightlineError(f"depth_unit_m in {directory}/camera.json must be positive")
    colors = sorted(p for p in (directory / "color").glob("*")
                    if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    if not colors:
        raise SightlineError(f"no colour frames in {directory}/color (expected NNNN.png)")
    poses: list | None = None
    if (directory / "poses.json").exists():
        try:
            poses = json.loads((directory / "poses.json").read_text())
        except ValueError as exc:
            raise SightlineError(f"{directory}/poses.json is not JSON: {exc}") from exc
        if not isinstance(poses, list) or len(poses) < len(colors):
            raise SightlineError(f"{directory}/poses.json must list one 16-float pose per "
                                 f"colour frame ({len(colors)} or more)")
    frames = []
    for index, color_path in enumerate(colors):
        color = cv2.imread(str(color_path), cv2.IMREAD_COLOR)
        depth_path = directory / "depth" / f"{color_path.stem}.png"
        depth = cv2.imread(str(depth_path), cv2.IMREAD_UNCHANGED)
        if color is None:
            raise SightlineError(f"cannot read {color_path}")
        if depth is None or depth.dtype != np.uint16 or depth.ndim != 2:
            raise SightlineError(f"{depth_path} must exist and be a 16-bit single-channel PNG")
        if unit_m != 0.001:  # the wire takes millimetres or metres
            depth = depth.astype(np.float32) * np.float32(unit_m)
        pose = None if poses is None else Pose.from_wire(poses[index])
        frames.append(DemoFrame(color, depth, intrinsics, pose))
    return frames

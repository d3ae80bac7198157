"""A physically consistent RGB-D version of the demo's astronaut sequence, for `demo --depth`.

The photograph is a flat poster 0.6 m wide on a wall at z = 1.5 m, standing on a wooden
desk; a pinhole camera that never rotates moves so that the poster projects exactly as
each of the demo's pan-and-zoom warps shows it. Each frame comes with the desk and
wall drawn in colour where the camera sees them, a z-depth image with sensor-like noise
and holes, the intrinsics and the camera-to-world pose, so the face has one fixed world
position and the spatial layer has two planes to find. Demo and tests only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from runtime.spatial.camera import Intrinsics, Pose
from runtime.tools.demo_frames import FRAME_SIZE, DemoFrame, View, astronaut_views, load_astronaut

# The centre of the astronaut's face in the 512x512 photo: the mean of the five landmarks
# CenterFace 1.5 finds in the unwarped photo.
FACE_PHOTO_PX = (223.6, 123.6)


@dataclass(frozen=True, slots=True)
class PosterScene:
    """The scene's geometry. World axes are the camera's (OpenCV: x right, y down, z into
    the wall), the origin on the wall at the poster's centre; the camera never turns."""

    focal_px: float = 600.0  # fx = fy; the principal point is the frame centre
    frame_size: tuple[int, int] = FRAME_SIZE
    photo_size: tuple[int, int] = (512, 512)
    poster_width_m: float = 0.6
    wall_z_m: float = 1.5
    # The desk top (y down, so below the poster's centre); the poster's lower part is hidden
    # behind it, and the desk runs from the wall out past the camera.
    desk_y_m: float = 0.03
    noise: float = 0.003  # Gaussian depth noise, as a fraction of the depth
    holes: int = 6  # zeroed patches per frame, 6-30 px a side
    dead_band_px: int = 8  # stereo sensors measure nothing along the left edge

    @property
    def metres_per_px(self) -> float:
        return self.poster_width_m / self.photo_size[0]

    @property
    def intrinsics(self) -> Intrinsics:
        width, height = self.frame_size
        # cx = width / 2: warpAffine maps the view centre to pixel coordinate width / 2.
        return Intrinsics(self.focal_px, self.focal_px, width / 2, height / 2)

    def poster_point(self, px: float, py: float) -> np.ndarray:
        """The world point of photo pixel (px, py) (pixel centres at integers)."""
        m = self.metres_per_px
        return np.array([(px + 0.5) * m - self.photo_size[0] * m / 2,
                         (py + 0.5) * m - self.photo_size[1] * m / 2, self.wall_z_m])

    def poster_distance(self, view: View) -> float:
        """The camera's distance to the wall: the poster shows `view.scale` frame pixels
        per photo pixel, i.e. focal * metres_per_px / distance."""
        return self.focal_px * self.metres_per_px / view.scale

    def pose(self, view: View) -> Pose:
        """Camera-to-world: the camera sits straight in front of the view's centre."""
        position = self.poster_point(view.center_x, view.center_y)
        position[2] -= self.poster_distance(view)
        return Pose.from_rotation_translation(np.eye(3), position)

    def desk_depth(self, view: View) -> np.ndarray:
        """Per image row, the z-depth at which that row's rays meet the desk top (inf for
        rows at or above the horizon)."""
        height = self.frame_size[1]
        camera_y = self.poster_point(view.center_x, view.center_y)[1]
        slope = (np.arange(height) - self.intrinsics.cy) / self.focal_px  # ray y per metre
        with np.errstate(divide="ignore"):
            depth = (self.desk_y_m - camera_y) / slope
        depth[slope <= 0] = np.inf
        return depth

    def exact_depth(self, view: View) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free z-depth (metres, float64) and the mask of pixels that see the desk."""
        width, height = self.frame_size
        wall = self.poster_distance(view)
        desk_rows = self.desk_depth(view)
        on_desk = np.broadcast_to((desk_rows < wall)[:, None], (height, width))
        depth = np.where(on_desk, desk_rows[:, None], wall)
        return depth, on_desk

    def render(self, photo: np.ndarray, view: View, rng: np.random.Generator) -> DemoFrame:
        """The colour frame, uint16 millimetre depth, intrinsics and pose of one view."""
        depth, on_desk = self.exact_depth(view)
        pose = self.pose(view)
        color = self._color(photo, view, pose, depth, on_desk)
        return DemoFrame(color, self._sensor(depth, rng), self.intrinsics, pose)

    def _color(self, photo: np.ndarray, view: View, pose: Pose, depth: np.ndarray,
               on_desk: np.ndarray) -> np.ndarray:
        size = self.frame_size
        matrix = view.matrix(size)
        # The same warp as the plain demo, but off the poster there is wall, not a mirror
        # image: warping the photo onto black and its coverage alike composites exactly.
        color = cv2.warpAffine(photo, matrix, size, flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        coverage = cv2.warpAffine(np.full(photo.shape[:2], 1.0, np.float32), matrix, size,
                                  flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                  borderValue=0)
        # The wall and the poster's anti-aliased edge (float weights sum to 1 only nearly).
        off_poster = coverage < 0.998
        wall = np.array([188, 196, 204], np.float32)  # warm off-white paint
        blended = color[off_poster] + (1.0 - coverage[off_poster])[:, None] * wall
        color[off_poster] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        rows = np.nonzero(on_desk[:, 0])[0]
        if rows.size:
            desk = self._desk_texture(pose, depth[rows])
            color[rows] = np.clip(desk + 0.5, 0, 255).astype(np.uint8)
        return color

    def _desk_texture(self, pose: Pose, depth: np.ndarray) -> np.ndarray:
        """Wooden boards along z, textured in world coordinates so they stay put as the
        camera moves."""
        k = self.intrinsics
        us = np.arange(self.frame_size[0])
        x = pose.translation[0] + depth * ((us - k.cx) / k.fx)[None, :]
        z = pose.translation[2] + depth
        board_w = 0.09
        board = np.floor(x / board_w)
        across = x / board_w - board
        tone = 0.85 + 0.15 * np.sin(board * 12.9898) ** 2  # a fixed tone per board
        grain = 1.0 + 0.08 * np.sin(2 * np.pi * (z * 30.0 + 0.7 * board)
                                    + 2.0 * np.sin(x * 55.0))
        seam = np.where((across < 0.04) | (across > 0.96), 0.45, 1.0)
        # Light falls off towards the wall, away from a lamp behind the camera.
        shade = np.clip(1.15 - 0.5 * (z - z.min()), 0.7, 1.15)[..., None]
        base = np.array([70, 115, 165], np.float32)  # BGR oak
        return base * (tone * grain * seam)[..., None] * shade

    def _sensor(self, depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        measured = depth * (1.0 + self.noise * rng.standard_normal(depth.shape, np.float32))
        height, width = depth.shape
        for _ in range(self.holes):
            h, w = rng.integers(6, 31, size=2)
            y, x = rng.integers(0, height - h), rng.integers(0, width - w)
            measured[y:y + h, x:x + w] = 0.0
        measured[:, :self.dead_band_px] = 0.0
        return np.clip(np.round(measured * 1000.0), 0, 65535).astype(np.uint16)


def face_world(scene: PosterScene = PosterScene()) -> np.ndarray:
    """The world position of the astronaut's face: the same in every frame."""
    return scene.poster_point(*FACE_PHOTO_PX)


def astronaut_rgbd(count: int, *, seed: int = 0,
                   scene: PosterScene = PosterScene()) -> Iterator[DemoFrame]:
    """The demo's pan-and-zoom as RGB-D frames with intrinsics and camera-to-world poses."""
    photo = load_astronaut()
    if photo.shape[1::-1] != scene.photo_size:
        photo = cv2.resize(photo, scene.photo_size, interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(seed)
    for view in astronaut_views(count, scene.frame_size, scene.photo_size[0]):
        yield scene.render(photo, view, rng)

"""A synthetic hand for the hand models: no hand photograph ships in any package.

Flat cartoon hands barely register with MediaPipe's palm detector (0.02-0.28); shading
the skin by its distance to the silhouette's edge (a rounded, lit look) makes it fire at
about 0.9 on this drawing. Returns the BGR image and the hand's silhouette mask.
"""

from __future__ import annotations

import cv2
import numpy as np

SKIN_BGR = np.array([120, 160, 215], np.float32)


def _capsule(mask: np.ndarray, p, q, radius: float) -> None:
    cv2.line(mask, p, q, 255, int(2 * radius))
    cv2.circle(mask, p, int(radius), 255, -1)
    cv2.circle(mask, q, int(radius), 255, -1)


def draw_hand(size: tuple[int, int] = (640, 480), center: tuple[float, float] = (320, 300),
              scale: float = 1.0, angle_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """An open right palm facing the camera, fingers up (turned by angle_deg clockwise)."""
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    a = np.deg2rad(angle_deg)

    def at(x: float, y: float) -> tuple[int, int]:
        x, y = x * scale, y * scale
        return (int(center[0] + x * np.cos(a) - y * np.sin(a)),
                int(center[1] + x * np.sin(a) + y * np.cos(a)))

    _capsule(mask, at(0, 70), at(0, 400), 48 * scale)  # the forearm, off the frame's edge
    palm = np.array([at(-55, 60), at(55, 60), at(62, -40), at(-62, -40)], np.int32)
    cv2.fillConvexPoly(mask, palm, 255)
    cv2.ellipse(mask, at(0, 60), (int(55 * scale), int(35 * scale)), angle_deg, 0, 360, 255, -1)
    cv2.ellipse(mask, at(0, -35), (int(62 * scale), int(22 * scale)), angle_deg, 0, 360, 255,
                -1)
    for base, length, radius, tilt in [(-45, 95, 13, -8), (-15, 115, 14, -2), (15, 110, 14, 2),
                                       (43, 90, 12, 8)]:
        t = np.deg2rad(tilt)
        _capsule(mask, at(base, -40), at(base + length * np.sin(t), -40 - length * np.cos(t)),
                 radius * scale)
    _capsule(mask, at(-58, 30), at(-100, -20), 16 * scale)
    _capsule(mask, at(-100, -20), at(-125, -60), 14 * scale)

    depth = np.clip(cv2.distanceTransform(mask, cv2.DIST_L2, 5) / (18 * scale), 0, 1) ** 0.5
    ys, xs = np.mgrid[0:height, 0:width]
    light = 0.85 + 0.15 * ((width - xs) / width + (height - ys) / height) / 2
    skin = SKIN_BGR * (0.55 + 0.45 * depth[..., None]) * light[..., None]
    noise = np.random.default_rng(0).normal(0, 3, (height, width, 3))
    background = np.full((height, width, 3), (90, 95, 100), np.float32) + noise
    image = np.where(mask[..., None] > 0, skin, background).astype(np.float32)
    image = cv2.GaussianBlur(image, (3, 3), 0)
    return np.clip(image, 0, 255).astype(np.uint8), mask

"""Draw what a reply carries on a frame with OpenCV: boxes, labels, landmarks, track ids,
anchor depths, scene planes, segmentation masks, class lists and landmark skeletons. Used
by the demo and by the daemon's `annotate` option.

`draw_reply` runs per frame in the daemon when a client asks for annotated frames, so it
allocates one copy of the frame and draws into it in place; nothing here logs or imports
anything heavy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from runtime.results import Detection

BOX_COLOR = (80, 220, 60)  # BGR
# left eye, right eye, nose, left mouth corner, right mouth corner
LANDMARK_COLORS = ((255, 80, 80), (80, 80, 255), (80, 255, 255), (255, 80, 255), (255, 255, 80))
# Track and plane colours by id: distinct hues, all light enough for black caption text.
PALETTE = ((80, 220, 60), (255, 190, 60), (60, 200, 255), (230, 120, 255), (90, 255, 220),
           (160, 160, 255), (255, 255, 110), (140, 230, 150))
PLANE_PALETTE = ((255, 160, 40), (40, 170, 255), (200, 90, 255), (40, 230, 230))
ERROR_COLOR = (60, 60, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX
# Plane corners nearer than this are clipped away before projecting: a floor passes under
# the camera, and a corner behind it would project to the wrong side of the image.
NEAR_M = 0.05
# Projected coordinates are clamped here: OpenCV's drawing takes int32 points.
_FAR_PX = 1e5


def draw_detections(image: np.ndarray, detections: Iterable[Detection],
                    note: str | None = None) -> np.ndarray:
    """Return an annotated copy of a BGR frame: boxes, labels with scores, landmarks."""
    canvas = _canvas(image)
    thickness = _thickness(canvas)
    for detection in detections:
        _draw_object(canvas, detection.box, f"{detection.label} {detection.score:.2f}",
                     detection.landmarks, BOX_COLOR, thickness)
    _draw_note(canvas, note)
    return canvas


def draw_reply(image: np.ndarray, message: Mapping[str, Any], *,
               intrinsics: Sequence[float] | None = None,
               pose: Sequence[float] | np.ndarray | None = None,
               note: str | None = None) -> np.ndarray:
    """Return a copy of a BGR (or gray) frame with everything a result reply carries drawn.

    Tracks when the reply has them (box, "face #3 0.62 m (0.93)" or "... no depth", the
    anchor as a cross where the camera intrinsics are known), else plain detections; scene
    planes as the outline of their extent with their id, which needs the intrinsics
    [fx, fy, cx, cy] and, for planes in world coordinates, the camera-to-world pose (16
    row-major floats). Both default to the reply's own "intrinsics"/"pose" fields (the
    daemon echoes the request's). A `spatial_error` is written across the top.
    """
    canvas = _canvas(image)
    thickness = _thickness(canvas)
    if intrinsics is None:
        intrinsics = message.get("intrinsics")
    if pose is None:
        pose = message.get("pose")
    if message.get("mask"):
        _draw_mask(canvas, message["mask"])
    skeleton = [tuple(pair) for pair in message.get("skeleton", ())]
    planes = message.get("planes")
    if planes:
        _draw_planes(canvas, planes, intrinsics, pose, thickness)
    tracks = message.get("tracks")
    if tracks is not None:
        for track in tracks:
            _draw_track(canvas, track, intrinsics, thickness)
    else:
        for wire in message.get("detections", ()):
            _draw_object(canvas, wire["box"], _caption(wire), wire.get("landmarks", ()),
                         BOX_COLOR, thickness)
            for child in wire.get("children", ()):
                _draw_skeleton(canvas, child.get("landmarks", ()), skeleton, thickness)
                _draw_object(canvas, child["box"], _caption(child), (), PALETTE[1], thickness)
    if message.get("classes"):
        _draw_classes(canvas, message["classes"])
    error = message.get("spatial_error")
    if error:
        text = error if len(error) <= 90 else error[:87] + "..."
        cv2.putText(canvas, text, (8, 18), FONT, 0.45, ERROR_COLOR, 1, cv2.LINE_AA)
    _draw_note(canvas, note)
    return canvas


def _caption(wire: Mapping[str, Any]) -> str:
    """"face 0.92", with a cascade classifier's best class: "face 0.92 happy 0.99"."""
    caption = f"{wire['label']} {wire['score']:.2f}"
    if wire.get("classes"):
        best = wire["classes"][0]
        caption += f" {best['label']} {best['score']:.2f}"
    return caption


def _draw_mask(canvas: np.ndarray, wire: Mapping[str, Any]) -> None:
    """Tint the mask's foreground (probability > 0.5, or any non-zero class) in place."""
    from runtime.results import Mask

    mask = Mask.from_wire(wire).values
    if mask.shape != canvas.shape[:2]:
        return
    chosen = mask > 127 if wire.get("kind", "probability") == "probability" else mask > 0
    tint = np.array(PALETTE[2], np.float32)
    canvas[chosen] = (0.55 * canvas[chosen] + 0.45 * tint).astype(np.uint8)


def _draw_skeleton(canvas: np.ndarray, points: Sequence[Sequence[float]],
                   skeleton: Sequence[tuple[int, int]], thickness: int) -> None:
    for a, b in skeleton:
        if a < len(points) and b < len(points):
            cv2.line(canvas, (round(points[a][0]), round(points[a][1])),
                     (round(points[b][0]), round(points[b][1])), PALETTE[3], thickness,
                     cv2.LINE_AA)
    for x, y in points:
        cv2.circle(canvas, (round(x), round(y)), thickness + 1, PALETTE[0], -1, cv2.LINE_AA)


def _draw_classes(canvas: np.ndarray, classes: Sequence[Mapping[str, Any]]) -> None:
    for row, entry in enumerate(classes[:5]):
        cv2.putText(canvas, f"{entry['label']} {entry['score']:.2f}", (8, 40 + 22 * row), FONT,
                    0.6, (255, 255, 255), 2, cv2.LINE_AA)


def track_caption(track: Mapping[str, Any]) -> str:
    """What a track's label says: "face #3 0.62 m (0.93)", or "face #3 no depth (0.93)"."""
    detection = track["detection"]
    anchor = track.get("anchor")
    depth = None if anchor is None else anchor.get("depth_m")
    where = "no depth" if depth is None else f"{depth:.2f} m"
    return f"{detection['label']} #{track['track_id']} {where} ({detection['score']:.2f})"


def _canvas(image: np.ndarray) -> np.ndarray:
    # The one allocation per call; copy() is C-contiguous even for a reversed-channel view.
    return image.copy() if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)


def _thickness(canvas: np.ndarray) -> int:
    return max(1, round(min(canvas.shape[:2]) / 240))


def _draw_note(canvas: np.ndarray, note: str | None) -> None:
    if note:
        cv2.putText(canvas, note, (8, canvas.shape[0] - 10), FONT, 0.5, (255, 255, 255), 1,
                    cv2.LINE_AA)


def _draw_object(canvas: np.ndarray, box: Sequence[float], caption: str,
                 landmarks: Iterable[Sequence[float]], color: tuple[int, int, int],
                 thickness: int) -> None:
    """A box with a filled caption tab above it, and its landmarks as dots."""
    x1, y1, x2, y2 = (round(v) for v in box)
    cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
    (tw, th), baseline = cv2.getTextSize(caption, FONT, 0.5, 1)
    top = max(0, y1 - th - baseline - 2)
    cv2.rectangle(canvas, (x1, top), (x1 + tw + 4, top + th + baseline + 2), color, -1)
    cv2.putText(canvas, caption, (x1 + 2, top + th + 1), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for index, (x, y) in enumerate(landmarks):
        cv2.circle(canvas, (round(x), round(y)), thickness + 2,
                   LANDMARK_COLORS[index % len(LANDMARK_COLORS)], -1, cv2.LINE_AA)


def _draw_track(canvas: np.ndarray, track: Mapping[str, Any],
                intrinsics: Sequence[float] | None, thickness: int) -> None:
    detection = track["detection"]
    anchor = track.get("anchor")
    color = PALETTE[track["track_id"] % len(PALETTE)]
    _draw_object(canvas, detection["box"], track_caption(track), detection.get("landmarks", ()),
                 color, thickness)
    camera = None if anchor is None else anchor.get("camera_xyz")
    if camera is not None and intrinsics is not None and camera[2] > 0:
        fx, fy, cx, cy = intrinsics
        u, v = camera[0] / camera[2] * fx + cx, camera[1] / camera[2] * fy + cy
        if abs(u) < _FAR_PX and abs(v) < _FAR_PX:
            cv2.drawMarker(canvas, (round(u), round(v)), color, cv2.MARKER_CROSS,
                           6 * thickness + 6, thickness, cv2.LINE_AA)


# Corner order around a plane's rectangle (in units of its half extents), then its centre.
_CORNERS_U = np.array([-1.0, 1.0, 1.0, -1.0, 0.0])[None, :, None]
_CORNERS_V = np.array([-1.0, -1.0, 1.0, 1.0, 0.0])[None, :, None]


def _draw_planes(canvas: np.ndarray, planes: Mapping[str, Any],
                 intrinsics: Sequence[float] | None,
                 pose: Sequence[float] | np.ndarray | None, thickness: int) -> None:
    wires = planes.get("planes", ())
    world = planes.get("frame") == "world"
    if not wires or intrinsics is None or (world and pose is None):
        return  # nowhere to project them: the reply's plane list still says what was found
    fx, fy, cx, cy = intrinsics
    # All planes at once: per-plane numpy calls would cost more than the drawing.
    geometry = np.array([(*w["center"], *w["normal"], *w["u_axis"], *w["extent"])
                         for w in wires], dtype=np.float64)
    center, normal, u_axis = geometry[:, 0:3], geometry[:, 3:6], geometry[:, 6:9]
    v_axis = np.empty_like(u_axis)  # normal x u_axis
    v_axis[:, 0] = normal[:, 1] * u_axis[:, 2] - normal[:, 2] * u_axis[:, 1]
    v_axis[:, 1] = normal[:, 2] * u_axis[:, 0] - normal[:, 0] * u_axis[:, 2]
    v_axis[:, 2] = normal[:, 0] * u_axis[:, 1] - normal[:, 1] * u_axis[:, 0]
    points = (center[:, None, :] + _CORNERS_U * (u_axis * geometry[:, 9:10] / 2)[:, None, :]
              + _CORNERS_V * (v_axis * geometry[:, 10:11] / 2)[:, None, :])
    if world:
        matrix = np.asarray(pose, dtype=np.float64).reshape(4, 4)
        points = (points - matrix[:3, 3]) @ matrix[:3, :3]  # world -> camera
    in_front = points[..., 2] >= NEAR_M
    with np.errstate(divide="ignore", invalid="ignore"):
        pixels = _to_pixels(points, fx, fy, cx, cy)
    height, width = canvas.shape[:2]
    for index, wire in enumerate(wires):
        if in_front[index, :4].all():
            outline = pixels[index, :4]
        else:
            clipped = _clip_near(points[index, :4])
            if len(clipped) < 3:
                continue
            outline = _to_pixels(clipped, fx, fy, cx, cy)
        color = PLANE_PALETTE[wire["id"] % len(PLANE_PALETTE)]
        cv2.polylines(canvas, [outline], True, color, thickness, cv2.LINE_AA)
        # At the projected centre when it is in view, else the outline's middle; on-screen.
        u, v = pixels[index, 4] if in_front[index, 4] else outline.mean(axis=0)
        label_at = (int(min(max(u, 4), max(4, width - 70))),
                    int(min(max(v, 16), max(16, height - 8))))
        cv2.putText(canvas, f"plane {wire['id']}", label_at, FONT, 0.5, color, 1, cv2.LINE_AA)


def _to_pixels(points: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """int32 pixel coordinates of camera points (..., 3), clamped for OpenCV's drawing."""
    uv = points[..., :2] / points[..., 2:3]
    uv *= (fx, fy)
    uv += (cx, cy)
    np.clip(uv, -_FAR_PX, _FAR_PX, out=uv)
    return np.rint(uv, out=uv).astype(np.int32)


def _clip_near(polygon: np.ndarray) -> np.ndarray:
    """The part of a camera-space polygon in front of z = NEAR_M (Sutherland-Hodgman)."""
    inside = polygon[:, 2] >= NEAR_M
    if inside.all():
        return polygon
    kept = []
    for i in range(len(polygon)):
        a, b = polygon[i], polygon[(i + 1) % len(polygon)]
        a_in, b_in = inside[i], inside[(i + 1) % len(polygon)]
        if a_in:
            kept.append(a)
        if a_in != b_in:
            t = (NEAR_M - a[2]) / (b[2] - a[2])
            kept.append(a + t * (b - a))
    return np.array(kept).reshape(-1, 3)

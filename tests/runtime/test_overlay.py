"""Overlays: what a reply carries ends up drawn where it belongs, on a copy of the frame."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from runtime.overlay import (
    BOX_COLOR,
    FONT,
    LANDMARK_COLORS,
    PALETTE,
    PLANE_PALETTE,
    draw_detections,
    draw_reply,
    track_caption,
)
from runtime.results import Detection

K = [500.0, 500.0, 320.0, 240.0]  # fx, fy, cx, cy of a 640x480 frame
BOX = (100.0, 150.0, 220.0, 300.0)
LANDMARKS = ((130.0, 200.0), (190.0, 200.0), (160.0, 230.0), (135.0, 260.0), (185.0, 260.0))


def gray_frame() -> np.ndarray:
    return np.full((480, 640, 3), 90, np.uint8)


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.any(before != after, axis=2)


def detection_wire(box=BOX, landmarks=LANDMARKS) -> dict:
    return Detection(box=box, score=0.93, label="face", landmarks=landmarks).to_wire()


def track_wire(track_id: int, depth_m: float | None, box=BOX) -> dict:
    anchor = None
    if depth_m is not None:
        u, v = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        camera = [(u - K[2]) / K[0] * depth_m, (v - K[3]) / K[1] * depth_m, depth_m]
        anchor = {"camera_xyz": camera, "world_xyz": None, "depth_m": depth_m,
                  "valid_points": 400, "obb": None, "source": "box", "reason": None}
    return {"track_id": track_id, "detection": detection_wire(box), "anchor": anchor, "hits": 4}


def fronto_plane(plane_id: int, center=(0.0, 0.0, 2.0)) -> dict:
    """A 1.0 x 0.5 m plane facing the camera: at 2 m its outline spans u 195..445,
    v 177.5..302.5 through K."""
    return {"id": plane_id, "normal": [0.0, 0.0, -1.0], "offset": 2.0, "center": list(center),
            "u_axis": [1.0, 0.0, 0.0], "extent": [1.0, 0.5], "inliers": 900}


def translation_pose(x: float, y: float, z: float) -> list[float]:
    return [1.0, 0, 0, x, 0, 1.0, 0, y, 0, 0, 1.0, z, 0, 0, 0, 1.0]


def test_draw_detections_draws_box_and_landmarks_on_a_copy():
    frame = gray_frame()
    out = draw_detections(frame, [Detection(BOX, 0.9, "face", landmarks=LANDMARKS)], "frame 3")
    assert np.all(frame == 90), "the caller's frame is not drawn on"
    assert tuple(out[225, 100]) == BOX_COLOR  # left edge of the box
    assert tuple(out[150, 160]) == BOX_COLOR  # top edge
    for (x, y), color in zip(LANDMARKS, LANDMARK_COLORS, strict=True):
        assert tuple(out[int(y), int(x)]) == color
    assert changed(frame, out)[460:, :80].any()  # the note, bottom left
    assert not changed(frame, out)[20:120, 300:600].any()  # nothing far from the drawings


def test_draw_reply_with_detections_only_draws_them_like_draw_detections():
    frame = gray_frame()
    wire = detection_wire()
    expected = draw_detections(frame, [Detection.from_wire(wire)])
    assert np.array_equal(draw_reply(frame, {"detections": [wire]}), expected)


def test_tracks_replace_detections_and_carry_id_colour_and_depth_caption():
    frame = gray_frame()
    elsewhere = (400.0, 100.0, 500.0, 220.0)
    message = {"detections": [detection_wire(elsewhere)], "tracks": [track_wire(3, 0.62)]}
    out = draw_reply(frame, message)
    color = PALETTE[3 % len(PALETTE)]
    assert tuple(out[225, 100]) == color  # the track's box, in its id's colour
    assert not changed(frame, out)[110:210, 410:490].any(), "detections are not drawn twice"
    # The caption tab above the box is exactly as wide as the caption it should hold.
    caption = track_caption(message["tracks"][0])
    assert caption == "face #3 0.62 m (0.93)"
    (width, _), _ = cv2.getTextSize(caption, FONT, 0.5, 1)
    tab_row = out[140, 95:400]
    tab = np.nonzero(np.all(tab_row == color, axis=1))[0]
    assert tab.min() == 5 and tab.max() == 5 + width + 4


def test_a_track_without_depth_says_so():
    assert track_caption(track_wire(7, None)) == "face #7 no depth (0.93)"
    anchor = {"camera_xyz": None, "world_xyz": None, "depth_m": None, "valid_points": 3,
              "obb": None, "source": None, "reason": "no_depth"}
    assert track_caption({**track_wire(7, None), "anchor": anchor}) == "face #7 no depth (0.93)"


def test_anchor_cross_is_drawn_where_its_camera_point_projects():
    frame = gray_frame()
    landmarks = ()  # keep the box centre free of landmark dots
    track = track_wire(2, 1.5)
    track["detection"] = detection_wire(landmarks=landmarks)
    with_k = draw_reply(frame, {"tracks": [track], "intrinsics": K})
    without_k = draw_reply(frame, {"tracks": [track]})
    centre = (225, 160)  # (row, col) of the box centre, where the anchor projects
    assert tuple(with_k[centre]) == PALETTE[2]
    assert tuple(without_k[centre]) == (90, 90, 90)


def test_plane_outline_is_drawn_where_its_extent_projects():
    frame = gray_frame()
    out = draw_reply(frame, {"planes": {"frame": "camera", "recomputed": True,
                                        "planes": [fronto_plane(1)]}, "intrinsics": K})
    color = PLANE_PALETTE[1]
    mask = changed(frame, out)
    for row, col in ((240, 195), (240, 445), (178, 320), (302, 320)):  # on each side
        assert tuple(out[row, col]) == color, (row, col)
    assert mask[230:252, 320:380].any()  # "plane 1" at the projected centre
    assert not mask[:170].any() and not mask[310:].any()
    assert not mask[:, :190].any() and not mask[:, 450:].any()


def test_world_planes_are_projected_through_the_pose():
    frame = gray_frame()
    camera = draw_reply(frame, {"planes": {"frame": "camera", "recomputed": True,
                                           "planes": [fronto_plane(2)]}}, intrinsics=K)
    # The camera 1 m to the right of the origin, the plane 1 m to the right too.
    world = {"frame": "world", "recomputed": False, "planes": [fronto_plane(2, (1.0, 0, 2.0))]}
    moved = draw_reply(frame, {"planes": world, "intrinsics": K,
                               "pose": translation_pose(1.0, 0.0, 0.0)})
    assert np.array_equal(moved, camera)
    # Keyword arguments override what the reply echoes.
    assert np.array_equal(draw_reply(frame, {"planes": world, "intrinsics": [1, 1, 0, 0],
                                             "pose": translation_pose(0, 0, 0)},
                                     intrinsics=K, pose=translation_pose(1.0, 0.0, 0.0)), camera)


@pytest.mark.parametrize("message", [
    {"planes": {"frame": "world", "recomputed": True, "planes": [fronto_plane(1)]},
     "intrinsics": K},  # world planes but no pose
    {"planes": {"frame": "camera", "recomputed": True, "planes": [fronto_plane(1)]}},  # no K
])
def test_planes_that_cannot_be_projected_are_left_out(message):
    frame = gray_frame()
    assert np.array_equal(draw_reply(frame, message), frame)


def test_a_floor_passing_under_the_camera_is_clipped_not_wrapped_around():
    frame = gray_frame()
    # y is down: a floor 1 m below the camera, 8 m square, centred on it (half behind it).
    floor = {"id": 1, "normal": [0.0, -1.0, 0.0], "offset": 1.0, "center": [0.0, 1.0, 0.0],
             "u_axis": [1.0, 0.0, 0.0], "extent": [8.0, 8.0], "inliers": 5000}
    out = draw_reply(frame, {"planes": {"frame": "camera", "recomputed": True,
                                        "planes": [floor]}, "intrinsics": K})
    mask = changed(frame, out)
    # Its far edge (z = 4 m) projects to v = 240 + 500 * 1 / 4 = 365; nothing above it.
    assert mask[360:370].any()
    assert not mask[:355].any()


def test_spatial_error_is_written_across_the_top():
    frame = gray_frame()
    out = draw_reply(frame, {"spatial_error": "planes unavailable: Open3D " + "x" * 200})
    mask = changed(frame, out)
    assert mask[:24].any() and not mask[30:].any()


def test_gray_and_channel_reversed_frames_are_drawn_on_a_bgr_copy():
    gray = np.full((480, 640), 90, np.uint8)
    out = draw_reply(gray, {"tracks": [track_wire(1, 0.5)]})
    assert out.shape == (480, 640, 3) and np.all(gray == 90)
    rgb = np.zeros((480, 640, 3), np.uint8)
    rgb[..., 0] = 255
    bgr_view = rgb[:, :, ::-1]  # how the daemon hands over an rgb8 frame
    out = draw_reply(bgr_view, {"tracks": [track_wire(1, 0.5)]})
    assert out.flags.c_contiguous and tuple(out[10, 10]) == (0, 0, 255)
    assert tuple(out[225, 100]) == PALETTE[1]

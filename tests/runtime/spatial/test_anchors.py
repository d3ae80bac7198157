"""Anchors: where a detection is in 3D, from noisy registered depth with holes, or why not.

Truth is the exact surface point the detection's centre ray meets (ray-cast in the scene),
so the half-pixel conventions between colour and depth resolutions are tested too.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from runtime.results import Detection
from runtime.spatial.anchors import (
    NO_DEPTH,
    OUTSIDE_FRAME,
    Anchor,
    AnchorParams,
    compute_anchor,
    compute_anchors,
)
from runtime.spatial.camera import DepthFrame, Intrinsics
from tests.runtime.spatial import scenes

CM = 0.01


def truth(detection: Detection, pose_index: int) -> np.ndarray:
    """The world point on the object under the box centre (or the landmarks' mean)."""
    if detection.landmarks:
        u, v = np.mean(detection.landmarks, axis=0)
    else:
        x1, y1, x2, y2 = detection.box
        u, v = (x1 + x2) / 2, (y1 + y2) / 2
    point, _ = scenes.surface_point(scenes.POSES[pose_index], u, v)
    return point


@pytest.mark.parametrize("uint16", [True, False], ids=["uint16-mm", "float32-m"])
@pytest.mark.parametrize("pose_index", range(len(scenes.POSES)))
def test_anchor_is_on_the_object_under_the_box_centre_within_1cm(pose_index, uint16):
    frame = scenes.depth_frame(pose_index, seed=pose_index, uint16=uint16)
    pose = scenes.POSES[pose_index]
    for card in (scenes.FACE, scenes.POSTER):
        detection = scenes.detection_of(card, pose)
        anchor = compute_anchor(frame, detection, AnchorParams(oriented_boxes=False))
        assert anchor.reason is None and anchor.source == "box"
        assert np.linalg.norm(np.subtract(anchor.world_xyz, truth(detection, pose_index))) < CM
        camera_truth = pose.to_camera(truth(detection, pose_index)[None])[0]
        assert np.linalg.norm(np.subtract(anchor.camera_xyz, camera_truth)) < CM
        assert anchor.depth_m == pytest.approx(anchor.camera_xyz[2])
        assert anchor.valid_points >= AnchorParams().min_samples


@pytest.mark.parametrize("pose_index", range(len(scenes.POSES)))
def test_face_landmarks_give_the_anchor_within_1cm(pose_index):
    frame = scenes.depth_frame(pose_index, seed=10 + pose_index)
    detection = scenes.detection_of(scenes.FACE, scenes.POSES[pose_index], landmarks=True)
    anchor = compute_anchor(frame, detection, AnchorParams(oriented_boxes=False))
    assert anchor.source == "landmarks"
    assert np.linalg.norm(np.subtract(anchor.world_xyz, truth(detection, pose_index))) < CM


def test_world_anchor_stays_put_as_the_camera_moves():
    anchors = []
    for index, pose in enumerate(scenes.POSES):
        frame = scenes.depth_frame(index, seed=20 + index, noise=0.005)
        anchors.append(compute_anchor(frame, scenes.detection_of(scenes.FACE, pose),
                                      AnchorParams(oriented_boxes=False)).world_xyz)
    anchors = np.array(anchors)
    assert np.linalg.norm(anchors - anchors.mean(axis=0), axis=1).max() < CM / 2
    # ... and it is the face card's centre, give or take the perspective of a tight box.
    assert np.linalg.norm(anchors - scenes.FACE.center, axis=1).max() < CM


def test_box_over_a_hole_reports_no_depth_instead_of_guessing():
    frame = scenes.depth_frame(0)
    depth = frame.depth.copy()
    # A black poster returns no infrared: the sensor reports nothing where it is.
    depth[scenes.exact_view(0)[1] == scenes.POSTER_ID] = 0
    # And a hole punched in the wall where a second detection sits.
    wall_box = (200.0, 150.0, 330.0, 280.0)
    (x1, x2), (y1, y2) = frame.to_depth_pixels((200.0, 330.0), (150.0, 280.0))
    depth[int(y1):int(y2) + 2, int(x1):int(x2) + 2] = 0
    holed = DepthFrame(depth, frame.intrinsics, frame.color_size, frame.pose)

    poster = scenes.detection_of(scenes.POSTER, scenes.HOME)
    on_wall = Detection(box=wall_box, score=0.8, label="object")
    for anchor in compute_anchors(holed, [poster, on_wall]):
        assert anchor.reason == NO_DEPTH
        assert anchor.depth_m is None and anchor.camera_xyz is None and anchor.world_xyz is None
        assert anchor.obb is None
        assert anchor.valid_points < AnchorParams().min_samples
    # The same boxes with depth present are fine: the holes were the reason.
    assert all(a.reason is None for a in compute_anchors(frame, [poster, on_wall]))


def flat_frame(depth: np.ndarray) -> DepthFrame:
    height, width = depth.shape
    return DepthFrame(depth, Intrinsics(100.0, 100.0, (width - 1) / 2, (height - 1) / 2),
                      (width, height))


def test_zero_nan_inf_and_out_of_range_samples_are_ignored():
    depth = np.full((60, 80), 2.0, dtype=np.float32)
    garbage = np.array([0.0, np.nan, np.inf, -1.0, 0.05, 25.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    mask = rng.random(depth.shape) < 0.7  # most of the box is garbage, all of it far off 2 m
    depth[mask] = rng.choice(garbage, size=int(mask.sum()))
    anchor = compute_anchor(flat_frame(depth), Detection((20.0, 15.0, 60.0, 45.0), 0.9, "x"),
                            AnchorParams(oriented_boxes=False))
    assert anchor.depth_m == pytest.approx(2.0)

    millimetres = np.full((60, 80), 2000, dtype=np.uint16)
    millimetres[mask] = rng.choice(np.array([0, 65535, 50], np.uint16), size=int(mask.sum()))
    anchor = compute_anchor(flat_frame(millimetres),
                            Detection((20.0, 15.0, 60.0, 45.0), 0.9, "x"),
                            AnchorParams(oriented_boxes=False))
    assert anchor.depth_m == pytest.approx(2.0)


def test_fewer_valid_samples_than_the_minimum_is_no_depth():
    depth = np.zeros((60, 80), dtype=np.float32)
    depth[30, 36:41] = 1.0  # five valid samples in the box's centre
    anchor = compute_anchor(flat_frame(depth), Detection((20.0, 15.0, 60.0, 45.0), 0.9, "x"))
    assert (anchor.reason, anchor.depth_m, anchor.valid_points) == (NO_DEPTH, None, 5)
    anchor = compute_anchor(flat_frame(depth), Detection((20.0, 15.0, 60.0, 45.0), 0.9, "x"),
                            AnchorParams(min_samples=5, oriented_boxes=False))
    assert anchor.depth_m == pytest.approx(1.0)


def test_box_outside_the_depth_image_says_so():
    frame = flat_frame(np.full((60, 80), 1.0, dtype=np.float32))
    anchor = compute_anchor(frame, Detection((200.0, 15.0, 260.0, 45.0), 0.9, "x"))
    assert anchor.reason == OUTSIDE_FRAME and anchor.depth_m is None


def test_box_thinner_than_a_depth_pixel_samples_the_pixel_under_it():
    frame = flat_frame(np.full((60, 80), 1.25, dtype=np.float32))
    anchor = compute_anchor(frame, Detection((40.1, 20.0, 40.3, 20.2), 0.9, "x"),
                            AnchorParams(min_samples=1, oriented_boxes=False))
    assert anchor.depth_m == pytest.approx(1.25) and anchor.valid_points == 1


def test_landmarks_off_the_image_fall_back_to_the_box():
    frame = scenes.depth_frame(0)
    detection = scenes.detection_of(scenes.FACE, scenes.HOME)
    off = Detection(detection.box, 0.9, "face", landmarks=((-50.0, -50.0),) * 5)
    anchor = compute_anchor(frame, off, AnchorParams(oriented_boxes=False))
    assert anchor.source == "box"
    assert np.linalg.norm(np.subtract(anchor.world_xyz, truth(detection, 0))) < CM


def test_without_a_pose_there_is_no_world_position():
    frame = scenes.depth_frame(0, with_pose=False)
    anchor = compute_anchor(frame, scenes.detection_of(scenes.FACE, scenes.HOME))
    assert anchor.world_xyz is None
    camera_truth = scenes.HOME.to_camera(scenes.FACE.center[None])[0]
    assert np.linalg.norm(np.subtract(anchor.camera_xyz, camera_truth)) < CM
    assert anchor.obb is not None  # in camera coordinates


@pytest.mark.parametrize("pose_index", [0, 1, 3])
def test_oriented_box_encloses_the_object_and_not_the_wall_behind(pose_index):
    frame = scenes.depth_frame(pose_index, seed=30 + pose_index)
    anchor = compute_anchor(frame, scenes.detection_of(scenes.FACE, scenes.POSES[pose_index]))
    obb = anchor.obb
    assert obb is not None
    rotation = np.array(obb.rotation).reshape(3, 3)
    assert np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-6)
    extent = np.array(obb.extent)
    # Every corner of the card is inside the box (1.5 cm slack for the noise and the pixels
    # lost at the card's edges); the box is thin across the card and no bigger than it
    # needs to be: the wall 2 m behind is not in it.
    local = (scenes.FACE.corners() - obb.center) @ rotation
    assert np.all(np.abs(local) <= extent / 2 + 0.015)
    thin_axis = rotation[:, np.argmin(extent)]
    assert abs(thin_axis @ scenes.FACE.normal) > np.cos(np.radians(10))
    assert extent.min() < 0.05 and extent.max() < 0.35
    assert np.linalg.norm(np.subtract(obb.center, scenes.FACE.center)) < 0.02


def test_anchor_round_trips_through_msgpack():
    frame = scenes.depth_frame(0)
    with_box = compute_anchor(frame, scenes.detection_of(scenes.FACE, scenes.HOME))
    no_depth = Anchor(None, None, None, 3, reason=NO_DEPTH)
    for anchor in (with_box, no_depth):
        wire = msgpack.unpackb(msgpack.packb(anchor.to_wire()))
        assert Anchor.from_wire(wire) == anchor


def test_hole_on_one_side_of_a_slanted_surface_does_not_shift_the_anchor():
    # A wall turned 50 degrees away from the camera, 3 m ahead, seen at 160x120: depth
    # changes by ~40 cm across the box, and a hole takes the box's near third.
    width, height = 160, 120
    k = Intrinsics(150.0, 150.0, 79.5, 59.5)
    normal = np.array([np.sin(np.radians(50)), 0.0, -np.cos(np.radians(50))])
    offset = -normal @ np.array([0.0, 0.0, 3.0])
    vs, us = np.mgrid[0:height, 0:width].astype(float)
    rays = np.stack([(us - k.cx) / k.fx, (vs - k.cy) / k.fy, np.ones_like(us)], axis=-1)
    depth = (-offset / (rays @ normal)).astype(np.float32)  # z-depth along each ray
    box = (50.0, 30.0, 110.0, 90.0)
    centre_ray = np.array([(80.0 - k.cx) / k.fx, (60.0 - k.cy) / k.fy, 1.0])
    expected = centre_ray * (-offset / (centre_ray @ normal))
    holed = depth.copy()
    holed[:, 60:75] = 0.0  # the left part of the box's central half
    frame = DepthFrame(holed, k, (width, height))
    anchor = compute_anchor(frame, Detection(box, 0.9, "x"), AnchorParams(oriented_boxes=False))
    assert np.linalg.norm(np.subtract(anchor.camera_xyz, expected)) < 0.002
    # The plain median of what is left would have been off by centimetres.
    central = holed[45:76, 65:96]
    assert abs(np.median(central[central > 0]) - expected[2]) > 0.02

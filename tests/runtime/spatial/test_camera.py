"""Camera geometry: intrinsics at two resolutions, poses on the wire, depth frames at the edge."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from runtime.spatial.camera import DepthFrame, Intrinsics, Pose
from runtime.spatial.errors import SpatialError
from tests.runtime.spatial import scenes


def test_pose_round_trips_through_the_wire_as_16_row_major_floats():
    pose = scenes.POSES[1]
    wire = msgpack.unpackb(msgpack.packb(pose.to_wire()))
    assert len(wire) == 16 and wire[3] == pytest.approx(0.3)  # row-major: x translation
    assert np.allclose(Pose.from_wire(wire).matrix, pose.matrix)


def test_float32_pose_is_accepted_and_reorthonormalised():
    noisy = scenes.POSES[2].matrix.astype(np.float32).ravel().tolist()
    rotation = Pose.from_wire(noisy).rotation
    assert np.abs(rotation.T @ rotation - np.eye(3)).max() < 1e-12


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.diag([2.0, 2.0, 2.0, 1.0]), "orthonormal"),
        (np.diag([1.0, 1.0, -1.0, 1.0]), "determinant"),
        (np.eye(4) + np.eye(4, k=-3), "last row"),
        (np.full((4, 4), np.nan), "finite"),
    ],
)
def test_pose_that_is_not_a_rigid_transform_is_rejected_with_the_reason(matrix, message):
    with pytest.raises(SpatialError, match=message):
        Pose(matrix)


def test_pose_needs_16_numbers_and_a_known_convention():
    with pytest.raises(SpatialError, match="16 row-major"):
        Pose.from_wire([1.0] * 12)
    with pytest.raises(SpatialError, match="convention"):
        Pose.from_wire(np.eye(4).ravel().tolist(), convention="unity")


def test_opengl_camera_pose_is_turned_into_opencv_axes():
    # An OpenGL/OpenXR camera at the world origin looks down its -z with y up.
    pose = Pose.from_wire(np.eye(4).ravel().tolist(), convention="opengl")
    in_front_and_above = pose.to_camera(np.array([[0.0, 0.5, -2.0]]))[0]
    assert np.allclose(in_front_and_above, (0.0, -0.5, 2.0))  # OpenCV: z forward, y down


def test_camera_to_world_and_back():
    pose = scenes.POSES[3]
    points = np.random.default_rng(0).normal(size=(10, 3))
    assert np.allclose(pose.to_camera(pose.to_world(points)), points)
    assert np.allclose(pose.to_world(np.zeros((1, 3)))[0], pose.translation)


def test_motion_between_poses_in_metres_and_degrees():
    metres, degrees = scenes.look((0, 0, 1.6), 0, 20).motion_to(scenes.look((0.3, 0.4, 1.6), 0, 30))
    assert metres == pytest.approx(0.5)
    assert degrees == pytest.approx(10.0)


def test_backprojection_inverts_projection():
    intrinsics = Intrinsics(600.0, 610.0, 318.2, 241.7)
    points = np.array([[0.1, -0.2, 1.5], [-1.0, 0.5, 4.0]])
    us, vs = intrinsics.project(points)
    assert np.allclose(intrinsics.backproject(us, vs, points[:, 2]), points)


def test_intrinsics_must_be_positive_and_finite():
    with pytest.raises(SpatialError, match="fx, fy > 0"):
        Intrinsics(0.0, 500.0, 320.0, 240.0)
    with pytest.raises(SpatialError, match="4 numbers"):
        Intrinsics.from_wire([500.0, 500.0, 320.0])


def test_depth_pixel_is_where_the_colour_pixels_it_covers_are():
    frame = scenes.depth_frame()
    # Depth pixel (i, j) at half resolution covers colour pixels 2i..2i+1 x 2j..2j+1.
    for i, j in ((0, 0), (100, 37), (639, 479)):
        u, v = frame.to_depth_pixels(2 * i + 0.5, 2 * j + 0.5)
        assert (u, v) == pytest.approx((i, j))
    depth_k = frame.depth_intrinsics
    for name in ("fx", "fy", "cx", "cy"):
        assert getattr(depth_k, name) == pytest.approx(getattr(scenes.DEPTH_K, name))


def test_every_pixel_back_projects_onto_the_surface_it_sees():
    # Exact depth through the frame's own intrinsics: floor pixels must land on z = 0 and
    # wall pixels on x = 4, across the whole image (any intrinsics mistake tilts them).
    depth, surface = scenes.exact_view(1)
    frame = DepthFrame(depth.astype(np.float32), scenes.COLOR_K, scenes.COLOR_SIZE,
                       scenes.POSES[1])
    world = frame.pose.to_world(frame.points(1, 0.1, 20.0))
    ids = surface[np.isfinite(depth)]
    assert np.abs(world[ids == scenes.FLOOR_ID, 2]).max() < 1e-5
    assert np.abs(world[ids == scenes.WALL_ID, 0] - 4.0).max() < 1e-5


def test_depth_frame_takes_uint16_millimetres_or_float32_metres():
    metres = np.full((48, 64), 1.5, dtype=np.float32)
    k = Intrinsics(100.0, 100.0, 31.5, 23.5)
    assert DepthFrame(metres, k, (64, 48)).metres(metres)[0, 0] == pytest.approx(1.5)
    millimetres = np.full((48, 64), 1500, dtype=np.uint16)
    assert DepthFrame(millimetres, k, (64, 48)).metres(millimetres)[0, 0] == pytest.approx(1.5)
    with pytest.raises(SpatialError, match="uint16"):
        DepthFrame(metres.astype(np.float64), k, (64, 48))
    with pytest.raises(SpatialError, match="2D"):
        DepthFrame(np.zeros((4, 4, 3), np.float32), k, (64, 48))


def test_depth_frame_with_a_different_aspect_is_rejected_as_unregistered():
    with pytest.raises(SpatialError, match="registered"):
        DepthFrame(np.zeros((480, 640), np.uint16), scenes.COLOR_K, (1280, 720))
    # Same aspect at another resolution is fine.
    DepthFrame(np.zeros((240, 320), np.uint16), scenes.COLOR_K, (1280, 960))


def test_motion_is_the_same_both_ways_and_zero_for_no_motion():
    a, b = scenes.POSES[0], scenes.POSES[2]
    assert a.motion_to(b)[1] == pytest.approx(b.motion_to(a)[1])
    assert math.isclose(a.motion_to(a)[1], 0.0, abs_tol=1e-6)

"""Planes: the floor and the wall from noisy depth, ids that survive camera motion, and a
cache that recomputes only when the camera has moved enough to matter."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from runtime.spatial.planes import (
    UNASSIGNED,
    Plane,
    PlaneCache,
    PlaneIds,
    PlaneParams,
    PlaneSet,
    detect_planes,
)
from tests.runtime.spatial import scenes

SEEDED = PlaneParams(seed=1)


def angle_deg(a, b) -> float:
    return math.degrees(math.acos(min(1.0, float(np.dot(a, b)))))


def find(planes, normal, offset):
    """The detected plane closest to (normal, offset), and its errors (degrees, metres)."""
    scored = [(angle_deg(p.normal, normal) + 100 * abs(p.offset - offset), p) for p in planes]
    plane = min(scored, key=lambda s: s[0])[1]
    return plane, angle_deg(plane.normal, normal), abs(plane.offset - offset)


@pytest.mark.parametrize("noise", [0.003, 0.005])
@pytest.mark.parametrize("pose_index", range(len(scenes.POSES)))
def test_floor_and_wall_within_2_degrees_and_1cm(pose_index, noise):
    frame = scenes.depth_frame(pose_index, seed=40 + pose_index, noise=noise)
    planes = detect_planes(frame, SEEDED)
    for normal, offset in (scenes.FLOOR, scenes.WALL):
        plane, degrees, metres = find(planes, normal, offset)
        assert degrees < 2.0 and metres < 0.01, (plane, degrees, metres)
        # The centre is on the plane, inside the room; the extent is metres, not a sliver.
        assert abs(np.dot(plane.normal, plane.center) + plane.offset) < 1e-6
        assert min(plane.extent) > 1.0
        assert abs(np.dot(plane.u_axis, plane.normal)) < 1e-6
    # Normals face the camera: the floor's points up, the wall's back into the room.
    assert find(planes, *scenes.FLOOR)[0].normal[2] > 0.99
    assert find(planes, *scenes.WALL)[0].normal[0] < -0.99


def test_without_a_pose_planes_are_in_camera_coordinates():
    frame = scenes.depth_frame(1, with_pose=False)
    result = PlaneCache(SEEDED).update(frame)
    assert result.frame == "camera"
    pose = scenes.POSES[1]
    for normal, offset in (scenes.FLOOR, scenes.WALL):
        # n_w . (R x + t) + d = 0  =>  (R^T n_w) . x + (n_w . t + d) = 0
        camera_normal = pose.rotation.T @ normal
        camera_offset = normal @ pose.translation + offset
        _, degrees, metres = find(result.planes, camera_normal, camera_offset)
        assert degrees < 2.0 and metres < 0.01


def ids_of(planes) -> tuple[int, int]:
    return find(planes, *scenes.FLOOR)[0].plane_id, find(planes, *scenes.WALL)[0].plane_id


def test_plane_ids_stay_the_same_across_frames_and_as_the_camera_moves():
    cache = PlaneCache(SEEDED)
    seen = []
    for step, pose_index in enumerate((0, 0, 1, 2, 3, 0)):
        cache.invalidate()  # recompute every frame, even from the same pose
        result = cache.update(scenes.depth_frame(pose_index, seed=50 + step))
        assert result.recomputed
        seen.append(ids_of(result.planes))
    assert len(set(seen)) == 1, seen
    floor_id, wall_id = seen[0]
    assert floor_id != wall_id


def test_cache_reuses_planes_while_the_camera_barely_moves_and_recomputes_after():
    cache = PlaneCache(SEEDED, min_translation_m=0.2, min_rotation_deg=15.0)
    first = cache.update(scenes.depth_frame(0))
    assert first.recomputed and first.compute_ms > 0 and first.frame == "world"

    # 1 cm and 1 degree later (a head at rest): the same planes, no time spent.
    nudged = scenes.depth_frame(0, seed=1)
    nudged = type(nudged)(nudged.depth, nudged.intrinsics, nudged.color_size,
                          scenes.look((0.01, 0.0, 1.6), 1.0, 20.0))
    again = cache.update(nudged)
    assert not again.recomputed and again.compute_ms == 0.0
    assert again.planes is first.planes

    # Walked half a metre (scenes.POSES[1] is 0.5 m away): recomputed, same ids.
    moved = cache.update(scenes.depth_frame(1))
    assert moved.recomputed and moved.compute_ms > 0
    assert ids_of(moved.planes) == ids_of(first.planes)

    # Turned 20 degrees on the spot, same position.
    turned = scenes.depth_frame(1, seed=2)
    turned = type(turned)(turned.depth, turned.intrinsics, turned.color_size,
                          scenes.look((0.3, -0.4, 1.5), 10.0 + 20.0, 15.0))
    assert cache.update(turned, requested=True).recomputed


def test_cache_computes_nothing_unless_requested():
    cache = PlaneCache(SEEDED)
    nothing = cache.update(scenes.depth_frame(0), requested=False)
    assert nothing == PlaneSet((), "camera", False, 0.0)
    computed = cache.update(scenes.depth_frame(0))
    assert computed.recomputed
    # Far from where they were computed, but not asked for: the cached planes come back.
    unasked = cache.update(scenes.depth_frame(3), requested=False)
    assert not unasked.recomputed and unasked.planes is computed.planes


def test_cache_without_a_pose_recomputes_every_request():
    # Camera-coordinate planes go stale with any motion, and without a pose motion is unseen.
    cache = PlaneCache(SEEDED)
    frame = scenes.depth_frame(0, with_pose=False)
    assert cache.update(frame).recomputed
    second = cache.update(frame)
    assert second.recomputed
    assert ids_of(second.planes) == ids_of(cache.update(frame).planes)  # still camera: same ids


def test_invalidate_forces_a_recompute():
    cache = PlaneCache(SEEDED)
    frame = scenes.depth_frame(0)
    cache.update(frame)
    assert not cache.update(frame).recomputed
    cache.invalidate()
    assert cache.update(frame).recomputed


def test_plane_set_round_trips_through_msgpack():
    result = PlaneCache(SEEDED).update(scenes.depth_frame(0))
    wire = msgpack.unpackb(msgpack.packb(result.to_wire()))
    back = PlaneSet.from_wire(wire)
    assert back.planes == result.planes and back.frame == "world" and back.recomputed


def plane_at(center, normal=(0.0, 0.0, 1.0), extent=(1.0, 0.6)):
    normal = np.asarray(normal, dtype=float)
    return Plane(UNASSIGNED, tuple(normal), float(-normal @ center), tuple(center),
                 (1.0, 0.0, 0.0), extent, 500)


def test_a_plane_missing_from_one_computation_gets_its_id_back():
    ids = PlaneIds()
    floor = plane_at((2.0, 0.0, 0.0), extent=(4.0, 3.0))
    table = plane_at((1.5, 0.5, 0.75))
    first = ids.assign((floor, table))
    ids.assign((floor,))  # the table was occluded this time
    moved_floor = plane_at((2.1, 0.1, 0.005), extent=(4.0, 3.0))
    third = ids.assign((plane_at((1.6, 0.45, 0.76)), moved_floor))
    assert {p.plane_id for p in third} == {p.plane_id for p in first}
    assert third[0].plane_id == first[1].plane_id  # the table, now listed first


def test_two_tables_of_the_same_height_far_apart_are_different_planes():
    ids = PlaneIds()
    near, far = ids.assign((plane_at((1.5, 0.5, 0.75)), plane_at((1.5, 6.0, 0.75))))
    assert near.plane_id != far.plane_id
    again = ids.assign((plane_at((1.5, 6.0, 0.75)),))
    assert again[0].plane_id == far.plane_id
    # A tilted or shifted surface is not the same plane.
    tilted = ids.assign((plane_at((1.5, 0.5, 0.75), normal=(0.0, np.sin(0.3), np.cos(0.3))),))
    raised = ids.assign((plane_at((1.5, 6.0, 0.95)),))
    assert tilted[0].plane_id not in (near.plane_id, far.plane_id)
    assert raised[0].plane_id not in (near.plane_id, far.plane_id)


def test_a_frame_without_depth_has_no_planes():
    empty = scenes.depth_frame(0)
    empty = type(empty)(np.zeros_like(empty.depth), empty.intrinsics, empty.color_size,
                        empty.pose)
    result = PlaneCache(SEEDED).update(empty)
    assert result.recomputed and result.planes == ()

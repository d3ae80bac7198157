"""Tracking: ids that stay with their objects through motion and missed frames, new ids for
new objects, and smoothed boxes, landmarks and anchors."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np
import pytest

from runtime.results import Detection
from runtime.spatial.anchors import NO_DEPTH, Anchor
from runtime.spatial.tracking import TrackedDetection, Tracker, TrackerParams

FPS = 30.0


@dataclass(frozen=True)
class Mover:
    """A 80x100 px object moving at a constant velocity (px per frame)."""

    name: str
    start: tuple[float, float]
    velocity: tuple[float, float]
    size: tuple[float, float] = (80.0, 100.0)
    class_id: int = 0

    def detection(self, frame: int, rng: np.random.Generator, jitter: float = 1.0) -> Detection:
        cx = self.start[0] + self.velocity[0] * frame
        cy = self.start[1] + self.velocity[1] * frame
        w, h = self.size
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) + rng.normal(0, jitter, 4)
        landmarks = tuple((cx + dx, cy + dy) for dx, dy in ((-15, -10), (15, -10), (0, 5),
                                                            (-10, 25), (10, 25)))
        return Detection(tuple(box.tolist()), 0.9, self.name, self.class_id, landmarks)


A = Mover("a", (100.0, 100.0), (6.0, 0.0))
B = Mover("b", (400.0, 220.0), (-4.0, 3.0))
C = Mover("c", (600.0, 320.0), (0.0, 0.0))


def run(tracker: Tracker, frames: dict[int, list[Mover]], seed: int = 0,
        shuffle: bool = True) -> dict[str, list[int]]:
    """Feed the frames (frame index -> movers visible); the track ids each mover got."""
    rng = np.random.default_rng(seed)
    ids: dict[str, list[int]] = {}
    for frame, movers in sorted(frames.items()):
        order = rng.permutation(len(movers)) if shuffle else range(len(movers))
        visible = [movers[i] for i in order]
        tracked = tracker.update([m.detection(frame, rng) for m in visible], frame / FPS)
        for mover, result in zip(visible, tracked, strict=True):
            assert result.detection.label == mover.name  # output follows input order
            ids.setdefault(mover.name, []).append(result.track_id)
    return ids


def test_ids_survive_a_moving_sequence_with_missed_detections():
    frames = {f: [A, B, C] for f in range(40)}
    frames[15] = [A, C]  # B missed once
    for f in (25, 26, 27):
        frames[f] = [A, B]  # C missed for three frames: the most a track is kept for
    ids = run(Tracker(), frames)
    assert all(len(set(got)) == 1 for got in ids.values()), ids  # one id each, throughout
    assert len({got[0] for got in ids.values()}) == 3  # and three different ones


def test_a_new_object_gets_a_new_id_and_ids_are_never_reused():
    tracker = Tracker()
    frames = {f: [A, B] for f in range(10)}
    for f in range(10, 20):
        frames[f] = [A, B, C]
    ids = run(tracker, frames)
    assert len(set(ids["c"])) == 1
    assert ids["c"][0] not in (ids["a"][0], ids["b"][0])


def test_a_track_missed_for_longer_than_its_memory_gets_a_new_id():
    params = TrackerParams(max_missed=3)
    frames = {f: [A, C] for f in range(10)}
    for f in range(10, 14):
        frames[f] = [A]  # C gone for 4 frames
    for f in range(14, 20):
        frames[f] = [A, C]
    ids = run(Tracker(params), frames)
    assert len(set(ids["a"])) == 1
    assert ids["c"][0] != ids["c"][-1]
    assert ids["c"][-1] not in ids["a"]


def test_fast_motion_without_box_overlap_keeps_its_id():
    # 40 px a frame for an 80 px box (IoU 0.33 at first, then the prediction takes over),
    # accelerating to 120 px a frame, where consecutive boxes do not overlap at all.
    tracker = Tracker()
    rng = np.random.default_rng(3)
    x, speed, ids = 100.0, 40.0, set()
    for frame in range(12):
        mover = Mover("fast", (x, 200.0), (0.0, 0.0))
        ids.add(tracker.update([mover.detection(0, rng)], frame / FPS)[0].track_id)
        x += speed
        speed = min(120.0, speed + 20.0)
    assert ids == {1}


def test_objects_of_different_classes_never_share_a_track():
    tracker = Tracker()
    rng = np.random.default_rng(4)
    face = Mover("face", (200.0, 200.0), (0.0, 0.0), class_id=0)
    hand = Mover("hand", (200.0, 200.0), (0.0, 0.0), class_id=1)
    first = tracker.update([face.detection(0, rng)], 0.0)[0]
    second = tracker.update([hand.detection(1, rng)], 1 / FPS)[0]
    assert second.track_id != first.track_id


def test_still_box_and_anchor_jitter_is_smoothed_away():
    tracker = Tracker()
    rng = np.random.default_rng(5)
    raw_boxes, boxes, raw_world, world = [], [], [], []
    for frame in range(300):
        detection = C.detection(frame, rng, jitter=1.0)
        point = np.array([0.4, -0.1, 2.0]) + rng.normal(0, 0.005, 3)
        anchor = Anchor(tuple(point.tolist()), tuple((point + 1.0).tolist()), float(point[2]), 50)
        result = tracker.update([detection], frame / FPS, [anchor])[0]
        raw_boxes.append(detection.box)
        boxes.append(result.detection.box)
        raw_world.append(anchor.world_xyz)
        world.append(result.anchor.world_xyz)
        assert result.anchor.depth_m == result.anchor.camera_xyz[2]
        assert result.anchor.valid_points == 50
    settled = slice(30, None)
    # At least 80% of the jitter variance gone, averaged over the coordinates.
    assert np.var(boxes[settled], axis=0).mean() < 0.2 * np.var(raw_boxes[settled], axis=0).mean()
    assert np.var(world[settled], axis=0).mean() < 0.2 * np.var(raw_world[settled], axis=0).mean()
    landmarks = np.array(result.detection.landmarks)
    assert landmarks.shape == (5, 2)


def test_anchor_without_depth_passes_through_and_does_not_drag_the_next_one():
    tracker = Tracker()
    rng = np.random.default_rng(6)
    near = Anchor((0.0, 0.0, 1.0), None, 1.0, 40)
    tracker.update([C.detection(0, rng)], 0.0, [near])
    lost = Anchor(None, None, None, 2, reason=NO_DEPTH)
    assert tracker.update([C.detection(1, rng)], 1 / FPS, [lost])[0].anchor == lost
    # Back after the gap, farther away: it starts where it is measured, not from 1 m.
    far = Anchor((0.0, 0.0, 3.0), None, 3.0, 40)
    back = tracker.update([C.detection(2, rng)], 2 / FPS, [far])[0].anchor
    assert back.camera_xyz == (0.0, 0.0, 3.0) and back.world_xyz is None
    assert tracker.update([C.detection(3, rng)], 3 / FPS, [None])[0].anchor is None


def test_anchors_must_match_the_detections():
    with pytest.raises(ValueError, match="2 anchors for 1 detections"):
        Tracker().update([C.detection(0, np.random.default_rng(0))], 0.0, [None, None])


def test_no_detections_ages_the_tracks_out():
    tracker = Tracker(TrackerParams(max_missed=2))
    rng = np.random.default_rng(7)
    first = tracker.update([C.detection(0, rng)], 0.0)[0].track_id
    for frame in range(1, 4):
        assert tracker.update([], frame / FPS) == ()
    assert tracker.update([C.detection(4, rng)], 4 / FPS)[0].track_id != first


def test_tracked_detection_round_trips_through_msgpack():
    anchor = Anchor((0.1, 0.2, 1.5), (1.0, 2.0, 3.0), 1.5, 80, source="landmarks")
    tracked = Tracker().update([A.detection(0, np.random.default_rng(8))], 0.0, [anchor])[0]
    wire = msgpack.unpackb(msgpack.packb(tracked.to_wire()))
    assert TrackedDetection.from_wire(wire) == tracked


def test_timestamps_must_increase():
    tracker = Tracker()
    detection = C.detection(0, np.random.default_rng(9))
    tracker.update([detection], 1.0)
    with pytest.raises(ValueError, match="timestamps must increase"):
        tracker.update([detection], 1.0)
    tracker.reset()
    tracker.update([detection], 0.5)  # a new stream may start its clock anywhere

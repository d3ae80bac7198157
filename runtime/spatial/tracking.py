"""Stable track ids across frames, with One Euro smoothing of each track's geometry.

Detections are matched to tracks greedily by IoU against each track's predicted box, then
by centre distance for what is left; a track missed for up to `max_missed` frames keeps its
id. All tracks are filtered in one batched One Euro step. Pure numpy, a fraction of a
millisecond per frame: it runs on the hot path. Not thread-safe: one tracker per stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.results import Detection
from runtime.spatial.anchors import Anchor
from runtime.spatial.one_euro import one_euro_step


@dataclass(frozen=True, slots=True)
class TrackerParams:
    iou_min: float = 0.3  # the least IoU with a track's predicted box that continues it
    # Fallback for fast motion: centre distance at most this many times the geometric
    # mean of the boxes' sides, and areas within `max_area_ratio` of each other.
    center_gate: float = 0.75
    max_area_ratio: float = 2.0
    max_missed: int = 3  # a track unseen for more frames than this is dropped
    max_landmarks: int = 5  # landmarks beyond this many are passed through unsmoothed
    # One Euro parameters: boxes and landmarks in pixels, anchors in metres.
    pixel_min_cutoff: float = 1.0
    pixel_beta: float = 0.05
    metre_min_cutoff: float = 1.0
    metre_beta: float = 10.0
    d_cutoff: float = 1.0


@dataclass(frozen=True, slots=True)
class TrackedDetection:
    """A detection with its track id. `detection` has the smoothed box and landmarks (score,
    label and class id as detected); `anchor` the smoothed camera/world position (depth_m is
    the smoothed camera z), or the anchor as given when it has no depth; `hits` counts the
    frames the track has been matched in, this one included."""

    track_id: int
    detection: Detection
    anchor: Anchor | None
    hits: int

    def to_wire(self) -> dict[str, Any]:
        return {"track_id": self.track_id, "detection": self.detection.to_wire(),
                "anchor": None if self.anchor is None else self.anchor.to_wire(),
                "hits": self.hits}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> TrackedDetection:
        anchor = wire.get("anchor")
        return cls(wire["track_id"], Detection.from_wire(wire["detection"]),
                   None if anchor is None else Anchor.from_wire(anchor), wire["hits"])


class Tracker:
    """Track ids and smoothing for one stream of frames.

    Per track it keeps the last measured box and its velocity (to predict where the box
    is next, through missed frames too) and the One Euro state of a row of values: box
    corners, landmarks (NaN where absent), anchor camera xyz and world xyz.
    """

    def __init__(self, params: TrackerParams = TrackerParams()) -> None:
        self.params = params
        landmarks = 2 * params.max_landmarks
        self._width = 4 + landmarks + 6
        pixels = 4 + landmarks
        self._min_cutoff = np.array([params.pixel_min_cutoff] * pixels
                                    + [params.metre_min_cutoff] * 6)
        self._beta = np.array([params.pixel_beta] * pixels + [params.metre_beta] * 6)
        self._next_id = 1
        self.reset()

    def reset(self) -> None:
        """Forget every track and the last timestamp (ids are not reused)."""
        self._last_time = -math.inf
        self._ids = np.zeros(0, dtype=np.int64)
        self._classes = np.zeros(0, dtype=np.int64)
        self._boxes = np.zeros((0, 4))  # last measured
        self._velocity = np.zeros((0, 4))  # px/s of the measured box
        self._times = np.zeros(0)  # when last measured
        self._missed = np.zeros(0, dtype=np.int64)
        self._hits = np.zeros(0, dtype=np.int64)
        self._x = np.zeros((0, self._width))  # One Euro state
        self._dx = np.zeros((0, self._width))

    def update(self, detections: Sequence[Detection], timestamp_s: float,
               anchors: Sequence[Anchor | None] | None = None) -> tuple[TrackedDetection, ...]:
        """Track this frame's detections (and their anchors, same order); the result is in
        the order of `detections`. Timestamps are seconds and must increase (use the
        daemon's monotonic clock when a client's capture times can repeat)."""
        count = len(detections)
        if anchors is not None and len(anchors) != count:
            raise ValueError(f"{len(anchors)} anchors for {count} detections")
        if timestamp_s <= self._last_time:
            raise ValueError(f"timestamps must increase: {timestamp_s} s after "
                             f"{self._last_time} s")
        self._last_time = timestamp_s
        boxes = np.array([d.box for d in detections], dtype=np.float64).reshape(count, 4)
        classes = np.array([d.class_id for d in detections], dtype=np.int64)
        rows = self._measurements(detections, anchors, boxes)

        track_of = self._associate(boxes, classes, timestamp_s)
        matched = track_of >= 0
        det_idx, trk_idx = np.nonzero(matched)[0], track_of[matched]

        missed = np.ones(len(self._ids), dtype=bool)
        missed[trk_idx] = False
        if trk_idx.size:
            dt = (timestamp_s - self._times[trk_idx])[:, None]
            measured = rows[det_idx]
            x, dx = one_euro_step(measured, self._x[trk_idx], self._dx[trk_idx], dt,
                                  self._min_cutoff, self._beta, self.params.d_cutoff)
            # A value not measured this frame (no depth, no landmarks) is forgotten, not held:
            # when it comes back, a stale state would drag it towards where it used to be.
            x[np.isnan(measured)] = np.nan
            self._x[trk_idx], self._dx[trk_idx] = x, dx
            seen = self._hits[trk_idx] > 1
            velocity = (boxes[det_idx] - self._boxes[trk_idx]) / dt
            # Half-and-half with the previous estimate: one jittery box must not fling the
            # prediction; a track's first match has no previous estimate.
            self._velocity[trk_idx] = np.where(
                seen[:, None], 0.5 * (self._velocity[trk_idx] + velocity), velocity)
            self._boxes[trk_idx] = boxes[det_idx]
            self._times[trk_idx] = timestamp_s
            self._missed[trk_idx] = 0
            self._hits[trk_idx] += 1
        self._missed[missed] += 1

        new = np.nonzero(~matched)[0]
        if new.size:
            first = self._next_id
            self._next_id += new.size
            track_of[new] = np.arange(len(self._ids), len(self._ids) + new.size)
            self._ids = np.concatenate([self._ids, np.arange(first, first + new.size)])
            self._classes = np.concatenate([self._classes, classes[new]])
            self._boxes = np.concatenate([self._boxes, boxes[new]])
            self._velocity = np.concatenate([self._velocity, np.zeros((new.size, 4))])
            self._times = np.concatenate([self._times, np.full(new.size, timestamp_s)])
            self._missed = np.concatenate([self._missed, np.zeros(new.size, dtype=np.int64)])
            self._hits = np.concatenate([self._hits, np.ones(new.size, dtype=np.int64)])
            self._x = np.concatenate([self._x, rows[new]])
            self._dx = np.concatenate([self._dx, np.zeros((new.size, self._width))])

        states = self._x[track_of].tolist()  # one conversion; the rest is list slicing
        result = tuple(
            self._output(detections[i], None if anchors is None else anchors[i],
                         int(self._ids[track_of[i]]), int(self._hits[track_of[i]]), states[i])
            for i in range(count)
        )
        self._drop(self._missed > self.params.max_missed)
        return result

    def _measurements(self, detections: Sequence[Detection],
                      anchors: Sequence[Anchor | None] | None, boxes: np.ndarray) -> np.ndarray:
        rows = np.full((len(detections), self._width), np.nan)
        rows[:, :4] = boxes
        limit = self.params.max_landmarks
        for i, detection in enumerate(detections):
            if detection.landmarks:
                flat = [c for point in detection.landmarks[:limit] for c in point]
                rows[i, 4:4 + len(flat)] = flat
            anchor = None if anchors is None else anchors[i]
            if anchor is not None and anchor.camera_xyz is not None:
                rows[i, -6:-3] = anchor.camera_xyz
                if anchor.world_xyz is not None:
                    rows[i, -3:] = anchor.world_xyz
        return rows

    def _associate(self, boxes: np.ndarray, classes: np.ndarray, now: float) -> np.ndarray:
        """For each detection, the index of the track it continues, or -1."""
        track_of = np.full(len(boxes), -1, dtype=np.int64)
        if not len(boxes) or not len(self._ids):
            return track_of
        predicted = self._boxes + self._velocity * (now - self._times)[:, None]
        same_class = classes[:, None] == self._classes[None, :]
        iou = np.where(same_class, _iou(boxes, predicted), 0.0)
        free_tracks = np.ones(len(self._ids), dtype=bool)
        # Highest IoU first; a detection or track is used once.
        for flat in np.argsort(-iou, axis=None):
            d, t = divmod(int(flat), len(self._ids))
            if iou[d, t] < self.params.iou_min:
                break
            if track_of[d] < 0 and free_tracks[t]:
                track_of[d], free_tracks[t] = t, False
        left = track_of < 0
        if left.any() and free_tracks.any():
            self._match_by_distance(boxes, predicted, same_class, track_of, free_tracks)
        return track_of

    def _match_by_distance(self, boxes: np.ndarray, predicted: np.ndarray,
                           same_class: np.ndarray, track_of: np.ndarray,
                           free_tracks: np.ndarray) -> None:
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        predicted_centres = (predicted[:, :2] + predicted[:, 2:]) / 2
        areas = _areas(boxes)
        predicted_areas = _areas(predicted)
        distance = np.linalg.norm(centres[:, None, :] - predicted_centres[None, :, :], axis=2)
        scale = np.sqrt(np.sqrt(areas[:, None] * predicted_areas[None, :]))
        ratio = np.maximum(areas[:, None], predicted_areas[None, :]) / np.maximum(
            np.minimum(areas[:, None], predicted_areas[None, :]), 1e-9)
        cost = distance / np.maximum(scale, 1e-9)
        allowed = (same_class & (ratio <= self.params.max_area_ratio)
                   & (track_of[:, None] < 0) & free_tracks[None, :])
        cost = np.where(allowed, cost, np.inf)
        for flat in np.argsort(cost, axis=None):
            d, t = divmod(int(flat), cost.shape[1])
            if cost[d, t] > self.params.center_gate:
                break
            if track_of[d] < 0 and free_tracks[t]:
                track_of[d], free_tracks[t] = t, False

    def _output(self, detection: Detection, anchor: Anchor | None, track_id: int, hits: int,
                state: list[float]) -> TrackedDetection:
        # Built field by field: dataclasses.replace costs several times more, per object.
        landmarks = detection.landmarks
        if landmarks:
            count = min(len(landmarks), self.params.max_landmarks)
            landmarks = tuple((state[4 + 2 * k], state[5 + 2 * k]) for k in range(count)) \
                + landmarks[count:]
        smoothed = Detection(box=(state[0], state[1], state[2], state[3]), score=detection.score,
                             label=detection.label, class_id=detection.class_id,
                             landmarks=landmarks)
        if anchor is not None and anchor.camera_xyz is not None:
            camera = (state[-6], state[-5], state[-4])
            world = None if anchor.world_xyz is None else (state[-3], state[-2], state[-1])
            anchor = Anchor(camera, world, camera[2], anchor.valid_points, anchor.obb,
                            anchor.source, anchor.reason)
        return TrackedDetection(track_id, smoothed, anchor, hits)

    def _drop(self, gone: np.ndarray) -> None:
        if not gone.any():
            return
        keep = ~gone
        self._ids, self._classes = self._ids[keep], self._classes[keep]
        self._boxes, self._velocity = self._boxes[keep], self._velocity[keep]
        self._times, self._missed = self._times[keep], self._missed[keep]
        self._hits = self._hits[keep]
        self._x, self._dx = self._x[keep], self._dx[keep]


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) intersection over union of x1, y1, x2, y2 boxes."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(w, 0) * np.maximum(h, 0)
    union = _areas(a)[:, None] + _areas(b)[None, :] - inter
    return inter / np.maximum(union, 1e-9)

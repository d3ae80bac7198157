"""Cascades: a second model run on each object a served model finds, its result attached to
that object (a classifier's top-k in `classes`, a landmark model's object in `children`).

The pipeline calls `Cascade.infer(group, infer)` where it would call `infer(group)`: the
cascade runs the first model (unless ROI tracking lets it skip it), then crops each chosen
object from the decoded frame (square, grown, optionally rotated from two keypoints, as
MediaPipe crops hands), runs the second model on the crops and maps its points back to
source pixels through the crop's own affine transform. Re-runs follow the tracker's ids
(runtime/spatial/tracking.py, per client): a new track, a box grown past a fraction, or
every N frames; otherwise the object keeps its last second-stage result.

Only `classify` and `landmarks` bundles can be second stages: their results are whole-crop
facts or points, which map back exactly; boxes inside a rotated crop would not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from runtime.config import CascadeSettings
from runtime.errors import ConfigError
from runtime.results import Detection, TaskResult
from runtime.spatial.tracking import Tracker
from runtime.tasks.landmarks import make_detection

SECOND_STAGE_TASKS = ("classify", "landmarks")


@dataclass(frozen=True, slots=True)
class Crop:
    """A square region of the source frame, possibly rotated: centre, side and angle (the
    radians the crop's up axis is turned clockwise from the frame's)."""

    cx: float
    cy: float
    side: float
    angle: float

    def to_source(self, size: tuple[int, int]) -> np.ndarray:
        """2x3 affine taking crop-input pixels (width, height = size) to source pixels."""
        width, height = size
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        sx, sy = self.side / width, self.side / height
        # source = centre + R(angle) @ ((u - w/2) * sx, (v - h/2) * sy)
        a = np.array([[cos * sx, -sin * sy], [sin * sx, cos * sy]])
        offset = np.array([self.cx, self.cy]) - a @ np.array([width / 2, height / 2])
        return np.column_stack([a, offset])


def crop_for(box, keypoints, margin: float, shift_y: float,
             rotate_from: tuple[int, int] | None) -> Crop:
    """MediaPipe's rect transformation: rotation from keypoint a -> b (pointing up), the
    centre shifted by shift_y box heights along the rotated up axis, the longer side grown
    by `margin` on each side."""
    x1, y1, x2, y2 = box
    width, height = x2 - x1, y2 - y1
    angle = 0.0
    if rotate_from is not None and len(keypoints) > max(rotate_from):
        (ax, ay), (bx, by) = keypoints[rotate_from[0]], keypoints[rotate_from[1]]
        angle = math.pi / 2 - math.atan2(-(by - ay), bx - ax)
        angle = (angle + math.pi) % (2 * math.pi) - math.pi
    cx = (x1 + x2) / 2 - height * shift_y * math.sin(angle)
    cy = (y1 + y2) / 2 + height * shift_y * math.cos(angle)
    return Crop(cx, cy, max(width, height) * (1 + 2 * margin), angle)


@dataclass
class _ClientState:
    tracker: Tracker = field(default_factory=Tracker)
    last_time: float = 0.0
    # track id -> (box area when the second model last ran, frames since, result)
    cache: dict[int, tuple[float, int, Detection]] = field(default_factory=dict)
    rois: list[tuple[Crop, Detection]] = field(default_factory=list)  # ROI tracking


@dataclass
class CascadeCounters:
    parent_runs: int = 0
    parent_skipped: int = 0
    child_runs: int = 0
    child_reused: int = 0


class Cascade:
    """One first-stage pipeline's second stage; used by that pipeline's infer thread only."""

    def __init__(self, settings: CascadeSettings, child) -> None:
        """`child`: the second stage's LoadedModel (its own engine, preprocessor, decoder)."""
        task = child.bundle.manifest.task
        if task not in SECOND_STAGE_TASKS:
            raise ConfigError(f"cascade {settings.on} -> {settings.run}: a {task!r} bundle "
                              f"cannot be a second stage; expected one of "
                              f"{', '.join(SECOND_STAGE_TASKS)}")
        self.settings = settings
        self.child = child
        self.counters = CascadeCounters()
        self._clients: dict[bytes, _ClientState] = {}
        spec = child.bundle.manifest.input.size
        if spec.mode != "fixed":
            raise ConfigError(f"cascade second stage {settings.run} needs a fixed input size")
        self._size = (spec.width, spec.height)

    def forget(self, client: bytes) -> None:
        self._clients.pop(client, None)

    def infer(self, group: list, run_parent: Callable[[list], list]) -> list:
        """Results for `group` (Prepared frames) in order: exceptions in a failed frame's
        place, as `infer` gives them."""
        states = [self._clients.setdefault(item.client, _ClientState()) for item in group]
        need = [item for item, state in zip(group, states, strict=True) if not state.rois]
        parent = dict(zip(map(id, need), run_parent(need), strict=True)) if need else {}
        self.counters.parent_runs += len(need)
        results = []
        for item, state in zip(group, states, strict=True):
            result = parent.get(id(item))
            if isinstance(result, Exception):
                results.append(result)
                continue
            try:
                if result is None:
                    self.counters.parent_skipped += 1
                    now = time.time()
                    for stamp in ("started", "inferred", "postprocessed"):
                        item.stamps[stamp] = now
                    results.append(self._from_rois(item, state))
                else:
                    results.append(self._second_stage(item, state, result))
            except Exception as exc:  # a second-stage failure costs its frame only
                results.append(exc)
        return results

    # -- the first model ran: crop its objects ---------------------------------------------
    def _second_stage(self, item, state: _ClientState, result: TaskResult) -> TaskResult:
        s = self.settings
        chosen = [i for i, d in enumerate(result.detections)
                  if (not s.labels or d.label in s.labels)
                  and min(d.box[2] - d.box[0], d.box[3] - d.box[1]) >= s.min_size][:s.max_objects]
        detections = list(result.detections)
        tracked = state.tracker.update([detections[i] for i in chosen],
                                       self._timestamp(item, state)) if chosen else ()
        rois = []
        for i, track in zip(chosen, tracked, strict=True):
            detection = detections[i]
            area = (detection.box[2] - detection.box[0]) * (detection.box[3] - detection.box[1])
            cached = state.cache.get(track.track_id)
            if cached is not None and track.hits > 1 and cached[1] + 1 < s.every \
                    and area <= cached[0] * (1 + s.rerun_growth):
                state.cache[track.track_id] = (cached[0], cached[1] + 1, cached[2])
                self.counters.child_reused += 1
                detections[i] = _attach(detection, cached[2])
                continue
            crop = crop_for(detection.box, detection.landmarks, s.margin, s.shift_y,
                            s.rotate_from)
            child = self._run_child(item, crop)
            if child is None:
                continue
            state.cache[track.track_id] = (area, 0, child)
            detections[i] = _attach(detection, child)
            if s.track_roi and child.landmarks and child.score >= s.track_roi:
                rois.append((self._next_roi(child), detection))
        live = {t.track_id for t in tracked}
        for gone in set(state.cache) - live:
            del state.cache[gone]
        # ROI tracking starts only when every chosen object gave a confident next crop.
        state.rois = rois if s.track_roi and chosen and len(rois) == len(chosen) else []
        return replace(result, detections=tuple(detections),
                       skeleton=self.child.bundle.manifest.skeleton)

    # -- the first model was skipped: follow last frame's landmarks ------------------------
    def _from_rois(self, item, state: _ClientState) -> TaskResult:
        s = self.settings
        detections, rois = [], []
        for crop, parent in state.rois:
            child = self._run_child(item, crop)
            if child is None or child.score < s.track_roi:
                continue
            detections.append(replace(parent, box=child.box, score=child.score,
                                      landmarks=(), children=(child,)))
            rois.append((self._next_roi(child), parent))
        # One object lost: the next frame runs the first model again (its re-detection).
        state.rois = rois if len(rois) == len(state.rois) else []
        return TaskResult(detections=tuple(detections), detector_skipped=True,
                          skeleton=self.child.bundle.manifest.skeleton)

    def _next_roi(self, child: Detection) -> Crop:
        s = self.settings
        return crop_for(child.box, child.landmarks, s.roi_margin, s.roi_shift_y,
                        s.roi_rotate_from)

    def _run_child(self, item, crop: Crop) -> Detection | None:
        """The second model on one crop: a Detection holding its classes or landmarks."""
        to_source = crop.to_source(self._size)
        # The frame may have been decoded smaller than its header says (a JPEG at a DCT
        # scale): the crop is cut from the decoded pixels, its points stay in the header's.
        header = item.job.header
        to_image = to_source * np.array([[item.image.shape[1] / header.width],
                                         [item.image.shape[0] / header.height]])
        pixels = cv2.warpAffine(item.image, to_image, self._size,
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_CONSTANT)
        model = self.child
        feeds, transform = model.frames.feeds(pixels, _pixel_order(item))
        outputs = model.engine.infer(feeds)
        self.counters.child_runs += 1
        decoder = model.frames.decode
        manifest = model.bundle.manifest
        if manifest.task == "classify":
            classes = decoder(outputs, transform).classes
            corners = to_source @ np.array([[0, self._size[0], 0, self._size[0]],
                                            [0, 0, self._size[1], self._size[1]],
                                            [1, 1, 1, 1]], dtype=np.float64)
            return Detection(box=(float(corners[0].min()), float(corners[1].min()),
                                  float(corners[0].max()), float(corners[1].max())),
                             score=classes[0].score if classes else 0.0,
                             label=classes[0].label if classes else "", classes=classes)
        points, presence, label = decoder.points(outputs)
        if presence < manifest.thresholds.score:
            return None
        # crop-input pixels -> crop pixels (the preprocessor resized by transform) -> source
        ux = (points[:, 0] - transform.pad_x) / transform.scale_x
        uy = (points[:, 1] - transform.pad_y) / transform.scale_y
        xs = to_source[0, 0] * ux + to_source[0, 1] * uy + to_source[0, 2]
        ys = to_source[1, 0] * ux + to_source[1, 1] * uy + to_source[1, 2]
        return make_detection(xs, ys, presence, label)

    def _timestamp(self, item, state: _ClientState) -> float:
        # The tracker needs increasing times: capture time when it increases, else a tick.
        now = item.job.header.capture_ts or 0.0
        state.last_time = now if now > state.last_time else state.last_time + 1e-3
        return state.last_time


def _pixel_order(item) -> str:
    """The decoded frame's channel order (decode.py: raw frames as sent, JPEG as BGR)."""
    if item.image.ndim == 2:
        return "gray"
    return "rgb" if item.job.header.encoding == "rgb8" else "bgr"


def _attach(detection: Detection, child: Detection) -> Detection:
    if child.classes and not child.landmarks:
        return replace(detection, classes=child.classes)
    return replace(detection, children=(child,))


def attach_cascades(settings: tuple[CascadeSettings, ...], pipelines: dict, bundles: dict,
                    open_engine: Callable) -> list:
    """Give each [[cascades]] entry's first-stage pipeline its Cascade; returns the second
    stages' engines (the server closes them). `bundles`: `run` reference -> Bundle."""
    from runtime.daemon.inference import LoadedModel

    engines = []
    for entry in settings:
        pipeline = pipelines.get(entry.on)
        if pipeline is None:
            raise ConfigError(f"cascade on {entry.on!r}: the daemon does not serve it "
                              f"(serving {', '.join(pipelines)})")
        if pipeline.cascade is not None:
            raise ConfigError(f"two cascades on {entry.on!r}; a model has at most one")
        bundle = bundles[entry.run]
        engine = open_engine(bundle)
        engines.append(engine)
        child = LoadedModel.of(bundle, engine)
        spec = bundle.manifest.input.size
        if spec.mode == "fixed":
            child.warm_up((spec.width, spec.height))
        pipeline.cascade = Cascade(entry, child)
    return engines

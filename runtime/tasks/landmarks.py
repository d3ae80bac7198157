"""Landmarks of one object per input (a crop): points in input pixels -> source pixels.

Roles: `points` [1, N*3] or [1, N*2] (x, y[, z] per point; 3 per point when the count
divides by 3), optional `presence` (the object's confidence; below the score threshold
nothing is returned), optional `handedness` (a 0-1 score choosing labels[0] or labels[1])
and optional `visibility` [1, N] (per point). The bundle's skeleton rides along for drawing.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import BundleError, EngineError
from runtime.models.bundle import Manifest
from runtime.models.preprocess import FrameTransform
from runtime.results import Detection, TaskResult
from runtime.tasks.classify import _listed


def _sigmoid_if_logit(value: float) -> float:
    return value if 0.0 <= value <= 1.0 else float(1.0 / (1.0 + np.exp(-value)))


class LandmarksDecoder:
    def __init__(self, manifest: Manifest) -> None:
        self._roles = manifest.outputs
        self._labels = manifest.labels
        self._threshold = manifest.thresholds.score
        self._skeleton = manifest.skeleton

    def points(self, outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, float, str]:
        """(points [N, 2 or 3] in input pixels, presence, label) before any mapping: the
        cascade maps them through its crop's rotation itself."""
        flat = np.asarray(outputs[self._roles["points"]][0], dtype=np.float64)
        per_point = flat.shape[-1] if flat.ndim == 2 else (3 if flat.size % 3 == 0 else 2)
        if flat.size < 2 or flat.size % per_point:
            raise EngineError(f"landmark output has {flat.size} values, expected x, y[, z] "
                              "per point")
        points = flat.reshape(-1, per_point)
        presence = 1.0
        if "presence" in self._roles:
            presence = _sigmoid_if_logit(float(np.asarray(outputs[self._roles["presence"]])
                                               .reshape(-1)[0]))
        label = self._labels[0] if self._labels else "object"
        if "handedness" in self._roles and len(self._labels) >= 2:
            side = float(np.asarray(outputs[self._roles["handedness"]]).reshape(-1)[0])
            label = self._labels[int(_sigmoid_if_logit(side) > 0.5)]
        return points, presence, label

    def __call__(self, outputs: dict[str, np.ndarray], transform: FrameTransform) -> TaskResult:
        points, presence, label = self.points(outputs)
        if presence < self._threshold:
            return TaskResult(skeleton=self._skeleton)
        xs, ys = transform.to_source(points[:, 0], points[:, 1])
        scores: tuple[float, ...] = ()
        if "visibility" in self._roles:
            raw = np.asarray(outputs[self._roles["visibility"]][0], np.float64).reshape(-1)
            scores = tuple(float(v) for v in 1.0 / (1.0 + np.exp(-raw)))
        return TaskResult(detections=(make_detection(xs, ys, presence, label, scores),),
                          skeleton=self._skeleton)

    @staticmethod
    def default_roles(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
        sizes = {name: int(np.prod(shape[1:])) for name, shape in shapes.items()}
        points = [name for name, size in sizes.items() if size >= 4]
        scalars = [name for name, size in sizes.items() if size == 1]
        if not points:
            raise BundleError("--task landmarks needs an output of points [1, N*3] or "
                              f"[1, N*2]; the model has {_listed(shapes)}")
        roles = {"points": points[0]}
        if scalars:
            roles["presence"] = scalars[0]
        if len(scalars) > 1:
            roles["handedness"] = scalars[1]
        return roles


def make_detection(xs: np.ndarray, ys: np.ndarray, score: float, label: str,
                   scores: tuple[float, ...] = ()) -> Detection:
    """One object from its points: the box is their bounds."""
    return Detection(box=(float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())),
                     score=float(score), label=label,
                     landmarks=tuple(zip(xs.tolist(), ys.tolist(), strict=True)),
                     landmark_scores=scores)

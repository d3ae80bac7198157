"""Kept boxes from a fused engine (runtime/fusion/suffix.py) -> overlay results.

The engine already thresholded and suppressed; what is left here is per-frame: the frame's
rows, best first, cut to max_detections, mapped to source pixels. The Python decoders
(face.py, detect.py) are the reference this must agree with (runtime/fusion/parity.py).
"""

from __future__ import annotations

import numpy as np

from runtime.models.bundle import Manifest
from runtime.models.preprocess import FrameTransform
from runtime.results import Detection, TaskResult
from runtime.tasks.boxes import boxes_to_source

# Output names of the fused graph; runtime/fusion/suffix.py defines the same.
BOXES, SCORES, CLASSES, BATCH, LANDMARKS = (
    "sightline_boxes", "sightline_scores", "sightline_classes", "sightline_batch",
    "sightline_landmarks")


class KeptBoxesDecoder:
    def __init__(self, manifest: Manifest) -> None:
        self._labels = manifest.labels
        self._face = manifest.task == "face"
        self._top_k = manifest.thresholds.max_detections

    def rows(self, outputs: dict[str, np.ndarray], frame: int) -> dict[str, np.ndarray]:
        """One frame's rows of a batched call's outputs."""
        mine = outputs[BATCH] == frame
        return {name: value[mine] for name, value in outputs.items()}

    def __call__(self, outputs: dict[str, np.ndarray], transform: FrameTransform) -> TaskResult:
        scores = outputs[SCORES]
        if len(scores) == 0:
            return TaskResult()
        # best first; stable, so equal scores keep the engine's order
        order = np.argsort(-scores, kind="stable")[:self._top_k]
        src_boxes = boxes_to_source(outputs[BOXES][order].astype(np.float64), transform)
        classes = outputs[CLASSES][order]
        if self._face:
            marks = outputs[LANDMARKS][order].astype(np.float64)
            xs, ys = transform.to_source(marks[..., 0], marks[..., 1])
            label = self._labels[0] if self._labels else "face"
            return TaskResult(detections=tuple(
                Detection(box=tuple(float(v) for v in src_boxes[i]), score=float(scores[k]),
                          label=label,
                          landmarks=tuple(zip(xs[i].tolist(), ys[i].tolist(), strict=True)))
                for i, k in enumerate(order)))
        return TaskResult(detections=tuple(
            Detection(box=tuple(float(v) for v in src_boxes[i]), score=float(scores[k]),
                      label=self._label(int(classes[i])), class_id=int(classes[i]))
            for i, k in enumerate(order)))

    def _label(self, class_id: int) -> str:
        return self._labels[class_id] if class_id < len(self._labels) else f"class{class_id}"

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

# Output names of the fused graph (runtime/fusion/suffix.py writes them): [K, 4] boxes in
# model-input pixels, [K] scores, classes and batch rows, [K, P, 2] landmarks (face).
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
        boxes = outputs[BOXES][order].astype(np.float64)
        count = len(order)
        # every point of the frame (box corners, then landmarks) mapped in one call
        xs, ys = [boxes[:, 0], boxes[:, 2]], [boxes[:, 1], boxes[:, 3]]
        if self._face:
            marks = outputs[LANDMARKS][order].astype(np.float64)
            xs.append(marks[..., 0].reshape(-1))
            ys.append(marks[..., 1].reshape(-1))
        sx, sy = transform.to_source(np.concatenate(xs), np.concatenate(ys))
        sx, sy = sx.tolist(), sy.tolist()
        picked = scores[order].tolist()
        if self._face:
            points = len(sx) // count - 2 if count else 0
            label = self._labels[0] if self._labels else "face"
            return TaskResult(detections=tuple(
                Detection(box=(sx[i], sy[i], sx[count + i], sy[count + i]), score=picked[i],
                          label=label,
                          landmarks=tuple(zip(sx[2 * count + i * points:
                                                 2 * count + (i + 1) * points],
                                              sy[2 * count + i * points:
                                                 2 * count + (i + 1) * points], strict=True)))
                for i in range(count)))
        classes = outputs[CLASSES][order].tolist()
        return TaskResult(detections=tuple(
            Detection(box=(sx[i], sy[i], sx[count + i], sy[count + i]), score=picked[i],
                      label=self._label(classes[i]), class_id=classes[i])
            for i in range(count)))

    def _label(self, class_id: int) -> str:
        return self._labels[class_id] if class_id < len(self._labels) else f"class{class_id}"

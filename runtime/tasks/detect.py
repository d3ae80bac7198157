"""YOLOv8-style detection decoding: [N, 4+C, anchors] -> class-aware NMS -> labelled boxes.

Rows 0-3 are the box centre and size (cx, cy, w, h) in input pixels; rows 4.. are
per-class scores (already sigmoid-ed, no objectness), as Ultralytics exports them.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import EngineError
from runtime.models.bundle import Manifest
from runtime.models.preprocess import FrameTransform
from runtime.results import Detection, TaskResult
from runtime.tasks.boxes import boxes_to_source, nms


class DetectionDecoder:
    def __init__(self, manifest: Manifest) -> None:
        self._name = manifest.outputs["predictions"]
        self._labels = manifest.labels
        self._thresholds = manifest.thresholds

    def __call__(self, outputs: dict[str, np.ndarray], transform: FrameTransform) -> TaskResult:
        predictions = outputs[self._name][0]
        if predictions.ndim != 2 or predictions.shape[0] < 5:
            raise EngineError(f"detector output has shape {predictions.shape}, "
                              "expected [4 + classes, anchors]")
        class_scores = predictions[4:]
        class_ids = class_scores.argmax(axis=0)
        scores = class_scores[class_ids, np.arange(class_scores.shape[1])]
        candidates = np.nonzero(scores > self._thresholds.score)[0]
        if len(candidates) == 0:
            return TaskResult()
        cx, cy, w, h = predictions[:4, candidates]
        boxes = np.column_stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        scores, class_ids = scores[candidates], class_ids[candidates]
        keep = nms(boxes, scores, class_ids, self._thresholds.score, self._thresholds.iou,
                   self._thresholds.max_detections)
        src_boxes = boxes_to_source(boxes[keep], transform)
        return TaskResult(detections=tuple(
            Detection(
                box=tuple(float(v) for v in src_boxes[i]),
                score=float(scores[k]),
                label=self._label(int(class_ids[k])),
                class_id=int(class_ids[k]),
            )
            for i, k in enumerate(keep)
        ))

    def _label(self, class_id: int) -> str:
        return self._labels[class_id] if class_id < len(self._labels) else f"class{class_id}"

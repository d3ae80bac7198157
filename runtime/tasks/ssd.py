"""SSD anchor decoding for MediaPipe's palm and face detectors (BlazePalm, BlazeFace).

The model gives, per anchor, a box (cx, cy, w, h) and keypoints (x, y pairs) as offsets in
input pixels from the anchor's centre, and a score logit. Anchors follow MediaPipe's
SsdAnchorsCalculator with fixed unit size: per stride a grid of cells, layers of equal
stride merged, `per_layer` anchors per cell each (manifest `anchors`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from runtime.errors import BundleError, EngineError
from runtime.models.bundle import Anchors, Manifest
from runtime.models.preprocess import FrameTransform
from runtime.results import Detection, TaskResult
from runtime.tasks.boxes import boxes_to_source, nms
from runtime.tasks.classify import _listed


@lru_cache(maxsize=8)
def anchor_centres(anchors: Anchors, width: int, height: int) -> np.ndarray:
    """[N, 2] anchor centres in input pixels, in the model's output order."""
    centres = []
    strides = anchors.strides
    i = 0
    while i < len(strides):
        stride, repeats = strides[i], 0
        while i < len(strides) and strides[i] == stride:
            repeats, i = repeats + 1, i + 1
        rows, cols = -(-height // stride), -(-width // stride)
        ys, xs = np.mgrid[0:rows, 0:cols]
        cell = np.stack([(xs + 0.5) / cols * width, (ys + 0.5) / rows * height], axis=-1)
        centres.append(np.repeat(cell.reshape(-1, 2), repeats * anchors.per_layer, axis=0))
    return np.concatenate(centres).astype(np.float32)


class SsdDecoder:
    def __init__(self, manifest: Manifest) -> None:
        self._boxes, self._scores = manifest.outputs["boxes"], manifest.outputs["scores"]
        self._anchors = manifest.anchors or Anchors()
        self._thresholds = manifest.thresholds
        self._label = manifest.labels[0] if manifest.labels else "object"

    def __call__(self, outputs: dict[str, np.ndarray], transform: FrameTransform) -> TaskResult:
        raw = np.asarray(outputs[self._boxes][0], dtype=np.float32)
        logits = np.asarray(outputs[self._scores][0], dtype=np.float32).reshape(-1)
        centres = anchor_centres(self._anchors, transform.input_width, transform.input_height)
        if raw.ndim != 2 or len(raw) != len(centres) or len(logits) != len(centres):
            raise EngineError(f"SSD outputs {raw.shape} and {logits.shape} do not match the "
                              f"{len(centres)} anchors of strides {list(self._anchors.strides)}"
                              f" on a {transform.input_width}x{transform.input_height} input")
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -80.0, 80.0)))
        candidates = np.nonzero(scores > self._thresholds.score)[0]
        if len(candidates) == 0:
            return TaskResult()
        raw, anchor = raw[candidates], centres[candidates]
        cx, cy = raw[:, 0] + anchor[:, 0], raw[:, 1] + anchor[:, 1]
        half_w, half_h = raw[:, 2] / 2, raw[:, 3] / 2
        boxes = np.column_stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h])
        keypoints = self._anchors.keypoints
        kx = raw[:, 4:4 + 2 * keypoints:2] + anchor[:, :1]
        ky = raw[:, 5:5 + 2 * keypoints:2] + anchor[:, 1:]
        scores = scores[candidates]
        keep = nms(boxes, scores, None, self._thresholds.score, self._thresholds.iou,
                   self._thresholds.max_detections)
        src_boxes = boxes_to_source(boxes[keep], transform)
        src_x, src_y = transform.to_source(kx[keep], ky[keep])
        return TaskResult(detections=tuple(
            Detection(box=tuple(float(v) for v in src_boxes[i]), score=float(scores[k]),
                      label=self._label,
                      landmarks=tuple(zip(src_x[i].tolist(), src_y[i].tolist(), strict=True)))
            for i, k in enumerate(keep)))

    @staticmethod
    def default_roles(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
        boxes = [n for n, s in shapes.items() if len(s) == 3 and s[-1] >= 4]
        scores = [n for n, s in shapes.items() if len(s) == 3 and s[-1] == 1]
        if len(boxes) != 1 or len(scores) != 1:
            raise BundleError("--task ssd needs two outputs, boxes [1, N, 4+2K] and scores "
                              f"[1, N, 1]; the model has {_listed(shapes)}")
        return {"boxes": boxes[0], "scores": scores[0]}

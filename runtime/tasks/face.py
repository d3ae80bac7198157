"""CenterFace decoding: heatmap peaks + box scale/offset + 5 landmarks, then NMS.

CenterFace predicts at stride 4: every heatmap cell above the threshold is a face
centre; scale holds log box size, offset the sub-cell centre, landmarks are relative to
the box. Follows the reference decoder (Star-Clouds/CenterFace), vectorised.
"""

from __future__ import annotations

import numpy as np

from runtime.models.bundle import Manifest
from runtime.models.preprocess import FrameTransform
from runtime.results import Detection, TaskResult
from runtime.tasks.boxes import boxes_to_source, nms

STRIDE = 4


class FaceDecoder:
    def __init__(self, manifest: Manifest) -> None:
        roles = manifest.outputs
        self._names = (roles["heatmap"], roles["scale"], roles["offset"], roles["landmarks"])
        self._thresholds = manifest.thresholds
        self._label = manifest.labels[0] if manifest.labels else "face"

    def __call__(self, outputs: dict[str, np.ndarray], transform: FrameTransform) -> TaskResult:
        heatmap, scale, offset, landmarks = (outputs[n][0] for n in self._names)
        heat = heatmap[0]
        ys, xs = np.nonzero(heat > self._thresholds.score)
        if len(ys) == 0:
            return TaskResult()
        scores = heat[ys, xs]
        box_h = np.exp(scale[0, ys, xs]) * STRIDE
        box_w = np.exp(scale[1, ys, xs]) * STRIDE
        cx = (xs + offset[1, ys, xs] + 0.5) * STRIDE
        cy = (ys + offset[0, ys, xs] + 0.5) * STRIDE
        x1 = np.clip(cx - box_w / 2, 0, transform.input_width)
        y1 = np.clip(cy - box_h / 2, 0, transform.input_height)
        x2 = np.minimum(x1 + box_w, transform.input_width)
        y2 = np.minimum(y1 + box_h, transform.input_height)
        boxes = np.column_stack([x1, y1, x2, y2])
        # landmark channels alternate (y, x) per point, in box-size units from the corner
        lm_x = landmarks[1::2, ys, xs].T * box_w[:, None] + x1[:, None]
        lm_y = landmarks[0::2, ys, xs].T * box_h[:, None] + y1[:, None]

        keep = nms(boxes, scores, None, self._thresholds.score, self._thresholds.iou,
                   self._thresholds.max_detections)
        src_boxes = boxes_to_source(boxes[keep], transform)
        src_x, src_y = transform.to_source(lm_x[keep], lm_y[keep])
        return TaskResult(detections=tuple(
            Detection(
                box=tuple(float(v) for v in src_boxes[i]),
                score=float(scores[k]),
                label=self._label,
                landmarks=tuple(zip(src_x[i].tolist(), src_y[i].tolist(), strict=True)),
            )
            for i, k in enumerate(keep)
        ))

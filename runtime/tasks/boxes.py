"""Box helpers shared by the detector decoders: NMS (OpenCV's) and mapping to the source frame."""

from __future__ import annotations

import cv2
import numpy as np

from runtime.models.preprocess import FrameTransform


def nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray | None,
        score_threshold: float, iou_threshold: float, top_k: int) -> np.ndarray:
    """Indices kept by non-maximum suppression (per class when class_ids is given).

    At most `top_k`, best first. OpenCV's own top_k cuts the candidates *before*
    suppression, which lets one object's many overlapping anchors crowd out every other
    object, so the cut is made here, after it.
    """
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    xywh = np.column_stack([boxes[:, 0], boxes[:, 1],
                            boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    xywh = xywh.astype(np.float32)
    scores = scores.astype(np.float32)
    if class_ids is None:
        keep = cv2.dnn.NMSBoxes(xywh, scores, score_threshold, iou_threshold)
    else:
        keep = cv2.dnn.NMSBoxesBatched(xywh, scores, class_ids.astype(np.int32),
                                       score_threshold, iou_threshold)
    return np.asarray(keep, dtype=np.int64).reshape(-1)[:top_k]


def boxes_to_source(boxes: np.ndarray, transform: FrameTransform) -> np.ndarray:
    x1, y1 = transform.to_source(boxes[:, 0], boxes[:, 1])
    x2, y2 = transform.to_source(boxes[:, 2], boxes[:, 3])
    return np.column_stack([x1, y1, x2, y2])

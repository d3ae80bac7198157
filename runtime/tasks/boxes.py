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


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of [N, 4] and [M, 4] x1y1x2y2 boxes."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)

"""Draw overlay primitives on a frame with OpenCV, for the demo and debug views."""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from runtime.results import Detection

BOX_COLOR = (80, 220, 60)  # BGR
# left eye, right eye, nose, left mouth corner, right mouth corner
LANDMARK_COLORS = ((255, 80, 80), (80, 80, 255), (80, 255, 255), (255, 80, 255), (255, 255, 80))


def draw_detections(image: np.ndarray, detections: Iterable[Detection],
                    note: str | None = None) -> np.ndarray:
    """Return an annotated copy of a BGR frame: boxes, labels with scores, landmarks."""
    canvas = image.copy() if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(min(canvas.shape[:2]) / 240))
    for detection in detections:
        x1, y1, x2, y2 = (round(v) for v in detection.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), BOX_COLOR, thickness, cv2.LINE_AA)
        caption = f"{detection.label} {detection.score:.2f}"
        (tw, th), baseline = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = max(0, y1 - th - baseline - 2)
        cv2.rectangle(canvas, (x1, top), (x1 + tw + 4, top + th + baseline + 2), BOX_COLOR, -1)
        cv2.putText(canvas, caption, (x1 + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
        for index, (x, y) in enumerate(detection.landmarks):
            color = LANDMARK_COLORS[index % len(LANDMARK_COLORS)]
            cv2.circle(canvas, (round(x), round(y)), thickness + 2, color, -1, cv2.LINE_AA)
    if note:
        cv2.putText(canvas, note, (8, canvas.shape[0] - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return canvas

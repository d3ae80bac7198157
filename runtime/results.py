"""Overlay primitives a task produces, in the source frame's pixel coordinates.

The same types are used by the daemon (to build replies) and by the client SDK (to
read them back), so `to_wire`/`from_wire` live next to the fields they describe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.transform import FrameTransform


@dataclass(frozen=True, slots=True)
class Classification:
    """One class of a classifier's top-k: its label, confidence (0-1) and index."""

    label: str
    score: float
    class_id: int

    def to_wire(self) -> dict[str, Any]:
        return {"label": self.label, "score": self.score, "class_id": self.class_id}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Classification:
        return cls(wire["label"], wire["score"], wire.get("class_id", 0))


@dataclass(frozen=True, slots=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in source-frame pixels
    score: float
    label: str
    class_id: int = 0
    landmarks: tuple[tuple[float, float], ...] = ()
    # Per-landmark confidence or visibility (0-1), where the model gives one.
    landmark_scores: tuple[float, ...] = ()
    # What a cascade's second model said about this object: a classifier's top-k, a
    # landmark model's object (runtime/daemon/cascade.py).
    classes: tuple[Classification, ...] = ()
    children: tuple[Detection, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "box": list(self.box),
            "score": self.score,
            "label": self.label,
            "class_id": self.class_id,
        }
        if self.landmarks:
            wire["landmarks"] = [list(p) for p in self.landmarks]
        if self.landmark_scores:
            wire["landmark_scores"] = list(self.landmark_scores)
        if self.classes:
            wire["classes"] = [c.to_wire() for c in self.classes]
        if self.children:
            wire["children"] = [c.to_wire() for c in self.children]
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Detection:
        return cls(
            box=tuple(wire["box"]),
            score=wire["score"],
            label=wire["label"],
            class_id=wire.get("class_id", 0),
            landmarks=tuple(tuple(p) for p in wire.get("landmarks", ())),
            landmark_scores=tuple(wire.get("landmark_scores", ())),
            classes=tuple(Classification.from_wire(c) for c in wire.get("classes", ())),
            children=tuple(cls.from_wire(c) for c in wire.get("children", ())),
        )


@dataclass(frozen=True)
class Mask:
    """A segmentation mask over the whole source frame, one uint8 per source pixel:
    `probability` (0-255 for 0-1) or `classes` (class ids, names in `labels`).

    On the wire it is an 8-bit greyscale PNG with its size (docs/protocol.md §5.1.7):
    lossless, and about 20-60x smaller than the raw bytes for a person mask.
    """

    values: np.ndarray  # uint8 [height, width]
    kind: str = "probability"
    labels: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        import cv2

        ok, png = cv2.imencode(".png", np.ascontiguousarray(self.values, dtype=np.uint8),
                               [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise ValueError("PNG encoding of the mask failed")
        height, width = self.values.shape
        wire: dict[str, Any] = {"encoding": "png", "width": width, "height": height,
                                "kind": self.kind, "data": png.tobytes()}
        if self.labels:
            wire["labels"] = list(self.labels)
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Mask:
        import cv2

        if wire.get("encoding") != "png":
            raise ValueError(f"mask encoding {wire.get('encoding')!r} is not png")
        values = cv2.imdecode(np.frombuffer(wire["data"], np.uint8), cv2.IMREAD_GRAYSCALE)
        if values is None or values.shape != (wire["height"], wire["width"]):
            raise ValueError("the mask's PNG does not decode to its declared size")
        return cls(values, wire.get("kind", "probability"), tuple(wire.get("labels", ())))

    def probability(self) -> np.ndarray:
        """float32 [h, w] in 0-1 (probability masks)."""
        return self.values.astype(np.float32) / 255.0


@dataclass(frozen=True)
class TaskResult:
    """What a task decoder returns: overlay primitives, or raw tensors for custom clients.

    Raw results carry the frame's `transform` (tensors are in model-input geometry) and the
    names of the tensors already resized back to the source frame (`in_source`).
    """

    detections: tuple[Detection, ...] = ()
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    transform: FrameTransform | None = None
    in_source: frozenset[str] = frozenset()
    classes: tuple[Classification, ...] = ()  # task classify: top-k, best first
    mask: Mask | None = None  # task segment
    skeleton: tuple[tuple[int, int], ...] = ()  # task landmarks: lines to draw
    # A cascade with ROI tracking answered from the last frame's landmarks, without running
    # the first (detector) model.
    detector_skipped: bool = False


def tensor_to_wire(array: np.ndarray, *, in_source: bool = False) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    wire = {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}
    if in_source:  # resized back by the daemon: the last two dims are the source h, w
        wire["space"] = "source"
    return wire


def tensor_from_wire(wire: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(wire["data"], dtype=np.dtype(wire["dtype"])).reshape(wire["shape"])

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
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in source-frame pixels
    score: float
    label: str
    class_id: int = 0
    landmarks: tuple[tuple[float, float], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "box": list(self.box),
            "score": self.score,
            "label": self.label,
            "class_id": self.class_id,
        }
        if self.landmarks:
            wire["landmarks"] = [list(p) for p in self.landmarks]
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Detection:
        return cls(
            box=tuple(wire["box"]),
            score=wire["score"],
            label=wire["label"],
            class_id=wire.get("class_id", 0),
            landmarks=tuple(tuple(p) for p in wire.get("landmarks", ())),
        )


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


def tensor_to_wire(array: np.ndarray, *, in_source: bool = False) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    wire = {"dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}
    if in_source:  # resized back by the daemon: the last two dims are the source h, w
        wire["space"] = "source"
    return wire


def tensor_from_wire(wire: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(wire["data"], dtype=np.dtype(wire["dtype"])).reshape(wire["shape"])

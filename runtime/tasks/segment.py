"""Segmentation: a per-pixel map -> a mask over the source frame (uint8, sent as PNG).

One channel is a foreground probability (a sigmoid is applied if the values are logits);
several channels are per-class scores, reduced to a class-id map. The map is cropped to
the letterboxed content and resized to the source size (bilinear for probabilities,
nearest for class ids) before it is quantised, so the mask lines up pixel for pixel.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import BundleError, EngineError
from runtime.models.bundle import Manifest
from runtime.models.preprocess import FrameTransform
from runtime.results import Mask, TaskResult
from runtime.tasks.classify import _listed


class SegmentDecoder:
    def __init__(self, manifest: Manifest) -> None:
        self._name = manifest.outputs["mask"]
        self._channels_last = manifest.input.layout == "NHWC"
        self._labels = manifest.labels

    def __call__(self, outputs: dict[str, np.ndarray], transform: FrameTransform) -> TaskResult:
        planes = self._planes(np.asarray(outputs[self._name][0]))  # [C, H, W]
        if planes.shape[0] == 1:
            plane = planes[0].astype(np.float32)
            if plane.min() < 0.0 or plane.max() > 1.0:
                plane = 1.0 / (1.0 + np.exp(-plane))
            in_source = transform.warp_to_source(plane)
            values = np.clip(in_source * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return TaskResult(mask=Mask(values, "probability", self._labels))
        classes = planes.argmax(axis=0).astype(np.uint8)
        return TaskResult(mask=Mask(transform.warp_to_source(classes), "classes", self._labels))

    def _planes(self, value: np.ndarray) -> np.ndarray:
        if value.ndim == 2:
            return value[None]
        if value.ndim != 3:
            raise EngineError(f"segmentation output has shape {value.shape}, expected "
                              "[H, W], [C, H, W] or [H, W, C] per frame")
        channels_last = self._channels_last if value.shape[0] != 1 else False
        if value.shape[-1] == 1:
            channels_last = True
        return np.moveaxis(value, -1, 0) if channels_last else value

    @staticmethod
    def default_roles(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
        maps = [name for name, shape in shapes.items()
                if len(shape) in (3, 4) and sum(d > 4 for d in shape[1:]) >= 2]
        if len(maps) != 1:
            raise BundleError("--task segment needs one output map [1, H, W, C] or [1, C, H, W]"
                              f"; the model has {_listed(shapes)}; name it with --output "
                              "mask=NAME")
        return {"mask": maps[0]}

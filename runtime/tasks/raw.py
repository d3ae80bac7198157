"""Raw task: the model's output tensors for custom clients, with the frame's transform so a
client can put them on the source frame; named (..., H, W) outputs may be resized back to
the source frame here when the bundle asks for it (`resize_to_source`)."""

from __future__ import annotations

import numpy as np

from runtime.models.bundle import Manifest
from runtime.models.preprocess import FrameTransform
from runtime.results import TaskResult


class RawDecoder:
    def __init__(self, manifest: Manifest) -> None:
        self._names = tuple(manifest.outputs.values())  # empty: every output
        self._to_source = frozenset(manifest.resize_to_source)

    def __call__(self, outputs: dict[str, np.ndarray], transform: FrameTransform) -> TaskResult:
        chosen = {n: outputs[n] for n in self._names} if self._names else dict(outputs)
        if not self._to_source:  # the default: tensors as the model made them, no copy
            return TaskResult(tensors=chosen, transform=transform)
        for name in self._to_source:
            chosen[name] = transform.warp_to_source(chosen[name])
        return TaskResult(tensors=chosen, transform=transform, in_source=self._to_source)

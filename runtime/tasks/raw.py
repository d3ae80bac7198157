"""Raw task: the model's output tensors, returned as they are, for custom clients."""

from __future__ import annotations

import numpy as np

from runtime.models.bundle import Manifest
from runtime.models.preprocess import FrameTransform
from runtime.results import TaskResult


class RawDecoder:
    def __init__(self, manifest: Manifest) -> None:
        self._names = tuple(manifest.outputs.values())  # empty: every output

    def __call__(self, outputs: dict[str, np.ndarray], transform: FrameTransform) -> TaskResult:
        chosen = {n: outputs[n] for n in self._names} if self._names else dict(outputs)
        return TaskResult(tensors=chosen)

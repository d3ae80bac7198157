"""Task decoders: model outputs -> overlay primitives in source-frame pixels (may import
runtime.models and the shared vocabulary).

One module per task; add a task by adding a module and a line to TASKS.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from runtime.models.bundle import Manifest
from runtime.models.preprocess import FrameTransform
from runtime.results import TaskResult


class TaskDecoder(Protocol):
    def __call__(self, outputs: dict[str, np.ndarray], transform: FrameTransform) -> TaskResult: ...


TASKS = {
    "face": "runtime.tasks.face:FaceDecoder",
    "detect": "runtime.tasks.detect:DetectionDecoder",
    "raw": "runtime.tasks.raw:RawDecoder",
}


def make_decoder(manifest: Manifest) -> TaskDecoder:
    module_name, class_name = TASKS[manifest.task].split(":")
    return getattr(importlib.import_module(module_name), class_name)(manifest)

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
    "classify": "runtime.tasks.classify:ClassifyDecoder",
    "segment": "runtime.tasks.segment:SegmentDecoder",
    "landmarks": "runtime.tasks.landmarks:LandmarksDecoder",
    "ssd": "runtime.tasks.ssd:SsdDecoder",
}


def _decoder_class(task: str):
    module_name, class_name = TASKS[task].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_decoder(manifest: Manifest) -> TaskDecoder:
    return _decoder_class(manifest.task)(manifest)


def default_roles(task: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Which output plays which role, guessed from the shapes (import); the tasks added with
    their own guess define `default_roles`, raising BundleError when it is ambiguous."""
    return _decoder_class(task).default_roles(shapes)

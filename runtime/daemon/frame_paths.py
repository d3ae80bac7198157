"""How a frame becomes engine feeds and engine outputs become a result, per engine kind.

PythonFrames is the reference: NumPy/OpenCV preprocessing into float32 buffers, the task's
Python decoder. FusedFrames serves a fused engine (runtime/fusion): uint8 frame in, only
geometry on the host, kept boxes out. Both batch the same way: frames whose feeds share a
shape (and, fused, the same small geometry tensors) go into one engine call.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from runtime.fusion.feeds import FusedFeeds
from runtime.fusion.prefix import FRAME, SIZES
from runtime.models.bundle import Manifest
from runtime.models.preprocess import FrameTransform, Preprocessor, SourceColor
from runtime.results import TaskResult
from runtime.tasks import make_decoder
from runtime.tasks.kept import KeptBoxesDecoder

Feeds = dict[str, np.ndarray]


class FramePath(Protocol):
    def feeds(self, image: np.ndarray, color: SourceColor) -> tuple[Feeds, FrameTransform]: ...

    def group_key(self, feeds: Feeds) -> tuple: ...

    def stack(self, many: list[Feeds]) -> Feeds: ...

    def split(self, outputs: dict[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]: ...

    def decode(self, outputs: dict[str, np.ndarray], transform: FrameTransform) -> TaskResult: ...


def _slices(outputs: dict[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
    if count == 1:
        return [outputs]
    return [{name: value[i:i + 1] for name, value in outputs.items()} for i in range(count)]


class PythonFrames:
    def __init__(self, manifest: Manifest, *, buffers: int = 2) -> None:
        self._input = manifest.input.name
        self._preprocess = Preprocessor(manifest.input, manifest.preprocess, ring=buffers)
        self.decode = make_decoder(manifest)

    def feeds(self, image: np.ndarray, color: SourceColor) -> tuple[Feeds, FrameTransform]:
        tensor, transform = self._preprocess(image, color)
        return {self._input: tensor}, transform

    def group_key(self, feeds: Feeds) -> tuple:
        return (feeds[self._input].shape,)

    def stack(self, many: list[Feeds]) -> Feeds:
        return {self._input: np.concatenate([f[self._input] for f in many])}

    def split(self, outputs: dict[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
        return _slices(outputs, count)


class FusedFrames:
    def __init__(self, manifest: Manifest, *, resize_in_graph: bool, decodes: bool) -> None:
        self.feeds = FusedFeeds(manifest, resize_in_graph=resize_in_graph)
        self._kept = KeptBoxesDecoder(manifest) if decodes else None
        self.decode = self._kept or make_decoder(manifest)

    def group_key(self, feeds: Feeds) -> tuple:
        # the frame's shape, and the small geometry tensors by value
        return tuple((name, value.shape) if name == FRAME else (name, value.tobytes())
                     for name, value in sorted(feeds.items()))

    def stack(self, many: list[Feeds]) -> Feeds:
        stacked = dict(many[0])
        stacked[FRAME] = np.concatenate([f[FRAME] for f in many])
        if SIZES in stacked:  # Resize's sizes name the batch dimension too
            stacked[SIZES] = stacked[SIZES].copy()
            stacked[SIZES][0] = len(many)
        return stacked

    def split(self, outputs: dict[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
        if self._kept is None:
            return _slices(outputs, count)
        if count == 1:
            return [outputs]
        return [self._kept.rows(outputs, i) for i in range(count)]


def frame_path(manifest: Manifest, engine, *, buffers: int = 2) -> FramePath:
    """The path for this engine: fused when it carries a FusionSpec (runtime/fusion/open.py)."""
    spec = getattr(engine, "fusion", None)
    if spec is None:
        return PythonFrames(manifest, buffers=buffers)
    return FusedFrames(manifest, resize_in_graph=spec.resize_in_graph, decodes=spec.decodes)

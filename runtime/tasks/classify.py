"""Classification: one score vector -> the top-k labels with their confidence.

Scores may be probabilities (a softmax in the model) or logits: a vector that is not a
probability distribution is put through a softmax here, so confidences are always 0-1.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import BundleError, EngineError
from runtime.models.bundle import Manifest
from runtime.models.preprocess import FrameTransform
from runtime.results import Classification, TaskResult


def probabilities(scores: np.ndarray) -> np.ndarray:
    """`scores` as a probability distribution: as is if it already is one, else softmax."""
    scores = scores.astype(np.float64)
    if scores.min() >= 0.0 and scores.max() <= 1.0 and abs(scores.sum() - 1.0) < 1e-3:
        return scores
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


class ClassifyDecoder:
    def __init__(self, manifest: Manifest) -> None:
        self._name = manifest.outputs["scores"]
        self._labels = manifest.labels
        self._top_k = manifest.thresholds.max_detections
        self._min_score = manifest.thresholds.score

    def __call__(self, outputs: dict[str, np.ndarray], transform: FrameTransform) -> TaskResult:
        scores = np.asarray(outputs[self._name][0]).reshape(-1)
        if scores.size < 2:
            raise EngineError(f"classifier output has {scores.size} value(s), expected one "
                              "score per class (2 or more)")
        probs = probabilities(scores)
        top = np.argsort(-probs, kind="stable")[:self._top_k]
        return TaskResult(classes=tuple(
            Classification(self._label(int(i)), float(probs[i]), int(i))
            for i in top if probs[i] >= self._min_score))

    def _label(self, class_id: int) -> str:
        return self._labels[class_id] if class_id < len(self._labels) else f"class{class_id}"

    @staticmethod
    def default_roles(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
        vectors = [name for name, shape in shapes.items()
                   if int(np.prod(shape[1:])) >= 2 and sum(d > 1 for d in shape[1:]) == 1]
        if len(vectors) != 1:
            raise BundleError("--task classify needs one output of class scores [1, C]; the "
                              f"model has {_listed(shapes)}; name it with --output scores=NAME")
        return {"scores": vectors[0]}


def _listed(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())

"""Does the fused graph compute what the Python reference computes? Checked on every build.

Three checks, on ONNX Runtime's CPU provider (the reference backend, on every machine):
- preprocessing: the prefix alone against the Python Preprocessor, on textured frames of the
  model's own size and of another aspect, in BGR and RGB;
- decoding: the suffix alone against the Python task decoder, on the model's real outputs
  for those frames (and the bundle's sample) and on synthetic outputs dense with candidates;
- composition: the fused model against the model run on the prefix's tensor, then the
  Python decoder.
Any disagreement beyond the stated tolerance raises FusionMismatch, naming the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import onnx
import onnxruntime as ort

from runtime.errors import SightlineError
from runtime.fusion.compose import prefix_only, suffix_only
from runtime.fusion.feeds import FusedFeeds
from runtime.fusion.prefix import gain_bias
from runtime.fusion.suffix import SUFFIXES
from runtime.models.bundle import Bundle, Manifest
from runtime.models.preprocess import FrameTransform, Preprocessor
from runtime.results import TaskResult
from runtime.tasks import make_decoder
from runtime.tasks.boxes import box_iou
from runtime.tasks.kept import KeptBoxesDecoder

# Stated tolerances (docs/performance.md). Host resize: the same uint8 pixels go through the
# same float multiply-add, so only rounding differs. In-graph resize: float bilinear against
# OpenCV's 11-bit fixed-point uint8 one, at most one grey level apart.
HOST_RESIZE_ATOL = 1e-5
GRAPH_RESIZE_LEVELS = 1.0
MIN_IOU = 0.99
SCORE_ATOL = 1e-4


class FusionMismatch(SightlineError):
    """The fused graph disagrees with the Python reference: the Python steps must serve."""


@dataclass(frozen=True)
class ParityReport:
    frames: int
    preprocess_max_error: float
    preprocess_tolerance: float
    boxes_compared: int
    worst_iou: float  # 1.0 when no box was compared
    worst_score_error: float


def check_frames(manifest: Manifest) -> list[tuple[np.ndarray, str]]:
    """Deterministic textured frames: the model's own size and another aspect, BGR and RGB."""
    size = manifest.input.size
    native = (size.width, size.height) if size.mode == "fixed" else (640, 480)
    other = (native[0] * 3 // 2, max(8, native[1] * 5 // 6))
    rng = np.random.default_rng(7)
    frames = []
    for width, height in (native, other):
        noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        frame = cv2.GaussianBlur(noise, (0, 0), 1.5)  # edges and gradients, like a photo
        frames += [(frame, "bgr"), (np.ascontiguousarray(frame[:, :, ::-1]), "rgb")]
    return frames


def _session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feeds: dict) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted}),
                    strict=True))


def check_fusion(bundle: Bundle, fused: onnx.ModelProto, *, resize_in_graph: bool,
                 decode: bool = True, cast_first: bool = False,
                 prefix: onnx.ModelProto | None = None) -> ParityReport:
    """Raise FusionMismatch unless `fused` agrees with the Python steps for this bundle.
    `decode`: whether `fused` ends in the box decoding; `prefix`: the preprocessing graph
    to check (default: the one fusion builds)."""
    manifest = bundle.manifest
    decode = decode and manifest.task in SUFFIXES
    frames = check_frames(manifest)
    feeds_for = FusedFeeds(manifest, resize_in_graph=resize_in_graph)
    python_pre = Preprocessor(manifest.input, manifest.preprocess)
    prefix_session = _session(prefix or prefix_only(manifest, resize_in_graph=resize_in_graph,
                                                    cast_first=cast_first))
    gain, _ = gain_bias(manifest)
    tolerance = (GRAPH_RESIZE_LEVELS * float(np.abs(gain).max()) + HOST_RESIZE_ATOL
                 if resize_in_graph else HOST_RESIZE_ATOL * max(1.0, float(np.abs(gain).max())
                                                                * 255))
    model_session = _session(str(bundle.onnx_path))
    fused_session = _session(fused)
    python_decode = make_decoder(manifest)
    kept = KeptBoxesDecoder(manifest) if decode else None
    suffix_session = _session(suffix_only(onnx.load(str(bundle.onnx_path)), manifest)) \
        if decode else None
    worst_pre, compared, worst_iou, worst_score = 0.0, 0, 1.0, 0.0
    for image, color in frames:
        reference, transform = python_pre(image, color)
        reference = reference.copy()
        feeds, fused_transform = feeds_for(image, color)
        if fused_transform != transform:
            raise FusionMismatch(f"{bundle.name}: preprocessing geometry differs from the Python "
                                 f"reference ({fused_transform} vs {transform})")
        graph = _run(prefix_session, feeds)[manifest.input.name]
        if graph.shape != reference.shape:
            raise FusionMismatch(f"{bundle.name}: in-graph preprocessing made a {graph.shape} "
                                 f"tensor, the Python reference {reference.shape}")
        error = float(np.abs(graph - reference).max())
        worst_pre = max(worst_pre, error)
        if error > tolerance:
            raise FusionMismatch(
                f"{bundle.name}: in-graph preprocessing differs from the Python reference by "
                f"up to {error:.3g} on a {image.shape[1]}x{image.shape[0]} {color} frame "
                f"(tolerance {tolerance:.3g}); serve it with engine.fused = \"off\"")
        # The composition is checked on the prefix's own tensor: the preprocessing is
        # checked above, the decoding below, on the same outputs.
        outputs = _run(model_session, {manifest.input.name: graph})
        fused_outputs = _run(fused_session, feeds)
        if not decode:
            _compare_raw(bundle, outputs, fused_outputs)
            continue
        for expected_outputs, got_outputs in (
                (outputs, fused_outputs),
                (outputs, _run(suffix_session, {manifest.input.name: graph, **outputs}))):
            n, iou, score = _compare_boxes(bundle, python_decode(expected_outputs, transform),
                                           kept(got_outputs, transform))
            compared, worst_iou, worst_score = (compared + n, min(worst_iou, iou),
                                                max(worst_score, score))
    if decode:  # dense candidates in the shapes the model really produced
        synthetic = synthetic_outputs(manifest, outputs, width=graph.shape[-1 if
                                      manifest.input.layout == "NCHW" else -2])
        identity = _identity(graph, manifest)
        got = _run(suffix_session, {manifest.input.name: graph, **synthetic})
        n, iou, score = _compare_boxes(bundle, python_decode(synthetic, identity),
                                       kept(got, identity))
        compared, worst_iou, worst_score = (compared + n, min(worst_iou, iou),
                                            max(worst_score, score))
    return ParityReport(len(frames), worst_pre, tolerance, compared, worst_iou, worst_score)


def _compare_raw(bundle: Bundle, expected: dict, got: dict) -> None:
    for name, value in expected.items():
        other = got.get(name)
        scale = max(1.0, float(np.abs(value).max(initial=0.0)))
        if other is None or other.shape != value.shape or not np.allclose(
                other, value, rtol=0, atol=1e-4 * scale):
            raise FusionMismatch(f"{bundle.name}: the fused model's output {name!r} differs "
                                 "from the model's own on the same preprocessed frame")


def _compare_boxes(bundle: Bundle, expected: TaskResult, got: TaskResult
                   ) -> tuple[int, float, float]:
    """Same boxes (IoU >= MIN_IOU each, none missing or extra), scores within SCORE_ATOL."""
    want, have = list(expected.detections), list(got.detections)
    if len(want) != len(have):
        raise FusionMismatch(f"{bundle.name}: in-graph decoding kept {len(have)} boxes, the "
                             f"Python decoder {len(want)}")
    worst_iou, worst_score = 1.0, 0.0
    if not want:
        return 0, worst_iou, worst_score
    a, b = np.array([d.box for d in want]), np.array([d.box for d in have])
    ious = box_iou(a, b)
    # Two empty boxes (clipped to a line at the frame's edge) agree: box_iou calls them 0.
    ious[_empty(a)[:, None] & _empty(b)[None, :]] = 1.0
    unmatched = list(range(len(have)))
    for i, detection in enumerate(want):
        best = max(unmatched, key=lambda j: ious[i, j])
        iou, score = float(ious[i, best]), abs(detection.score - have[best].score)
        if iou < MIN_IOU or score > SCORE_ATOL or detection.label != have[best].label:
            raise FusionMismatch(
                f"{bundle.name}: in-graph decoding disagrees with the Python decoder (box "
                f"{[round(v, 1) for v in detection.box]} score {detection.score:.4f}: best "
                f"match IoU {iou:.3f}, score off by {score:.2g})")
        unmatched.remove(best)
        worst_iou, worst_score = min(worst_iou, iou), max(worst_score, score)
    return len(want), worst_iou, worst_score


def _empty(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) <= 0


def _identity(tensor: np.ndarray, manifest: Manifest) -> FrameTransform:
    h, w = tensor.shape[2:4] if manifest.input.layout == "NCHW" else tensor.shape[1:3]
    return FrameTransform(1.0, 1.0, 0.0, 0.0, int(w), int(h), int(w), int(h))


def synthetic_outputs(manifest: Manifest, real: dict[str, np.ndarray], *,
                      width: int) -> dict[str, np.ndarray]:
    """Outputs shaped like the model's `real` ones but dense with overlapping candidates,
    so NMS and top-K really run (a textured check frame holds no face)."""
    rng = np.random.default_rng(11)
    roles = manifest.outputs
    if manifest.task == "face":
        shape = real[roles["heatmap"]].shape
        grid = shape[2:]
        def uniform(low, high, channels):
            return rng.uniform(low, high, (shape[0], channels, *grid)).astype(np.float32)
        return {roles["heatmap"]: (rng.random(shape) ** 6).astype(np.float32),
                roles["scale"]: uniform(1.0, 3.5, 2), roles["offset"]: uniform(0, 1, 2),
                roles["landmarks"]: uniform(0, 1, real[roles["landmarks"]].shape[1])}
    batch, rows, anchors = real[roles["predictions"]].shape
    height = width  # boxes spread over a square of the input's width; extent is irrelevant
    centre = np.stack([rng.uniform(0, width, (batch, anchors)),
                       rng.uniform(0, height, (batch, anchors)),
                       rng.uniform(4, width / 3, (batch, anchors)),
                       rng.uniform(4, height / 3, (batch, anchors))], axis=1)
    scores = rng.random((batch, rows - 4, anchors)) ** 4
    return {roles["predictions"]: np.concatenate([centre, scores], axis=1).astype(np.float32)}

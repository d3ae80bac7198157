"""How a precision variant compares with FP32: the report's types, the side-by-side run in
ONNX Runtime on the CPU (per-output error, box agreement, interleaved latency) and the
tables the CLI prints. exporters/quantize.py makes the variants and calls this.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from rich.progress import Progress

from runtime.errors import EngineError, SightlineError
from runtime.models.bundle import Bundle
from runtime.models.preprocess import FrameTransform, Preprocessor
from runtime.results import Detection
from runtime.tasks.boxes import box_iou

Precision = Literal["fp16", "int8"]

REPORT_NAME = "quantization-report.json"
# Tasks whose decoders produce boxes, so a variant can be judged by the boxes it finds.
DETECTOR_TASKS = ("face", "detect")
MATCH_IOU = 0.5
# Distinct preprocessed frames the latency loop cycles through.
LATENCY_FRAMES = 8
WARMUP_RUNS = 3


class QuantizationError(SightlineError):
    """A precision variant cannot be made from these inputs (images, folders, graph)."""


@dataclass(frozen=True)
class OutputError:
    """How far one output of the variant is from FP32, over all evaluation images."""

    name: str
    role: str | None
    max_abs: float
    mean_abs: float
    relative: float | None  # mean |variant - fp32| / mean |fp32|; None when fp32 is all zeros


@dataclass(frozen=True)
class BoxAgreement:
    """Variant detections matched one-to-one to FP32 ones (same class, IoU >= iou_threshold)."""

    iou_threshold: float
    reference: int  # FP32 detections over all evaluation images
    variant: int
    matched: int
    recall: float | None  # matched / reference; None when FP32 found nothing
    precision: float | None  # matched / variant; None when the variant found nothing
    mean_iou: float | None  # over matched pairs


@dataclass(frozen=True)
class Latency:
    """`engine.infer` time of FP32 and the variant, sampled alternately in the same loop."""

    samples: int
    fp32_p50_ms: float
    fp32_p99_ms: float
    variant_p50_ms: float
    variant_p99_ms: float
    ratio_p50: float  # variant / fp32: below 1 is faster


@dataclass(frozen=True)
class ModelFile:
    directory: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ImageSet:
    directory: str
    images: int  # images actually used
    skipped: tuple[str, ...]  # files that looked like images but did not decode


@dataclass(frozen=True)
class QuantizationReport:
    bundle: str
    task: str
    precision: Precision
    method: str
    source: ModelFile
    variant: ModelFile
    calibration: ImageSet | None  # FP16 needs no calibration
    evaluation: ImageSet
    in_sample: bool  # evaluated on the calibration images themselves
    provider: str
    onnxruntime: str
    outputs: tuple[OutputError, ...]
    boxes: BoxAgreement | None  # None for tasks without boxes
    latency: Latency

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class QuantizeResult:
    bundle: Bundle
    report: QuantizationReport


def read_images(paths: Sequence[Path], skipped: list[str]) -> Iterator[np.ndarray]:
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:  # truncated or corrupt despite a valid header
            if path.name not in skipped:
                skipped.append(path.name)
            continue
        yield image


# -- checking against FP32 ------------------------------------------------------------------


class _OutputStats:
    def __init__(self, name: str, role: str | None) -> None:
        self.name, self.role = name, role
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.sum_ref = 0.0
        self.count = 0

    def add(self, reference: np.ndarray, variant: np.ndarray) -> None:
        diff = np.abs(variant.astype(np.float64) - reference)
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        self.sum_abs += float(diff.sum())
        self.sum_ref += float(np.abs(reference).sum(dtype=np.float64))
        self.count += diff.size

    def result(self) -> OutputError:
        return OutputError(self.name, self.role, self.max_abs, self.sum_abs / max(1, self.count),
                           self.sum_abs / self.sum_ref if self.sum_ref > 0 else None)


def match_detections(reference: Sequence[Detection], variant: Sequence[Detection],
                     threshold: float = MATCH_IOU) -> list[float]:
    """IoUs of one-to-one matches, best pairs first, between detections of the same class."""
    if not reference or not variant:
        return []
    iou = box_iou(np.array([d.box for d in reference]), np.array([d.box for d in variant]))
    same_class = (np.array([d.class_id for d in reference])[:, None]
                  == np.array([d.class_id for d in variant])[None, :])
    iou = np.where(same_class, iou, 0.0)
    matched, used_ref, used_var = [], set(), set()
    for flat in np.argsort(-iou, axis=None):
        i, j = divmod(int(flat), iou.shape[1])
        if iou[i, j] < threshold:
            break
        if i not in used_ref and j not in used_var:
            used_ref.add(i)
            used_var.add(j)
            matched.append(float(iou[i, j]))
    return matched


def compare(bundle: Bundle, variant_path: Path, images: Sequence[Path], skipped: list[str],
            runs: int, progress: Progress) -> tuple[tuple[OutputError, ...], BoxAgreement | None,
                                               Latency, str]:
    """Run FP32 and the variant side by side in ONNX Runtime on the CPU, as the daemon would."""
    from runtime.engines import EngineSettings, open_engine
    from runtime.tasks import make_decoder

    manifest = bundle.manifest
    settings = EngineSettings(providers=("CPUExecutionProvider",))
    reference = open_engine(bundle.onnx_path, settings)
    try:
        variant = open_engine(variant_path, settings)
    except EngineError as exc:
        reference.close()
        raise QuantizationError(f"ONNX Runtime cannot run the variant: {exc}") from None
    try:
        roles = {name: role for role, name in manifest.outputs.items()}
        stats = {o.name: _OutputStats(o.name, roles.get(o.name)) for o in reference.outputs}
        decoder = make_decoder(manifest) if manifest.task in DETECTOR_TASKS else None
        pre = Preprocessor(manifest.input, manifest.preprocess)
        feeds: list[dict[str, np.ndarray]] = []
        counts, ious = [0, 0], []
        task = progress.add_task("checking against fp32", total=len(images))
        for image in read_images(images, skipped):
            tensor, transform = pre(image, "bgr")
            feed = {manifest.input.name: tensor}
            expected, actual = reference.infer(feed), variant.infer(feed)
            for name, value in actual.items():
                if not np.all(np.isfinite(value)):
                    raise QuantizationError(
                        f"the variant's output {name!r} is not finite on a "
                        f"{transform.input_width}x{transform.input_height} input; an op "
                        "overflows in reduced precision")
                stats[name].add(expected[name], value)
            if decoder is not None:
                ious += _agreement(decoder, expected, actual, transform, counts)
            if len(feeds) < LATENCY_FRAMES:
                feeds.append({manifest.input.name: tensor.copy()})
            progress.advance(task)
        if not feeds:
            raise QuantizationError("none of the evaluation images could be decoded")
        boxes = None
        if decoder is not None:
            boxes = BoxAgreement(
                MATCH_IOU, counts[0], counts[1], len(ious),
                len(ious) / counts[0] if counts[0] else None,
                len(ious) / counts[1] if counts[1] else None,
                float(np.mean(ious)) if ious else None)
        latency = _latency(reference, variant, feeds, runs, progress)
        return (tuple(s.result() for s in stats.values()), boxes, latency, variant.provider)
    finally:
        reference.close()
        variant.close()


def _agreement(decoder, expected: dict[str, np.ndarray], actual: dict[str, np.ndarray],
               transform: FrameTransform, counts: list[int]) -> list[float]:
    found_reference = decoder(expected, transform).detections
    found_variant = decoder(actual, transform).detections
    counts[0] += len(found_reference)
    counts[1] += len(found_variant)
    return match_detections(found_reference, found_variant)


def _latency(reference, variant, feeds: list[dict[str, np.ndarray]], runs: int,
             progress: Progress) -> Latency:
    for engine in (reference, variant):
        for _ in range(WARMUP_RUNS):
            engine.infer(feeds[0])
    times: tuple[list[float], list[float]] = ([], [])
    task = progress.add_task("timing fp32 vs variant", total=runs)
    for i in range(runs):
        feed = feeds[i % len(feeds)]
        # Alternate which model goes first, so neither always runs on caches the other warmed.
        order = ((0, reference), (1, variant)) if i % 2 == 0 else ((1, variant), (0, reference))
        for slot, engine in order:
            start = time.perf_counter()
            engine.infer(feed)
            times[slot].append((time.perf_counter() - start) * 1000.0)
        progress.advance(task)
    fp32, var = (np.asarray(t) for t in times)
    return Latency(runs, float(np.median(fp32)), float(np.percentile(fp32, 99)),
                   float(np.median(var)), float(np.percentile(var, 99)),
                   float(np.median(var) / np.median(fp32)))


# -- presentation ---------------------------------------------------------------------------


def report_tables(report: QuantizationReport) -> list:
    """rich Tables for the CLI: per-output error, then boxes, speed and size."""
    from rich.table import Table

    images = f"{report.evaluation.images} " + ("calibration images" if report.in_sample
                                               else "evaluation images")
    errors = Table(title=f"{report.bundle}: {report.precision} vs fp32 outputs on {images}",
                   title_justify="left")
    errors.add_column("output")
    errors.add_column("role")
    for column in ("max |err|", "mean |err|", "relative"):
        errors.add_column(column, justify="right")
    for out in report.outputs:
        relative = f"{out.relative:.2%}" if out.relative is not None else "n/a"
        errors.add_row(out.name, out.role or "", f"{out.max_abs:.4g}", f"{out.mean_abs:.4g}",
                       relative)

    lat = report.latency
    summary = Table(title=f"{lat.samples} interleaved runs each on {report.provider}",
                    title_justify="left")
    summary.add_column("")
    summary.add_column("fp32", justify="right")
    summary.add_column(report.precision, justify="right")
    summary.add_column(f"{report.precision} / fp32", justify="right")
    if report.boxes is not None:
        b = report.boxes
        summary.add_row("detections", str(b.reference), str(b.variant),
                        f"{b.matched} matched (IoU >= {b.iou_threshold})")
        summary.add_row("recall / precision", "", "", f"{fmt(b.recall)} / {fmt(b.precision)}")
        summary.add_row("mean IoU of matches", "", "", fmt(b.mean_iou))
    summary.add_row("latency p50 ms", f"{lat.fp32_p50_ms:.2f}", f"{lat.variant_p50_ms:.2f}",
                    f"{lat.ratio_p50:.2f}x")
    summary.add_row("latency p99 ms", f"{lat.fp32_p99_ms:.2f}", f"{lat.variant_p99_ms:.2f}", "")
    summary.add_row("model MB", f"{report.source.bytes / 1e6:.2f}",
                    f"{report.variant.bytes / 1e6:.2f}",
                    f"{report.variant.bytes / report.source.bytes:.2f}x")
    return [errors, summary]


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"

"""Precision variants of a bundle: FP16 (mixed precision), INT8 (explicit Q/DQ), checked vs FP32.

TensorRT 11 has no precision builder flags or INT8 calibrators, so reduced precision has to
be in the ONNX graph itself (casts, QuantizeLinear/DequantizeLinear), which TensorRT 10 and
11 build as a strongly typed network and ONNX Runtime serves as is. This module writes such
variants as new bundle directories and measures, with ONNX Runtime on this machine, what
each one costs in accuracy and gains in speed. It never modifies the source bundle.

Both conversions use ONNX Runtime's own tooling (`onnxruntime.transformers.float16`,
`onnxruntime.quantization`), which ships inside the onnxruntime wheel we already depend on
and runs on a CPU-only machine. NVIDIA ModelOpt was the alternative for INT8: its Q/DQ
placement is tuned for TensorRT (only the inputs of weighted layers and of the residual
adds TensorRT fuses), but it is a large, CUDA-oriented dependency, while ORT's quantiser
is installed wherever Sightline is and writes the same standard Q/DQ operators that
TensorRT parses.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import onnx
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from exporters.quantize_check import (  # noqa: F401 (the CLI and tests import them here)
    DETECTOR_TASKS,
    REPORT_NAME,
    BoxAgreement,
    ImageSet,
    Latency,
    ModelFile,
    OutputError,
    Precision,
    QuantizationError,
    QuantizationReport,
    QuantizeResult,
    compare,
    fmt,
    match_detections,
    read_images,
    report_tables,
)
from runtime.errors import BundleError, describe_validation
from runtime.models.bundle import MANIFEST_NAME, Bundle, Manifest, read_manifest, write_bundle
from runtime.models.preprocess import Preprocessor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Per-channel QuantizeLinear/DequantizeLinear (the `axis` attribute) needs opset 13.
QDQ_MIN_OPSET = 13
# Op types kept in float32 in the FP16 variant, on top of ONNX Runtime's default list (ML
# ops, TopK, NonMaxSuppression, Range, CumSum ...). Exp overflows fp16 above x = 11.1, Log
# and Pow lose small values below fp16's 6e-5, and Softmax and the summing reductions
# accumulate past its 11-bit mantissa. Resize stays in fp16: it interpolates (a convex
# combination, so it cannot overflow), and ONNX Runtime's CPU provider runs it in fp16.
FP16_UNSAFE_OPS = (
    "Exp", "Log", "Pow", "Softmax", "LogSoftmax",
    "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd",
)


# -- inputs ---------------------------------------------------------------------------------


def find_images(directory: Path, option: str = "--calib") -> list[Path]:
    """Image files directly inside `directory` whose format OpenCV recognises, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise QuantizationError(f"{option} {directory}: no such folder")
    candidates = sorted(p for p in directory.iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    readable = [p for p in candidates if cv2.haveImageReader(str(p))]
    if not readable:
        found = f"{len(candidates)} files named like images, none readable" if candidates else \
            "no .jpg, .jpeg or .png files"
        raise QuantizationError(
            f"{option} {directory} holds no readable images ({found}); put frames like the ones "
            "the model will see there, as .jpg or .png")
    return readable


def _check_source(bundle: Bundle, model: onnx.ModelProto) -> None:
    manifest = bundle.manifest
    if manifest.precision != "fp32":
        origin = manifest.source.get("variant_of", "an fp32 bundle")
        raise BundleError(
            f"{bundle.directory} is already an {manifest.precision} variant (of {origin}); "
            "make variants from the fp32 bundle")
    ops = {node.op_type for node in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}:
        raise BundleError(f"{bundle.directory}: the graph is already quantised (it holds Q/DQ "
                          "nodes) although its manifest says fp32; quantise the original model")
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        raise BundleError(f"{bundle.directory}: the graph already holds float16 weights although "
                          "its manifest says fp32; convert the original float32 model")
    image = next((i for i in model.graph.input if i.name == manifest.input.name), None)
    if image is None or image.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise BundleError(f"{bundle.directory}: input {manifest.input.name!r} is not a float32 "
                          "graph input; only float32 models can be converted")


def _check_out_dir(out_dir: Path, bundle: Bundle) -> None:
    # write_bundle replaces whatever is at out_dir, so only an earlier variant of this same
    # model may be there: never the source itself, an fp32 bundle, or a user's own folder.
    if out_dir.resolve() == bundle.directory.resolve():
        raise QuantizationError(f"--out {out_dir} is the source bundle itself; "
                                "choose another folder")
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    reason = "it is not a bundle"
    if (out_dir / MANIFEST_NAME).is_file():
        try:
            existing = read_manifest(out_dir)
        except BundleError:
            existing = None
        if existing is not None and existing.name == bundle.name and existing.precision != "fp32":
            return
        reason = "it holds another bundle"
    raise QuantizationError(f"--out {out_dir} already exists and {reason}; choose another folder "
                            "or remove it")


# -- conversions ----------------------------------------------------------------------------


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Mixed precision: float16 weights and activations, float32 inputs, outputs and unsafe ops."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_UNSAFE_OPS])
    # The converter appends its input casts at the end of the node list; the ONNX checker
    # (and some parsers) require nodes in topological order.
    _sort_topologically(converted.graph)
    return converted


def _sort_topologically(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise QuantizationError("the converted graph has a cycle or a dangling input "
                                    f"({waiting[0].op_type} node {waiting[0].name!r})")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


# 7-bit weights. ONNX Runtime's int8 convolution on x86 CPUs without VNNI (AVX2 only, as the
# development machine's AMD EPYC) multiplies with vpmaddubsw, whose 16-bit sums saturate with
# full-range weights: measured on the one-conv test model, relative output error 46% with
# 8-bit weights against 1.2% with 7. A variant may be served by ONNX Runtime on any CPU (the
# fallback where TensorRT is absent), so every variant is made safe for those; TensorRT reads
# the same Q/DQ scales, at one bit of weight resolution.
REDUCE_RANGE = True


def to_int8(bundle: Bundle, model: onnx.ModelProto, images: Sequence[Path], skipped: list[str],
            workdir: Path, progress: Progress) -> onnx.ModelProto:
    """Explicit INT8: symmetric Q/DQ, per-channel weights, activation ranges from `images`."""
    from onnx import version_converter
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < QDQ_MIN_OPSET:
        try:
            model = version_converter.convert_version(model, QDQ_MIN_OPSET)
        except Exception as exc:  # the converter raises plain RuntimeErrors per op
            raise QuantizationError(f"cannot raise the model's opset {opset} to {QDQ_MIN_OPSET} "
                                    f"(needed for per-channel Q/DQ): {exc}") from None
    source, prepared, quantized = (workdir / n for n in ("source.onnx", "pre.onnx", "int8.onnx"))
    onnx.save(model, source)
    # Folds BatchNorm into Conv and constants away so ranges are measured on the graph that
    # gets quantised. Symbolic shape inference is skipped: it needs sympy (not a dependency
    # of ours) and helps transformer graphs; ONNX's own shape inference covers image models.
    try:
        quant_pre_process(source, prepared, skip_symbolic_shape=True)
    except Exception as exc:
        raise QuantizationError(f"ONNX Runtime cannot prepare the model for quantisation: "
                                f"{exc}") from exc
    # The nodes that produce graph outputs stay in float (ModelOpt does the same): the
    # decoder then reads full-precision scores and box terms. On CenterFace this halved the
    # heatmap's error for the price of three small head convolutions and a Sigmoid. ORT's
    # exclusion list works by node name, which exported graphs often leave empty.
    prepared_model = onnx.load(prepared)
    for index, node in enumerate(prepared_model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    graph_outputs = {o.name for o in prepared_model.graph.output}
    output_nodes = [n.name for n in prepared_model.graph.node if set(n.output) & graph_outputs]
    onnx.save(prepared_model, prepared)

    pre = Preprocessor(bundle.manifest.input, bundle.manifest.preprocess)
    input_name = bundle.manifest.input.name
    calibrate_task = progress.add_task("calibrating", total=len(images))

    class Frames(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def rewind(self) -> None:
            self._images = read_images(images, skipped)
            self.fed = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self._images, None)
            if image is None:
                return None
            tensor, _ = pre(image, "bgr")
            self.fed += 1
            progress.advance(calibrate_task)
            return {input_name: tensor.copy()}  # the preprocessor reuses its buffers

    frames = Frames()
    # TensorRT accepts only zero-point-0 INT8, hence symmetric activations and weights.
    # MinMax calibration: a detector's informative activations are its rare peaks (a face's
    # heatmap response), which percentile or entropy clipping would cut to buy resolution
    # for the background, and a handful of calibration frames gives no clipping statistics
    # worth trusting. Measured on CenterFace (24 frames, 640x480, ORT 1.32): Entropy gave
    # ranges identical to MinMax; Percentile matched boxes slightly better (mean IoU 0.95
    # vs 0.93) but peaked at 9.7 GB of memory (its calibrator keeps every activation of
    # every frame) and took 3.5x as long, a trap for a real calibration set. ORT's
    # CalibMaxIntermediateOutputs, which would bound that, drops each full chunk without
    # merging it into the ranges, so it is not used either.
    try:
        quantize_static(
            prepared, quantized, frames,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
            nodes_to_exclude=output_nodes, reduce_range=REDUCE_RANGE,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
            },
        )
    except Exception as exc:
        if frames.fed == 0:
            raise QuantizationError(f"none of the {len(images)} calibration images could be "
                                    f"decoded ({', '.join(skipped[:3])} ...)") from None
        raise QuantizationError(f"ONNX Runtime could not quantise the model: {exc}") from exc
    return onnx.load(quantized)


# -- the whole step -------------------------------------------------------------------------


def quantize_bundle(bundle: Bundle, precision: Precision, calib_dir: Path, out_dir: Path, *,
                    eval_dir: Path | None = None, runs: int = 50,
                    min_recall: float = 0.9, console=None) -> QuantizeResult:
    """Write the `precision` variant of an fp32 bundle to `out_dir`, with its report.

    `calib_dir` holds INT8 calibration frames, and is where both variants are checked
    unless `eval_dir` is given. `console` (a rich Console) shows progress; None is silent.
    A detector variant that finds fewer than `min_recall` of FP32's detections is refused
    and not written: `serve` would otherwise prefer it on devices whose profile asks for it.
    """
    import onnxruntime

    if precision not in ("fp16", "int8"):
        raise QuantizationError(f"precision must be fp16 or int8, not {precision!r}")
    if runs < 1:
        raise QuantizationError("runs must be at least 1")
    out_dir = Path(out_dir)
    model = onnx.load(str(bundle.onnx_path))
    _check_source(bundle, model)
    _check_out_dir(out_dir, bundle)
    calib_images = find_images(calib_dir, "--calib")
    eval_images = find_images(eval_dir, "--eval") if eval_dir is not None else calib_images
    calib_skipped: list[str] = []
    eval_skipped: list[str] = []

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        console=console, transient=True, disable=console is None)
    with progress, tempfile.TemporaryDirectory(prefix="sightline-quantize-") as tmp:
        workdir = Path(tmp)
        if precision == "fp16":
            converted = to_fp16(model)
            method = ("float16 weights and activations, float32 I/O; kept in float32: "
                      + ", ".join(FP16_UNSAFE_OPS) + " and ONNX Runtime's default block list")
        else:
            converted = to_int8(bundle, model, calib_images, calib_skipped, workdir, progress)
            method = ("QDQ int8, symmetric activations and weights, per-channel weights, "
                      "output-producing nodes in float, minmax calibration "
                      "(onnxruntime.quantization)")
        try:
            onnx.checker.check_model(converted, full_check=True)
        except Exception as exc:
            raise QuantizationError(
                f"the {precision} graph fails the ONNX checker: {exc}") from None
        variant_bytes = converted.SerializeToString()
        variant_path = workdir / "variant.onnx"
        variant_path.write_bytes(variant_bytes)
        outputs, boxes, latency, provider = compare(bundle, variant_path, eval_images,
                                                    eval_skipped, runs, progress)
    if boxes is not None and boxes.recall is not None and boxes.recall < min_recall:
        raise QuantizationError(
            f"the {precision} variant keeps only {boxes.recall:.0%} of FP32's detections "
            f"(minimum {min_recall:.0%}; precision {fmt(boxes.precision)}, mean IoU "
            f"{fmt(boxes.mean_iou)}); nothing was written. Calibrate on more varied images "
            "(--calib) or accept it with --min-recall 0")

    variant = _write_variant(bundle, precision, method, variant_bytes, out_dir)
    source_sha = bundle.manifest.onnx.sha256
    report = QuantizationReport(
        bundle=f"{bundle.name}@{bundle.version}",
        task=bundle.manifest.task,
        precision=precision,
        method=method,
        source=ModelFile(str(bundle.directory), source_sha, bundle.onnx_path.stat().st_size),
        variant=ModelFile(str(variant.directory), variant.manifest.onnx.sha256, len(variant_bytes)),
        calibration=(ImageSet(str(calib_dir), len(calib_images) - len(calib_skipped),
                              tuple(calib_skipped)) if precision == "int8" else None),
        evaluation=ImageSet(str(eval_dir or calib_dir), len(eval_images) - len(eval_skipped),
                            tuple(eval_skipped)),
        in_sample=eval_dir is None,
        provider=provider,
        onnxruntime=onnxruntime.__version__,
        outputs=outputs,
        boxes=boxes,
        latency=latency,
    )
    (variant.directory / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return QuantizeResult(variant, report)


def _write_variant(bundle: Bundle, precision: Precision, method: str, onnx_bytes: bytes,
                   out_dir: Path) -> Bundle:
    import hashlib

    manifest = bundle.manifest
    try:
        variant_manifest = Manifest.model_validate({
            **manifest.model_dump(),
            "precision": precision,
            "onnx": {"file": manifest.onnx.file, "sha256": hashlib.sha256(onnx_bytes).hexdigest()},
            "source": {
                **manifest.source,
                "variant_of": f"{manifest.name}@{manifest.version}",
                "variant_of_sha256": manifest.onnx.sha256,
                "quantization": method,
            },
        })
    except ValidationError as exc:
        raise BundleError("cannot make the variant's manifest: "
                          f"{describe_validation(exc, model=Manifest)}") from None
    return write_bundle(out_dir, variant_manifest, onnx_bytes)

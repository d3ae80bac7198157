"""Turn a third-party ONNX file into a verified bundle, repairing what exporters get wrong.

Real exported models carry defects: batch and spatial dims frozen at export size,
initializers listed as graph inputs (IR < 4 habit), missing shape information. Each
repair is reported; the result must pass the ONNX checker and run in ONNX Runtime.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference
from pydantic import ValidationError

from exporters.import_checks import check_task_fits, fit_color, resolve_layout
from runtime.errors import BundleError, describe_validation
from runtime.models.bundle import (
    Anchors,
    Bundle,
    InputSpec,
    Manifest,
    OnnxFile,
    Preprocess,
    SizePolicy,
    Task,
    Thresholds,
    write_bundle,
)

# Tasks whose decoder guesses its output roles itself (runtime.tasks.default_roles).
TASK_ROLES = ("classify", "segment", "landmarks", "ssd")

# Per-task defaults a user would otherwise have to look up for the common model families.
TASK_DEFAULTS: dict[str, dict] = {
    # CenterFace: RGB in 0..255, no normalisation, any size that is a multiple of 32.
    "face": dict(
        preprocess=Preprocess(color="rgb", scale=1.0, resize="stretch"),
        thresholds=Thresholds(score=0.5, iou=0.3),
        labels=("face",),
    ),
    # YOLOv8: RGB / 255, letterboxed with grey 114.
    "detect": dict(
        preprocess=Preprocess(color="rgb", scale=1.0 / 255.0, resize="letterbox"),
        thresholds=Thresholds(score=0.25, iou=0.45),
        labels=(),
    ),
    "raw": dict(preprocess=Preprocess(), thresholds=Thresholds(), labels=()),
    # Classifiers: RGB / 255, stretched (a crop is the whole object); top 5, any confidence.
    "classify": dict(
        preprocess=Preprocess(color="rgb", scale=1.0 / 255.0, resize="stretch"),
        thresholds=Thresholds(score=0.0, max_detections=5),
        labels=(),
    ),
    # Segmenters (MediaPipe selfie: RGB in [0, 1]); score: the mask's foreground threshold.
    "segment": dict(
        preprocess=Preprocess(color="rgb", scale=1.0 / 255.0, resize="letterbox", pad_value=0),
        thresholds=Thresholds(score=0.5),
        labels=(),
    ),
    # Single-object landmark models (MediaPipe hand: RGB in [0, 1], one object per crop).
    "landmarks": dict(
        preprocess=Preprocess(color="rgb", scale=1.0 / 255.0, resize="stretch"),
        thresholds=Thresholds(score=0.5),
        labels=(),
    ),
    # SSD anchors with keypoints (MediaPipe palm/face detectors), letterboxed with black.
    "ssd": dict(
        preprocess=Preprocess(color="rgb", scale=1.0 / 255.0, resize="letterbox", pad_value=0),
        thresholds=Thresholds(score=0.5, iou=0.3),
        labels=("object",),
    ),
}


@dataclass
class ImportOptions:
    task: Task
    name: str
    version: str = "1"
    dynamic: bool = True
    size: SizePolicy | None = None
    layout: str | None = None  # None: what the input's shape shows (NHWC for .tflite)
    preprocess: Preprocess | None = None
    thresholds: Thresholds | None = None
    labels: Sequence[str] | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    # Task raw: (..., H, W) outputs the daemon resizes back to the source frame.
    resize_to_source: tuple[str, ...] = ()
    # Provenance for the manifest; default: the source file's name and sha256.
    source: dict[str, str] | None = None
    # Task landmarks: point pairs to draw as lines (the overlay's skeleton).
    skeleton: tuple[tuple[int, int], ...] = ()
    # Task ssd: the anchor grid; default MediaPipe's, keypoints counted from the output.
    anchors: Anchors | None = None


@dataclass
class ImportResult:
    bundle: Bundle
    repairs: list[str]


@dataclass
class PreparedImport:
    """A repaired, checked and test-run model with its manifest, not yet written anywhere."""

    manifest: Manifest
    model_bytes: bytes
    repairs: list[str]


def load_model(path: Path) -> onnx.ModelProto:
    """The ONNX model in `path`; a .tflite file is translated first (exporters/tflite)."""
    if path.suffix.lower() == ".tflite" and path.is_file():
        from exporters.tflite import convert_tflite

        return convert_tflite(path)
    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise BundleError(f"{path}: no such file") from None
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise BundleError(f"{path} is not a readable ONNX model: {_one_line(exc)}") from None


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {i.name for i in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(real_inputs) != 1:
        names = ", ".join(i.name for i in real_inputs) or "none"
        raise BundleError(f"expected exactly one image input, the model has: {names}")
    tensor_input = real_inputs[0]
    if len(tensor_input.type.tensor_type.shape.dim) != 4:
        raise BundleError(
            f"input {tensor_input.name!r} is not 4-D (batch, channels, height, width); "
            "only image models can be imported"
        )
    return tensor_input


def drop_initializer_inputs(model: onnx.ModelProto) -> list[str]:
    # Old exporters list every weight as a graph input; ORT then treats weights as
    # overridable feeds and refuses constant folding. IR >= 4 lets them be initializers only.
    initializers = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in initializers]
    dropped = len(model.graph.input) - len(keep)
    if not dropped:
        return []
    del model.graph.input[:]
    model.graph.input.extend(keep)
    repairs = [f"removed {dropped} initializers listed as graph inputs"]
    if model.ir_version < 4:
        model.ir_version = 4
        repairs.append("raised IR version to 4 (needed for initializers that are not inputs)")
    return repairs


def drop_unused_initializers(model: onnx.ModelProto) -> list[str]:
    # PyTorch exports carry BatchNorm's num_batches_tracked counters no node reads.
    used = _node_inputs(model.graph)
    used |= {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    dropped = len(model.graph.initializer) - len(keep)
    if not dropped:
        return []
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return [f"removed {dropped} initializers no node uses"]


def _node_inputs(graph: onnx.GraphProto) -> set[str]:
    # If/Loop/Scan bodies read outer-scope tensors by name without listing them as inputs
    # of the node that owns the body, so subgraphs are searched too.
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
            for subgraph in subgraphs:
                names |= _node_inputs(subgraph)
    return names


def make_dims_dynamic(model: onnx.ModelProto, layout: str, spatial: bool,
                      keep: tuple[str, ...] = ()) -> list[str]:
    """Free the batch dim always (frames come one at a time), spatial dims when asked, but
    not those named in `keep` ("height"/"width": the axis a size policy fixes)."""
    tensor_input = image_input(model)
    dims = tensor_input.type.tensor_type.shape.dim
    axes = {"batch": 0}
    if spatial:
        axes.update({"height": 2, "width": 3} if layout == "NCHW" else {"height": 1, "width": 2})
    for name in keep:
        axes.pop(name, None)
    frozen = [f"{name}={dims[axis].dim_value}" for name, axis in axes.items()
              if dims[axis].HasField("dim_value")]
    for name, axis in axes.items():
        dims[axis].ClearField("dim_value")
        dims[axis].dim_param = name
    # Output and intermediate shapes were computed for the frozen size: drop them and let
    # shape inference recompute what it can.
    for output in model.graph.output:
        for dim in output.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dim.ClearField("dim_value")
    del model.graph.value_info[:]
    return [f"made input dims dynamic (were {', '.join(frozen)})"] if frozen else []


def infer_shapes(model: onnx.ModelProto, known: int) -> tuple[onnx.ModelProto, list[str]]:
    """Run ONNX shape inference; `known` is how many tensors had shapes in the source file."""
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise BundleError(f"shape inference failed: {_one_line(exc)}") from None
    added = len(inferred.graph.value_info) - known
    return inferred, ([f"added shape information for {added} tensors"] if added > 0 else [])


def check_model(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise BundleError(f"the ONNX checker rejects the model: {_one_line(exc)}") from None


def smoke_sizes(size: SizePolicy) -> list[tuple[int, int]]:
    """Input sizes to prove the model runs at: the fixed size, or two different dynamic ones."""
    if size.mode == "fixed":
        return [(size.height, size.width)]  # type: ignore[list-item]
    m = size.multiple_of
    if size.height is not None:
        return [(size.height, m * 2), (size.height, m * 3)]
    if size.width is not None:
        return [(m * 2, size.width), (m * 3, size.width)]
    return [(m * 2, m * 3), (m * 3, m * 2)]


def _fixed_axes(size: SizePolicy) -> tuple[str, ...]:
    if size.mode == "fixed":
        return ()
    return tuple(axis for axis in ("height", "width") if getattr(size, axis) is not None)


def smoke_run(model_bytes: bytes, input_name: str, layout: str, channels: int,
              sizes: list[tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """Run the model in a real ONNX Runtime session; return output shapes of the last run."""
    return {name: value.shape for name, value in
            smoke_outputs(model_bytes, input_name, layout, channels, sizes).items()}


def smoke_outputs(model_bytes: bytes, input_name: str, layout: str, channels: int,
                  sizes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Run the model in a real ONNX Runtime session; return the outputs of the last run."""
    import onnxruntime as ort

    # Quiet from the start: an import error must be one line, not ORT warnings before it.
    ort.set_default_logger_severity(3)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BundleError(f"ONNX Runtime cannot load the model: {_one_line(exc)}") from None
    shapes: dict[str, np.ndarray] = {}
    for height, width in sizes:
        shape = (1, channels, height, width) if layout == "NCHW" else (1, height, width, channels)
        feed = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
        try:
            outputs = session.run(None, {input_name: feed})
        except Exception as exc:
            raise BundleError(
                f"ONNX Runtime fails on a {width}x{height} input: {_one_line(exc)}. If the "
                "model only works at its export size, import it with --fixed-size (or "
                "--fixed-height/--fixed-width for one axis)"
            ) from None
        for meta, value in zip(session.get_outputs(), outputs, strict=True):
            if not np.all(np.isfinite(value)):
                raise BundleError(f"output {meta.name!r} is not finite on a {width}x{height} input")
            shapes[meta.name] = value
    return shapes


def default_output_roles(task: Task, output_shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    names = list(output_shapes)
    if task == "raw":
        return {}
    if task == "detect":
        if len(names) != 1:
            raise BundleError(f"a detect model needs one output [N, 4+C, anchors]; it has {names}")
        shape = output_shapes[names[0]]
        if len(shape) != 3 or shape[1] < 5:
            raise BundleError(f"--task detect needs an output [N, 4+C, anchors]; this model's "
                              f"is {list(shape)} (a classifier? use --task classify)")
        return {"predictions": names[0]}
    if task in TASK_ROLES:
        from runtime.tasks import default_roles

        return default_roles(task, output_shapes)
    # CenterFace: heatmap (1 ch), scale (2), offset (2), landmarks (10), in that graph order.
    by_channels: dict[int, list[str]] = {}
    for name, shape in output_shapes.items():
        by_channels.setdefault(shape[1] if len(shape) == 4 else -1, []).append(name)
    if [len(by_channels.get(c, [])) for c in (1, 2, 10)] != [1, 2, 1]:
        raise BundleError(
            "cannot tell which face output is which (expected CenterFace's 1/2/2/10-channel "
            f"maps, got {output_shapes}); name them with --output heatmap=NAME ..."
        )
    return {
        "heatmap": by_channels[1][0],
        "scale": by_channels[2][0],
        "offset": by_channels[2][1],
        "landmarks": by_channels[10][0],
    }


def import_onnx(source: Path, options: ImportOptions, out_dir: Path, *,
                replace: bool = True) -> ImportResult:
    """Prepare and write the bundle; `replace=False` refuses a bundle already at `out_dir`."""
    prepared = prepare_import(source, options)
    return ImportResult(write_bundle(out_dir, prepared.manifest, prepared.model_bytes,
                                     replace=replace), prepared.repairs)


def prepare_import(source: Path, options: ImportOptions) -> PreparedImport:
    """Everything `import_onnx` does short of writing: callers can verify before they commit."""
    from_tflite = source.suffix.lower() == ".tflite"
    model = load_model(source)
    known_shapes = len(model.graph.value_info)
    repairs = drop_initializer_inputs(model) + drop_unused_initializers(model)
    tensor_input = image_input(model)
    dims = tensor_input.type.tensor_type.shape.dim
    layout = resolve_layout([d.dim_value for d in dims], options.layout, from_tflite=from_tflite)
    channel_axis = 1 if layout == "NCHW" else 3
    channels = dims[channel_axis].dim_value or 3
    # A translated .tflite graph has its shapes baked in: it keeps its fixed input size.
    size = options.size or _default_size(options.dynamic and not from_tflite, dims, layout)
    _check_fixed_size(size, dims, layout)
    repairs += make_dims_dynamic(model, layout, spatial=size.mode == "dynamic",
                                 keep=_fixed_axes(size))
    model, shape_repairs = infer_shapes(model, known_shapes)
    repairs += shape_repairs
    check_model(model)

    defaults = TASK_DEFAULTS[options.task]
    preprocess = fit_color(options.preprocess or defaults["preprocess"], channels)
    model_bytes = model.SerializeToString()
    smoke = smoke_outputs(model_bytes, tensor_input.name, layout, channels, smoke_sizes(size))
    output_shapes = {name: value.shape for name, value in smoke.items()}
    outputs = options.outputs or default_output_roles(options.task, output_shapes)
    unknown = set(outputs.values()) - set(output_shapes)
    if unknown:
        raise BundleError(f"--output names {sorted(unknown)} are not outputs of the model "
                          f"(it has {sorted(output_shapes)})")
    _check_resize_to_source(options, output_shapes, smoke_sizes(size)[-1])
    labels = tuple(options.labels) if options.labels is not None else defaults["labels"]
    if options.task == "detect" and not labels:
        classes = output_shapes[outputs["predictions"]][1] - 4
        labels = tuple(f"class{i}" for i in range(classes))
    try:
        manifest = Manifest(
            name=options.name,
            version=options.version,
            task=options.task,
            input=InputSpec(name=tensor_input.name, layout=layout, size=size),
            preprocess=preprocess,
            outputs=outputs,
            labels=labels,
            thresholds=options.thresholds or defaults["thresholds"],
            onnx=OnnxFile(file="model.onnx", sha256=hashlib.sha256(model_bytes).hexdigest()),
            source=options.source if options.source is not None else _provenance(source),
            resize_to_source=options.resize_to_source,
            skeleton=options.skeleton,
            anchors=_anchors(options, output_shapes, outputs),
        )
    except ValidationError as exc:  # e.g. a name taken from a file stem with spaces in it
        raise BundleError("cannot make a bundle manifest from these options: "
                          f"{describe_validation(exc, model=Manifest)}") from None
    check_task_fits(manifest, smoke, smoke_sizes(size)[-1])
    return PreparedImport(manifest, model_bytes, repairs)


def _anchors(options: ImportOptions, shapes: dict[str, tuple[int, ...]],
             outputs: dict[str, str]) -> Anchors | None:
    if options.task != "ssd":
        return None
    if options.anchors is not None:
        return options.anchors
    return Anchors(keypoints=max(0, (shapes[outputs["boxes"]][-1] - 4) // 2))


def _provenance(source: Path) -> dict[str, str]:
    record = {"file": source.name, "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    if source.suffix.lower() == ".tflite":
        record["format"] = "tflite"  # translated by exporters/tflite, opset 17
    return record


def _check_resize_to_source(options: ImportOptions, output_shapes: dict[str, tuple[int, ...]],
                            last_size: tuple[int, int]) -> None:
    """Only spatial maps can be resized back: outputs whose last two dims follow the input's
    height and width at the same stride (checked on the smoke run's non-square input)."""
    unknown = sorted(set(options.resize_to_source) - set(output_shapes))
    if unknown:
        raise BundleError(f"--resize-to-source names {unknown} are not outputs of the model "
                          f"(it has {sorted(output_shapes)})")
    height, width = last_size
    for name in options.resize_to_source:
        shape = output_shapes[name]
        if len(shape) < 2 or not shape[-1] or not shape[-2]:
            raise BundleError(f"--resize-to-source {name}: its shape {shape} has no (H, W) "
                              "dims, expected a map (..., H, W)")
        stride_y, stride_x = height / shape[-2], width / shape[-1]
        if abs(stride_y - stride_x) > 0.15 * max(stride_x, stride_y):
            raise BundleError(
                f"--resize-to-source {name}: shape {shape} on a {width}x{height} input is not "
                f"a (..., H, W) map of the input (strides {stride_x:g} across, {stride_y:g} "
                "down), expected one whose last two dims follow the input's height and width")


def _check_fixed_size(size: SizePolicy, dims, layout: str) -> None:
    # Only the batch dim is freed in fixed mode, so a size other than the frozen one can
    # never run; say so rather than letting the smoke run fail with advice to use it.
    h_axis, w_axis = (2, 3) if layout == "NCHW" else (1, 2)
    if size.mode != "fixed":
        for axis, index in (("height", h_axis), ("width", w_axis)):
            want, frozen_dim = getattr(size, axis), dims[index].dim_value
            if want is not None and frozen_dim and frozen_dim != want:
                raise BundleError(f"the model's input {axis} is fixed at {frozen_dim} but "
                                  f"--fixed-{axis} {want} was asked for; use "
                                  f"--fixed-{axis} {frozen_dim}")
        return
    frozen = (dims[w_axis].dim_value, dims[h_axis].dim_value)
    if all(frozen) and frozen != (size.width, size.height):
        raise BundleError(
            f"the model's input is fixed at {frozen[0]}x{frozen[1]} but a fixed size of "
            f"{size.width}x{size.height} was asked for; use --fixed-size "
            f"{frozen[0]}x{frozen[1]}, or leave --fixed-size out to make the dims dynamic"
        )


def _one_line(exc: Exception) -> str:
    """An exception's text on one line: the CLI's error is one line, whatever ORT wrote."""
    return " ".join(str(exc).split())


def _default_size(dynamic: bool, dims, layout: str) -> SizePolicy:
    h_axis, w_axis = (2, 3) if layout == "NCHW" else (1, 2)
    if dynamic:
        # One spatial dim fixed in the file (a text-line model's height 48) stays fixed:
        # rounding it to the multiple would feed a size the model cannot take.
        height, width = dims[h_axis].dim_value, dims[w_axis].dim_value
        if bool(height) != bool(width):
            return SizePolicy(mode="dynamic", height=height or None, width=width or None)
        return SizePolicy(mode="dynamic")
    height, width = dims[h_axis].dim_value, dims[w_axis].dim_value
    if not (height and width):
        raise BundleError("the model's spatial dims are not fixed; import it without --fixed-size "
                          "or give --height and --width")
    return SizePolicy(mode="fixed", height=height, width=width)

"""PyTorch model -> ONNX -> verified bundle (`sightline export`).

Captures the model with torch's ONNX exporter, optionally simplifies the graph, repairs
and packages it through `exporters.onnx_import`, and writes the bundle only after ONNX
Runtime has reproduced PyTorch's outputs on random inputs and on real images run through
the bundle's own preprocessing. torch is imported here, lazily, never by the runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import io
import logging
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from exporters.onnx_import import TASK_DEFAULTS, ImportOptions, prepare_import
from runtime.errors import BundleError, SightlineError
from runtime.models.bundle import Bundle, InputSpec, Preprocess, SizePolicy, write_bundle

if TYPE_CHECKING:
    import torch
    from rich.table import Table

# torchlib (the dynamo exporter's op library) is written against opset 18, so 18 needs no
# version-conversion pass; ONNX Runtime >= 1.14 and TensorRT 10 both read it.
DEFAULT_OPSET = 18
# The legacy TorchScript exporter stops here (torch.onnx._constants).
TORCHSCRIPT_MAX_OPSET = 20
DEFAULT_INPUT_SIZE = (640, 640)  # width, height
INPUT_NAME = "images"
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MAX_SAMPLES = 8  # a directory of thousands of photos must not turn export into a benchmark
INSTALL_HINT = "pip install 'sightline[export]'"


@dataclass
class ExportOptions:
    """What to export and how; `bundle` carries everything `sightline import` would take."""

    model: str  # package.module:factory, path/to/file.py:factory, or a TorchScript file
    bundle: ImportOptions
    weights: Path | None = None  # state dict for a factory-built model
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE  # (width, height) to trace at
    dynamic: bool = True  # free batch and spatial dims; False freezes the spatial ones
    opset: int = DEFAULT_OPSET
    simplify: bool = False
    atol: float = 1e-4
    rtol: float = 1e-3
    samples: Path | None = None  # directory of images; None: the pinned astronaut photo


@dataclass(frozen=True)
class OutputCheck:
    """How far one ONNX output is from PyTorch's, worst case over all verification inputs."""

    name: str
    shape: tuple[int, ...]  # at the export size
    max_abs: float
    max_rel: float  # over elements whose expected magnitude exceeds atol
    worst_ratio: float  # max |error| / (atol + rtol * |expected|); above 1 fails
    worst_input: str
    passed: bool
    problem: str | None = None  # a shape mismatch, when there is one


@dataclass(frozen=True)
class Verification:
    stage: str  # "exported" (raw export), then "simplified" or "bundled" (what is written)
    inputs: tuple[str, ...]
    outputs: tuple[OutputCheck, ...]
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


class VerificationError(BundleError):
    """The ONNX graph does not compute what the PyTorch model computes; nothing was written."""

    def __init__(self, message: str, verification: Verification) -> None:
        super().__init__(message)
        self.verification = verification


@dataclass
class ExportResult:
    bundle: Bundle
    repairs: list[str]
    verifications: list[Verification]
    exporter: str
    simplifier: str | None
    timings: list[tuple[str, float]]  # (step, seconds)


@dataclass(frozen=True)
class _Probe:
    label: str
    tensor: np.ndarray


@dataclass
class LoadedModel:
    module: Any  # torch.nn.Module or torch.jit.ScriptModule
    torchscript: bool
    provenance: dict[str, str]


def export_torch(options: ExportOptions, out_dir: Path,
                 on_step: Callable[[str], None] | None = None) -> ExportResult:
    """Export, verify, repair, verify again, and only then write the bundle at `out_dir`."""
    torch = _import_torch()
    steps = _Steps(on_step)
    size = _size_policy(options)
    with steps("loading the model"):
        loaded = load_torch_model(options.model, options.weights)
    width, height = options.input_size
    example = torch.rand(1, 3, height, width)
    with steps("running it in PyTorch"), torch.inference_mode():
        try:
            outputs = loaded.module(example)
        except Exception as exc:
            raise BundleError(f"the PyTorch model fails on a 1x3x{height}x{width} input: "
                              f"{_describe(exc)}") from exc
        names = output_names(outputs)
    exporter = ("torch.onnx TorchScript exporter" if loaded.torchscript
                else "torch.onnx dynamo exporter (torch.export)")
    with steps(f"exporting to ONNX (opset {options.opset}, {exporter})"):
        exported = export_onnx(loaded, example, names, options.dynamic, options.opset)
    _check_dims_kept(exported, options.dynamic, width, height)
    # The manifest will carry exactly these: import only changes preprocessing for
    # 1-channel inputs, and an exported model always takes 3 channels.
    spec = InputSpec(name=INPUT_NAME, layout="NCHW", size=size)
    preprocess = options.bundle.preprocess or TASK_DEFAULTS[options.bundle.task]["preprocess"]
    with steps("preparing verification inputs (random and real images)"):
        probes = verification_probes(spec, preprocess, options.input_size, options.samples)
    with steps(f"running {len(probes)} verification inputs in PyTorch"):
        expected = reference_outputs(loaded.module, probes)

    def verified(stage: str, model_bytes: bytes) -> Verification:
        with steps(f"verifying the {stage} graph in ONNX Runtime against PyTorch"):
            verification = verify(model_bytes, probes, expected, names, stage=stage,
                                  atol=options.atol, rtol=options.rtol)
        if not verification.passed:
            raise VerificationError(_failure_message(verification, options), verification)
        return verification

    # The raw export first, so a wrong export is reported as such before any other step
    # (simplifier, import smoke run) trips over it with a vaguer message.
    verifications = [verified("exported", exported.SerializeToString())]
    simplifier = None
    with tempfile.TemporaryDirectory(prefix="sightline-export-") as tmp:
        final = exported
        if options.simplify:
            with steps("simplifying the graph"):
                final, simplifier = simplify_onnx(exported, Path(tmp))
        source = Path(tmp) / "exported.onnx"
        source.write_bytes(final.SerializeToString())
        provenance = {**loaded.provenance, "torch": torch.__version__, "exporter": exporter,
                      "opset": str(options.opset)}
        if simplifier:
            provenance["simplifier"] = simplifier
        bundle_options = dataclasses.replace(options.bundle, size=size, dynamic=options.dynamic,
                                             layout="NCHW", source=provenance)
        with steps("repairing and checking (ONNX checker, shape inference, ONNX Runtime)"):
            prepared = prepare_import(source, bundle_options)
    # What is written is what was verified: the bytes after simplification and repairs.
    verifications.append(verified("simplified" if options.simplify else "bundled",
                                  prepared.model_bytes))
    with steps("writing the bundle"):
        bundle = write_bundle(out_dir, prepared.manifest, prepared.model_bytes)
    steps.finish()
    return ExportResult(bundle, prepared.repairs, verifications, exporter, simplifier,
                        steps.timings)


# -- loading -----------------------------------------------------------------------------


def default_name(model: str) -> str:
    """Bundle name for a model reference: the factory's name, or the TorchScript file's stem."""
    if _is_torchscript_path(model):
        return Path(model).stem
    return model.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def load_torch_model(model: str, weights: Path | None = None) -> LoadedModel:
    """Build the model from `package.module:factory` / `file.py:factory`, or load TorchScript."""
    torch = _import_torch()
    if _is_torchscript_path(model):
        if weights is not None:
            raise BundleError("--weights goes with a model factory; a TorchScript file carries "
                              "its own weights")
        path = Path(model)
        if not path.is_file():
            raise BundleError(f"{path}: no such file")
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; still ours to read
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError/ValueError with C++ text
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(
                f"{path} is not a TorchScript file ({first}). A state dict goes with "
                "--weights and a model factory: sightline export module:factory --weights "
                f"{path.name}") from None
        return LoadedModel(module.float().eval(), True,
                           {"torch_model": path.name, "sha256": _sha256(path)})
    if ":" not in model:
        raise BundleError(f"cannot tell what {model!r} is: give package.module:factory, "
                          "path/to/file.py:factory, or a TorchScript file (.pt, .ts)")
    target, attribute = model.rsplit(":", 1)
    search_path = str(Path(target).resolve().parent) if target.endswith(".py") else os.getcwd()
    # A model file may import its sibling modules, and `sightline export pkg.mod:f` should
    # find pkg in the working directory as `python -m` would.
    with _on_sys_path(search_path):
        module = _import_file(Path(target)) if target.endswith(".py") else _import_module(target)
        factory: Any = module
        for part in attribute.split("."):
            if not hasattr(factory, part):
                raise BundleError(f"{target} has no attribute {attribute!r}")
            factory = getattr(factory, part)
        if isinstance(factory, torch.nn.Module):
            net = factory
        elif callable(factory):
            try:
                net = factory()
            except Exception as exc:
                raise BundleError(f"{model}() failed: {_describe(exc)}") from exc
        else:
            raise BundleError(f"{model} is neither a torch.nn.Module nor a factory making one")
    if not isinstance(net, torch.nn.Module):
        raise BundleError(f"{model}() returned {type(net).__name__}, not a torch.nn.Module")
    provenance = {"torch_model": model}
    if weights is not None:
        _load_weights(net, weights)
        provenance.update(weights=weights.name, weights_sha256=_sha256(weights))
    return LoadedModel(net.cpu().float().eval(), False, provenance)


def _load_weights(net: torch.nn.Module, weights: Path) -> None:
    torch = _import_torch()
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BundleError(f"{weights}: no such file") from None
    except Exception as exc:  # UnpicklingError for pickled objects, RuntimeError for junk
        raise BundleError(
            f"{weights} is not a plain state dict ({_first_line(exc)}); save one with "
            "torch.save(model.state_dict(), path)") from None
    # Training checkpoints wrap the state dict: {"state_dict": ...} (Lightning) and friends.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise BundleError(f"{weights} holds a {type(state).__name__}, not a state dict")
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches raise even when not strict
        raise BundleError(f"{weights} does not fit the model: {_first_line(exc)}") from None
    problems = [f"{kind} keys{f' ({len(keys)})' if len(keys) > 3 else ''}: "
                f"{', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                for kind, keys in (("missing", result.missing_keys),
                                   ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        raise BundleError(f"{weights} does not fit the model: {'; '.join(problems)}")


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            # The module itself (or its package) is missing, not something it imports.
            raise BundleError(
                f"cannot import {name!r} ({exc}); run from the directory that holds it or "
                "give path/to/file.py:factory") from None
        raise BundleError(f"importing {name} failed: {_describe(exc)}") from exc
    except Exception as exc:
        raise BundleError(f"importing {name} failed: {_describe(exc)}") from exc


def _import_file(path: Path):
    if not path.is_file():
        raise BundleError(f"{path}: no such file")
    resolved = path.resolve()
    name = f"_sightline_model_{hashlib.sha1(str(resolved).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise BundleError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise BundleError(f"importing {path} failed: {_describe(exc)}") from exc
    return module


@contextlib.contextmanager
def _on_sys_path(directory: str) -> Iterator[None]:
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added:
            sys.path.remove(directory)


# -- exporting ---------------------------------------------------------------------------


def output_names(outputs: Any) -> list[str]:
    """ONNX output names: a dict's keys, else output0, output1, ... (Ultralytics' naming)."""
    torch = _import_torch()
    if isinstance(outputs, torch.Tensor):
        return ["output0"]
    if isinstance(outputs, dict) and all(isinstance(v, torch.Tensor) for v in outputs.values()):
        return [str(k) for k in outputs]
    if isinstance(outputs, (tuple, list)) and outputs and all(
            isinstance(v, torch.Tensor) for v in outputs):
        return [f"output{i}" for i in range(len(outputs))]
    raise BundleError("the model must return a tensor, a tuple/list of tensors or a dict of "
                      f"tensors; it returned {type(outputs).__name__}")


def flatten_outputs(outputs: Any) -> list[np.ndarray]:
    values = outputs.values() if isinstance(outputs, dict) else (
        outputs if isinstance(outputs, (tuple, list)) else [outputs])
    return [v.detach().cpu().numpy() for v in values]


def export_onnx(loaded: LoadedModel, example: torch.Tensor, names: list[str], dynamic: bool,
                opset: int) -> onnx.ModelProto:
    """Capture the model as ONNX with the batch (and, when `dynamic`, spatial) dims free.

    The batch dim is free even for a static export: every bundle frees it, and a graph
    traced at batch 1 with a free batch dim would be a lie.
    """
    torch = _import_torch()
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    with _quiet_torch():
        try:
            if loaded.torchscript:
                # torch.export cannot take a ScriptModule (its TS2EP converter is private
                # and drops the dynamic dims), so TorchScript goes through the legacy
                # exporter, deprecated but still the one path that reads TorchScript.
                if opset > TORCHSCRIPT_MAX_OPSET:
                    raise BundleError(f"TorchScript models export up to opset "
                                      f"{TORCHSCRIPT_MAX_OPSET}; use --opset "
                                      f"{TORCHSCRIPT_MAX_OPSET} or lower")
                buffer = io.BytesIO()
                torch.onnx.export(loaded.module, (example,), buffer, dynamo=False,
                                  opset_version=opset, input_names=[INPUT_NAME],
                                  output_names=names, dynamic_axes={INPUT_NAME: axes})
                return onnx.load_from_string(buffer.getvalue())
            _import_onnxscript()
            # The dynamo exporter (torch.export), not the TorchScript one: the latter is
            # deprecated in torch 2.13 and traces, so Python control flow on values is
            # frozen silently, while torch.export refuses it with the line that does it and
            # keeps symbolic shapes for dynamic dims (anchor grids built from x.shape stay
            # dynamic). It also folds BatchNorm and constants as it goes.
            program = torch.onnx.export(
                loaded.module, (example,), dynamo=True, opset_version=opset,
                input_names=[INPUT_NAME], output_names=names, dynamic_shapes=(axes,),
                optimize=True, verbose=False, report=False)
            return program.model_proto
        except SightlineError:
            raise
        except Exception as exc:
            raise BundleError(export_error_message(exc, opset)) from exc


def export_error_message(exc: BaseException, opset: int) -> str:
    """One actionable message from torch's exporter errors, naming the operator if it can."""
    chain = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(_ANSI.sub("", str(current)))
        current = current.__cause__ or current.__context__
    text = "\n".join(chain)
    operator = failing_operator(text)
    if operator:
        return (f"torch.onnx cannot export operator {operator} at opset {opset}: no ONNX "
                "translation is registered for it. Replace it in the model, or register one "
                "(torch.onnx.export's custom_translation_table) and export from Python")
    summary = re.search(r"## Exception summary\s*\n\s*(.+)", text)
    line = summary.group(1) if summary else _first_line(exc)
    line = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", line).split(" (unhinted")[0].strip()
    where = re.search(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+),'
                      r' in (\w+)\n\s*(.+)', text)
    location = (f" at {where.group(1)}:{where.group(2)} in {where.group(3)}(): "
                f"`{where.group(4).strip()}`" if where else "")
    hint = ""
    if "data-dependent" in text:
        hint = (". Python control flow on tensor values cannot be exported; express it with "
                "torch.where or torch.cond")
    return f"torch.onnx could not export the model: {line}{location}{hint}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OPERATOR_PATTERNS = (
    # dynamo: DispatchError "No ONNX function found for <OpOverload(op='ns.name', overload=...)>"
    re.compile(r"No ONNX function found for <OpOverload\(op='(\w+)\.([\w.]+)', "
               r"overload='(\w+)'\)>"),
    re.compile(r"target=torch\.ops\.(\w+)\.(\w+)\.(\w+)\]"),
    # legacy: "Exporting the operator 'aten::foo' to ONNX opset version 18 is not supported"
    re.compile(r"Exporting the operator '?([\w.]+)::([\w.]+)'? to ONNX"),
)


def failing_operator(text: str) -> str | None:
    for pattern in _OPERATOR_PATTERNS:
        match = pattern.search(text)
        if match:
            namespace, name = match.group(1), match.group(2)
            overload = match.group(3) if match.lastindex and match.lastindex >= 3 else "default"
            return f"{namespace}::{name}" + ("" if overload == "default" else f".{overload}")
    return None


def _check_dims_kept(model: onnx.ModelProto, dynamic: bool, width: int, height: int) -> None:
    # torch.export specialises a dim the model's code pins (a Linear over flattened pixels);
    # the graph then works at the traced size only, and the smoke run would say so less clearly.
    if not dynamic:
        return
    inputs = {i.name: i for i in model.graph.input}
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    fixed = [axis for axis, index in (("height", 2), ("width", 3))
             if dims[index].HasField("dim_value")]
    if fixed:
        raise BundleError(
            f"the model only runs at {width}x{height}: torch.export fixed its "
            f"{' and '.join(fixed)} (the code depends on the exact input size); export it "
            "with --static")


# -- simplifying -------------------------------------------------------------------------


def simplify_onnx(model: onnx.ModelProto, workdir: Path) -> tuple[onnx.ModelProto, str]:
    """onnxsim when it is installed (it needs Python >= 3.11), else ONNX Runtime's basic
    offline optimisation, which only folds and removes standard ONNX nodes (portable)."""
    try:
        import onnxsim
    except ImportError:
        return _ort_basic_optimize(model, workdir)
    version = getattr(onnxsim, "__version__", "")
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:
        raise BundleError(f"onnxsim failed: {_first_line(exc)}; export without --simplify"
                          ) from exc
    if not ok:
        raise BundleError("onnxsim could not simplify the graph; export without --simplify")
    return simplified, f"onnxsim {version}".strip()


def _ort_basic_optimize(model: onnx.ModelProto, workdir: Path) -> tuple[onnx.ModelProto, str]:
    import onnxruntime as ort

    target = workdir / "simplified.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BundleError(f"ONNX Runtime cannot optimise the graph: {_first_line(exc)}; "
                          "export without --simplify") from None
    optimized = onnx.load(str(target))
    # ORT declares every domain it knows (com.microsoft, training ...); a graph that uses
    # none of them should not ask a TensorRT parser or another runtime for them.
    used = {node.domain for node in optimized.graph.node} | {""}
    kept = [o for o in optimized.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del optimized.opset_import[:]
    optimized.opset_import.extend(kept)
    return optimized, f"onnxruntime {ort.__version__} basic optimisation"


# -- verifying ---------------------------------------------------------------------------


def verification_probes(spec: InputSpec, pre: Preprocess, input_size: tuple[int, int],
                        samples: Path | None) -> list[_Probe]:
    """Random inputs at the export size, batch 2 and (dynamic) another size, plus real
    images through the bundle's own preprocessing, as the daemon would feed them."""
    import cv2

    from runtime.models.assets import ASTRONAUT_PNG, fetch_asset
    from runtime.models.preprocess import Preprocessor

    channels = 1 if pre.color == "gray" else 3
    width, height = input_size
    shapes = [(1, height, width), (2, height, width)]
    size = spec.size
    if size.mode == "dynamic":
        m = size.multiple_of
        shapes.append((1, max(m, height // 2 // m * m), width + m))
    rng = np.random.default_rng(0)
    gain = (pre.scale / np.asarray(pre.std, dtype=np.float32)).reshape(1, channels, 1, 1)
    bias = (-np.asarray(pre.mean, dtype=np.float32) / np.asarray(pre.std, dtype=np.float32)
            ).reshape(1, channels, 1, 1)
    probes = []
    for n, h, w in shapes:
        pixels = rng.integers(0, 256, (n, channels, h, w)).astype(np.float32)
        probes.append(_Probe(f"random {n}x{channels}x{h}x{w}",
                             (pixels * gain + bias).astype(np.float32)))
    if samples is None:
        paths = [fetch_asset(ASTRONAUT_PNG, show_progress=False)]
    else:
        if not samples.is_dir():
            raise BundleError(f"--samples {samples}: not a directory")
        paths = sorted(p for p in samples.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise BundleError(f"--samples {samples} holds no images "
                              f"({', '.join(IMAGE_SUFFIXES)})")
        paths = paths[:MAX_SAMPLES]
    preprocessor = Preprocessor(spec, pre)
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise BundleError(f"{path} is not a readable image")
        tensor, _ = preprocessor(image, "bgr")
        probes.append(_Probe(f"{path.name} {tensor.shape[-1]}x{tensor.shape[-2]}",
                             tensor.copy()))  # the preprocessor reuses its buffers
    return probes


def reference_outputs(module: Any, probes: list[_Probe]) -> list[list[np.ndarray]]:
    torch = _import_torch()
    outputs = []
    with torch.inference_mode():
        for probe in probes:
            try:
                outputs.append(flatten_outputs(module(torch.from_numpy(probe.tensor))))
            except Exception as exc:
                raise BundleError(f"the PyTorch model fails on the {probe.label} input: "
                                  f"{_describe(exc)}; if it only works at one input size, "
                                  "export it with --static") from exc
    return outputs


def verify(model_bytes: bytes, probes: list[_Probe], expected: list[list[np.ndarray]],
           names: list[str], *, stage: str, atol: float, rtol: float) -> Verification:
    """Run every probe in ONNX Runtime and compare with PyTorch, numpy.allclose-style:
    an element passes when |onnx - torch| <= atol + rtol * |torch|."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BundleError(f"ONNX Runtime cannot load the {stage} graph: {_first_line(exc)}"
                          ) from None
    session_names = [o.name for o in session.get_outputs()]
    if session_names != names:
        raise BundleError(f"the {stage} graph's outputs are {session_names}, PyTorch's {names}")
    stats = {name: _Worst() for name in names}
    for probe, reference in zip(probes, expected, strict=True):
        try:
            actual = session.run(None, {INPUT_NAME: probe.tensor})
        except Exception as exc:
            raise BundleError(
                f"ONNX Runtime fails on the {stage} graph with the {probe.label} input: "
                f"{_first_line(exc)}. If the model only works at its export size, export it "
                "with --static") from None
        for name, got, want in zip(names, actual, reference, strict=True):
            stats[name].add(probe.label, got, want, atol, rtol)
    checks = tuple(stats[name].result(name, expected[0][i].shape) for i, name in enumerate(names))
    return Verification(stage, tuple(p.label for p in probes), checks, atol, rtol)


class _Worst:
    """Running worst case of one output over the probes."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.severity = -1.0  # max |diff| / allowed; > 1 fails
        self.worst_input = ""
        self.problem: str | None = None

    def add(self, label: str, got: np.ndarray, want: np.ndarray, atol: float,
            rtol: float) -> None:
        if got.shape != want.shape:
            self.max_abs = self.max_rel = self.severity = float("inf")
            self.worst_input = label
            self.problem = f"shape {got.shape} in ONNX Runtime, {want.shape} in PyTorch"
            return
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        with np.errstate(invalid="ignore"):
            diff = np.abs(got64 - want64)
        same = (got64 == want64) | (np.isnan(got64) & np.isnan(want64))
        diff[same] = 0.0
        diff[np.isnan(diff)] = np.inf  # NaN on one side only
        magnitude = np.abs(want64)
        allowed = atol + rtol * magnitude
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(diff == 0, 0.0, diff / allowed)
        large = magnitude > atol
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff[large] / magnitude[large]).max()) if large.any() else 0.0
        severity = float(ratio.max()) if ratio.size else 0.0
        self.max_abs = max(self.max_abs, max_abs)
        self.max_rel = max(self.max_rel, max_rel)
        if severity > self.severity:
            self.severity, self.worst_input = severity, label

    def result(self, name: str, shape: tuple[int, ...]) -> OutputCheck:
        return OutputCheck(name, tuple(shape), self.max_abs, self.max_rel, self.severity,
                           self.worst_input, self.severity <= 1.0, self.problem)


def _failure_message(verification: Verification, options: ExportOptions) -> str:
    failed = [o for o in verification.outputs if not o.passed]
    details = "; ".join(
        f"output {o.name!r} on the {o.worst_input} input: "
        + (o.problem or f"max abs error {o.max_abs:.3g}, max rel error {o.max_rel:.3g}")
        for o in failed)
    width, height = options.input_size
    blame = {
        "exported": "the ONNX graph does not compute what the PyTorch model computes. "
                    "Typical cause: Python code that depends on the input's shape or values, "
                    f"which the export froze at {width}x{height}; if the difference is "
                    "expected, raise --atol/--rtol",
        "simplified": "the simplifier changed what the graph computes; export without "
                      "--simplify",
    }.get(verification.stage, "the bundle's repairs changed what the graph computes; this is "
                              "a Sightline bug, please report it with the model")
    return (f"verification failed for the {verification.stage} graph (allowed: "
            f"atol {verification.atol:g} + rtol {verification.rtol:g} x |expected|): "
            f"{details}. {blame}. No bundle was written")


def verification_table(verification: Verification) -> Table:
    """The per-output error report, for the CLI (rich is a core dependency)."""
    from rich.table import Table

    table = Table(title=f"{verification.stage} graph, ONNX Runtime vs PyTorch: max errors "
                        f"over {len(verification.inputs)} inputs", title_justify="left",
                  caption=f"err/tol: error / (atol {verification.atol:g} + rtol "
                          f"{verification.rtol:g} x |expected|), above 1 fails; worst input: "
                          "where err/tol peaks",
                  caption_justify="left")
    for column, justify in (("output", "left"), ("shape", "left"), ("abs err", "right"),
                            ("rel err", "right"), ("err/tol", "right"), ("worst input", "left"),
                            ("result", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for check in verification.outputs:
        table.add_row(check.name, "x".join(str(d) for d in check.shape),
                      f"{check.max_abs:.2e}", f"{check.max_rel:.2e}",
                      f"{check.worst_ratio:.3g}", check.worst_input,
                      "[green]ok[/]" if check.passed else
                      f"[bold red]FAIL[/]{' ' + check.problem if check.problem else ''}")
    return table


# -- plumbing ----------------------------------------------------------------------------


def _size_policy(options: ExportOptions) -> SizePolicy:
    width, height = options.input_size
    if width <= 0 or height <= 0:
        raise BundleError(f"--input-size must be positive, got {width}x{height}")
    size = options.bundle.size
    if options.dynamic:
        if size is not None and size.mode == "fixed":
            raise BundleError("a fixed size policy needs a static export (--static)")
        return size or SizePolicy(mode="dynamic")
    if size is not None and size.mode == "fixed" and (size.width, size.height) != (width, height):
        raise BundleError(f"the fixed size {size.width}x{size.height} is not the traced size "
                          f"{width}x{height}")
    return SizePolicy(mode="fixed", width=width, height=height)


class _Steps:
    """Announces each step to the caller's progress display and times it."""

    def __init__(self, on_step: Callable[[str], None] | None) -> None:
        self._on_step = on_step
        self.timings: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self._on_step:
            self._on_step(name)
        start = time.perf_counter()
        yield
        self.timings.append((name, time.perf_counter() - start))

    def finish(self) -> None:
        if self._on_step:
            self._on_step("")


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    # The exporter logs "torchvision is not installed", every optimizer pass (onnxscript,
    # onnx_ir at INFO) and deprecation notices; the error we raise says what matters.
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        # torch.export prints a failed capture's partial FX graph to stderr unconditionally.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _import_torch():
    try:
        import torch
    except ImportError:
        raise SightlineError(f"exporting PyTorch models needs torch: {INSTALL_HINT}") from None
    return torch


def _import_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it)
    except ImportError:
        raise SightlineError(f"torch's ONNX exporter needs onnxscript: {INSTALL_HINT}") from None


def _is_torchscript_path(model: str) -> bool:
    return model.lower().endswith(TORCHSCRIPT_SUFFIXES)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe(exc: BaseException) -> str:
    # User code failed: say where, since one line is all the CLI shows. The innermost frame
    # outside torch and this module is the user's line (nn.Linear's is not).
    ours = (str(Path(__file__).resolve()),
            str(Path(_import_torch().__file__).resolve().parent) + os.sep)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not str(Path(f.filename).resolve()).startswith(ours)]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {_first_line(exc)}{where}"

"""Open the engine a daemon serves a bundle with: fused where it can be, checked first.

The fused model is written as a bundle of its own under the cache (`fused/`), named by a
digest of everything it depends on (the model's bytes, the manifest's preprocessing,
thresholds and outputs, the flavour, the fusion code's version), so a TensorRT engine built
from it is keyed by that too. It is checked against the Python reference every time it is
built, and again at every OTA validation (runtime/fusion/parity.py); a bundle that cannot
be fused, or whose fused graph disagrees, is served with the Python steps and the log says
why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from devices.platform import detect_platform
from runtime.engines import Engine, EngineBuilder, EngineSettings, open_bundle_engine
from runtime.engines.seam import TensorSpec
from runtime.errors import BundleError
from runtime.fusion.compose import FusionUnavailable, compose
from runtime.fusion.parity import FusionMismatch, ParityReport, check_fusion
from runtime.fusion.suffix import SUFFIXES
from runtime.models.assets import cache_dir
from runtime.models.bundle import Bundle, OnnxFile, write_bundle

log = logging.getLogger(__name__)
FUSION_VERSION = "2"  # bump when the prefix/suffix builders change what they emit


@dataclass(frozen=True)
class FusionSpec:
    """What a fused engine takes and returns; the frame path reads it."""

    resize_in_graph: bool
    decodes: bool  # kept boxes come out instead of the model's own outputs
    digest: str
    report: ParityReport


class FusedEngine:
    """An Engine over a fused bundle, carrying its FusionSpec (`fusion`)."""

    def __init__(self, engine: Engine, fusion: FusionSpec) -> None:
        self._engine = engine
        self.fusion = fusion

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._engine.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._engine.outputs

    @property
    def provider(self) -> str:
        return self._engine.provider

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._engine.infer(feeds)

    def close(self) -> None:
        self._engine.close()


def native_tensorrt(settings: EngineSettings) -> bool:
    """Whether the selector will (try to) build a native TensorRT engine here."""
    if settings.backend == "onnxruntime" or not detect_platform().has_nvidia_gpu:
        return False
    return settings.backend == "tensorrt" or importlib.util.find_spec("tensorrt") is not None


def flavour_for(settings: EngineSettings) -> tuple[bool, bool, bool]:
    """(resize_in_graph, decode_in_graph, cast_first) for the engine these settings open.

    CPU: OpenCV resizes uint8 on the host (ONNX Runtime's CPU Resize measured far slower,
    docs/performance.md), the engine does the rest and the decoding. ONNX Runtime on a GPU
    (CUDA / TensorRT providers): everything in the engine. Native TensorRT: preprocessing
    with the host's resize, and Python decoding, since NMS's data-dependent output shape
    needs an IOutputAllocator that runtime/engines/tensorrt.py does not have yet and the
    Resize sizes would be shape tensors its profiles do not set.
    """
    if native_tensorrt(settings):
        return False, False, True
    gpu = (detect_platform().has_nvidia_gpu
           and settings.providers != ("CPUExecutionProvider",))
    return gpu, True, gpu


def fusion_digest(bundle: Bundle, resize_in_graph: bool, decode: bool,
                  cast_first: bool = False) -> str:
    m = bundle.manifest
    recipe = {"onnx": m.onnx.sha256, "task": m.task, "input": m.input.model_dump(),
              "preprocess": m.preprocess.model_dump(), "thresholds": m.thresholds.model_dump(),
              "outputs": m.outputs, "resize_in_graph": resize_in_graph, "decode": decode,
              "cast_first": cast_first,
              "fusion": FUSION_VERSION}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]


PARITY_FILE = "parity.json"  # the check's figures, written once it passed


def fused_bundle(bundle: Bundle, *, resize_in_graph: bool, decode: bool = True,
                 cast_first: bool = False, root: Path | None = None, recheck: bool = True,
                 prefix: onnx.ModelProto | None = None) -> tuple[Bundle, FusionSpec]:
    """The checked fused bundle for `bundle`: built and checked once, then read from the
    cache. `decode`: append the box decoding where the task has one. `recheck`: check a
    cached one again too (OTA validation does; a daemon restart trusts what passed)."""
    decodes = decode and bundle.manifest.task in SUFFIXES
    digest = fusion_digest(bundle, resize_in_graph, decodes, cast_first)
    options = {"resize_in_graph": resize_in_graph, "decode": decodes, "cast_first": cast_first}
    directory = (root or cache_dir() / "fused") / f"{bundle.name}-{digest}"
    fused = _cached(directory)
    if fused is not None:
        report = _passed(directory) if not recheck else None
        if report is None:
            report = _checked(bundle, onnx.load(str(fused.onnx_path)), prefix, options)
        return fused, FusionSpec(resize_in_graph, decodes, digest, report)
    try:
        model = compose(onnx.load(str(bundle.onnx_path)), bundle.manifest, **options)
    except FusionUnavailable:
        raise
    except Exception as exc:  # onnx's converters and checkers raise their own types
        raise FusionUnavailable(f"the fused graph could not be built: {exc}") from exc
    data = model.SerializeToString()
    source = {**bundle.manifest.source, "fused_from": bundle.manifest.onnx.sha256,
              "fusion": digest, "fusion_resize": "graph" if resize_in_graph else "host"}
    manifest = bundle.manifest.model_copy(update={
        "onnx": OnnxFile(sha256=hashlib.sha256(data).hexdigest()), "source": source,
        "sample": None})
    report = _checked(bundle, model, prefix, options)  # before it is cached
    try:
        fused = write_bundle(directory, manifest, data)
        (directory / PARITY_FILE).write_text(json.dumps(asdict(report)))
    except OSError as exc:
        raise FusionUnavailable(f"the fused model cannot be cached in {directory.parent} "
                                f"({exc}); set SIGHTLINE_CACHE_DIR to a writable directory"
                                ) from exc
    return fused, FusionSpec(resize_in_graph, decodes, digest, report)


def _checked(bundle: Bundle, model: onnx.ModelProto, prefix: onnx.ModelProto | None,
             options: dict) -> ParityReport:
    """check_fusion, with ONNX Runtime refusing the fused graph itself made unavailable
    (the Python steps serve) rather than a crash."""
    try:
        return check_fusion(bundle, model, prefix=prefix, **options)
    except FusionMismatch:
        raise
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise FusionUnavailable(f"ONNX Runtime cannot run the fused graph: {exc}") from exc


def _cached(directory: Path) -> Bundle | None:
    if not directory.is_dir():
        return None
    try:
        return Bundle.load(directory)  # verifies the ONNX file's sha256
    except BundleError:
        return None  # damaged: rebuilt


def _passed(directory: Path) -> ParityReport | None:
    """The report of the check a cached fused bundle passed, or None to check again."""
    try:
        return ParityReport(**json.loads((directory / PARITY_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def open_serving_engine(bundle: Bundle, settings: EngineSettings,
                        builder: EngineBuilder | None = None, *, strict: bool = False,
                        fuse: Callable[..., tuple[Bundle, FusionSpec]] = fused_bundle) -> Engine:
    """The engine to serve `bundle` with: fused (`engine.fused = "auto"`) where the bundle's
    steps fuse and the fused graph agrees with the Python reference, else the model alone.

    `strict` (OTA validation): a fused graph that disagrees raises FusionMismatch instead of
    falling back, so the update is refused before it serves."""
    if settings.fused == "off":
        return open_bundle_engine(bundle, settings, builder)
    resize_in_graph, decode, cast_first = flavour_for(settings)
    try:
        fused, spec = fuse(bundle, resize_in_graph=resize_in_graph, decode=decode,
                           cast_first=cast_first, recheck=strict)
    except FusionUnavailable as exc:
        log.info("%s: preprocessing%s run in Python (%s)", bundle.name,
                 " and decoding" if bundle.manifest.task in SUFFIXES else "", exc)
        # (the model's own opset, operators or input type are what fusion cannot take)
        return open_bundle_engine(bundle, settings, builder)
    except FusionMismatch as exc:
        if strict:
            raise
        log.warning("%s: %s; serving with the Python steps", bundle.name, exc)
        return open_bundle_engine(bundle, settings, builder)
    log.info("%s: preprocessing%s fused into the engine (resize on the %s; checked on %d "
             "frames, preprocessing within %.2g, %d boxes compared)", bundle.name,
             " and decoding" if spec.decodes else "", "engine" if resize_in_graph else "host",
             spec.report.frames, spec.report.preprocess_max_error, spec.report.boxes_compared)
    return FusedEngine(open_bundle_engine(fused, settings, builder), spec)

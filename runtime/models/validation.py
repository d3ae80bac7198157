"""Is a freshly delivered model fit to serve here? Checked before it takes any frame.

Loads are the caller's (it owns the engine); this runs the bundle's sample through it:
finite outputs of the declared shapes, latency within a budget, and, when the bundle
carries references, outputs within tolerance. Every failure says what and by how much.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from runtime.engines import Engine
from runtime.errors import UpdateRejected
from runtime.models.bundle import Bundle
from runtime.models.preprocess import FrameTransform, Preprocessor
from runtime.tasks import make_decoder

INPUT_PREFIX, OUTPUT_PREFIX = "input:", "output:"


@dataclass(frozen=True)
class ValidationReport:
    latency_ms: float  # median of the timed runs
    runs: int
    max_abs_error: float | None  # against the references, when compared


def sample_feeds(bundle: Bundle) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The bundle's sample inputs and reference outputs; a synthetic frame when it has none."""
    if bundle.manifest.sample:
        with np.load(bundle.directory / bundle.manifest.sample) as data:
            inputs = {k[len(INPUT_PREFIX):]: data[k] for k in data.files
                      if k.startswith(INPUT_PREFIX)}
            outputs = {k[len(OUTPUT_PREFIX):]: data[k] for k in data.files
                       if k.startswith(OUTPUT_PREFIX)}
        if inputs:
            return inputs, outputs
    # A deterministic textured frame: exercises every layer, needs nothing downloaded.
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    tensor, _ = Preprocessor(bundle.manifest.input, bundle.manifest.preprocess)(frame, "bgr")
    return {bundle.manifest.input.name: np.ascontiguousarray(tensor)}, {}


def write_sample(bundle: Bundle, inputs: dict[str, np.ndarray],
                 outputs: dict[str, np.ndarray], file_name: str = "sample.npz") -> None:
    """Store sample inputs and their reference outputs in the bundle directory."""
    arrays = {f"{INPUT_PREFIX}{k}": v for k, v in inputs.items()}
    arrays.update({f"{OUTPUT_PREFIX}{k}": v for k, v in outputs.items()})
    np.savez(bundle.directory / file_name, **arrays)


def _check_task_decoding(bundle: Bundle, inputs: dict, outputs: dict) -> None:
    """The task's decoder must turn the outputs into results, or every frame would fail."""
    tensor = inputs.get(bundle.manifest.input.name)
    if tensor is None or tensor.ndim != 4:
        return
    layout = bundle.manifest.input.layout
    height, width = tensor.shape[2:4] if layout == "NCHW" else tensor.shape[1:3]
    width, height = int(width), int(height)
    identity = FrameTransform(1.0, 1.0, 0.0, 0.0, width, height, width, height)
    try:
        make_decoder(bundle.manifest)(outputs, identity)
    except Exception as exc:
        raise UpdateRejected(f"the {bundle.manifest.task!r} task cannot decode the model's "
                             f"outputs: {type(exc).__name__}: {exc}", step="validate") from None


def _shape_fits(declared: tuple, actual: tuple[int, ...]) -> bool:
    """Same rank, and every fixed (int) declared dimension equal; named/None dims are free."""
    return len(declared) == len(actual) and all(
        not isinstance(d, int) or d == a for d, a in zip(declared, actual, strict=True))


def validate_engine(bundle: Bundle, engine: Engine, *, latency_budget_ms: float | None = None,
                    atol: float | None = None, rtol: float = 0.0,
                    runs: int = 5) -> ValidationReport:
    """Run the sample `runs` times; raise UpdateRejected(step="validate") on any failure.

    `atol` None: references are not compared (the command asked for no comparison).
    """
    inputs, references = sample_feeds(bundle)
    try:
        outputs = engine.infer(inputs)
    except Exception as exc:
        raise UpdateRejected(f"smoke inference failed: {exc}", step="validate") from None
    declared = {spec.name: spec for spec in engine.outputs}
    for name, value in outputs.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise UpdateRejected(f"output {name!r} has {bad} of {value.size} values NaN or "
                                 "infinite on the sample input", step="validate")
        spec = declared.get(name)
        if spec is not None and not _shape_fits(spec.shape, value.shape):
            raise UpdateRejected(f"output {name!r} has shape {value.shape}; the model declares "
                                 f"{spec.shape}", step="validate")
    missing = set(declared) - set(outputs)
    if missing:
        raise UpdateRejected(f"outputs {sorted(missing)} missing from the smoke inference",
                             step="validate")
    _check_task_decoding(bundle, inputs, outputs)
    max_error = None
    if atol is not None and references:
        max_error = 0.0
        for name, expected in references.items():
            if name not in outputs:
                raise UpdateRejected(f"reference output {name!r} is not an output of the model",
                                     step="validate")
            actual = np.asarray(outputs[name], dtype=np.float64)
            if actual.shape != expected.shape:
                raise UpdateRejected(f"output {name!r} has shape {actual.shape}, its reference "
                                     f"{expected.shape}", step="validate")
            error = np.abs(actual - expected)
            max_error = max(max_error, float(error.max(initial=0.0)))
            if not np.all(error <= atol + rtol * np.abs(expected)):
                raise UpdateRejected(
                    f"output {name!r} differs from its reference by up to {error.max():.3g} "
                    f"(tolerance atol={atol:g}, rtol={rtol:g})", step="validate")
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.infer(inputs)
        timings.append((time.perf_counter() - start) * 1e3)
    latency = statistics.median(timings)
    if latency_budget_ms is not None and latency > latency_budget_ms:
        raise UpdateRejected(f"median latency {latency:.2f} ms over {runs} runs exceeds the "
                             f"budget of {latency_budget_ms:g} ms", step="validate")
    return ValidationReport(latency, runs, max_error)

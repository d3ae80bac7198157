"""`sightline compare`: one bundle (and its precision variants) through every backend here.

The same inputs — a real photo through the bundle's own preprocessing, plus random
tensors — go through each available backend; outputs are compared with ONNX Runtime CPU
at FP32 (the reference) and latencies are measured interleaved, as Polygraphy does.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from runtime.engines import Engine, EngineSettings, open_bundle_engine, open_engine
from runtime.errors import EngineError
from runtime.models.assets import ASTRONAUT_PNG, fetch_asset
from runtime.models.bundle import Bundle, preferred_variant
from runtime.models.preprocess import Preprocessor


@dataclass
class BackendRun:
    label: str
    bundle: Bundle
    engine: Engine
    latencies_ms: list[float] = field(default_factory=list)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)


def find_variants(bundle: Bundle) -> list[Bundle]:
    """Precision variants written by `sightline quantize` next to the bundle."""
    return [v for v in (preferred_variant(bundle, p) for p in ("fp16", "int8")) if v is not bundle]


def _backends(bundles: list[Bundle]) -> list[tuple[str, Bundle, callable]]:
    import onnxruntime as ort

    from devices.platform import detect_platform

    available = ort.get_available_providers()
    gpu = detect_platform().has_nvidia_gpu
    plans = []
    for bundle in bundles:
        p = bundle.manifest.precision
        plans.append((f"onnxruntime CPU {p}", bundle, lambda b=bundle: open_engine(
            b.onnx_path, EngineSettings(providers=("CPUExecutionProvider",)))))
        for provider, short in (("CUDAExecutionProvider", "CUDA"),
                                ("TensorrtExecutionProvider", "TensorRT EP")):
            if gpu and provider in available:
                plans.append((f"onnxruntime {short} {p}", bundle, lambda b=bundle, pr=provider:
                              open_engine(b.onnx_path, EngineSettings(providers=(pr,)))))
        if gpu:
            plans.append((f"TensorRT {p}", bundle, lambda b=bundle: open_bundle_engine(
                b, EngineSettings(backend="tensorrt", build_missing_engines=True))))
    return plans


def sample_inputs(bundle: Bundle, count: int, frame_size=(640, 480)) -> list[np.ndarray]:
    preprocess = Preprocessor(bundle.manifest.input, bundle.manifest.preprocess)
    photo = cv2.resize(cv2.imread(str(fetch_asset(ASTRONAUT_PNG))), frame_size)
    first, _ = preprocess(photo, "bgr")
    inputs = [first.copy()]
    rng = np.random.default_rng(0)
    for _ in range(count - 1):
        noise = rng.integers(0, 256, size=photo.shape, dtype=np.uint8)
        tensor, _ = preprocess(noise, "bgr")
        inputs.append(tensor.copy())
    return inputs


def compare(bundle: Bundle, variants: list[Bundle], *, inputs: int = 4, repeats: int = 20,
            console: Console | None = None) -> list[dict]:
    # piped output (logs, CI) gets full-width rows instead of truncated backend names
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    feeds = sample_inputs(bundle, inputs)
    name = bundle.manifest.input.name
    runs: list[BackendRun] = []
    for label, member, factory in _backends([bundle, *variants]):
        try:
            runs.append(BackendRun(label, member, factory()))
        except EngineError as exc:
            console.print(f"[yellow]skipped {label}:[/] {exc}")
    for run in runs:
        run.outputs = [run.engine.infer({name: x}) for x in feeds]  # also warms up
    for _ in range(repeats):  # interleaved: each backend sees the same machine state
        for run in runs:
            start = time.perf_counter()
            run.engine.infer({name: feeds[0]})
            run.latencies_ms.append((time.perf_counter() - start) * 1e3)
    reference = runs[0]
    rows = []
    for run in runs:
        for output in reference.outputs[0]:
            diffs = [np.abs(o[output].astype(np.float64) - r[output])
                     for o, r in zip(run.outputs, reference.outputs, strict=True)]
            scale = max(float(np.abs(r[output]).max()) for r in reference.outputs) or 1.0
            max_abs = max(float(d.max()) for d in diffs)
            rows.append({"backend": run.label, "provider": run.engine.provider,
                         "output": output, "max_abs": max_abs,
                         "mean_abs": float(np.mean([d.mean() for d in diffs])),
                         "max_rel": max_abs / scale,
                         "p50_ms": float(np.median(run.latencies_ms)),
                         "p99_ms": float(np.percentile(run.latencies_ms, 99))})
        run.engine.close()
    _print(console, rows, reference.label, inputs, repeats)
    return rows


def _print(console: Console, rows: list[dict], reference: str, inputs: int, repeats: int):
    table = Table(title=f"vs {reference}: {inputs} inputs (photo + noise); "
                        f"latency over {repeats} interleaved runs")
    for column in ("backend", "output", "max abs", "mean abs", "max rel", "p50 ms", "p99 ms"):
        table.add_column(column, no_wrap=True,
                         justify="left" if column in ("backend", "output") else "right")
    for row in rows:
        table.add_row(row["backend"], row["output"], f"{row['max_abs']:.3g}",
                      f"{row['mean_abs']:.3g}", f"{row['max_rel']:.3g}",
                      f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}")
    console.print(table)


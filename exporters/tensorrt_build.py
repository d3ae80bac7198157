"""`sightline compile`: bundle ONNX -> TensorRT engine (10.x and 11.x), cached per device.

The network is strongly typed: precision comes from the bundle variant's graph (FP16
casts, INT8 Q/DQ nodes), never from builder flags, which TensorRT 11 removed. Shape
profiles come from the bundle's size policy; a timing cache per GPU + TensorRT version
is kept and reused; DLA with GPU fallback where asked. TensorRT is imported lazily.
"""

from __future__ import annotations

import time
from pathlib import Path

from runtime.engines.tensorrt import import_tensorrt
from runtime.engines.tensorrt_target import CompileOptions, detect_target, engine_key
from runtime.errors import EngineError
from runtime.models.bundle import Bundle
from runtime.models.engine_cache import EngineCache, EngineRecord, ProfileEntry, TargetDevice


def parser_errors(parser) -> list[str]:
    """One line per ONNX parser error, naming the node and operator where TensorRT says."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = []
        node_name = getattr(error, "node_name", lambda: "")()
        node_op = getattr(error, "node_operator", lambda: "")()
        if error.node() >= 0:
            where.append(f"node {error.node()}")
        if node_op:
            where.append(node_op)
        if node_name:
            where.append(repr(node_name))
        lines.append(f"{' '.join(where) or 'model'}: {error.desc()}")
    return lines


def _progress_monitor(trt, console):
    """A TensorRT IProgressMonitor that drives a rich progress display."""
    from rich.progress import Progress

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.progress = Progress(console=console, transient=True)
            self._tasks: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            indent = "  " if parent_phase else ""
            self._tasks[phase_name] = self.progress.add_task(f"{indent}{phase_name}",
                                                             total=num_steps)

        def step_complete(self, phase_name, step) -> bool:
            self.progress.update(self._tasks[phase_name], completed=step + 1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name) -> None:
            self.progress.remove_task(self._tasks.pop(phase_name))

    return Monitor()


def build_engine(bundle: Bundle, profile: tuple[ProfileEntry, ...], options: CompileOptions,
                 timing_cache_path: Path, console=None) -> bytes:
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    # TensorRT 10 needs the flag for strong typing; 11 ignores it (always strongly typed).
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle.onnx_path)):
        raise EngineError("TensorRT cannot parse the ONNX model:\n  "
                          + "\n  ".join(parser_errors(parser)))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    trt_profile = builder.create_optimization_profile()
    for name, lo, opt, hi in profile:
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)
    if options.dla_core is not None:
        if builder.num_DLA_cores <= options.dla_core:
            raise EngineError(f"DLA core {options.dla_core} asked for, this device has "
                              f"{builder.num_DLA_cores}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU

    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    if hasattr(trt, "IProgressMonitor"):
        monitor = _progress_monitor(trt, console)
        config.progress_monitor = monitor
        with monitor.progress:
            plan = builder.build_serialized_network(network, config)
    else:
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError("TensorRT could not build an engine (see the messages above); "
                          "try a larger --workspace or check the bundle with `sightline compare`")
    timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
    timing_cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(plan)


def compile_bundle(bundle: Bundle, cache: EngineCache, options: CompileOptions | None = None,
                   console=None, target: TargetDevice | None = None) -> EngineRecord:
    """Return the cached engine for this bundle on this device, building it if needed."""
    options = options or CompileOptions()
    target = target or detect_target(options.dla_core)
    key = engine_key(bundle, target, options)
    if not options.force:
        cached = cache.lookup(bundle.name, key)
        if cached is not None:
            return cached
    started = time.monotonic()
    plan = build_engine(bundle, key.profile, options, cache.timing_cache_path(target), console)
    return cache.store(bundle.name, key, plan, time.monotonic() - started)

"""GPU truth kit: run every GPU path of Sightline on this machine and write a short Markdown
report in which each step has passed, failed or was skipped, with the reason.

`bash bench/gpu_check.sh` is the entry point: it puts this tree on PYTHONPATH (nothing is
installed, so a rerun finds the machine as the first run left it) and bounds the run in
time. On a machine without an NVIDIA GPU every step is skipped, saying why, and it exits 0;
it exits 1 when a step that ran failed. Steps: the @pytest.mark.gpu tests; devices.cuda's
memory path per binding (pinned and device buffers, async copies on a stream, from the
opening thread and from an infer thread, checked against numpy; CuPy computing in our
device buffer); the NVML probe against nvidia-smi's own figures; and the engine paths.

    python bench/gpu_check.py [--report PATH]   # default: $OUT/gpu-check.md, else stdout
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

# the kit's own modules, also when run as `python bench/gpu_check.py` from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu_engine_checks import (  # noqa: E402, F401 (the tests call them through here)
    _TinyModel,
    check_engine_auto,
    check_engine_ort_provider,
    check_engine_tensorrt,
    check_fusion_on_provider,
)
from bench.gpu_kit import (  # noqa: E402, F401
    FAILED,
    PASSED,
    PROJECT_MODULES,
    SKIPPED,
    Skip,
    Step,
    in_thread,
    missing_modules,
    run_step,
)
from bench.gpu_report import (  # noqa: E402, F401
    SMI_FIELDS,
    SMI_PLATFORM_FIELDS,
    SMI_TEXT_FIELDS,
    TOLERANCES,
    compare_gpu_figures,
    compare_platform,
    parse_nvidia_smi_csv,
    parse_pytest_summary,
    render_report,
)

ROOT = Path(__file__).resolve().parent.parent
BINDINGS = {"cuda-python": "cuda", "pycuda": "pycuda"}  # binding -> its top-level module
ORT_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
DISTRIBUTIONS = ("numpy", "torch", "cupy", "cupy-cuda12x", "cupy-cuda13x", "cuda-python",
                 "cuda-bindings", "pycuda", "nvidia-ml-py", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "tensorrt", "pytest")


def step_names() -> list[str]:
    """Every step, in report order: a CPU machine reports each of these as skipped."""
    names = ["pytest -m gpu"]
    for binding in BINDINGS:
        names += [f"{binding}: copies on the opening thread",
                  f"{binding}: copies from an infer thread, closed from a third"]
    names += ["cuda-python: CuPy computes in our device buffer",
              "platform probe vs nvidia-smi", "NVML probe vs nvidia-smi",
              "engine: auto backend on this machine", "engine: TensorRT (compile + infer)"]
    names += [f"engine: ONNX Runtime {provider}" for provider in ORT_GPU_PROVIDERS]
    names += [f"fusion: in-engine preprocessing + decoding on {provider} vs CPU"
              for provider in ORT_GPU_PROVIDERS]
    return names



# {{{ the machine

def no_gpu_reason() -> str | None:
    """Why GPU steps cannot run here, or None when an NVIDIA GPU is present."""
    try:
        from devices.platform import detect_platform
    except ImportError as exc:
        return f"devices.platform is not importable ({exc})"
    found = detect_platform()
    if found.has_nvidia_gpu or _smi_lists_a_gpu():
        # nvidia-smi seeing a GPU devices.platform missed is itself a finding: the platform
        # step will report it (and the gpu tests, which trust devices.platform, skip).
        return None
    return ("no NVIDIA GPU on this machine (no /proc/driver/nvidia, not a Jetson)"
            + (f": {found.gpu_problem}" if found.gpu_problem else ""))


def _smi_lists_a_gpu() -> bool:
    try:
        return "GPU " in nvidia_smi("-L")
    except (Skip, RuntimeError, OSError, subprocess.TimeoutExpired):
        return False


def nvidia_smi(*args: str, timeout: float = 20) -> str:
    if shutil.which("nvidia-smi") is None:
        raise Skip("nvidia-smi is not on PATH")
    done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"nvidia-smi {' '.join(args)} exited {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[-300:]}")
    return done.stdout


def machine_facts() -> dict[str, str]:
    facts = {"host": platform.node() or "?", "os": platform.platform(),
             "python": sys.version.split()[0], "cpus": str(os.cpu_count())}
    try:
        facts["gpus"] = "; ".join(nvidia_smi("--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader").strip().splitlines())
    except (Skip, RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        facts["gpus"] = f"none ({exc})"
    versions = []
    for name in DISTRIBUTIONS:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    facts["packages"] = ", ".join(versions) or "none of the GPU stack"
    try:
        from devices.platform import detect_platform

        found = detect_platform()
        facts["devices.platform"] = (f"kind {found.kind}, driver {found.driver_version}, "
                                     f"GPUs {[g.name for g in found.gpus]}")
    except Exception as exc:  # a report line, not a step: the platform step has the detail
        facts["devices.platform"] = f"{type(exc).__name__}: {exc}"
    facts["project modules missing"] = ", ".join(missing_modules()) or "none"
    return facts


# }}}

# {{{ the checks (GPU)

def run_gpu_tests(timeout: float) -> str:
    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest is not installed")
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text())
    extra, note = [], ""
    missing = missing_modules()
    if missing:  # tests/conftest.py imports the whole runtime: run what needs none of it
        runnable = [f for f in files if f.startswith("tests/devices/")
                    and not set(missing) & imported_modules(ROOT / f)]
        extra = ["--noconftest"]
        note = (f"; {', '.join(missing)} missing, so only {', '.join(runnable) or 'nothing'} "
                f"(--noconftest), not {', '.join(sorted(set(files) - set(runnable)))}")
        files = runnable
        if not files:
            raise Skip(f"no GPU test file can be imported here{note}")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rfEs",
                           "-p", "no:cacheprovider", *extra, *files],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    counts = parse_pytest_summary(done.stdout)
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "no summary"
    reasons = [line for line in done.stdout.splitlines()
               if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
    detail = f"{summary} in {len(files)} files{note}" + "".join(f"\n{r}" for r in reasons[:8])
    if done.returncode == 5 or (done.returncode == 0 and not counts.get("passed")):
        raise Skip(f"no GPU test ran: {detail}")
    if done.returncode != 0:
        raise AssertionError(detail + "\n" + done.stdout[-1500:] + done.stderr[-500:])
    return detail


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the modules a Python file imports (absolute imports only)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _need_binding(binding: str) -> None:
    if importlib.util.find_spec(BINDINGS[binding]) is None:
        raise Skip(f"{binding} is not installed")


def check_copies_on_opening_thread(binding: str) -> str:
    import numpy as np

    from devices.cuda import CudaError, load_cuda

    _need_binding(binding)
    api = load_cuda(binding)
    try:
        frame = np.random.default_rng(0).random((3, 480, 640), dtype=np.float32)
        src, dst = api.pinned_host(frame.shape, frame.dtype), api.pinned_host(frame.shape,
                                                                               frame.dtype)
        src[...] = frame
        stream, device = api.stream(), api.device_buffer(frame.nbytes)
        api.copy_htod_async(device, src, stream)
        api.copy_dtoh_async(dst, device, stream)
        stream.synchronize()
        np.testing.assert_array_equal(dst, frame)
        pageable = np.zeros_like(frame)  # a plain numpy array as the destination, too
        api.copy_dtoh_async(pageable, device, stream)
        stream.synchronize()
        np.testing.assert_array_equal(pageable, frame)
        try:
            api.device_buffer(1 << 50)
            raise AssertionError("a 1 PiB allocation succeeded")
        except CudaError as exc:
            refused = exc.name
        versions = ""
        if hasattr(api, "runtime_version"):
            versions = f"; bindings built for CUDA {api.runtime_version}"
        return (f"{frame.nbytes / 2**20:.1f} MiB pinned -> device -> pinned and -> pageable, "
                f"bit-exact; stream 0x{stream.handle:x}; 1 PiB allocation -> {refused}{versions}")
    finally:
        api.close()


def check_copies_across_threads(binding: str) -> str:
    import numpy as np

    from devices.cuda import load_cuda

    _need_binding(binding)
    api = load_cuda(binding)  # opened here, like an engine opened by the server thread
    rng = np.random.default_rng(1)
    host = api.pinned_host((3, 480, 640), np.float32)
    device, stream = api.device_buffer(host.nbytes), api.stream()

    def infer() -> int:
        frames = 0
        for _ in range(5):
            frame = rng.random(host.shape, dtype=np.float32)
            host[...] = frame
            back = api.pinned_host(host.shape, host.dtype)  # allocations here as well
            api.copy_htod_async(device, host, stream)
            api.copy_dtoh_async(back, device, stream)
            stream.synchronize()
            np.testing.assert_array_equal(back, frame)
            api.free_pinned(back)
            frames += 1
        extra = api.device_buffer(1024)
        extra.free()
        return frames

    try:
        frames = in_thread("sightline-infer-gpucheck", infer)
    finally:
        in_thread("sightline-close-gpucheck", api.close)
    return (f"opened on {threading.current_thread().name}; {frames} frames round-tripped "
            "bit-exact on sightline-infer-gpucheck (buffers from the opening thread, pinned "
            "allocations and frees there too); closed on sightline-close-gpucheck")


def check_cupy_interop() -> str:
    import numpy as np

    from devices.cuda import load_cuda

    _need_binding("cuda-python")
    if importlib.util.find_spec("cupy") is None:
        raise Skip("CuPy is not installed")
    import cupy

    api = load_cuda("cuda-python")
    try:
        frame = np.random.default_rng(2).random((3, 240, 320), dtype=np.float32)
        device, stream = api.device_buffer(frame.nbytes), api.stream()
        back = np.empty_like(frame)

        def infer() -> None:
            api.copy_htod_async(device, frame, stream)
            stream.synchronize()
            memory = cupy.cuda.UnownedMemory(device.ptr, device.nbytes, owner=None)
            view = cupy.ndarray(frame.shape, cupy.float32, cupy.cuda.MemoryPointer(memory, 0))
            view *= 2
            view += 1
            cupy.cuda.Device().synchronize()
            api.copy_dtoh_async(back, device, stream)
            stream.synchronize()

        in_thread("sightline-infer-gpucheck", infer)
        np.testing.assert_allclose(back, frame * np.float32(2) + np.float32(1), rtol=1e-6)
        return (f"CuPy {cupy.__version__} ran 2x+1 in place on our cudaMalloc buffer from the "
                "infer thread; matches numpy (same primary context)")
    finally:
        api.close()


def check_platform_against_nvidia_smi() -> str:
    from devices.platform import detect_platform

    found = detect_platform()
    if found.gpu_problem:
        raise AssertionError(f"devices.platform could not list the GPUs: {found.gpu_problem}")
    rows = parse_nvidia_smi_csv(nvidia_smi(f"--query-gpu={','.join(SMI_PLATFORM_FIELDS)}",
                                           "--format=csv,noheader,nounits"),
                                SMI_PLATFORM_FIELDS)
    problems = compare_platform(found.gpus, found.driver_version, rows)
    if problems:
        raise AssertionError("; ".join(problems))
    return (f"kind {found.kind}, driver {found.driver_version}; "
            + "; ".join(f"GPU {g.index} {g.name} {g.compute_capability} {g.memory_mb} MiB"
                        for g in found.gpus) + " (as nvidia-smi)")


def check_nvml_against_nvidia_smi() -> str:
    if importlib.util.find_spec("pynvml") is None:
        raise Skip("nvidia-ml-py (pynvml) is not installed")
    if importlib.util.find_spec("psutil") is None:
        raise Skip("psutil is not installed (devices.host needs it)")
    from devices.host import HostProbe

    with HostProbe() as probe:
        gpus = probe.sample().gpus
    rows = parse_nvidia_smi_csv(nvidia_smi(f"--query-gpu={','.join(SMI_FIELDS)}",
                                           "--format=csv,noheader,nounits"))
    if not gpus:
        raise AssertionError(f"NVML reported no GPU; nvidia-smi lists {len(rows)}")
    if len(gpus) != len(rows):
        raise AssertionError(f"NVML sees {len(gpus)} GPUs, nvidia-smi {len(rows)}")
    problems, seen = [], []
    for ours, smi in zip(gpus, rows, strict=True):
        problems += [f"GPU {ours.index}: {p}" for p in compare_gpu_figures(ours, smi)]
        seen.append(f"GPU {ours.index} {ours.name}: memory {ours.memory_used_mb}/"
                    f"{ours.memory_total_mb} MiB (smi {smi['memory.used']}/"
                    f"{smi['memory.total']}), {ours.temperature_c} C (smi "
                    f"{smi['temperature.gpu']}), {ours.power_w} W (smi {smi['power.draw']}), "
                    f"util {ours.utilization_percent}% (smi {smi['utilization.gpu']})")
    if problems:
        raise AssertionError("; ".join(problems) + "\n" + "\n".join(seen))
    return "\n".join(seen)


# }}}


def run_all(pytest_timeout: float = 150, assume_gpu: bool = False) -> list[Step]:
    names = step_names()
    reason = None if assume_gpu else no_gpu_reason()
    if reason is not None:
        return [Step(name, SKIPPED, reason) for name in names]
    with tempfile.TemporaryDirectory(prefix="sightline-gpu-check-") as tmp:
        work = Path(tmp)
        built: list[_TinyModel] = []

        def model() -> _TinyModel:  # built once, on the first engine step that needs it
            if not built:
                built.append(_TinyModel(work))
            return built[0]

        checks: list[Callable[[], str]] = [lambda: run_gpu_tests(pytest_timeout)]
        for binding in BINDINGS:
            checks += [lambda b=binding: check_copies_on_opening_thread(b),
                       lambda b=binding: check_copies_across_threads(b)]
        checks += [check_cupy_interop, check_platform_against_nvidia_smi,
                   check_nvml_against_nvidia_smi,
                   lambda: check_engine_auto(model, work),
                   lambda: check_engine_tensorrt(model, work)]
        checks += [lambda p=p: check_engine_ort_provider(p, model) for p in ORT_GPU_PROVIDERS]
        checks += [lambda p=p: check_fusion_on_provider(p, work) for p in ORT_GPU_PROVIDERS]
        assert len(checks) == len(names)
        return [run_step(name, check) for name, check in zip(names, checks, strict=True)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=None,
                        help="Markdown report path (default: $OUT/gpu-check.md, else stdout)")
    parser.add_argument("--assume-gpu", action="store_true",
                        help="run every step even without a GPU, to rehearse the kit on a CPU "
                             "machine (GPU steps then fail or skip on their own)")
    args = parser.parse_args(argv)
    report = args.report or (Path(os.environ["OUT"]) / "gpu-check.md"
                             if os.environ.get("OUT") else None)
    started, clock = datetime.now(timezone.utc), time.monotonic()
    steps = run_all(assume_gpu=args.assume_gpu)
    text = render_report(steps, machine_facts(), started, time.monotonic() - clock)
    if report is None:
        sys.stdout.write(text)
    else:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text)
        print(f"report: {report}")
    for step in steps:
        print(f"{step.status:8} {step.name}: {step.detail.splitlines()[0] if step.detail else ''}",
              file=sys.stderr)
    return 1 if any(step.status == FAILED for step in steps) else 0


if __name__ == "__main__":
    sys.exit(main())

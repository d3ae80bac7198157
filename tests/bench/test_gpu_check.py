"""bench/gpu_check.sh, the GPU truth kit, on a CPU machine: it runs, skips every GPU step
with the reason, and its parsing and report writing are right. On a GPU the kit itself is
the check (docs/gpu-check.md)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from devices.host import GpuFigures
from devices.platform import detect_platform

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check
_spec.loader.exec_module(gpu_check)

cpu_only = pytest.mark.skipif(detect_platform().has_nvidia_gpu,
                              reason="on a GPU machine the kit runs its GPU steps instead")

# Hand-written in the format of `nvidia-smi --query-gpu=index,name,memory.total,memory.used,
# utilization.gpu,temperature.gpu,power.draw --format=csv,noheader,nounits` (not captured
# from hardware: no GPU was lent to the session that wrote it).
SMI_TEXT = """\
0, NVIDIA H200, 143771, 1, 0, 31, 76.42
1, NVIDIA T400, 2048, 512, [N/A], 40, [Not Supported]
"""


def _run_kit(tmp_path: Path, *args: str, out: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)


def _table(report: str) -> dict[str, tuple[str, str]]:
    rows = [line.split(" | ") for line in report.splitlines()
            if line.startswith("| ") and not line.startswith(("| Step", "|---"))]
    return {row[0][2:]: (row[1], row[2].rstrip(" |")) for row in rows}


@cpu_only
def test_kit_on_a_cpu_machine_exits_0_and_skips_every_step_with_the_reason(tmp_path):
    done = _run_kit(tmp_path, str(tmp_path / "report.md"))
    assert done.returncode == 0, done.stderr
    table = _table((tmp_path / "report.md").read_text())
    assert list(table) == gpu_check.step_names()
    for name, (status, reason) in table.items():
        assert status == "skipped", name
        assert "no NVIDIA GPU" in reason, name
    again = _run_kit(tmp_path, str(tmp_path / "again.md"))  # idempotent: same answer twice
    assert again.returncode == 0
    assert _table((tmp_path / "again.md").read_text()) == table


@cpu_only
def test_kit_writes_its_report_under_out_when_set(tmp_path):
    done = _run_kit(tmp_path, out=tmp_path / "out")
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "out" / "gpu-check.md").read_text()
    assert report.startswith("# Sightline GPU check")
    assert "## Machine" in report and "- python: " in report


def test_nvidia_smi_csv_parses_numbers_names_and_missing_figures():
    first, second = gpu_check.parse_nvidia_smi_csv(SMI_TEXT)
    assert first == {"index": 0.0, "name": "NVIDIA H200", "memory.total": 143771.0,
                     "memory.used": 1.0, "utilization.gpu": 0.0, "temperature.gpu": 31.0,
                     "power.draw": 76.42}
    assert second["name"] == "NVIDIA T400"
    assert second["utilization.gpu"] is None and second["power.draw"] is None


def test_nvidia_smi_csv_with_units_left_in_still_parses():
    (row,) = gpu_check.parse_nvidia_smi_csv("0, NVIDIA H200, 143771 MiB, 1 MiB, 0 %, 31, "
                                            "76.42 W\n")
    assert row["memory.total"] == 143771.0 and row["power.draw"] == 76.42


def test_nvidia_smi_row_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="4 fields, expected 7"):
        gpu_check.parse_nvidia_smi_csv("0, NVIDIA H200, 143771, 1\n")


def test_nvml_figures_within_tolerance_of_nvidia_smi_agree():
    smi = gpu_check.parse_nvidia_smi_csv(SMI_TEXT)[0]
    ours = GpuFigures(index=0, name="NVIDIA H200", utilization_percent=3, memory_used_mb=500,
                      memory_total_mb=143771, temperature_c=32.0, power_w=80.1)
    assert gpu_check.compare_gpu_figures(ours, smi) == []


def test_nvml_figures_that_disagree_with_nvidia_smi_are_named():
    smi = gpu_check.parse_nvidia_smi_csv(SMI_TEXT)[1]
    ours = GpuFigures(index=1, name="NVIDIA T4", memory_used_mb=512, memory_total_mb=1024,
                      temperature_c=40.0, power_w=12.0)  # smi has no power: not compared
    problems = gpu_check.compare_gpu_figures(ours, smi)
    assert len(problems) == 2
    assert problems[0].startswith("name: NVML 'NVIDIA T4'")
    assert problems[1].startswith("memory_total_mb: NVML 1024, nvidia-smi 2048.0")


@pytest.mark.parametrize(("line", "counts"), [
    ("3 passed, 2 skipped in 1.20s", {"passed": 3, "skipped": 2}),
    ("1 failed, 7 passed, 1 skipped, 23 deselected in 4.00s",
     {"failed": 1, "passed": 7, "skipped": 1, "deselected": 23}),
    ("2 errors in 0.5s", {"error": 2}),
    ("23 deselected in 0.31s", {"deselected": 23}),
    ("", {}),
])
def test_pytest_summary_line_is_counted(line, counts):
    assert gpu_check.parse_pytest_summary(f"....\n{line}\n") == counts


def test_report_counts_steps_and_keeps_the_table_intact():
    steps = [gpu_check.Step("a | b", gpu_check.PASSED, "line one\nline two"),
             gpu_check.Step("c", gpu_check.SKIPPED, "why"),
             gpu_check.Step("d", gpu_check.FAILED, "boom")]
    started = datetime(2026, 12, 3, 14, 0, tzinfo=timezone.utc)
    text = gpu_check.render_report(steps, {"host": "h200"}, started, 42.4)
    assert "2026-12-03 14:00 UTC, 42 s; 1 passed, 1 failed, 1 skipped." in text
    assert "| a \\| b | passed | line one<br>line two |" in text
    assert "- host: h200" in text


def test_a_step_passes_skips_with_its_reason_or_fails_with_the_error():
    assert gpu_check.run_step("ok", lambda: "done") == gpu_check.Step("ok", "passed", "done")

    def skip():
        raise gpu_check.Skip("TensorRT is not installed")

    def fail():
        raise ValueError("2 != 3")

    assert gpu_check.run_step("s", skip).detail == "TensorRT is not installed"
    assert gpu_check.run_step("f", fail) == gpu_check.Step("f", "failed", "ValueError: 2 != 3")


@cpu_only
def test_no_gpu_reason_says_what_is_missing():
    assert "no NVIDIA GPU" in gpu_check.no_gpu_reason()


def test_auto_engine_step_serves_the_tiny_model_from_an_infer_thread(tmp_path):
    # Not a GPU path on this machine (auto falls back to ONNX Runtime), but the same code
    # the kit runs on a GPU: the tiny bundle, the infer thread, the comparison.
    tiny = gpu_check._TinyModel(tmp_path)
    detail = gpu_check.check_engine_auto(lambda: tiny, tmp_path)
    assert detail.startswith("auto chose ")
    assert "3 calls on the infer thread match ONNX Runtime CPU" in detail


@cpu_only
def test_gpu_test_step_skips_when_the_suite_skips_every_gpu_test():
    with pytest.raises(gpu_check.Skip, match="no GPU test ran: .*skipped") as caught:
        gpu_check.run_gpu_tests(timeout=120)
    assert "needs an NVIDIA GPU" in str(caught.value)


def test_platform_probe_matching_nvidia_smi_has_no_differences():
    from devices.platform import GpuInfo

    smi = gpu_check.parse_nvidia_smi_csv("0, NVIDIA H200, 9.0, 143771, 580.65.06\n",
                                         gpu_check.SMI_PLATFORM_FIELDS)
    assert smi[0]["compute_cap"] == "9.0" and smi[0]["driver_version"] == "580.65.06"
    ours = (GpuInfo(index=0, name="NVIDIA H200", compute_capability="sm_90", memory_mb=143771),)
    assert gpu_check.compare_platform(ours, "580.65.06", smi) == []
    wrong = (GpuInfo(index=0, name="NVIDIA H200", compute_capability="sm_89", memory_mb=143771),)
    assert gpu_check.compare_platform(wrong, "575.1", smi) == [
        "driver: ours '575.1', nvidia-smi '580.65.06'",
        "GPU 0: ours NVIDIA H200 sm_89, nvidia-smi NVIDIA H200 sm_90"]


def test_imported_modules_lists_what_a_test_file_needs_at_import():
    # How the kit narrows the gpu tests on an image without the project's dependencies.
    assert {"numpy", "pytest", "devices", "tests"} <= gpu_check.imported_modules(
        ROOT / "tests" / "devices" / "test_cuda.py")
    assert "psutil" in gpu_check.imported_modules(ROOT / "devices" / "host.py")


def test_fusion_step_compares_the_gpu_flavour_graph_on_a_provider_with_the_cpu(tmp_path):
    # Run here on the CPU provider itself: the same code the GPU providers take on a GPU box.
    detail = gpu_check.check_fusion_on_provider("CPUExecutionProvider", tmp_path)
    assert "kept boxes over 4 frames match" in detail
    assert int(detail.split(": ")[1].split()[0]) > 0

"""The GPU kit's report: nvidia-smi's CSV read, our probes' figures compared with it, the
pytest summary read, and the Markdown table. Pure functions, tested on any machine.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from bench.gpu_kit import FAILED, PASSED, SKIPPED, Step

SMI_FIELDS = ("index", "name", "memory.total", "memory.used", "utilization.gpu",
              "temperature.gpu", "power.draw")
SMI_PLATFORM_FIELDS = ("index", "name", "compute_cap", "memory.total", "driver_version")
SMI_TEXT_FIELDS = ("name", "driver_version", "compute_cap", "uuid", "pci.bus_id")
# NVML and nvidia-smi are sampled a moment apart, and HostProbe reads memory through
# nvmlDeviceGetMemoryInfo (v1), whose `used` includes the driver's reserved memory that
# nvidia-smi (v2) reports apart: used may differ by that much.
TOLERANCES = {"memory_total_mb": 64, "memory_used_mb": 1024, "temperature_c": 3,
              "utilization_percent": 25, "power_w": 30}


def parse_nvidia_smi_csv(text: str, fields: Sequence[str] = SMI_FIELDS) -> list[dict[str, Any]]:
    """`nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits` -> one dict per GPU;
    numbers as float, [N/A] / [Not Supported] as None, `name` as text."""
    rows = []
    for record in csv.reader(io.StringIO(text), skipinitialspace=True):
        if not record or not "".join(record).strip():
            continue
        if len(record) != len(fields):
            raise ValueError(f"nvidia-smi row has {len(record)} fields, expected "
                             f"{len(fields)}: {record}")
        row: dict[str, Any] = {}
        for field, raw in zip(fields, record, strict=True):
            value = raw.strip()
            if value.strip("[]") in ("N/A", "Not Supported", "Unknown Error", ""):
                row[field] = None
            elif field in SMI_TEXT_FIELDS:
                row[field] = value
            else:
                row[field] = float(value.split()[0])  # tolerate units left in
        rows.append(row)
    return rows


def compare_gpu_figures(ours: Any, smi: dict[str, Any]) -> list[str]:
    """Differences beyond TOLERANCES between one HostProbe GpuFigures and one nvidia-smi
    row; figures either side lacks are not compared."""
    pairs = {"memory_total_mb": "memory.total", "memory_used_mb": "memory.used",
             "temperature_c": "temperature.gpu", "utilization_percent": "utilization.gpu",
             "power_w": "power.draw"}
    problems = []
    if ours.name != smi["name"]:
        problems.append(f"name: NVML {ours.name!r}, nvidia-smi {smi['name']!r}")
    for attribute, column in pairs.items():
        mine, theirs = getattr(ours, attribute), smi.get(column)
        if mine is not None and theirs is not None and abs(mine - theirs) > TOLERANCES[attribute]:
            problems.append(f"{attribute}: NVML {mine}, nvidia-smi {theirs} "
                            f"(tolerance {TOLERANCES[attribute]})")
    return problems


def compare_platform(gpus: Sequence[Any], driver: str | None,
                     smi: Sequence[dict[str, Any]]) -> list[str]:
    """Differences between devices.platform's GPU list (GpuInfo) and driver version and
    nvidia-smi's index,name,compute_cap,memory.total,driver_version rows."""
    problems = []
    if len(gpus) != len(smi):
        problems.append(f"devices.platform lists {len(gpus)} GPUs, nvidia-smi {len(smi)}")
    if smi and driver != smi[0]["driver_version"]:
        problems.append(f"driver: ours {driver!r}, nvidia-smi {smi[0]['driver_version']!r}")
    for ours, theirs in zip(gpus, smi, strict=False):
        capability = "sm_" + str(theirs["compute_cap"]).replace(".", "")
        if (ours.name, ours.compute_capability) != (theirs["name"], capability):
            problems.append(f"GPU {ours.index}: ours {ours.name} {ours.compute_capability}, "
                            f"nvidia-smi {theirs['name']} {capability}")
        if abs(ours.memory_mb - (theirs["memory.total"] or 0)) > TOLERANCES["memory_total_mb"]:
            problems.append(f"GPU {ours.index}: memory {ours.memory_mb} MiB, nvidia-smi "
                            f"{theirs['memory.total']}")
    return problems


def parse_pytest_summary(output: str) -> dict[str, int]:
    """pytest's last line ("1 failed, 3 passed, 2 skipped in 1.0s") -> counts by outcome."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return {}
    counts: dict[str, int] = {}
    for number, outcome in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|"
                                      r"xfailed|xpassed)", lines[-1]):
        counts["error" if outcome.startswith("error") else outcome] = int(number)
    return counts


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def render_report(steps: Sequence[Step], facts: dict[str, str], started: datetime,
                  seconds: float) -> str:
    totals = {status: sum(s.status == status for s in steps)
              for status in (PASSED, FAILED, SKIPPED)}
    lines = ["# Sightline GPU check", "",
             f"{started:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s; "
             f"{totals[PASSED]} passed, {totals[FAILED]} failed, {totals[SKIPPED]} skipped.",
             "", "| Step | Result | Detail |", "|---|---|---|"]
    lines += [f"| {_cell(s.name)} | {s.status} | {_cell(s.detail)} |" for s in steps]
    lines += ["", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    return "\n".join(lines) + "\n"

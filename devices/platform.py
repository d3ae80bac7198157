"""What kind of machine this is, read from files the OS already exposes (no CUDA needed)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

JETSON_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class Platform:
    jetson_model: str | None
    nvidia_driver: bool
    cpu_count: int

    @property
    def is_jetson(self) -> bool:
        return self.jetson_model is not None

    @property
    def has_nvidia_gpu(self) -> bool:
        return self.is_jetson or self.nvidia_driver


def detect_platform() -> Platform:
    jetson_model = None
    if JETSON_RELEASE.exists():
        try:
            jetson_model = DEVICE_TREE_MODEL.read_text().strip("\x00\n ") or "Jetson"
        except OSError:
            jetson_model = "Jetson"
    return Platform(
        jetson_model=jetson_model,
        nvidia_driver=NVIDIA_DRIVER.exists() or Path("/dev/nvidia0").exists(),
        cpu_count=_usable_cpus(),
    )


def _usable_cpus() -> int:
    # Affinity, not the machine's core count: containers and taskset restrict it.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

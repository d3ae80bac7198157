"""How busy and how hot this machine is: CPU, memory, load, temperatures, NVIDIA GPUs.

`HostProbe.sample()` is cheap enough to call every few seconds from a telemetry thread
(psutil reads /proc and /sys; NVML queries the driver). NVML (nvidia-ml-py) is imported
lazily and only used where it loads; without it `HostFigures.gpus` is None. Jetsons report
their GPU through tegrastats instead (devices/tegrastats.py). Nothing of Sightline's here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

THERMAL_ROOT = Path("/sys/class/thermal")
_MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GpuFigures:
    """One NVIDIA GPU through NVML; a figure the GPU does not support is None."""

    index: int
    name: str
    utilization_percent: int | None = None
    memory_used_mb: int | None = None
    memory_total_mb: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None


@dataclass(frozen=True)
class HostFigures:
    cpu_percent: float  # all cores, since the previous sample (psutil.cpu_percent)
    cpu_count: int
    memory_used_mb: int  # total - available: what programs cannot get back
    memory_total_mb: int
    load_average: tuple[float, float, float] | None  # 1, 5, 15 min; None where the OS has none
    temperatures_c: dict[str, float] = field(default_factory=dict)  # sensor -> degrees C
    gpus: tuple[GpuFigures, ...] | None = None  # None: no NVML here

    @property
    def memory_percent(self) -> float:
        return 100.0 * self.memory_used_mb / self.memory_total_mb if self.memory_total_mb else 0.0

    @property
    def max_temperature_c(self) -> float | None:
        return max(self.temperatures_c.values(), default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu_percent": self.cpu_percent,
            "cpu_count": self.cpu_count,
            "memory_used_mb": self.memory_used_mb,
            "memory_total_mb": self.memory_total_mb,
            "load_average": list(self.load_average) if self.load_average else None,
            "temperatures_c": dict(self.temperatures_c),
            "gpus": None if self.gpus is None else [
                {"index": g.index, "name": g.name,
                 "utilization_percent": g.utilization_percent,
                 "memory_used_mb": g.memory_used_mb, "memory_total_mb": g.memory_total_mb,
                 "temperature_c": g.temperature_c, "power_w": g.power_w}
                for g in self.gpus],
        }


class HostProbe:
    """Samples host figures. Create once and keep it: NVML is initialised once, and CPU %
    is measured between consecutive samples. `close()` shuts NVML down."""

    def __init__(self, *, thermal_root: Path = THERMAL_ROOT, use_nvml: bool = True) -> None:
        self._thermal_root = thermal_root
        self._nvml = _Nvml.open() if use_nvml else None
        psutil.cpu_percent(interval=None)  # primes the counter: the first sample measures from here

    def sample(self) -> HostFigures:
        memory = psutil.virtual_memory()
        return HostFigures(
            cpu_percent=psutil.cpu_percent(interval=None),
            cpu_count=psutil.cpu_count() or 1,
            memory_used_mb=(memory.total - memory.available) // _MB,
            memory_total_mb=memory.total // _MB,
            load_average=_load_average(),
            temperatures_c=read_temperatures(self._thermal_root),
            gpus=self._nvml.sample() if self._nvml is not None else None,
        )

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def __enter__(self) -> HostProbe:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _load_average() -> tuple[float, float, float] | None:
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):  # Windows has none
        return None
    return (one, five, fifteen)


def read_temperatures(thermal_root: Path = THERMAL_ROOT) -> dict[str, float]:
    """Sensor name -> degrees C: psutil's hwmon sensors where it has any, else the kernel's
    thermal zones (Jetsons and most ARM boards expose only those)."""
    temperatures: dict[str, float] = {}
    sensors = getattr(psutil, "sensors_temperatures", None)  # absent on macOS and Windows
    if sensors is not None:
        try:
            readings = sensors()
        except OSError:  # an unreadable hwmon file
            readings = {}
        for chip, entries in readings.items():
            for number, entry in enumerate(entries):
                name = f"{chip}/{entry.label or number}"
                if entry.current is not None and entry.current > -200:
                    temperatures.setdefault(name, float(entry.current))
    return temperatures or read_thermal_zones(thermal_root)


def read_thermal_zones(thermal_root: Path = THERMAL_ROOT) -> dict[str, float]:
    """/sys/class/thermal/thermal_zone*/{type,temp} (millidegrees) -> {type: degrees C}."""
    temperatures: dict[str, float] = {}
    try:
        zones = sorted(thermal_root.glob("thermal_zone*"))
    except OSError:
        return temperatures
    for zone in zones:
        try:
            kind = (zone / "type").read_text().strip() or zone.name
            millidegrees = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):  # a zone that is off reads EINVAL / ENODATA
            continue
        # Jetson sensors that are powered off read -256 C (-256000), like tegrastats' sentinel.
        if millidegrees > -200_000:
            temperatures.setdefault(kind, millidegrees / 1000.0)
    return temperatures


class _Nvml:
    """NVML handles, opened once. Any figure a GPU cannot give is None, never an error."""

    def __init__(self, nvml: Any, handles: list[tuple[int, str, Any]]) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def open(cls) -> _Nvml | None:
        try:
            import pynvml  # nvidia-ml-py's module name
        except ImportError:
            return None  # `pip install 'sightline[tensorrt]'` brings nvidia-ml-py
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:  # no driver: a CPU-only or Jetson machine
            log.debug("NVML not available: %s", exc)
            return None
        try:
            handles = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = pynvml.nvmlDeviceGetName(handle)
                handles.append((index, name.decode() if isinstance(name, bytes) else name,
                                handle))
        except pynvml.NVMLError as exc:
            log.warning("NVML initialised but could not list GPUs: %s", exc)
            pynvml.nvmlShutdown()
            return None
        return cls(pynvml, handles)

    def sample(self) -> tuple[GpuFigures, ...]:
        nvml = self._nvml
        figures = []
        for index, name, handle in self._handles:
            utilization = self._get(nvml.nvmlDeviceGetUtilizationRates, handle)
            memory = self._get(nvml.nvmlDeviceGetMemoryInfo, handle)
            temperature = self._get(nvml.nvmlDeviceGetTemperature, handle,
                                    nvml.NVML_TEMPERATURE_GPU)
            power_mw = self._get(nvml.nvmlDeviceGetPowerUsage, handle)
            figures.append(GpuFigures(
                index=index, name=name,
                utilization_percent=int(utilization.gpu) if utilization is not None else None,
                memory_used_mb=int(memory.used) // _MB if memory is not None else None,
                memory_total_mb=int(memory.total) // _MB if memory is not None else None,
                temperature_c=float(temperature) if temperature is not None else None,
                power_w=power_mw / 1000.0 if power_mw is not None else None,
            ))
        return tuple(figures)

    def _get(self, call, *args):
        try:
            return call(*args)
        except self._nvml.NVMLError:  # NOT_SUPPORTED on some boards, GPU_IS_LOST, ...
            return None

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()

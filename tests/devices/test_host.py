"""Host figures: this machine through psutil, thermal zones from a sysfs-shaped directory, and
NVML through a stand-in module (this machine has no NVIDIA GPU; the real NVML path is marked
gpu and runs where there is one)."""

from __future__ import annotations

import json
import sys
import time
import types
from collections import namedtuple
from pathlib import Path

import psutil
import pytest

from devices import host as host_module
from devices.host import HostProbe, read_temperatures, read_thermal_zones

Temperature = namedtuple("Temperature", "label current high critical")  # psutil's shwtemp


def test_host_sample_reports_this_machine():
    with HostProbe(use_nvml=False) as probe:
        psutil.cpu_percent()  # burn a little so the interval is not empty
        figures = probe.sample()
    assert 0.0 <= figures.cpu_percent <= 100.0
    assert figures.cpu_count == psutil.cpu_count()
    assert 0 < figures.memory_used_mb < figures.memory_total_mb
    assert figures.memory_total_mb == psutil.virtual_memory().total // (1024 * 1024)
    assert 0 < figures.memory_percent < 100
    if sys.platform.startswith("linux"):
        assert figures.load_average is not None and len(figures.load_average) == 3
    assert figures.gpus is None
    json.dumps(figures.to_json())


def test_sampling_is_cheap_enough_for_every_few_seconds():
    with HostProbe() as probe:
        probe.sample()
        started = time.perf_counter()
        for _ in range(20):
            probe.sample()
        per_sample = (time.perf_counter() - started) / 20
    assert per_sample < 0.1, f"{per_sample * 1e3:.1f} ms per sample"


def write_zone(root: Path, index: int, kind: str | None, temp: str | None) -> None:
    zone = root / f"thermal_zone{index}"
    zone.mkdir(parents=True)
    if kind is not None:
        (zone / "type").write_text(kind + "\n")
    if temp is not None:
        (zone / "temp").write_text(temp + "\n")


def test_thermal_zones_are_read_in_degrees_and_off_sensors_skipped(tmp_path: Path):
    # As a Jetson Orin exposes them: CV sensors powered off read -256000.
    write_zone(tmp_path, 0, "cpu-thermal", "48468")
    write_zone(tmp_path, 1, "gpu-thermal", "48562")
    write_zone(tmp_path, 2, "cv0-thermal", "-256000")
    write_zone(tmp_path, 3, "tj-thermal", "not a number")
    write_zone(tmp_path, 4, "soc0-thermal", None)  # unreadable
    assert read_thermal_zones(tmp_path) == {"cpu-thermal": 48.468, "gpu-thermal": 48.562}
    assert read_thermal_zones(tmp_path / "missing") == {}


def test_temperatures_fall_back_to_thermal_zones_when_psutil_has_none(tmp_path, monkeypatch):
    write_zone(tmp_path, 0, "cpu-thermal", "51000")
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {}, raising=False)
    assert read_temperatures(tmp_path) == {"cpu-thermal": 51.0}
    monkeypatch.delattr(psutil, "sensors_temperatures", raising=False)  # macOS, Windows
    assert read_temperatures(tmp_path) == {"cpu-thermal": 51.0}


def test_temperatures_come_from_psutil_sensors_where_there_are_any(tmp_path, monkeypatch):
    write_zone(tmp_path, 0, "cpu-thermal", "51000")
    readings = {"coretemp": [Temperature("Package id 0", 55.0, 80.0, 100.0),
                             Temperature("", 53.5, 80.0, 100.0)],
                "nvme": [Temperature("Composite", 38.85, 84.85, 84.85)]}
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: readings, raising=False)
    assert read_temperatures(tmp_path) == {"coretemp/Package id 0": 55.0, "coretemp/1": 53.5,
                                           "nvme/Composite": 38.85}


# -- NVML through a stand-in pynvml ------------------------------------------------------

class NVMLError(Exception):
    pass


def fake_pynvml(*, init_fails: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    module.NVMLError = NVMLError
    module.NVML_TEMPERATURE_GPU = 0
    module.calls = []
    gpus = [
        {"name": b"NVIDIA GeForce RTX 4090", "util": 37, "used": 3 * 1024**3,
         "total": 24 * 1024**3, "temp": 61, "power": 212_345},
        {"name": "NVIDIA T400", "util": 0, "used": 512 * 1024**2, "total": 2 * 1024**3,
         "temp": 40, "power": None},  # power reading not supported on this board
    ]

    def init():
        module.calls.append("init")
        if init_fails:
            raise NVMLError("Driver Not Loaded")

    def power(handle):
        if gpus[handle]["power"] is None:
            raise NVMLError("Not Supported")
        return gpus[handle]["power"]

    module.nvmlInit = init
    module.nvmlShutdown = lambda: module.calls.append("shutdown")
    module.nvmlDeviceGetCount = lambda: len(gpus)
    module.nvmlDeviceGetHandleByIndex = lambda index: index
    module.nvmlDeviceGetName = lambda h: gpus[h]["name"]
    module.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=gpus[h]["util"],
                                                                           memory=5)
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        used=gpus[h]["used"], total=gpus[h]["total"], free=gpus[h]["total"] - gpus[h]["used"])
    module.nvmlDeviceGetTemperature = lambda h, sensor: gpus[h]["temp"]
    module.nvmlDeviceGetPowerUsage = power
    return module


def test_nvml_figures_per_gpu_with_unsupported_ones_as_none(monkeypatch):
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    probe = HostProbe()
    first, second = probe.sample().gpus
    assert (first.index, first.name, first.utilization_percent) == (0, "NVIDIA GeForce RTX 4090",
                                                                   37)
    assert (first.memory_used_mb, first.memory_total_mb) == (3072, 24576)
    assert (first.temperature_c, first.power_w) == (61.0, pytest.approx(212.345))
    assert second.name == "NVIDIA T400" and second.power_w is None
    assert second.memory_used_mb == 512
    probe.close()
    assert nvml.calls == ["init", "shutdown"]  # initialised once, however many samples


def test_no_nvml_module_means_no_gpu_figures(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert HostProbe().sample().gpus is None


def test_nvml_without_a_driver_means_no_gpu_figures(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_fails=True))
    assert HostProbe().sample().gpus is None


@pytest.mark.gpu
def test_real_nvml_reports_every_gpu():
    pytest.importorskip("pynvml", reason="needs nvidia-ml-py (pip install 'sightline[tensorrt]')")
    with HostProbe() as probe:
        gpus = probe.sample().gpus
    assert gpus, "NVML found no GPU on a machine with the NVIDIA driver"
    for gpu in gpus:
        assert gpu.memory_total_mb and gpu.memory_total_mb > 0
        assert gpu.utilization_percent is None or 0 <= gpu.utilization_percent <= 100


def test_module_imports_nothing_of_sightline():
    source = Path(host_module.__file__).read_text()
    assert "from runtime" not in source and "import runtime" not in source

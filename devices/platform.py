"""What kind of machine this is: a Jetson (model, L4T/JetPack, module facts), NVIDIA desktop
GPUs (through NVML), or CPU only.

Everything is read from files the OS already exposes, under an injectable `root`, so tests run
on captured files; NVML (nvidia-ml-py) is imported lazily and only where the NVIDIA driver is
loaded. No CUDA is needed, and nothing of Sightline's is imported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

JETSON_RELEASE = Path("etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("proc/device-tree/model")
DEVICE_TREE_COMPATIBLE = Path("proc/device-tree/compatible")
NVIDIA_DRIVER = Path("proc/driver/nvidia/version")
NVIDIA_DEVICE = Path("dev/nvidia0")
MEMINFO = Path("proc/meminfo")

PlatformKind = Literal["jetson", "desktop-gpu", "cpu"]

# L4T (Jetson Linux) release -> JetPack release, JetPack 4.6 to 6.2.1. Sources, which agree
# on every row kept here: NVIDIA's JetPack archive (developer.nvidia.com/embedded/
# jetpack-archive) as tabulated in dusty-nv/jetson-containers
# jetson_containers/l4t_version.py (NVIDIA_JETPACK, commit 79260de) and rbonghi/jetson_stats
# jtop/core/jetson_variables.py (NVIDIA_JETPACK). The one disagreement: 36.4.2 is "6.1.1" in
# jetson-containers and "6.1 (rev1)" in jetson_stats; we follow jetson-containers. An L4T
# release missing here maps to None, never to a neighbour's JetPack. JetPack strings are for
# people; compare L4T versions (`JetsonInfo.l4t_version`) in code.
L4T_TO_JETPACK: dict[str, str] = {
    # JetPack 4 (L4T R32, Ubuntu 18.04): Nano, TX1, TX2, Xavier
    "32.6.1": "4.6",
    "32.7.1": "4.6.1",
    "32.7.2": "4.6.2",
    "32.7.3": "4.6.3",
    "32.7.4": "4.6.4",
    "32.7.5": "4.6.5",
    "32.7.6": "4.6.6",
    # JetPack 5 (L4T R34/R35, Ubuntu 20.04): Xavier, Orin
    "34.1.0": "5.0 DP",
    "34.1.1": "5.0.1 DP",
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "35.6.1": "5.1.5",
    "35.6.2": "5.1.5",
    # JetPack 6 (L4T R36, Ubuntu 22.04): Orin only
    "36.2.0": "6.0 DP",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.2": "6.1.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
    "36.4.7": "6.2.1",
}

# "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: ..."
_RELEASE_LINE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")
_DRIVER_VERSION = re.compile(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d+(?:\.\d+)+)")
_MEM_TOTAL = re.compile(r"^MemTotal:\s+(\d+)\s+kB", re.MULTILINE)
_PART_NUMBER = re.compile(r"\bp(\d{4})-(\d{4})")


@dataclass(frozen=True)
class SoC:
    """A Tegra chip's integrated GPU, the part TensorRT engines are built for."""

    family: str  # "orin", "xavier", "tx2", "nano" (the Nano and TX1 share the tegra210)
    gpu: str
    compute_capability: str


# Compute capabilities per NVIDIA's CUDA GPU table (Nano/TX1 5.3, TX2 6.2, Xavier 7.2,
# Orin 8.7), as also used by jetson_stats (CUDA_TABLE) and jetson-containers.
SOCS: dict[str, SoC] = {
    "tegra234": SoC("orin", "Ampere (ga10b)", "sm_87"),
    "tegra194": SoC("xavier", "Volta (gv11b)", "sm_72"),
    "tegra186": SoC("tx2", "Pascal (gp10b)", "sm_62"),
    "tegra210": SoC("nano", "Maxwell (gm20b)", "sm_53"),
}


@dataclass(frozen=True)
class Module:
    name: str
    soc: str
    dla_cores: int


# Module part numbers (the SKU after the board id in the device tree's compatible string)
# -> module. DLA counts from NVIDIA's module data sheets: AGX Orin, Orin NX 16GB, AGX Xavier
# and Xavier NX have two NVDLA engines, Orin NX 8GB one, Orin Nano, Nano and TX2 none.
MODULES: dict[str, Module] = {
    "p3701-0000": Module("Jetson AGX Orin", "tegra234", 2),
    "p3701-0004": Module("Jetson AGX Orin 32GB", "tegra234", 2),
    "p3701-0005": Module("Jetson AGX Orin 64GB", "tegra234", 2),
    "p3701-0008": Module("Jetson AGX Orin Industrial", "tegra234", 2),
    "p3767-0000": Module("Jetson Orin NX 16GB", "tegra234", 2),
    "p3767-0001": Module("Jetson Orin NX 8GB", "tegra234", 1),
    "p3767-0003": Module("Jetson Orin Nano 8GB", "tegra234", 0),
    "p3767-0004": Module("Jetson Orin Nano 4GB", "tegra234", 0),
    "p3767-0005": Module("Jetson Orin Nano 8GB (developer kit)", "tegra234", 0),
    "p2888-0001": Module("Jetson AGX Xavier 16GB", "tegra194", 2),
    "p2888-0004": Module("Jetson AGX Xavier 32GB", "tegra194", 2),
    "p2888-0005": Module("Jetson AGX Xavier 64GB", "tegra194", 2),
    "p2888-0008": Module("Jetson AGX Xavier Industrial", "tegra194", 2),
    "p3668-0000": Module("Jetson Xavier NX (developer kit)", "tegra194", 2),
    "p3668-0001": Module("Jetson Xavier NX", "tegra194", 2),
    "p3668-0003": Module("Jetson Xavier NX 16GB", "tegra194", 2),
    "p3448-0000": Module("Jetson Nano (developer kit)", "tegra210", 0),
    "p3448-0002": Module("Jetson Nano", "tegra210", 0),
    "p3448-0003": Module("Jetson Nano 2GB", "tegra210", 0),
    "p3310-1000": Module("Jetson TX2", "tegra186", 0),
    "p3636-0001": Module("Jetson TX2 NX", "tegra186", 0),
}

# When the compatible string names no known part (a container without /proc/device-tree
# compatible, a custom carrier), the model string still tells the family. Most specific first.
# Orin NX without its SKU is taken as the 8GB module's single DLA core: DLA core 0 exists on
# both, and a build that asks for a second core on the 8GB module would fail.
_MODEL_KEYWORDS: tuple[tuple[str, Module], ...] = (
    ("agx orin", Module("Jetson AGX Orin", "tegra234", 2)),
    ("orin nx", Module("Jetson Orin NX", "tegra234", 1)),
    ("orin nano", Module("Jetson Orin Nano", "tegra234", 0)),
    ("orin", Module("Jetson Orin", "tegra234", 0)),
    ("agx xavier", Module("Jetson AGX Xavier", "tegra194", 2)),
    ("xavier nx", Module("Jetson Xavier NX", "tegra194", 2)),
    ("xavier", Module("Jetson Xavier", "tegra194", 2)),
    ("tx2", Module("Jetson TX2", "tegra186", 0)),
    ("nano", Module("Jetson Nano", "tegra210", 0)),
    ("tx1", Module("Jetson TX1", "tegra210", 0)),
)


@dataclass(frozen=True)
class JetsonInfo:
    model: str  # the device tree's own words, e.g. "NVIDIA Jetson AGX Orin Developer Kit"
    module: str  # e.g. "Jetson Orin Nano 8GB (developer kit)"; "Jetson" when unknown
    family: str | None  # "orin", "xavier", "tx2", "nano"; None when unknown
    soc: str | None  # "tegra234"
    part_number: str | None  # "p3767-0005"
    l4t: str | None  # "36.4.3"
    jetpack: str | None  # "6.2"; None when the L4T release is not in L4T_TO_JETPACK
    gpu: str | None  # the integrated GPU, e.g. "Ampere (ga10b)"
    compute_capability: str | None  # "sm_87"
    dla_cores: int
    memory_mb: int | None  # shared by CPU and GPU on a Jetson
    super_mode: bool = False  # an Orin Nano/NX flashed with the "Super" (MAXN_SUPER) configuration

    @property
    def l4t_version(self) -> tuple[int, ...] | None:
        """The L4T release as numbers, for comparisons: (36, 4, 3)."""
        return tuple(int(part) for part in self.l4t.split(".")) if self.l4t else None


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str  # "NVIDIA GeForce RTX 4090"
    compute_capability: str  # "sm_89"
    memory_mb: int


@dataclass(frozen=True)
class Platform:
    jetson_model: str | None
    nvidia_driver: bool
    cpu_count: int
    jetson: JetsonInfo | None = None
    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    # Why a machine with an NVIDIA driver lists no GPUs (NVML missing or failing), else None.
    gpu_problem: str | None = None

    @property
    def is_jetson(self) -> bool:
        return self.jetson_model is not None

    @property
    def has_nvidia_gpu(self) -> bool:
        return self.is_jetson or self.nvidia_driver

    @property
    def kind(self) -> PlatformKind:
        if self.is_jetson:
            return "jetson"
        return "desktop-gpu" if self.nvidia_driver else "cpu"

    @property
    def compute_capability(self) -> str | None:
        """The GPU that CUDA calls device 0: the one engines are built for by default."""
        if self.jetson is not None:
            return self.jetson.compute_capability
        return self.gpus[0].compute_capability if self.gpus else None


def detect_platform(root: Path = Path("/"), *, gpus: Sequence[GpuInfo] | None = None) -> Platform:
    """Describe this machine from the files under `root`.

    `gpus` replaces the NVML query (tests, or a caller that already has them); by default
    NVML is asked only when the NVIDIA desktop driver is loaded, so CPU-only machines and
    Jetsons (which have no NVML) never import it.
    """
    root = Path(root)
    jetson = read_jetson(root)
    nvidia_driver = (root / NVIDIA_DRIVER).exists() or (root / NVIDIA_DEVICE).exists()
    driver_version = parse_driver_version(_read_text(root / NVIDIA_DRIVER) or "")
    gpu_problem = None
    if gpus is None:
        gpus = ()
        if nvidia_driver and jetson is None:
            try:
                gpus, nvml_driver = query_nvml()
                driver_version = driver_version or nvml_driver
            except NvmlUnavailable as exc:
                gpu_problem = str(exc)
    return Platform(
        jetson_model=jetson.model if jetson else None,
        nvidia_driver=nvidia_driver,
        cpu_count=_usable_cpus(),
        jetson=jetson,
        gpus=tuple(gpus),
        driver_version=driver_version,
        gpu_problem=gpu_problem,
    )


def read_jetson(root: Path = Path("/")) -> JetsonInfo | None:
    """The Jetson this is, or None. A Jetson is told by /etc/nv_tegra_release (every L4T image
    has it) or, in containers that do not mount that file, by a Tegra SoC in the device tree."""
    release = _read_text(root / JETSON_RELEASE)
    compatible = read_device_tree_strings(root / DEVICE_TREE_COMPATIBLE)
    soc_name = next((s.split(",", 1)[1] for s in compatible if s.startswith("nvidia,tegra")
                     and s.split(",", 1)[1] in SOCS), None)
    if release is None and soc_name is None:
        return None
    model_strings = read_device_tree_strings(root / DEVICE_TREE_MODEL)
    model = model_strings[0] if model_strings else "Jetson"

    known = _module_from_compatible(compatible)
    part_number, module = known if known else (None, _module_from_model(model))
    l4t = parse_l4t_release(release) if release else None
    soc_name = soc_name or (module.soc if module else None)
    if soc_name is None and l4t and l4t.startswith("36."):
        soc_name = "tegra234"  # JetPack 6 (L4T R36) runs on Orin modules only
    soc = SOCS.get(soc_name) if soc_name else None
    return JetsonInfo(
        model=model,
        module=module.name if module else f"Jetson ({soc_name or 'module unknown'})",
        family=soc.family if soc else None,
        soc=soc_name,
        part_number=part_number,
        l4t=l4t,
        jetpack=L4T_TO_JETPACK.get(l4t) if l4t else None,
        gpu=soc.gpu if soc else None,
        compute_capability=soc.compute_capability if soc else None,
        dla_cores=module.dla_cores if module else 0,
        memory_mb=read_memory_mb(root),
        super_mode=any(s.endswith("-super") for s in compatible) or model.endswith(" Super"),
    )


def parse_l4t_release(text: str) -> str | None:
    """"# R36 (release), REVISION: 4.3, ..." -> "36.4.3" (first line of /etc/nv_tegra_release)."""
    match = _RELEASE_LINE.search(text)
    if not match:
        return None
    parts = [match.group(1), *match.group(2).split(".")]
    while len(parts) < 3:
        parts.append("0")
    return ".".join(str(int(part)) for part in parts[:3])


def parse_driver_version(text: str) -> str | None:
    """"NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  ..." -> "550.54.14"."""
    match = _DRIVER_VERSION.search(text)
    return match.group(1) if match else None


def read_device_tree_strings(path: Path) -> list[str]:
    """A device-tree string property: NUL-terminated, several NUL-separated for `compatible`."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    return [s.decode("utf-8", "replace").strip() for s in data.split(b"\x00") if s.strip()]


def read_memory_mb(root: Path = Path("/")) -> int | None:
    match = _MEM_TOTAL.search(_read_text(root / MEMINFO) or "")
    return int(match.group(1)) // 1024 if match else None


class NvmlUnavailable(RuntimeError):
    """NVML could not list the GPUs; the message says why and what to install."""


def query_nvml() -> tuple[tuple[GpuInfo, ...], str]:
    """Every GPU NVML sees, in NVML's index order, and the driver version."""
    try:
        import pynvml  # nvidia-ml-py's module name
    except ImportError:
        raise NvmlUnavailable(
            "nvidia-ml-py is not installed, so GPUs cannot be listed: "
            "pip install 'sightline[tensorrt]'"
        ) from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML could not start: {exc}") from None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(GpuInfo(
                index=index,
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                compute_capability=f"sm_{major}{minor}",
                memory_mb=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // (1024 * 1024),
            ))
        return tuple(gpus), _text(pynvml.nvmlSystemGetDriverVersion())
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML failed while listing GPUs: {exc}") from None
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns str since 11.5; older releases (still on some images) return bytes.
    return value.decode() if isinstance(value, bytes) else value


def _module_from_compatible(compatible: list[str]) -> tuple[str, Module] | None:
    """(part number, module) of the first known module part in the compatible strings."""
    for entry in compatible:
        # "nvidia,p3768-0000+p3767-0005-super": carrier board first, module after the "+"
        for board in reversed(entry.split(",", 1)[-1].split("+")):
            match = _PART_NUMBER.search(board)
            part = f"p{match.group(1)}-{match.group(2)}" if match else None
            if part in MODULES:
                return part, MODULES[part]
    return None


def _module_from_model(model: str) -> Module | None:
    lowered = model.lower()
    return next((module for keyword, module in _MODEL_KEYWORDS if keyword in lowered), None)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _usable_cpus() -> int:
    # Affinity, not the machine's core count: containers and taskset restrict it.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def current_gpu(platform: Platform | None = None) -> tuple[str, str]:
    """(GPU name, compute capability) that engines are built for: the Jetson's integrated GPU
    or the first desktop GPU. Raises RuntimeError when there is none."""
    platform = platform or detect_platform()
    if platform.jetson is not None and platform.jetson.compute_capability:
        return platform.jetson.module, platform.jetson.compute_capability
    if platform.gpus:
        return platform.gpus[0].name, platform.gpus[0].compute_capability
    problem = f": {platform.gpu_problem}" if platform.gpu_problem else ""
    raise RuntimeError(f"no NVIDIA GPU found{problem}")

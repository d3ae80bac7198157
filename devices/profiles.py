"""Per-device-class defaults that `sightline compile` and `serve` start from: precision,
DLA use, TensorRT workspace and backend order.

`profile_for(platform)` picks a class and fills in what the hardware says (compute
capability, DLA cores); operators override the rest from a TOML file or a dict. Plain
dataclasses with a small validation keep this leaf package free of pydantic.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from devices.platform import Platform

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("tensorrt", "onnxruntime")


class ProfileError(ValueError):
    """A profile override is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str  # "jetson-orin", "jetson-xavier", "jetson-nano", "desktop-gpu", "cpu"
    precision: str  # the precision variant compile builds and serve prefers: fp32|fp16|int8
    backends: tuple[str, ...]  # tried in order; the first one present on the machine wins
    workspace_mb: int  # TensorRT builder workspace (memory pool) limit; 0 without TensorRT
    dla_cores: int  # DLA engines compile may place layers on; 0: GPU only
    compute_capability: str | None = None  # "sm_87"; what TensorRT engines are built for

    @property
    def has_dla(self) -> bool:
        return self.dla_cores > 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["backends"] = list(self.backends)
        return data


# Why these defaults:
# - fp16 on every NVIDIA GPU: all of them (Maxwell gm20b in the Nano included) run fp16 at
#   twice the fp32 rate or on tensor cores, the DLA accepts only fp16/int8, and fp16 needs
#   no calibration data, so any bundle can be built at it.
# - fp32 on CPU, not int8: int8 needs a calibrated (QDQ) variant that most bundles do not
#   ship, its speed-up on ONNX Runtime's CPU provider depends on VNNI/dot-product support,
#   and its accuracy on calibration. A bundle's int8 variant is chosen by overriding
#   precision, once it has been measured on the device.
# - Workspace: Jetsons share one DRAM between CPU and GPU, so the builder's scratch must
#   leave room for the OS and the daemon: 256 MB on the 4 GB Nano, 1 GB on Xavier/Orin (the
#   Orin Nano has 4-8 GB); desktop GPUs have dedicated memory to spare.
# - DLA counts here are the class's usual maximum; profile_for replaces them with what the
#   module actually has (an Orin Nano has none).
PROFILES: Mapping[str, DeviceProfile] = MappingProxyType({
    "jetson-orin": DeviceProfile("jetson-orin", "fp16", ("tensorrt", "onnxruntime"), 1024, 2),
    "jetson-xavier": DeviceProfile("jetson-xavier", "fp16", ("tensorrt", "onnxruntime"), 1024, 2),
    "jetson-nano": DeviceProfile("jetson-nano", "fp16", ("tensorrt", "onnxruntime"), 256, 0),
    "desktop-gpu": DeviceProfile("desktop-gpu", "fp16", ("tensorrt", "onnxruntime"), 4096, 0),
    "cpu": DeviceProfile("cpu", "fp32", ("onnxruntime",), 0, 0),
})

# The Jetson SoC family -> profile class. TX1 and TX2 (JetPack 4, no DLA, small shared
# memory) take the Nano's; a Jetson whose family cannot be read takes the Nano's too, the
# most conservative one.
_JETSON_CLASSES = {"orin": "jetson-orin", "xavier": "jetson-xavier", "nano": "jetson-nano",
                   "tx2": "jetson-nano"}

OVERRIDABLE = ("precision", "backends", "workspace_mb", "dla_cores")
_NOT_OVERRIDABLE = {"compute_capability": "is read from the hardware",
                    "name": "is the device class, given by the table name"}


def profile_class(platform: Platform) -> str:
    """Which of PROFILES describes this machine."""
    if platform.jetson is not None:
        return _JETSON_CLASSES.get(platform.jetson.family or "", "jetson-nano")
    if platform.is_jetson:  # a Platform built by hand with only the model string
        return "jetson-nano"
    return "desktop-gpu" if platform.has_nvidia_gpu else "cpu"


def profile_for(
    platform: Platform,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    profiles: Mapping[str, DeviceProfile] = PROFILES,
) -> DeviceProfile:
    """The profile for this machine: its class's defaults, then the hardware's facts, then
    the operator's overrides for that class (keyed by class name, as in `load_overrides`)."""
    name = profile_class(platform)
    profile = replace(profiles[name], compute_capability=platform.compute_capability)
    if platform.jetson is not None:
        profile = replace(profile, dla_cores=platform.jetson.dla_cores)
    elif platform.kind == "desktop-gpu":
        profile = replace(profile, dla_cores=0)
    hardware_dla = profile.dla_cores
    if overrides:
        validate_overrides(overrides)
        if name in overrides:
            profile = replace(profile, **_coerce(name, overrides[name]))
    if profile.dla_cores > hardware_dla:
        raise ProfileError(
            f"profiles.{name}.dla_cores = {profile.dla_cores}, but this machine has "
            f"{hardware_dla} DLA core{'s' if hardware_dla != 1 else ''}; "
            f"set it to {hardware_dla} or less"
        )
    return profile


def load_overrides(path: Path) -> dict[str, dict[str, Any]]:
    """The `[profiles.<class>]` tables of a TOML file (other tables are left to their owners),
    validated: e.g. `[profiles.jetson-orin]` with `precision = "int8"`."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ProfileError(f"profile file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path} is not valid TOML: {exc}") from None
    overrides = data.get("profiles", {})
    if not isinstance(overrides, dict):
        raise ProfileError(f"{path}: `profiles` must be a table of [profiles.<class>] tables")
    validate_overrides(overrides)
    return overrides


def validate_overrides(overrides: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise ProfileError naming every bad key; unknown classes and keys are errors, so a typo
    never silently keeps a default."""
    problems = []
    for name, values in overrides.items():
        if name not in PROFILES:
            problems.append(f"profiles.{name}: unknown device class; "
                            f"known: {', '.join(PROFILES)}")
            continue
        if not isinstance(values, Mapping):
            problems.append(f"profiles.{name}: must be a table of settings")
            continue
        try:
            _coerce(name, values)
        except ProfileError as exc:
            problems.append(str(exc))
    if problems:
        raise ProfileError("invalid device profile overrides:\n  " + "\n  ".join(problems))


def _coerce(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in values.items():
        where = f"profiles.{name}.{key}"
        if key not in OVERRIDABLE:
            reason = _NOT_OVERRIDABLE.get(key, "is not a profile setting")
            raise ProfileError(f"{where} {reason}; overridable: {', '.join(OVERRIDABLE)}")
        if key == "precision":
            if value not in PRECISIONS:
                raise ProfileError(f"{where} = {value!r}; must be one of {', '.join(PRECISIONS)}")
        elif key == "backends":
            if (isinstance(value, str) or not isinstance(value, (list, tuple)) or not value
                    or any(b not in BACKENDS for b in value) or len(set(value)) != len(value)):
                raise ProfileError(f"{where} = {value!r}; must be a non-empty list of distinct "
                                   f"backends from {', '.join(BACKENDS)}")
            value = tuple(value)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProfileError(f"{where} = {value!r}; must be a whole number >= 0")
        result[key] = value
    return result

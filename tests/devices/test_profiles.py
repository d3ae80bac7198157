"""Device profiles: the class each captured machine falls into, its defaults, and operator
overrides from TOML or a dict (validated, unknown keys refused)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from devices.platform import GpuInfo, detect_platform
from devices.profiles import (
    PROFILES,
    DeviceProfile,
    ProfileError,
    load_overrides,
    profile_class,
    profile_for,
    validate_overrides,
)
from tests.conftest import SIGHTLINE

FIXTURES = Path(__file__).parent / "fixtures"
RTX = (GpuInfo(0, "NVIDIA GeForce RTX 4090", "sm_89", 24564),
       GpuInfo(1, "NVIDIA GeForce RTX 3060", "sm_86", 12288))


def _platform(board: str, gpus: tuple[GpuInfo, ...] = ()):
    return detect_platform(FIXTURES / board, gpus=gpus)


@pytest.mark.parametrize(
    ("board", "name", "precision", "backends", "dla", "capability"),
    [
        ("jetson-agx-orin-jp60", "jetson-orin", "fp16", ("tensorrt", "onnxruntime"), 2, "sm_87"),
        ("jetson-orin-nano-super-jp62", "jetson-orin", "fp16", ("tensorrt", "onnxruntime"), 0,
         "sm_87"),
        ("jetson-xavier-nx-jp512", "jetson-xavier", "fp16", ("tensorrt", "onnxruntime"), 2,
         "sm_72"),
        ("jetson-nano-jp461", "jetson-nano", "fp16", ("tensorrt", "onnxruntime"), 0, "sm_53"),
        ("x86-cpu-only", "cpu", "fp32", ("onnxruntime",), 0, None),
    ],
)
def test_each_captured_machine_gets_its_class_profile_with_its_hardware_facts(
    board, name, precision, backends, dla, capability
):
    profile = profile_for(_platform(board))
    assert (profile.name, profile.precision, profile.backends) == (name, precision, backends)
    assert profile.dla_cores == dla and profile.has_dla == (dla > 0)
    assert profile.compute_capability == capability


def test_desktop_with_several_gpus_builds_for_device_0():
    profile = profile_for(_platform("desktop-rtx", RTX))
    assert profile.name == "desktop-gpu" and profile.precision == "fp16"
    assert profile.compute_capability == "sm_89" and profile.dla_cores == 0


def test_gpu_profiles_leave_room_for_the_os_on_shared_memory_jetsons():
    assert PROFILES["jetson-nano"].workspace_mb < PROFILES["jetson-orin"].workspace_mb
    assert PROFILES["jetson-orin"].workspace_mb < PROFILES["desktop-gpu"].workspace_mb
    assert PROFILES["cpu"].workspace_mb == 0 and "tensorrt" not in PROFILES["cpu"].backends


def test_profiles_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PROFILES["cpu"].precision = "int8"  # type: ignore[misc]
    with pytest.raises(TypeError):
        PROFILES["cpu"] = PROFILES["jetson-orin"]  # type: ignore[index]


def test_toml_overrides_change_only_their_class_and_other_tables_are_ignored(tmp_path: Path):
    path = tmp_path / "sightline.toml"
    path.write_text(
        'models = ["centerface"]\n'
        "[server]\ndeadline_ms = 100\n"
        '[profiles.jetson-orin]\nprecision = "int8"\nworkspace_mb = 2048\n'
        '[profiles.cpu]\nprecision = "int8"\n'
    )
    overrides = load_overrides(path)
    orin = profile_for(_platform("jetson-agx-orin-jp60"), overrides)
    assert (orin.precision, orin.workspace_mb, orin.dla_cores) == ("int8", 2048, 2)
    xavier = profile_for(_platform("jetson-xavier-nx-jp512"), overrides)
    assert xavier == profile_for(_platform("jetson-xavier-nx-jp512"))
    assert profile_for(_platform("x86-cpu-only"), overrides).precision == "int8"


def test_dict_override_can_turn_dla_off_and_reorder_backends():
    profile = profile_for(_platform("jetson-agx-orin-jp60"),
                          {"jetson-orin": {"dla_cores": 0, "backends": ["onnxruntime"]}})
    assert profile.dla_cores == 0 and not profile.has_dla
    assert profile.backends == ("onnxruntime",)


def test_asking_for_more_dla_cores_than_the_module_has_is_refused():
    with pytest.raises(ProfileError, match=r"jetson-orin\.dla_cores = 2, but this machine "
                                           r"has 0 DLA cores"):
        profile_for(_platform("jetson-orin-nano-super-jp62"), {"jetson-orin": {"dla_cores": 2}})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"jetson-orn": {"precision": "fp16"}}, "profiles.jetson-orn: unknown device class"),
        ({"cpu": {"precison": "fp16"}}, "profiles.cpu.precison is not a profile setting"),
        ({"cpu": {"precision": "bf16"}}, "must be one of fp32, fp16, int8"),
        ({"cpu": {"backends": ["openvino"]}}, "non-empty list of distinct backends"),
        ({"cpu": {"backends": "onnxruntime"}}, "non-empty list of distinct backends"),
        ({"cpu": {"backends": []}}, "non-empty list of distinct backends"),
        ({"jetson-orin": {"workspace_mb": -1}}, "must be a whole number >= 0"),
        ({"jetson-orin": {"workspace_mb": True}}, "must be a whole number >= 0"),
        ({"jetson-orin": {"compute_capability": "sm_90"}}, "is read from the hardware"),
        ({"jetson-orin": {"name": "fast"}}, "is the device class"),
        ({"cpu": "fp32"}, "profiles.cpu: must be a table of settings"),
    ],
)
def test_bad_override_is_an_error_naming_the_key(overrides, message):
    with pytest.raises(ProfileError, match="invalid device profile overrides") as caught:
        validate_overrides(overrides)
    assert message in str(caught.value)


def test_every_problem_in_an_override_file_is_reported_at_once(tmp_path: Path):
    path = tmp_path / "profiles.toml"
    path.write_text('[profiles.cpu]\nprecision = "bf16"\n[profiles.jetson-nanoo]\n')
    with pytest.raises(ProfileError) as caught:
        load_overrides(path)
    assert "profiles.cpu.precision" in str(caught.value)
    assert "profiles.jetson-nanoo" in str(caught.value)


def test_missing_or_malformed_profile_file_is_a_profile_error(tmp_path: Path):
    with pytest.raises(ProfileError, match="does not exist"):
        load_overrides(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[profiles.cpu\n")
    with pytest.raises(ProfileError, match="is not valid TOML"):
        load_overrides(bad)


def test_a_jetson_whose_family_is_unknown_gets_the_most_conservative_profile(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(
        "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
        "DATE: Tue Aug  1 19:57:35 UTC 2023\n")
    platform = detect_platform(tmp_path)  # R35 runs on Xavier and Orin: no way to tell
    assert platform.jetson.family is None and profile_class(platform) == "jetson-nano"
    assert profile_for(platform).dla_cores == 0


def test_profile_serialises_for_json():
    data = PROFILES["jetson-orin"].to_dict()
    assert data["backends"] == ["tensorrt", "onnxruntime"]
    assert DeviceProfile(**{**data, "backends": tuple(data["backends"])}) == PROFILES["jetson-orin"]


def test_devices_command_turns_a_bad_profile_file_into_one_red_line(tmp_path: Path):
    path = tmp_path / "profiles.toml"
    path.write_text('[profiles.cpu]\nprecision = "bf16"\n')
    done = subprocess.run([*SIGHTLINE, "devices", "--profiles", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "profiles.cpu.precision = 'bf16'" in done.stderr
    assert "Traceback" not in done.stderr

"""Platform detection on captured device files: Jetson model, L4T/JetPack, module facts,
desktop driver and GPUs, CPU only; and `sightline devices` showing it.

The fixture roots under fixtures/ hold real /etc/nv_tegra_release lines and device-tree
strings (sources in fixtures/README.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devices.platform import (
    L4T_TO_JETPACK,
    GpuInfo,
    NvmlUnavailable,
    Platform,
    detect_platform,
    parse_driver_version,
    parse_l4t_release,
    query_nvml,
    read_device_tree_strings,
)
from tests.conftest import SIGHTLINE

FIXTURES = Path(__file__).parent / "fixtures"
NO_GPUS: tuple[GpuInfo, ...] = ()


@pytest.mark.parametrize(
    ("board", "model", "module", "l4t", "jetpack", "family", "capability", "dla", "memory_mb"),
    [
        ("jetson-agx-orin-jp60", "NVIDIA Jetson AGX Orin Developer Kit", "Jetson AGX Orin",
         "36.3.0", "6.0", "orin", "sm_87", 2, 62840),
        ("jetson-orin-nano-super-jp62",
         "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
         "Jetson Orin Nano 8GB (developer kit)", "36.4.3", "6.2", "orin", "sm_87", 0, 7620),
        ("jetson-xavier-nx-jp512", "NVIDIA Jetson Xavier NX Developer Kit",
         "Jetson Xavier NX (developer kit)", "35.4.1", "5.1.2", "xavier", "sm_72", 2, 7583),
        ("jetson-nano-jp461", "NVIDIA Jetson Nano Developer Kit", "Jetson Nano (developer kit)",
         "32.7.1", "4.6.1", "nano", "sm_53", 0, 3964),
    ],
)
def test_jetson_board_is_identified_from_its_device_tree_and_release_file(
    board, model, module, l4t, jetpack, family, capability, dla, memory_mb
):
    platform = detect_platform(FIXTURES / board)
    jetson = platform.jetson
    assert platform.kind == "jetson" and platform.is_jetson and platform.has_nvidia_gpu
    assert platform.jetson_model == model == jetson.model
    assert (jetson.module, jetson.l4t, jetson.jetpack, jetson.family) == (module, l4t, jetpack,
                                                                          family)
    assert jetson.compute_capability == platform.compute_capability == capability
    assert jetson.dla_cores == dla
    assert jetson.memory_mb == memory_mb
    assert platform.gpus == ()  # Jetsons have no NVML; their GPU is described by the SoC


def test_orin_nano_super_is_marked_super_and_other_boards_are_not():
    assert detect_platform(FIXTURES / "jetson-orin-nano-super-jp62").jetson.super_mode
    assert not detect_platform(FIXTURES / "jetson-agx-orin-jp60").jetson.super_mode


def test_l4t_version_compares_as_numbers():
    jetson = detect_platform(FIXTURES / "jetson-orin-nano-super-jp62").jetson
    assert jetson.l4t_version == (36, 4, 3)
    assert jetson.l4t_version > (36, 3, 0) > (35, 6, 1)


def test_device_tree_strings_lose_their_nul_terminators():
    tree = FIXTURES / "jetson-nano-jp461" / "proc" / "device-tree"
    assert (tree / "model").read_bytes().endswith(b"\x00")
    assert read_device_tree_strings(tree / "model") == ["NVIDIA Jetson Nano Developer Kit"]
    assert read_device_tree_strings(tree / "compatible") == [
        "nvidia,p3449-0000-b00+p3448-0000-b00", "nvidia,jetson-nano", "nvidia,tegra210"]


@pytest.mark.parametrize(
    ("line", "l4t"),
    [
        # Quoted by dusty-nv/jetson-containers jetson_containers/l4t_version.py
        ("# R32 (release), REVISION: 7.1, GCID: 29689809, BOARD: t186ref, EABI: aarch64, "
         "DATE: Wed Feb  2 21:33:23 UTC 2022", "32.7.1"),
        ("# R34 (release), REVISION: 1.1, GCID: 30414990, BOARD: t186ref, EABI: aarch64, "
         "DATE: Tue May 17 04:20:55 UTC 2022", "34.1.1"),
        ("# R35 (release), REVISION: 2.1, GCID: 32398013, BOARD: t186ref, EABI: aarch64, "
         "DATE: Sun Jan 22 03:18:23 UTC 2023", "35.2.1"),
        ("# R35 (release), REVISION: 3.1, GCID: 32790763, BOARD: t186ref, EABI: aarch64, "
         "DATE: Wed Mar 15 07:54:12 UTC 2023", "35.3.1"),
        # Captured on a Jetson Nano (JetPack 4.6.2 image)
        ("# R32 (release), REVISION: 7.2, GCID: 30192233, BOARD: t210ref, EABI: aarch64, "
         "DATE: Wed Apr 20 21:34:48 UTC 2022", "32.7.2"),
        ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
         "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n", "36.4.3"),
        ("not a release file", None),
    ],
)
def test_release_line_gives_the_three_part_l4t_version(line, l4t):
    assert parse_l4t_release(line) == l4t


@pytest.mark.parametrize(
    ("l4t", "jetpack"),
    [("32.6.1", "4.6"), ("32.7.1", "4.6.1"), ("32.7.6", "4.6.6"), ("35.1.0", "5.0.2"),
     ("35.2.1", "5.1"), ("35.4.1", "5.1.2"), ("35.6.0", "5.1.4"), ("36.3.0", "6.0"),
     ("36.4.0", "6.1"), ("36.4.3", "6.2"), ("36.4.4", "6.2.1")],
)
def test_l4t_releases_map_to_their_jetpack(l4t, jetpack):
    assert L4T_TO_JETPACK[l4t] == jetpack


def test_unlisted_l4t_release_has_no_jetpack_rather_than_a_neighbours(tmp_path: Path):
    # R36.5.0 is a real release (captured in a 2026 benchmark log) that the table predates.
    root = _copy_board("jetson-agx-orin-jp60", tmp_path)
    (root / "etc" / "nv_tegra_release").write_text(
        "# R36 (release), REVISION: 5.0, GCID: 43688277, BOARD: generic, EABI: aarch64, "
        "DATE: Fri Jan 16 03:50:45 UTC 2026\n")
    jetson = detect_platform(root).jetson
    assert jetson.l4t == "36.5.0" and jetson.jetpack is None
    assert jetson.module == "Jetson AGX Orin"


def test_container_without_device_tree_on_l4t_36_is_still_an_orin():
    jetson = detect_platform(FIXTURES / "jetson-container-no-device-tree").jetson
    assert (jetson.model, jetson.l4t, jetson.jetpack) == ("Jetson", "36.4.7", "6.2.1")
    assert jetson.family == "orin" and jetson.compute_capability == "sm_87"
    assert jetson.dla_cores == 0  # which Orin module is unknown: promise no DLA


def test_jetson_without_release_file_is_found_by_its_tegra_soc(tmp_path: Path):
    root = _copy_board("jetson-xavier-nx-jp512", tmp_path)
    (root / "etc" / "nv_tegra_release").unlink()
    platform = detect_platform(root)
    assert platform.kind == "jetson"
    assert platform.jetson.compute_capability == "sm_72" and platform.jetson.l4t is None


def test_unknown_part_number_falls_back_to_the_model_string(tmp_path: Path):
    root = _copy_board("jetson-agx-orin-jp60", tmp_path)
    compatible = root / "proc" / "device-tree" / "compatible"
    compatible.write_bytes(b"acme,custom-carrier\x00nvidia,tegra234\x00")
    jetson = detect_platform(root).jetson
    assert jetson.part_number is None and jetson.module == "Jetson AGX Orin"
    assert jetson.dla_cores == 2


def test_cpu_only_machine_has_no_gpu_and_reports_usable_cpus():
    platform = detect_platform(FIXTURES / "x86-cpu-only")
    assert platform.kind == "cpu"
    assert not platform.is_jetson and not platform.has_nvidia_gpu
    assert platform.jetson is None and platform.gpus == () and platform.driver_version is None
    assert platform.compute_capability is None and platform.cpu_count >= 1


def test_desktop_lists_every_gpu_and_device_0_sets_the_compute_capability():
    gpus = (GpuInfo(0, "NVIDIA GeForce RTX 4090", "sm_89", 24564),
            GpuInfo(1, "NVIDIA RTX A2000 12GB", "sm_86", 12282))
    platform = detect_platform(FIXTURES / "desktop-rtx", gpus=gpus)
    assert platform.kind == "desktop-gpu" and platform.has_nvidia_gpu
    assert platform.driver_version == "550.144.03"
    assert platform.gpus == gpus
    assert platform.compute_capability == "sm_89"  # CUDA device 0


def test_desktop_without_nvidia_ml_py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    platform = detect_platform(FIXTURES / "desktop-rtx")
    assert platform.kind == "desktop-gpu" and platform.gpus == ()
    assert "pip install 'sightline[tensorrt]'" in platform.gpu_problem
    with pytest.raises(NvmlUnavailable, match=r"nvidia-ml-py is not installed"):
        query_nvml()


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC "
         "2024\nGCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n", "550.54.14"),
        ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  555.58.02  Release Build  "
         "(dvs-builder@U16-I3-B03-4-3)  Tue Jun 25 01:26:03 UTC 2024\n", "555.58.02"),
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  515.76  Mon Sep 12 19:21:56 UTC 2022",
         "515.76"),
        ("", None),
    ],
)
def test_driver_version_is_read_from_both_kernel_module_flavours(text, version):
    assert parse_driver_version(text) == version


def test_existing_callers_keep_working_on_this_machine():
    # runtime/engines/onnxruntime.py and tests/conftest.py use these three, positionally too.
    platform = detect_platform()
    assert isinstance(platform.has_nvidia_gpu, bool) and platform.cpu_count >= 1
    legacy = Platform(None, True, 4)
    assert legacy.has_nvidia_gpu and legacy.kind == "desktop-gpu" and legacy.gpus == ()


# `sightline devices`: the same facts for a person, and as JSON for scripts.

def _devices(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SIGHTLINE, "devices", *args], capture_output=True, text=True,
                          timeout=60)


def test_devices_json_describes_a_captured_orin_nano_and_its_profile():
    done = _devices("--json", "--root", str(FIXTURES / "jetson-orin-nano-super-jp62"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["kind"] == "jetson"
    assert report["jetson"]["l4t"] == "36.4.3" and report["jetson"]["jetpack"] == "6.2"
    assert report["jetson"]["compute_capability"] == "sm_87"
    assert report["profile"] == {"name": "jetson-orin", "precision": "fp16",
                                 "backends": ["tensorrt", "onnxruntime"], "workspace_mb": 1024,
                                 "dla_cores": 0, "compute_capability": "sm_87"}


def test_devices_table_shows_model_jetpack_and_profile():
    done = _devices("--root", str(FIXTURES / "jetson-xavier-nx-jp512"))
    assert done.returncode == 0, done.stderr
    for text in ("NVIDIA Jetson Xavier NX Developer Kit", "35.4.1 / 5.1.2", "sm_72",
                 "jetson-xavier", "tensorrt > onnxruntime", "2 core(s)"):
        assert text in done.stdout


def test_devices_runs_on_this_machine():
    done = _devices("--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kind"] in ("jetson", "desktop-gpu", "cpu")


def _copy_board(board: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / board, tmp_path / board))

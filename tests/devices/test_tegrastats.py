"""tegrastats lines from real boards (TX1 to Thor, L4T 28 to 38) -> TegrastatsSample, and
the reader that runs tegrastats as a subprocess (here a stand-in script printing the same
captured lines, since this machine is no Jetson).

The lines under fixtures/tegrastats/ are verbatim captures; sources in its README.md.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from devices.tegrastats import (
    CpuCore,
    PowerRail,
    TegrastatsParseError,
    TegrastatsReader,
    parse_tegrastats,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tegrastats"
CAPTURES = sorted(FIXTURES.glob("*.txt"))
LINES = [(path.name, number, line)
         for path in CAPTURES
         for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]


def first_line(name: str) -> str:
    return (FIXTURES / name).read_text().splitlines()[0]


def test_fixtures_cover_the_boards_and_releases_we_claim():
    assert len(CAPTURES) >= 10 and len(LINES) >= 25
    readme = (FIXTURES / "README.md").read_text()
    for path in CAPTURES:
        assert f"`{path.name}`" in readme, f"{path.name} has no source in README.md"


@pytest.mark.parametrize(("name", "number", "line"), LINES,
                         ids=[f"{name}:{number}" for name, number, _ in LINES])
def test_every_captured_line_parses(name, number, line):
    sample = parse_tegrastats(line)
    assert 0 < sample.ram_used_mb <= sample.ram_total_mb
    assert sample.cpus and all(c.load_percent is None or 0 <= c.load_percent <= 100
                               for c in sample.cpus)
    assert all(c.mhz and c.mhz > 0 for c in sample.cpus if c.online)
    assert sample.gpu_load_percent is None or 0 <= sample.gpu_load_percent <= 100
    assert all(-40 < t < 125 for t in sample.temperatures_c.values())  # no -256 sentinel
    assert all(r.current_mw >= 0 and r.average_mw >= 0 for r in sample.power_mw.values())
    assert "NC" not in sample.power_mw
    sample.to_json()  # plain JSON types


# file, RAM used/total, swap used/total, cores, GPU load %, GPU MHz, per-GPC MHz, EMC %/MHz
@pytest.mark.parametrize(
    ("name", "ram", "swap", "cores", "gpu_load", "gpu_mhz", "gpc", "emc"),
    [
        ("jetson-tx1-l4t28.txt", (3691, 3983), (2780, 8192), 4, 0, 998, (998,), (0, 1600)),
        ("jetson-tx2.txt", (1873, 3830), (None, None), 6, 0, 114, (114,), (0, 1600)),
        ("jetson-nano-jp46.txt", (1923, 3964), (191, 1982), 4, 0, 76, (76,), (0, 1600)),
        ("jetson-xavier-nx-jp4.txt", (5246, 7771), (983, 20269), 6, 0, 1109, (1109,), (2, 1600)),
        ("jetson-xavier-nx-jp512.txt", (3168, 6851), (161, 3426), 6, 0, 114, (114,), (2, 204)),
        ("jetson-agx-orin-jp5.txt", (1205, 30623), (0, 15311), 12, 0, 114, (114,), (0, 204)),
        ("jetson-agx-orin-jp5-no-rails.txt", (1438, 30622), (0, 15311), 8, 0, None, (),
         (0, None)),
        ("jetson-orin-nx-jp512.txt", (4461, 15524), (34, 7762), 8, 0, 0, (0,), (0, None)),
        ("jetson-agx-orin-64gb-jp621.txt", (18207, 62841), (86, 31420), 12, 0, 0, (0, 0),
         (3, 2133)),
        ("jetson-orin-nano-jp62.txt", (775, 7620), (0, 3810), 6, 0, None, (), (None, None)),
        ("jetson-thor-r38.txt", (4208, 125773), (0, 2048), 14, None, 0, (0, 0, 0), (0, 665)),
    ],
)
def test_memory_cores_gpu_and_emc_per_board(name, ram, swap, cores, gpu_load, gpu_mhz, gpc,
                                            emc):
    sample = parse_tegrastats(first_line(name))
    assert (sample.ram_used_mb, sample.ram_total_mb) == ram
    assert (sample.swap_used_mb, sample.swap_total_mb) == swap
    assert len(sample.cpus) == cores
    assert (sample.gpu_load_percent, sample.gpu_mhz, sample.gpu_gpc_mhz) == (gpu_load, gpu_mhz,
                                                                              gpc)
    assert (sample.emc_load_percent, sample.emc_mhz) == emc


def test_nano_jetpack_4_6_reads_cores_temperatures_and_unitless_rails():
    sample = parse_tegrastats(first_line("jetson-nano-jp46.txt"))
    assert sample.timestamp is None  # JetPack 4 prints no timestamp
    assert sample.cpus == (CpuCore(5, 1224), CpuCore(4, 1224), CpuCore(3, 1224),
                           CpuCore(6, 1224))
    assert sample.temperatures_c == {"pll": 37.0, "cpu": 40.0, "pmic": 50.0, "gpu": 40.0,
                                     "ao": 45.0, "thermal": 40.0}
    assert sample.power_mw == {"POM_5V_IN": PowerRail(1750, 1628), "POM_5V_GPU": PowerRail(0, 0),
                               "POM_5V_CPU": PowerRail(366, 406)}
    assert sample.input_power_mw == 1750
    assert sample.cpu_load_percent == pytest.approx(4.5)


def test_tx1_shares_one_clock_across_the_core_list():
    lines = (FIXTURES / "jetson-tx1-l4t28.txt").read_text().splitlines()
    sample = parse_tegrastats(lines[3])  # "cpu [17%,11%,65%,0%]@1734 ... GR3D 39%@76"
    assert sample.cpus == tuple(CpuCore(load, 1734) for load in (17, 11, 65, 0))
    assert (sample.gpu_load_percent, sample.gpu_mhz) == (39, 76)
    assert (sample.emc_load_percent, sample.emc_mhz) == (1, 1600)


def test_xavier_nx_jetpack_5_reads_timestamp_bracketed_clock_and_milliwatt_rails():
    sample = parse_tegrastats(first_line("jetson-xavier-nx-jp512.txt"))
    assert sample.timestamp == datetime(2024, 7, 9, 13, 31, 31)
    assert sample.cpus[0] == CpuCore(23, 1397) and sample.cpus[5] == CpuCore(10, 1190)
    assert sample.temperatures_c["cpu"] == 46.5 and sample.temperatures_c["thermal"] == 45.6
    assert sample.power_mw["VDD_IN"] == PowerRail(2763, 2846)
    assert sample.power_mw["VDD_CPU_GPU_CV"] == PowerRail(650, 670)
    assert sample.input_power_mw == 2763


def test_agx_orin_skips_off_sensors_and_not_connected_rails():
    sample = parse_tegrastats(first_line("jetson-agx-orin-jp5.txt"))
    # CV0@-256C CV1@-256C CV2@-256C are powered-off sensors
    assert sample.temperatures_c == {"cpu": 43.5, "tdiode": 32.5, "soc2": 40.062,
                                     "soc0": 40.5, "gpu": 38.156, "soc1": 39.125}
    assert sample.power_mw == {"VDD_GPU_SOC": PowerRail(4788, 4788),
                               "VDD_CPU_CV": PowerRail(798, 798),
                               "VIN_SYS_5V0": PowerRail(3842, 3842),
                               "VDDQ_VDD2_1V8AO": PowerRail(707, 707)}
    assert sample.input_power_mw is None  # AGX Orin has no module input rail
    assert sample.cpus[5] == CpuCore(0, 730)


def test_orin_per_gpc_clock_form_takes_the_highest_clock():
    line = first_line("jetson-agx-orin-64gb-jp621.txt").replace("GR3D_FREQ 0%@[0,0]",
                                                                "GR3D_FREQ 37%@[305,611]")
    sample = parse_tegrastats(line)
    assert (sample.gpu_load_percent, sample.gpu_mhz, sample.gpu_gpc_mhz) == (37, 611,
                                                                             (305, 611))


def test_agx_orin_jetpack_6_lowercase_sensors_and_busy_cores():
    sample = parse_tegrastats(first_line("jetson-agx-orin-64gb-jp621.txt"))
    assert sample.timestamp == datetime(2026, 5, 9, 18, 42, 6)
    assert [c.load_percent for c in sample.cpus] == [14, 5, 8, 14, 46, 47, 2, 10, 4, 5, 6, 10]
    assert [c.mhz for c in sample.cpus][:4] == [2188, 2112, 2035, 2201]
    assert sample.temperatures_c == {"cpu": 52.562, "soc2": 48.437, "soc0": 49.093,
                                     "tj": 52.562, "soc1": 49.656}
    assert sample.power_mw["VIN_SYS_5V0"] == PowerRail(4707, 4707)


def test_orin_nano_jetpack_6_has_gpu_load_without_clock_and_no_emc():
    lines = (FIXTURES / "jetson-orin-nano-jp62.txt").read_text().splitlines()
    idle, clocked = parse_tegrastats(lines[0]), parse_tegrastats(lines[3])
    assert idle.gpu_load_percent == 0 and idle.gpu_mhz is None
    assert idle.emc_load_percent is None
    assert [c.mhz for c in idle.cpus] == [729] * 6 and [c.mhz for c in clocked.cpus] == [1344] * 6
    assert idle.power_mw["VDD_IN"] == PowerRail(4761, 4778)
    assert clocked.input_power_mw == 6626
    assert clocked.temperatures_c["tj"] == 50.562


def test_thor_reports_gpc_clocks_without_a_load_figure():
    sample = parse_tegrastats(first_line("jetson-thor-r38.txt"))
    assert sample.gpu_load_percent is None and sample.gpu_gpc_mhz == (0, 0, 0)
    assert sample.power_mw["VDD_CPU_SOC_MSS"] == PowerRail(4165, 4165)
    assert sample.temperatures_c == {"cpu": 34.468, "tj": 34.5, "soc012": 33.781,
                                     "soc345": 34.5}


def test_off_cores_are_none():
    line = first_line("jetson-agx-orin-jp5-no-rails.txt").replace(
        "CPU [2%@729,0%@729,4%@729,0%@729,2%@729,0%@729,0%@729,2%@729]",
        "CPU [2%@729,0%@729,4%@729,0%@729,off,off,off,off]")
    sample = parse_tegrastats(line)
    assert sample.cpus[4:] == (CpuCore(None, None),) * 4
    assert [c.online for c in sample.cpus] == [True] * 4 + [False] * 4
    assert sample.cpu_load_percent == pytest.approx(1.5)


def test_unknown_fields_are_ignored():
    line = first_line("jetson-xavier-nx-jp512.txt")
    extended = line.replace("APE 150", "APE 150 NVDLA9_FREQ 12%@[1,2] WARP fg 3% bg 4% "
                                       "FOO off BAR 17")
    assert parse_tegrastats(extended) == parse_tegrastats(line)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("RAM abc/3964MB (lfb 3x4MB) CPU [1%@729]", "RAM abc/3964MB"),
        ("RAM 2448/3964MB (lfb 3x4MB) CPU [12%@1479,xx%@1479]", "xx%@1479"),
        ("RAM 2448/3964MB CPU 12%@1479", "CPU 12%@1479"),
        ("RAM 2448/3964MB CPU [1%@729] GR3D_FREQ busy", "GR3D_FREQ busy"),
        ("RAM 2448/3964MB CPU [1%@729] EMC_FREQ fast", "EMC_FREQ fast"),
        ("RAM 2448/3964MB CPU [1%@729] CPU@warmC", "CPU@warmC"),
        ("RAM 2448/3964MB CPU [1%@729] GR3D_FREQ", "GR3D_FREQ"),
        ("13-45-2026 01:02:03 RAM 2448/3964MB CPU [1%@729]", "13-45-2026 01:02:03"),
        ("hello world", "hello world"),
    ],
)
def test_malformed_fields_raise_a_value_error_naming_the_fragment(line, fragment):
    with pytest.raises(TegrastatsParseError) as caught:
        parse_tegrastats(line)
    assert isinstance(caught.value, ValueError)
    assert caught.value.fragment == fragment
    assert repr(fragment) in str(caught.value)


def test_a_line_truncated_before_ram_is_refused():
    # An AGX Xavier (JetPack 5) capture that starts mid-line, as published (fixtures/README.md)
    tail = ("[0%@1190,1%@1190,0%@1190,0%@1189,0%@1190,0%@1191,0%@1190,0%@1190] EMC_FREQ 0%@1331 "
            "GR3D_FREQ 0%@114 VIC_FREQ 115 APE 150 AUX@36C CPU@36.5C thermal@35.7C Tboard@37C "
            "AO@35C GPU@35C Tdiode@38.75C PMIC@50C GPU 467mW/467mW CPU 467mW/467mW SOC "
            "1245mW/1245mW CV 0mW/0mW VDDRQ 311mW/311mW SYS5V 2768mW/2768mW")
    with pytest.raises(TegrastatsParseError, match="no RAM field"):
        parse_tegrastats(tail)
    with pytest.raises(TegrastatsParseError, match="empty"):
        parse_tegrastats("  \n")
    # The same tail behind a RAM field (made up: no complete capture was found) reads the
    # rails named CPU and GPU as rails, not as the CPU field.
    sample = parse_tegrastats("RAM 2036/31008MB (lfb 6x4MB) CPU " + tail)
    assert len(sample.cpus) == 8 and sample.gpu_mhz == 114
    assert sample.power_mw == {"GPU": PowerRail(467, 467), "CPU": PowerRail(467, 467),
                               "SOC": PowerRail(1245, 1245), "CV": PowerRail(0, 0),
                               "VDDRQ": PowerRail(311, 311), "SYS5V": PowerRail(2768, 2768)}
    assert sample.temperatures_c["gpu"] == 35.0


# -- the reader, on a stand-in `tegrastats` -----------------------------------------------

FAKE_TEGRASTATS = """
import sys, time
lines = open(sys.argv[1]).read().splitlines()
assert sys.argv[2:] == ["--interval", "50"], sys.argv
print("RAM garbled", flush=True)
i = 0
while True:
    print(lines[i % len(lines)], flush=True)
    i += 1
    time.sleep(0.05)
"""


@pytest.fixture
def fake_tegrastats(tmp_path: Path) -> list[str]:
    script = tmp_path / "tegrastats.py"
    script.write_text(FAKE_TEGRASTATS)
    return [sys.executable, str(script), str(FIXTURES / "jetson-orin-nano-jp62.txt")]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_reader_keeps_the_latest_sample_and_counts_lines_it_cannot_read(fake_tegrastats):
    reader = TegrastatsReader(interval_ms=50, command=fake_tegrastats).start()
    try:
        assert reader._thread.name == "sightline-tegrastats"
        wait_for(lambda: reader.samples >= 3)
        sample = reader.latest()
        assert sample is not None and sample.ram_total_mb == 7620
        assert sample.power_mw["VDD_IN"].current_mw in (4761, 6626)
        assert reader.parse_errors == 1  # "RAM garbled"
        assert reader.running
    finally:
        reader.stop()
    assert not reader.running
    assert reader._process.poll() is not None  # the process is gone, not orphaned


def test_reader_reports_nothing_once_tegrastats_has_stopped(tmp_path: Path):
    script = tmp_path / "once.py"
    line = first_line("jetson-xavier-nx-jp512.txt")
    script.write_text(f"print({line!r}, flush=True)\n")
    with TegrastatsReader(interval_ms=10, command=[sys.executable, str(script)]) as reader:
        wait_for(lambda: not reader.running)
        assert reader.latest() is not None
        time.sleep(0.05)
        assert reader.latest(max_age_s=0.01) is None


def test_reader_without_tegrastats_raises_oserror():
    with pytest.raises(OSError):
        TegrastatsReader(command=["/nonexistent/tegrastats"]).start()

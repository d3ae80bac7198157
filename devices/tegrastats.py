"""NVIDIA `tegrastats` lines -> `TegrastatsSample`, and a reader that keeps the latest one.

`tegrastats` is how a Jetson reports memory, per-core load and clocks, GPU (GR3D) load, the
memory controller (EMC), temperatures and power rails; its line changes shape between boards
and L4T releases (TX1 to Thor, captured lines in tests/devices/fixtures/tegrastats/). Fields
we do not know are skipped, never guessed at; a field we know with a value we cannot read
raises `TegrastatsParseError` naming the fragment. A leaf module: nothing of Sightline's.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

log = logging.getLogger(__name__)

# Sensors that are powered off read -256 C (e.g. "CV0@-256C GPU@-256C" on AGX Orin).
TEMPERATURE_SENTINEL_C = -256.0
# The rail that measures the whole module's input, where the board has one. AGX Orin and Thor
# do not (VIN_SYS_5V0 is only the carrier's 5 V); their figures are per rail only.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")

_TIMESTAMP = re.compile(r"(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)\s+")
_MEMORY = re.compile(r"(\d+)/(\d+)(kB|MB|GB)")
_CPU_LIST = re.compile(r"\[([^\]]*)\](?:@(\d+))?")
_CPU_CORE = re.compile(r"(\d+)%(?:@(\d+))?")
# "0%@921" (JetPack 4), "0%@[305,305]" (per GPC, JetPack 5/6), "0%" (Orin Nano on JetPack 6),
# "@[0,0,0]" (Thor: clocks only).
_GR3D = re.compile(r"(?:(\d+)%)?(?:@(?:(\d+)|\[(\d+(?:,\d+)*)\]))?")
_EMC = re.compile(r"(\d+)%(?:@(\d*))?")
_TEMPERATURE = re.compile(r"([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C")
_LOOKS_LIKE_TEMPERATURE = re.compile(r"[A-Za-z]\w*@[^\[\]]*C")
_RAIL_VALUE = re.compile(r"(\d+)(?:mW)?/(\d+)(?:mW)?")
_RAIL_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_TO_MB = {"kB": 1 / 1024, "MB": 1, "GB": 1024}


class TegrastatsParseError(ValueError):
    """A tegrastats line (or one of its fields) could not be read; `fragment` is the part."""

    def __init__(self, message: str, fragment: str) -> None:
        super().__init__(f"{message}: {fragment!r}")
        self.fragment = fragment


@dataclass(frozen=True, slots=True)
class CpuCore:
    load_percent: int | None  # None: the core is off (hot-unplugged by the power mode)
    mhz: int | None

    @property
    def online(self) -> bool:
        return self.load_percent is not None


@dataclass(frozen=True, slots=True)
class PowerRail:
    current_mw: int
    average_mw: int  # tegrastats' running average since it started


@dataclass(frozen=True)
class TegrastatsSample:
    """One tegrastats line. Absent fields are None (or empty); memory in MB, clocks in MHz.

    Temperature names are lower-cased (JetPack 5 prints "CPU@", JetPack 6 "cpu@"), rail names
    are kept as printed. Treat the dicts as read-only.
    """

    ram_used_mb: int
    ram_total_mb: int
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    cpus: tuple[CpuCore, ...] = ()
    gpu_load_percent: int | None = None  # GR3D, aggregated over the GPCs
    gpu_mhz: int | None = None  # the highest GPC clock where several are printed
    gpu_gpc_mhz: tuple[int, ...] = ()
    emc_load_percent: int | None = None
    emc_mhz: int | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, PowerRail] = field(default_factory=dict)
    timestamp: datetime | None = None  # the device's local time, JetPack 5 and later

    @property
    def cpu_load_percent(self) -> float | None:
        """Mean load of the online cores."""
        loads = [c.load_percent for c in self.cpus if c.load_percent is not None]
        return sum(loads) / len(loads) if loads else None

    @property
    def input_power_mw(self) -> int | None:
        """The module's input power where the board has such a rail (see INPUT_RAILS)."""
        rails = self.power_mw
        return next((rails[name].current_mw for name in INPUT_RAILS if name in rails), None)

    def to_json(self) -> dict:
        """Plain JSON types, for telemetry."""
        return {
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
            "ram_used_mb": self.ram_used_mb,
            "ram_total_mb": self.ram_total_mb,
            "swap_used_mb": self.swap_used_mb,
            "swap_total_mb": self.swap_total_mb,
            "cpu_load_percent": [c.load_percent for c in self.cpus],
            "cpu_mhz": [c.mhz for c in self.cpus],
            "gpu_load_percent": self.gpu_load_percent,
            "gpu_mhz": self.gpu_mhz,
            "emc_load_percent": self.emc_load_percent,
            "emc_mhz": self.emc_mhz,
            "temperatures_c": dict(self.temperatures_c),
            "power_mw": {name: {"current": r.current_mw, "average": r.average_mw}
                         for name, r in self.power_mw.items()},
        }


def parse_tegrastats(line: str) -> TegrastatsSample:
    """Parse one line of `tegrastats` output (any release from L4T 28 to 38)."""
    text = line.strip()
    if not text:
        raise TegrastatsParseError("empty tegrastats line", line)
    timestamp = None
    stamp = _TIMESTAMP.match(text)
    if stamp:
        try:
            timestamp = datetime.strptime(stamp.group(1), "%m-%d-%Y %H:%M:%S")
        except ValueError:
            raise TegrastatsParseError("unreadable timestamp", stamp.group(1)) from None
        text = text[stamp.end():]

    tokens = text.split()
    fields: dict = {"temperatures_c": {}, "power_mw": {}}
    i = 0
    while i < len(tokens):
        name = tokens[i]
        value = tokens[i + 1] if i + 1 < len(tokens) else None
        # Rails first: AGX Xavier on JetPack 5 names its rails "GPU", "CPU", "SOC", "CV".
        if value is not None and _RAIL_NAME.fullmatch(name) and _RAIL_VALUE.fullmatch(value):
            _rail(name, value, fields["power_mw"])
            i += 2
            continue
        handler = _FIELDS.get(name)
        if handler is not None:
            if value is None:
                raise TegrastatsParseError(f"{name} has no value", name)
            handler(value, fields)
            i += 2
            continue
        if "@" in name and name.endswith("C") and _LOOKS_LIKE_TEMPERATURE.fullmatch(name):
            _temperature(name, fields["temperatures_c"])
        i += 1  # an unknown field's name or value, or the "(lfb ...)" detail: skipped
    if "ram_used_mb" not in fields:
        raise TegrastatsParseError("not a tegrastats line (no RAM field)", line.strip())
    return TegrastatsSample(timestamp=timestamp, **fields)


def _memory(value: str, name: str) -> tuple[int, int]:
    match = _MEMORY.fullmatch(value)
    if not match:
        raise TegrastatsParseError(f"{name} is not used/total with a unit", f"{name} {value}")
    scale = _TO_MB[match.group(3)]
    return round(int(match.group(1)) * scale), round(int(match.group(2)) * scale)


def _ram(value: str, fields: dict) -> None:
    fields["ram_used_mb"], fields["ram_total_mb"] = _memory(value, "RAM")


def _swap(value: str, fields: dict) -> None:
    fields["swap_used_mb"], fields["swap_total_mb"] = _memory(value, "SWAP")


def _cpu(value: str, fields: dict) -> None:
    match = _CPU_LIST.fullmatch(value)
    if not match:
        raise TegrastatsParseError("CPU is not a [...] list", f"CPU {value}")
    shared_mhz = int(match.group(2)) if match.group(2) else None  # "[a%,b%]@MHz" (TX1)
    cores = []
    for entry in match.group(1).split(","):
        entry = entry.strip()
        if entry == "off":
            cores.append(CpuCore(None, None))
            continue
        core = _CPU_CORE.fullmatch(entry)
        if not core:
            raise TegrastatsParseError("unreadable CPU core", entry)
        mhz = int(core.group(2)) if core.group(2) else shared_mhz
        cores.append(CpuCore(int(core.group(1)), mhz))
    fields["cpus"] = tuple(cores)


def _gr3d(value: str, fields: dict) -> None:
    match = _GR3D.fullmatch(value)
    if not match:
        raise TegrastatsParseError("unreadable GR3D_FREQ", f"GR3D_FREQ {value}")
    load, single, per_gpc = match.groups()
    clocks = tuple(int(v) for v in per_gpc.split(",")) if per_gpc else (
        (int(single),) if single else ())
    fields["gpu_load_percent"] = int(load) if load is not None else None
    fields["gpu_gpc_mhz"] = clocks
    fields["gpu_mhz"] = max(clocks) if clocks else None


def _emc(value: str, fields: dict) -> None:
    match = _EMC.fullmatch(value)
    if not match:
        raise TegrastatsParseError("unreadable EMC_FREQ", f"EMC_FREQ {value}")
    fields["emc_load_percent"] = int(match.group(1))
    fields["emc_mhz"] = int(match.group(2)) if match.group(2) else None


def _temperature(token: str, temperatures: dict[str, float]) -> None:
    match = _TEMPERATURE.fullmatch(token)
    if not match:
        raise TegrastatsParseError("unreadable temperature", token)
    celsius = float(match.group(2))
    if celsius > TEMPERATURE_SENTINEL_C:
        temperatures.setdefault(match.group(1).lower(), celsius)


def _rail(name: str, value: str, rails: dict[str, PowerRail]) -> None:
    if name == "NC":  # "not connected" channels of the INA3221 on AGX Orin, printed twice
        return
    match = _RAIL_VALUE.fullmatch(value)
    rails.setdefault(name, PowerRail(int(match.group(1)), int(match.group(2))))


# Field name -> reader of the token after it. Old releases (TX1, L4T 28) print "cpu", "EMC",
# "GR3D"; later ones "CPU", "EMC_FREQ", "GR3D_FREQ".
_FIELDS = {
    "RAM": _ram, "SWAP": _swap, "CPU": _cpu, "cpu": _cpu,
    "GR3D_FREQ": _gr3d, "GR3D": _gr3d, "EMC_FREQ": _emc, "EMC": _emc,
}


class TegrastatsReader:
    """Runs `tegrastats --interval MS` and keeps the latest parsed sample (Jetson only).

    A named thread reads the process's lines; `latest()` returns the newest sample without
    blocking. Lines that do not parse are counted and logged once each kind, never raised.
    `stop()` ends the process and joins the thread. Power rails may need root on older
    releases; without them the sample simply has no rails.
    """

    def __init__(self, interval_ms: int = 1000,
                 command: Sequence[str] = ("tegrastats",)) -> None:
        if interval_ms <= 0:
            raise ValueError("interval_ms must be positive")
        self.interval_ms = interval_ms
        self._command = [*command, "--interval", str(interval_ms)]
        self._latest: tuple[float, TegrastatsSample] | None = None  # (monotonic, sample)
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.samples = 0
        self.parse_errors = 0

    def start(self) -> TegrastatsReader:
        """Start the process; raises OSError where there is no tegrastats to run."""
        self._process = subprocess.Popen(
            self._command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, name="sightline-tegrastats",
                                        daemon=True)
        self._thread.start()
        return self

    def latest(self, max_age_s: float | None = None) -> TegrastatsSample | None:
        """The newest sample, or None (none yet, or older than `max_age_s`)."""
        latest = self._latest  # one reference read: the slot is replaced, never mutated
        if latest is None:
            return None
        seen, sample = latest
        if max_age_s is not None and time.monotonic() - seen > max_age_s:
            return None
        return sample

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)
        if process is not None and process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> TegrastatsReader:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _read(self) -> None:
        reported: set[str] = set()
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if not line.strip():
                continue
            try:
                sample = parse_tegrastats(line)
            except TegrastatsParseError as exc:
                self.parse_errors += 1
                if exc.fragment not in reported and len(reported) < 32:
                    reported.add(exc.fragment)
                    log.warning("tegrastats line not understood (%s); skipping such lines", exc)
                continue
            self._latest = (time.monotonic(), sample)
            self.samples += 1
        if not self._stopping.is_set():
            code = self._process.wait()
            log.warning("tegrastats exited (code %s); Jetson figures stop updating", code)

"""The telemetry gate of a canary rollout: is a canary worse after its update?

Each canary's telemetry over a window after it confirmed the new version is compared
with its own window before the update and with the devices not yet updated over the same
window after: p99 round trip, fps, error rate and drop rate. A metric is *worse* only
when it is worse than **both** references by its margin (a fleet-wide slowdown, or a
canary that was always slower than its peers, is not the update's fault); medians over
at least `min_samples` samples keep one noisy sample from deciding. One worse metric
halts the rollout; `sightline push` then rolls the canaries back.

Plain Python, no database: the figures go to the database through rollout_record.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cloud_sync.service.figures import Figures, figures
from runtime.errors import SightlineError

METRICS = ("p99_ms", "fps", "error_rate", "drop_rate")


class GateError(SightlineError):
    """The gate could not decide: too little telemetry from a device in time."""


@dataclass(frozen=True)
class GateSettings:
    window_s: float = 60.0
    min_samples: int = 6
    p99_margin: float = 0.25  # worse: p99 more than 25% above the reference
    fps_margin: float = 0.20  # worse: fps more than 20% below
    error_margin: float = 0.02  # worse: error share 2 points above
    drop_margin: float = 0.05  # worse: drop share 5 points above
    wait_factor: float = 3.0  # wait at most this many windows for min_samples


@dataclass(frozen=True)
class Check:
    """One metric of one canary, as judged."""

    device_id: str
    metric: str
    before: float | None
    after: float | None
    peers: float | None
    samples: int
    worse: bool
    note: str

    def line(self) -> str:
        def show(value: float | None) -> str:
            return "-" if value is None else f"{value:.4g}"

        return (f"gate {self.device_id:<14} {self.metric:<10} before {show(self.before):>8}  "
                f"after {show(self.after):>8}  not updated {show(self.peers):>8}  "
                f"({self.samples} samples) {'WORSE' if self.worse else 'ok'}: {self.note}")


@dataclass(frozen=True)
class Verdict:
    halt: bool
    checks: tuple[Check, ...]

    @property
    def summary(self) -> str:
        worse = [c for c in self.checks if c.worse]
        if not worse:
            return f"telemetry gate passed ({len(self.checks)} checks)"
        return "telemetry gate halted the rollout: " + "; ".join(
            f"{c.device_id} {c.metric} {c.note}" for c in worse)


Sample = tuple[float, Figures]  # (time received, figures)


def _increase(values: Sequence[int | None]) -> int | None:
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    return sum(b - a if b >= a else b for a, b in zip(values, values[1:], strict=False))


def window_value(samples: Sequence[Sample], metric: str) -> float | None:
    """One window's figure: the median for p99 and fps, the share over the window (from
    the cumulative counters) for error and drop rates."""
    rows = [f for _, f in samples]
    if metric in ("p99_ms", "fps"):
        values = [getattr(f, metric) for f in rows if getattr(f, metric) is not None]
        return statistics.median(values) if values else None
    if metric == "error_rate":
        errors, results = _increase([f.errors for f in rows]), _increase([f.results for f in rows])
        if errors is None or results is None or errors + results <= 0:
            return None
        return errors / (errors + results)
    dropped, received = _increase([f.dropped for f in rows]), _increase([f.received for f in rows])
    if dropped is None or received is None or received <= 0:
        return None
    return dropped / received


def _worse(metric: str, after: float, reference: float, settings: GateSettings) -> bool:
    if metric == "p99_ms":
        return after > reference * (1 + settings.p99_margin)
    if metric == "fps":
        return after < reference * (1 - settings.fps_margin)
    margin = settings.error_margin if metric == "error_rate" else settings.drop_margin
    return after > reference + margin


def _ratio(after: float, reference: float | None) -> str:
    if reference is None:
        return "n/a"
    if reference == 0:
        return f"{after:+.3g}"
    return f"{after / reference:.2f}x"


def judge(device_id: str, before: Sequence[Sample], after: Sequence[Sample],
          peers: Iterable[Sequence[Sample]], settings: GateSettings) -> list[Check]:
    """The four checks of one canary (a metric no window has figures for is skipped)."""
    peers = [p for p in peers if p]
    checks = []
    for metric in METRICS:
        a, b = window_value(after, metric), window_value(before, metric)
        peer_values = [v for v in (window_value(p, metric) for p in peers) if v is not None]
        p = statistics.median(peer_values) if peer_values else None
        if a is None or (b is None and p is None):
            continue
        references = [r for r in (b, p) if r is not None]
        worse = all(_worse(metric, a, r, settings) for r in references)
        note = f"{_ratio(a, b)} its baseline, {_ratio(a, p)} the devices not updated"
        checks.append(Check(device_id, metric, b, a, p, len(after), worse, note))
    return checks


class TelemetryWindows:
    """Every telemetry sample the operator's session sees, per device, by arrival time
    (the local clock: windows are then comparable across devices whatever their clocks)."""

    def __init__(self, state, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: dict[str, list[Sample]] = defaultdict(list)
        self._remove = state.on_telemetry(self._add)

    def _add(self, device_id: str, document: dict) -> None:
        with self._lock:
            self._samples[device_id].append((self._clock(), figures(document)))

    def between(self, device_id: str, start: float, end: float) -> list[Sample]:
        with self._lock:
            return [s for s in self._samples.get(device_id, []) if start <= s[0] < end]

    def close(self) -> None:
        self._remove()


class TelemetryGate:
    """What `push` calls: `baseline()` before the canaries are told, `verdict()` after
    they confirmed. Both wait (up to `wait_factor` windows) for enough samples."""

    def __init__(self, state, settings: GateSettings,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self._clock = clock
        self._sleep = sleep
        self.windows = TelemetryWindows(state, clock)
        self._baseline: dict[str, list[Sample]] = {}

    def _wait(self, devices: Iterable[str], start: float, end: float, deadline: float,
              what: str) -> dict[str, list[Sample]]:
        devices = list(devices)
        while True:
            found = {d: self.windows.between(d, start, end) for d in devices}
            short = [d for d, s in found.items() if len(s) < self.settings.min_samples]
            now = self._clock()
            if not short and now >= end:
                return found
            if now > deadline:
                raise GateError(
                    f"telemetry gate: fewer than {self.settings.min_samples} telemetry samples "
                    f"{what} from {', '.join(short)} within {deadline - start:.0f} s; is their "
                    "telemetry interval longer than the window allows? (--gate-window)")
            if now >= end:  # too few in the window: widen it
                end = now + self.settings.window_s / 4
            self._sleep(0.2)

    def baseline(self, canaries: Sequence[str]) -> None:
        """The canaries' own window before the update: waits up to one window for it,
        unless the session has been listening that long already."""
        end = self._clock()
        start = end - self.settings.window_s
        self._baseline = self._wait(canaries, start, end,
                                    end + self.settings.window_s * self.settings.wait_factor,
                                    "before the update")

    def verdict(self, canaries: Sequence[str], rest: Sequence[str], since: float) -> Verdict:
        """The window after `since` (when the canaries confirmed) for canaries and rest."""
        end = since + self.settings.window_s
        deadline = end + self.settings.window_s * self.settings.wait_factor
        after = self._wait(canaries, since, end, deadline, "after the update")
        stop = max(s[0] for samples in after.values() for s in samples) + 1e-6
        peers = [self.windows.between(d, since, stop) for d in rest]
        checks = []
        for canary in canaries:
            checks += judge(canary, self._baseline.get(canary, []), after[canary], peers,
                            self.settings)
        return Verdict(any(c.worse for c in checks), tuple(checks))

    def close(self) -> None:
        self.windows.close()

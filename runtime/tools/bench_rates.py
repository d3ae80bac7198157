"""Throughput figures for the benchmarks: results per second with N clients against a
server, the bare engine's rate, and the CPU each costs (the server process's user+sys time
over the window, per result served), measured in interleaved rounds on the same machine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import psutil

from runtime.client import Client, Reply

ROUNDS = 3  # throughput rounds, each: bare, then each path with each client count


@dataclass(frozen=True)
class BenchFrame:
    """What the bench's clients send: a BGR image, raw or (when `jpeg` is set) as that JPEG."""

    image: np.ndarray
    jpeg: bytes | None = None

    def send(self, client: Client) -> int | None:
        if self.jpeg is None:
            return client.send(self.image)
        height, width = self.image.shape[:2]
        return client.send_jpeg(self.jpeg, width, height)


@dataclass
class Window:
    """One throughput window: results, seconds, and the measured process's CPU seconds."""

    results: int
    seconds: float
    cpu_s: float | None = None
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.results / self.seconds


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU the process has used, all its threads."""
    times = process.cpu_times()
    return times.user + times.system


def bare_window(engine, feeds, seconds: float) -> Window:
    """The engine alone, in this process: its rate and its CPU per inference (this
    process's CPU, ONNX Runtime's threads included; nothing else runs here meanwhile)."""
    me = psutil.Process()
    count, cpu_start, start = 0, cpu_seconds(me), time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.infer(feeds)
        count += 1
    elapsed = time.perf_counter() - start
    return Window(count, elapsed, cpu_seconds(me) - cpu_start)


def bare_rate(engine, feeds, seconds: float) -> float:
    return bare_window(engine, feeds, seconds).rate


def server_window(endpoint: str, keys: dict, frame: BenchFrame | np.ndarray, clients: int,
                  seconds: float, *, in_flight: int = 2,
                  process: psutil.Process | None = None) -> Window:
    """`clients` clients, each keeping `in_flight` frames out, for `seconds`; with
    `process` (the server's), its CPU over the window."""
    frame = frame if isinstance(frame, BenchFrame) else BenchFrame(frame)
    results = [0] * clients
    latencies: list[float] = []
    stop = threading.Event()

    def make_handler(index: int):
        def on_reply(reply: Reply) -> None:
            if reply.ok:
                results[index] += 1
                if reply.round_trip_s is not None:
                    latencies.append(reply.round_trip_s * 1e3)
            if not stop.is_set():
                frame.send(handles[index])  # keep the window full: the engine never idles
        return on_reply

    handles = [Client(endpoint, max_in_flight=in_flight, on_reply=make_handler(i), **keys)
               for i in range(clients)]
    try:
        for client in handles:
            client.wait_connected(10)
        cpu_start = cpu_seconds(process) if process is not None else None
        start = time.perf_counter()
        for client in handles:
            for _ in range(in_flight):
                frame.send(client)
        time.sleep(seconds)
        stop.set()
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(process) - cpu_start if process is not None else None
        total = sum(results)
        served = list(latencies)
    finally:
        for client in handles:
            client.close()
    return Window(total, elapsed, cpu, served)


def server_rate(endpoint: str, keys: dict, frame: BenchFrame | np.ndarray, clients: int,
                seconds: float, *, in_flight: int = 2,
                latencies: list[float] | None = None) -> float:
    """Results per second; each result's round trip (ms) is appended to `latencies`."""
    window = server_window(endpoint, keys, frame, clients, seconds, in_flight=in_flight)
    if latencies is not None:
        latencies.extend(window.latencies_ms)
    return window.rate


@dataclass
class Throughput:
    """Every window of an interleaved run: the bare engine's, and per (path, clients)."""

    bare: list[Window] = field(default_factory=list)
    paths: dict[str, dict[int, list[Window]]] = field(default_factory=dict)


def interleaved_throughput(engine, feeds, links: Mapping[str, tuple[str, dict]],
                           frame: BenchFrame, seconds: float, *,
                           clients: Sequence[int] = (1, 2),
                           processes: Mapping[str, psutil.Process] | None = None,
                           advance: Callable[[], None] = lambda: None) -> Throughput:
    """ROUNDS rounds of: the bare engine, then every path with every client count, each for
    `seconds / ROUNDS`; `advance` is called after each window (the progress display)."""
    found = Throughput(paths={name: {count: [] for count in clients} for name in links})
    window = seconds / ROUNDS
    processes = processes or {}
    for _ in range(ROUNDS):
        found.bare.append(bare_window(engine, feeds, window))
        advance()
        for name, (endpoint, keys) in links.items():
            for count in clients:
                found.paths[name][count].append(server_window(
                    endpoint, keys, frame, count, window, process=processes.get(name)))
                advance()
    return found


def windows_per_run(paths: int, clients: int) -> int:
    return ROUNDS * (1 + paths * clients)


def summarize(throughput: Throughput) -> dict:
    """Figures for the report: medians of the rounds' rates, pooled latency percentiles,
    CPU per result over all rounds (total CPU / total results)."""
    bare_rate_ = float(np.median([w.rate for w in throughput.bare]))
    bare_cpu = _cpu_per_result_ms(throughput.bare)
    summary = {"bare engine": {"results_per_s": bare_rate_, "ratio": 1.0,
                               "cpu_ms_per_inference": bare_cpu}, "paths": {}}
    for name, by_count in throughput.paths.items():
        rows = {}
        for count, windows in by_count.items():
            rate = float(np.median([w.rate for w in windows]))
            latencies = [v for w in windows for v in w.latencies_ms]
            cpu = _cpu_per_result_ms(windows)
            rows[count] = {
                "results_per_s": rate, "ratio": rate / bare_rate_,
                "p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
                "p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
                "cpu_ms_per_frame": cpu,
                "cpu_ms_beyond_engine": (cpu - bare_cpu if cpu is not None
                                         and bare_cpu is not None else None)}
        summary["paths"][name] = rows
    return summary


def _cpu_per_result_ms(windows: list[Window]) -> float | None:
    results = sum(w.results for w in windows)
    if not results or any(w.cpu_s is None for w in windows):
        return None
    return sum(w.cpu_s for w in windows) / results * 1e3

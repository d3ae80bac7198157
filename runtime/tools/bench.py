"""`sightline bench`: what the runtime costs on top of the bare engine, measured honestly.

Same machine, same run, interleaved: the bare `engine.infer` on a preprocessed 640x480
tensor against the full client -> daemon -> client path, over a plain link and over
CurveZMQ (two `sightline serve` processes, as in production). Prints medians and p99 for
latency, and throughput with 1 and 2 clients as a ratio to bare-engine throughput.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from runtime.client import Client, Reply, query_info
from runtime.config import load_config
from runtime.curve_keys import throwaway_keys
from runtime.engines import open_bundle_engine
from runtime.errors import SightlineError
from runtime.models.assets import ASTRONAUT_PNG, fetch_asset
from runtime.models.bundle import Bundle
from runtime.models.preprocess import Preprocessor
from runtime.tools.latency import latency_table, percentiles, stage_durations_ms

ROUNDS = 3  # throughput rounds, each: bare, then each link with 1 and 2 clients


def run_bench(*, bundle: Bundle, samples: int, seconds: float, config_path: Path | None = None,
              console: Console | None = None) -> dict:
    """`config_path`: the daemon's TOML config; its [engine] settings apply to all paths."""
    console = console or Console()
    config = load_config(config_path)
    frame = cv2.resize(cv2.imread(str(fetch_asset(ASTRONAUT_PNG))), (640, 480))
    tensor, _ = Preprocessor(bundle.manifest.input, bundle.manifest.preprocess)(frame, "bgr")
    engine = open_bundle_engine(bundle, config.engine)
    feeds = {bundle.manifest.input.name: tensor.copy()}
    console.print(f"model {bundle.name}@{bundle.version} on {engine.provider}; 640x480 BGR "
                  "frames; daemons on ipc endpoints")

    with tempfile.TemporaryDirectory(prefix="sightline-bench-") as tmp:
        keys_dir, curve_keys = throwaway_keys(Path(tmp))
        links = {"plain": (f"ipc://{tmp}/plain.sock", {}),
                 "curve": (f"ipc://{tmp}/curve.sock", curve_keys)}
        daemons = [_start_daemon(links["plain"][0], bundle.directory, config_path, None, {}),
                   _start_daemon(links["curve"][0], bundle.directory, config_path, keys_dir,
                                 curve_keys)]
        try:
            latency = _interleaved_latency(engine, feeds, links, frame, samples)
            rates = _interleaved_throughput(engine, feeds, links, frame, seconds)
        finally:
            for daemon in daemons:
                daemon.terminate()
                daemon.wait(15)
    engine.close()
    return _report(console, latency, rates)


def _start_daemon(endpoint: str, bundle_dir: Path, config_path: Path | None,
                  keys_dir: Path | None, client_keys: dict) -> subprocess.Popen:
    args = ["--config", str(config_path)] if config_path else []
    args += ["--keys", str(keys_dir)] if keys_dir else ["--plain"]
    args += ["--control", endpoint.replace(".sock", "-control.sock")]  # two daemons at once
    process = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "--log-level", "warning", "serve", "--bind",
         endpoint, "--model", str(bundle_dir), *args], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SightlineError(f"a bench daemon exited with {process.returncode}")
        if query_info(endpoint, timeout=0.5, **client_keys) is not None:
            return process
    process.kill()
    raise SightlineError("a bench daemon did not start within 60 s")


def _round_trip(client: Client, frame: np.ndarray) -> tuple[float, Reply]:
    start = time.perf_counter()
    client.send(frame)
    reply = client.recv(10)
    elapsed = time.perf_counter() - start
    if reply is None or not reply.ok:
        raise SightlineError(f"bench frame failed: {reply}")
    return elapsed * 1e3, reply


def _interleaved_latency(engine, feeds, links, frame, samples) -> dict[str, list[float]]:
    """One bare inference, then one round trip per link, repeated: all see the same machine."""
    series: dict[str, list[float]] = {"bare engine.infer": []}
    clients = {name: Client(endpoint, max_in_flight=1, **keys)
               for name, (endpoint, keys) in links.items()}
    try:
        for name, client in clients.items():
            if not client.wait_connected(10):
                raise SightlineError(f"the {name} bench daemon did not accept a connection")
        for _ in range(10):  # warm-up
            engine.infer(feeds)
            for client in clients.values():
                _round_trip(client, frame)
        for _ in range(samples):
            start = time.perf_counter()
            engine.infer(feeds)
            series["bare engine.infer"].append((time.perf_counter() - start) * 1e3)
            for name, client in clients.items():
                elapsed, reply = _round_trip(client, frame)
                series.setdefault(f"client -> daemon -> client, {name}", []).append(elapsed)
                for stage, ms in stage_durations_ms(reply.stamps).items():
                    series.setdefault(f"  {name}: daemon {stage}", []).append(ms)
    finally:
        for client in clients.values():
            client.close()
    return series


def _bare_rate(engine, feeds, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.infer(feeds)
        count += 1
    return count / (time.perf_counter() - start)


def _daemon_rate(endpoint: str, keys: dict, frame: np.ndarray, clients: int,
                 seconds: float) -> float:
    """Results per second with `clients` clients, each keeping 2 frames in flight."""
    results = [0] * clients
    stop = threading.Event()

    def make_handler(index: int):
        def on_reply(reply: Reply) -> None:
            if reply.ok:
                results[index] += 1
            if not stop.is_set():
                handles[index].send(frame)  # keep the window full: the engine never idles
        return on_reply

    handles = [Client(endpoint, max_in_flight=2, on_reply=make_handler(i), **keys)
               for i in range(clients)]
    try:
        for client in handles:
            client.wait_connected(10)
        start = time.perf_counter()
        for client in handles:
            client.send(frame)
            client.send(frame)
        time.sleep(seconds)
        stop.set()
        elapsed = time.perf_counter() - start
        total = sum(results)
    finally:
        for client in handles:
            client.close()
    return total / elapsed


def _interleaved_throughput(engine, feeds, links, frame, seconds) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"bare engine": []}
    window = seconds / ROUNDS
    for _ in range(ROUNDS):
        rates["bare engine"].append(_bare_rate(engine, feeds, window))
        for name, (endpoint, keys) in links.items():
            for count in (1, 2):
                label = f"{name}, {count} client{'s' if count > 1 else ''}"
                rates.setdefault(label, []).append(
                    _daemon_rate(endpoint, keys, frame, count, window))
    return rates


def _report(console: Console, latency: dict[str, list[float]], rates) -> dict:
    console.print(latency_table("Latency, interleaved samples", latency))
    bare = percentiles(latency["bare engine.infer"])
    overhead = {}
    for link in ("plain", "curve"):
        full = percentiles(latency[f"client -> daemon -> client, {link}"])
        overhead[link] = {"p50": full[0] - bare[0], "p99": full[2] - bare[2]}
        console.print(f"runtime overhead, {link}: p50 {overhead[link]['p50']:+.2f} ms, "
                      f"p99 {overhead[link]['p99']:+.2f} ms")
    table = Table(title=f"Throughput (median of {ROUNDS} interleaved rounds)")
    for column in ("path", "frames/s", "ratio to bare"):
        table.add_column(column, justify="left" if column == "path" else "right")
    bare_rate = float(np.median(rates["bare engine"]))
    figures = {}
    for name, values in rates.items():
        rate = float(np.median(values))
        figures[name] = {"fps": rate, "ratio": rate / bare_rate}
        table.add_row(name, f"{rate:.1f}", f"{rate / bare_rate:.3f}")
    console.print(table)
    return {"latency_ms": {k: percentiles(v) for k, v in latency.items()},
            "overhead_ms": overhead, "throughput": figures}

"""`sightline bench`: what the runtime costs on top of the bare engine, measured honestly.

Same machine, same run, interleaved: the bare `engine.infer` on a preprocessed
640x480 tensor against the full client -> daemon -> client path (the daemon is a
separate `sightline serve` process, as in production). Prints medians and p99 for
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
from runtime.engines import open_bundle_engine
from runtime.errors import SightlineError
from runtime.latency import latency_table, percentiles, stage_durations_ms
from runtime.model_zoo import ASTRONAUT_PNG, fetch_asset, resolve_bundle
from runtime.preprocess import Preprocessor

ROUNDS = 3  # throughput is measured in interleaved rounds: bare, 1 client, 2 clients


def run_bench(*, model: str, samples: int, seconds: float, config_path: Path | None = None,
              console: Console | None = None) -> dict:
    """`config_path`: the daemon's TOML config; its [engine] settings apply to both paths."""
    console = console or Console()
    config = load_config(config_path)
    bundle = resolve_bundle(model)
    frame = cv2.resize(cv2.imread(str(fetch_asset(ASTRONAUT_PNG))), (640, 480))
    tensor, _ = Preprocessor(bundle.manifest.input, bundle.manifest.preprocess)(frame, "bgr")
    tensor = tensor.copy()
    engine = open_bundle_engine(bundle, config.engine)
    feeds = {bundle.manifest.input.name: tensor}
    console.print(f"model {bundle.name}@{bundle.version} on {engine.provider}; 640x480 BGR frames")

    with tempfile.TemporaryDirectory(prefix="sightline-bench-") as tmp:
        endpoint = f"ipc://{tmp}/bench.sock"
        daemon = _start_daemon(endpoint, bundle.directory, config_path)
        try:
            for _ in range(10):  # warm both paths up before measuring
                engine.infer(feeds)
            with Client(endpoint, max_in_flight=1) as client:
                if not client.wait_connected(10):
                    raise SightlineError("bench daemon did not accept a connection")
                for _ in range(10):
                    _round_trip(client, frame)
                bare_ms, full_ms, stages = _interleaved_latency(engine, feeds, client, frame,
                                                                samples)
            rates = _interleaved_throughput(engine, feeds, endpoint, frame, seconds)
        finally:
            daemon.terminate()
            daemon.wait(15)
    engine.close()
    return _report(console, bare_ms, full_ms, stages, rates)


def _start_daemon(endpoint: str, bundle_dir: Path, config_path: Path | None) -> subprocess.Popen:
    config_args = ["--config", str(config_path)] if config_path else []
    process = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "--log-level", "warning", "serve", "--plain",
         "--bind", endpoint, "--model", str(bundle_dir), *config_args],
        stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SightlineError(f"the bench daemon exited with {process.returncode}")
        if query_info(endpoint, timeout=0.5) is not None:
            return process
    process.kill()
    raise SightlineError("the bench daemon did not start within 60 s")


def _round_trip(client: Client, frame: np.ndarray) -> tuple[float, Reply]:
    start = time.perf_counter()
    client.send(frame)
    reply = client.recv(10)
    elapsed = time.perf_counter() - start
    if reply is None or not reply.ok:
        raise SightlineError(f"bench frame failed: {reply}")
    return elapsed * 1e3, reply


def _interleaved_latency(engine, feeds, client, frame, samples):
    """Alternate one bare inference and one full round trip, so both see the same machine."""
    bare, full, stages = [], [], {}
    for _ in range(samples):
        start = time.perf_counter()
        engine.infer(feeds)
        bare.append((time.perf_counter() - start) * 1e3)
        elapsed, reply = _round_trip(client, frame)
        full.append(elapsed)
        for stage, ms in stage_durations_ms(reply.stamps).items():
            stages.setdefault(f"  daemon {stage}", []).append(ms)
    return bare, full, stages


def _bare_rate(engine, feeds, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.infer(feeds)
        count += 1
    return count / (time.perf_counter() - start)


def _daemon_rate(endpoint: str, frame: np.ndarray, clients: int, seconds: float) -> float:
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

    handles = [Client(endpoint, max_in_flight=2, on_reply=make_handler(i)) for i in range(clients)]
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


def _interleaved_throughput(engine, feeds, endpoint, frame, seconds) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"bare engine": [], "1 client": [], "2 clients": []}
    for _ in range(ROUNDS):
        rates["bare engine"].append(_bare_rate(engine, feeds, seconds / ROUNDS))
        rates["1 client"].append(_daemon_rate(endpoint, frame, 1, seconds / ROUNDS))
        rates["2 clients"].append(_daemon_rate(endpoint, frame, 2, seconds / ROUNDS))
    return rates


def _report(console: Console, bare_ms, full_ms, stages, rates) -> dict:
    console.print(latency_table("Latency, interleaved samples", {
        "bare engine.infer": bare_ms, "client -> daemon -> client": full_ms, **stages}))
    bare_p = percentiles(bare_ms)
    full_p = percentiles(full_ms)
    overhead = {"p50": full_p[0] - bare_p[0], "p99": full_p[2] - bare_p[2]}
    console.print(f"runtime overhead: p50 {overhead['p50']:+.2f} ms, p99 {overhead['p99']:+.2f} ms")
    table = Table(title=f"Throughput (median of {ROUNDS} interleaved rounds)")
    table.add_column("path")
    table.add_column("frames/s", justify="right")
    table.add_column("ratio to bare", justify="right")
    bare_rate = float(np.median(rates["bare engine"]))
    figures = {}
    for name, values in rates.items():
        rate = float(np.median(values))
        figures[name] = {"fps": rate, "ratio": rate / bare_rate}
        table.add_row(name, f"{rate:.1f}", f"{rate / bare_rate:.3f}")
    console.print(table)
    return {"bare_ms": bare_p, "full_ms": full_p, "overhead_ms": overhead, "throughput": figures}

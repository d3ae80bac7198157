"""`sightline bench`: what the runtime costs on top of the bare engine, measured honestly.

Same machine, same run, interleaved and paired (the same frame, one after the other on
each path): the bare `engine.infer` on a preprocessed 640x480 tensor; the reference floor
(bench/reference_floor.py: one thread doing decode -> preprocess -> engine -> reply, when
the source tree is at hand); the daemon over a plain link; the daemon over CurveZMQ. Each
server is its own process, as in production. Prints p50/p99 latency, the overhead over the
bare engine and over the floor, where the daemon's time goes (from its reply stamps), and
throughput with 1 and 2 clients as a ratio to bare-engine throughput.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from runtime.client import Client, query_info
from runtime.config import load_config
from runtime.curve_keys import throwaway_keys
from runtime.engines import open_bundle_engine
from runtime.errors import SightlineError
from runtime.models.assets import ASTRONAUT_PNG, fetch_asset
from runtime.models.bundle import Bundle
from runtime.models.preprocess import Preprocessor
from runtime.tools.bench_rates import interleaved_throughput, throughput_table
from runtime.tools.latency import latency_table, percentiles

BARE = "bare engine.infer"
FLOOR_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "reference_floor.py"
# (label, from, to): the frame's path, on the client's clock ("client_sent",
# "client_received") and the server's stamps; one machine, so one clock.
PATH_STAGES = (
    ("transport in + socket read", "client_sent", "received"),
    ("hand-over to the model", "received", "taken"),
    ("decode", "taken", "decoded"),
    ("preprocess", "decoded", "preprocessed"),
    ("hand-over to the engine", "preprocessed", "started"),
    ("engine", "started", "inferred"),
    ("output decode", "inferred", "postprocessed"),
    ("encode, send, transport out", "postprocessed", "client_received"),
)


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
                  "frames; servers on ipc endpoints, one process each")

    with tempfile.TemporaryDirectory(prefix="sightline-bench-") as tmp:
        keys_dir, curve_keys = throwaway_keys(Path(tmp))
        links = {"plain": (f"ipc://{tmp}/plain.sock", {}),
                 "curve": (f"ipc://{tmp}/curve.sock", curve_keys)}
        servers = [_start_daemon(links["plain"][0], bundle.directory, config_path, None, {}),
                   _start_daemon(links["curve"][0], bundle.directory, config_path, keys_dir,
                                 curve_keys)]
        if FLOOR_SCRIPT.is_file():
            links = {"floor": (f"ipc://{tmp}/floor.sock", {}), **links}
            servers.append(_start_floor(links["floor"][0], bundle, config.engine.intra_op_threads))
        else:
            console.print("reference floor: not measured (bench/reference_floor.py is in the "
                          "source tree only)")
        try:
            latency, paths = _interleaved_latency(engine, feeds, links, frame, samples)
            rates = interleaved_throughput(engine, feeds, links, frame, seconds)
        finally:
            for server in servers:
                server.terminate()
                server.wait(15)
    engine.close()
    return _report(console, latency, paths, rates)


def _wait_ready(process: subprocess.Popen, endpoint: str, keys: dict, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SightlineError(f"the bench {what} exited with {process.returncode}")
        if query_info(endpoint, timeout=0.5, **keys) is not None:
            return
    process.kill()
    raise SightlineError(f"the bench {what} did not start within 60 s")


def _start_daemon(endpoint: str, bundle_dir: Path, config_path: Path | None,
                  keys_dir: Path | None, client_keys: dict) -> subprocess.Popen:
    args = ["--config", str(config_path)] if config_path else []
    args += ["--keys", str(keys_dir)] if keys_dir else ["--plain"]
    args += ["--control", endpoint.replace(".sock", "-control.sock")]  # two daemons at once
    process = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "--log-level", "warning", "serve", "--bind",
         endpoint, "--model", str(bundle_dir), *args], stdout=subprocess.DEVNULL)
    _wait_ready(process, endpoint, client_keys, "daemon")
    return process


def _start_floor(endpoint: str, bundle: Bundle, threads: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(FLOOR_SCRIPT), str(bundle.directory),
                                endpoint, "--threads", str(threads)], stdout=subprocess.DEVNULL)
    _wait_ready(process, endpoint, {}, "reference floor")
    return process


def _round_trip(client: Client, frame: np.ndarray) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    client.send(frame)
    reply = client.recv(10)
    elapsed = time.perf_counter() - start
    if reply is None or not reply.ok:
        raise SightlineError(f"bench frame failed: {reply}")
    stamps = {**reply.stamps, "client_sent": reply.sent_at, "client_received": reply.received_at}
    return elapsed * 1e3, stamps


def _interleaved_latency(engine, feeds, links, frame, samples):
    """One bare inference, then one round trip per path, repeated: all see the same machine.

    Returns the latency series (ms) and, per path, the per-stage series (ms)."""
    series: dict[str, list[float]] = {BARE: []}
    paths: dict[str, dict[str, list[float]]] = {name: {} for name in links}
    # The SDK's direct mode: no I/O thread between the bench and the socket (a headset app
    # that sends and receives from one thread gets the same path).
    clients = {name: Client(endpoint, max_in_flight=1, io_thread=False, **keys)
               for name, (endpoint, keys) in links.items()}
    try:
        for name, client in clients.items():
            if not client.wait_connected(10):
                raise SightlineError(f"the {name} bench server did not accept a connection")
        for _ in range(10):  # warm-up
            engine.infer(feeds)
            for client in clients.values():
                _round_trip(client, frame)
        for _ in range(samples):
            start = time.perf_counter()
            engine.infer(feeds)
            series[BARE].append((time.perf_counter() - start) * 1e3)
            for name, client in clients.items():
                elapsed, stamps = _round_trip(client, frame)
                series.setdefault(name, []).append(elapsed)
                stages = paths[name]
                for label, begin, end in PATH_STAGES:
                    if begin in stamps and end in stamps:
                        stages.setdefault(label, []).append((stamps[end] - stamps[begin]) * 1e3)
                outside = (stamps["client_received"] - stamps["client_sent"]) * 1e3
                stages.setdefault("client SDK, direct mode", []).append(
                    elapsed - outside)
    finally:
        for client in clients.values():
            client.close()
    return series, paths


def _paired(values: list[float], baseline: list[float]) -> tuple[float, float]:
    """p50 and p99 of per-sample differences (the same frame on both paths)."""
    difference = np.asarray(values) - np.asarray(baseline)
    return float(np.percentile(difference, 50)), float(np.percentile(difference, 99))


def _report(console: Console, latency, paths, rates) -> dict:
    console.print(latency_table("Latency, interleaved samples (round trip, client clock)",
                                latency))
    bare = percentiles(latency[BARE])
    table = Table(title="Overhead, ms: p50(path) - p50(baseline) and p99 - p99; paired: "
                        "percentiles of per-frame differences")
    for column in ("path", "over bare p50", "over bare p99", "paired p50", "paired p99",
                   "over floor p50", "over floor p99"):
        table.add_column(column, justify="left" if column == "path" else "right")
    overhead = {}
    floor = latency.get("floor")
    for name in (n for n in latency if n != BARE):
        full = percentiles(latency[name])
        figures = {"p50": full[0] - bare[0], "p99": full[2] - bare[2]}
        figures["paired_p50"], figures["paired_p99"] = _paired(latency[name], latency[BARE])
        cells = [f"{figures[k]:+.2f}" for k in ("p50", "p99", "paired_p50", "paired_p99")]
        if floor is not None and name != "floor":
            floor_p = percentiles(floor)
            figures["over_floor_p50"] = full[0] - floor_p[0]
            figures["over_floor_p99"] = full[2] - floor_p[2]
            cells += [f"{figures['over_floor_p50']:+.2f}", f"{figures['over_floor_p99']:+.2f}"]
        else:
            cells += ["", ""]
        overhead[name] = figures
        table.add_row(name, *cells)
    console.print(table)
    stages = Table(title="Where each path's time goes, p50 ms (p99)")
    stages.add_column("stage")
    for name in paths:
        stages.add_column(name, justify="right")
    labels = [label for label, _, _ in PATH_STAGES] + ["client SDK, direct mode"]
    for label in labels:
        cells = []
        for series in paths.values():
            values = series.get(label)
            cells.append("-" if not values else
                         f"{np.percentile(values, 50):.3f} ({np.percentile(values, 99):.2f})")
        stages.add_row(label, *cells)
    console.print(stages)
    console.print(throughput_table(rates))
    return {"latency_ms": {k: percentiles(v) for k, v in latency.items()},
            "overhead_ms": overhead,
            "stages_ms": {name: {label: percentiles(v) for label, v in series.items()}
                          for name, series in paths.items()},
            "throughput": {name: {"fps": float(np.median(v)),
                                  "ratio": float(np.median(v) / np.median(rates["bare engine"]))}
                           for name, v in rates.items()}}

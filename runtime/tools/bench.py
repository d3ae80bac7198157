"""`sightline bench`: what the runtime costs on top of the bare engine, measured honestly.

Same machine, same run, interleaved and paired (the same frame, one after the other on
each path): the bare `engine.infer` on a preprocessed tensor; the reference floor
(bench/reference_floor.py: one thread doing decode -> preprocess -> engine -> reply, when
the source tree is at hand); the daemon over a plain link and over CurveZMQ, each with the
preprocessing and box decoding in Python (`[engine] fused = "off"`) and inside the engine
(`fused = "auto"`), so the gain is a ratio from one run. Each server is its own process,
as in production. Reports latency, the overhead over the bare engine and over the floor,
where each path's time goes (from its reply stamps), and per client count the results/s,
their p99 and the server's CPU per served frame beside the engine's own per inference.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from runtime.client import Client, query_info
from runtime.config import load_config, tomllib
from runtime.curve_keys import throwaway_keys
from runtime.engines import open_bundle_engine
from runtime.errors import SightlineError
from runtime.models.assets import ASTRONAUT_PNG, fetch_asset
from runtime.models.bundle import Bundle
from runtime.models.preprocess import Preprocessor
from runtime.tools.bench_rates import BenchFrame, interleaved_throughput, windows_per_run
from runtime.tools.bench_report import BARE, PATH_STAGES, report

__all__ = ["BARE", "PATH_STAGES", "BenchOptions", "run_bench"]

FLOOR_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "reference_floor.py"
JPEG_QUALITY = 85
FUSED_MODES = ("off", "auto")
WARM_UP = 10


@dataclass(frozen=True)
class BenchOptions:
    samples: int = 300  # latency samples per path, interleaved
    seconds: float = 10.0  # each throughput measurement, over all rounds
    frame_size: tuple[int, int] = (640, 480)  # width, height
    encoding: str = "raw"  # "raw" (bgr8) or "jpeg" (quality 85)
    clients: tuple[int, ...] = (1, 2)
    fused: tuple[str, ...] = FUSED_MODES  # the daemons' [engine] fused settings to measure


def run_bench(*, bundle: Bundle, options: BenchOptions = BenchOptions(),
              config_path: Path | None = None, console: Console | None = None) -> dict:
    """`config_path`: the daemon's TOML config; its settings apply to every daemon, with
    `[engine] fused` set per daemon. Returns every figure (the `--json` document)."""
    console = console or Console()
    config = load_config(config_path)
    frame = bench_frame(options)
    image = frame.image if frame.jpeg is None else cv2.imdecode(
        np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR)
    tensor, _ = Preprocessor(bundle.manifest.input, bundle.manifest.preprocess)(image, "bgr")
    # The engine alone, as the Python path feeds it: a preprocessed float tensor.
    engine = open_bundle_engine(bundle, config.engine.model_copy(update={"fused": "off"}))
    feeds = {bundle.manifest.input.name: tensor.copy()}
    width, height = options.frame_size
    what = (f"{width}x{height} " + ("BGR" if frame.jpeg is None else
                                    f"JPEG q{JPEG_QUALITY} ({len(frame.jpeg) // 1024} KB)"))
    console.print(f"model {bundle.name}@{bundle.version} on {engine.provider}; {what} frames; "
                  "servers on ipc endpoints, one process each")
    meta = {"model": {"name": bundle.name, "version": bundle.version,
                      "provider": engine.provider},
            "frame": {"width": width, "height": height, "encoding": options.encoding,
                      "bytes": len(frame.jpeg) if frame.jpeg is not None else image.nbytes},
            "machine": {"cpus": psutil.cpu_count(), "load_average": list(psutil.getloadavg())},
            "options": {"samples": options.samples, "seconds": options.seconds,
                        "clients": list(options.clients), "fused": list(options.fused)}}

    with tempfile.TemporaryDirectory(prefix="sightline-bench-") as tmp, _progress(console) as bar:
        links, servers = _start_servers(Path(tmp), bundle, config_path, config, options, bar)
        try:
            processes = {name: psutil.Process(process.pid) for name, process in servers.items()}
            task = bar.add_task("latency samples", total=WARM_UP + options.samples)
            latency, paths = _interleaved_latency(engine, feeds, links, frame, options.samples,
                                                  lambda: bar.advance(task))
            task = bar.add_task("throughput windows",
                                total=windows_per_run(len(links), len(options.clients)))
            rates = interleaved_throughput(engine, feeds, links, frame, options.seconds,
                                           clients=options.clients, processes=processes,
                                           advance=lambda: bar.advance(task))
        finally:
            for server in servers.values():
                server.terminate()
            for server in servers.values():
                server.wait(15)
    engine.close()
    return {**meta, **report(console, latency, paths, rates)}


def bench_frame(options: BenchOptions) -> BenchFrame:
    """The astronaut photo at the frame size, raw or as a quality-85 JPEG."""
    photo = cv2.imread(str(fetch_asset(ASTRONAUT_PNG)))
    image = cv2.resize(photo, options.frame_size, interpolation=cv2.INTER_AREA)
    if options.encoding == "raw":
        return BenchFrame(image)
    if options.encoding != "jpeg":
        raise SightlineError(f"unknown frame encoding {options.encoding!r}: expected raw or jpeg")
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise SightlineError("OpenCV could not encode the bench frame as JPEG")
    return BenchFrame(image, data.tobytes())


def _progress(console: Console) -> Progress:
    # transient: the live display gives way to the tables once the measuring is done
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def _start_servers(tmp: Path, bundle: Bundle, config_path: Path | None, config,
                   options: BenchOptions, bar: Progress):
    """Every server of the run, started at once and waited for: {path: (endpoint, client
    keys)} and {path: process}."""
    keys_dir, curve_keys = throwaway_keys(tmp)
    links: dict[str, tuple[str, dict]] = {}
    launched: dict[str, tuple[subprocess.Popen, str]] = {}
    if FLOOR_SCRIPT.is_file():
        links["floor"] = (f"ipc://{tmp}/floor.sock", {})
        launched["floor"] = (_launch_floor(links["floor"][0], bundle,
                                           config.engine.intra_op_threads,
                                           _log(tmp, "floor")),
                             "reference floor")
    for link, keys in (("plain", {}), ("curve", curve_keys)):
        for fused in options.fused:
            name = f"{link}, fused {fused}"
            endpoint = f"ipc://{tmp}/{link}-{fused}.sock"
            links[name] = (endpoint, keys)
            daemon_config = _config_with_fused(tmp, config_path, fused)
            launched[name] = (_launch_daemon(endpoint, bundle.directory, daemon_config,
                                             keys_dir if keys else None,
                                             _log(tmp, name)), f"{name} daemon")
    task = bar.add_task("starting servers", total=len(launched))
    try:
        for name, (process, what) in launched.items():
            _wait_ready(process, links[name][0], links[name][1], what, _log(tmp, name))
            bar.advance(task)
    except BaseException:
        for process, _ in launched.values():
            process.kill()
            process.wait(15)
        raise
    return links, {name: process for name, (process, _) in launched.items()}


def _config_with_fused(tmp: Path, config_path: Path | None, fused: str) -> Path:
    """The user's config (or none) with `[engine] fused` set, as a TOML file in `tmp`."""
    data: dict[str, Any] = tomllib.loads(config_path.read_text()) if config_path else {}
    data.setdefault("engine", {})["fused"] = fused
    path = tmp / f"fused-{fused}.toml"
    path.write_text(toml_text(data))
    return path


def toml_text(data: dict[str, Any]) -> str:
    """A TOML document for config data (tables, scalars, arrays): read back, it is `data`."""
    lines: list[str] = []

    def table(node: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if prefix and (scalars or not node):
            lines.append(f"[{prefix}]")
        lines.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in scalars.items())
        for key, value in node.items():
            if isinstance(value, dict):
                table(value, f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key))

    table(data, "")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise SightlineError(f"cannot write {value!r} ({type(value).__name__}) to a TOML config")


def _wait_ready(process: subprocess.Popen, endpoint: str, keys: dict, what: str,
                log: Path) -> None:
    """Until the server answers a ping; its log (stderr) names the reason if it dies."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
            said = f"; its last words: {lines[-1]}" if lines else ""
            raise SightlineError(f"the bench {what} exited with {process.returncode}{said}")
        if query_info(endpoint, timeout=0.5, **keys) is not None:
            return
    process.kill()
    raise SightlineError(f"the bench {what} did not start within 60 s")


def _log(tmp: Path, name: str) -> Path:
    return tmp / (name.replace(", ", "-").replace(" ", "-") + ".log")


def _launch_daemon(endpoint: str, bundle_dir: Path, config_path: Path,
                   keys_dir: Path | None, log: Path) -> subprocess.Popen:
    args = ["--config", str(config_path)]
    args += ["--keys", str(keys_dir)] if keys_dir else ["--plain"]
    args += ["--control", endpoint.replace(".sock", "-control.sock")]  # several daemons at once
    # to a file: its warnings (plain mode ...) would break into the live display
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "--log-level", "warning", "serve", "--bind",
             endpoint, "--model", str(bundle_dir), *args], stdout=subprocess.DEVNULL,
            stderr=stderr)


def _launch_floor(endpoint: str, bundle: Bundle, threads: int, log: Path) -> subprocess.Popen:
    with log.open("wb") as stderr:
        return subprocess.Popen([sys.executable, str(FLOOR_SCRIPT), str(bundle.directory),
                                 endpoint, "--threads", str(threads)],
                                stdout=subprocess.DEVNULL, stderr=stderr)


def _round_trip(client: Client, frame: BenchFrame) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    frame.send(client)
    reply = client.recv(10)
    elapsed = time.perf_counter() - start
    if reply is None or not reply.ok:
        raise SightlineError(f"bench frame failed: {reply}")
    stamps = {**reply.stamps, "client_sent": reply.sent_at, "client_received": reply.received_at}
    return elapsed * 1e3, stamps


def _interleaved_latency(engine, feeds, links, frame: BenchFrame, samples: int,
                         advance: Callable[[], None]):
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
        for _ in range(WARM_UP):
            engine.infer(feeds)
            for client in clients.values():
                _round_trip(client, frame)
            advance()
        for _ in range(samples):
            start = time.perf_counter()
            engine.infer(feeds)
            series[BARE].append((time.perf_counter() - start) * 1e3)
            for name, client in clients.items():
                elapsed, stamps = _round_trip(client, frame)
                series.setdefault(name, []).append(elapsed)
                _add_stages(paths[name], stamps, elapsed)
            advance()
    finally:
        for client in clients.values():
            client.close()
    return series, paths


def _add_stages(stages: dict[str, list[float]], stamps: dict[str, float], elapsed: float):
    for label, begin, end in PATH_STAGES:
        if begin in stamps and end in stamps:
            stages.setdefault(label, []).append((stamps[end] - stamps[begin]) * 1e3)
    outside = (stamps["client_received"] - stamps["client_sent"]) * 1e3
    stages.setdefault("client SDK, direct mode", []).append(elapsed - outside)


def parse_clients(text: str) -> tuple[int, ...]:
    """"1,2,4" -> (1, 2, 4); SightlineError naming what is wrong otherwise."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise SightlineError(f"--clients {text!r}: expected client counts like 1,2,4") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise SightlineError(f"--clients {text!r}: expected distinct counts of 1 or more")
    return counts


def parse_frame(text: str) -> tuple[int, int]:
    """"640x480" -> (640, 480)."""
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise SightlineError(f"--frame {text!r}: expected WIDTHxHEIGHT, like 1280x720")
    return int(width), int(height)


def parse_fused(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values)) or FUSED_MODES

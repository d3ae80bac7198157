"""Fleet-scale simulation: N devices on one local mosquitto, a staged OTA rollout of one
model to all of them while they keep sending telemetry. Not part of CI; the figures are
in docs/fleet-scale.md.

Every simulated device is the real device-side stack, in this one process: an MqttLink
with its own SQLite outbox, an Updater, a ModelStore, MqttChunkDelivery and a
TelemetryPublisher, wired the way cloud_sync.agent.CloudAgent wires them, so commands
are really signature-checked, chunks really fetched and hashed, bundles really unpacked,
installed and activated. Only inference is a stand-in: SimHost/SimEngine answer without
ONNX Runtime (zeros of the bundle's reference output shapes), which is what lets a
2-core machine hold hundreds of devices. The operator side is the real one as well
(FleetWatcher + cloud_sync.push.rollout, commands signed with a fresh Ed25519 key).

    python bench/fleet_sim.py --devices 20                 # a quick check
    python bench/fleet_sim.py --devices 200 --canaries 5 --soak 5 --telemetry-interval 2 \\
        --chunk-size 65536 --probation 2 --out bench/fleet_sim-results.json

It starts its own mosquitto on a free loopback port (never 1883) in a temporary
directory and stops it at the end; run it from the repository root.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cloud_sync.agent import STATUS_STATES
from cloud_sync.delivery.mqtt_chunks import MqttChunkDelivery
from cloud_sync.fleet import FleetWatcher
from cloud_sync.link import Downlink, LinkConfig, MqttLink
from cloud_sync.operator import OperatorConfig, publish_bytes
from cloud_sync.ota import OtaSettings, Updater
from cloud_sync.push import RolloutError, package_bundle, resolve_targets, rollout
from cloud_sync.signing import TrustedKeys, generate_signing_key, load_private_key
from cloud_sync.telemetry import TelemetryPublisher
from cloud_sync.topics import Channel, TopicError, parse_topic
from runtime.daemon.model_host import ModelHealth, PipelineState
from runtime.models.bundle import Bundle
from runtime.models.store import ModelStore
from runtime.models.validation import sample_feeds

log = logging.getLogger("fleet_sim")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests package (broker, tiny bundles) is not installed
from tests.cloud_sync.mosquitto import Mosquitto, MosquittoError, free_port  # noqa: E402

MODEL_FROM, MODEL_TO = "1.0", "2.0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Broker-wide counters worth a delta over the rollout (mosquitto 2.0 names).
SYS_TOTALS = ("$SYS/broker/messages/received", "$SYS/broker/messages/sent",
              "$SYS/broker/publish/messages/received", "$SYS/broker/publish/messages/sent",
              "$SYS/broker/bytes/received", "$SYS/broker/bytes/sent")
SYS_GAUGES = ("$SYS/broker/clients/connected", "$SYS/broker/subscriptions/count",
              "$SYS/broker/retained messages/count", "$SYS/broker/load/messages/received/1min",
              "$SYS/broker/load/messages/sent/1min", "$SYS/broker/load/bytes/received/1min",
              "$SYS/broker/load/bytes/sent/1min", "$SYS/broker/heap/current")


# -- the broker ----------------------------------------------------------------------

class Broker(Mosquitto):
    """The simulation's mosquitto, with CPU/RSS/version readings for the figures."""

    def __init__(self, directory: Path, port: int) -> None:
        # "information" has the "running" line and one line per connect; per-packet
        # logging (log_type all) would cost more CPU than the traffic. $SYS every second.
        # max_queued_messages: the counting subscriber must never have QoS 1 dropped.
        super().__init__(directory, port,
                         "allow_anonymous true\n"
                         "persistence false\n"
                         "sys_interval 1\n"
                         "max_connections -1\n"
                         "max_queued_messages 100000\n"
                         "log_type error\nlog_type warning\nlog_type notice\n"
                         "log_type information\n")

    def start(self, timeout: float = 10.0) -> Broker:
        try:
            return super().start(timeout)
        except MosquittoError as exc:
            raise SystemExit(str(exc)) from None

    def cpu_s(self) -> float:
        """User + system CPU seconds the broker has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_mb(self) -> float:
        return _rss_mb(f"/proc/{self.process.pid}/status")

    def version(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for line in text.splitlines():
            if "running" in line and "version" in line:
                return line.split("version", 1)[1].split()[0]
        return "?"


class LogTally(logging.Handler):
    """Counts warnings and errors by logger, so the figures say how noisy a run was."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.name} {record.levelname}"
        self.counts[key] += 1
        self.first.setdefault(key, record.getMessage()[:200])


def _rss_mb(status_path: str) -> float:
    for line in Path(status_path).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _threads() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return threading.active_count()


def _cpu_self_s() -> float:
    times = os.times()
    return times.user + times.system


# -- counting what crosses the broker --------------------------------------------------

class TrafficCounter:
    """A separate MQTT client on `sightline/v1/#` (QoS 1) and `$SYS/#`: counts messages
    and payload bytes by kind, and keeps the broker's latest $SYS figures."""

    def __init__(self, port: int) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.sys: dict[str, float] = {}
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-sim-counter",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise SystemExit("the counting subscriber did not connect to the broker")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe([("sightline/v1/#", 1), ("$SYS/#", 0)])

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        topic, payload = message.topic, message.payload
        if topic.startswith("$SYS/"):
            try:
                value = float(payload.split()[0])
            except (ValueError, IndexError):
                return
            with self._lock:
                self.sys[topic] = value
            return
        kind = _kind(topic, payload)
        with self._lock:
            self.counts[kind] += 1
            self.bytes[kind] += len(payload)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"counts": dict(self.counts), "bytes": dict(self.bytes), "sys": dict(self.sys)}

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _kind(topic: str, payload: bytes) -> str:
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return "other"
    if parsed.channel is Channel.OTA_CHUNKS:
        return "chunk" if payload else "chunk_clear"  # an empty retained message deletes it
    if parsed.channel is Channel.OTA_COMMAND:
        return f"command_{parsed.scope}"
    return {Channel.STATUS: "status", Channel.TELEMETRY: "telemetry",
            Channel.OTA_PROGRESS: "progress"}[parsed.channel]


def _delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {key: after.get(key, 0) - before.get(key, 0)
            for key in sorted(set(after) | set(before)) if after.get(key, 0) != before.get(key, 0)}


# -- a simulated device -----------------------------------------------------------------

class SimEngine:
    """A stand-in engine (this is a simulation): no ONNX Runtime, every inference answers
    zeros shaped like the bundle's reference outputs, so validation passes its finite and
    shape checks; the rollout is pushed without reference tolerance."""

    provider = "sim"
    inputs: tuple = ()
    outputs: tuple = ()

    def __init__(self, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        self._outputs = {name: np.zeros(shape, dtype) for name, (shape, dtype) in shapes.items()}

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(self._outputs)

    def close(self) -> None:
        pass


class SimHost:
    """The runtime.daemon.model_host seam without a daemon: what serves, swaps that only record
    the new version, and health from a steady simulated frame rate (never failing).

    `slowdown` maps a version to how much slower its inference is (2.0: twice the latency,
    half the frame rate), `noise` is the +/- share each telemetry figure jitters by: the
    telemetry gate's tests (tests/cloud_sync/service/test_gate.py) push such versions."""

    def __init__(self, bundle: Bundle, fps: float, *, slowdown: Mapping[str, float] | None = None,
                 noise: float = 0.0, rng_seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._serving = {bundle.name: bundle.version}
        self._fps = fps
        self._since = time.monotonic()
        self._slowdown = dict(slowdown or {})
        self._noise = noise
        self._rng = np.random.default_rng(rng_seed)
        self._frames = 0.0
        self._last = time.monotonic()
        self.swaps = 0

    def serving(self) -> dict[str, str]:
        with self._lock:
            return dict(self._serving)

    def open_engine(self, bundle: Bundle) -> SimEngine:
        _, references = sample_feeds(bundle)
        return SimEngine({name: (value.shape, value.dtype) for name, value in references.items()})

    def warm_up(self, bundle: Bundle, engine: SimEngine) -> None:
        pass

    def fuse(self, bundle: Bundle, engine: SimEngine, *, strict: bool = True) -> SimEngine:
        """Nothing to fuse into a stand-in engine: it serves as it is."""
        return engine

    def swap(self, bundle: Bundle, engine: SimEngine) -> None:
        with self._lock:
            self._serving[bundle.name] = bundle.version
            self.swaps += 1

    def health(self, name: str, stall_s: float = 5.0) -> ModelHealth:
        return ModelHealth(PipelineState.SERVING,
                           int((time.monotonic() - self._since) * self._fps), 0)

    def snapshot(self) -> dict[str, Any]:
        """A small telemetry snapshot in the daemon's shape: fps, models with latency,
        cumulative frame counters, uptime."""
        serving = self.serving()
        factor = max([self._slowdown.get(v, 1.0) for v in serving.values()] or [1.0])

        def jitter() -> float:
            return 1.0 + float(self._rng.uniform(-self._noise, self._noise))

        fps = round(self._fps / factor * jitter(), 2)
        now = time.monotonic()
        with self._lock:
            self._frames += fps * (now - self._last)
            self._last = now
            frames = int(self._frames)
        latency = {"n": frames, "p50": round(8.1 * factor * jitter(), 3),
                   "p95": round(11.7 * factor * jitter(), 3),
                   "p99": round(14.2 * factor * jitter(), 3)}
        return {"fps": fps, "uptime_s": round(now - self._since, 3),
                "frames": {"received": frames, "results": frames, "dropped": 0,
                           "superseded": 0, "expired": 0},
                "models": [{"name": name, "version": version, "fps": fps, "results": frames,
                            "errors": 0, "latency_ms": {"total": latency, "infer": latency}}
                           for name, version in serving.items()]}


class SimDevice:
    """One device: link + chunk delivery + updater + telemetry, as CloudAgent wires them,
    plus counters of what came down and when each OTA state was first reported."""

    def __init__(self, device_id: str, groups: tuple[str, ...], directory: Path, port: int,
                 seed: Bundle, trusted: TrustedKeys, ota: OtaSettings,
                 telemetry_interval_s: float, **host_options: Any) -> None:
        self.device_id = device_id
        store = ModelStore(directory / "models", keep_versions=ota.keep_versions)
        self.store = store
        self.host = SimHost(store.seed(seed), fps=30.0, **host_options)
        self.link = MqttLink(LinkConfig(host="127.0.0.1", port=port, device_id=device_id,
                                        groups=groups, outbox_path=directory / "outbox.db",
                                        reconnect_max_s=5),
                             on_downlink=self._on_downlink)
        self._chunks = MqttChunkDelivery(self.link, stall_timeout_s=ota.stall_timeout_s)
        self.updater = Updater(store, self.host, trusted, device_id=device_id, groups=groups,
                               report=self._report, deliveries={"mqtt": self._chunks},
                               settings=ota)
        self.telemetry = TelemetryPublisher(
            self.host.snapshot, lambda payload: self.link.publish(Channel.TELEMETRY, payload),
            telemetry_interval_s, device_id=device_id)
        # Written by the link's downlink thread (and the OTA thread for states) only.
        self.commands = 0
        self.chunks = 0
        self.chunk_bytes = 0
        self.state_times: dict[str, float] = {}

    def start_link(self) -> None:
        self.link.update_status(**self.updater.status_fields())
        self.link.start()
        self.updater.start([])

    def _on_downlink(self, downlink: Downlink) -> None:
        topic = downlink.topic
        if topic.channel is Channel.OTA_CHUNKS:
            self.chunks += 1
            self.chunk_bytes += len(downlink.payload)
            self._chunks.on_chunk(topic.target, topic.index, downlink.payload)
        elif topic.channel is Channel.OTA_COMMAND:
            self.commands += 1
            self.updater.handle_command(downlink.payload)

    def _report(self, document: dict[str, Any]) -> None:
        self.state_times.setdefault(document.get("state", "?"), time.monotonic())
        self.link.publish(Channel.OTA_PROGRESS, document)
        if document.get("state") in STATUS_STATES:  # as CloudAgent._report does
            self.link.update_status(**self.updater.status_fields())
            self.link.wait_status_acknowledged(self.link.config.shutdown_timeout_s)


# -- bundles ----------------------------------------------------------------------------

def build_bundles(work: Path, pad_kb: int) -> tuple[Bundle, Path]:
    """v1.0 (seeded on every device) and the v2.0 archive to push, from the test harness's
    tiny real ONNX bundle; `pad_kb` adds incompressible, unused weights to v2.0."""
    from tests.cloud_sync.ota_harness import tiny_bundle
    from tests.onnx_models import conv_relu_model

    seed = tiny_bundle(work / "bundles", MODEL_FROM)
    onnx_bytes = None
    if pad_kb:
        from onnx import numpy_helper

        model = conv_relu_model(height=64, width=64)
        padding = np.random.default_rng(0).standard_normal(pad_kb * 256).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(padding, "sim_padding"))
        onnx_bytes = model.SerializeToString()
    target = tiny_bundle(work / "bundles", MODEL_TO, onnx_bytes)
    (work / "package").mkdir()
    return seed, package_bundle(target.directory, work / "package")


# -- helpers ----------------------------------------------------------------------------

# paho-mqtt waits on its sockets with select(), which cannot watch a descriptor numbered
# FD_SETSIZE (1024) or above: a link whose socket lands there fails inside paho's loop and
# never connects, without a log line. A real device runs one link per process; here
# hundreds share one, each with 4 descriptors for its outbox (SQLite db, -wal, -shm, lock)
# and 3 sockets (the connection and paho's wake-up pair). So the low numbers are held
# while the outboxes open and released for the sockets.
FD_SETSIZE = 1024
SOCKETS_PER_LINK = 3
FD_HEADROOM = 40  # the operator's and the counter's sockets, logging, imports


def max_devices() -> int:
    return (FD_SETSIZE - len(os.listdir("/proc/self/fd")) - FD_HEADROOM) // SOCKETS_PER_LINK


def hold_low_descriptors(count: int) -> list[int]:
    return [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]


def release(descriptors: list[int]) -> None:
    for fd in descriptors:
        os.close(fd)


def in_parallel(action: Callable[[Any], None], items: Iterable[Any], workers: int = 32) -> None:
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fleet-sim") as pool:
        for future in [pool.submit(action, item) for item in items]:
            future.result()


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values)
    return {"n": len(values), "p50": round(float(np.percentile(array, 50)), 3),
            "p95": round(float(np.percentile(array, 95)), 3),
            "max": round(float(array.max()), 3), "min": round(float(array.min()), 3)}


def cpu_share(cpu_s: float, wall_s: float) -> float:
    """CPU seconds per wall second, in percent of one core."""
    return round(100 * cpu_s / wall_s, 1) if wall_s > 0 else 0.0


class CpuMeter:
    """CPU of this process and the broker over a stretch of wall time."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.wall, self.cpu, self.broker_cpu = time.monotonic(), _cpu_self_s(), broker.cpu_s()

    def figures(self) -> dict[str, float]:
        wall = time.monotonic() - self.wall
        cpu, broker_cpu = _cpu_self_s() - self.cpu, self.broker.cpu_s() - self.broker_cpu
        return {"wall_s": round(wall, 3), "sim_cpu_s": round(cpu, 3),
                "sim_cpu_pct_of_core": cpu_share(cpu, wall),
                "broker_cpu_s": round(broker_cpu, 3),
                "broker_cpu_pct_of_core": cpu_share(broker_cpu, wall)}


# -- the run ----------------------------------------------------------------------------

def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"args": vars(args) | {"out": str(args.out)}, "machine": {
        "cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
        "paho": mqtt.__version__ if hasattr(mqtt, "__version__") else _paho_version(),
        "work_dir": str(work)}}
    broker = Broker(work / "broker", free_port()).start()
    results["machine"]["mosquitto"] = broker.version()
    counter = watcher = None
    devices: list[SimDevice] = []
    try:
        t = time.monotonic()
        seed, archive = build_bundles(work, args.pad_kb)
        results["bundle"] = {"archive_bytes": archive.stat().st_size,
                             "chunks": -(-archive.stat().st_size // args.chunk_size),
                             "build_s": round(time.monotonic() - t, 3)}
        private_path, public_path = generate_signing_key(work / "keys", "fleet-sim")
        key = load_private_key(private_path)
        trusted = TrustedKeys.load([public_path])
        counter = TrafficCounter(broker.port)

        # Devices: stores seeded, links up, then telemetry spread over one interval.
        ota = OtaSettings(probation_s=args.probation, stall_timeout_s=60.0)
        canaries = [f"sim-{i:04d}" for i in range(1, args.canaries + 1)]
        t = time.monotonic()
        held = hold_low_descriptors(SOCKETS_PER_LINK * args.devices + FD_HEADROOM)
        try:
            for i in range(1, args.devices + 1):
                device_id = f"sim-{i:04d}"
                groups = ("fleet", "canary") if device_id in canaries else ("fleet",)
                devices.append(SimDevice(device_id, groups, work / "devices" / device_id,
                                         broker.port, seed, trusted, ota,
                                         args.telemetry_interval))
        finally:
            release(held)
        created_s = time.monotonic() - t
        t = time.monotonic()
        for device in devices:
            device.start_link()
        deadline = time.monotonic() + 60
        silent = [d.device_id for d in devices
                  if not d.link.wait_connected(max(0.0, deadline - time.monotonic()))]
        if silent:
            raise SystemExit(f"{len(silent)} devices did not connect within 60 s: "
                             f"{', '.join(silent[:5])} ...")
        connected_s = time.monotonic() - t
        for device in devices:
            device.telemetry.start()
            time.sleep(args.telemetry_interval / len(devices))
        results["startup"] = {"create_and_seed_s": round(created_s, 3),
                              "all_connected_s": round(connected_s, 3),
                              "threads": _threads(), "sim_rss_mb": round(_rss_mb(
                                  "/proc/self/status"), 1)}
        print(f"{len(devices)} devices created in {created_s:.1f} s, connected in "
              f"{connected_s:.1f} s; {_threads()} threads", flush=True)

        watcher = FleetWatcher(OperatorConfig(host="127.0.0.1", port=broker.port,
                                              client_id_prefix="fleet-sim"))
        watcher.start()
        ids = {d.device_id for d in devices}
        if not watcher.state.wait_until(lambda: ids <= {r.device_id for r in watcher.state.rows()
                                                        if r.online and r.groups}, 30):
            raise SystemExit("the operator did not see every device online within 30 s")

        # Telemetry only: the fleet's steady load before the rollout.
        meter = CpuMeter(broker)
        before = counter.snapshot()
        time.sleep(args.warmup)
        after = counter.snapshot()
        idle = meter.figures()
        idle["messages"] = _delta(after["counts"], before["counts"])
        idle["sys"] = _delta({k: after["sys"].get(k, 0) for k in SYS_TOTALS},
                             {k: before["sys"].get(k, 0) for k in SYS_TOTALS})
        results["telemetry_only"] = idle

        # The rollout, as `sightline push` does it.
        events: list[tuple[float, str]] = []

        def on_event(text: str) -> None:
            events.append((time.monotonic(), text))
            if args.verbose or not text.startswith("sim-"):
                print(f"  [{time.monotonic() - start:7.2f} s] {text}", flush=True)

        def publish(client, topic: str, payload: bytes, retain: bool = False) -> None:
            publish_bytes(client, topic, payload, retain=retain)

        targets = resolve_targets(watcher.state, ["group:fleet"])
        before = counter.snapshot()
        meter = CpuMeter(broker)
        start = time.monotonic()
        error = None
        try:
            final = rollout(watcher.client, watcher.state, archive, key, targets,
                            publish=publish, canaries=canaries, soak_s=args.soak,
                            timeout_s=args.timeout, chunk_size=args.chunk_size,
                            tolerance=None, on_event=on_event)
        except RolloutError as exc:
            error = str(exc)
            final = {}
            log.error("rollout stopped: %s", exc)
        end = time.monotonic()
        rollout_cpu = meter.figures()
        time.sleep(1.5)  # one more $SYS period, and the last progress messages
        after = counter.snapshot()
        results["rollout"] = _rollout_figures(devices, canaries, events, start, end, final,
                                              error) | {"cpu": rollout_cpu}
        results["messages_during_rollout"] = {
            "by_kind": _delta(after["counts"], before["counts"]),
            "payload_bytes_by_kind": _delta(after["bytes"], before["bytes"]),
            "broker_sys_delta": _delta({k: after["sys"].get(k, 0) for k in SYS_TOTALS},
                                       {k: before["sys"].get(k, 0) for k in SYS_TOTALS}),
            "device_side": {
                "commands_received": sum(d.commands for d in devices),
                "chunks_received": sum(d.chunks for d in devices),
                "chunk_bytes_received": sum(d.chunk_bytes for d in devices)}}
        results["messages_whole_run"] = {"by_kind": after["counts"],
                                         "payload_bytes_by_kind": after["bytes"],
                                         "broker_sys": {k: after["sys"][k] for k in
                                                        SYS_TOTALS + SYS_GAUGES
                                                        if k in after["sys"]}}
        results["verified"] = _verify(devices)
        results["peak"] = {"threads": _threads(),
                           "sim_rss_mb": round(_rss_mb("/proc/self/status"), 1),
                           "broker_rss_mb": round(broker.rss_mb(), 1)}
    finally:
        results["shutdown"] = _shutdown(devices, watcher, counter, broker)
    return results


def _rollout_figures(devices: list[SimDevice], canaries: list[str],
                     events: list[tuple[float, str]], start: float, end: float,
                     final: dict[str, dict], error: str | None) -> dict[str, Any]:
    def event_at(prefix: str) -> float | None:
        return next((at for at, text in events if text.startswith(prefix)), None)

    stage1, stage2 = event_at("stage 1"), event_at("stage 2")
    by_id = {d.device_id: d for d in devices}
    canary_confirmed = [by_id[c].state_times.get("confirmed") for c in canaries]
    figures: dict[str, Any] = {
        "error": error,
        "wall_s": round(end - start, 3),
        "chunks_published_s": round(stage1 - start, 3) if stage1 else None,
        "canaries_confirmed_s": (round(max(canary_confirmed) - start, 3)
                                 if canaries and all(canary_confirmed) else None),
        "stage2_s": round(end - stage2, 3) if stage2 else None,
        "stage2_started_s": round(stage2 - start, 3) if stage2 else None,
        "confirmed": sum(1 for doc in final.values() if doc.get("state") == "confirmed"),
        "failed": {d: f"{doc.get('state')}: {doc.get('detail', '')}" for d, doc in final.items()
                   if doc.get("state") not in ("confirmed", "current")},
        "targets": len(devices),
    }
    # Per device, from the moment its stage's command was published (device clock = ours).
    to_confirmed, phases = [], {name: [] for name in (
        "command_to_accepted", "download", "unpack_to_validated", "validated_to_active",
        "probation")}
    for device in devices:
        times = device.state_times
        origin = stage1 if device.device_id in canaries else stage2
        if origin is None or "confirmed" not in times:
            continue
        to_confirmed.append(times["confirmed"] - origin)
        for name, a, b in (("command_to_accepted", None, "accepted"),
                           ("download", "accepted", "downloaded"),
                           ("unpack_to_validated", "downloaded", "validated"),
                           ("validated_to_active", "validated", "active"),
                           ("probation", "active", "confirmed")):
            first = origin if a is None else times.get(a)
            if first is not None and b in times:
                phases[name].append(times[b] - first)
    figures["time_to_confirmed_s"] = percentiles(to_confirmed)
    figures["phase_s"] = {name: percentiles(values) for name, values in phases.items()}
    return figures


def _verify(devices: list[SimDevice]) -> dict[str, Any]:
    """What the devices themselves say after the rollout: served and stored version."""
    serving = Counter(d.host.serving().get("tiny") for d in devices)
    stored = Counter()
    for device in devices:
        state = device.store.state("tiny")
        stored[f"{state.active}{' (probation)' if state.probation else ''}"] += 1
    return {"serving": dict(serving), "store_active": dict(stored),
            "telemetry_published": sum(d.telemetry.published for d in devices),
            "telemetry_failures": sum(d.telemetry.failures for d in devices)}


def _shutdown(devices: list[SimDevice], watcher: FleetWatcher | None,
              counter: TrafficCounter | None, broker: Broker) -> dict[str, Any]:
    """Telemetry, updaters, then links (in parallel: each waits for its "offline" PUBACK),
    the operator's sessions, the broker."""
    t = time.monotonic()
    figures: dict[str, Any] = {}
    try:
        in_parallel(lambda d: d.telemetry.stop(), devices)
        in_parallel(lambda d: d.updater.stop(), devices)
        in_parallel(lambda d: d.link.stop(), devices)
        stats = [d.link.stats().outbox for d in devices]
        figures["outbox_left"] = sum(s.messages for s in stats)
        figures["outbox_dropped_telemetry"] = sum(s.dropped_telemetry for s in stats)
        figures["outbox_rejected_by_broker"] = sum(s.rejected_by_broker for s in stats)
    finally:
        if watcher is not None:
            watcher.stop()
        if counter is not None:
            counter.stop()
        broker.stop()
    figures["shutdown_s"] = round(time.monotonic() - t, 3)
    return figures


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _paho_version() -> str:
    from importlib.metadata import version

    return version("paho-mqtt")


# -- output -----------------------------------------------------------------------------

def print_summary(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    r, m = results.get("rollout", {}), results.get("messages_during_rollout", {})
    table = Table(title=f"fleet_sim: {results['args']['devices']} devices, "
                        f"{results['args']['canaries']} canaries")
    table.add_column("figure")
    table.add_column("value", justify="right")

    def row(name: str, value: Any) -> None:
        table.add_row(name, "-" if value is None else str(value))

    def pct(stats: dict | None) -> str | None:
        if not stats:
            return None
        return f"{stats['p50']:.2f} / {stats['p95']:.2f} / {stats['max']:.2f}"

    s = results.get("startup", {})
    row("devices created+seeded / connected (s)",
        f"{s.get('create_and_seed_s')} / {s.get('all_connected_s')}")
    row("threads / RSS MB (sim process)", f"{s.get('threads')} / {s.get('sim_rss_mb')}")
    idle = results.get("telemetry_only", {})
    row("telemetry only: sim / broker CPU % of a core",
        f"{idle.get('sim_cpu_pct_of_core')} / {idle.get('broker_cpu_pct_of_core')}")
    row("bundle bytes / chunks", f"{results.get('bundle', {}).get('archive_bytes')} / "
                                 f"{results.get('bundle', {}).get('chunks')}")
    row("rollout wall time (s)", r.get("wall_s"))
    row("canaries confirmed at (s)", r.get("canaries_confirmed_s"))
    row("stage 2 started at / took (s)", f"{r.get('stage2_started_s')} / {r.get('stage2_s')}")
    row("confirmed / failed", f"{r.get('confirmed')} / {len(r.get('failed', {}))}")
    row("time to confirmed p50/p95/max (s)", pct(r.get("time_to_confirmed_s")))
    for name, stats in r.get("phase_s", {}).items():
        row(f"  {name} p50/p95/max (s)", pct(stats))
    cpu = r.get("cpu", {})
    row("rollout: sim / broker CPU % of a core",
        f"{cpu.get('sim_cpu_pct_of_core')} / {cpu.get('broker_cpu_pct_of_core')}")
    for kind, count in sorted(m.get("by_kind", {}).items()):
        row(f"msgs during rollout: {kind} (bytes)",
            f"{count} ({m.get('payload_bytes_by_kind', {}).get(kind, 0)})")
    device_side = m.get("device_side", {})
    row("delivered to devices: commands / chunks",
        f"{device_side.get('commands_received')} / {device_side.get('chunks_received')}")
    for key, value in m.get("broker_sys_delta", {}).items():
        row(f"broker {key.removeprefix('$SYS/broker/')} (delta)", int(value))
    row("serving after", results.get("verified", {}).get("serving"))
    row("shutdown (s)", results.get("shutdown", {}).get("shutdown_s"))
    for key, entry in results.get("log_warnings_and_errors", {}).items():
        row(f"log: {key}", entry["count"])
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--canaries", type=int, default=5)
    parser.add_argument("--soak", type=float, default=5.0, help="seconds after the canaries")
    parser.add_argument("--telemetry-interval", type=float, default=2.0, help="seconds")
    parser.add_argument("--chunk-size", type=int, default=65536, help="bytes")
    parser.add_argument("--probation", type=float, default=2.0, help="seconds on each device")
    parser.add_argument("--warmup", type=float, default=6.0,
                        help="seconds of telemetry only, measured, before the rollout")
    parser.add_argument("--timeout", type=float, default=300.0, help="per rollout stage")
    parser.add_argument("--pad-kb", type=int, default=0,
                        help="add this many KiB of incompressible weights to the pushed model")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "fleet_sim-results.json")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="parent of the temporary directory (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.canaries >= args.devices:
        parser.error("--canaries must be fewer than --devices")
    if args.devices > max_devices():
        parser.error(f"one process holds at most {max_devices()} links (paho-mqtt uses "
                     "select(), limited to descriptors below 1024)")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    tally = LogTally()
    logging.getLogger().addHandler(tally)
    if not args.verbose:
        # paho 2.2 logs "Client is not connected" at ERROR when its loop runs once more
        # after disconnect(); with hundreds of links that buries the summary. Counted.
        paho_log = logging.getLogger("cloud_sync.paho")
        paho_log.addHandler(tally)
        paho_log.propagate = False
    # ~7 descriptors per device (socket, paho's wake-up pair, SQLite db/wal/shm, lock).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 10 * args.devices + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fleet-sim-", dir=args.work_dir))
    t = time.monotonic()
    try:
        results = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = round(time.monotonic() - t, 1)
    results["log_warnings_and_errors"] = {key: {"count": count, "first": tally.first[key]}
                                          for key, count in sorted(tally.counts.items())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print_summary(results)
    print(f"figures written to {args.out}")
    return 0 if not results.get("rollout", {}).get("error") else 1


if __name__ == "__main__":
    sys.exit(main())

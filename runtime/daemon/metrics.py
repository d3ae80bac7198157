"""The daemon's figures for Prometheus (`/metrics`) and MQTT telemetry.

One cheap call on the hot path, `Metrics.observe_frame(model, stamps)`, once per result from
the model's infer thread: it turns the reply's stage stamps into durations, counts them into
histogram buckets and a bounded ring, and counts the frame for fps. Everything else (counters
the server and pipelines already keep, host and GPU figures, percentiles) is read on the slow
path: when Prometheus scrapes, or when telemetry asks for `collect_snapshot`. The Prometheus
registry is this object's own, never prometheus_client's global one.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from runtime.daemon.headset_metrics import headset_metrics

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from devices.host import HostFigures, HostProbe
    from devices.tegrastats import TegrastatsReader, TegrastatsSample

log = logging.getLogger(__name__)

# (stage, from stamp, to stamp) on the daemon's clock; the stamps are the ones the pipeline
# puts in every result reply (runtime/daemon/pipeline.py, "sent" by protocol.encode_result).
STAGES = (
    ("decode", "received", "decoded"),
    ("preprocess", "decoded", "preprocessed"),
    ("inference", "preprocessed", "inferred"),  # includes waiting for the engine
    ("postprocess", "inferred", "postprocessed"),
    ("total", "received", "sent"),
)
STAGE_NAMES = tuple(name for name, _, _ in STAGES)
# Seconds; AR frames live in the 1-100 ms range, so the buckets are dense there.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                     0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, math.inf)
PERCENTILES = (50, 95, 99)
_monotonic = time.monotonic
_bisect_left = bisect.bisect_left


class _ModelFigures:
    """One model's hot-path state. Written only by that model's infer thread (so no lock);
    read by the slow path, which copies before it computes."""

    __slots__ = ("name", "buckets", "sums", "ring", "seconds", "served", "first_second")

    def __init__(self, name: str, ring_size: int, fps_window_s: int) -> None:
        self.name = name
        self.buckets = [[0] * len(LATENCY_BUCKETS_S) for _ in STAGES]  # per stage, not cumulative
        self.sums = [0.0] * len(STAGES)
        # (monotonic time, duration per stage in seconds or nan), newest last, bounded.
        self.ring: deque[tuple[float, ...]] = deque(maxlen=ring_size)
        # [whole monotonic second, frames served in it], for fps over the last seconds.
        self.seconds: deque[list[int]] = deque([[-1, 0]], maxlen=fps_window_s + 2)
        self.served = 0
        self.first_second: int | None = None


class Metrics:
    """Latency, fps and the daemon's counters, for Prometheus and telemetry.

    `status` is the daemon's status callable (runtime/daemon/status.py `DaemonStatus`), read on
    each scrape for counters, clients and models; `host` (devices.host.HostProbe) and
    `tegrastats` (devices.tegrastats.TegrastatsReader) add machine figures where given.
    Host figures are sampled at most every `host_interval_s`, however often they are asked.
    """

    def __init__(self, *, status: Callable[[], Mapping[str, Any]] | None = None,
                 host: HostProbe | None = None, tegrastats: TegrastatsReader | None = None,
                 window_s: float = 60.0, ring_size: int = 2048, fps_window_s: int = 5,
                 host_interval_s: float = 2.0) -> None:
        if ring_size < 1 or fps_window_s < 1 or window_s <= 0:
            raise ValueError("ring_size, fps_window_s and window_s must be positive")
        self.window_s = window_s
        self.ring_size = ring_size
        self.fps_window_s = fps_window_s
        self._status = status
        self._host = host
        self._tegrastats = tegrastats
        self._host_interval_s = host_interval_s
        self._host_cache: tuple[float, HostFigures | None] | None = None
        self._host_failing = False
        self._host_lock = threading.Lock()
        self._models: dict[str, _ModelFigures] = {}
        self._models_lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # -- hot path -----------------------------------------------------------------------
    def observe_frame(self, model: str, stamps: Mapping[str, float]) -> None:
        """Count one served result: `stamps` is the reply's stage stamps (time.time()).

        Call once per result, from that model's infer thread only (one writer per model
        keeps this lock-free). Stages whose stamps are missing are skipped. About 1.3 us
        (prometheus_client's own Histogram would take about 8 us for the five stages).
        """
        figures = self._models.get(model)
        if figures is None:
            figures = self._add_model(model)
        now = _monotonic()
        get = stamps.get
        received, decoded, sent = get("received"), get("decoded"), get("sent")
        preprocessed, inferred, postprocessed = (
            get("preprocessed"), get("inferred"), get("postprocessed"))
        buckets, sums, bounds = figures.buckets, figures.sums, LATENCY_BUCKETS_S
        try:
            row = (now, decoded - received, preprocessed - decoded, inferred - preprocessed,
                   postprocessed - inferred, sent - received)
        except TypeError:  # a stamp is missing (an older pipeline, a test): the general path
            row = _partial_row(now, stamps)
            for k in range(len(STAGES)):
                if row[k + 1] == row[k + 1]:  # not nan
                    buckets[k][_bisect_left(bounds, row[k + 1])] += 1
                    sums[k] += row[k + 1]
        else:  # unrolled over STAGES, in its order: the loop costs a fifth of the call
            _, decode, preprocess, inference, postprocess, total = row
            buckets[0][_bisect_left(bounds, decode)] += 1
            buckets[1][_bisect_left(bounds, preprocess)] += 1
            buckets[2][_bisect_left(bounds, inference)] += 1
            buckets[3][_bisect_left(bounds, postprocess)] += 1
            buckets[4][_bisect_left(bounds, total)] += 1
            sums[0] += decode
            sums[1] += preprocess
            sums[2] += inference
            sums[3] += postprocess
            sums[4] += total
        figures.ring.append(row)
        second = int(now)
        current = figures.seconds[-1]
        if current[0] == second:
            current[1] += 1
        else:
            figures.seconds.append([second, 1])
            if figures.first_second is None:
                figures.first_second = second
        figures.served += 1

    def _add_model(self, model: str) -> _ModelFigures:
        with self._models_lock:
            figures = self._models.get(model)
            if figures is None:
                figures = _ModelFigures(model, self.ring_size, self.fps_window_s)
                # Replace the dict, never mutate it: readers iterate without a lock.
                self._models = {**self._models, model: figures}
            return figures

    # -- slow path ----------------------------------------------------------------------
    def fps(self, model: str) -> float:
        """Frames served per second over the last `fps_window_s` whole seconds."""
        figures = self._models.get(model)
        return _fps(figures, self.fps_window_s, time.monotonic()) if figures else 0.0

    def latency_percentiles_ms(self, model: str) -> dict[str, dict[str, float | int | None]]:
        """Per stage: p50/p95/p99 in ms and the sample count, over the frames of the last
        `window_s` seconds that are still in the ring (at most `ring_size`)."""
        figures = self._models.get(model)
        rows = _recent_rows(figures, time.monotonic() - self.window_s) if figures else []
        table = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(STAGES) + 1)
        result: dict[str, dict[str, float | int | None]] = {}
        for k, stage in enumerate(STAGE_NAMES):
            column = table[:, k + 1]
            column = column[~np.isnan(column)] * 1e3
            entry: dict[str, float | int | None] = {"n": int(column.size)}
            values = np.percentile(column, PERCENTILES) if column.size else [None] * 3
            for p, value in zip(PERCENTILES, values, strict=True):
                entry[f"p{p}"] = None if value is None else round(float(value), 3)
            result[stage] = entry
        return result

    def host_figures(self) -> HostFigures | None:
        """The host probe's latest figures, sampled again when older than host_interval_s.

        A probe that raises costs only these figures: None (or the last good ones) until
        the next try, one interval later; the first failure of a run is logged.
        """
        if self._host is None:
            return None
        with self._host_lock:
            now = time.monotonic()
            if self._host_cache is None or now - self._host_cache[0] >= self._host_interval_s:
                previous = self._host_cache[1] if self._host_cache else None
                try:
                    self._host_cache = (now, self._host.sample())
                    self._host_failing = False
                except Exception:  # a sensor or NVML failure must not cost the scrape
                    if not self._host_failing:
                        log.exception("host figures could not be read; retrying every %.0f s",
                                      self._host_interval_s)
                    self._host_failing = True
                    self._host_cache = (now, previous)
            return self._host_cache[1]

    def jetson_figures(self) -> TegrastatsSample | None:
        if self._tegrastats is None:
            return None
        # Three intervals without a line means tegrastats has stopped: report nothing.
        return self._tegrastats.latest(max_age_s=3 * self._tegrastats.interval_ms / 1000 + 1)

    def collect_snapshot(self, status: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """JSON-ready figures for telemetry: models (version, fps, stage percentiles,
        counters), dropped frames, clients, rejections by code, host and GPU/Jetson figures.

        `status` is a DaemonStatus document; without one, the `status` callable given to
        the constructor is used (and without that, only this object's own figures).
        """
        if status is None and self._status is not None:
            status = self._status()
        status = status or {}
        counters = status.get("counters", {})
        models = []
        listed = set()
        for model in status.get("models", []):
            name = model.get("name")
            listed.add(name)
            models.append({
                "name": name, "version": model.get("version"), "task": model.get("task"),
                "provider": model.get("provider"), "default": bool(model.get("default")),
                "results": model.get("results", 0), "expired": model.get("expired", 0),
                "errors": model.get("errors", 0),
                "fps": round(self.fps(name), 2), "latency_ms": self.latency_percentiles_ms(name),
            })
        for name in self._models:
            if name not in listed:  # observed but not in the status document (none given)
                models.append({"name": name, "version": None, "fps": round(self.fps(name), 2),
                               "latency_ms": self.latency_percentiles_ms(name)})
        expired = sum(m.get("expired", 0) for m in status.get("models", []))
        superseded = counters.get("superseded", 0)
        host = self.host_figures()
        jetson = self.jetson_figures()
        return {
            "uptime_s": status.get("uptime_s"),
            "version": status.get("version"),
            "models": models,
            "fps": round(sum(m["fps"] for m in models), 2),
            "frames": {"received": counters.get("frames", 0),
                       "results": sum(m.get("results", 0) for m in status.get("models", [])),
                       "dropped": superseded + expired,
                       "superseded": superseded, "expired": expired},
            "clients": status.get("clients", 0),
            # per headset (enrolled name under CURVE, connection in plain mode)
            "headsets": [dict(h) for h in status.get("headsets", [])],
            "handshakes": dict(status.get("handshakes") or {}),
            "connections": dict(status.get("connections") or {}),
            "errors": {str(code): n for code, n in counters.get("errors", {}).items()},
            "host": host.to_json() if host is not None else None,
            "jetson": jetson.to_json() if jetson is not None else None,
        }

    def observed_models(self) -> list[str]:
        return list(self._models)


def _partial_row(now: float, stamps: Mapping[str, float]) -> tuple[float, ...]:
    row = [now]
    for _, start, end in STAGES:
        begin, finish = stamps.get(start), stamps.get(end)
        row.append(math.nan if begin is None or finish is None else finish - begin)
    return tuple(row)


def _fps(figures: _ModelFigures, window_s: int, now: float) -> float:
    """Frames in the last whole seconds (the current, partial one left out) per second."""
    this_second = int(now)
    if figures.first_second is None:
        return 0.0
    span = max(1, min(window_s, this_second - figures.first_second))
    oldest = this_second - span
    seconds = list(figures.seconds)  # a copy: the infer thread appends meanwhile
    return sum(n for second, n in seconds if oldest <= second < this_second) / span


def _recent_rows(figures: _ModelFigures, since: float) -> list[tuple[float, ...]]:
    for _ in range(3):
        try:
            rows = list(figures.ring)  # one C-level copy under the GIL
            break
        except RuntimeError:  # "deque mutated during iteration": try again
            continue
    else:
        return []
    return [row for row in rows if row[0] >= since]


class _Collector:
    """Builds every metric family at scrape time from Metrics and the status document."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        yield from self._latency(metrics)
        status = None
        if metrics._status is not None:
            try:
                status = metrics._status()
            except Exception:  # a status bug must not take the whole scrape down
                log.exception("daemon status could not be read for /metrics")
        if status is not None:
            yield from _status_metrics(status)
        host = metrics.host_figures()
        if host is not None:
            yield from _host_metrics(host)
        jetson = metrics.jetson_figures()
        if jetson is not None:
            yield from _jetson_metrics(jetson)

    @staticmethod
    def _latency(metrics: Metrics) -> Iterator[Metric]:
        histogram = HistogramMetricFamily(
            "sightline_stage_latency_seconds",
            "Time per pipeline stage of served frames (decode, preprocess, inference incl. "
            "waiting for the engine, postprocess, total = received to reply sent).",
            labels=["model", "stage"])
        fps = GaugeMetricFamily("sightline_fps",
                                f"Frames served per second over the last "
                                f"{metrics.fps_window_s} s.", labels=["model"])
        served = CounterMetricFamily("sightline_frames_observed",
                                     "Results counted by the metrics hook.", labels=["model"])
        now = time.monotonic()
        for name, figures in metrics._models.items():
            for k, stage in enumerate(STAGE_NAMES):
                counts = list(figures.buckets[k])
                cumulative, running = [], 0
                for bound, count in zip(LATENCY_BUCKETS_S, counts, strict=True):
                    running += count
                    cumulative.append(("+Inf" if math.isinf(bound) else repr(bound), running))
                histogram.add_metric([name, stage], cumulative, figures.sums[k])
            fps.add_metric([name], _fps(figures, metrics.fps_window_s, now))
            served.add_metric([name], figures.served)
        yield histogram
        yield fps
        yield served


def _status_metrics(status: Mapping[str, Any]) -> Iterator[Metric]:
    counters = status.get("counters", {})
    models = status.get("models", [])
    received = CounterMetricFamily("sightline_frames_received",
                                   "Frames accepted from clients.")
    received.add_metric([], counters.get("frames", 0))
    yield received
    dropped = CounterMetricFamily(
        "sightline_frames_dropped",
        "Frames answered with a 'dropped' reply: superseded by the client's newer frame, "
        "or expired past the deadline.", labels=["reason"])
    dropped.add_metric(["superseded"], counters.get("superseded", 0))
    dropped.add_metric(["expired"], sum(m.get("expired", 0) for m in models))
    yield dropped
    rejected = CounterMetricFamily("sightline_requests_rejected",
                                   "Requests answered with an error reply, by error code.",
                                   labels=["code"])
    for code, n in sorted(counters.get("errors", {}).items()):
        rejected.add_metric([str(code)], n)
    yield rejected
    clients = GaugeMetricFamily("sightline_clients", "Clients seen within the idle timeout.")
    clients.add_metric([], status.get("clients", 0))
    yield clients
    yield from headset_metrics(status)
    if "uptime_s" in status:
        uptime = GaugeMetricFamily("sightline_uptime_seconds", "Seconds since the daemon started.")
        uptime.add_metric([], status["uptime_s"])
        yield uptime
    info = InfoMetricFamily("sightline_model", "Models served: version, task, provider.",
                            labels=["model"])
    results = CounterMetricFamily("sightline_model_results", "Result replies per model.",
                                  labels=["model"])
    expired = CounterMetricFamily("sightline_model_expired",
                                  "Frames dropped past the deadline, per model.",
                                  labels=["model"])
    errors = CounterMetricFamily("sightline_model_errors",
                                 "Frames that failed in preprocessing or the engine, per model.",
                                 labels=["model"])
    for model in models:
        name = str(model.get("name"))
        info.add_metric([name], {
            "version": str(model.get("version", "")), "task": str(model.get("task", "")),
            "provider": str(model.get("provider", "")),
            "default": "true" if model.get("default") else "false"})
        results.add_metric([name], model.get("results", 0))
        expired.add_metric([name], model.get("expired", 0))
        errors.add_metric([name], model.get("errors", 0))
    yield from (info, results, expired, errors)


def _gauge(name: str, documentation: str, value: float | None,
           labels: dict[str, str] | None = None) -> Iterator[Metric]:
    if value is None:
        return
    gauge = GaugeMetricFamily(name, documentation, labels=list(labels or {}))
    gauge.add_metric(list((labels or {}).values()), value)
    yield gauge


def _host_metrics(host: HostFigures) -> Iterator[Metric]:
    yield from _gauge("sightline_host_cpu_percent", "Host CPU use, all cores.", host.cpu_percent)
    yield from _gauge("sightline_host_memory_used_bytes", "Host memory not available to "
                      "programs (total - available).", host.memory_used_mb * 1024 * 1024)
    yield from _gauge("sightline_host_memory_total_bytes", "Host memory.",
                      host.memory_total_mb * 1024 * 1024)
    if host.load_average is not None:
        load = GaugeMetricFamily("sightline_host_load_average", "Load average.",
                                 labels=["period"])
        for period, value in zip(("1m", "5m", "15m"), host.load_average, strict=True):
            load.add_metric([period], value)
        yield load
    if host.temperatures_c:
        temperature = GaugeMetricFamily("sightline_host_temperature_celsius",
                                        "Host temperature sensors.", labels=["sensor"])
        for sensor, value in sorted(host.temperatures_c.items()):
            temperature.add_metric([sensor], value)
        yield temperature
    if host.gpus:
        families = {
            "utilization_percent": GaugeMetricFamily(
                "sightline_gpu_utilization_percent", "GPU busy time (NVML).",
                labels=["gpu", "name"]),
            "memory_used_mb": GaugeMetricFamily(
                "sightline_gpu_memory_used_bytes", "GPU memory in use (NVML).",
                labels=["gpu", "name"]),
            "memory_total_mb": GaugeMetricFamily(
                "sightline_gpu_memory_total_bytes", "GPU memory (NVML).", labels=["gpu", "name"]),
            "temperature_c": GaugeMetricFamily(
                "sightline_gpu_temperature_celsius", "GPU temperature (NVML).",
                labels=["gpu", "name"]),
            "power_w": GaugeMetricFamily(
                "sightline_gpu_power_watts", "GPU power draw (NVML).", labels=["gpu", "name"]),
        }
        for gpu in host.gpus:
            for attribute, family in families.items():
                value = getattr(gpu, attribute)
                if value is None:
                    continue
                if attribute.endswith("_mb"):
                    value = value * 1024 * 1024
                family.add_metric([str(gpu.index), gpu.name], value)
        yield from families.values()


def _jetson_metrics(sample: TegrastatsSample) -> Iterator[Metric]:
    yield from _gauge("sightline_jetson_gpu_load_percent", "GR3D (integrated GPU) load.",
                      sample.gpu_load_percent)
    yield from _gauge("sightline_jetson_gpu_clock_mhz", "GR3D clock.", sample.gpu_mhz)
    yield from _gauge("sightline_jetson_emc_load_percent", "Memory controller load.",
                      sample.emc_load_percent)
    yield from _gauge("sightline_jetson_cpu_load_percent", "Mean load of the online cores.",
                      sample.cpu_load_percent)
    yield from _gauge("sightline_jetson_ram_used_bytes", "RAM in use (shared by CPU and GPU).",
                      sample.ram_used_mb * 1024 * 1024)
    if sample.temperatures_c:
        temperature = GaugeMetricFamily("sightline_jetson_temperature_celsius",
                                        "tegrastats temperatures.", labels=["sensor"])
        for sensor, value in sorted(sample.temperatures_c.items()):
            temperature.add_metric([sensor], value)
        yield temperature
    if sample.power_mw:
        power = GaugeMetricFamily("sightline_jetson_power_watts",
                                  "tegrastats power rails, instantaneous.", labels=["rail"])
        for rail, value in sorted(sample.power_mw.items()):
            power.add_metric([rail], value.current_mw / 1000.0)
        yield power


def serve_prometheus(metrics: Metrics, host: str = "127.0.0.1",
                     port: int = 9464) -> tuple[WSGIServer, threading.Thread]:
    """Serve `metrics.registry` at http://HOST:PORT/metrics from a daemon thread.

    Returns prometheus_client's (server, thread); `port=0` picks a free port
    (`server.server_port`). Stop with `server.shutdown(); server.server_close();
    thread.join()`. Binds loopback by default: /metrics has no authentication, so expose
    it beyond the device only on a trusted network.
    """
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    thread.name = "sightline-prometheus"
    return server, thread

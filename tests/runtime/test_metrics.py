"""The daemon's metrics: stage latencies from reply stamps, percentiles over a bounded window,
fps, the telemetry snapshot, and /metrics over real HTTP parsed as Prometheus text."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devices.host import GpuFigures, HostFigures
from devices.tegrastats import parse_tegrastats
from runtime.client import Client
from runtime.daemon import metrics as metrics_module
from runtime.daemon.control import query_status
from runtime.daemon.metrics import LATENCY_BUCKETS_S, STAGES, Metrics, serve_prometheus
from runtime.tools.latency import SERVER_STAGES

TEGRASTATS = Path(__file__).parents[1] / "devices" / "fixtures" / "tegrastats"


def stamps(decode=0.002, preprocess=0.001, inference=0.020, postprocess=0.0005, send=0.0003,
           start=1_700_000_000.0) -> dict[str, float]:
    """Reply stamps (as runtime/daemon/pipeline.py and protocol.encode_result write them)."""
    decoded = start + decode
    preprocessed = decoded + preprocess
    inferred = preprocessed + inference
    postprocessed = inferred + postprocess
    return {"received": start, "decoded": decoded, "preprocessed": preprocessed,
            "inferred": inferred, "postprocessed": postprocessed, "sent": postprocessed + send}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(metrics_module, "_monotonic", fake)
    monkeypatch.setattr(metrics_module.time, "monotonic", fake)
    return fake


STATUS = {
    "version": "0.1.0", "pid": 4242, "uptime_s": 12.5, "clients": 2,
    "default_model": "centerface",
    "counters": {"frames": 120, "superseded": 7, "errors": {"RATE_LIMITED": 3, "MALFORMED": 1}},
    "models": [
        {"name": "centerface", "version": "1.5.0", "task": "face", "provider": "CPU",
         "default": True, "results": 100, "expired": 2, "errors": 1},
        {"name": "yolo", "version": "8.1", "task": "detect", "provider": "TensorRT",
         "default": False, "results": 10, "expired": 0, "errors": 0},
    ],
}


def test_stage_names_and_stamps_match_the_latency_tools():
    assert [(s, a, b) for s, a, b in STAGES][:4] == list(SERVER_STAGES)[:4]
    assert STAGES[-1] == ("total", "received", "sent") and SERVER_STAGES[-1][1:] == (
        "received", "sent")


def test_percentiles_per_stage_over_known_values(clock):
    metrics = Metrics()
    for ms in range(1, 101):  # inference 1..100 ms, the other stages constant
        metrics.observe_frame("centerface", stamps(inference=ms / 1e3))
    table = metrics.latency_percentiles_ms("centerface")
    expected = np.percentile(np.arange(1, 101, dtype=float), [50, 95, 99])
    assert table["inference"] == {"n": 100, "p50": pytest.approx(expected[0], abs=1e-3),
                                  "p95": pytest.approx(expected[1], abs=1e-3),
                                  "p99": pytest.approx(expected[2], abs=1e-3)}
    assert table["decode"]["p50"] == pytest.approx(2.0, abs=1e-3)
    assert table["postprocess"]["p99"] == pytest.approx(0.5, abs=1e-3)
    assert table["total"]["p50"] == pytest.approx(2 + 1 + 50.5 + 0.5 + 0.3, abs=1e-3)


def test_percentile_window_is_a_bounded_ring_of_recent_frames(clock):
    metrics = Metrics(ring_size=10, window_s=60)
    for ms in range(1, 101):
        metrics.observe_frame("m", stamps(inference=ms / 1e3))
    table = metrics.latency_percentiles_ms("m")
    assert table["inference"]["n"] == 10  # only the newest 10 are kept
    assert table["inference"]["p50"] == pytest.approx(95.5, abs=1e-3)  # of 91..100 ms
    clock.now += 61  # nothing within the last minute any more
    assert metrics.latency_percentiles_ms("m")["inference"] == {"n": 0, "p50": None,
                                                                "p95": None, "p99": None}


def test_frames_older_than_the_window_leave_the_percentiles(clock):
    metrics = Metrics(window_s=10)
    for _ in range(20):
        metrics.observe_frame("m", stamps(inference=0.100))  # a slow spell...
    clock.now += 30
    for _ in range(20):
        metrics.observe_frame("m", stamps(inference=0.010))  # ...long over
    assert metrics.latency_percentiles_ms("m")["inference"]["p99"] == pytest.approx(10.0,
                                                                                     abs=1e-3)


def test_fps_counts_frames_served_over_the_last_whole_seconds(clock):
    metrics = Metrics(fps_window_s=5)
    clock.now = 1000.0
    for second in range(8):
        for frame in range(30):
            clock.now = 1000 + second + frame / 30
            metrics.observe_frame("m", stamps())
    clock.now = 1008.2
    assert metrics.fps("m") == pytest.approx(30.0)
    clock.now = 1011.5  # three idle seconds: 2 of the last 5 had frames
    assert metrics.fps("m") == pytest.approx(12.0)
    assert metrics.fps("unknown") == 0.0


def test_missing_stamps_skip_only_their_stages(clock):
    metrics = Metrics()
    partial = stamps()
    del partial["sent"], partial["decoded"]
    metrics.observe_frame("m", partial)
    table = metrics.latency_percentiles_ms("m")
    assert table["decode"]["n"] == table["preprocess"]["n"] == table["total"]["n"] == 0
    assert table["inference"]["n"] == table["postprocess"]["n"] == 1


def test_fast_and_general_paths_count_the_same(clock):
    fast = Metrics()
    for ms in (0.4, 1.5, 4.0, 12.0, 40.0, 300.0, 4000.0):
        fast.observe_frame("m", stamps(inference=ms / 1e3))
        general = metrics_module._partial_row(clock(), stamps(inference=ms / 1e3))
        assert general[1:] == pytest.approx(fast._models["m"].ring[-1][1:])
    state = fast._models["m"]
    assert sum(state.buckets[2]) == 7 and len(state.buckets[2]) == len(LATENCY_BUCKETS_S)
    assert state.buckets[2][-1] == 1  # 4 s lands in +Inf


def test_observe_frame_costs_a_few_microseconds():
    metrics = Metrics()
    frame = stamps()
    for _ in range(1000):
        metrics.observe_frame("m", frame)
    best = min(_timed(metrics, frame, 1000) for _ in range(30))
    # ~1.3 us on the 2-core dev machine; the bound leaves room for slow CI runners.
    assert best < 20e-6, f"observe_frame took {best * 1e6:.2f} us"


def _timed(metrics: Metrics, frame: dict, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        metrics.observe_frame("m", frame)
    return (time.perf_counter() - started) / calls


class FakeHost:
    def __init__(self, fail: bool = False) -> None:
        self.samples = 0
        self.fail = fail

    def sample(self) -> HostFigures:
        self.samples += 1
        if self.fail:
            raise OSError("sensor went away")
        return HostFigures(cpu_percent=37.5, cpu_count=8, memory_used_mb=2048,
                           memory_total_mb=8192, load_average=(1.5, 1.0, 0.5),
                           temperatures_c={"coretemp/Package id 0": 55.0},
                           gpus=(GpuFigures(0, "NVIDIA GeForce RTX 4090", 37, 3072, 24576, 61.0,
                                            212.3),))


class FakeTegrastats:
    interval_ms = 1000

    def __init__(self, line: str) -> None:
        self.sample = parse_tegrastats(line)

    def latest(self, max_age_s=None):
        return self.sample


def test_snapshot_has_models_versions_fps_percentiles_drops_errors_and_host(clock):
    host = FakeHost()
    metrics = Metrics(host=host, host_interval_s=5)
    for _ in range(10):
        metrics.observe_frame("centerface", stamps())
    snapshot = metrics.collect_snapshot(STATUS)
    json.dumps(snapshot, allow_nan=False)
    centerface, yolo = snapshot["models"]
    assert (centerface["name"], centerface["version"], centerface["default"]) == (
        "centerface", "1.5.0", True)
    assert (centerface["results"], centerface["expired"], centerface["errors"]) == (100, 2, 1)
    assert centerface["latency_ms"]["inference"]["p50"] == pytest.approx(20.0, abs=1e-3)
    assert yolo["latency_ms"]["total"]["n"] == 0 and yolo["fps"] == 0.0
    assert snapshot["frames"] == {"received": 120, "results": 110, "dropped": 9,
                                  "superseded": 7, "expired": 2}
    assert snapshot["clients"] == 2
    assert snapshot["errors"] == {"RATE_LIMITED": 3, "MALFORMED": 1}
    assert snapshot["host"]["cpu_percent"] == 37.5
    assert snapshot["host"]["gpus"][0]["utilization_percent"] == 37
    assert snapshot["jetson"] is None
    metrics.collect_snapshot(STATUS)
    assert host.samples == 1  # sampled at most every host_interval_s


def test_snapshot_carries_tegrastats_figures_on_a_jetson(clock):
    line = (TEGRASTATS / "jetson-orin-nano-jp62.txt").read_text().splitlines()[0]
    metrics = Metrics(tegrastats=FakeTegrastats(line))
    jetson = metrics.collect_snapshot({})["jetson"]
    assert jetson["ram_total_mb"] == 7620
    assert jetson["power_mw"]["VDD_IN"] == {"current": 4761, "average": 4778}
    assert jetson["temperatures_c"]["tj"] == 49.156


def test_a_failing_host_probe_costs_only_the_host_figures(clock, caplog):
    host = FakeHost(fail=True)
    metrics = Metrics(host=host, host_interval_s=2)
    snapshot = metrics.collect_snapshot(STATUS)
    assert snapshot["host"] is None and snapshot["clients"] == 2
    metrics.collect_snapshot(STATUS)
    assert host.samples == 1  # retried once per interval, not on every request
    clock.now += 2
    metrics.collect_snapshot(STATUS)
    assert host.samples == 2
    assert sum("host figures could not be read" in r.getMessage() for r in caplog.records) == 1


def scrape(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples_of(family) -> dict[tuple, float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for sample in family.samples}


@pytest.fixture
def served():
    started = []

    def serve(metrics: Metrics) -> int:
        server, thread = serve_prometheus(metrics, "127.0.0.1", 0)
        started.append((server, thread))
        assert thread.name == "sightline-prometheus"
        return server.server_port

    yield serve
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_metrics_endpoint_answers_a_real_get_with_prometheus_text(served):
    line = (TEGRASTATS / "jetson-agx-orin-64gb-jp621.txt").read_text().splitlines()[0]
    metrics = Metrics(status=lambda: STATUS, host=FakeHost(),
                      tegrastats=FakeTegrastats(line))
    for ms in (1, 2, 3, 40):
        metrics.observe_frame("centerface", stamps(inference=ms / 1e3))
    families = scrape(served(metrics))

    latency = samples_of(families["sightline_stage_latency_seconds"])
    inference = (("model", "centerface"), ("stage", "inference"))
    assert latency[("sightline_stage_latency_seconds_count", inference)] == 4
    assert latency[("sightline_stage_latency_seconds_sum", inference)] == pytest.approx(0.046)
    bucket = "sightline_stage_latency_seconds_bucket"
    assert latency[(bucket, (("le", "0.002"), *inference))] == 1  # 1 ms
    assert latency[(bucket, (("le", "0.005"), *inference))] == 3
    assert latency[(bucket, (("le", "0.05"), *inference))] == 4
    assert latency[(bucket, (("le", "+Inf"), *inference))] == 4

    assert samples_of(families["sightline_frames_dropped"]) == {
        ("sightline_frames_dropped_total", (("reason", "superseded"),)): 7,
        ("sightline_frames_dropped_total", (("reason", "expired"),)): 2}
    assert samples_of(families["sightline_requests_rejected"])[
        ("sightline_requests_rejected_total", (("code", "RATE_LIMITED"),))] == 3
    assert samples_of(families["sightline_clients"]) == {("sightline_clients", ()): 2}
    info = samples_of(families["sightline_model_info"])  # text format: a gauge
    assert info[("sightline_model_info", (("default", "true"), ("model", "centerface"),
                                          ("provider", "CPU"), ("task", "face"),
                                          ("version", "1.5.0")))] == 1
    assert "sightline_fps" in families and "sightline_model_results" in families
    assert samples_of(families["sightline_host_cpu_percent"]) == {
        ("sightline_host_cpu_percent", ()): 37.5}
    gpu = samples_of(families["sightline_gpu_power_watts"])
    assert gpu == {("sightline_gpu_power_watts",
                    (("gpu", "0"), ("name", "NVIDIA GeForce RTX 4090"))): 212.3}
    rails = samples_of(families["sightline_jetson_power_watts"])
    assert rails[("sightline_jetson_power_watts", (("rail", "VDD_GPU_SOC"),))] == 2.412
    assert "sightline_jetson_temperature_celsius" in families


def test_metrics_live_in_their_own_registry_not_the_global_one(served):
    metrics = Metrics()
    metrics.observe_frame("m", stamps())
    assert "sightline_stage_latency_seconds" in scrape(served(metrics))
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "sightline_" not in global_text
    # Two daemons' worth of Metrics in one process do not collide.
    Metrics().observe_frame("m", stamps())


def test_a_failing_status_still_serves_latency(served):
    def broken():
        raise RuntimeError("status bug")

    metrics = Metrics(status=broken)
    metrics.observe_frame("m", stamps())
    families = scrape(served(metrics))
    assert "sightline_stage_latency_seconds" in families
    assert "sightline_clients" not in families


def test_real_daemon_stamps_and_status_feed_metrics(daemon, astronaut_640x480, served):
    """Reply stamps from a real `sightline serve`, and its real status document."""
    control = daemon.process.args[daemon.process.args.index("--control") + 1]
    metrics = Metrics(status=lambda: query_status(control, timeout=5))
    with Client(daemon.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        results = []
        deadline = time.monotonic() + 60
        while len(results) < 5 and time.monotonic() < deadline:
            client.send(astronaut_640x480)
            for reply in client.replies(timeout=5):
                if reply.ok:
                    results.append(reply)
                break
    assert len(results) == 5
    for reply in results:
        metrics.observe_frame(reply.message.get("model", "centerface"), reply.stamps)
    snapshot = metrics.collect_snapshot()
    (model,) = snapshot["models"]
    assert model["name"] == "centerface" and model["version"]
    assert model["results"] >= 5
    for stage in ("decode", "preprocess", "inference", "postprocess", "total"):
        entry = model["latency_ms"][stage]
        assert entry["n"] == 5 and 0 <= entry["p50"] <= entry["p99"] < 5000
    assert snapshot["frames"]["received"] >= 5
    families = scrape(served(metrics))
    total = samples_of(families["sightline_stage_latency_seconds"])[
        ("sightline_stage_latency_seconds_count", (("model", "centerface"), ("stage", "total")))]
    assert total == 5
    assert samples_of(families["sightline_model_results"])[
        ("sightline_model_results_total", (("model", "centerface"),))] >= 5


def test_serve_exports_prometheus_metrics_of_served_frames(daemon_factory, astronaut_640x480):
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from runtime.client import Client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = daemon_factory("--metrics", f"127.0.0.1:{port}")
    with Client(daemon.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        for _ in range(3):
            client.send(astronaut_640x480)
            assert client.recv(15).ok
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counts = {
        sample.labels.get("stage"): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "sightline_stage_latency_seconds_count"
        and sample.labels.get("model") == "centerface"
    }
    assert counts.get("inference") == 3


def test_per_headset_figures_reach_prometheus_and_telemetry_by_enrolled_name(served):
    status = {**STATUS, "identity": "key",
              "headsets": [{"name": "quest-01", "connected": True, "idle_s": 0.1,
                            "frames": 41, "dropped": 3, "rate_limited": 5,
                            "connections": 4, "replaced": 3}],
              "handshakes": {"accepted": 6, "refused": {"unknown_key": 90, "key_rate": 2}},
              "connections": {"open": 3, "accepted": 99, "disconnected": 96, "addresses": 1}}
    metrics = Metrics(status=lambda: status)
    families = scrape(served(metrics))
    headset = (("headset", "quest-01"),)
    assert samples_of(families["sightline_headset_frames"]) == {
        ("sightline_headset_frames_total", headset): 41}
    assert samples_of(families["sightline_headset_rate_limited"])[
        ("sightline_headset_rate_limited_total", headset)] == 5
    assert samples_of(families["sightline_headset_connections"])[
        ("sightline_headset_connections_total", headset)] == 4
    assert samples_of(families["sightline_handshakes_refused"])[
        ("sightline_handshakes_refused_total", (("reason", "unknown_key"),))] == 90
    assert samples_of(families["sightline_connections_open"]) == {
        ("sightline_connections_open", ()): 3}
    snapshot = metrics.collect_snapshot()
    assert snapshot["headsets"][0]["name"] == "quest-01"
    assert snapshot["headsets"][0]["dropped"] == 3
    assert snapshot["handshakes"]["refused"]["unknown_key"] == 90

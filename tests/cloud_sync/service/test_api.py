"""The read-only JSON API, /metrics, and `sightline fleet history` / `fleet rollouts`
over a database the records code filled."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_sync.service.api import ApiServer
from cloud_sync.service.database import open_database
from cloud_sync.service.metrics import FleetCollector
from cloud_sync.service.models import GateCheck, Rollout
from cloud_sync.service.records import apply_batch
from tests.cloud_sync.service.test_records import progress, status, telemetry
from tests.conftest import SIGHTLINE


def _fill(sessions, devices=("edge-a", "edge-b"), versions=("2.0",)) -> None:
    with sessions() as session:
        batch = []
        for i, device in enumerate(devices):
            batch += [status(device), telemetry(device, 101.0 + i / 100, uptime=10.0)]
            for n, version in enumerate(versions):
                update = f"u{n}"
                for state, ts in (("accepted", 110.0), ("active", 111.0)):
                    batch.append(progress(device, update, state, ts + 10 * n, version=version))
                end = "rolled_back" if device == "edge-b" else "confirmed"
                batch.append(progress(device, update, end, 112.0 + 10 * n, version=version,
                                      detail="crash loop" if end == "rolled_back" else None))
        apply_batch(session, batch)
        session.add(GateCheck(update_id="u0", device_id="edge-a", metric="p99_ms",
                              before=14.0, after=28.0, peers=14.1, samples=12, worse=True,
                              note="2.00x its baseline", decided_at=200.0))
        session.get(Rollout, "u0").decision = "halted: edge-a p99 2.00x"
        session.commit()


@pytest.fixture
def filled(sqlite_url):
    engine, sessions = open_database(sqlite_url)
    _fill(sessions)
    yield sqlite_url, sessions
    engine.dispose()


def _get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read()


def test_the_api_answers_devices_history_rollouts_and_metrics(filled):
    _, sessions = filled
    server = ApiServer("127.0.0.1", 0, sessions, FleetCollector(sessions, {"tiny": 20.0}))
    server.start()
    try:
        _, body = _get(server.port, "/devices")
        devices = json.loads(body)
        assert [d["device_id"] for d in devices] == ["edge-a", "edge-b"]
        assert devices[0]["online"] is True and devices[0]["p99_ms"] == 14.0
        _, body = _get(server.port, "/devices/edge-b/history")
        history = json.loads(body)["history"]
        assert history[0]["outcome"] == "rolled_back" and history[0]["reason"] == "crash loop"
        _, body = _get(server.port, "/rollouts/u0")
        rollout = json.loads(body)
        assert rollout["decision"].startswith("halted")
        assert rollout["gate"][0]["after"] == 28.0
        assert {s["device_id"]: s["state"] for s in rollout["steps"]} == {
            "edge-a": "confirmed", "edge-b": "rolled_back"}
        _, body = _get(server.port, "/rollouts")
        assert [r["update_id"] for r in json.loads(body)] == ["u0"]
        for missing in ("/devices/nobody/history", "/rollouts/nope", "/nothing"):
            with pytest.raises(urllib.error.HTTPError) as caught:
                _get(server.port, missing)
            assert caught.value.code == 404 and "error" in json.loads(caught.value.read())
        _, body = _get(server.port, "/metrics")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(body.decode())
                   for s in family.samples}
        assert samples[("sightline_device_online", (("device", "edge-a"),))] == 1.0
        assert samples[("sightline_device_crash_loops_total", (("device", "edge-b"),))] == 1
        assert samples[("sightline_device_update_outcomes_total",
                        (("device", "edge-b"), ("outcome", "rolled_back")))] == 1
        assert samples[("sightline_model_latency_budget_ms", (("model", "tiny"),))] == 20.0
        assert samples[("sightline_device_model_info",
                        (("device", "edge-a"), ("model", "tiny"), ("version", "1.0")))] == 1
    finally:
        server.stop()


def _series_per_device(sessions, devices: int) -> float:
    collector = FleetCollector(sessions)
    series = [s for family in collector.collect() for s in family.samples
              if "device" in s.labels]
    return len(series) / devices


def test_series_per_device_stay_the_same_however_many_versions_were_pushed(tmp_path):
    counts = []
    for versions in (("2.0",), ("2.0", "3.0", "4.0", "5.0")):
        engine, sessions = open_database(f"sqlite:///{tmp_path / f'{len(versions)}.db'}")
        _fill(sessions, devices=[f"edge-{i}" for i in range(20)], versions=versions)
        counts.append(_series_per_device(sessions, 20))
        engine.dispose()
    assert counts[0] == counts[1]
    assert counts[0] <= 25  # what docs/cloud-service.md budgets per device


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SIGHTLINE, *args], capture_output=True, text=True, timeout=60)


def test_fleet_history_and_rollouts_print_what_the_service_recorded(filled):
    url, _ = filled
    shown = _run("fleet", "history", "edge-b", "--db", url)
    assert shown.returncode == 0, shown.stderr
    assert "rolled_back" in shown.stdout and "crash loop" in shown.stdout
    as_json = json.loads(_run("fleet", "history", "edge-a", "--db", url, "--json").stdout)
    assert as_json[0]["outcome"] == "confirmed" and as_json[0]["to_version"] == "2.0"
    listed = _run("fleet", "rollouts", "--db", url)
    assert listed.returncode == 0 and "u0" in listed.stdout and "halted" in listed.stdout
    detail = _run("fleet", "rollouts", "u0", "--db", url)
    assert detail.returncode == 0, detail.stderr
    assert "telemetry gate" in detail.stdout and "worse" in detail.stdout
    unknown = _run("fleet", "history", "nobody", "--db", url)
    assert unknown.returncode == 2 and "no device 'nobody'" in unknown.stderr


def test_history_without_a_service_database_and_a_service_without_a_broker_say_so(tmp_path):
    missing = _run("fleet", "history", "edge-a", "--db", str(tmp_path / "none.db"))
    assert missing.returncode == 2 and "no fleet service database" in missing.stderr
    assert not (tmp_path / "none.db").exists()
    down = _run("cloud", "serve", "--db", str(tmp_path / "c.db"), "--broker", "127.0.0.1:1",
                "--http", "127.0.0.1:0")
    assert down.returncode == 2 and "cannot reach the broker at 127.0.0.1:1" in down.stderr

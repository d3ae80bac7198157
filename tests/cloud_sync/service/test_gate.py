"""The telemetry gate: a canary whose new version is twice as slow halts the rollout and
is rolled back; a good version goes through; noise alone never halts it."""

from __future__ import annotations

import random
import subprocess

from sqlalchemy import select

from cloud_sync.service.database import open_database
from cloud_sync.service.figures import Figures
from cloud_sync.service.gate import GateSettings, judge
from cloud_sync.service.models import GateCheck, Rollout, RolloutStep
from tests.cloud_sync.service.fleet import ServiceProcess, SimFleet
from tests.conftest import SIGHTLINE

SETTINGS = GateSettings(window_s=60.0, min_samples=8)


def _window(rng: random.Random, n: int, p99: float, fps: float, noise: float,
            start: int = 0) -> list:
    """n telemetry samples jittering by +/- noise, counters advancing like a daemon's."""
    samples, frames = [], start
    for i in range(n):
        jitter = 1 + rng.uniform(-noise, noise)
        frames += int(fps * jitter * 10)
        samples.append((float(i), Figures(None, fps * jitter, p99 * 0.6, p99 * jitter,
                                          frames, frames, 0, 0)))
    return samples


def _halts(rng, *, slowdown: float, peers_slowdown: float = 1.0, canary_p99: float = 14.0,
           noise: float = 0.2, n: int = 10) -> bool:
    before = _window(rng, n, canary_p99, 30.0, noise)
    after = _window(rng, n, canary_p99 * slowdown, 30.0 / slowdown, noise)
    peers = [_window(rng, n, 14.0 * peers_slowdown, 30.0 / peers_slowdown, noise)
             for _ in range(3)]
    return any(c.worse for c in judge("canary", before, after, peers, SETTINGS))


def test_twice_as_slow_is_always_worse_and_noise_alone_never_is():
    rng = random.Random(23)
    assert all(_halts(rng, slowdown=2.0) for _ in range(300))
    assert not any(_halts(rng, slowdown=1.0) for _ in range(300))  # +/-20% jitter, no change


def test_worse_means_worse_than_both_its_own_baseline_and_the_devices_not_updated():
    rng = random.Random(5)
    # the whole fleet got slower at the same time (load, not the update): not halted
    assert not any(_halts(rng, slowdown=2.0, peers_slowdown=2.0) for _ in range(50))
    # a canary that was always slower than its peers, unchanged by the update: not halted
    assert not any(_halts(rng, slowdown=1.0, canary_p99=40.0) for _ in range(50))


def test_error_and_drop_rates_are_compared_over_the_window():
    rng = random.Random(1)
    before = _window(rng, 10, 14.0, 30.0, 0.0)
    failing = [(t, Figures(None, f.fps, f.p50_ms, f.p99_ms, f.received, f.results, i * 30,
                           i * 30)) for i, (t, f) in enumerate(_window(rng, 10, 14.0, 30.0, 0.0))]
    checks = {c.metric: c for c in judge("canary", before, failing, [before], SETTINGS)}
    assert checks["error_rate"].worse and checks["drop_rate"].worse
    assert not checks["p99_ms"].worse and not checks["fps"].worse
    assert checks["error_rate"].after > 0.05 and checks["error_rate"].before == 0


def _push(fleet: SimFleet, port: int, db_url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SIGHTLINE, "push", str(fleet.archive), "--to", "group:fleet", "--canary", "sim-01",
         "--soak", "0", "--no-reference", "--key", str(fleet.key_path), "--broker",
         f"127.0.0.1:{port}", "--gate-window", "1.5", "--gate-min-samples", "8",
         "--chunk-size", "65536", "--timeout", "60", "--db", db_url, *extra],
        capture_output=True, text=True, timeout=180)


def test_a_twice_as_slow_version_is_halted_at_the_canary_and_rolled_back(
        db_url, broker, work_dir):
    service = ServiceProcess(work_dir, db_url, broker.port).start()
    fleet = SimFleet(work_dir / "fleet", broker.port, 4, interval_s=0.1, noise=0.1,
                     slowdown={"2.0": 2.0}).start()
    try:
        pushed = _push(fleet, broker.port, db_url)
        assert pushed.returncode == 1, pushed.stdout + pushed.stderr
        out = pushed.stdout
        assert "WORSE" in out and "telemetry gate halted the rollout" in out, out
        assert "stage 2" not in out
        serving = {d.device_id: d.host.serving()["tiny"] for d in fleet.devices}
        assert serving == {"sim-01": "1.0", "sim-02": "1.0", "sim-03": "1.0", "sim-04": "1.0"}
        assert fleet.devices[0].host.swaps == 2  # to 2.0 and back
        assert all(d.commands == 0 for d in fleet.devices[1:])  # the rest was never told
    finally:
        fleet.stop()
    engine, sessions = open_database(db_url, migrate_schema=False)
    try:
        with sessions() as session:
            rollout = session.scalars(select(Rollout)).one()
            assert rollout.state == "halted" and "p99_ms" in rollout.decision
            assert rollout.canaries == ["sim-01"]
            checks = {c.metric: c for c in session.scalars(select(GateCheck))}
            assert checks["p99_ms"].worse and checks["fps"].worse
            assert 1.6 < checks["p99_ms"].after / checks["p99_ms"].before < 2.4
            steps = session.scalars(select(RolloutStep).where(
                RolloutStep.update_id == rollout.update_id)).all()
            assert [(s.device_id, s.state) for s in steps] == [("sim-01", "confirmed")]
    finally:
        engine.dispose()
        service.stop()


def test_a_good_but_noisy_version_goes_through_to_the_whole_group(sqlite_url, broker, work_dir):
    fleet = SimFleet(work_dir / "fleet", broker.port, 4, interval_s=0.1, noise=0.2).start()
    try:
        pushed = _push(fleet, broker.port, sqlite_url)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        assert "telemetry gate passed" in pushed.stdout
        assert "4 of 4 device(s) serve the new version" in pushed.stdout
        assert {d.host.serving()["tiny"] for d in fleet.devices} == {"2.0"}
    finally:
        fleet.stop()
    engine, sessions = open_database(sqlite_url, migrate_schema=False)
    try:
        with sessions() as session:
            assert session.scalars(select(Rollout.state)).one() == "completed"
            assert not any(c.worse for c in session.scalars(select(GateCheck)))
    finally:
        engine.dispose()

"""The service records everything the broker delivered, on SQLite and PostgreSQL, even
when it is SIGKILLed in the middle of a rollout and started again."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from sqlalchemy import select

from cloud_sync.push import resolve_targets, rollout
from cloud_sync.service.database import open_database
from cloud_sync.service.models import Message, Rollout, RolloutStep, VersionChange
from cloud_sync.topics import Channel, fleet_filter
from tests.cloud_sync.service.fleet import ServiceProcess, SimFleet

FILTERS = [fleet_filter(c) for c in (Channel.STATUS, Channel.TELEMETRY, Channel.OTA_PROGRESS)]


def _digest(message) -> str:
    return hashlib.sha256(message.topic.encode() + b"\0" + message.payload).hexdigest()


def _recorded(sessions) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(Message.digest)))


def _wait_all_recorded(sessions, delivered: set[str], timeout_s: float = 30.0) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        recorded = _recorded(sessions)
        if delivered <= recorded:
            return recorded
        time.sleep(0.2)
    return _recorded(sessions)


def test_a_sigkilled_service_loses_nothing_mid_rollout_and_its_record_stays_consistent(
        db_url, broker, observer_factory, work_dir):
    # The broker's view: a plain subscriber that sees every message the service should.
    observer = observer_factory(broker.port, FILTERS)
    service = ServiceProcess(work_dir, db_url, broker.port).start()
    fleet = SimFleet(work_dir / "fleet", broker.port, 6, interval_s=0.2).start()
    engine, sessions = open_database(db_url, migrate_schema=False)
    outcome: dict = {}
    try:
        targets = resolve_targets(fleet.watcher.state, ["group:fleet"])
        canaries = ["sim-01"]

        def push() -> None:
            try:
                outcome["final"] = rollout(
                    fleet.watcher.client, fleet.watcher.state, fleet.archive, fleet.key,
                    targets, publish=fleet.publish, canaries=canaries, soak_s=0.5,
                    timeout_s=60, chunk_size=65536)
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = exc

        pusher = threading.Thread(target=push, name="test-push")
        pusher.start()
        # Kill it once the canary has started, while progress and telemetry stream in.
        assert observer.wait_for(lambda ms: any("ota/progress" in m.topic for m in ms), 30)
        time.sleep(0.3)
        service.kill()
        time.sleep(2.0)  # messages pile up in the broker for the session meanwhile
        service.start()
        pusher.join(120)
        assert "error" not in outcome, outcome.get("error")
        assert {doc["state"] for doc in outcome["final"].values()} == {"confirmed"}
    finally:
        fleet.stop()  # the devices' clean "offline" statuses are delivered too
    try:
        time.sleep(0.5)
        delivered = {_digest(m) for m in observer.everything()}
        recorded = _wait_all_recorded(sessions, delivered)
        missing = delivered - recorded
        assert not missing, f"{len(missing)} of {len(delivered)} delivered messages lost"
        assert recorded == delivered  # and nothing recorded that the broker did not carry
        kinds = {c: sum(1 for m in observer.everything() if m.topic.endswith(c.value))
                 for c in (Channel.STATUS, Channel.TELEMETRY, Channel.OTA_PROGRESS)}
        assert min(kinds.values()) > 0, kinds
        with sessions() as session:
            update_id = next(iter(outcome["final"].values()))["update_id"]
            assert session.get(Rollout, update_id).state == "completed"
            steps = {s.device_id: s.state for s in session.scalars(
                select(RolloutStep).where(RolloutStep.update_id == update_id))}
            assert steps == {d.device_id: "confirmed" for d in fleet.devices}
            changes = session.scalars(select(VersionChange)).all()
            assert sorted((c.device_id, c.from_version, c.to_version, c.outcome)
                          for c in changes) == [
                (d.device_id, "1.0", "2.0", "confirmed") for d in fleet.devices]
        metrics = service.get("/metrics")
        assert 'sightline_fleet_devices{state="offline"} 6.0' in metrics
    finally:
        assert service.stop() == 0
        engine.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_two_instances_split_the_telemetry_and_record_every_message_once(
        db_url, broker, observer_factory, work_dir):
    observer = observer_factory(broker.port, FILTERS)
    first = ServiceProcess(work_dir, db_url, broker.port).start()
    second = ServiceProcess(work_dir, db_url, broker.port, "--client-id", "test-cloud-2")
    second.start()
    fleet = SimFleet(work_dir / "fleet", broker.port, 4, interval_s=0.1).start()
    engine, sessions = open_database(db_url, migrate_schema=False)
    try:
        time.sleep(2.0)
    finally:
        fleet.stop()
    try:
        time.sleep(0.5)
        delivered = {_digest(m) for m in observer.everything()}
        assert delivered == _wait_all_recorded(sessions, delivered)
        stored = [s.get("/metrics") for s in (first, second)]
        counter = 'sightline_service_messages_stored_total{channel="telemetry"}'
        shares = [int(float(line.rsplit(" ", 1)[1])) for text in stored
                  for line in text.splitlines() if line.startswith(counter)]
        assert len(shares) == 2 and min(shares) > 0, shares  # both took part
    finally:
        first.stop()
        second.stop()
        engine.dispose()

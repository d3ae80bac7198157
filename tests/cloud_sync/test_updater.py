"""The updater's policy, in-process: real bundles, ONNX Runtime engines, model store and
signatures; the daemon is stood in by a host that records swaps and whose health the
test sets (its frames are simulated: this is the probation logic, the daemon's own swap
is tested in test_ota_daemon.py). Delivery copies a file: transport is tested elsewhere."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from cloud_sync.commands import TERMINAL, RollbackCommand
from cloud_sync.ota import OtaSettings, Updater
from cloud_sync.probation import Probation
from cloud_sync.push import make_update, package_bundle
from cloud_sync.signing import TrustedKeys, generate_signing_key, load_private_key, sign
from runtime.daemon.model_host import ModelHealth, PipelineState
from runtime.engines import open_engine
from runtime.models.store import ModelStore
from tests.cloud_sync.ota_harness import MODEL, tiny_bundle


class RecordingHost:
    def __init__(self, bundle) -> None:
        self.bundle, self.engine = bundle, open_engine(bundle.onnx_path)
        self.swaps: list[str] = []
        self.results, self.errors = 0, 0
        self.state = PipelineState.SERVING

    def serving(self) -> dict[str, str]:
        return {self.bundle.name: self.bundle.version}

    def open_engine(self, bundle):
        return open_engine(bundle.onnx_path)

    def fuse(self, bundle, engine, *, strict=True):
        return engine  # the Python steps: fusion is tested in tests/runtime/test_fusion.py

    def warm_up(self, bundle, engine) -> None:
        pass

    def swap(self, bundle, engine) -> None:
        self.engine.close()
        self.bundle, self.engine = bundle, engine
        self.swaps.append(bundle.version)

    def health(self, name: str, stall_s: float) -> ModelHealth:
        return ModelHealth(self.state, self.results, self.errors)


class FileDelivery:
    def __init__(self, archive: Path) -> None:
        self.archive = archive

    def fetch(self, command, dest: Path, progress, stop: threading.Event) -> None:
        shutil.copyfile(self.archive, dest)
        progress(command.size, command.size)


@pytest.fixture
def setup(tmp_path):
    private, public = generate_signing_key(tmp_path / "keys", "ops")
    store = ModelStore(tmp_path / "state" / "models")
    host = RecordingHost(store.seed(tiny_bundle(tmp_path / "seed", "1.0")))
    archive = package_bundle(tiny_bundle(tmp_path / "v2", "2.0").directory, _dir(tmp_path))
    reports: list[dict] = []
    updater = Updater(store, host, TrustedKeys.load([public]), device_id="d1", groups=("lab",),
                      report=reports.append, deliveries={"mqtt": FileDelivery(archive)},
                      settings=OtaSettings(probation_s=1.0))
    updater.start()
    yield updater, host, store, reports, archive, load_private_key(private)
    updater.stop()


def _dir(tmp_path: Path) -> Path:
    path = tmp_path / "pkg"
    path.mkdir(parents=True)
    return path


def _send(updater, key, command) -> None:
    updater.handle_command(json.dumps(sign(command.model_dump(mode="json"), key)).encode())


def _wait(reports, state: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for report in reports:
            if report["state"] == state:
                return report
        time.sleep(0.05)
    raise AssertionError(f"no {state!r} report; got {[r['state'] for r in reports]}")


def test_errors_during_probation_roll_back_to_the_previous_version(setup):
    updater, host, store, reports, archive, key = setup
    updater.settings = OtaSettings(probation_s=30.0)
    _send(updater, key, make_update(archive, devices=["d1"]))
    _wait(reports, "active")
    host.results, host.errors = 10, 8  # most frames of the new model fail
    rolled = _wait(reports, "rolled_back")
    assert "8 of 18 frames failed" in rolled["detail"]
    assert host.swaps == ["2.0", "1.0"] and store.state(MODEL).active == "1.0"


def test_a_stalled_pipeline_during_probation_rolls_back(setup):
    updater, host, store, reports, archive, key = setup
    updater.settings = OtaSettings(probation_s=30.0)
    _send(updater, key, make_update(archive, devices=["d1"]))
    _wait(reports, "active")
    host.state = PipelineState.STALLED
    assert "stalled" in _wait(reports, "rolled_back")["detail"]
    assert host.bundle.version == "1.0"
    state = store.state(MODEL)
    assert state.record("2.0").status.value == "rejected" and "stalled" in \
        state.record("2.0").reason
    assert updater.status_fields()["models"][MODEL]["previous"] is None  # never the rejected


def test_healthy_probation_confirms_and_the_store_keeps_the_old_version(setup):
    updater, host, store, reports, archive, key = setup
    _send(updater, key, make_update(archive, devices=["d1"]))
    _wait(reports, "confirmed")
    state = store.state(MODEL)
    assert state.active == "2.0" and state.probation is None and state.good_versions == ["1.0"]
    assert updater.status_fields()["models"][MODEL] == {"version": "2.0", "previous": "1.0",
                                                        "probation": False}


def test_the_same_update_sent_twice_is_applied_once_and_the_replay_is_rejected(setup):
    updater, host, store, reports, archive, key = setup
    command = make_update(archive, devices=["d1"])
    _send(updater, key, command)
    _wait(reports, "confirmed")
    _send(updater, key, command)
    replay = _wait(reports, "rejected")
    assert replay["check"] == "replay" and "update_id" not in replay
    assert replay["replay_of"] == {"type": "update", "update_id": command.update_id,
                                   "model": MODEL, "version": "2.0"}
    assert "accepted on this device before" in replay["detail"]
    assert [r["state"] for r in reports].count("accepted") == 1
    assert updater.last["state"] == "confirmed", "a replay must not hide the real outcome"


def test_a_replayed_command_is_rejected_after_a_restart_too(setup, tmp_path):
    updater, host, store, reports, archive, key = setup
    command = make_update(archive, devices=["d1"])
    _send(updater, key, command)
    _wait(reports, "confirmed")
    updater.stop()
    again: list[dict] = []
    restarted = Updater(store, host, updater._trusted, device_id="d1", groups=("lab",),
                        report=again.append, deliveries={"mqtt": FileDelivery(archive)},
                        settings=OtaSettings(probation_s=1.0))
    restarted.start()
    try:
        _send(restarted, key, command)
        assert _wait(again, "rejected")["check"] == "replay"
        rollback = RollbackCommand(command_id="rb-1", model=MODEL, devices=("d1",))
        _send(restarted, key, rollback)
        _wait(again, "rolled_back")
        _send(restarted, key, rollback)  # a captured rollback, published again
        assert [r.get("check") for r in again if r["state"] == "rejected"] == ["replay",
                                                                                "replay"]
    finally:
        restarted.stop()
    assert store.state(MODEL).active == "1.0"


def test_a_command_older_than_max_command_age_is_rejected_as_expired(setup):
    updater, host, store, reports, archive, key = setup
    updater.settings = OtaSettings(probation_s=1.0, max_command_age_s=3600)
    old = make_update(archive, devices=["d1"]).model_copy(
        update={"issued_at": time.time() - 7200})
    _send(updater, key, old)
    rejected = _wait(reports, "rejected")
    assert rejected["check"] == "expired" and "max_command_age_s" in rejected["detail"]
    assert host.swaps == []


def test_a_command_from_the_future_beyond_the_clock_skew_is_rejected(setup):
    updater, host, store, reports, archive, key = setup
    ahead = make_update(archive, devices=["d1"]).model_copy(
        update={"issued_at": time.time() + 3600})
    _send(updater, key, ahead)
    assert _wait(reports, "rejected")["check"] == "clock"


def test_a_command_without_issued_at_is_rejected(setup):
    updater, host, store, reports, archive, key = setup
    payload = make_update(archive, devices=["d1"]).model_dump(mode="json")
    del payload["issued_at"]
    updater.handle_command(json.dumps(sign(payload, key)).encode())
    rejected = _wait(reports, "rejected")
    assert rejected["check"] == "schema" and "issued_at" in rejected["detail"]


def test_a_downgrade_is_refused_unless_the_command_allows_it(setup, tmp_path):
    updater, host, store, reports, archive, key = setup
    older = package_bundle(tiny_bundle(tmp_path / "old", "0.9").directory, _dir(tmp_path / "o"))
    updater._deliveries["mqtt"] = FileDelivery(older)
    _send(updater, key, make_update(older, devices=["d1"]))
    rejected = _wait(reports, "rejected")
    assert rejected["check"] == "downgrade" and "older than the serving 1.0" in rejected["detail"]
    allowed = make_update(older, devices=["d1"]).model_copy(update={"allow_downgrade": True})
    _send(updater, key, allowed)
    assert _wait(reports, "confirmed")["version"] == "0.9"
    assert host.swaps == ["0.9"]


def test_an_update_back_to_a_rejected_version_counts_as_a_downgrade(setup):
    updater, host, store, reports, archive, key = setup
    updater.settings = OtaSettings(probation_s=30.0)
    _send(updater, key, make_update(archive, devices=["d1"]))
    _wait(reports, "active")
    host.errors = 10
    _wait(reports, "rolled_back")
    _send(updater, key, make_update(archive, devices=["d1"]))  # new id, same bad 2.0
    rejected = _wait(reports, "rejected")
    assert rejected["check"] == "downgrade" and "was rejected on this device" in \
        rejected["detail"]


def test_a_rejected_command_carries_its_hash_and_its_unverified_ids(setup):
    updater, host, store, reports, archive, key = setup
    command = make_update(archive, devices=["d1"])
    envelope = sign(command.model_dump(mode="json"), key)
    envelope["payload"] = envelope["payload"].replace('"2.0"', '"2.1"')
    raw = json.dumps(envelope).encode()
    updater.handle_command(raw)
    rejected = _wait(reports, "rejected")
    assert rejected["check"] == "signature" and "update_id" not in rejected
    assert rejected["command_sha256"] == hashlib.sha256(raw).hexdigest()
    assert rejected["unverified"] == {
        "key_id": envelope["key_id"], "type": "update", "update_id": command.update_id,
        "model": MODEL, "version": "2.1", "issued_at": command.issued_at}


def test_a_pipeline_shutting_down_during_probation_keeps_the_update_and_resumes_it(setup):
    updater, host, store, reports, archive, key = setup
    updater.settings = OtaSettings(probation_s=30.0)
    command = make_update(archive, devices=["d1"])
    _send(updater, key, command)
    _wait(reports, "active")
    host.state = PipelineState.STOPPED  # what the OTA thread sees while the daemon stops
    time.sleep(1.0)  # four probation checks
    updater.stop()
    assert [r["state"] for r in reports if r["state"] == "rolled_back"] == []
    state = store.state(MODEL)
    assert state.active == "2.0" and state.probation.stopped_cleanly
    # the restart: the clean stop does not count, the probation runs again and confirms
    assert store.on_boot() == [] and store.state(MODEL).probation.boots == 0
    host.state = PipelineState.SERVING
    again: list[dict] = []
    restarted = Updater(store, host, updater._trusted, device_id="d1", groups=("lab",),
                        report=again.append, deliveries={}, settings=OtaSettings(probation_s=1))
    restarted.start()
    try:
        resumed = _wait(again, "active")
        assert resumed["update_id"] == command.update_id
        assert "probation starts again" in resumed["detail"]
        assert _wait(again, "confirmed")["update_id"] == command.update_id
    finally:
        restarted.stop()
    assert store.state(MODEL).probation is None and store.state(MODEL).active == "2.0"


def test_an_update_for_another_device_or_group_is_rejected_as_misaddressed(setup):
    updater, host, store, reports, archive, key = setup
    command = make_update(archive, devices=["d2"], groups=["other"])
    _send(updater, key, command)
    refused = _wait(reports, "rejected")
    assert refused["check"] == "address" and "update_id" not in refused
    assert refused["misaddressed"] == {"type": "update", "update_id": command.update_id,
                                       "model": MODEL, "version": "2.0", "devices": ["d2"],
                                       "groups": ["other"]}
    assert "this device is d1 in groups ['lab']" in refused["detail"]
    assert updater.last is None, "not this device's outcome"
    _send(updater, key, command.model_copy(update={"devices": ("d1",)}))  # same id, for us
    assert _wait(reports, "confirmed")["update_id"] == command.update_id
    assert host.swaps == ["2.0"]


def test_a_command_over_max_command_bytes_is_rejected_unread(setup):
    updater, host, store, reports, archive, key = setup
    updater.settings = OtaSettings(max_command_bytes=4096)
    envelope = json.dumps(sign(make_update(archive, devices=["d1"]).model_dump(mode="json")
                               | {"pad": "x" * 5000}, key)).encode()
    updater.handle_command(envelope)
    refused = _wait(reports, "rejected")
    assert refused["check"] == "oversize" and "unverified" not in refused
    assert refused["command_sha256"] == hashlib.sha256(envelope).hexdigest()
    assert f"the command is {len(envelope)} bytes, more than ota.max_command_bytes (4096)" \
        in refused["detail"]


class BlockingDelivery(FileDelivery):
    """Holds every download until `release` is set (or the updater stops)."""

    def __init__(self, archive: Path) -> None:
        super().__init__(archive)
        self.release = threading.Event()

    def fetch(self, command, dest: Path, progress, stop: threading.Event) -> None:
        while not self.release.wait(0.05):
            if stop.is_set():
                from runtime.errors import UpdateRejected
                raise UpdateRejected("stopping", step="download")
        super().fetch(command, dest, progress, stop)


def _wait_ended(reports, update_ids: list[str], timeout: float = 20.0) -> dict[str, dict]:
    """update id -> its terminal report, in the order they ended, once all have ended."""
    deadline = time.monotonic() + timeout
    while True:
        ended = {r["update_id"]: r for r in list(reports)
                 if r["state"] in TERMINAL and r.get("update_id") in update_ids}
        if len(ended) == len(update_ids):
            return ended
        assert time.monotonic() < deadline, [(r.get("update_id"), r["state"]) for r in reports]
        time.sleep(0.05)


def _blocked_updater(store, host, trusted, archive, reports, **settings) -> Updater:
    updater = Updater(store, host, trusted, device_id="d1", groups=("lab",),
                      report=reports.append, deliveries={"mqtt": BlockingDelivery(archive)},
                      settings=OtaSettings(probation_s=0.2, **settings))
    updater.start()
    return updater


def _hold_one_and_queue_three(updater, key, archive, reports, tmp_path) -> tuple:
    """Send an update the blocked delivery holds in its download, then three more (updates
    to the version serving: they end at once when their turn comes)."""
    running = make_update(archive, devices=["d1"])
    _send(updater, key, running)
    _wait(reports, "downloading")
    same = package_bundle(tiny_bundle(tmp_path / "again", "1.0").directory,
                          _dir(tmp_path / "x"))
    queued = [make_update(same, devices=["d1"]) for _ in range(3)]
    for command in queued:
        _send(updater, key, command)
    return running, queued


def test_a_full_queue_refuses_with_queue_and_does_not_remember_the_id(setup, tmp_path):
    updater, host, store, reports, archive, key = setup
    updater.stop()
    reports.clear()
    blocked = _blocked_updater(store, host, updater._trusted, archive, reports,
                               max_queued_commands=2)
    try:
        _, queued = _hold_one_and_queue_three(blocked, key, archive, reports, tmp_path)
        refused = _wait(reports, "rejected")
        assert refused["check"] == "queue" and refused["update_id"] == queued[2].update_id
        assert "2 commands are queued already (ota.max_queued_commands)" in refused["detail"]
        assert queued[2].update_id not in blocked._replay
        blocked._deliveries["mqtt"].release.set()
        _wait(reports, "confirmed")
        ended = _wait_ended(reports, [c.update_id for c in queued[:2]])
        reports.clear()
        _send(blocked, key, queued[2])  # the refused command, again: accepted now
        ended |= _wait_ended(reports, [queued[2].update_id])
        # 2.0 serves by then: each is a downgrade, refused when its turn comes
        assert {ended[c.update_id]["check"] for c in queued} == {"downgrade"}
    finally:
        blocked.stop()
    assert not list((store.root.parent / "ota" / "queue").glob("*.json"))


def test_commands_queued_at_a_stop_run_after_the_restart(setup, tmp_path):
    updater, host, store, reports, archive, key = setup
    updater.stop()
    reports.clear()
    blocked = _blocked_updater(store, host, updater._trusted, archive, reports)
    update, queued = _hold_one_and_queue_three(blocked, key, archive, reports, tmp_path)
    blocked.stop()  # the download pauses; three commands wait
    assert len(list((store.root.parent / "ota" / "queue").glob("*.json"))) == 3
    again: list[dict] = []
    restarted = _blocked_updater(store, host, updater._trusted, archive, again)
    restarted._deliveries["mqtt"].release.set()
    try:
        ended = _wait_ended(again, [update.update_id] + [c.update_id for c in queued])
    finally:
        restarted.stop()
    started = list(dict.fromkeys(r.get("update_id") for r in again))
    assert started == [update.update_id] + [c.update_id for c in queued], "in order"
    assert ended[update.update_id]["state"] == "confirmed"
    for command in queued:  # still remembered: a replay stays a replay
        assert command.update_id in restarted._replay


def test_a_command_arriving_before_the_start_keeps_the_one_left_by_the_last_run(
        setup, tmp_path):
    # The link starts before the updater, so a command can be journaled before start().
    updater, host, store, reports, archive, key = setup
    updater.stop()
    same = package_bundle(tiny_bundle(tmp_path / "again", "1.0").directory,
                          _dir(tmp_path / "x"))
    left, early = make_update(same, devices=["d1"]), make_update(same, devices=["d1"])
    queue_dir = store.root.parent / "ota" / "queue"
    queue_dir.mkdir(parents=True, exist_ok=True)
    (queue_dir / "000000001.json").write_text(json.dumps(
        {"command": left.model_dump(mode="json")}))
    again: list[dict] = []
    restarted = Updater(store, host, updater._trusted, device_id="d1", groups=("lab",),
                        report=again.append, deliveries={}, settings=OtaSettings())
    _send(restarted, key, early)
    assert len(list(queue_dir.glob("*.json"))) == 2
    restarted.start()
    try:
        ended = _wait_ended(again, [left.update_id, early.update_id])
    finally:
        restarted.stop()
    assert {d["state"] for d in ended.values()} == {"current"}
    assert [r["update_id"] for r in again] == [left.update_id, early.update_id]


def test_a_rollback_the_daemon_died_in_is_reported_not_applied_twice(setup, tmp_path):
    updater, host, store, reports, archive, key = setup
    _send(updater, key, make_update(archive, devices=["d1"]))
    _wait(reports, "confirmed")
    updater.stop()
    rollback = RollbackCommand(command_id="rb-9", model=MODEL, devices=("d1",))
    store.rollback(MODEL, reason="rolled back by command rb-9")  # then kill -9, as it were
    queue_dir = store.root.parent / "ota" / "queue"
    queue_dir.mkdir(parents=True, exist_ok=True)
    (queue_dir / "000000007.json").write_text(json.dumps(
        {"command": rollback.model_dump(mode="json")}))
    again: list[dict] = []
    restarted = Updater(store, host, updater._trusted, device_id="d1", groups=("lab",),
                        report=again.append, deliveries={}, settings=OtaSettings())
    restarted.start()
    try:
        done = _wait(again, "rolled_back")
    finally:
        restarted.stop()
    assert "before the restart" in done["detail"] and done["version"] == "1.0"
    assert store.state(MODEL).active == "1.0" and host.bundle.version == "1.0"
    assert not list(queue_dir.glob("*.json"))


def test_the_version_already_serving_is_reported_current(setup, tmp_path):
    updater, host, store, reports, archive, key = setup
    same = package_bundle(tiny_bundle(tmp_path / "again", "1.0").directory,
                          _dir(tmp_path / "x"))
    _send(updater, key, make_update(same, groups=["lab"]))
    assert _wait(reports, "current")["serving"] == {MODEL: "1.0"}


def test_a_model_this_daemon_does_not_serve_is_rejected(setup, tmp_path):
    updater, host, store, reports, archive, key = setup
    other = package_bundle(tiny_bundle(tmp_path / "o", "1.0", name="other").directory,
                           _dir(tmp_path / "y"))
    _send(updater, key, make_update(other, devices=["d1"]))
    assert "not 'other'" in _wait(reports, "rejected")["detail"]


def test_rollback_with_nothing_earlier_fails_and_says_so(setup):
    updater, host, store, reports, archive, key = setup
    _send(updater, key, RollbackCommand(command_id="rb", model=MODEL, devices=("d1",)))
    assert _wait(reports, "failed")["detail"] == (
        "rollback: tiny@1.0 has no earlier good version to roll back to")
    assert host.swaps == []


def test_push_ships_a_sample_of_model_tensors_under_input_and_output_keys(tmp_path):
    import io
    import tarfile

    import numpy as np

    archive = package_bundle(tiny_bundle(tmp_path / "b", "1.0").directory, _dir(tmp_path))
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        sample = np.load(io.BytesIO(tar.extractfile(manifest["sample"]).read()))
        # docs/mqtt.md §9.1: preprocessed model inputs and reference outputs, not frames
        assert {k: (str(sample[k].dtype), sample[k].shape) for k in sample.files} == {
            "input:image": ("float32", (1, 3, 64, 64)),
            "output:features": ("float32", (1, 4, 64, 64))}


def test_a_crash_between_confirm_and_the_journal_removal_reports_confirmed(setup):
    updater, host, store, reports, archive, key = setup
    command = make_update(archive, devices=["d1"])
    _send(updater, key, command)
    _wait(reports, "confirmed")
    updater.stop()
    journal = store.root.parent / "ota" / "inflight.json"  # as kill -9 would leave it
    journal.write_text(json.dumps({"command": command.model_dump(mode="json"),
                                   "state": "active", "ts": time.time()}))
    again: list[dict] = []
    restarted = Updater(store, host, updater._trusted, device_id="d1", groups=("lab",),
                        report=again.append, deliveries={}, settings=OtaSettings())
    restarted.start()
    restarted.stop()
    assert [(r["state"], r.get("detail")) for r in again] == [
        ("confirmed", "confirmed before the restart")]
    assert not journal.exists()


@pytest.mark.parametrize("state, results, errors, fails", [
    (PipelineState.SERVING, 0, 0, None),  # idle: no client, no frame
    (PipelineState.SERVING, 100, 4, None),  # under probation_min_errors
    (PipelineState.SERVING, 100, 10, None),  # 10 of 110: under the 20% share
    (PipelineState.SERVING, 10, 8, "8 of 18 frames failed"),
    (PipelineState.STALLED, 0, 0, "its pipeline stalled"),
    (PipelineState.STOPPED, 0, 50, None),  # shutting down: never judged
])
def test_probation_fails_only_on_a_stall_or_too_many_errors(state, results, errors, fails):
    probation = Probation("tiny", "2.0", "u", None, ModelHealth(PipelineState.SERVING, 0, 0),
                          until=0.0)
    reason = probation.failure(ModelHealth(state, results, errors), OtaSettings())
    assert (reason is None) if fails is None else (fails in reason)

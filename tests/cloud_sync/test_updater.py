"""The updater's policy, in-process: real bundles, ONNX Runtime engines, model store and
signatures; the daemon is stood in by a host that records swaps and whose health the
test sets (its frames are simulated: this is the probation logic, the daemon's own swap
is tested in test_ota_daemon.py). Delivery copies a file: transport is tested elsewhere."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from cloud_sync.commands import RollbackCommand
from cloud_sync.ota import OtaSettings, Updater
from cloud_sync.push import make_update, package_bundle
from cloud_sync.signing import TrustedKeys, generate_signing_key, load_private_key, sign
from runtime.daemon.model_host import ModelHealth
from runtime.engines import open_engine
from runtime.models.store import ModelStore
from tests.cloud_sync.ota_harness import MODEL, tiny_bundle


class RecordingHost:
    def __init__(self, bundle) -> None:
        self.bundle, self.engine = bundle, open_engine(bundle.onnx_path)
        self.swaps: list[str] = []
        self.results, self.errors, self.healthy = 0, 0, True

    def serving(self) -> dict[str, str]:
        return {self.bundle.name: self.bundle.version}

    def open_engine(self, bundle):
        return open_engine(bundle.onnx_path)

    def warm_up(self, bundle, engine) -> None:
        pass

    def swap(self, bundle, engine) -> None:
        self.engine.close()
        self.bundle, self.engine = bundle, engine
        self.swaps.append(bundle.version)

    def health(self, name: str) -> ModelHealth:
        return ModelHealth(self.healthy, self.results, self.errors)


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
    host.healthy = False
    assert "stalled" in _wait(reports, "rolled_back")["detail"]
    assert host.bundle.version == "1.0"


def test_healthy_probation_confirms_and_the_store_keeps_the_old_version(setup):
    updater, host, store, reports, archive, key = setup
    _send(updater, key, make_update(archive, devices=["d1"]))
    _wait(reports, "confirmed")
    state = store.state(MODEL)
    assert state.active == "2.0" and state.probation is None and state.history == ["1.0"]
    assert updater.status_fields()["models"][MODEL] == {"version": "2.0", "previous": "1.0",
                                                        "probation": False}


def test_the_same_update_sent_twice_is_applied_once(setup):
    updater, host, store, reports, archive, key = setup
    command = make_update(archive, devices=["d1"])
    _send(updater, key, command)
    _wait(reports, "confirmed")
    _send(updater, key, command)
    time.sleep(0.5)
    assert [r["state"] for r in reports].count("accepted") == 1


def test_an_update_for_another_device_or_group_is_ignored(setup):
    updater, host, store, reports, archive, key = setup
    _send(updater, key, make_update(archive, devices=["d2"], groups=["other"]))
    time.sleep(0.5)
    assert reports == [] and host.swaps == []


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
    assert "no earlier version" in _wait(reports, "failed")["detail"]
    assert host.swaps == []

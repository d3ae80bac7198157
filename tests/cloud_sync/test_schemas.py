"""The JSON Schemas in docs/schemas/ are what the wire models generate, and they bite."""

from __future__ import annotations

import json

import pytest

from cloud_sync.commands import RollbackCommand
from cloud_sync.schemas import generate, render
from cloud_sync.signing import generate_signing_key, load_private_key, sign
from tests.cloud_sync.wire import SCHEMA_DIR, check_message, problems


@pytest.mark.parametrize("name", sorted(generate()))
def test_committed_schema_equals_what_the_models_generate(name):
    committed = SCHEMA_DIR / name
    assert committed.is_file(), f"{committed} missing: run python -m cloud_sync.schemas"
    assert committed.read_text() == render(generate()[name]), (
        f"{name} is stale: run `python -m cloud_sync.schemas docs/schemas` and commit it")


def test_no_schema_file_is_left_over_from_a_removed_message():
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(generate())


def test_a_status_with_an_undocumented_field_fails_validation():
    status = {"state": "online", "ts": 1.0, "device_id": "d", "groups": [], "models": {},
              "ota": None, "outbox": {"queued": 0, "dropped_telemetry": 0,
                                      "rejected_by_broker": 0}}
    assert problems("status", status) == []
    assert problems("status", {**status, "surprise": 1}) != []
    assert problems("status", {**status, "state": "sleeping"}) != []


def test_the_last_will_names_no_state_that_can_go_stale():
    will = {"state": "offline", "reason": "connection-lost", "ts": 1.0, "device_id": "d",
            "groups": ["lab"]}
    assert problems("status", will) == []
    assert problems("status", {**will, "models": {}}) != []
    assert problems("status", {**will, "state": "online"}) != []


def test_an_update_id_that_cannot_be_a_topic_level_fails_validation():
    command = {"type": "update", "update_id": "u-1", "model": "m", "version": "1",
               "sha256": "0" * 64, "size": 1, "issued_at": 1.0,
               "delivery": {"method": "http", "url": "https://x/b"}}
    assert problems("ota-command", command) == []
    for bad in ("a/b", "+", "-lead", "x" * 65):
        assert problems("ota-command", {**command, "update_id": bad}) != [], bad


def test_a_progress_document_needs_a_known_state_and_check():
    assert problems("ota-progress", {"state": "rejected", "ts": 1.0, "check": "replay"}) == []
    assert problems("ota-progress", {"state": "exploded", "ts": 1.0}) != []
    assert problems("ota-progress", {"state": "rejected", "ts": 1.0, "check": "?"}) != []


def test_a_signed_command_validates_and_one_without_issued_at_does_not(tmp_path):
    private, _ = generate_signing_key(tmp_path, "ops")
    key = load_private_key(private)
    command = RollbackCommand(command_id="rb-1", model="tiny", devices=("d1",))
    envelope = json.dumps(sign(command.model_dump(mode="json"), key)).encode()
    topic = "sightline/v1/devices/d1/ota/command"
    assert check_message(topic, envelope) == []
    payload = command.model_dump(mode="json")
    del payload["issued_at"]
    assert check_message(topic, json.dumps(sign(payload, key)).encode()) != []
    assert problems("ota-command", {**payload, "issued_at": 1.0}) == []

"""Validate MQTT messages against the JSON Schemas committed in docs/schemas/."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator

from cloud_sync.topics import Channel, parse_topic

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schemas"
BY_CHANNEL = {Channel.STATUS: "status", Channel.TELEMETRY: "telemetry",
              Channel.OTA_PROGRESS: "ota-progress", Channel.OTA_COMMAND: "ota-command-envelope"}


@cache
def validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def problems(name: str, document: object) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in validator(name).iter_errors(document)]


def check_message(topic: str, payload: bytes) -> list[str]:
    """What is wrong with one message of the topic tree (chunks are bytes: not checked)."""
    channel = parse_topic(topic).channel
    if channel is Channel.OTA_CHUNKS:
        return []
    name = BY_CHANNEL[channel]
    document = json.loads(payload)
    found = [f"{topic} ({name}): {p}" for p in problems(name, document)]
    if channel is Channel.OTA_COMMAND and not found:
        found = [f"{topic} (ota-command): {p}"
                 for p in problems("ota-command", json.loads(document["payload"]))]
    return found


def assert_all_valid(messages) -> int:
    """Every message (objects with .topic and .payload) validates; returns how many."""
    found = [p for m in messages for p in check_message(m.topic, m.payload)]
    assert not found, "messages that do not match docs/schemas:\n" + "\n".join(found[:20])
    return len(messages)

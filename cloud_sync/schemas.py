"""The MQTT messages as pydantic models, and the JSON Schemas in docs/schemas/ made from them.

These models describe the wire; the daemon builds its messages where they come from
(link, telemetry, updater) and the tests validate every message they see against the
committed schema files, which must equal what these models generate:

    python -m cloud_sync.schemas docs/schemas     # regenerate after changing a model
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from cloud_sync.commands import OtaState, _CommandDocument
from cloud_sync.telemetry import SCHEMA, SCHEMA_VERSION

SCHEMA_BASE = "https://sightline.dev/schemas/mqtt/v1/"  # an id, not a URL anyone serves
Number = float  # JSON number: integers validate too


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- status (devices/{id}/status, retained) ---------------------------------------------

class OutboxFigures(_Wire):
    queued: int = Field(ge=0, description="messages waiting in the outbox")
    dropped_telemetry: int = Field(ge=0, description="telemetry deleted by a full outbox, "
                                                     "ever (survives restarts)")
    rejected_by_broker: int = Field(ge=0, description="messages the broker refused (MQTT 5)")


class ServedModel(_Wire):
    version: str = Field(description="the version serving now")
    previous: str | None = Field(description="what a rollback without a version returns "
                                             "to: never a rejected version")
    probation: bool = Field(description="the version serving is not yet confirmed")


# Which check refused a command (OtaProgress.check), docs/mqtt.md §9.6.
Check = Literal["oversize", "signature", "schema", "address", "replay", "expired", "clock",
                "queue", "downgrade", "model", "size"]


class Unverified(_Wire):
    """What a refused command claims about itself, read without trusting it."""

    key_id: str | None = None
    type: str | None = None
    update_id: str | None = None
    command_id: str | None = None
    model: str | None = None
    version: str | None = None
    to_version: str | None = None
    issued_at: Number | None = None


class ReplayOf(_Wire):
    """The (verified) command a replay rejection is about."""

    type: Literal["update", "rollback"]
    update_id: str | None = None
    command_id: str | None = None
    model: str
    version: str | None = None


class Misaddressed(ReplayOf):
    """The (verified) command refused as not addressed to this device, and its targets."""

    devices: list[str]
    groups: list[str]


class OtaProgress(_Wire):
    """devices/{id}/ota/progress: one document per step of an update or rollback."""

    state: OtaState
    ts: Number = Field(description="Unix time the device made this document")
    update_id: str | None = Field(
        default=None, description="the update's id, or a rollback's command_id; absent "
                                  "when the command could not be trusted (see unverified)")
    model: str | None = None
    version: str | None = Field(default=None, description="the update's version; for "
                                "rolled_back from a rollback command, the version now serving")
    serving: dict[str, str] | None = Field(default=None, description="model -> version "
                                           "serving when the document was made")
    detail: str | None = Field(default=None, description="what happened, for a person")
    percent: Annotated[int, Field(ge=0, le=100)] | None = Field(
        default=None, description="downloading only")
    check: Check | None = Field(
        default=None, description="rejected only: which check refused the command")
    command_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description=(
        "rejected only: sha256 of the command's bytes as received"))
    unverified: Unverified | None = Field(default=None, description=(
        "rejected before the signature or schema was trusted: the ids the command claims"))
    replay_of: ReplayOf | None = Field(default=None, description=(
        "rejected as a replay: the command (already accepted once) it repeats; the "
        "update's own documents keep their update_id, this one has none"))
    misaddressed: Misaddressed | None = Field(default=None, description=(
        "rejected with check address: the command and the targets it is signed for; no "
        "update_id at the top, as for a replay"))


class LastOutcome(OtaProgress):
    """The status's copy of the last OTA document that was not a download step."""

    serving: None = Field(default=None, exclude=True)


class StatusDocument(_Wire):
    """What the device publishes itself: online (on connect and on change), offline on a
    clean stop. Always true when it was sent."""

    state: Literal["online", "offline"]
    ts: Number
    device_id: str
    outbox: OutboxFigures
    groups: list[str]
    models: dict[str, ServedModel]
    ota: LastOutcome | None = Field(description="the last OTA outcome (survives restarts)")


class LastWill(_Wire):
    """What the broker publishes when it lost the device: made at connect time, so only
    what cannot change while connected. What it served: the last status it sent."""

    state: Literal["offline"]
    reason: Literal["connection-lost"]
    ts: Number = Field(description="when the Will was registered (the connect), not when "
                                   "the connection died")
    device_id: str
    groups: list[str]


class Status(RootModel[StatusDocument | LastWill]):
    """devices/{id}/status, retained: the device's own status, or its Last Will."""


# -- telemetry (devices/{id}/telemetry) -------------------------------------------------

class StageLatency(_Wire):
    n: int = Field(ge=0, description="frames in the window")
    p50: Number | None = Field(description="ms; null when n is 0 (no frames, no clients)")
    p95: Number | None
    p99: Number | None


class StageLatencies(_Wire):
    decode: StageLatency
    preprocess: StageLatency
    inference: StageLatency
    postprocess: StageLatency
    total: StageLatency


class ModelFigures(_Wire):
    name: str
    version: str
    task: str = Field(description="face, detect, raw ...")
    provider: str = Field(description="the engine, e.g. CPUExecutionProvider")
    default: bool = Field(description="serves frames that name no model")
    results: int = Field(ge=0)
    expired: int = Field(ge=0)
    errors: int = Field(ge=0)
    fps: Number
    latency_ms: StageLatencies


class FrameFigures(_Wire):
    received: int = Field(ge=0)
    results: int = Field(ge=0)
    dropped: int = Field(ge=0, description="superseded + expired")
    superseded: int = Field(ge=0)
    expired: int = Field(ge=0)


class GpuFigures(_Wire):
    index: int
    name: str
    utilization_percent: Number | None
    memory_used_mb: Number | None
    memory_total_mb: Number | None
    temperature_c: Number | None
    power_w: Number | None


class HostFigures(_Wire):
    cpu_percent: Number | None
    cpu_count: int
    memory_used_mb: int
    memory_total_mb: int
    load_average: list[Number] | None = Field(description="1, 5, 15 min; null where the OS "
                                                          "has none")
    temperatures_c: dict[str, Number | None]
    gpus: list[GpuFigures] | None = Field(description="NVML; null where NVML is not "
                                                      "available (Jetsons: see jetson)")


class PowerRail(_Wire):
    current: Number | None
    average: Number | None


class JetsonFigures(_Wire):
    timestamp: str | None
    ram_used_mb: Number | None
    ram_total_mb: Number | None
    swap_used_mb: Number | None
    swap_total_mb: Number | None
    cpu_load_percent: list[Number | None]
    cpu_mhz: list[Number | None]
    gpu_load_percent: Number | None
    gpu_mhz: Number | None
    emc_load_percent: Number | None
    emc_mhz: Number | None
    temperatures_c: dict[str, Number | None]
    power_mw: dict[str, PowerRail]


class HeadsetFigures(_Wire):
    """One headset: its enrolled name under CURVE, its connection in plain mode."""

    name: str
    connected: bool
    idle_s: Number | None = Field(description="null before its first frame")
    frames: int = Field(ge=0)
    dropped: int = Field(ge=0)
    rate_limited: int = Field(ge=0)
    bad_requests: int = Field(ge=0)
    connections: int = Field(ge=0, description="connections it has opened")
    replaced: int = Field(ge=0, description="times a newer connection took over")


class HandshakeFigures(_Wire):
    """CURVE handshakes the ZAP handler judged; an empty object in plain mode."""

    accepted: int = Field(default=0, ge=0)
    refused: dict[str, int] = Field(default_factory=dict,
                                    description="refused handshakes by reason")


class ConnectionFigures(_Wire):
    """Transport connections the socket monitor saw; an empty object when none runs."""

    open: int = Field(default=0, ge=0)
    accepted: int = Field(default=0, ge=0)
    disconnected: int = Field(default=0, ge=0)
    addresses: int = Field(default=0, ge=0,
                           description="source addresses with open connections")


class PublisherFigures(_Wire):
    published: int = Field(ge=0)
    failures: int = Field(ge=0)


class Telemetry(_Wire):
    schema_: Literal[SCHEMA] = Field(alias="schema")  # type: ignore[valid-type]
    schema_version: Literal[SCHEMA_VERSION]  # type: ignore[valid-type]
    device_id: str
    sequence: int = Field(ge=1)
    ts: Number
    time: str = Field(description="ts as ISO 8601, UTC")
    interval_s: Number
    telemetry: PublisherFigures
    uptime_s: Number | None
    version: str | None = Field(description="the Sightline release the daemon runs")
    models: list[ModelFigures]
    fps: Number | None
    frames: FrameFigures
    clients: int = Field(ge=0)
    headsets: list[HeadsetFigures]
    handshakes: HandshakeFigures
    connections: ConnectionFigures
    errors: dict[str, int] = Field(description="error replies by code")
    host: HostFigures | None = Field(description="null while the host probe fails")
    jetson: JetsonFigures | None = Field(description="tegrastats; null except on a Jetson "
                                                     "whose tegrastats runs")


# -- OTA command (devices/{id}/ota/command, groups/{g}/ota/command) -----------------------

class CommandEnvelope(_Wire):
    payload: str = Field(description="the command as JSON text (ota-command.schema.json); "
                                     "the signature covers its exact UTF-8 bytes")
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description=(
        "first 16 hex digits of the sha256 of the raw 32-byte Ed25519 public key"))
    signature: str = Field(description="base64 Ed25519 signature of payload")


def _command_schema() -> dict[str, Any]:
    schema = _CommandDocument.model_json_schema()["$defs"]
    document = {"description": "The signed payload of an OTA command (docs/mqtt.md §9.1).",
                "oneOf": [{"$ref": "#/$defs/UpdateCommand"},
                          {"$ref": "#/$defs/RollbackCommand"}], "$defs": schema}
    for name in ("UpdateCommand", "RollbackCommand"):  # the device requires both
        schema[name]["required"] = sorted({*schema[name].get("required", ()), "issued_at",
                                           "type"})
    return document


SCHEMAS: dict[str, Any] = {
    "status": Status,
    "telemetry": Telemetry,
    "ota-progress": OtaProgress,
    "ota-command-envelope": CommandEnvelope,
    "ota-command": _command_schema,
}


def generate() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema (draft 2020-12) for every MQTT message."""
    files = {}
    for name, source in SCHEMAS.items():
        schema = source() if callable(source) and not isinstance(source, type) else \
            source.model_json_schema(by_alias=True)
        files[f"{name}.schema.json"] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"{SCHEMA_BASE}{name}.schema.json", **schema}
    return files


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> None:
    directory = Path(argv[0] if argv else "docs/schemas")
    directory.mkdir(parents=True, exist_ok=True)
    for name, schema in generate().items():
        (directory / name).write_text(render(schema))
        print(directory / name)


if __name__ == "__main__":
    main(sys.argv[1:])

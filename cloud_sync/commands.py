"""What the cloud tells a device to do (update, roll back) and what the device reports.

Commands are validated once, here, after the signature has been checked
(cloud_sync/signing.py); the updater trusts these types. Progress states are the
steps of an update in order, then the terminal outcomes.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Annotated, Any, Literal

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cloud_sync.topics import (
    field_check,
    validate_device_id,
    validate_group,
    validate_update_id,
)
from runtime.errors import UpdateRejected

_SHA256 = r"^[0-9a-f]{64}$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttChunks(_Strict):
    """The bundle as retained chunks on updates/{update_id}/chunks/{index}."""

    method: Literal["mqtt"] = "mqtt"
    chunk_size: int = Field(gt=0, le=16 * 1024 * 1024)
    chunk_sha256: tuple[Annotated[str, Field(pattern=_SHA256)], ...] = Field(min_length=1)


class HttpDownload(_Strict):
    """The bundle at an http(s) URL, fetched with range requests (resumable)."""

    method: Literal["http"] = "http"
    url: str = Field(pattern=r"^https?://")


class Tolerance(_Strict):
    """How close the device's outputs on the bundle's sample must be to the reference."""

    atol: float = Field(default=1e-3, ge=0)
    rtol: float = Field(default=1e-3, ge=0)


class _Targets(_Strict):
    devices: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    issued_at: float = Field(default_factory=time.time)  # Unix s; replay protection
    @field_validator("devices")
    @classmethod
    def _devices(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return field_check(validate_device_id, value)

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return field_check(validate_group, value)

    def addresses(self, device_id: str, groups: tuple[str, ...]) -> bool:
        """Whether this command is meant for this device (signed, so not re-addressable)."""
        return device_id in self.devices or bool(set(groups) & set(self.groups))


class UpdateCommand(_Targets):
    type: Literal["update"] = "update"
    # The topic-id rule (cloud_sync/topics.py), also in the schema; the validator below
    # gives the message that explains it.
    update_id: str = Field(json_schema_extra={"pattern": _ID, "maxLength": 64})
    model: str = Field(pattern=_NAME)
    version: str = Field(min_length=1, max_length=64, pattern=_NAME)
    sha256: str = Field(pattern=_SHA256)
    size: int = Field(gt=0)
    delivery: MqttChunks | HttpDownload = Field(discriminator="method")
    # Validation on the device: the bundle's sample through the prepared engine must take
    # at most this long (median of a few runs) and match the references within tolerance.
    latency_budget_ms: float | None = Field(default=None, gt=0)
    reference: Tolerance | None = None
    # A version older than the one serving is refused unless the command says so: a
    # captured update to a version later found bad cannot be used to go back to it.
    allow_downgrade: bool = False

    @field_validator("update_id")
    @classmethod
    def _update_id(cls, value: str) -> str:
        return field_check(validate_update_id, value)


class RollbackCommand(_Targets):
    type: Literal["rollback"] = "rollback"
    command_id: str = Field(pattern=_NAME, max_length=64)
    model: str = Field(pattern=_NAME)
    to_version: str | None = None  # None: the version that served before the current one


Command = Annotated[UpdateCommand | RollbackCommand, Field(discriminator="type")]


class _CommandDocument(_Strict):
    command: Command


def parse_command(document: dict[str, Any]) -> UpdateCommand | RollbackCommand:
    """Validate a verified payload; UpdateRejected naming the bad fields otherwise.

    `issued_at` must be in the signed payload: replay protection rests on it."""
    if "issued_at" not in document:
        raise UpdateRejected("invalid OTA command: issued_at: Field required (Unix time the "
                             "command was signed; commands older than the device's "
                             "ota.max_command_age_s are refused)")
    try:
        return _CommandDocument.model_validate({"command": document}).command
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'command'}: "
                             f"{e['msg']}" for e in exc.errors())
        raise UpdateRejected(f"invalid OTA command: {problems}") from None


class OtaState(str, Enum):
    """Steps of an update, in order, then outcomes. Reported on devices/{id}/ota/progress."""

    ACCEPTED = "accepted"  # signature, addressing and schema checked
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"  # size and sha256 match the signed command
    UNPACKED = "unpacked"
    PREPARED = "prepared"  # engine built/opened for this device
    VALIDATED = "validated"  # smoke inference, budget, references
    ACTIVE = "active"  # serving, on probation until confirmed
    CONFIRMED = "confirmed"  # healthy for the probation time: the new last good model
    # outcomes
    REJECTED = "rejected"  # refused before anything was fetched
    FAILED = "failed"  # a step failed; the previous model never stopped serving
    ROLLED_BACK = "rolled_back"  # was active, now the previous version serves again
    INTERRUPTED = "interrupted"  # the daemon died during it on every try; dropped
    CURRENT = "current"  # this version is already active: nothing to do


# Final states, as the strings on the wire: the update serves, or it never will.
SUCCEEDED = frozenset({OtaState.CONFIRMED.value, OtaState.CURRENT.value})
UNSUCCESSFUL = frozenset({OtaState.REJECTED.value, OtaState.FAILED.value,
                          OtaState.ROLLED_BACK.value, OtaState.INTERRUPTED.value})
TERMINAL = SUCCEEDED | UNSUCCESSFUL


def command_id(command: UpdateCommand | RollbackCommand) -> str:
    """The id replay protection keys on: an update's update_id, a rollback's command_id."""
    return command.update_id if isinstance(command, UpdateCommand) else command.command_id


def is_older_version(version: str, than: str) -> bool:
    """Whether `version` precedes `than` (PEP 440 order; versions that do not parse are
    never called older: the command's own flag cannot be required for them)."""
    try:
        return Version(version) < Version(than)
    except InvalidVersion:
        return False


def command_identity(command: UpdateCommand | RollbackCommand) -> dict[str, str]:
    """The ids that say which command a report is about (a replay's `replay_of`)."""
    if isinstance(command, UpdateCommand):
        return {"type": "update", "update_id": command.update_id, "model": command.model,
                "version": command.version}
    return {"type": "rollback", "command_id": command.command_id, "model": command.model}

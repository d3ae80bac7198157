"""What one delivered message changes in the database, applied a batch per transaction.

`apply_batch` is the only writer of the device registry, the message ledger, OTA events,
version history, rollout steps and telemetry samples. It is idempotent: a message whose
digest is already in the ledger (a QoS 1 re-delivery, a retained status sent again on a
re-subscribe) changes nothing, so the ingest may acknowledge only after the commit and
let the broker re-send whatever a crash left unacknowledged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud_sync.service.figures import figures, integer, number
from cloud_sync.service.models import (
    Device,
    Message,
    OtaEvent,
    Rollout,
    RolloutStep,
    TelemetrySample,
    VersionChange,
)
from cloud_sync.topics import Channel, TopicError, parse_topic

log = logging.getLogger(__name__)

# How a change ended, by the OTA state that ends it (docs/mqtt.md §9.3).
OUTCOMES = {"confirmed": "confirmed", "rolled_back": "rolled_back", "rejected": "rejected",
            "failed": "failed", "interrupted": "interrupted", "current": "current"}
SUCCEEDED = ("confirmed", "current")
BASELINE_S = 600.0  # "fps before the change": the 10 minutes before it was first reported


@dataclass(frozen=True)
class Delivered:
    """One message as the broker delivered it."""

    topic: str
    payload: bytes
    received_at: float

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.topic.encode() + b"\0" + self.payload).hexdigest()


@dataclass
class BatchResult:
    stored: dict[str, int]  # channel -> new messages recorded
    duplicates: int
    ignored: int  # foreign topics, non-JSON payloads


def apply_batch(session: Session, batch: Iterable[Delivered]) -> BatchResult:
    """Record `batch` in one transaction (committed here). On a unique-key race with a
    second service instance, the batch is re-applied one message at a time."""
    batch = list(batch)
    try:
        result = _apply(session, batch)
        session.commit()
        return result
    except IntegrityError:
        session.rollback()
    total = BatchResult({}, 0, 0)
    for message in batch:
        try:
            result = _apply(session, [message])
            session.commit()
        except IntegrityError:  # the other instance recorded it first
            session.rollback()
            result = BatchResult({}, 1, 0)
        for channel, count in result.stored.items():
            total.stored[channel] = total.stored.get(channel, 0) + count
        total.duplicates += result.duplicates
        total.ignored += result.ignored
    return total


def _apply(session: Session, batch: list[Delivered]) -> BatchResult:
    result = BatchResult({}, 0, 0)
    digests = {m.digest for m in batch}
    known = set(session.scalars(select(Message.digest).where(Message.digest.in_(digests))))
    # The batch's devices in one query, held here: the session's identity map is weak,
    # and a get() that misses it would flush and SELECT once per message.
    parsed_batch = [(m, _parse(m)) for m in batch]
    ids = {p[1] for _, p in parsed_batch if p is not None}
    devices = {d.device_id: d for d in
               session.scalars(select(Device).where(Device.device_id.in_(ids)))}
    for message, parsed in parsed_batch:
        digest = message.digest
        if digest in known:
            result.duplicates += 1
            continue
        known.add(digest)
        if parsed is None:
            result.ignored += 1
            continue
        channel, device_id, document = parsed
        ts = number(document.get("ts")) if document else None
        row = Message(digest=digest, device_id=device_id, channel=channel.value, ts=ts,
                      received_at=message.received_at)
        session.add(row)
        device = _device(session, devices, device_id, ts, message.received_at)
        if channel is Channel.STATUS:
            _status(device, document)
        elif channel is Channel.TELEMETRY:
            _telemetry(session, device, document, ts, message.received_at)
        else:
            session.flush()  # the ledger row's id, for the event's foreign key
            _progress(session, device, document, ts, row.id)
        result.stored[channel.value] = result.stored.get(channel.value, 0) + 1
    return result


def _parse(message: Delivered) -> tuple[Channel, str, dict[str, Any] | None] | None:
    try:
        topic = parse_topic(message.topic)
    except TopicError:
        log.debug("ignoring a message on foreign topic %r", message.topic)
        return None
    if topic.scope != "device" or topic.channel not in (
            Channel.STATUS, Channel.TELEMETRY, Channel.OTA_PROGRESS):
        return None
    if topic.channel is Channel.STATUS and not message.payload:
        return Channel.STATUS, topic.target, None  # a retired device's status was cleared
    try:
        document = json.loads(message.payload)
    except (UnicodeDecodeError, ValueError):
        log.warning("ignoring a non-JSON payload on %s", message.topic)
        return None
    if not isinstance(document, dict):
        log.warning("ignoring non-object JSON on %s", message.topic)
        return None
    return topic.channel, topic.target, document


def _device(session: Session, devices: dict[str, Device], device_id: str, ts: float | None,
            received_at: float) -> Device:
    device = devices.get(device_id)
    seen = ts if ts is not None else received_at
    if device is None:
        device = Device(device_id=device_id, first_seen=seen, last_seen=seen,
                        last_heard=received_at, groups=[], models={}, restarts=0)
        session.add(device)
        devices[device_id] = device
    else:
        device.last_seen = max(device.last_seen, seen)
        device.last_heard = max(device.last_heard, received_at)
    return device


def _status(device: Device, document: dict[str, Any] | None) -> None:
    if document is None:
        device.online = None
        return
    state = document.get("state")
    device.online = True if state == "online" else False if state == "offline" else None
    device.offline_reason = document.get("reason") if state == "offline" else None
    if isinstance(document.get("groups"), list):
        device.groups = [g for g in document["groups"] if isinstance(g, str)]
    if isinstance(document.get("models"), dict):
        device.models = document["models"]
    if isinstance(document.get("ota"), dict):
        device.last_ota = document["ota"]


def _telemetry(session: Session, device: Device, document: dict[str, Any], ts: float | None,
               received_at: float) -> None:
    ts = ts if ts is not None else received_at
    reduced = figures(document)
    session.add(TelemetrySample(device_id=device.device_id, ts=ts,
                                sequence=integer(document.get("sequence")), **vars(reduced)))
    newest = number((device.latest_telemetry or {}).get("ts"))
    if newest is None or ts >= newest:  # the outbox replays old samples after an outage
        uptime = number(document.get("uptime_s"))
        if uptime is not None and device.last_uptime_s is not None \
                and uptime < device.last_uptime_s:
            device.restarts += 1
        if uptime is not None:
            device.last_uptime_s = uptime
        device.latest_telemetry = document
        device.last_telemetry = received_at


def _progress(session: Session, device: Device, document: dict[str, Any], ts: float | None,
              message_id: int) -> None:
    state = str(document.get("state", "?"))[:16]
    update_id = document.get("update_id") if isinstance(document.get("update_id"), str) \
        else None
    detail = document.get("detail") if isinstance(document.get("detail"), str) else None
    check = document.get("check") if isinstance(document.get("check"), str) else None
    model = document.get("model") if isinstance(document.get("model"), str) else None
    version = document.get("version") if isinstance(document.get("version"), str) else None
    session.add(OtaEvent(message_id=message_id, device_id=device.device_id,
                         update_id=update_id, model=model, version=version, state=state,
                         check=check, detail=detail, ts=ts))
    if update_id is None:
        if document.get("replay_of") is not None:
            return  # a canary answering stage 2's group command: not news (§9.5)
        unverified = document.get("unverified") or {}
        # A command that could not be trusted still reaches the history, with why.
        update_id = f"unverified-{message_id}"
        model = model or unverified.get("model")
        version = version or unverified.get("version")
    when = ts if ts is not None else device.last_heard
    change = session.scalars(select(VersionChange).where(
        VersionChange.device_id == device.device_id,
        VersionChange.update_id == update_id)).first()
    if change is None:
        serving = document.get("serving") if isinstance(document.get("serving"), dict) else {}
        before = _before(session, device.device_id, when)
        change = VersionChange(device_id=device.device_id, update_id=update_id, model=model,
                               from_version=serving.get(model) if model else None,
                               to_version=version, started_at=when, last_state=state,
                               outcome="pending", fps_before=before[0], p99_before=before[1])
        session.add(change)
    change.last_state = state
    if state in OUTCOMES:
        change.outcome = OUTCOMES[state]
        change.ended_at = when
        change.reason = (f"{check}: {detail}" if check and detail else detail or check)
    # Rollbacks by command (`sightline rollback`, the gate's) are history, not rollouts.
    if not update_id.startswith(("unverified-", "rollback-")):
        _step(session, device.device_id, update_id, model, version, state, detail, when)


def _before(session: Session, device_id: str, when: float) -> tuple[float | None, float | None]:
    row = session.execute(select(func.avg(TelemetrySample.fps), func.avg(TelemetrySample.p99_ms))
                          .where(TelemetrySample.device_id == device_id,
                                 TelemetrySample.ts >= when - BASELINE_S,
                                 TelemetrySample.ts < when)).first()
    return (row[0], row[1]) if row else (None, None)


def _step(session: Session, device_id: str, update_id: str, model: str | None,
          version: str | None, state: str, detail: str | None, when: float) -> None:
    rollout = session.get(Rollout, update_id)
    if rollout is None:  # not pushed with --db: the rollout as the devices report it
        rollout = Rollout(update_id=update_id, model=model, version=version, started_at=when,
                          state="running", canaries=[], targets=[])
        session.add(rollout)
        session.flush()
    step = session.scalars(select(RolloutStep).where(
        RolloutStep.update_id == update_id, RolloutStep.device_id == device_id)).first()
    if step is None:
        step = RolloutStep(update_id=update_id, device_id=device_id, updated_at=when)
        session.add(step)
    step.state, step.detail, step.updated_at = state, detail, max(step.updated_at, when)
    if not rollout.targets:
        session.flush()
        steps = select(func.count()).select_from(RolloutStep).where(
            RolloutStep.update_id == update_id)
        # Recomputed on every step: a canary stage that ended is reopened by stage 2.
        if not session.scalar(steps.where(RolloutStep.state.not_in(tuple(OUTCOMES)))):
            unsuccessful = session.scalar(steps.where(RolloutStep.state.not_in(SUCCEEDED)))
            rollout.state = "failed" if unsuccessful else "completed"
            rollout.ended_at = when
        else:
            rollout.state, rollout.ended_at = "running", None

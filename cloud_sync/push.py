"""Operator side of OTA: package a bundle, sign the command, publish it, follow the rollout.

Staged: with a canary, the command first goes to the canary devices only; the rest of
the fleet gets it when every canary has confirmed the new version (its own probation)
and stayed online and healthy for the soak time. A failing canary stops the rollout.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cloud_sync.commands import (
    SUCCEEDED,
    TERMINAL,
    UNSUCCESSFUL,
    HttpDownload,
    MqttChunks,
    RollbackCommand,
    Tolerance,
    UpdateCommand,
)
from cloud_sync.delivery.mqtt_chunks import chunk_ranges
from cloud_sync.signing import sign
from cloud_sync.topics import chunk_topic, device_topics, group_command_topic
from runtime.errors import SightlineError
from runtime.models.bundle import MANIFEST_NAME, Bundle, pack_archive, sha256_file

log = logging.getLogger(__name__)
DEFAULT_CHUNK_SIZE = 256 * 1024


class RolloutError(SightlineError):
    """The rollout stopped: a canary failed, or devices did not answer in time."""


def package_bundle(source: Path, work_dir: Path, *, with_reference: bool = True) -> Path:
    """The bundle as one archive, with a sample input and reference outputs (computed here
    with ONNX Runtime on the CPU) so that devices can validate it before serving it."""
    from runtime.engines import EngineSettings, open_engine
    from runtime.models.validation import sample_feeds, write_sample

    bundle = Bundle.load(source, unpack_root=work_dir / "unpacked")
    copy = work_dir / "bundle"
    shutil.copytree(bundle.directory, copy)
    bundle = Bundle(copy, bundle.manifest)
    if with_reference and bundle.manifest.sample is None:
        inputs, _ = sample_feeds(bundle)
        engine = open_engine(bundle.onnx_path, EngineSettings(providers=("CPUExecutionProvider",)))
        try:
            outputs = engine.infer(inputs)
        finally:
            engine.close()
        write_sample(bundle, inputs, outputs)
        manifest = bundle.manifest.model_copy(update={"sample": "sample.npz"})
        (copy / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
        bundle = Bundle(copy, manifest)
    return pack_archive(bundle, work_dir / f"{bundle.name}-{bundle.version}.sightline")


def chunk_digests(archive: Path, chunk_size: int) -> list[str]:
    data = archive.read_bytes()
    return [hashlib.sha256(data[o:o + n]).hexdigest()
            for o, n in chunk_ranges(len(data), chunk_size)]


def make_update(archive: Path, *, url: str | None = None,
                chunk_size: int = DEFAULT_CHUNK_SIZE, update_id: str | None = None,
                latency_budget_ms: float | None = None, tolerance: Tolerance | None = None,
                devices: Iterable[str] = (), groups: Iterable[str] = (),
                allow_downgrade: bool = False) -> UpdateCommand:
    bundle = Bundle.load(archive, unpack_root=archive.parent / "check")
    delivery = (HttpDownload(url=url) if url else
                MqttChunks(chunk_size=chunk_size, chunk_sha256=tuple(chunk_digests(archive,
                                                                                  chunk_size))))
    return UpdateCommand(
        update_id=update_id or f"{bundle.name}-{bundle.version}-{secrets.token_hex(3)}"[:64],
        model=bundle.name, version=bundle.version, sha256=sha256_file(archive),
        size=archive.stat().st_size, delivery=delivery, latency_budget_ms=latency_budget_ms,
        reference=tolerance, devices=tuple(devices), groups=tuple(groups),
        allow_downgrade=allow_downgrade)


def publish_chunks(client, command: UpdateCommand, archive: Path, publish: Callable,
                   progress: Callable[[int], None] | None = None) -> int:
    """Publish every chunk retained (QoS 1); returns how many."""
    assert isinstance(command.delivery, MqttChunks)
    data = archive.read_bytes()
    ranges = chunk_ranges(len(data), command.delivery.chunk_size)
    for index, (offset, length) in enumerate(ranges):
        publish(client, chunk_topic(command.update_id, index), data[offset:offset + length],
                retain=True)
        if progress:
            progress(length)
    return len(ranges)


def clear_chunks(client, command: UpdateCommand, publish: Callable) -> None:
    """Delete the retained chunks (an empty retained message clears a topic)."""
    if isinstance(command.delivery, MqttChunks):
        for index in range(len(command.delivery.chunk_sha256)):
            publish(client, chunk_topic(command.update_id, index), b"", retain=True)


def command_topics(command: UpdateCommand | RollbackCommand) -> list[str]:
    return ([device_topics(d).ota_command for d in command.devices]
            + [group_command_topic(g) for g in command.groups])


def publish_command(client, command: UpdateCommand | RollbackCommand, private_key,
                    publish: Callable) -> None:
    import json

    envelope = json.dumps(sign(command.model_dump(mode="json"), private_key)).encode()
    for topic in command_topics(command):
        publish(client, topic, envelope, retain=False)


def wait_for(rollout_state: Callable[[], dict[str, dict]], devices: list[str], timeout_s: float,
             *, poll_s: float = 0.2) -> dict[str, dict]:
    """Poll progress until every device is in a terminal state, or raise RolloutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = rollout_state()
        pending = [d for d in devices if states.get(d, {}).get("state") not in TERMINAL]
        if not pending:
            return states
        if time.monotonic() > deadline:
            silent = [d for d in devices if d not in states]
            raise RolloutError(
                f"timed out after {timeout_s:g} s; no final state from {', '.join(pending)}"
                + (f" (never heard from {', '.join(silent)}: offline?)" if silent else ""))
        time.sleep(poll_s)


@dataclass(frozen=True)
class Targets:
    """Who an update goes to: devices named directly, and groups (resolved to members)."""

    devices: tuple[str, ...]
    groups: tuple[str, ...]
    members: tuple[str, ...]  # every device addressed, as the fleet's statuses say


def resolve_targets(state, names: Iterable[str]) -> Targets:
    """`device:ID`, `group:NAME`, or a bare name: a device if one reports that id, else a
    group if a device reports membership. Unknown names are an error (typo guard)."""
    devices, groups, members = [], [], []
    known = {row.device_id: row for row in state.rows()}
    for name in names:
        kind, _, value = name.partition(":") if ":" in name else ("", "", name)
        if kind not in ("", "device", "group"):
            raise RolloutError(f"{name!r}: use device:ID, group:NAME or a bare name")
        in_group = sorted(d for d, row in known.items() if value in row.groups)
        if kind == "device" or (not kind and value in known):
            if value not in known and kind == "device":
                log.warning("device %s has never reported to this broker", value)
            devices.append(value)
            members.append(value)
        elif kind == "group" or in_group:
            if not in_group:
                raise RolloutError(f"no device reports membership of group {value!r}")
            groups.append(value)
            members += in_group
        else:
            raise RolloutError(
                f"{value!r} is neither a device nor a group any device on this broker "
                f"reports (known devices: {', '.join(sorted(known)) or 'none'})")
    return Targets(tuple(devices), tuple(groups), tuple(dict.fromkeys(members)))


def rollout(client, state, archive: Path, private_key, targets: Targets, *,
            publish: Callable, canaries: Iterable[str] = (), soak_s: float = 0.0,
            timeout_s: float = 900.0, url: str | None = None,
            chunk_size: int = DEFAULT_CHUNK_SIZE, latency_budget_ms: float | None = None,
            tolerance: Tolerance | None = None, keep_chunks: bool = False,
            allow_downgrade: bool = False,
            on_event: Callable[[str], None] = log.info, gate=None,
            record=None) -> dict[str, dict]:
    """Publish the bundle and the signed command, canaries first; returns each device's
    final progress document. Raises RolloutError when a canary fails (the rest is then
    never told) or devices stay silent past `timeout_s`.

    `gate` (cloud_sync.service.gate.TelemetryGate) also judges the canaries' telemetry
    after they confirmed; when it finds one worse, the canaries are rolled back and the
    rollout halts. `record` (cloud_sync.service.rollout_record.RolloutRecord) keeps the
    rollout, the gate's figures and how it ended in the fleet service's database."""
    canaries = [d for d in canaries if d in targets.members]
    rest = [d for d in targets.members if d not in canaries]
    command = make_update(archive, url=url, chunk_size=chunk_size,
                          latency_budget_ms=latency_budget_ms, tolerance=tolerance,
                          devices=canaries or targets.devices,
                          groups=() if canaries else targets.groups,
                          allow_downgrade=allow_downgrade)
    if record is not None:
        record.started(command, targets.members, canaries)
    try:
        final = _stages(client, state, archive, private_key, targets, command, canaries, rest,
                        publish=publish, soak_s=soak_s, timeout_s=timeout_s, url=url,
                        chunk_size=chunk_size, keep_chunks=keep_chunks, on_event=on_event,
                        gate=gate, record=record)
    except RolloutError as exc:
        if record is not None:
            record.finished("halted" if getattr(exc, "halted", False) else "failed", str(exc))
        raise
    if record is not None:
        bad = sorted(d for d, doc in final.items() if doc.get("state") not in SUCCEEDED)
        record.finished("failed" if bad else "completed",
                        f"not serving the new version: {', '.join(bad)}" if bad else None)
    return final


def _stages(client, state, archive: Path, private_key, targets: Targets, command, canaries,
            rest, *, publish, soak_s, timeout_s, url, chunk_size, keep_chunks, on_event, gate,
            record) -> dict[str, dict]:
    on_event(f"update {command.update_id}: {command.model}@{command.version}, "
             f"{command.size} bytes, to {len(targets.members)} device(s)")
    if url is None:
        count = publish_chunks(client, command, archive, publish)
        on_event(f"published {count} retained chunks of {chunk_size} bytes")

    def progress() -> dict[str, dict]:
        return state.all_progress(command.update_id)

    chatty = len(targets.members) <= 10  # download percentages only for small rollouts

    def report(device: str, doc: dict) -> None:
        if doc.get("update_id") != command.update_id:
            return
        if doc.get("state") == "downloading" and not chatty and doc.get("percent") != 0:
            return
        percent = f" {doc['percent']}%" if doc.get("state") == "downloading" else ""
        detail = f": {doc['detail']}" if doc.get("detail") else ""
        on_event(f"{device:<20} {doc.get('state')}{percent}{detail}")

    remove_listener = state.on_progress(report)
    try:
        if canaries:
            if gate is not None:
                on_event(f"telemetry gate: baseline of {', '.join(canaries)} over "
                         f"{gate.settings.window_s:g} s")
                gate.baseline(canaries)
            on_event(f"stage 1: canaries {', '.join(canaries)}")
            publish_command(client, command, private_key, publish)
            states = wait_for(progress, canaries, timeout_s)
            confirmed_at = time.time()
            failed = {d: s for d, s in states.items() if d in canaries
                      and s.get("state") in UNSUCCESSFUL}
            if failed:
                raise RolloutError("canary failed, rollout stopped before the rest of the fleet: "
                                   + "; ".join(f"{d} {s.get('state')}: {s.get('detail', '')}"
                                               for d, s in failed.items()))
            if soak_s > 0:
                on_event(f"canaries confirmed; soaking {soak_s:g} s before the rest")
                _soak(state, command, canaries, soak_s)
            if gate is not None:
                _judge(client, state, command, private_key, canaries, rest, confirmed_at,
                       publish=publish, timeout_s=timeout_s, on_event=on_event, gate=gate,
                       record=record)
        if rest:
            if canaries:  # the rest: every group, and the devices named but not canaries
                command = command.model_copy(update={"devices": tuple(
                    d for d in targets.devices if d not in canaries), "groups": targets.groups})
                on_event(f"stage 2: {len(rest)} device(s)")
            publish_command(client, command, private_key, publish)
            wait_for(progress, rest, timeout_s)
        final = progress()
        return {d: final.get(d, {}) for d in targets.members}
    finally:
        remove_listener()
        if not keep_chunks:
            clear_chunks(client, command, publish)


class RolloutHalted(RolloutError):
    """The telemetry gate found a canary worse after the update; the canaries were told
    to roll back."""

    halted = True


def _judge(client, state, command: UpdateCommand, private_key, canaries: list[str],
           rest: list[str], since: float, *, publish, timeout_s, on_event, gate,
           record) -> None:
    on_event(f"telemetry gate: canaries against their baseline and {len(rest)} device(s) "
             f"not updated, over {gate.settings.window_s:g} s after confirming")
    verdict = gate.verdict(canaries, rest, since)
    for check in verdict.checks:
        on_event(check.line())
    if record is not None:
        record.gate(verdict.checks)
    if not verdict.halt:
        on_event(verdict.summary)
        return
    rollback = RollbackCommand(command_id=f"rollback-{command.model}-{secrets.token_hex(3)}",
                               model=command.model, to_version=None, devices=tuple(canaries),
                               groups=())
    on_event(f"{verdict.summary}; rolling the canaries back ({rollback.command_id})")
    publish_command(client, rollback, private_key, publish)
    states = wait_for(lambda: state.all_progress(rollback.command_id), canaries, timeout_s)
    back = ", ".join(f"{d} {s.get('state')}" for d, s in sorted(states.items()))
    raise RolloutHalted(f"{verdict.summary}; canaries: {back}; the rest was never told")


def _soak(state, command: UpdateCommand, canaries: list[str], soak_s: float) -> None:
    """The canaries must stay online, keep the new version and not roll back for soak_s."""
    deadline = time.monotonic() + soak_s
    while time.monotonic() < deadline:
        for device in canaries:
            record = state.device(device)
            status = (record.status if record else None) or {}
            latest = state.progress(device, command.update_id) or {}
            if status.get("state") == "offline":
                raise RolloutError(f"canary {device} went offline during the soak; rollout "
                                   "stopped before the rest of the fleet")
            if latest.get("state") in UNSUCCESSFUL:
                raise RolloutError(f"canary {device} {latest.get('state')} during the soak: "
                                   f"{latest.get('detail', '')}; rollout stopped")
        time.sleep(0.2)

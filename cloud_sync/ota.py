"""Apply signed OTA commands: verify, fetch, check, unpack, prepare, validate, activate.

One worker thread runs one command at a time. Each step is journalled before the next
begins and reported on the progress topic. What serves is decided only by the model
store (one atomic rename), so a crash at any step leaves the last good model serving;
after a restart `start()` reports where the interrupted update stopped.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cloud_sync.command_queue import CommandQueue, Queued, QueueFull
from cloud_sync.commands import (
    OtaState,
    RollbackCommand,
    UpdateCommand,
    command_id,
    command_identity,
    is_older_version,
    parse_command,
)
from cloud_sync.ota_settings import OtaSettings
from cloud_sync.probation import Probation
from cloud_sync.replay import CommandRefused, ReplayGuard
from cloud_sync.signing import TrustedKeys, describe_unverified
from runtime.daemon.model_host import ModelHealth, PipelineState
from runtime.engines import Engine
from runtime.errors import SightlineError, UpdateRejected
from runtime.failpoints import FAILPOINT_ENV, failpoint
from runtime.models.bundle import Bundle, sha256_file, unpack_archive
from runtime.models.store import ModelStore, StoreEvent, read_json, write_json_atomic
from runtime.models.validation import validate_engine

log = logging.getLogger(__name__)
__all__ = ["FAILPOINT_ENV", "OtaSettings", "Updater"]


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()
# Starts of one update before it is given up: a restart before activation resumes it,
# unless the update itself keeps killing the daemon (then the old version serves).
MAX_ATTEMPTS = 3


class _Paused(SightlineError):
    """The daemon is stopping: the update stops between two steps and resumes on restart."""


class Delivery(Protocol):
    def fetch(self, command: UpdateCommand, dest: Path, progress: Callable[[int, int], None],
              stop: threading.Event) -> None: ...


class Host(Protocol):
    def serving(self) -> dict[str, str]: ...

    def open_engine(self, bundle: Bundle) -> Engine: ...

    def fuse(self, bundle: Bundle, engine: Engine, *, strict: bool = True) -> Engine: ...

    def warm_up(self, bundle: Bundle, engine: Engine) -> None: ...

    def swap(self, bundle: Bundle, engine: Engine) -> None: ...

    def health(self, name: str, stall_s: float) -> ModelHealth: ...


class Updater:
    def __init__(self, store: ModelStore, host: Host, trusted: TrustedKeys, *, device_id: str,
                 groups: tuple[str, ...], report: Callable[[dict[str, Any]], None],
                 deliveries: dict[str, Delivery], settings: OtaSettings | None = None) -> None:
        self._store = store
        self._host = host
        self._trusted = trusted
        self._device_id = device_id
        self._groups = groups
        self._report_fn = report
        self._deliveries = deliveries
        self.settings = settings or OtaSettings()
        self._dir = store.root.parent / "ota"
        self._queue = CommandQueue(self._dir / "queue", self.settings.max_queued_commands)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="sightline-ota", daemon=True)
        self._probation: Probation | None = None
        self._attempts: dict[str, int] = {}  # update id -> this start's try (resumed ones)
        self._replay = ReplayGuard(self._dir / "seen.json")
        self.last: dict[str, Any] | None = read_json(self._dir / "last.json")

    # -- lifecycle -------------------------------------------------------------------
    def start(self, boot_events: list[StoreEvent] = ()) -> None:
        """Report what a restart interrupted, resume a probation, then take commands."""
        self._recover(list(boot_events))
        self._thread.start()

    def stop(self) -> None:
        """Stop taking commands and watching probation. A probation in progress is paused,
        not judged: the store marks the stop clean (no crash-loop count) and the next start
        runs the probation again."""
        if self._stop.is_set():
            return  # stopped already (sightline serve stops the agent twice, to be sure)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
            if self._thread.is_alive():
                log.error("the OTA thread is still busy after 10 s; stopping without it")
        if self._probation is not None and not self._thread.is_alive():
            probation = self._probation
            self._store.stopped_cleanly()
            log.info("%s@%s stays active; its probation starts again after the restart",
                     probation.model, probation.version)

    # -- called from the MQTT link's downlink thread ------------------------------------
    def handle_command(self, payload: bytes) -> None:
        """Verify, journal and queue a command; a refused one is reported, never raised.

        Order: size, signature, schema, addressing, age and replay, room in the queue.
        An accepted command is on disk (ota/queue/) before this returns, so before the
        link acknowledges it and before its id counts as seen: a restart runs it."""
        if len(payload) > self.settings.max_command_bytes:
            log.error("OTA command of %d bytes rejected: over ota.max_command_bytes (%d)",
                      len(payload), self.settings.max_command_bytes)
            # Not parsed to find the ids it claims: its size is the problem.
            self._report(None, OtaState.REJECTED, check="oversize",
                         command_sha256=_sha256(payload),
                         detail=f"the command is {len(payload)} bytes, more than "
                                f"ota.max_command_bytes ({self.settings.max_command_bytes}); "
                                "nothing in it was read")
            return
        try:
            document = self._trusted.verify(payload)
        except UpdateRejected as exc:
            self._reject_unverified(payload, "signature", exc)
            return
        try:
            command = parse_command(document)
        except UpdateRejected as exc:
            self._reject_unverified(payload, "schema", exc)
            return
        if not command.addresses(self._device_id, self._groups):
            log.warning("OTA command %s rejected: addressed to devices %s, groups %s; this "
                        "is %s in groups %s", command_id(command), list(command.devices),
                        list(command.groups), self._device_id, list(self._groups))
            # Like a replay, no update_id at the top: the update's real targets own it.
            self._report(None, OtaState.REJECTED, keep_last=True, check="address",
                         command_sha256=_sha256(payload),
                         misaddressed={**command_identity(command),
                                       "devices": list(command.devices),
                                       "groups": list(command.groups)},
                         detail=(f"command {command_id(command)} is signed for devices "
                                 f"{list(command.devices)} and groups {list(command.groups)}; "
                                 f"this device is {self._device_id} in groups "
                                 f"{list(self._groups)}: publish it on its targets' topics"))
            return
        try:
            self._replay.check(command_id(command), command.issued_at,
                               max_age_s=self.settings.max_command_age_s,
                               max_skew_s=self.settings.max_clock_skew_s)
        except CommandRefused as exc:
            log.error("OTA command %s rejected: %s", command_id(command), exc)
            digest = describe_unverified(payload)["command_sha256"]
            if exc.check == "replay":
                # Not a step of that update: without its update_id at the top, whoever
                # follows the update (push, fleet) keeps its real outcome. A staged push
                # re-sends the same update to a group its canaries are in, too.
                self._report(None, OtaState.REJECTED, keep_last=True, detail=str(exc),
                             check=exc.check, command_sha256=digest,
                             replay_of=command_identity(command))
            else:
                self._report(command, OtaState.REJECTED, detail=str(exc), check=exc.check,
                             command_sha256=digest)
            return
        try:
            self._queue.put(command)  # on disk from here: a restart runs it
        except QueueFull as exc:
            # Not remembered: the same command, sent again once there is room, is accepted.
            self._report(command, OtaState.REJECTED, check="queue",
                         command_sha256=_sha256(payload),
                         detail=f"{exc}; send it again once the current update is done")
            return
        self._remember(command)

    def _remember(self, command: UpdateCommand | RollbackCommand) -> None:
        self._replay.remember(command_id(command), command.issued_at, keep_s=(
            self.settings.max_command_age_s + 2 * self.settings.max_clock_skew_s))

    def _reject_unverified(self, payload: bytes, check: str, exc: UpdateRejected) -> None:
        """Report a command refused before it could be trusted, with what it claims."""
        summary = describe_unverified(payload)
        claimed = summary.get("unverified", {})
        claimed_id = claimed.get("update_id") or claimed.get("command_id") or "-"
        log.error("OTA command rejected (unverified id %r, sha256 %s): %s", claimed_id,
                  summary["command_sha256"][:16], exc)
        self._report(None, OtaState.REJECTED, detail=str(exc), check=check, **summary)

    def status_fields(self) -> dict[str, Any]:
        """For the retained status document: what serves, what can be rolled back to."""
        models = {}
        for name, version in self._host.serving().items():
            state = self._store.state(name)
            models[name] = {"version": version,
                            "previous": state.previous if state else None,
                            "probation": bool(state and state.probation)}
        return {"groups": list(self._groups), "models": models, "ota": self.last}

    # -- worker ----------------------------------------------------------------------
    def _main(self) -> None:
        while not self._stop.is_set():
            entry = self._queue.get(timeout=0.25)
            if entry is None:
                self._check_probation()
                continue
            self._run(entry)
            self._check_probation()

    def _run(self, entry: Queued) -> None:
        """Run one command to its end, or to a pause the update journal records; only then
        is it out of the queue's journal (a kill before that runs it again)."""
        command = entry.command
        try:
            if isinstance(command, UpdateCommand):
                self._run_update(command)
            else:
                self._run_rollback(command)
        except Exception as exc:  # the OTA thread must outlive any bug in one update
            log.exception("OTA command %s failed unexpectedly", command_id(command))
            self._report(command, OtaState.FAILED, detail=f"internal error: {exc}")
        self._queue.done(entry)

    def _run_update(self, command: UpdateCommand) -> None:
        serving = self._host.serving()
        if command.model not in serving:
            self._report(command, OtaState.REJECTED, check="model", detail=(
                f"this daemon serves {', '.join(serving)}, not {command.model!r}"))
            return
        if serving[command.model] == command.version:
            self._report(command, OtaState.CURRENT, detail="this version already serves")
            return
        back = self._going_back(command, serving[command.model])
        if back and not command.allow_downgrade:
            self._report(command, OtaState.REJECTED, check="downgrade", detail=(
                f"{command.model}@{command.version} {back}; a downgrade must say so "
                "(allow_downgrade: true, `sightline push --allow-downgrade`), or use a "
                "rollback command"))
            return
        if command.size > self.settings.max_bundle_bytes:
            self._report(command, OtaState.REJECTED, check="size", detail=(
                f"bundle of {command.size} bytes exceeds the limit of "
                f"{self.settings.max_bundle_bytes} (ota.max_bundle_bytes)"))
            return
        if self._probation is not None:  # a newer update supersedes the one on probation
            self._confirm()
        staging = self._store.staging_dir(command.update_id)
        engine: Engine | None = None
        step = OtaState.ACCEPTED
        activated = paused = False
        attempt = self._attempts.get(command.update_id, 1)
        try:
            self._step(command, step, **({"detail": (
                f"resumed after a restart (try {attempt} of {MAX_ATTEMPTS})")}
                if command.update_id in self._attempts else {}))
            step = OtaState.DOWNLOADING
            self._step(command, step, percent=0)
            self._download(command, staging / "bundle.sightline")
            step = OtaState.DOWNLOADED
            self._step(command, step)
            bundle = self._unpack(command, staging)
            step = OtaState.UNPACKED
            self._step(command, step)
            try:
                engine = self._host.open_engine(bundle)
            except Exception as exc:
                raise UpdateRejected(f"the model failed to load on this device: {exc}",
                                     step="prepare") from None
            step = OtaState.PREPARED
            self._step(command, step, detail=f"engine: {engine.provider}")
            tolerance = command.reference
            report = validate_engine(
                bundle, engine, latency_budget_ms=command.latency_budget_ms,
                atol=tolerance.atol if tolerance else None,
                rtol=tolerance.rtol if tolerance else 0.0, runs=self.settings.validation_runs)
            step = OtaState.VALIDATED
            self._step(command, step, detail=f"median latency {report.latency_ms:.2f} ms"
                       + (f", max error {report.max_abs_error:.3g}"
                          if report.max_abs_error is not None else ""))
            engine = self._host.fuse(bundle, engine)  # checked against the reference
            self._host.warm_up(bundle, engine)
            target = self._store.install(bundle.directory, command.model, command.version)
            failpoint("ota:installed")
            self._store.activate(command.model, command.version,  # the commit point
                                 update_id=command.update_id)
            activated = True
            self._host.swap(Bundle(target, bundle.manifest), engine)
            engine = None  # the pipeline owns it now
            self._probation = self._watch(command.model, command.version, command.update_id,
                                          command)
            step = OtaState.ACTIVE
            self._step(command, step, detail=f"serving; probation {self.settings.probation_s:g} s")
        except SightlineError as exc:
            if engine is not None:
                engine.close()
            if self._stop.is_set() and not activated:  # shutting down, not failing
                paused = True
                # a clean stop is not a try that died: the restart gets this try again
                self._write_journal(command, step, attempt - 1)
                log.info("update %s paused at step %s by the shutdown; it resumes after the "
                         "restart", command.update_id, step.value)
                return
            detail = f"{step.value}: {exc}"
            if activated:  # the swap itself failed: the store must not keep the new version
                self._store.rollback(command.model, reason=f"the swap failed: {exc}")
            log.error("update %s failed at %s; %s@%s keeps serving", command.update_id,
                      step.value, command.model, self._host.serving().get(command.model))
            self._report(command, OtaState.FAILED, detail=detail)
            self._clear_journal()
        finally:
            if not paused:  # a paused download resumes from what is on disk
                self._store.clear_staging(command.update_id)

    def _going_back(self, command: UpdateCommand, serving: str) -> str | None:
        """Why this update is a downgrade (None if it is not): an older version than the
        one serving, or one this device already moved on from (good or rejected)."""
        if is_older_version(command.version, serving):
            return f"is older than the serving {serving}"
        state = self._store.state(command.model)
        record = state.record(command.version) if state is not None else None
        if record is not None:
            return (f"was {record.status.value} on this device"
                    + (f" ({record.reason})" if record.reason else ""))
        return None

    def _download(self, command: UpdateCommand, archive: Path) -> None:
        delivery = self._deliveries.get(command.delivery.method)
        if delivery is None:
            raise UpdateRejected(f"delivery {command.delivery.method!r} is not available "
                                 "on this device", step="download")
        reported = [0]
        halfway = [False]

        def progress(done: int, total: int) -> None:
            percent = int(100 * done / total) if total else 100
            if percent >= reported[0] + 10 or percent == 100 and reported[0] != 100:
                reported[0] = percent
                self._report(command, OtaState.DOWNLOADING, percent=percent)
            if percent >= 50 and not halfway[0]:
                halfway[0] = True
                failpoint("ota:downloading")

        delivery.fetch(command, archive, progress, self._stop)
        size = archive.stat().st_size
        if size != command.size:
            raise UpdateRejected(f"downloaded {size} bytes; the signed command says "
                                 f"{command.size} (truncated?)", step="download")
        digest = sha256_file(archive)
        if digest != command.sha256:
            raise UpdateRejected(f"bundle sha256 {digest} does not match the signed "
                                 f"command's {command.sha256}", step="download")

    def _unpack(self, command: UpdateCommand, staging: Path) -> Bundle:
        directory = unpack_archive(staging / "bundle.sightline", unpack_root=staging / "unpacked")
        bundle = Bundle.load(directory)
        if (bundle.name, bundle.version) != (command.model, command.version):
            raise UpdateRejected(f"the bundle is {bundle.name}@{bundle.version}; the command "
                                 f"announced {command.model}@{command.version}", step="unpack")
        return bundle

    def _run_rollback(self, command: RollbackCommand) -> None:
        if self._rolled_back_already(command):
            return
        try:
            previous, target = self._store.rollback(
                command.model, command.to_version,
                reason=f"rolled back by command {command.command_id}")
        except SightlineError as exc:  # "rollback: ", as an update's detail names its step
            self._report(command, OtaState.FAILED, detail=f"rollback: {exc}")
            return
        self._serve_active(command.model)
        detail = f"rolled back from {previous} to {target} by command {command.command_id}"
        self._end_probation(command.model, OtaState.ROLLED_BACK, detail)
        self._report(command, OtaState.ROLLED_BACK, detail=detail, version=target)

    def _rolled_back_already(self, command: RollbackCommand) -> bool:
        """A rollback the daemon died in after the store's rollback: run again, it would go
        back one version too many. Report it done instead (the store's record says so)."""
        state = self._store.state(command.model)
        reason = f"rolled back by command {command.command_id}"
        if state is None or not any(r.reason == reason for r in state.versions):
            return False
        if self._host.serving().get(command.model) != state.active:
            self._serve_active(command.model)
        self._report(command, OtaState.ROLLED_BACK, version=state.active,
                     detail=f"{reason} before the restart; {state.active} serves")
        return True

    def _serve_active(self, model: str) -> None:
        """Load the store's active version and swap it in (after a rollback)."""
        bundle = self._store.active_bundle(model)
        # not strict: a version going back into service is served, fused or not
        engine = self._host.fuse(bundle, self._host.open_engine(bundle), strict=False)
        self._host.warm_up(bundle, engine)
        self._host.swap(bundle, engine)

    # -- probation ---------------------------------------------------------------------
    def _watch(self, model: str, version: str, update_id: str | None,
               command: UpdateCommand | None) -> Probation:
        return Probation(model, version, update_id, command, self._health(model),
                          time.monotonic() + self.settings.probation_s)

    def _health(self, model: str) -> ModelHealth:
        return self._host.health(model, self.settings.probation_stall_s)

    def _check_probation(self) -> None:
        probation = self._probation
        if probation is None or self._stop.is_set():
            return
        model = probation.model
        health = self._health(model)
        if health.state is PipelineState.STOPPED:  # shutting down: judge nothing, confirm nothing
            return
        reason = probation.failure(health, self.settings)
        if reason is not None:
            detail = f"{model}@{probation.version} rolled back during probation: {reason}"
            previous, target = self._store.rollback(model, reason=detail)
            self._serve_active(model)
            detail = f"{model}@{previous} rolled back to {target} during probation: {reason}"
            log.error("%s", detail)
            self._end_probation(model, OtaState.ROLLED_BACK, detail)
        elif probation.served_out(time.monotonic()):
            self._confirm()

    def _confirm(self) -> None:
        probation, self._probation = self._probation, None
        if probation is None:
            return
        self._store.confirm(probation.model)
        self._report(probation.command, OtaState.CONFIRMED,
                     detail=f"healthy for {self.settings.probation_s:g} s", **probation.fields())
        self._clear_journal()

    def _end_probation(self, model: str, state: OtaState, detail: str) -> None:
        probation = self._probation
        if probation is not None and probation.model == model:
            self._probation = None
            self._report(probation.command, state, detail=detail, **probation.fields())
            self._clear_journal()

    # -- restart recovery ------------------------------------------------------------
    def _recover(self, boot_events: list[StoreEvent]) -> None:
        """Report crash-loop rollbacks and interrupted updates; resume every probation the
        store records (the journal, when there is one, says which command it was)."""
        journal = read_json(self._dir / "inflight.json")
        command = parse_command(journal["command"]) if journal is not None else None
        step = journal.get("state", "?") if journal is not None else None
        self._load_queue(command)
        for event in boot_events:
            ours = isinstance(command, UpdateCommand) and command.model == event.model
            self._report(command if ours else None, OtaState.ROLLED_BACK, detail=event.detail,
                         **({} if ours else {"update_id": event.update_id,
                                             "model": event.model,
                                             "version": event.from_version}))
            if ours:
                command = None
                self._clear_journal()
        for model in self._store.models():
            state = self._store.state(model)
            if state is None or state.probation is None or model not in self._host.serving():
                continue
            probation = state.probation
            ours = (isinstance(command, UpdateCommand) and command.model == model
                    and command.version == state.active)
            self._probation = self._watch(model, state.active, probation.update_id,
                                          command if ours else None)
            if ours:
                command = None
            self._report(self._probation.command, OtaState.ACTIVE, detail=(
                f"the daemon restarted while this version was on probation (restart "
                f"{probation.boots} of {self.settings.max_boots} allowed; a clean stop does "
                "not count); probation starts again"), **self._probation.fields())
            break  # one probation at a time: a newer update confirms the older first
        state = self._store.state(command.model) if command is not None else None
        if (isinstance(command, UpdateCommand) and state is not None and step == "active"
                and state.active == command.version and state.probation is None):
            # died between the store's confirm and the journal's removal
            self._report(command, OtaState.CONFIRMED, detail="confirmed before the restart")
            self._clear_journal()
        elif isinstance(command, UpdateCommand) and journal.get("attempt", 1) < MAX_ATTEMPTS:
            # stopped before activation: run it again, from what is on disk
            self._attempts[command.update_id] = journal.get("attempt", 1) + 1
            log.info("update %s was interrupted during step %r; resuming it (try %d of %d)",
                     command.update_id, step, self._attempts[command.update_id], MAX_ATTEMPTS)
            self._queue.resume(command)
            self._store.clear_staging(keep=command.update_id)
            return
        elif command is not None:
            serving = self._host.serving().get(command.model)
            self._report(command, OtaState.INTERRUPTED, detail=(
                f"the daemon stopped during step {step!r} on each of {MAX_ATTEMPTS} tries; "
                f"{command.model}@{serving} serves; push the update again (with a new id) "
                "to retry"))
            self._clear_journal()
        self._store.clear_staging()

    def _load_queue(self, journalled: UpdateCommand | RollbackCommand | None) -> None:
        """Queue the commands accepted before the restart that had not ended. The update
        journal, when there is one, owns its command (resumed or reported from there)."""
        entries = self._queue.recovered
        if journalled is not None:
            self._queue.drop({command_id(journalled)})
        for entry in entries:
            if command_id(entry.command) not in self._replay:  # died before remembering it
                self._remember(entry.command)
        if entries:
            log.info("%d OTA command(s) accepted before the restart are queued again",
                     len(self._queue))

    # -- bookkeeping -----------------------------------------------------------------
    def _step(self, command: UpdateCommand, state: OtaState, **fields: Any) -> None:
        if self._stop.is_set() and state is not OtaState.ACTIVE:
            raise _Paused("the daemon is stopping")
        self._write_journal(command, state, self._attempts.get(command.update_id, 1))
        self._report(command, state, **fields)
        failpoint(f"ota:{state.value}")

    def _write_journal(self, command: UpdateCommand, state: OtaState, attempt: int) -> None:
        write_json_atomic(self._dir / "inflight.json",
                          {"command": command.model_dump(mode="json"), "state": state.value,
                           "attempt": attempt, "ts": time.time()})

    def _clear_journal(self) -> None:
        (self._dir / "inflight.json").unlink(missing_ok=True)

    def _report(self, command: UpdateCommand | RollbackCommand | None, state: OtaState,
                keep_last: bool = False, **fields: Any) -> None:
        """Publish a progress document. `keep_last`: not the new last outcome of the status
        (a replayed command must not hide how the real update ended)."""
        document: dict[str, Any] = {"state": state.value, "ts": round(time.time(), 3)}
        if isinstance(command, UpdateCommand):
            document.update(update_id=command.update_id, model=command.model,
                            version=command.version)
        elif isinstance(command, RollbackCommand):
            document.update(update_id=command.command_id, model=command.model)
        document.update(fields)
        try:
            document["serving"] = self._host.serving()
        except Exception:  # a report must never fail the step it reports
            log.exception("could not read what serves")
        if state is not OtaState.DOWNLOADING or document.get("percent") in (0, 100):
            log.info("OTA %s: %s%s", document.get("update_id") or "(unverified)", state.value,
                     f" ({document['detail']})" if "detail" in document else "")
        if state is not OtaState.DOWNLOADING and not keep_last:
            self.last = {k: v for k, v in document.items() if k != "serving"}
            write_json_atomic(self._dir / "last.json", self.last)
        self._report_fn(document)


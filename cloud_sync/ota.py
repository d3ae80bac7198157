"""Apply signed OTA commands: verify, fetch, check, unpack, prepare, validate, activate.

One worker thread runs one command at a time. Each step is journalled before the next
begins and reported on the progress topic. What serves is decided only by the model
store (one atomic rename), so a crash at any step leaves the last good model serving;
after a restart `start()` reports where the interrupted update stopped.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.commands import OtaState, RollbackCommand, UpdateCommand, parse_command
from cloud_sync.signing import TrustedKeys
from runtime.daemon.model_host import ModelHealth
from runtime.engines import Engine
from runtime.errors import SightlineError, UpdateRejected
from runtime.models.bundle import MAX_UNPACKED_BYTES, Bundle, sha256_file, unpack_archive
from runtime.models.store import ModelStore, StoreEvent, read_json, write_json_atomic
from runtime.models.validation import validate_engine

log = logging.getLogger(__name__)
FAILPOINT_ENV = "SIGHTLINE_FAILPOINT"


class OtaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A new version serves "on probation" this long; errors or restarts meanwhile roll it back.
    probation_s: float = Field(default=60.0, ge=0)
    # Restarts during probation before it is a crash loop (then the previous version serves).
    max_boots: int = Field(default=2, ge=0)
    keep_versions: int = Field(default=3, ge=1)
    max_bundle_bytes: int = Field(default=MAX_UNPACKED_BYTES, gt=0)
    stall_timeout_s: float = Field(default=60.0, gt=0)
    # CA bundle for https:// deliveries from a private CA (default: the system's).
    http_ca_file: Path | None = None
    validation_runs: int = Field(default=5, ge=1)
    # During probation: roll back when at least this many frames failed and they are at
    # least this share of the frames served.
    probation_min_errors: int = Field(default=5, ge=1)
    probation_error_share: float = Field(default=0.2, gt=0, le=1)


class Delivery(Protocol):
    def fetch(self, command: UpdateCommand, dest: Path, progress: Callable[[int, int], None],
              stop: threading.Event) -> None: ...


class Host(Protocol):
    def serving(self) -> dict[str, str]: ...

    def open_engine(self, bundle: Bundle) -> Engine: ...

    def warm_up(self, bundle: Bundle, engine: Engine) -> None: ...

    def swap(self, bundle: Bundle, engine: Engine) -> None: ...

    def health(self, name: str) -> ModelHealth: ...


def failpoint(name: str) -> None:
    """Die here, as by power loss, when SIGHTLINE_FAILPOINT names this point (tests)."""
    if os.environ.get(FAILPOINT_ENV) == name:
        log.warning("failpoint %s: killing this process", name)
        os.kill(os.getpid(), signal.SIGKILL)


class _Probation:
    def __init__(self, command: UpdateCommand, health: ModelHealth, until: float) -> None:
        self.command = command
        self.baseline = health
        self.until = until


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
        self._queue: queue.Queue[UpdateCommand | RollbackCommand] = queue.Queue(maxsize=16)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="sightline-ota", daemon=True)
        self._probation: _Probation | None = None
        self.last: dict[str, Any] | None = read_json(self._dir / "last.json")

    # -- lifecycle -------------------------------------------------------------------
    def start(self, boot_events: list[StoreEvent] = ()) -> None:
        """Report what a restart interrupted, resume a probation, then take commands."""
        self._recover(list(boot_events))
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    # -- called from the MQTT link's downlink thread ------------------------------------
    def handle_command(self, payload: bytes) -> None:
        """Verify and queue a command; a refused one is reported, never raised."""
        try:
            command = parse_command(self._trusted.verify(payload))
        except UpdateRejected as exc:
            log.error("OTA command rejected: %s", exc)
            self._report(None, OtaState.REJECTED, detail=str(exc))
            return
        if not command.addresses(self._device_id, self._groups):
            log.info("OTA command %s is not addressed to this device", _command_id(command))
            return
        if isinstance(command, UpdateCommand) and command.update_id in self._seen():
            log.info("update %s was handled already (a re-sent command)", command.update_id)
            return
        try:
            self._queue.put_nowait(command)
        except queue.Full:
            self._report(command, OtaState.REJECTED, detail="too many commands queued; "
                         "send it again once the current update is done")

    def status_fields(self) -> dict[str, Any]:
        """For the retained status document: what serves, what can be rolled back to."""
        models = {}
        for name, version in self._host.serving().items():
            state = self._store.state(name)
            models[name] = {"version": version,
                            "previous": state.history[-1] if state and state.history else None,
                            "probation": bool(state and state.probation)}
        return {"groups": list(self._groups), "models": models, "ota": self.last}

    # -- worker ----------------------------------------------------------------------
    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                command = self._queue.get(timeout=0.25)
            except queue.Empty:
                self._check_probation()
                continue
            try:
                if isinstance(command, UpdateCommand):
                    self._remember(command.update_id)
                    self._run_update(command)
                else:
                    self._run_rollback(command)
            except Exception as exc:  # the OTA thread must outlive any bug in one update
                log.exception("OTA command %s failed unexpectedly", _command_id(command))
                self._report(command, OtaState.FAILED, detail=f"internal error: {exc}")
            self._check_probation()

    def _run_update(self, command: UpdateCommand) -> None:
        serving = self._host.serving()
        if command.model not in serving:
            self._report(command, OtaState.REJECTED, detail=(
                f"this daemon serves {', '.join(serving)}, not {command.model!r}"))
            return
        if serving[command.model] == command.version:
            self._report(command, OtaState.CURRENT, detail="this version already serves")
            return
        if command.size > self.settings.max_bundle_bytes:
            self._report(command, OtaState.REJECTED, detail=(
                f"bundle of {command.size} bytes exceeds the limit of "
                f"{self.settings.max_bundle_bytes} (ota.max_bundle_bytes)"))
            return
        if self._probation is not None:  # a newer update supersedes the one on probation
            self._confirm()
        staging = self._store.staging_dir(command.update_id)
        engine: Engine | None = None
        step = OtaState.ACCEPTED
        activated = False
        try:
            self._step(command, step)
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
            self._host.warm_up(bundle, engine)
            target = self._store.install(bundle.directory, command.model, command.version)
            failpoint("ota:installed")
            self._store.activate(command.model, command.version)  # the commit point
            activated = True
            self._host.swap(Bundle(target, bundle.manifest), engine)
            engine = None  # the pipeline owns it now
            self._probation = _Probation(command, self._host.health(command.model),
                                         time.monotonic() + self.settings.probation_s)
            step = OtaState.ACTIVE
            self._step(command, step, detail=f"serving; probation {self.settings.probation_s:g} s")
        except SightlineError as exc:
            if engine is not None:
                engine.close()
            detail = f"{step.value}: {exc}"
            if activated:  # the swap itself failed: the store must not keep the new version
                self._store.rollback(command.model)
            log.error("update %s failed at %s; %s@%s keeps serving", command.update_id,
                      step.value, command.model, self._host.serving().get(command.model))
            self._report(command, OtaState.FAILED, detail=detail)
            self._clear_journal()
        finally:
            self._store.clear_staging(command.update_id)

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
        try:
            previous, target = self._store.rollback(command.model, command.to_version)
        except SightlineError as exc:
            self._report(command, OtaState.FAILED, detail=str(exc))
            return
        self._serve_active(command.model)
        detail = f"rolled back from {previous} to {target} by command {command.command_id}"
        self._end_probation(command.model, OtaState.ROLLED_BACK, detail)
        self._report(command, OtaState.ROLLED_BACK, detail=detail, version=target)

    def _serve_active(self, model: str) -> None:
        """Load the store's active version and swap it in (after a rollback)."""
        bundle = self._store.active_bundle(model)
        engine = self._host.open_engine(bundle)
        self._host.warm_up(bundle, engine)
        self._host.swap(bundle, engine)

    # -- probation ---------------------------------------------------------------------
    def _check_probation(self) -> None:
        probation = self._probation
        if probation is None:
            return
        model = probation.command.model
        health = self._host.health(model)
        errors = health.errors - probation.baseline.errors
        frames = errors + health.results - probation.baseline.results
        if not health.healthy or (errors >= self.settings.probation_min_errors
                                  and errors >= self.settings.probation_error_share * frames):
            reason = ("its pipeline stalled" if not health.healthy
                      else f"{errors} of {frames} frames failed")
            previous, target = self._store.rollback(model)
            self._serve_active(model)
            detail = f"{model}@{previous} rolled back to {target} during probation: {reason}"
            log.error("%s", detail)
            self._end_probation(model, OtaState.ROLLED_BACK, detail)
        elif time.monotonic() >= probation.until:
            self._confirm()

    def _confirm(self) -> None:
        probation, self._probation = self._probation, None
        if probation is None:
            return
        self._store.confirm(probation.command.model)
        self._report(probation.command, OtaState.CONFIRMED,
                     detail=f"healthy for {self.settings.probation_s:g} s")
        self._clear_journal()

    def _end_probation(self, model: str, state: OtaState, detail: str) -> None:
        probation = self._probation
        if probation is not None and probation.command.model == model:
            self._probation = None
            self._report(probation.command, state, detail=detail)
            self._clear_journal()

    # -- restart recovery ------------------------------------------------------------
    def _recover(self, boot_events: list[StoreEvent]) -> None:
        journal = read_json(self._dir / "inflight.json")
        rolled_back = {event.model: event for event in boot_events}
        if journal is None:
            for event in boot_events:
                self._report(None, OtaState.ROLLED_BACK, detail=event.detail,
                             model=event.model, version=event.to_version)
            self._store.clear_staging()
            return
        command = parse_command(journal["command"])
        step = journal.get("state", "?")
        state = self._store.state(command.model)
        if command.model in rolled_back:
            self._report(command, OtaState.ROLLED_BACK, detail=rolled_back[command.model].detail)
            self._clear_journal()
        elif (state is not None and state.active == command.version
              and state.probation is not None):
            self._probation = _Probation(command, self._host.health(command.model),
                                         time.monotonic() + self.settings.probation_s)
            self._report(command, OtaState.ACTIVE, detail=(
                f"the daemon restarted while this version was on probation (restart "
                f"{state.probation.boots} of {self.settings.max_boots} allowed); probation "
                "starts again"))
        else:
            serving = self._host.serving().get(command.model)
            self._report(command, OtaState.INTERRUPTED, detail=(
                f"the daemon stopped during step {step!r}; {command.model}@{serving} serves; "
                "push the update again to retry"))
            self._clear_journal()
        self._store.clear_staging()

    # -- bookkeeping -----------------------------------------------------------------
    def _step(self, command: UpdateCommand, state: OtaState, **fields: Any) -> None:
        write_json_atomic(self._dir / "inflight.json",
                          {"command": command.model_dump(mode="json"), "state": state.value,
                           "ts": time.time()})
        self._report(command, state, **fields)
        failpoint(f"ota:{state.value}")

    def _clear_journal(self) -> None:
        (self._dir / "inflight.json").unlink(missing_ok=True)

    def _seen(self) -> list[str]:
        return read_json(self._dir / "seen.json") or []

    def _remember(self, update_id: str) -> None:
        write_json_atomic(self._dir / "seen.json", (self._seen() + [update_id])[-200:])

    def _report(self, command: UpdateCommand | RollbackCommand | None, state: OtaState,
                **fields: Any) -> None:
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
            log.info("OTA %s: %s%s", document.get("update_id", "-"), state.value,
                     f" ({document['detail']})" if "detail" in document else "")
        if state is not OtaState.DOWNLOADING:
            self.last = {k: v for k, v in document.items() if k != "serving"}
            write_json_atomic(self._dir / "last.json", self.last)
        self._report_fn(document)


def _command_id(command: UpdateCommand | RollbackCommand) -> str:
    return command.update_id if isinstance(command, UpdateCommand) else command.command_id

"""The device's installed model versions and which one serves; safe against kill -9.

Layout under the root: `<model>/versions/<version>/` (bundle directories) and
`<model>/state.json` (each version's status: active, good or rejected; the probation).
Every change is a new file renamed over the old one after an fsync, so after a crash at
any instant the state is either the old or the new one, and it always names a complete
bundle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.errors import BundleError, SightlineError
from runtime.failpoints import failpoint
from runtime.models.bundle import MANIFEST_NAME, Bundle

log = logging.getLogger(__name__)
STATE_NAME = "state.json"
MAX_REJECTED = 16  # rejected versions remembered (with their reason) per model


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, document: Any) -> None:
    """Replace `path` with `document` so a crash leaves the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(document, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    failpoint(f"write:{path.name}")
    os.replace(tmp, path)
    failpoint(f"renamed:{path.name}")
    fsync_dir(path.parent)


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class VersionStatus(str, Enum):
    """Where a version stands on this device (docs/mqtt.md §9.4 has the transitions)."""

    ACTIVE = "active"  # serves now; on probation while ModelState.probation names it
    GOOD = "good"  # served and was confirmed (or seeded): what a rollback returns to
    REJECTED = "rejected"  # failed its probation, crash-looped or was rolled back by command


class VersionRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    status: VersionStatus
    since: float  # when it took this status
    reason: str | None = None  # why it was rejected


class Probation(BaseModel):
    """A version activated but not yet confirmed healthy; restarts while it lasts count,
    except a clean stop (a service restart or a reboot is not a crash)."""

    model_config = ConfigDict(extra="forbid")
    version: str
    previous: str
    since: float
    boots: int = 0
    update_id: str | None = None  # the update that activated it, to report its outcome
    stopped_cleanly: bool = False  # the daemon shut down cleanly since the last start


class ModelState(BaseModel):
    """One model's versions as a state machine: exactly one ACTIVE record (`active`), the
    GOOD ones it can roll back to, REJECTED ones with their reason. Records are ordered by
    their last transition, newest last. Transitions are ModelStore methods."""

    model_config = ConfigDict(extra="forbid")
    active: str
    versions: list[VersionRecord] = Field(default_factory=list)
    probation: Probation | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_history(cls, data: Any) -> Any:
        """state.json written before version records: `history` was the good versions."""
        if isinstance(data, dict) and "history" in data:
            data = dict(data)
            history = data.pop("history")
            data.setdefault("versions", [
                *({"version": v, "status": "good", "since": 0.0}
                  for v in history if v != data.get("active")),
                {"version": data.get("active"), "status": "active", "since": 0.0}])
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelState:
        names = [r.version for r in self.versions]
        if len(names) != len(set(names)):
            raise ValueError("a version is recorded twice")
        active = [r.version for r in self.versions if r.status is VersionStatus.ACTIVE]
        if active != [self.active]:
            raise ValueError(f"active is {self.active!r} but the records say {active}")
        if self.probation is not None and (
                self.probation.version != self.active
                or self.probation.previous not in self.good_versions):
            raise ValueError("probation must name the active version and a good previous one")
        return self

    def record(self, version: str) -> VersionRecord | None:
        return next((r for r in self.versions if r.version == version), None)

    @property
    def good_versions(self) -> list[str]:
        """Versions a rollback may return to, oldest first."""
        return [r.version for r in self.versions if r.status is VersionStatus.GOOD]

    @property
    def previous(self) -> str | None:
        """What a rollback without a version returns to: the version that served before
        the one on probation, else the newest good one. Never a rejected version."""
        if self.probation is not None:
            return self.probation.previous
        good = self.good_versions
        return good[-1] if good else None

    def moved(self, version: str, status: VersionStatus, reason: str | None = None,
              now: float | None = None) -> list[VersionRecord]:
        """The records with `version` moved to the end with `status`."""
        record = VersionRecord(version=version, status=status, reason=reason,
                               since=time.time() if now is None else now)
        return [r for r in self.versions if r.version != version] + [record]


class StoreEvent(BaseModel):
    """Something the store did on its own (a crash-loop rollback) that the cloud must hear."""

    model: str
    kind: str  # "rolled_back"
    from_version: str
    to_version: str
    detail: str
    update_id: str | None = None
    ts: float = Field(default_factory=time.time)


class ModelStore:
    def __init__(self, root: Path, *, keep_versions: int = 3, max_boots: int = 2) -> None:
        self.root = Path(root)
        self.keep_versions = keep_versions
        self.max_boots = max_boots  # restarts on probation before it counts as a crash loop
        self.root.mkdir(parents=True, exist_ok=True)

    # -- reading ---------------------------------------------------------------------
    def models(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob(f"*/{STATE_NAME}"))

    def state(self, model: str) -> ModelState | None:
        document = read_json(self._state_path(model))
        return None if document is None else ModelState.model_validate(document)

    def version_dir(self, model: str, version: str) -> Path:
        return self.root / model / "versions" / version

    def has_version(self, model: str, version: str) -> bool:
        return (self.version_dir(model, version) / MANIFEST_NAME).is_file()

    def versions(self, model: str) -> list[str]:
        return sorted(p.name for p in (self.root / model / "versions").glob("*")
                      if (p / MANIFEST_NAME).is_file())

    def active_bundle(self, model: str) -> Bundle:
        state = self.state(model)
        if state is None:
            raise SightlineError(f"model store {self.root} has no model {model!r}")
        return Bundle.load(self.version_dir(model, state.active))

    # -- changing --------------------------------------------------------------------
    def seed(self, bundle: Bundle) -> Bundle:
        """The active version of `bundle.name`, installing `bundle` as it when none is."""
        state = self.state(bundle.name)
        if state is None:
            target = self.version_dir(bundle.name, bundle.version)
            if not self.has_version(bundle.name, bundle.version):
                scratch = f"seed-{bundle.name}-{os.getpid()}"
                staging = self.staging_dir(scratch) / "bundle"
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(bundle.directory, staging)
                self.install(staging, bundle.name, bundle.version)
                self.clear_staging(scratch)
            self._write(bundle.name, ModelState(active=bundle.version, versions=[
                VersionRecord(version=bundle.version, status=VersionStatus.ACTIVE,
                              since=time.time())]))
            log.info("model store: %s@%s installed from %s", bundle.name, bundle.version,
                     bundle.directory)
            return Bundle.load(target)
        return self.active_bundle(bundle.name)

    def install(self, directory: Path, model: str, version: str) -> Path:
        """Move a complete bundle directory (same filesystem) in as `model@version`."""
        target = self.version_dir(model, version)
        state = self.state(model)
        if (state is not None and version in (state.active, *state.good_versions)
                and self.has_version(model, version)):
            shutil.rmtree(directory, ignore_errors=True)
            return target  # already installed; never replace one that serves or may again
        target.parent.mkdir(parents=True, exist_ok=True)
        for path in directory.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if target.exists():  # a leftover or a rejected version: nothing serves from it
            shutil.rmtree(target)
        failpoint("store:install")
        os.replace(directory, target)
        fsync_dir(target.parent)
        return target

    def activate(self, model: str, version: str, update_id: str | None = None) -> ModelState:
        """Make an installed version the active one, on probation until `confirm`.

        active -> good (it served and was confirmed); the new version -> active."""
        if not self.has_version(model, version):
            raise BundleError(f"{model}@{version} is not installed in {self.root}")
        state = self.state(model)
        if state is None:
            new = ModelState(active=version, versions=[
                VersionRecord(version=version, status=VersionStatus.ACTIVE, since=time.time())])
        else:
            if state.probation is not None:
                raise SightlineError(
                    f"{model}@{state.active} is still on probation: confirm it or roll it "
                    f"back before activating {version}")
            if version == state.active:
                raise SightlineError(f"{model}@{version} is already active")
            now = time.time()
            interim = state.model_copy(update={
                "versions": state.moved(state.active, VersionStatus.GOOD, now=now)})
            new = ModelState(active=version,
                             versions=interim.moved(version, VersionStatus.ACTIVE, now=now),
                             probation=Probation(version=version, previous=state.active,
                                                 since=now, update_id=update_id))
        self._write(model, new)
        return new

    def confirm(self, model: str) -> None:
        """End probation: the active version is the new last good one. Prunes old versions."""
        state = self.state(model)
        if state is None or state.probation is None:
            return
        records, keep = self._kept(state)
        self._write(model, state.model_copy(update={"probation": None, "versions": records}))
        for version in self.versions(model):
            if version not in keep:
                failpoint("store:prune")
                shutil.rmtree(self.version_dir(model, version), ignore_errors=True)

    def rollback(self, model: str, to_version: str | None = None,
                 reason: str = "rolled back") -> tuple[str, str]:
        """Serve an earlier version again; returns (from, to).

        active -> rejected (with `reason`); the target -> active, off probation. Without
        `to_version` the target is ModelState.previous, never a rejected version; naming
        one explicitly (an operator's choice) is allowed while it is installed."""
        state = self.state(model)
        if state is None:
            raise SightlineError(f"no model {model!r} to roll back")
        if to_version is None:
            to_version = state.previous
            if to_version is None:
                raise SightlineError(f"{model}@{state.active} has no earlier good version to "
                                     "roll back to")
        if to_version == state.active:
            raise SightlineError(f"{model}@{to_version} is already active")
        if not self.has_version(model, to_version):
            raise SightlineError(f"{model}@{to_version} is not installed (installed: "
                                 f"{', '.join(self.versions(model))})")
        now = time.time()
        interim = state.model_copy(update={"versions": state.moved(
            state.active, VersionStatus.REJECTED, reason=reason, now=now)})
        self._write(model, ModelState(
            active=to_version, versions=interim.moved(to_version, VersionStatus.ACTIVE, now=now)))
        return state.active, to_version

    def stopped_cleanly(self) -> None:
        """The daemon is shutting down cleanly: the next start is no crash-loop restart."""
        for model in self.models():
            state = self.state(model)
            if state is not None and state.probation is not None:
                probation = state.probation.model_copy(update={"stopped_cleanly": True})
                self._write(model, state.model_copy(update={"probation": probation}))

    def on_boot(self) -> list[StoreEvent]:
        """Count this start against versions on probation (a clean stop before it does not
        count); roll back a crash loop."""
        events = []
        for model in self.models():
            state = self.state(model)
            if state is None or state.probation is None:
                continue
            probation = state.probation
            boots = probation.boots + (0 if probation.stopped_cleanly else 1)
            if boots > self.max_boots:
                detail = (f"crash loop: the daemon restarted {boots} times while "
                          f"{model}@{state.active} was on probation")
                failed, previous = self.rollback(model, reason=detail)
                events.append(StoreEvent(model=model, kind="rolled_back", from_version=failed,
                                         to_version=previous, detail=detail,
                                         update_id=probation.update_id))
                log.error("%s", detail)
            else:
                self._write(model, state.model_copy(update={"probation": probation.model_copy(
                    update={"boots": boots, "stopped_cleanly": False})}))
        return events

    def staging_dir(self, name: str) -> Path:
        """A fresh scratch directory on the store's filesystem (renames into it are atomic)."""
        path = self.root / ".staging" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clear_staging(self, name: str | None = None, *, keep: str | None = None) -> None:
        """Remove one scratch directory, or all of them but `keep` (an update to resume)."""
        if name is not None:
            shutil.rmtree(self.root / ".staging" / name, ignore_errors=True)
            return
        for path in (self.root / ".staging").glob("*"):
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)

    # -- internals -------------------------------------------------------------------
    def _state_path(self, model: str) -> Path:
        return self.root / model / STATE_NAME

    def _write(self, model: str, state: ModelState) -> None:
        state = ModelState.model_validate(state.model_dump())  # the invariants, every time
        write_json_atomic(self._state_path(model), state.model_dump(mode="json"))

    def _kept(self, state: ModelState) -> tuple[list[VersionRecord], set[str]]:
        """The records to keep and the versions whose files stay: the active one and the
        newest keep_versions-1 good ones. Rejected versions keep their record (and reason),
        the newest MAX_REJECTED of them, not their files."""
        good = state.good_versions
        keep_good = good[len(good) - (self.keep_versions - 1):] if self.keep_versions > 1 else []
        keep = {state.active, *keep_good}
        rejected = [r.version for r in state.versions if r.status is VersionStatus.REJECTED]
        remembered = keep | set(rejected[-MAX_REJECTED:])
        return [r for r in state.versions if r.version in remembered], keep

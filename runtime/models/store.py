"""The device's installed model versions and which one serves; safe against kill -9.

Layout under the root: `<model>/versions/<version>/` (bundle directories) and
`<model>/state.json` (active version, history, probation). Every change is a new file
renamed over the old one after an fsync, so after a crash at any instant the state is
either the old or the new one, and it always names a complete bundle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runtime.errors import BundleError, SightlineError
from runtime.models.bundle import MANIFEST_NAME, Bundle

log = logging.getLogger(__name__)
STATE_NAME = "state.json"


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
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class Probation(BaseModel):
    """A version activated but not yet confirmed healthy; restarts while it lasts count."""

    model_config = ConfigDict(extra="forbid")
    version: str
    previous: str
    since: float
    boots: int = 0


class ModelState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    active: str
    history: list[str] = Field(default_factory=list)  # versions that served before, newest last
    probation: Probation | None = None


class StoreEvent(BaseModel):
    """Something the store did on its own (a crash-loop rollback) that the cloud must hear."""

    model: str
    kind: str  # "rolled_back"
    from_version: str
    to_version: str
    detail: str
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
            self._write(bundle.name, ModelState(active=bundle.version))
            log.info("model store: %s@%s installed from %s", bundle.name, bundle.version,
                     bundle.directory)
            return Bundle.load(target)
        return self.active_bundle(bundle.name)

    def install(self, directory: Path, model: str, version: str) -> Path:
        """Move a complete bundle directory (same filesystem) in as `model@version`."""
        target = self.version_dir(model, version)
        state = self.state(model)
        if (state is not None and version in (state.active, *state.history)
                and self.has_version(model, version)):
            shutil.rmtree(directory, ignore_errors=True)
            return target  # already installed; never replace one that may serve
        target.parent.mkdir(parents=True, exist_ok=True)
        for path in directory.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if target.exists():  # a leftover that no state names: safe to replace
            shutil.rmtree(target)
        os.replace(directory, target)
        fsync_dir(target.parent)
        return target

    def activate(self, model: str, version: str) -> ModelState:
        """Make an installed version the active one, on probation until `confirm`."""
        if not self.has_version(model, version):
            raise BundleError(f"{model}@{version} is not installed in {self.root}")
        state = self.state(model)
        if state is None:
            new = ModelState(active=version)
        else:
            history = [v for v in state.history if v != state.active] + [state.active]
            new = ModelState(active=version, history=history,
                             probation=Probation(version=version, previous=state.active,
                                                 since=time.time()))
        self._write(model, new)
        return new

    def confirm(self, model: str) -> None:
        """End probation: the active version is the new last good one. Prunes old versions."""
        state = self.state(model)
        if state is None or state.probation is None:
            return
        state.probation = None
        state.history = state.history[-(self.keep_versions - 1):] if self.keep_versions > 1 else []
        self._write(model, state)
        self._prune(model, state)

    def rollback(self, model: str, to_version: str | None = None) -> tuple[str, str]:
        """Serve an earlier version again; returns (from, to)."""
        state = self.state(model)
        if state is None:
            raise SightlineError(f"no model {model!r} to roll back")
        if to_version is None:
            if state.probation is not None:
                to_version = state.probation.previous
            elif state.history:
                to_version = state.history[-1]
            else:
                raise SightlineError(f"{model}@{state.active} has no earlier version to roll "
                                     "back to")
        if to_version == state.active:
            raise SightlineError(f"{model}@{to_version} is already active")
        if not self.has_version(model, to_version):
            raise SightlineError(f"{model}@{to_version} is not installed (installed: "
                                 f"{', '.join(self.versions(model))})")
        history = [v for v in state.history if v not in (to_version, state.active)]
        history.append(state.active)
        self._write(model, ModelState(active=to_version, history=history))
        return state.active, to_version

    def on_boot(self) -> list[StoreEvent]:
        """Count this start against versions on probation; roll back a crash loop."""
        events = []
        for model in self.models():
            state = self.state(model)
            if state is None or state.probation is None:
                continue
            state.probation.boots += 1
            if state.probation.boots > self.max_boots:
                failed, previous = self.rollback(model)
                events.append(StoreEvent(
                    model=model, kind="rolled_back", from_version=failed, to_version=previous,
                    detail=f"crash loop: the daemon restarted {state.probation.boots} times "
                           f"while {model}@{failed} was on probation"))
                log.error("%s", events[-1].detail)
            else:
                self._write(model, state)
        return events

    def staging_dir(self, name: str) -> Path:
        """A fresh scratch directory on the store's filesystem (renames into it are atomic)."""
        path = self.root / ".staging" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clear_staging(self, name: str | None = None) -> None:
        shutil.rmtree(self.root / ".staging" / name if name else self.root / ".staging",
                      ignore_errors=True)

    # -- internals -------------------------------------------------------------------
    def _state_path(self, model: str) -> Path:
        return self.root / model / STATE_NAME

    def _write(self, model: str, state: ModelState) -> None:
        write_json_atomic(self._state_path(model), state.model_dump())

    def _prune(self, model: str, state: ModelState) -> None:
        keep = {state.active, *state.history}
        for version in self.versions(model):
            if version not in keep:
                shutil.rmtree(self.version_dir(model, version), ignore_errors=True)

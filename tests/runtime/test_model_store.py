"""The model store: what serves is one atomic file; probation, crash loops, rollback."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime.errors import SightlineError
from runtime.models.store import ModelStore
from tests.cloud_sync.ota_harness import tiny_bundle


@pytest.fixture
def store(tmp_path) -> ModelStore:
    store = ModelStore(tmp_path / "models", keep_versions=2, max_boots=2)
    store.seed(tiny_bundle(tmp_path / "seed", "1.0"))
    return store


def _install(store: ModelStore, tmp_path, version: str) -> None:
    bundle = tiny_bundle(tmp_path / f"b{version}", version)
    staging = store.staging_dir(f"u{version}") / "bundle"
    shutil.copytree(bundle.directory, staging)
    store.install(staging, "tiny", version)


def test_seed_installs_once_then_the_store_wins(store, tmp_path):
    assert store.state("tiny").active == "1.0"
    _install(store, tmp_path, "2.0")
    store.activate("tiny", "2.0")
    again = store.seed(tiny_bundle(tmp_path / "seed2", "1.0"))
    assert again.version == "2.0"


def test_activate_puts_the_new_version_on_probation_and_confirm_ends_it(store, tmp_path):
    _install(store, tmp_path, "2.0")
    state = store.activate("tiny", "2.0")
    assert state.active == "2.0" and state.probation.previous == "1.0"
    store.confirm("tiny")
    state = store.state("tiny")
    assert state.probation is None and state.history == ["1.0"]
    assert store.active_bundle("tiny").version == "2.0"


def test_restarts_on_probation_roll_back_after_max_boots(store, tmp_path):
    _install(store, tmp_path, "2.0")
    store.activate("tiny", "2.0")
    assert store.on_boot() == [] and store.on_boot() == []
    (event,) = store.on_boot()
    assert (event.from_version, event.to_version) == ("2.0", "1.0")
    assert "crash loop" in event.detail
    assert store.state("tiny").active == "1.0"


def test_rollback_by_command_picks_the_previous_version(store, tmp_path):
    _install(store, tmp_path, "2.0")
    store.activate("tiny", "2.0")
    store.confirm("tiny")
    assert store.rollback("tiny") == ("2.0", "1.0")
    with pytest.raises(SightlineError, match="is not installed"):
        store.rollback("tiny", "9.9")


def test_confirm_prunes_versions_beyond_keep_versions(store, tmp_path):
    for version in ("2.0", "3.0"):
        _install(store, tmp_path, version)
        store.activate("tiny", version)
        store.confirm("tiny")
    assert store.versions("tiny") == ["2.0", "3.0"]  # keep_versions=2: active + one back


def test_a_crash_mid_write_leaves_the_old_state(store, tmp_path):
    """A leftover temp file (the process died before the rename) is ignored."""
    path = store.root / "tiny" / "state.json"
    (path.parent / ".state.json.999.tmp").write_text('{"active": "half')
    assert json.loads(path.read_text())["active"] == "1.0"
    assert store.state("tiny").active == "1.0"


def test_installing_over_a_serving_version_never_replaces_it(store, tmp_path):
    before = (store.version_dir("tiny", "1.0") / "model.onnx").read_bytes()
    other = tiny_bundle(tmp_path / "impostor", "1.0", onnx_bytes=b"x")
    staging = store.staging_dir("again") / "bundle"
    shutil.copytree(other.directory, staging)
    store.install(staging, "tiny", "1.0")
    assert (store.version_dir("tiny", "1.0") / "model.onnx").read_bytes() == before

"""The model store: what serves is one atomic file, and each model's versions are a state
machine (active, good, rejected with a reason). Every transition is tested here, and a
real child process is killed (SIGKILL) at every write of a run through all of them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import SightlineError
from runtime.failpoints import FAILPOINT_ENV
from runtime.models.store import ModelState, ModelStore, VersionStatus
from tests.cloud_sync.ota_harness import tiny_bundle

REPO = Path(__file__).resolve().parents[2]


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


def _update(store: ModelStore, tmp_path, version: str, confirm: bool = True) -> None:
    _install(store, tmp_path, version)
    store.activate("tiny", version, update_id=f"u{version}")
    if confirm:
        store.confirm("tiny")


def _statuses(store: ModelStore) -> dict[str, str]:
    return {r.version: r.status.value for r in store.state("tiny").versions}


def test_seed_installs_once_then_the_store_wins(store, tmp_path):
    assert _statuses(store) == {"1.0": "active"}
    _update(store, tmp_path, "2.0")
    again = store.seed(tiny_bundle(tmp_path / "seed2", "1.0"))
    assert again.version == "2.0"


def test_activate_makes_the_old_version_good_and_puts_the_new_one_on_probation(store, tmp_path):
    _update(store, tmp_path, "2.0", confirm=False)
    state = store.state("tiny")
    assert _statuses(store) == {"1.0": "good", "2.0": "active"}
    assert (state.probation.version, state.probation.previous) == ("2.0", "1.0")
    assert state.probation.update_id == "u2.0" and state.previous == "1.0"


def test_confirm_ends_probation_and_keeps_the_old_version_as_the_rollback_target(
        store, tmp_path):
    _update(store, tmp_path, "2.0")
    state = store.state("tiny")
    assert state.probation is None and _statuses(store) == {"1.0": "good", "2.0": "active"}
    assert state.previous == "1.0" and store.active_bundle("tiny").version == "2.0"


def test_a_rollback_during_probation_rejects_the_new_version_with_its_reason(store, tmp_path):
    # the case: 1.5 -> 1.6 confirmed -> 1.7 rolled back; previous must be 1.5
    _update(store, tmp_path, "2.0")
    _update(store, tmp_path, "3.0", confirm=False)
    assert store.rollback("tiny", reason="its pipeline stalled") == ("3.0", "2.0")
    state = store.state("tiny")
    assert _statuses(store) == {"1.0": "good", "3.0": "rejected", "2.0": "active"}
    assert state.record("3.0").reason == "its pipeline stalled"
    assert state.previous == "1.0" and state.probation is None
    assert store.rollback("tiny") == ("2.0", "1.0")  # "previous" is never the rejected 3.0


def test_rollback_without_a_good_version_fails_and_never_picks_a_rejected_one(store, tmp_path):
    _update(store, tmp_path, "2.0", confirm=False)
    store.rollback("tiny", reason="errors")
    assert store.state("tiny").previous is None
    with pytest.raises(SightlineError, match="no earlier good version"):
        store.rollback("tiny")


def test_rollback_by_command_rejects_the_active_version_and_may_name_any_installed_one(
        store, tmp_path):
    _update(store, tmp_path, "2.0")
    assert store.rollback("tiny", reason="by command rb") == ("2.0", "1.0")
    assert _statuses(store) == {"2.0": "rejected", "1.0": "active"}
    assert store.rollback("tiny", "2.0", reason="operator") == ("1.0", "2.0")  # explicit
    assert _statuses(store) == {"1.0": "rejected", "2.0": "active"}
    with pytest.raises(SightlineError, match="is not installed"):
        store.rollback("tiny", "9.9")


def test_activating_while_a_version_is_on_probation_is_refused(store, tmp_path):
    _update(store, tmp_path, "2.0", confirm=False)
    _install(store, tmp_path, "3.0")
    with pytest.raises(SightlineError, match="still on probation"):
        store.activate("tiny", "3.0")
    assert store.state("tiny").active == "2.0"


def test_restarts_on_probation_roll_back_after_max_boots_with_the_reason(store, tmp_path):
    _update(store, tmp_path, "2.0", confirm=False)
    assert store.on_boot() == [] and store.on_boot() == []
    (event,) = store.on_boot()
    assert (event.from_version, event.to_version, event.update_id) == ("2.0", "1.0", "u2.0")
    assert "crash loop" in event.detail
    state = store.state("tiny")
    assert state.active == "1.0" and state.record("2.0").status is VersionStatus.REJECTED
    assert "crash loop" in state.record("2.0").reason


def test_a_clean_stop_during_probation_does_not_count_as_a_crash_loop_restart(store, tmp_path):
    _update(store, tmp_path, "2.0", confirm=False)
    for _ in range(5):  # five service restarts, none a crash
        store.stopped_cleanly()
        assert store.on_boot() == []
    state = store.state("tiny")
    assert state.active == "2.0" and state.probation.boots == 0
    assert not state.probation.stopped_cleanly


def test_confirm_prunes_files_beyond_keep_versions_and_remembers_rejections(store, tmp_path):
    _update(store, tmp_path, "2.0", confirm=False)
    store.rollback("tiny", reason="errors")  # 2.0 rejected
    for version in ("3.0", "4.0"):
        _update(store, tmp_path, version)
    assert store.versions("tiny") == ["3.0", "4.0"]  # keep_versions=2: active + one back
    assert _statuses(store) == {"2.0": "rejected", "3.0": "good", "4.0": "active"}


def test_state_written_before_version_records_is_read_as_good_history(store):
    path = store.root / "tiny" / "state.json"
    path.write_text(json.dumps({"active": "1.0", "history": ["0.8", "0.9"], "probation": None}))
    state = store.state("tiny")
    assert state.good_versions == ["0.8", "0.9"] and state.previous == "0.9"


def test_a_state_that_breaks_the_invariants_is_refused():
    with pytest.raises(ValueError, match="active is"):
        ModelState.model_validate({"active": "2.0", "versions": [
            {"version": "1.0", "status": "active", "since": 0}]})


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


# -- kill -9 between any two steps -----------------------------------------------------

def _run_child(root: Path, bundles: Path, failpoint: str | None) -> tuple[int, list[dict]]:
    env = {**os.environ}
    env.pop(FAILPOINT_ENV, None)
    if failpoint:
        env[FAILPOINT_ENV] = failpoint
    process = subprocess.run([sys.executable, "-m", "tests.runtime.store_child", str(root),
                              str(bundles)], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=60)
    lines = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    return process.returncode, lines


def _timeless(state: dict | None) -> dict | None:
    """A state without its timestamps (a rerun writes the same transitions, later)."""
    if state is None:
        return None
    state = json.loads(json.dumps(state))
    for record in state["versions"]:
        record.pop("since")
    if state["probation"]:
        state["probation"].pop("since")
    return state


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """The bundles, and the states a run without faults writes, in order."""
    bundles = tmp_path_factory.mktemp("bundles")
    for version in ("1.0", "2.0", "3.0", "4.0", "5.0"):
        tiny_bundle(bundles, version)
    code, lines = _run_child(tmp_path_factory.mktemp("clean") / "models", bundles, None)
    assert code == 0, lines
    written = [None]
    for line in lines:
        state = _timeless(line["state"])
        if state != written[-1]:
            written.append(state)
    assert len(written) == 16, [line["step"] for line in lines]
    return bundles, written


def _kill_points(count: int) -> list[tuple[str, int]]:
    """(failpoint, how many state writes had completed when it fires)."""
    points = []
    for n in range(1, count):
        points += [(f"write:state.json#{n}", n - 1), (f"renamed:state.json#{n}", n)]
    return points


@pytest.mark.parametrize("failpoint, done", _kill_points(16))
def test_sigkill_at_any_state_write_leaves_the_old_or_the_new_state_and_a_whole_bundle(
        scenario, tmp_path, failpoint, done):
    bundles, written = scenario
    root = tmp_path / "models"
    code, _ = _run_child(root, bundles, failpoint)
    assert code == -signal.SIGKILL
    store = ModelStore(root, keep_versions=2, max_boots=2)
    state = store.state("tiny")
    assert _timeless(state.model_dump(mode="json") if state else None) == written[done]
    if state is not None:
        assert store.active_bundle("tiny").version == state.active  # loads: complete files


@pytest.mark.parametrize("failpoint", ["store:install#2", "store:install#4", "store:prune#1"])
def test_sigkill_while_installing_or_pruning_keeps_the_active_bundle_whole(
        scenario, tmp_path, failpoint):
    bundles, written = scenario
    root = tmp_path / "models"
    code, lines = _run_child(root, bundles, failpoint)
    assert code == -signal.SIGKILL
    store = ModelStore(root, keep_versions=2, max_boots=2)
    state = store.state("tiny")
    # installing writes no state; pruning runs after the confirm's write
    expected = written[-1] if failpoint.startswith("store:prune") else _timeless(
        lines[-1]["state"])
    assert _timeless(state.model_dump(mode="json")) == expected
    assert store.active_bundle("tiny").version == state.active

"""A model store driven through every transition, printing the state after each step.

Run by tests/runtime/test_model_store.py, with SIGHTLINE_FAILPOINT set to die (SIGKILL)
at a chosen write; the test then checks what a restart finds. Args: ROOT BUNDLES_DIR.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from runtime.models.bundle import Bundle
from runtime.models.store import ModelStore

MODEL = "tiny"


def main(root: Path, bundles: Path) -> None:
    store = ModelStore(root, keep_versions=2, max_boots=2)

    def show(step: str) -> None:
        state = store.state(MODEL)
        print(json.dumps({"step": step,
                          "state": state.model_dump(mode="json") if state else None}),
              flush=True)

    def install(version: str) -> None:
        staging = store.staging_dir(f"u{version}") / "bundle"
        shutil.copytree(bundles / f"{MODEL}-{version}", staging)
        store.install(staging, MODEL, version)
        show(f"install {version}")

    store.seed(Bundle.load(bundles / f"{MODEL}-1.0"))
    show("seed 1.0")
    install("2.0")
    store.activate(MODEL, "2.0", update_id="u2")
    show("activate 2.0")
    store.on_boot()
    show("boot")
    store.stopped_cleanly()
    show("clean stop")
    store.on_boot()
    show("boot after a clean stop")
    store.confirm(MODEL)
    show("confirm 2.0")
    install("3.0")
    store.activate(MODEL, "3.0", update_id="u3")
    show("activate 3.0")
    store.rollback(MODEL, reason="during probation: 5 of 6 frames failed")
    show("probation rollback")
    install("4.0")
    store.activate(MODEL, "4.0", update_id="u4")
    show("activate 4.0")
    for n in range(3):
        store.on_boot()
        show(f"boot {n + 1}")
    store.rollback(MODEL, "3.0", reason="rolled back by command rb-1")
    show("rollback to 3.0")
    install("5.0")
    store.activate(MODEL, "5.0", update_id="u5")
    show("activate 5.0")
    store.confirm(MODEL)  # prunes 1.0, 2.0 and 4.0
    show("confirm 5.0")
    print("done", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

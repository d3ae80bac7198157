"""`sightline bench` as a user runs it: the floor, both daemons, the stage breakdown."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import SIGHTLINE


def test_bench_prints_the_floor_beside_both_daemons_and_where_the_time_goes(centerface_bundle):
    done = subprocess.run([*SIGHTLINE, "bench", "--model", str(centerface_bundle.directory),
                           "--samples", "5", "--seconds", "0.9"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})  # no wrapped headers
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for row in ("bare engine.infer", "floor", "plain", "curve", "over floor p50",
                "hand-over to the model", "engine", "output decode", "floor, 2 clients",
                "curve, 2 clients"):
        assert row in out, row
    # every daemon path got a breakdown from its reply stamps: no empty cells
    stage_rows = [line for line in out.splitlines() if "preprocess" in line]
    assert stage_rows and "-" not in stage_rows[0].replace("│", " ").split()[1:]

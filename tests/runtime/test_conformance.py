"""`sightline conformance` against a real daemon: every section of docs/protocol.md it
checks passes, in CURVE mode (with the replacement rule) and in plain mode, so a change to
the doc's statements or to the daemon's behaviour without the other fails here."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import SIGHTLINE


@pytest.mark.parametrize("mode", ["curve", "plain"])
def test_the_daemon_keeps_every_statement_the_conformance_check_makes(
        daemon_factory, curve_keys, mode):
    daemon = daemon_factory(curve=curve_keys if mode == "curve" else None)
    keys = (["--server-key", str(curve_keys.daemon_public),
             "--client-key", str(curve_keys.headset_secret)] if mode == "curve" else [])
    done = subprocess.run([*SIGHTLINE, "conformance", daemon.endpoint, *keys],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    sections = [line for line in lines if line.startswith(("PASS", "FAIL"))]
    assert all(line.startswith("PASS") for line in sections), done.stdout
    titles = " ".join(sections)
    for expected in ("§3 framing", "§7.2 error codes", "§6.2 newest wins", "§8",
                     "dropped counts", "bad-request budget"):
        assert expected in titles, done.stdout
    assert ("§7.4 replacement" in titles) == (mode == "curve")

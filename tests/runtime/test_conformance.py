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



def _section(doc: str, heading: str) -> str:
    """The text of `heading`'s section, up to the next heading of its level or above."""
    start = doc.index(heading)
    level = heading.split(" ")[0]
    ends = [doc.find("\n" + "#" * n + " ", start + 1) for n in range(1, len(level) + 1)]
    ends = [e for e in ends if e != -1]
    return doc[start:min(ends)] if ends else doc[start:]


def test_the_stamps_and_error_codes_the_doc_lists_are_the_ones_daemon_and_check_use():
    """A stamp or an error code added to (or dropped from) protocol.md without the daemon
    and the conformance check, or the reverse, fails here."""
    import re
    from pathlib import Path

    from runtime.protocol import STAGES, ErrorCode
    from runtime.tools.conformance import STAMPS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    latency = _section(doc, "## 8. Latency")
    always = re.findall(r"^\| `(\w+)` \| (?:always|daemons since)", latency, re.M)
    assert always == list(STAGES) == list(STAMPS)
    words = {6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
    assert f"has {words[len(STAGES)]} daemon-clock stamps" in latency
    assert f"the {words[len(STAGES)]} stage stamps" in _section(doc, "### 5.1 `result`")
    codes = _section(doc, "### 7.2 Error codes")
    documented = re.findall(r"^\| `([A-Z_]+)` \|", codes, re.M)
    defined = [v for k, v in vars(ErrorCode).items() if k.isupper()]
    assert sorted(documented) == sorted(defined)

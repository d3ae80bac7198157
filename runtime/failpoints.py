"""Test hook: die here, as by power loss, when SIGHTLINE_FAILPOINT names this point.

`SIGHTLINE_FAILPOINT=NAME` kills the process (SIGKILL, no cleanup) the first time it
reaches `failpoint(NAME)`; `NAME#N` the N-th time. Unset in production: one dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

log = logging.getLogger(__name__)
FAILPOINT_ENV = "SIGHTLINE_FAILPOINT"
_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    wanted = os.environ.get(FAILPOINT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] == (int(nth) if nth else 1):
        log.warning("failpoint %s: killing this process", wanted)
        os.kill(os.getpid(), signal.SIGKILL)

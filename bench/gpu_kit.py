"""The GPU kit's vocabulary: a step's outcome, the Skip a check raises, and two helpers the
checks share (bench/gpu_check.py runs them, bench/gpu_engine_checks.py holds the engine ones).
Standard library only: the kit must start on a machine that lacks the project's packages.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
# What `import runtime` and the test suite's conftest need, by module name.
PROJECT_MODULES = ("numpy", "onnx", "onnxruntime", "cv2", "zmq", "msgpack", "click",
                   "pydantic", "rich", "platformdirs", "paho", "prometheus_client", "psutil",
                   "cryptography", "pytest")


@dataclass(frozen=True)
class Step:
    name: str
    status: str  # PASSED | FAILED | SKIPPED
    detail: str


class Skip(Exception):
    """A step that cannot run here; the message is the reason."""


def run_step(name: str, check: Callable[[], str]) -> Step:
    """`check` returns what it verified, raises Skip with a reason, or fails."""
    try:
        return Step(name, PASSED, check())
    except Skip as skip:
        return Step(name, SKIPPED, str(skip))
    except Exception as exc:
        return Step(name, FAILED, f"{type(exc).__name__}: {exc}")


def missing_modules(names: Sequence[str] = PROJECT_MODULES) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def in_thread(name: str, fn: Callable[[], Any], timeout: float = 60) -> Any:
    """Run `fn` on a named thread (as the daemon's infer thread runs engines); its result or
    its exception."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{name} did not finish within {timeout} s")
    if errors:
        raise errors[0]
    return result[0] if result else None

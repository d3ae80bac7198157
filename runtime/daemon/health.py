"""What a model's pipeline reports about itself, for OTA probation (through model_host).

Its own module so that the pipeline, which produces it, and the model host, which hands
it to cloud_sync, both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

STALL_S = 5.0  # a pipeline loop that has not turned for this long is stuck


class PipelineState(str, Enum):
    """What a model's pipeline is doing, as probation needs to tell it apart."""

    SERVING = "serving"  # both threads alive and turning (idle, with no clients, included)
    STALLED = "stalled"  # a thread died, or one call (an engine run) hung for the stall time
    STOPPED = "stopped"  # the daemon is shutting it down: says nothing about the model


@dataclass(frozen=True)
class ModelHealth:
    state: PipelineState
    results: int
    errors: int

    @property
    def healthy(self) -> bool:
        return self.state is PipelineState.SERVING

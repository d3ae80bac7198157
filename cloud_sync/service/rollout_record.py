"""`sightline push --db URL`: the rollout's own record in the fleet service's database.

The operator's side writes what only it knows: who the targets and canaries were, the
telemetry gate's figures, and how the rollout ended and why. The devices' steps come
from their progress messages, which the service records (records.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from cloud_sync.service.database import open_database
from cloud_sync.service.gate import Check
from cloud_sync.service.models import GateCheck, Rollout


class RolloutRecord:
    def __init__(self, db_url: str) -> None:
        # The service migrates; push also does, so that a first `push --db` works alone.
        self._engine, self._sessions = open_database(db_url)
        self.update_id: str | None = None

    def started(self, command, targets: Sequence[str], canaries: Sequence[str]) -> None:
        self.update_id = command.update_id
        with self._sessions() as session:
            rollout = session.get(Rollout, command.update_id) or Rollout(
                update_id=command.update_id, started_at=time.time())
            rollout.model, rollout.version = command.model, command.version
            rollout.state = "running"
            rollout.targets, rollout.canaries = list(targets), list(canaries)
            session.merge(rollout)
            session.commit()

    def gate(self, checks: Sequence[Check]) -> None:
        now = time.time()
        with self._sessions() as session:
            for c in checks:
                session.add(GateCheck(update_id=self.update_id, device_id=c.device_id,
                                      metric=c.metric, before=c.before, after=c.after,
                                      peers=c.peers, samples=c.samples, worse=c.worse,
                                      note=c.note, decided_at=now))
            session.commit()

    def finished(self, state: str, decision: str | None) -> None:
        if self.update_id is None:
            return
        with self._sessions() as session:
            rollout = session.get(Rollout, self.update_id)
            rollout.state, rollout.decision, rollout.ended_at = state, decision, time.time()
            session.commit()

    def close(self) -> None:
        self._engine.dispose()

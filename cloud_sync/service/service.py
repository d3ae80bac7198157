"""The running service: database (migrated), MQTT ingest, HTTP API, retention thread.

`FleetService.start()` brings them up in that order and `stop()` takes them down in
reverse; `sightline cloud serve` runs one until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cloud_sync.operator import OperatorConfig
from cloud_sync.service.api import ApiServer
from cloud_sync.service.database import open_database, redact
from cloud_sync.service.ingest import Ingest, IngestSettings
from cloud_sync.service.metrics import FleetCollector
from cloud_sync.service.retention import Retention, RetentionThread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    db_url: str
    broker: OperatorConfig
    http_host: str = "127.0.0.1"
    http_port: int = 9310
    ingest: IngestSettings = IngestSettings()
    retention: Retention = Retention()
    latency_budgets_ms: dict[str, float] = field(default_factory=dict)


class FleetService:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.engine, self.sessions = open_database(config.db_url)
        self.ingest = Ingest(config.broker, self.sessions, config.ingest)
        self.collector = FleetCollector(self.sessions, config.latency_budgets_ms,
                                        self.ingest.counters)
        self.api = ApiServer(config.http_host, config.http_port, self.sessions, self.collector,
                             health=lambda: self.ingest.connected)
        self.retention = RetentionThread(self.sessions, config.retention)

    def start(self) -> FleetService:
        try:
            self.ingest.start()
        except BaseException:
            self.api.stop()
            self.engine.dispose()
            raise
        self.api.start()
        self.retention.start()
        log.info("fleet service: database %s, broker %s, http://%s:%d", redact(
            self.config.db_url), self.config.broker.address, self.config.http_host,
            self.api.port)
        return self

    def stop(self) -> None:
        self.retention.stop()
        self.api.stop()
        self.ingest.stop()
        self.engine.dispose()

    def __enter__(self) -> FleetService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

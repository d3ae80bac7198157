"""The daemon's cloud side: one MQTT link carrying telemetry and status up, OTA down.

`sightline serve` starts a CloudAgent when the config has a [cloud] table. The agent
owns the link, the telemetry thread and the OTA updater; it reaches the daemon only
through runtime.daemon.model_host (swap, health) and the model store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_sync.commands import TERMINAL, HttpDownload, OtaState, UpdateCommand
from cloud_sync.delivery.http import download_http
from cloud_sync.delivery.mqtt_chunks import MqttChunkDelivery
from cloud_sync.link import Downlink, LinkConfig, MqttLink
from cloud_sync.ota import OtaSettings, Updater
from cloud_sync.signing import TrustedKeys
from cloud_sync.telemetry import TelemetryPublisher
from cloud_sync.topics import Channel
from runtime.errors import ConfigError, describe_validation
from runtime.models.store import ModelStore, StoreEvent

log = logging.getLogger(__name__)
STATUS_STATES = TERMINAL | {OtaState.ACTIVE.value}


class CloudSettings(BaseModel):
    """The [cloud] table of the daemon config (docs/configuration.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Model store, OTA journal and MQTT outbox live here; keep it on persistent storage.
    state_dir: Path
    # Operator public keys (*.ed25519.pub files or directories of them) OTA commands
    # must be signed with. Empty: every update is rejected.
    trusted_keys: tuple[Path, ...] = ()
    telemetry_interval_s: float = Field(default=10.0, gt=0)
    link: dict[str, Any]  # LinkConfig fields; outbox_path defaults to <state_dir>/outbox.db
    ota: OtaSettings = OtaSettings()

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> CloudSettings:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid [cloud] config: {describe_validation(exc, model=cls)}"
                              ) from None

    def link_config(self) -> LinkConfig:
        data = dict(self.link)
        data.setdefault("outbox_path", str(self.state_dir / "outbox.db"))
        return LinkConfig.parse(data)

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"


class HttpDelivery:
    """The http(s) delivery method, as the updater calls it."""

    def __init__(self, ca_file: Path | None = None) -> None:
        self.ca_file = ca_file

    def fetch(self, command: UpdateCommand, dest: Path, progress: Callable[[int, int], None],
              stop: threading.Event) -> None:
        assert isinstance(command.delivery, HttpDownload)
        download_http(command.delivery.url, dest, size=command.size, progress=progress,
                      stop=stop, ca_file=self.ca_file)


class CloudAgent:
    def __init__(self, settings: CloudSettings, store: ModelStore, host,
                 snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self.settings = settings
        link_config = settings.link_config()
        trusted = TrustedKeys.load(settings.trusted_keys)
        if not len(trusted):
            log.warning("no trusted OTA signing keys (cloud.trusted_keys): every update "
                        "will be rejected")
        self.link = MqttLink(link_config, on_downlink=self._on_downlink)
        self._chunks = MqttChunkDelivery(self.link,
                                         stall_timeout_s=settings.ota.stall_timeout_s)
        self.updater = Updater(store, host, trusted, device_id=link_config.device_id,
                               groups=link_config.groups, report=self._report,
                               deliveries={"mqtt": self._chunks,
                                           "http": HttpDelivery(settings.ota.http_ca_file)},
                               settings=settings.ota)
        self.telemetry = TelemetryPublisher(
            snapshot, lambda payload: self.link.publish(Channel.TELEMETRY, payload),
            settings.telemetry_interval_s, device_id=link_config.device_id)

    def start(self, boot_events: list[StoreEvent] = ()) -> CloudAgent:
        self.link.update_status(**self.updater.status_fields())
        self.link.start()
        self.updater.start(list(boot_events))
        self.telemetry.start()
        return self

    def stop(self) -> None:
        self.telemetry.stop()
        self.updater.stop()
        self.link.stop()

    def _on_downlink(self, downlink: Downlink) -> None:
        topic = downlink.topic
        if topic.channel is Channel.OTA_CHUNKS:
            self._chunks.on_chunk(topic.target, topic.index, downlink.payload)
        elif topic.channel is Channel.OTA_COMMAND:
            self.updater.handle_command(downlink.payload)

    def _report(self, document: dict[str, Any]) -> None:
        # The retained status changes when what serves changes or an update ends, not on
        # every step (a cluster replicates each retained message). It goes first, and is
        # acknowledged before the step is reported: whoever saw the step and then a kill -9
        # finds this status, not the one before it.
        if document.get("state") in STATUS_STATES:
            self.link.update_status(**self.updater.status_fields())
            self.link.wait_status_acknowledged(self.link.config.shutdown_timeout_s)
        self.link.publish(Channel.OTA_PROGRESS, document)

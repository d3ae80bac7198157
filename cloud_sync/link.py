"""The device's MQTT link to the cloud: status, telemetry and OTA progress up, OTA down.

Every upward message except status goes through the persistent outbox and leaves it
only when the broker's PUBACK arrives, so a vanished broker or a crash loses nothing.
Status is one retained document per device: "online" on every connect and whenever it
changes, "offline" on a clean stop, and a minimal "offline" by the Last Will (built at
connect time, so it names nothing that can change while connected: docs/mqtt.md §2).
This module does not interpret OTA messages: it hands them to the caller's handler on a
thread of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from cloud_sync.outbox import MessageKind, Outbox, OutboxStats
from cloud_sync.topics import (
    Channel,
    ParsedTopic,
    TopicError,
    device_subscriptions,
    device_topics,
    field_check,
    parse_topic,
    validate_device_id,
    validate_group,
)
from runtime.errors import ConfigError, SightlineError

log = logging.getLogger(__name__)

# CONNACK reason for "this broker does not speak the protocol version you asked for":
# 0x84 from an MQTT 5 broker; paho maps a 3.1.1 broker's return code 1 to the same name.
_UNSUPPORTED_PROTOCOL = "Unsupported protocol version"
_UPWARD_KINDS = {Channel.TELEMETRY: MessageKind.TELEMETRY,
                 Channel.OTA_PROGRESS: MessageKind.PROGRESS}


class LinkError(SightlineError):
    """The cloud link was used wrongly (publish on a downward channel, after stop, ...)."""


class TlsSettings(BaseModel):
    """Broker TLS: the CA that signed the broker's certificate, and this device's own
    certificate and key when the broker authenticates devices by certificate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    # Skips the check that the broker's certificate names the host we dialled. The
    # chain is still verified. For development against a broker on a raw IP only.
    insecure: bool = False

    @model_validator(mode="after")
    def _files(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: give both or neither")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"tls.{name} {str(path)!r} does not exist or is not a file")
        return self


class LinkConfig(BaseModel):
    """Everything the link needs, validated once when the daemon starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    port: int | None = Field(default=None, gt=0, lt=65536)  # None: 8883 with TLS, else 1883
    device_id: str
    groups: tuple[str, ...] = ()
    outbox_path: Path
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsSettings | None = None
    keepalive_s: int = Field(default=30, ge=1, le=65535)
    # "auto": MQTT 5, falling back to 3.1.1 (for this link's lifetime) when the broker
    # answers CONNECT with "unsupported protocol version".
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    client_id: str | None = None  # default: the device id (stable, for the persistent session)
    # MQTT 5: how long the broker keeps our session (subscriptions, queued QoS 1 commands)
    # after we disconnect. 3.1.1 sessions last until the broker's own expiry.
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0, le=0xFFFFFFFF)
    reconnect_min_s: int = Field(default=1, ge=1)
    reconnect_max_s: int = Field(default=60, ge=1)
    # Outbox messages handed to paho before their PUBACK: more is faster replay after an
    # outage, fewer is less re-sent after a crash.
    inflight_window: int = Field(default=16, ge=1, le=1000)
    outbox_max_messages: int = Field(default=10_000, ge=1)
    outbox_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # Downward messages waiting for the handler; also MQTT 5's Receive Maximum, so the
    # broker never has more unacknowledged commands with us than this queue holds.
    downlink_queue: int = Field(default=32, ge=1, le=65535)
    # stop(): how long to wait for the broker to acknowledge the "offline" status.
    shutdown_timeout_s: float = Field(default=2.0, ge=0)

    # TopicError -> ValueError, so pydantic reports it with the field's name.
    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        return field_check(validate_device_id, value)

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return field_check(validate_group, value)

    @model_validator(mode="after")
    def _backoff(self) -> LinkConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @property
    def resolved_port(self) -> int:
        return self.port or (8883 if self.tls else 1883)

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> LinkConfig:
        """Validate a config mapping (a TOML table), turning errors into a ConfigError."""
        from pydantic import ValidationError

        from runtime.errors import describe_validation

        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid [cloud.link] config: "
                              f"{describe_validation(exc, model=cls)}") from None


@dataclass(frozen=True)
class Downlink:
    """A message from the cloud on one of this device's subscriptions."""

    topic: ParsedTopic
    payload: bytes
    retained: bool
    duplicate: bool  # the broker re-sent it (QoS 1): handlers must be idempotent

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass(frozen=True)
class LinkStats:
    connected: bool
    protocol: str | None  # "5" or "3.1.1" once connected
    connects: int
    inflight: int
    downlinks_handled: int
    downlink_handler_errors: int
    outbox: OutboxStats


class _PahoLog(logging.LoggerAdapter):
    """paho's log as `cloud_sync.paho`, less one false alarm: on a clean stop paho's network
    thread can run one more loop on the socket its DISCONNECT just closed and log "Client
    is not connected" at ERROR. Expected then, so DEBUG (journald alerts on ERROR)."""

    def __init__(self, link: MqttLink) -> None:
        super().__init__(logging.getLogger("cloud_sync.paho"), {})
        self._link = link

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if (level >= logging.ERROR and self._link.stopping
                and str(msg).startswith("Client is not connected")):
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)


def _json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


class MqttLink:
    """One device's MQTT session. `start()` once, `stop()` once; not restartable.

    Threads: paho's network thread (`paho-mqtt-client-<client id>`), which runs the
    callbacks; `sightline-mqtt-sender`, which moves outbox messages to paho and deletes
    acknowledged ones; `sightline-mqtt-downlink`, which runs `on_downlink` and only then
    acknowledges the message (so a crash in between means the broker re-sends it).
    """

    def __init__(self, config: LinkConfig,
                 on_downlink: Callable[[Downlink], None] | None = None) -> None:
        self.config = config
        self.topics = device_topics(config.device_id)
        self._on_downlink = on_downlink
        self._outbox = Outbox(config.outbox_path, max_messages=config.outbox_max_messages,
                              max_bytes=config.outbox_max_bytes)
        self._cond = threading.Condition()
        # Everything below is guarded by _cond. paho calls on_publish while holding its
        # own message lock, so nothing here may call into the paho client with _cond held.
        self._client: mqtt.Client | None = None
        self._protocol: MQTTProtocolVersion | None = None
        self._connected = False
        self._connects = 0
        self._failing = False  # connection attempts failing since the last success
        self._fallback_requested = False
        self._stopping = False
        self._started = False
        self._closed = False
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id
        self._early_acks: dict[int, ReasonCode] = {}  # PUBACKs that beat the mid's bookkeeping
        self._status_mids: set[int] = set()
        self._acks: list[tuple[int, ReasonCode]] = []  # (outbox id, reason) to apply
        self._sent_up_to = 0  # outbox ids <= this have been handed to the current client
        self._newest = self._outbox.newest_id()  # wakes the sender when above _sent_up_to
        # After a reconnect paho re-sends its unacknowledged messages itself; new ones
        # wait until those are acknowledged, or they could overtake them.
        self._resync = False
        self._status_details: dict[str, Any] = {}
        self._extra_filters: set[str] = set()  # subscribe(): kept across reconnects
        self._status_version = 0
        self._downlinks_handled = 0
        self._downlink_errors = 0
        self._downlink: queue.Queue = queue.Queue(maxsize=config.downlink_queue)
        self._threads: list[threading.Thread] = []
        self._final_outbox_stats: OutboxStats | None = None  # stats() after stop()

    # -- public interface ------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (retrying with backoff until stop())."""
        with self._cond:
            if self._started:
                raise LinkError("MqttLink.start() was already called; make a new MqttLink")
            self._started = True
        initial = (MQTTProtocolVersion.MQTTv311 if self.config.protocol == "3.1.1"
                   else MQTTProtocolVersion.MQTTv5)
        self._threads = [
            threading.Thread(target=self._sender_main, name="sightline-mqtt-sender",
                             daemon=True),
            threading.Thread(target=self._downlink_main, name="sightline-mqtt-downlink",
                             daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._start_client(initial)

    def stop(self, timeout: float | None = None) -> None:
        """Publish "offline" (retained), disconnect cleanly, join every thread, close the
        outbox. Messages not yet acknowledged stay in the outbox for the next start."""
        timeout = self.config.shutdown_timeout_s if timeout is None else timeout
        if threading.current_thread() in self._threads:
            raise LinkError("stop() was called from the link's own thread (on_downlink?); "
                            "call it from another thread: stop() joins that one")
        with self._cond:
            if self._closed:
                return
            self._closed = self._stopping = True
            started = self._started
            self._cond.notify_all()
        if not started:
            self._final_outbox_stats = self._outbox.stats()
            self._outbox.close()
            return
        # The sender first: after it, nothing replaces the client behind our back.
        sender, downlink = self._threads
        sender.join()
        with self._cond:
            client, connected = self._client, self._connected
        if client is not None:
            if connected:
                info = client.publish(self.topics.status, self._status_document("offline"),
                                      qos=1, retain=True)
                try:
                    info.wait_for_publish(timeout)
                except (RuntimeError, ValueError) as exc:
                    log.warning("offline status not sent (%s); the Last Will will say it", exc)
                if not info.is_published():
                    log.warning("broker did not acknowledge the offline status within %.1f s",
                                timeout)
            # A clean DISCONNECT: the broker discards the Last Will, which is right because
            # the retained status already says offline (or the broker is gone anyway).
            client.disconnect()
            client.loop_stop()
        with self._cond:
            acks, self._acks = self._acks, []
            self._connected = False
        self._apply_acks(acks)  # PUBACKs that came in after the sender stopped
        self._put_downlink(None, force=True)
        downlink.join()
        with self._cond:
            self._final_outbox_stats = self._outbox.stats()
        self._outbox.close()

    def publish(self, channel: Channel, payload: Mapping[str, Any] | bytes) -> int | None:
        """Queue a telemetry or OTA progress message (QoS 1) for sending.

        A mapping is sent as JSON; a "ts" key (Unix seconds) is added when absent, since
        replayed messages arrive late. Returns the outbox id, or None when a full outbox
        dropped this telemetry message. Raises OutboxFull for progress that does not fit.
        """
        kind = _UPWARD_KINDS.get(channel)
        if kind is None:
            raise LinkError(f"cannot publish on {channel.value}: publish() takes "
                            "Channel.TELEMETRY or Channel.OTA_PROGRESS; status is "
                            "set with update_status()")
        if self._closed:
            raise LinkError("the link is stopped; messages can no longer be queued")
        if isinstance(payload, Mapping):
            document = dict(payload)
            document.setdefault("ts", round(time.time(), 3))
            body = _json(document)
        else:
            body = bytes(payload)
        message_id = self._outbox.put(kind, self.topics.up(channel), body)
        if message_id is not None:
            with self._cond:
                self._newest = max(self._newest, message_id)
                self._cond.notify_all()
        return message_id

    def subscribe(self, filters: list[str]) -> None:
        """Add subscriptions (QoS 1) held until `unsubscribe`, restored on every reconnect.

        Retained messages on them (OTA chunks) arrive at once, through `on_downlink`.
        """
        with self._cond:
            self._extra_filters.update(filters)
            client = self._client if self._connected else None
        if client is not None and filters:
            client.subscribe([(topic, 1) for topic in filters])

    def unsubscribe(self, filters: list[str]) -> None:
        with self._cond:
            self._extra_filters.difference_update(filters)
            client = self._client if self._connected else None
        if client is not None and filters:
            client.unsubscribe(list(filters))

    def update_status(self, **details: Any) -> None:
        """Merge fields into the retained status document and publish it if connected.

        Status is "latest value wins", not queued: while disconnected only the newest
        document is kept, and it is published on the next connect.
        """
        with self._cond:
            self._status_details.update(details)
            self._status_version += 1
        self._publish_status("online")

    def wait_status_acknowledged(self, timeout: float) -> bool:
        """Wait until the broker has acknowledged every status published (True), or the
        link is not connected, or `timeout`. The OTA side waits after what serves changed,
        so the retained status says so before the next step (a kill -9 right after it
        leaves the truth on the broker, not the version before)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._status_mids or not self._connected,
                                       timeout) and not self._status_mids

    @property
    def stopping(self) -> bool:
        """stop() has begun: the link is going away on purpose."""
        with self._cond:
            return self._stopping

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected

    @property
    def protocol(self) -> str | None:
        """The MQTT version of the current connection attempt: "5" or "3.1.1"."""
        with self._cond:
            protocol = self._protocol
        if protocol is None:
            return None
        return "5" if protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1"

    def wait_connected(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._connected, timeout)

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every queued message has been acknowledged by the broker."""
        with self._cond:
            return self._cond.wait_for(
                lambda: len(self._outbox) == 0 and not self._inflight and not self._acks,
                timeout)

    def stats(self) -> LinkStats:
        with self._cond:
            return LinkStats(self._connected, self.protocol, self._connects,
                             len(self._inflight), self._downlinks_handled,
                             self._downlink_errors,
                             self._final_outbox_stats or self._outbox.stats())

    def __enter__(self) -> MqttLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- client set-up ---------------------------------------------------------------

    def _start_client(self, protocol: MQTTProtocolVersion) -> None:
        client = self._make_client(protocol)
        with self._cond:
            self._client, self._protocol, self._connected = client, protocol, False
            # A new client has none of the old one's messages: re-send from the outbox.
            self._inflight.clear()
            self._early_acks.clear()
            self._status_mids.clear()
            self._sent_up_to, self._resync = 0, False
        properties = None
        if protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.config.session_expiry_s
            properties.ReceiveMaximum = self.config.downlink_queue
            # clean_start=False on every connect, not only the first: the session must
            # survive process restarts too (QoS 1 commands queued while we were away).
            client.connect_async(self.config.host, self.config.resolved_port,
                                 self.config.keepalive_s, clean_start=False,
                                 properties=properties)
        else:
            client.connect_async(self.config.host, self.config.resolved_port,
                                 self.config.keepalive_s)
        client.loop_start()

    def _make_client(self, protocol: MQTTProtocolVersion) -> mqtt.Client:
        config = self.config
        client_id = config.client_id or config.device_id
        if protocol == MQTTProtocolVersion.MQTTv5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=protocol, manual_ack=True)
        else:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 clean_session=False, protocol=protocol, manual_ack=True)
        client.enable_logger(_PahoLog(self))  # type: ignore[arg-type]
        client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
        # Room for status messages beside the sender's window, so paho never queues ours.
        client.max_inflight_messages_set(config.inflight_window + 8)
        if config.username is not None:
            client.username_pw_set(config.username, config.password.get_secret_value()
                                   if config.password else None)
        if config.tls is not None:
            client.tls_set(ca_certs=str(config.tls.ca_file),
                           certfile=str(config.tls.cert_file) if config.tls.cert_file else None,
                           keyfile=str(config.tls.key_file) if config.tls.key_file else None,
                           cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(config.tls.insecure)
        self._set_will(client, protocol)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _set_will(self, client: mqtt.Client, protocol: MQTTProtocolVersion) -> None:
        properties = None
        if protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.WILLMESSAGE)
            properties.PayloadFormatIndicator = 1
            properties.ContentType = "application/json"
        # Only what cannot change while connected: the broker may publish this hours after
        # the CONNECT, and models, OTA state and outbox figures change meanwhile. What the
        # device served is in the last "online" status, which the Will replaces on the
        # broker: a watcher keeps it (cloud_sync/fleet.py), a late one sees no version.
        client.will_set(self.topics.status, _json({
            "state": "offline", "reason": "connection-lost", "ts": round(time.time(), 3),
            "device_id": self.config.device_id, "groups": list(self.config.groups)}),
            qos=1, retain=True, properties=properties)

    def _status_document(self, state: str, **extra: Any) -> bytes:
        outbox = self._outbox.stats()
        with self._cond:
            details = dict(self._status_details)
        return _json({**details, **extra, "state": state, "ts": round(time.time(), 3),
                      "device_id": self.config.device_id,
                      "outbox": {"queued": outbox.messages,
                                 "dropped_telemetry": outbox.dropped_telemetry,
                                 "rejected_by_broker": outbox.rejected_by_broker}})

    def _publish_status(self, state: str, client: mqtt.Client | None = None) -> None:
        """Publish the status document on `client`, or on the current client if connected."""
        if client is None:
            with self._cond:
                client = self._client if self._connected else None
            if client is None:
                return  # sent on the next connect
        info = client.publish(self.topics.status, self._status_document(state), qos=1,
                              retain=True)
        with self._cond:
            if self._early_acks.pop(info.mid, None) is None:
                self._status_mids.add(info.mid)

    # -- paho callbacks (paho's network thread) --------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if client is not self._client:
            return
        if reason_code.is_failure:
            if (reason_code == _UNSUPPORTED_PROTOCOL and self.config.protocol == "auto"
                    and self._protocol == MQTTProtocolVersion.MQTTv5):
                log.info("broker %s:%d does not support MQTT 5; falling back to 3.1.1",
                         self.config.host, self.config.resolved_port)
                with self._cond:
                    self._fallback_requested = True
                    self._cond.notify_all()
            else:
                log.error("broker %s:%d refused the connection: %s; retrying with backoff",
                          self.config.host, self.config.resolved_port, reason_code)
            return
        log.info("connected to %s:%d (MQTT %s, session present: %s)", self.config.host,
                 self.config.resolved_port, self.protocol, flags.session_present)
        # Subscribing again on every connect is harmless with a kept session and restores
        # the subscriptions when the broker lost it.
        with self._cond:
            extra = sorted(self._extra_filters)
        client.subscribe([(topic, 1) for topic in
                          device_subscriptions(self.config.device_id, self.config.groups)
                          + extra])
        # "online" goes first, before `connected` is visible: nothing (stop()'s "offline",
        # an update_status()) can then overtake it.
        with self._cond:
            version = self._status_version
        self._publish_status("online", client)
        with self._cond:
            self._connected, self._failing = True, False
            self._connects += 1
            self._resync = bool(self._inflight)
            changed = self._status_version != version
            self._cond.notify_all()
        if changed:  # update_status() ran meanwhile and saw us not yet connected
            self._publish_status("online", client)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if client is not self._client:
            return
        # paho calls this from inside its `except OSError` and passes no error; the
        # exception says what is wrong (refused, unreachable, certificate not trusted).
        error = sys.exc_info()[1]
        with self._cond:
            first, self._failing = not self._failing, True
        (log.warning if first else log.debug)(
            "cannot connect to %s:%d: %s; retrying every %d-%d s", self.config.host,
            self.config.resolved_port, error or "connection failed",
            self.config.reconnect_min_s, self.config.reconnect_max_s)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any,
                       flags: mqtt.DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        if client is not self._client:
            return
        with self._cond:
            was_connected, self._connected = self._connected, False
            self._cond.notify_all()
        if was_connected and not self._stopping:
            log.warning("disconnected from %s:%d (%s); messages are kept in the outbox",
                        self.config.host, self.config.resolved_port, reason_code)
        # The Last Will's payload (with its timestamp) is sent in the next CONNECT.
        self._set_will(client, self._protocol or MQTTProtocolVersion.MQTTv5)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if client is not self._client:
            return
        with self._cond:
            message_id = self._inflight.pop(mid, None)
            if message_id is not None:
                self._acks.append((message_id, reason_code))
            elif mid in self._status_mids:
                self._status_mids.discard(mid)
                if reason_code.is_failure:
                    log.error("broker refused the status update: %s", reason_code)
            else:
                self._early_acks[mid] = reason_code
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        try:
            parsed = parse_topic(message.topic)
        except (TopicError, UnicodeDecodeError) as exc:
            log.warning("ignoring a message on an unexpected topic: %s", exc)
            client.ack(message.mid, message.qos)
            return
        downlink = Downlink(parsed, bytes(message.payload), bool(message.retain),
                            bool(message.dup))
        # Not acknowledged here: the downlink thread acks after the handler has run. If
        # the queue stays full until stop(), the broker re-sends the message next session.
        self._put_downlink((client, message.mid, message.qos, downlink))

    # -- threads ---------------------------------------------------------------------

    def _put_downlink(self, item: Any, force: bool = False) -> None:
        while True:
            try:
                self._downlink.put(item, timeout=0.2)
                return
            except queue.Full:
                if self._stopping and not force:
                    return
                if force:  # stop(): make room for the sentinel
                    with contextlib.suppress(queue.Empty):
                        self._downlink.get_nowait()

    def _downlink_main(self) -> None:
        while True:
            item = self._downlink.get()
            if item is None:
                return
            client, mid, qos, downlink = item
            try:
                if self._on_downlink is not None:
                    self._on_downlink(downlink)
            except Exception:
                # Logged with its traceback and counted; the handler (OTA) owns reporting
                # the failure upstream. Acknowledged anyway: a re-send would fail the same way.
                log.exception("downlink handler failed on %s", downlink.topic)
                with self._cond:
                    self._downlink_errors += 1
            else:
                with self._cond:
                    self._downlinks_handled += 1
            client.ack(mid, qos)

    def _sender_main(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(self._sender_has_work, timeout=1.0)
                acks, self._acks = self._acks, []
                fallback, self._fallback_requested = self._fallback_requested, False
                stopping = self._stopping
            self._apply_acks(acks)
            if stopping:
                return
            if fallback:
                self._fall_back_to_v311()
                continue
            self._send_some()

    def _sender_has_work(self) -> bool:
        return (self._stopping or self._fallback_requested or bool(self._acks)
                or (self._can_send() and self._newest > self._sent_up_to))

    def _can_send(self) -> bool:
        return (self._connected and not self._resync
                and len(self._inflight) < self.config.inflight_window)

    def _apply_acks(self, acks: list[tuple[int, ReasonCode]]) -> None:
        if not acks:
            return
        delivered = [message_id for message_id, reason in acks if not reason.is_failure]
        refused = [(message_id, reason) for message_id, reason in acks if reason.is_failure]
        self._outbox.remove(delivered)
        if refused:
            # MQTT 5 brokers say so in the PUBACK (e.g. 0x87 Not authorized by an ACL).
            # Re-sending cannot help, so the message is dropped and counted, loudly.
            for message_id, reason in refused:
                log.error("broker refused outbox message %d: %s; dropped (check the "
                          "broker ACL for %s)", message_id, reason, self.topics.base)
            self._outbox.reject([message_id for message_id, _ in refused])
        with self._cond:
            if self._resync and not self._inflight:
                self._resync = False
            self._cond.notify_all()

    def _send_some(self) -> None:
        with self._cond:
            if not self._can_send():
                return
            client, after = self._client, self._sent_up_to
            room, newest = self.config.inflight_window - len(self._inflight), self._newest
        messages = self._outbox.peek(after, room)
        if not messages:
            with self._cond:  # everything up to `newest` is sent or was dropped
                if self._client is client:
                    self._sent_up_to = max(self._sent_up_to, newest)
            return
        for message in messages:
            info = client.publish(message.topic, message.payload, qos=1, retain=message.retain)
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:  # not kept by paho: try again later
                return
            with self._cond:
                if self._client is not client:
                    return
                self._sent_up_to = message.id
                self._newest = max(self._newest, message.id)
                early = self._early_acks.pop(info.mid, None)
                if early is None:
                    self._inflight[info.mid] = message.id
                else:
                    self._acks.append((message.id, early))

    def _fall_back_to_v311(self) -> None:
        # Runs on the sender thread, which stop() joins before touching the client.
        with self._cond:
            old = self._client
        if old is not None:
            old.disconnect()
            old.loop_stop()
        self._start_client(MQTTProtocolVersion.MQTTv311)

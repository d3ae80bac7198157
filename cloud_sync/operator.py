"""The cloud operator's MQTT session: connect, subscribe, publish JSON and know it arrived.

For the operator's tools (`sightline fleet`, `sightline push`), not for devices: no
outbox, no Last Will, a clean session. It turns every way a connection or a publish can
fail into an `OperatorError` that says what to check, instead of paho's return codes.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from runtime.errors import SightlineError

log = logging.getLogger(__name__)

# CONNACK reason for "this broker does not speak the protocol version you asked for":
# 0x84 from an MQTT 5 broker; paho maps a 3.1.1 broker's return code 1 to the same name.
_UNSUPPORTED_PROTOCOL = "Unsupported protocol version"
# PUBACKs nobody waits for (publishes made around publish_json) must not pile up.
_MAX_UNCLAIMED_ACKS = 1024

MessageHandler = Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]


class OperatorError(SightlineError):
    """The operator's connection to the broker, or a publish on it, failed."""


class OperatorConfig(BaseModel):
    """How the operator reaches the broker; built from CLI flags or a config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int | None = Field(default=None, gt=0, lt=65536)  # None: 8883 with TLS, else 1883
    username: str | None = None
    password: SecretStr | None = None
    tls_ca: Path | None = None  # None with TLS on: the system's trust store
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # None: TLS when any tls_* file is given. True without tls_ca suits a broker with a
    # publicly trusted certificate.
    tls: bool | None = None
    client_id_prefix: str = Field(default="sightline-operator", min_length=1, max_length=40)
    keepalive_s: int = Field(default=30, ge=1, le=65535)

    @model_validator(mode="after")
    def _files(self) -> OperatorConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} does not exist or is not a file")
        if self.tls is False and (self.tls_ca or self.tls_cert):
            raise ValueError("tls is off but tls_ca/tls_cert are given: drop one or the other")
        return self

    @property
    def use_tls(self) -> bool:
        return self.tls if self.tls is not None else bool(self.tls_ca or self.tls_cert)

    @property
    def resolved_port(self) -> int:
        return self.port or (8883 if self.use_tls else 1883)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.resolved_port}"


class _Session:
    """What connect() and publish_json() learn from paho's callbacks (network thread)."""

    def __init__(self, address: str, filters: tuple[str, ...],
                 on_message: MessageHandler | None) -> None:
        self.address = address
        self.filters = filters
        self.on_message = on_message
        self.cond = threading.Condition()
        self.connack: ReasonCode | None = None
        self.closed: str | None = None  # why the connection closed before its CONNACK
        self.suback: list[ReasonCode] | None = None
        self.connected_once = False
        self.acks: dict[int, ReasonCode] = {}

    def on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                   reason_code: ReasonCode, properties: Properties | None) -> None:
        with self.cond:
            self.connack = reason_code
            self.cond.notify_all()
        if reason_code.is_failure:
            return
        if self.connected_once:
            log.info("reconnected to %s", self.address)
        # A clean session forgets subscriptions: make them again on every connect.
        if self.filters:
            client.subscribe([(topic, 1) for topic in self.filters])

    def on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                      reason_code: ReasonCode, properties: Properties | None) -> None:
        with self.cond:
            self.closed = str(reason_code)
            self.cond.notify_all()
            if self.connected_once and reason_code.value != 0:
                log.warning("lost the broker at %s (%s); reconnecting", self.address,
                            reason_code)

    def on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                     reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        with self.cond:
            self.suback = list(reason_codes)
            self.cond.notify_all()
            if not self.connected_once:
                return  # connect() reports it, as an OperatorError
        for topic, code in zip(self.filters, reason_codes, strict=False):
            if code.is_failure:
                log.error("broker refused the subscription to %s after reconnecting: %s",
                          topic, code)

    def on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                   reason_code: ReasonCode, properties: Properties | None) -> None:
        with self.cond:
            if len(self.acks) >= _MAX_UNCLAIMED_ACKS:
                self.acks.pop(next(iter(self.acks)))
            self.acks[mid] = reason_code
            self.cond.notify_all()

    def dispatch(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.on_message is None:
            return
        # An exception escaping a paho callback ends paho's network thread: keep the
        # session alive and say which message broke the handler.
        try:
            self.on_message(client, userdata, message)
        except Exception:
            log.exception("message handler failed on %s", message.topic)


_SESSIONS: weakref.WeakKeyDictionary[mqtt.Client, _Session] = weakref.WeakKeyDictionary()


def connect(config: OperatorConfig, client_id: str, *,
            on_message: MessageHandler | None = None, subscribe: Sequence[str] = (),
            timeout_s: float = 10) -> mqtt.Client:
    """Connect (MQTT 5, else 3.1.1), start paho's loop and wait for the CONNACK.

    `subscribe`: filters subscribed at QoS 1 on every connect; the first SUBACK is waited
    for, so retained messages start arriving at `on_message` right after this returns.
    Raises OperatorError when the broker cannot be reached or refuses us.
    """
    try:
        return _connect(config, client_id, on_message, tuple(subscribe), timeout_s,
                        MQTTProtocolVersion.MQTTv5)
    except _Unsupported:
        log.info("broker %s does not support MQTT 5; using 3.1.1", config.address)
        return _connect(config, client_id, on_message, tuple(subscribe), timeout_s,
                        MQTTProtocolVersion.MQTTv311)


class _Unsupported(Exception):
    """The broker refused MQTT 5: try again with 3.1.1."""


def apply_credentials(client: mqtt.Client, config: OperatorConfig) -> None:
    """The broker's username/password and TLS (client certificate too) on a paho client."""
    if config.username is not None:
        client.username_pw_set(config.username, config.password.get_secret_value()
                               if config.password else None)
    if config.use_tls:
        client.tls_set(ca_certs=str(config.tls_ca) if config.tls_ca else None,
                       certfile=str(config.tls_cert) if config.tls_cert else None,
                       keyfile=str(config.tls_key) if config.tls_key else None,
                       cert_reqs=ssl.CERT_REQUIRED)


def _make_client(config: OperatorConfig, client_id: str,
                 protocol: MQTTProtocolVersion, session: _Session) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    # paho logs at ERROR what we turn into an OperatorError; without logging set up those
    # lines would reach the operator's terminal raw. Its log is for debugging only.
    if log.isEnabledFor(logging.DEBUG):
        client.enable_logger(logging.getLogger("cloud_sync.paho"))
    client.reconnect_delay_set(1, 30)
    apply_credentials(client, config)
    client.on_connect = session.on_connect
    client.on_disconnect = session.on_disconnect
    client.on_subscribe = session.on_subscribe
    client.on_publish = session.on_publish
    client.on_message = session.dispatch
    return client


def _connect(config: OperatorConfig, client_id: str, on_message: MessageHandler | None,
             filters: tuple[str, ...], timeout_s: float,
             protocol: MQTTProtocolVersion) -> mqtt.Client:
    address = config.address
    session = _Session(address, filters, on_message)
    client = _make_client(config, client_id, protocol, session)
    client.connect_timeout = max(timeout_s, 0.1)
    try:
        if protocol == MQTTProtocolVersion.MQTTv5:
            client.connect(config.host, config.resolved_port, config.keepalive_s,
                           clean_start=True)
        else:
            client.connect(config.host, config.resolved_port, config.keepalive_s)
    except ssl.SSLError as exc:
        raise OperatorError(
            f"TLS handshake with the broker at {address} failed: {exc}; check --tls-ca, "
            f"--tls-cert/--tls-key and that the broker's certificate names {config.host}"
        ) from exc
    except (OSError, ValueError) as exc:
        raise OperatorError(f"cannot reach the broker at {address}: {exc}; "
                            "check --broker / is mosquitto running?") from exc
    client.loop_start()
    try:
        with session.cond:
            session.cond.wait_for(lambda: session.connack is not None
                                  or session.closed is not None, timeout_s)
            connack, closed = session.connack, session.closed
        if connack is None:
            reason = (f"the connection closed before the broker answered ({closed})"
                      if closed else f"no answer within {timeout_s:g} s")
            hint = ("check --tls-cert/--tls-key: does the broker require a client certificate?"
                    if config.use_tls else
                    "check --broker (a TLS port needs --tls-ca) / is mosquitto running?")
            raise OperatorError(f"cannot reach the broker at {address}: {reason}; {hint}")
        if connack.is_failure:
            if connack == _UNSUPPORTED_PROTOCOL and protocol == MQTTProtocolVersion.MQTTv5:
                raise _Unsupported
            raise OperatorError(f"broker refused the connection: {connack}; check "
                                "--username/--password or the client certificate")
        if filters:
            _wait_suback(session, address, timeout_s)
    except BaseException:
        _stop(client)
        raise
    with session.cond:
        session.connected_once = True
    _SESSIONS[client] = session
    log.debug("connected to %s as %s (MQTT %s)", address, client_id,
              "5" if protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1")
    return client


def _wait_suback(session: _Session, address: str, timeout_s: float) -> None:
    with session.cond:
        if not session.cond.wait_for(lambda: session.suback is not None, timeout_s):
            raise OperatorError(f"the broker at {address} did not answer our SUBSCRIBE within "
                                f"{timeout_s:g} s")
        suback = session.suback or []
    refused = [f"{topic} ({code})" for topic, code in zip(session.filters, suback, strict=False)
               if code.is_failure]
    if refused:
        raise OperatorError(f"broker refused the subscription to {', '.join(refused)}; "
                            "check the ACL for this user")


def publish_json(client: mqtt.Client, topic: str, payload: Mapping[str, Any],
                 retain: bool = False, timeout_s: float = 10) -> None:
    """Publish `payload` as JSON at QoS 1 and return once the broker acknowledged it.

    Raises OperatorError when no PUBACK comes within `timeout_s`, or when an MQTT 5
    broker refuses the message (reason code >= 0x80, e.g. 0x87 when the ACL denies it;
    a 3.1.1 broker cannot say so and drops it silently).
    """
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    publish_bytes(client, topic, body, retain=retain, timeout_s=timeout_s,
                  content_type="application/json")


def publish_bytes(client: mqtt.Client, topic: str, body: bytes, retain: bool = False,
                  timeout_s: float = 10, content_type: str | None = None) -> None:
    """`publish_json` for a payload that is already bytes (OTA chunks, signed envelopes)."""
    session = _SESSIONS.get(client)
    if session is None:
        raise OperatorError("publishing needs a client made by cloud_sync.operator.connect")
    properties = None
    if client.protocol == MQTTProtocolVersion.MQTTv5 and content_type:
        properties = Properties(PacketTypes.PUBLISH)
        properties.PayloadFormatIndicator = 1
        properties.ContentType = content_type
    try:
        info = client.publish(topic, body, qos=1, retain=retain, properties=properties)
    except ValueError as exc:  # a wildcard in the topic, an oversized payload
        raise OperatorError(f"cannot publish to {topic}: {exc}") from exc
    # NO_CONN: paho keeps the message and sends it when the loop reconnects.
    if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
        raise OperatorError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
    # paho runs on_publish before it marks the message published, possibly before
    # publish() returned here: the ack may already be waiting.
    with session.cond:
        if not session.cond.wait_for(lambda: info.mid in session.acks, timeout_s):
            state = "connected" if client.is_connected() else "the connection is down"
            raise OperatorError(
                f"the broker at {session.address} did not acknowledge the message on {topic} "
                f"within {timeout_s:g} s ({state}); it may still be delivered later")
        reason = session.acks.pop(info.mid)
    if reason.is_failure:
        raise OperatorError(f"broker refused the message on {topic}: {reason}; check the "
                            "ACL lets this user write that topic")


def disconnect(client: mqtt.Client) -> None:
    """Disconnect cleanly and stop paho's network thread."""
    _SESSIONS.pop(client, None)
    _stop(client)


def _stop(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()

"""MQTT -> database: the service's one persistent MQTT 5 session.

Telemetry and OTA progress come through shared subscriptions (`$share/{share}/...`,
docs/mqtt.md §7), so N instances with the same share name split them; status through an
ordinary subscription, so the retained statuses of every device arrive at start-up.
The session is persistent (Clean Start 0, a session expiry) and every message is QoS 1
with a manual PUBACK sent only after the transaction that recorded it committed: a
SIGKILL at any moment leaves the broker holding whatever was not yet recorded, and it
sends it again when the service comes back (the ledger's digests drop the repeats).

One thread owns the database writes (`sightline-cloud-ingest`); paho's thread only hands
messages over through a bounded queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.operator import OperatorConfig, OperatorError, apply_credentials
from cloud_sync.service.records import BatchResult, Delivered, apply_batch
from cloud_sync.topics import Channel, fleet_filter, shared_subscription

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestSettings:
    client_id: str = "sightline-cloud"  # stable: it names the persistent session
    share: str = "sightline-cloud"
    session_expiry_s: int = 7 * 24 * 3600
    receive_maximum: int = 1000  # unacknowledged messages the broker may have with us
    batch_max: int = 500
    batch_wait_s: float = 0.05


@dataclass
class IngestCounters:
    """What the ingest has done since start (the service's own /metrics)."""

    stored: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    ignored: int = 0
    batches: int = 0
    failures: int = 0
    connects: int = 0

    def add(self, result: BatchResult) -> None:
        for channel, count in result.stored.items():
            self.stored[channel] = self.stored.get(channel, 0) + count
        self.duplicates += result.duplicates
        self.ignored += result.ignored
        self.batches += 1


def subscriptions(share: str) -> list[str]:
    return [fleet_filter(Channel.STATUS),
            shared_subscription(share, fleet_filter(Channel.TELEMETRY)),
            shared_subscription(share, fleet_filter(Channel.OTA_PROGRESS))]


class Ingest:
    """Subscribe, record, acknowledge. start() ... stop(), or a context manager."""

    def __init__(self, broker: OperatorConfig, sessions, settings: IngestSettings) -> None:
        self.broker = broker
        self.settings = settings
        self._sessions = sessions
        self.counters = IngestCounters()
        self._queue: queue.Queue[tuple[Delivered, int, int]] = queue.Queue(
            maxsize=settings.receive_maximum * 2)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self._thread: threading.Thread | None = None
        self._client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.settings.client_id,
                             protocol=MQTTProtocolVersion.MQTTv5, manual_ack=True)
        apply_credentials(client, self.broker)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def start(self, timeout_s: float = 10.0) -> Ingest:
        self._thread = threading.Thread(target=self._run, name="sightline-cloud-ingest",
                                        daemon=True)
        self._thread.start()
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.settings.session_expiry_s
        properties.ReceiveMaximum = self.settings.receive_maximum
        try:
            # clean_start False on every connect: the broker keeps what we have not acked.
            self._client.connect(self.broker.host, self.broker.resolved_port,
                                 self.broker.keepalive_s, clean_start=False,
                                 properties=properties)
        except OSError as exc:
            self.stop()
            raise OperatorError(f"cannot reach the broker at {self.broker.address}: {exc}; "
                                "check --broker / is mosquitto running?") from exc
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            refused = self._refused
            self.stop()
            raise OperatorError(refused or f"the broker at {self.broker.address} did not "
                                f"accept our session and subscriptions within {timeout_s:g} s")
        return self

    def stop(self) -> None:
        """Disconnect (the broker keeps the session and queues for us), then finish
        recording what was handed over; what is recorded but not acked is sent again."""
        self._client.disconnect()
        self._client.loop_stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> Ingest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- paho's thread --

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = (f"broker refused the connection: {reason_code}; check "
                             "--username/--password or the client certificate")
            log.error("%s", self._refused)
            return
        self.counters.connects += 1
        self._connected.set()
        log.info("connected to %s as %s (session present: %s)", self.broker.address,
                 self.settings.client_id, flags.session_present)
        # Subscribing again on a present session is harmless, and re-sends retained
        # statuses (duplicates the ledger drops).
        client.subscribe([(topic, 1) for topic in subscriptions(self.settings.share)])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [f"{topic} ({code})" for topic, code in
                   zip(subscriptions(self.settings.share), reason_codes, strict=False)
                   if code.is_failure]
        if refused:
            self._refused = (f"broker refused the subscription to {', '.join(refused)}; "
                             "check the ACL (docs/mqtt.md §6, user ingest) and that the "
                             "broker supports MQTT 5 shared subscriptions")
            log.error("%s", self._refused)
            return
        self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._stop.is_set() and reason_code.value != 0:
            log.warning("lost the broker at %s (%s); reconnecting", self.broker.address,
                        reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        item = Delivered(message.topic, bytes(message.payload), time.time())
        # Blocks paho's thread when the writer is behind: back-pressure to the broker,
        # which holds the rest (Receive Maximum bounds what is in flight).
        self._queue.put((item, message.mid, message.qos))

    # -- the writer thread --

    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.settings.batch_wait_s
            while len(batch) < self.settings.batch_max:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self._record(batch)

    def _record(self, batch: list[tuple[Delivered, int, int]]) -> None:
        while True:
            try:
                with self._sessions() as session:
                    result = apply_batch(session, [item for item, _, _ in batch])
                break
            except Exception:  # the database is down: keep the messages, retry
                self.counters.failures += 1
                log.exception("recording %d messages failed; retrying in 1 s", len(batch))
                if self._stop.wait(1.0):
                    return  # not acked: the broker sends them again next time
        self.counters.add(result)
        for _, mid, qos in batch:
            if qos > 0:
                self._client.ack(mid, qos)

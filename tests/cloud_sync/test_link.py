"""The MQTT link against real mosquitto brokers: status and Last Will, store-and-forward
across broker outages, persistent sessions, downlink dispatch, protocol fallback."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.link import Downlink, LinkConfig, LinkError, MqttLink
from cloud_sync.outbox import MessageKind, Outbox
from cloud_sync.topics import Channel, chunk_topic, device_topics, group_command_topic

DEVICE = "quest-01"
TOPICS = device_topics(DEVICE)


@pytest.fixture
def link_factory(work_dir: Path) -> Iterator:
    """Make MqttLinks on 127.0.0.1 with fast reconnects; all are stopped at the end."""
    links: list[MqttLink] = []

    def factory(port: int, on_downlink=None, **overrides) -> MqttLink:
        settings = dict(host="127.0.0.1", port=port, device_id=DEVICE,
                        outbox_path=work_dir / "outbox.db", reconnect_min_s=1,
                        reconnect_max_s=1, keepalive_s=5, shutdown_timeout_s=2.0)
        settings.update(overrides)
        link = MqttLink(LinkConfig(**settings), on_downlink=on_downlink)
        links.append(link)
        return link

    yield factory
    for link in links:
        link.stop(timeout=0.5)


def status(message) -> dict:
    return json.loads(message.payload)


def seqs(messages) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in messages if m.topic == TOPICS.telemetry]


@pytest.mark.parametrize("protocol, expected", [("auto", "5"), ("3.1.1", "3.1.1")])
def test_connect_publishes_retained_online_status(broker, link_factory, observer_factory,
                                                  protocol, expected):
    early = observer_factory(broker.port, [TOPICS.status])
    link = link_factory(broker.port, protocol=protocol)
    link.start()
    assert link.wait_connected(5)
    assert link.protocol == expected
    early.wait_for(lambda ms: ms)
    # A subscriber arriving later gets the retained document.
    late = observer_factory(broker.port, [TOPICS.status])
    message = late.wait_for(lambda ms: ms)[0]
    assert message.retain
    assert status(message)["state"] == "online"
    assert status(message)["device_id"] == DEVICE
    assert abs(status(message)["ts"] - time.time()) < 10


def test_clean_stop_leaves_retained_offline_status(broker, link_factory, observer_factory):
    link = link_factory(broker.port)
    link.start()
    assert link.wait_connected(5)
    link.stop()
    late = observer_factory(broker.port, [TOPICS.status])
    message = late.wait_for(lambda ms: ms)[0]
    assert message.retain and status(message)["state"] == "offline"
    assert "reason" not in status(message)  # said by the device itself, not its Last Will


def test_a_clean_stop_logs_no_error(broker, link_factory, caplog):
    # paho's network thread can run one more loop on the socket stop() just closed and
    # log "Client is not connected" at ERROR: noise for journald alerting.
    caplog.set_level(logging.DEBUG, logger="cloud_sync")
    link = link_factory(broker.port)
    link.start()
    assert link.wait_connected(5)
    link.publish(Channel.TELEMETRY, {"seq": 1})
    link.stop()
    link._client.loop(0)  # that last loop, made to happen: paho logs it, as in the race
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "cloud_sync.paho"]
    assert any(m.startswith("Client is not connected") for _, m in logged), logged
    assert [m for level, m in logged if level >= logging.ERROR] == []


def test_last_will_marks_device_offline_when_its_process_is_killed(
        broker, child_factory, observer_factory, work_dir):
    cloud = observer_factory(broker.port, [TOPICS.status])
    child = child_factory("link", str(broker.port), DEVICE, str(work_dir / "o.db"), "30")
    child.read_until("connected")
    cloud.wait_for(lambda ms: ms and status(ms[-1])["state"] == "online")
    child.signal(signal.SIGKILL)  # the kernel closes the socket; no DISCONNECT is sent
    messages = cloud.wait_for(lambda ms: status(ms[-1])["state"] == "offline", timeout=5)
    assert status(messages[-1])["reason"] == "connection-lost"
    late = observer_factory(broker.port, [TOPICS.status])
    assert status(late.wait_for(lambda ms: ms)[0])["state"] == "offline"  # retained


def test_last_will_fires_when_device_goes_silent_past_keepalive_then_it_comes_back(
        broker, child_factory, observer_factory, work_dir):
    cloud = observer_factory(broker.port, [TOPICS.status])
    child = child_factory("link", str(broker.port), DEVICE, str(work_dir / "o.db"), "1")
    child.read_until("connected")
    cloud.wait_for(lambda ms: ms and status(ms[-1])["state"] == "online")
    child.signal(signal.SIGSTOP)  # socket open, no pings: a frozen device or a dead network
    started = time.monotonic()
    cloud.wait_for(lambda ms: status(ms[-1])["state"] == "offline", timeout=8)
    # 1.5 x keepalive by the spec; mosquitto 2.0 measured ~3 s for keepalive 1
    assert time.monotonic() - started < 6
    child.signal(signal.SIGCONT)
    child.read_until("reconnected")
    cloud.wait_for(lambda ms: status(ms[-1])["state"] == "online", timeout=6)


def test_messages_published_while_broker_is_down_are_replayed_in_order(
        broker, link_factory, observer_factory):
    cloud = observer_factory(broker.port, [TOPICS.telemetry, TOPICS.ota_progress],
                             client_id="cloud", persistent=True)
    link = link_factory(broker.port)
    link.start()
    assert link.wait_connected(5)
    broker.stop()
    deadline = time.monotonic() + 5
    while link.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not link.connected
    for seq in range(60):
        if seq % 10 == 0:
            link.publish(Channel.OTA_PROGRESS, {"seq": seq, "update": "u1", "percent": seq})
        else:
            link.publish(Channel.TELEMETRY, {"seq": seq})
    assert link.stats().outbox.messages == 60  # stored, not sent
    broker.start()
    messages = cloud.wait_for(lambda ms: len(ms) >= 60, timeout=15)
    assert link.wait_drained(5)
    assert [json.loads(m.payload)["seq"] for m in messages] == list(range(60))
    assert [m.topic for m in messages if json.loads(m.payload)["seq"] % 10 == 0] == \
        [TOPICS.ota_progress] * 6
    assert link.stats().outbox.messages == 0


def test_broker_vanishing_with_messages_in_flight_loses_nothing(broker, link_factory,
                                                                observer_factory):
    cloud = observer_factory(broker.port, [TOPICS.telemetry], client_id="cloud",
                             persistent=True)
    link = link_factory(broker.port, inflight_window=16)
    link.start()
    assert link.wait_connected(5)
    for seq in range(20):
        link.publish(Channel.TELEMETRY, {"seq": seq})
    cloud.wait_for(lambda ms: len(ms) >= 20)
    # Frozen broker: the TCP connection stays up, so the link hands a full window of
    # messages to paho and none is acknowledged.
    broker.process.send_signal(signal.SIGSTOP)
    for seq in range(20, 120):
        link.publish(Channel.TELEMETRY, {"seq": seq})
    deadline = time.monotonic() + 5
    while link.stats().inflight < 16 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert link.stats().inflight == 16
    # Thaw and stop at once: it may read and forward some of the window (and more), and
    # PUBACK some of those, before it goes; the link cannot know which.
    broker.process.send_signal(signal.SIGCONT)
    broker.stop()
    broker.start()
    messages = cloud.wait_for(lambda ms: len(set(seqs(ms))) >= 120, timeout=20)
    assert link.wait_drained(10)
    received = seqs(messages)
    assert list(dict.fromkeys(received)) == list(range(120)), "complete and in order"
    # QoS 1 on two legs: a message may arrive twice only if it was in flight device ->
    # broker (at most the link's window, 16) or broker -> subscriber (at most mosquitto's
    # max_inflight_messages, 20) when the broker went. Seen once: 18 duplicates.
    assert len(received) - 120 <= 16 + 20


def test_messages_left_by_a_previous_run_are_sent_on_start(
        broker, link_factory, observer_factory, work_dir):
    with Outbox(work_dir / "outbox.db") as outbox:
        for seq in range(5):
            outbox.put(MessageKind.TELEMETRY, TOPICS.telemetry, json.dumps({"seq": seq}).encode())
    cloud = observer_factory(broker.port, [TOPICS.telemetry])
    link = link_factory(broker.port)
    link.start()
    assert seqs(cloud.wait_for(lambda ms: len(ms) >= 5)) == [0, 1, 2, 3, 4]
    assert link.wait_drained(5)


def test_outbox_drops_while_offline_are_reported_in_the_online_status(
        broker_factory, link_factory, observer_factory):
    from tests.cloud_sync.conftest import free_port

    port = free_port()  # nothing listens yet
    link = link_factory(port, outbox_max_messages=3)
    link.start()
    for seq in range(5):
        link.publish(Channel.TELEMETRY, {"seq": seq})
    assert link.stats().outbox.dropped_telemetry == 2
    broker = broker_factory(port=port)
    cloud = observer_factory(broker.port, [TOPICS.status, TOPICS.telemetry])
    messages = cloud.wait_for(lambda ms: len(seqs(ms)) >= 3, timeout=10)
    assert seqs(messages) == [2, 3, 4]
    online = [status(m) for m in messages if m.topic == TOPICS.status][0]
    assert online["outbox"]["dropped_telemetry"] == 2


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_persistent_session_delivers_commands_sent_while_device_was_offline(
        broker, link_factory, observer_factory, protocol):
    first = link_factory(broker.port, protocol=protocol, groups=("lab",))
    first.start()
    assert first.wait_connected(5)
    first.stop()
    cloud = observer_factory(broker.port, [])
    cloud.client.publish(TOPICS.ota_command, b'{"update":"u1"}', qos=1).wait_for_publish(5)
    cloud.client.publish(group_command_topic("lab"), b'{"update":"u2"}',
                         qos=1).wait_for_publish(5)
    received: list[Downlink] = []
    got_both = threading.Event()

    def handle(downlink: Downlink) -> None:
        received.append(downlink)
        if len(received) == 2:
            got_both.set()

    second = link_factory(broker.port, protocol=protocol, groups=("lab",), on_downlink=handle)
    second.start()
    assert got_both.wait(10), received
    assert [(d.topic.scope, d.json()["update"]) for d in received] == [("device", "u1"),
                                                                       ("group", "u2")]


def test_downlink_handler_gets_own_and_group_topics_only(broker, link_factory,
                                                         observer_factory):
    received: list[Downlink] = []
    done = threading.Event()

    def handle(downlink: Downlink) -> None:
        received.append(downlink)
        if downlink.payload == b"last":
            done.set()
        if downlink.payload == b"boom":
            raise RuntimeError("handler bug")

    link = link_factory(broker.port, groups=("lab", "eu"), on_downlink=handle)
    link.start()
    assert link.wait_connected(5)
    link.subscribe([chunk_topic("u1", 3)])
    time.sleep(0.2)  # SUBACK
    cloud = observer_factory(broker.port, [])
    for topic, payload in [
        (TOPICS.ota_command, b"boom"),  # the handler raises: logged, counted, acked
        (chunk_topic("u1", 3), b"chunk"),
        (chunk_topic("u1", 4), b"not subscribed"),
        (group_command_topic("eu"), b"eu"),
        (group_command_topic("other"), b"not mine"),
        (device_topics("quest-02").ota_command, b"not mine"),
        (TOPICS.ota_command, b"last"),
    ]:
        cloud.client.publish(topic, payload, qos=1).wait_for_publish(5)
    assert done.wait(5)
    assert [(d.topic.channel, d.topic.target, d.payload) for d in received] == [
        (Channel.OTA_COMMAND, DEVICE, b"boom"),
        (Channel.OTA_CHUNKS, "u1", b"chunk"),
        (Channel.OTA_COMMAND, "eu", b"eu"),
        (Channel.OTA_COMMAND, DEVICE, b"last"),
    ]
    assert (received[1].topic.update_id, received[1].topic.index) == ("u1", 3)
    stats = link.stats()
    assert (stats.downlinks_handled, stats.downlink_handler_errors) == (3, 1)


def test_publish_refuses_downward_channels_and_a_stopped_link(broker, link_factory):
    link = link_factory(broker.port)
    with pytest.raises(LinkError, match="TELEMETRY"):
        link.publish(Channel.OTA_COMMAND, {})
    link.start()
    link.stop()
    with pytest.raises(LinkError, match="stopped"):
        link.publish(Channel.TELEMETRY, {})


def test_link_threads_are_named_and_gone_after_stop(broker, link_factory):
    before = set(threading.enumerate())
    link = link_factory(broker.port)
    link.start()
    assert link.wait_connected(5)
    names = {t.name for t in set(threading.enumerate()) - before}
    assert names == {"sightline-mqtt-sender", "sightline-mqtt-downlink",
                     f"paho-mqtt-client-{DEVICE}"}
    link.stop()
    assert not {t for t in threading.enumerate() if t.name in names}


def test_auto_protocol_falls_back_to_311_when_broker_refuses_v5(fake_v311_broker,
                                                                link_factory):
    link = link_factory(fake_v311_broker.port)
    link.start()
    assert link.wait_connected(5)
    assert link.protocol == "3.1.1"
    assert fake_v311_broker.levels[:2] == [5, 4]
    deadline = time.monotonic() + 5
    while TOPICS.status not in fake_v311_broker.published and time.monotonic() < deadline:
        time.sleep(0.02)
    assert TOPICS.status in fake_v311_broker.published  # "online", on the 3.1.1 session


def test_explicit_protocol_5_never_falls_back(fake_v311_broker, link_factory):
    link = link_factory(fake_v311_broker.port, protocol="5")
    link.start()
    assert not link.wait_connected(1.5)
    assert link.protocol == "5"
    assert set(fake_v311_broker.levels) == {5}


def test_config_errors_name_the_key(work_dir):
    from runtime.errors import ConfigError

    base = {"host": "h", "device_id": "d1", "outbox_path": str(work_dir / "o.db")}
    assert LinkConfig.parse(base).resolved_port == 1883
    with pytest.raises(ConfigError, match="device_id"):
        LinkConfig.parse({**base, "device_id": "d1/+"})
    with pytest.raises(ConfigError, match="groups"):
        LinkConfig.parse({**base, "groups": ["#"]})
    with pytest.raises(ConfigError, match="typo"):
        LinkConfig.parse({**base, "typo": 1})
    ca = work_dir / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigError, match="go together"):
        LinkConfig.parse({**base, "tls": {"ca_file": str(ca), "cert_file": str(ca)}})
    with pytest.raises(ConfigError, match="does not exist"):
        LinkConfig.parse({**base, "tls": {"ca_file": str(work_dir / "missing.pem")}})
    assert LinkConfig.parse({**base, "tls": {"ca_file": str(ca)}}).resolved_port == 8883
    assert "hunter2" not in repr(LinkConfig.parse({**base, "username": "u",
                                                   "password": "hunter2"}))


def test_missing_mosquitto_fails_the_tests_with_what_to_install(monkeypatch):
    from tests.cloud_sync import conftest, mosquitto

    monkeypatch.setattr(mosquitto.shutil, "which", lambda name: None)
    monkeypatch.setattr(mosquitto.os, "access", lambda path, mode: False)
    with pytest.raises(pytest.fail.Exception, match="Debian/Ubuntu package `mosquitto`"):
        conftest.mosquitto_binary()

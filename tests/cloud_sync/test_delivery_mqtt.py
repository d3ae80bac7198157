"""Update chunks over a real broker: retained once, fetched in windows, resumed from disk."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from cloud_sync.commands import MqttChunks, UpdateCommand
from cloud_sync.delivery import DeliveryError
from cloud_sync.delivery.mqtt_chunks import MqttChunkDelivery, chunk_ranges, chunks_on_disk
from cloud_sync.link import LinkConfig, MqttLink
from cloud_sync.topics import Channel, chunk_topic

CHUNK = 1000


class CountingLink:
    """The real link, with a record of what the delivery subscribed to (a spy, not a fake)."""

    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.subscribed: list[str] = []

    def subscribe(self, filters):
        self.subscribed += filters
        self.link.subscribe(filters)

    def unsubscribe(self, filters):
        self.link.unsubscribe(filters)

    @property
    def connected(self) -> bool:
        return self.link.connected


@pytest.fixture
def bundle_bytes() -> bytes:
    return os.urandom(10 * CHUNK + 123)


def _command(data: bytes, update_id: str = "u1") -> UpdateCommand:
    digests = tuple(hashlib.sha256(data[o:o + n]).hexdigest()
                    for o, n in chunk_ranges(len(data), CHUNK))
    return UpdateCommand(update_id=update_id, model="m", version="2", size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), devices=("d1",),
                         delivery=MqttChunks(chunk_size=CHUNK, chunk_sha256=digests))


@pytest.fixture
def link_and_delivery(broker, work_dir: Path):
    holder = {}

    def on_downlink(downlink):
        if downlink.topic.channel is Channel.OTA_CHUNKS:
            holder["delivery"].on_chunk(downlink.topic.target, downlink.topic.index,
                                        downlink.payload)

    link = MqttLink(LinkConfig(host="127.0.0.1", port=broker.port, device_id="d1",
                               outbox_path=work_dir / "outbox.db", reconnect_min_s=1,
                               reconnect_max_s=1), on_downlink=on_downlink)
    spy = CountingLink(link)
    holder["delivery"] = MqttChunkDelivery(spy, window=4, stall_timeout_s=3)
    link.start()
    assert link.wait_connected(5)
    yield spy, holder["delivery"]
    link.stop()


def _publish(observer, command: UpdateCommand, data: bytes, skip=()) -> None:
    for index, (offset, length) in enumerate(chunk_ranges(len(data), CHUNK)):
        if index not in skip:
            observer.client.publish(chunk_topic(command.update_id, index),
                                    data[offset:offset + length], qos=1,
                                    retain=True).wait_for_publish(5)


def test_all_chunks_arrive_in_windows_and_the_file_is_exact(
        broker, observer_factory, link_and_delivery, bundle_bytes, tmp_path):
    spy, delivery = link_and_delivery
    command = _command(bundle_bytes)
    _publish(observer_factory(broker.port, []), command, bundle_bytes)
    seen = []
    delivery.fetch(command, tmp_path / "b", lambda done, total: seen.append(done),
                   threading.Event())
    assert (tmp_path / "b").read_bytes() == bundle_bytes
    assert seen[-1] == len(bundle_bytes) and seen == sorted(seen)


def test_resume_fetches_only_the_chunks_missing_on_disk(
        broker, observer_factory, link_and_delivery, bundle_bytes, tmp_path):
    spy, delivery = link_and_delivery
    command = _command(bundle_bytes)
    _publish(observer_factory(broker.port, []), command, bundle_bytes)
    partial = bytearray(len(bundle_bytes))
    partial[:6 * CHUNK] = bundle_bytes[:6 * CHUNK]  # as left by a killed process
    (tmp_path / "b").write_bytes(bytes(partial))
    assert chunks_on_disk(tmp_path / "b", command.delivery, command.size) == set(range(6))
    delivery.fetch(command, tmp_path / "b", lambda *_: None, threading.Event())
    assert (tmp_path / "b").read_bytes() == bundle_bytes
    assert sorted(int(t.rsplit("/", 1)[1]) for t in spy.subscribed) == [6, 7, 8, 9, 10]


def test_a_chunk_that_never_comes_is_a_stall_error_not_a_hang(
        broker, observer_factory, link_and_delivery, bundle_bytes, tmp_path):
    _, delivery = link_and_delivery
    command = _command(bundle_bytes)
    _publish(observer_factory(broker.port, []), command, bundle_bytes, skip={3})
    with pytest.raises(DeliveryError, match="no chunk of u1 arrived for 3 s .10 of 11"):
        delivery.fetch(command, tmp_path / "b", lambda *_: None, threading.Event())


def test_a_corrupt_retained_chunk_fails_after_retries(
        broker, observer_factory, link_and_delivery, bundle_bytes, tmp_path):
    _, delivery = link_and_delivery
    command = _command(bundle_bytes)
    observer = observer_factory(broker.port, [])
    _publish(observer, command, bundle_bytes, skip={2})
    observer.client.publish(chunk_topic("u1", 2), b"x" * CHUNK, qos=1,
                            retain=True).wait_for_publish(5)
    with pytest.raises(DeliveryError, match="chunk 2 of 11 .* does not match its sha256"):
        delivery.fetch(command, tmp_path / "b", lambda *_: None, threading.Event())

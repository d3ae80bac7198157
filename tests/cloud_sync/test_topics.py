"""The topic tree: one builder, strict ids, parse(build(x)) == x."""

from __future__ import annotations

import pytest

from cloud_sync.topics import (
    Channel,
    ParsedTopic,
    TopicError,
    chunk_topic,
    chunks_filter,
    device_subscriptions,
    device_topics,
    fleet_filter,
    group_command_topic,
    parse_topic,
    shared_subscription,
)


def test_device_topics_follow_the_documented_tree():
    topics = device_topics("quest-01")
    assert topics.status == "sightline/v1/devices/quest-01/status"
    assert topics.telemetry == "sightline/v1/devices/quest-01/telemetry"
    assert topics.ota_command == "sightline/v1/devices/quest-01/ota/command"
    assert topics.ota_progress == "sightline/v1/devices/quest-01/ota/progress"
    assert chunk_topic("u-7", 12) == "sightline/v1/updates/u-7/chunks/12"
    assert chunks_filter("u-7") == "sightline/v1/updates/u-7/chunks/+"
    assert group_command_topic("lab.eu") == "sightline/v1/groups/lab.eu/ota/command"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "dev+", "dev#", "$SYS", "-lead",
                                 "with space", "x" * 65, "dé", "a\x00b"])
def test_ids_that_could_widen_a_topic_or_acl_are_refused(bad):
    with pytest.raises(TopicError, match="not valid"):
        device_topics(bad)
    with pytest.raises(TopicError):
        group_command_topic(bad)
    with pytest.raises(TopicError):
        chunk_topic(bad, 0)


@pytest.mark.parametrize("index", [-1, 1_000_000, 1.0, "3"])
def test_chunk_indices_outside_the_range_are_refused(index):
    with pytest.raises(TopicError, match="out of range"):
        chunk_topic("u1", index)


@pytest.mark.parametrize("topic, parsed", [
    ("sightline/v1/devices/d1/status", ParsedTopic("device", "d1", Channel.STATUS)),
    ("sightline/v1/devices/d1/telemetry", ParsedTopic("device", "d1", Channel.TELEMETRY)),
    ("sightline/v1/devices/d1/ota/command", ParsedTopic("device", "d1", Channel.OTA_COMMAND)),
    ("sightline/v1/devices/d1/ota/progress",
     ParsedTopic("device", "d1", Channel.OTA_PROGRESS)),
    ("sightline/v1/updates/u1/chunks/0", ParsedTopic("update", "u1", Channel.OTA_CHUNKS, 0)),
    ("sightline/v1/updates/u1/chunks/27", ParsedTopic("update", "u1", Channel.OTA_CHUNKS, 27)),
    ("sightline/v1/groups/g1/ota/command", ParsedTopic("group", "g1", Channel.OTA_COMMAND)),
])
def test_parse_takes_apart_what_the_builders_make(topic, parsed):
    assert parse_topic(topic) == parsed


@pytest.mark.parametrize("topic", [
    "sightline/v1/devices/d1", "sightline/v1/devices/d1/nope", "sightline/v2/devices/d1/status",
    "sightline/v1/devices/+/status", "sightline/v1/devices/d1/ota/chunks/u1",
    "sightline/v1/updates/u1/chunks/", "sightline/v1/updates/u1/chunks/01",
    "sightline/v1/updates/u1/chunks/-1", "sightline/v1/updates/u1/chunks/a",
    "sightline/v1/updates/u1/chunks/1/2", "sightline/v1/updates/+/chunks/1",
    "sightline/v1/groups/g1/telemetry",
    "sightline/v1/devices/d1/status/extra", "other/topic",
])
def test_parse_refuses_topics_outside_the_tree(topic):
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_device_subscribes_to_its_own_downward_topics_and_its_groups():
    assert device_subscriptions("d1", ("g1", "g2")) == [
        "sightline/v1/devices/d1/ota/command",
        "sightline/v1/groups/g1/ota/command",
        "sightline/v1/groups/g2/ota/command",
    ]


def test_a_device_cannot_name_a_downward_channel_as_its_upward_topic():
    with pytest.raises(TopicError, match="downward"):
        device_topics("d1").up(Channel.OTA_COMMAND)


def test_cloud_side_filters_and_shared_subscriptions():
    assert fleet_filter(Channel.TELEMETRY) == "sightline/v1/devices/+/telemetry"
    with pytest.raises(TopicError, match="chunks_filter"):
        fleet_filter(Channel.OTA_CHUNKS)
    assert (shared_subscription("ingest", fleet_filter(Channel.STATUS))
            == "$share/ingest/sightline/v1/devices/+/status")
    with pytest.raises(TopicError):
        shared_subscription("a/b", "x")

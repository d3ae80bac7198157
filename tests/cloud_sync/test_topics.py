"""The topic tree: one builder, strict ids, parse(build(x)) == x."""

from __future__ import annotations

import pytest

from cloud_sync.topics import (
    Channel,
    ParsedTopic,
    TopicError,
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
    assert topics.ota_chunks("u-7") == "sightline/v1/devices/quest-01/ota/chunks/u-7"
    assert group_command_topic("lab.eu") == "sightline/v1/groups/lab.eu/ota/command"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "dev+", "dev#", "$SYS", "-lead",
                                 "with space", "x" * 65, "dé", "a\x00b"])
def test_ids_that_could_widen_a_topic_or_acl_are_refused(bad):
    with pytest.raises(TopicError, match="not valid"):
        device_topics(bad)
    with pytest.raises(TopicError):
        group_command_topic(bad)
    with pytest.raises(TopicError):
        device_topics("ok").ota_chunks(bad)


@pytest.mark.parametrize("topic, parsed", [
    ("sightline/v1/devices/d1/status", ParsedTopic("device", "d1", Channel.STATUS)),
    ("sightline/v1/devices/d1/telemetry", ParsedTopic("device", "d1", Channel.TELEMETRY)),
    ("sightline/v1/devices/d1/ota/command", ParsedTopic("device", "d1", Channel.OTA_COMMAND)),
    ("sightline/v1/devices/d1/ota/progress",
     ParsedTopic("device", "d1", Channel.OTA_PROGRESS)),
    ("sightline/v1/devices/d1/ota/chunks/u1",
     ParsedTopic("device", "d1", Channel.OTA_CHUNKS, "u1")),
    ("sightline/v1/groups/g1/ota/command", ParsedTopic("group", "g1", Channel.OTA_COMMAND)),
])
def test_parse_takes_apart_what_the_builders_make(topic, parsed):
    assert parse_topic(topic) == parsed


@pytest.mark.parametrize("topic", [
    "sightline/v1/devices/d1", "sightline/v1/devices/d1/nope", "sightline/v2/devices/d1/status",
    "sightline/v1/devices/+/status", "sightline/v1/devices/d1/ota/chunks/",
    "sightline/v1/devices/d1/ota/chunks/a/b", "sightline/v1/groups/g1/telemetry",
    "sightline/v1/devices/d1/status/extra", "other/topic",
])
def test_parse_refuses_topics_outside_the_tree(topic):
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_device_subscribes_to_its_own_downward_topics_and_its_groups():
    assert device_subscriptions("d1", ("g1", "g2")) == [
        "sightline/v1/devices/d1/ota/command",
        "sightline/v1/devices/d1/ota/chunks/+",
        "sightline/v1/groups/g1/ota/command",
        "sightline/v1/groups/g2/ota/command",
    ]


def test_a_device_cannot_name_a_downward_channel_as_its_upward_topic():
    with pytest.raises(TopicError, match="downward"):
        device_topics("d1").up(Channel.OTA_COMMAND)


def test_cloud_side_filters_and_shared_subscriptions():
    assert fleet_filter(Channel.TELEMETRY) == "sightline/v1/devices/+/telemetry"
    assert fleet_filter(Channel.OTA_CHUNKS) == "sightline/v1/devices/+/ota/chunks/+"
    assert (shared_subscription("ingest", fleet_filter(Channel.STATUS))
            == "$share/ingest/sightline/v1/devices/+/status")
    with pytest.raises(TopicError):
        shared_subscription("a/b", "x")

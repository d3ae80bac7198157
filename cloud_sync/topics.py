"""The MQTT topic tree, in one place: building, validating and parsing topic names.

Every topic the device or the cloud uses is made here; nothing else formats topic
strings. Ids that go into a topic are checked so that no id can widen a subscription
or an ACL rule (no `+`, `#`, `/`, `$` or control characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from runtime.errors import SightlineError

ROOT = "sightline/v1"
DEVICES = f"{ROOT}/devices"
GROUPS = f"{ROOT}/groups"
# Update bundles, chunked and retained once per update (not per device): every device
# of a group reads the same chunks, and a device back from an outage re-subscribes to
# just the chunks it still lacks.
UPDATES = f"{ROOT}/updates"
MAX_CHUNKS = 1_000_000

# Letters, digits, '.', '_' and '-', starting with a letter or digit: safe in topic
# names, ACL patterns (mosquitto's %u/%c), client ids, file names and log lines.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TopicError(SightlineError):
    """A device id, group, update id or topic name is not valid in the topic tree."""


class Channel(str, Enum):
    """What a topic carries; the value is the topic's suffix under its device or group."""

    STATUS = "status"  # up, retained: online/offline (the Last Will sets offline)
    TELEMETRY = "telemetry"  # up
    OTA_COMMAND = "ota/command"  # down (per device, or per group)
    OTA_PROGRESS = "ota/progress"  # up
    OTA_CHUNKS = "chunks"  # down, retained: updates/{update_id}/chunks/{index}


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise TopicError(
            f"{what} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', '+', '#', '$' or spaces)"
        )
    return value


def field_check(check, values):
    """Run `check` on one id or each of a tuple, as a pydantic validator: TopicError
    becomes the ValueError pydantic reports under the field's name."""
    try:
        if isinstance(values, tuple):
            return tuple(check(v) for v in values)
        return check(values)
    except TopicError as exc:
        raise ValueError(str(exc)) from None


def validate_device_id(device_id: str) -> str:
    """Return `device_id` if it can go into a topic, else raise TopicError."""
    return _check_id(device_id, "device id")


def validate_group(group: str) -> str:
    """Return `group` if it can go into a topic, else raise TopicError."""
    return _check_id(group, "group")


def validate_update_id(update_id: str) -> str:
    """Return `update_id` if it can go into a topic, else raise TopicError."""
    return _check_id(update_id, "update id")


@dataclass(frozen=True)
class DeviceTopics:
    """The topics of one device. Build with `device_topics(device_id)`."""

    device_id: str

    @property
    def base(self) -> str:
        return f"{DEVICES}/{self.device_id}"

    @property
    def status(self) -> str:
        return f"{self.base}/{Channel.STATUS.value}"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/{Channel.TELEMETRY.value}"

    @property
    def ota_command(self) -> str:
        return f"{self.base}/{Channel.OTA_COMMAND.value}"

    @property
    def ota_progress(self) -> str:
        return f"{self.base}/{Channel.OTA_PROGRESS.value}"

    def up(self, channel: Channel) -> str:
        """The topic of an upward channel (status, telemetry, OTA progress)."""
        if channel is Channel.STATUS:
            return self.status
        if channel is Channel.TELEMETRY:
            return self.telemetry
        if channel is Channel.OTA_PROGRESS:
            return self.ota_progress
        raise TopicError(f"{channel.value} is a downward channel; a device does not publish it")


def device_topics(device_id: str) -> DeviceTopics:
    return DeviceTopics(validate_device_id(device_id))


def group_command_topic(group: str) -> str:
    return f"{GROUPS}/{validate_group(group)}/{Channel.OTA_COMMAND.value}"


def chunk_topic(update_id: str, index: int) -> str:
    """Where chunk `index` (from 0) of an update's bundle is retained."""
    if not isinstance(index, int) or not 0 <= index < MAX_CHUNKS:
        raise TopicError(f"chunk index {index!r} is out of range")
    return f"{UPDATES}/{validate_update_id(update_id)}/{Channel.OTA_CHUNKS.value}/{index}"


def chunks_filter(update_id: str) -> str:
    """Cloud side: every chunk of one update (to clear them when the rollout is over)."""
    return f"{UPDATES}/{validate_update_id(update_id)}/{Channel.OTA_CHUNKS.value}/+"


def device_subscriptions(device_id: str, groups: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The filters a device always holds: its OTA commands and its groups' commands.

    Chunk topics are subscribed to only while an update downloads (MqttLink.subscribe).
    """
    topics = device_topics(device_id)
    return [topics.ota_command, *(group_command_topic(group) for group in groups)]


def fleet_filter(channel: Channel) -> str:
    """Cloud side: one channel of every device, e.g. `sightline/v1/devices/+/telemetry`."""
    if channel is Channel.OTA_CHUNKS:
        raise TopicError("chunks belong to updates, not devices: use chunks_filter(update_id)")
    return f"{DEVICES}/+/{channel.value}"


def shared_subscription(share_group: str, topic_filter: str) -> str:
    """Cloud side: `$share/{share_group}/{filter}`, load-balanced across a consumer group.

    Needs a broker with MQTT 5 shared subscriptions (EMQX, HiveMQ, mosquitto >= 2.0).
    """
    return f"$share/{_check_id(share_group, 'share group')}/{topic_filter}"


@dataclass(frozen=True)
class ParsedTopic:
    """A topic name taken apart: whose it is (a device or a group) and which channel."""

    scope: str  # "device", "group" or "update"
    target: str  # the device id, the group name or the update id
    channel: Channel
    index: int | None = None  # only for OTA_CHUNKS: the chunk's index

    @property
    def update_id(self) -> str | None:
        return self.target if self.scope == "update" else None


_DEVICE_CHANNELS = {c.value: c for c in Channel if c is not Channel.OTA_CHUNKS}


def parse_topic(topic: str) -> ParsedTopic:
    """Parse a topic name of this tree; raise TopicError for anything else."""
    prefix_devices, prefix_groups = DEVICES + "/", GROUPS + "/"
    if topic.startswith(prefix_devices):
        target, _, rest = topic[len(prefix_devices):].partition("/")
        validate_device_id(target)
        if rest in _DEVICE_CHANNELS:
            return ParsedTopic("device", target, _DEVICE_CHANNELS[rest])
    elif topic.startswith(prefix_groups):
        target, _, rest = topic[len(prefix_groups):].partition("/")
        validate_group(target)
        if rest == Channel.OTA_COMMAND.value:
            return ParsedTopic("group", target, Channel.OTA_COMMAND)
    elif topic.startswith(UPDATES + "/"):
        target, _, rest = topic[len(UPDATES) + 1:].partition("/")
        validate_update_id(target)
        kind, _, index = rest.partition("/")
        if kind == Channel.OTA_CHUNKS.value and index.isdigit() and len(index) < 7 \
                and str(int(index)) == index:
            return ParsedTopic("update", target, Channel.OTA_CHUNKS, int(index))
    raise TopicError(f"{topic!r} is not a Sightline topic (expected {DEVICES}/<id>/<channel>, "
                     f"{GROUPS}/<group>/{Channel.OTA_COMMAND.value} or "
                     f"{UPDATES}/<id>/chunks/<n>)")

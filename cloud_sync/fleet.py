"""The operator's live view of the fleet, built from what devices publish over MQTT.

`FleetState` folds status, telemetry and OTA progress messages into one record per
device and answers with rows for a table (and progress for `sightline push`). It only
reads: nothing here publishes to devices.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import paho.mqtt.client as mqtt
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cloud_sync.commands import UNSUCCESSFUL
from cloud_sync.operator import OperatorConfig, connect, disconnect
from cloud_sync.topics import Channel, TopicError, fleet_filter, parse_topic

log = logging.getLogger(__name__)

FLEET_FILTERS = tuple(fleet_filter(channel) for channel in
                      (Channel.STATUS, Channel.TELEMETRY, Channel.OTA_PROGRESS))
# OTA states whose detail says what went wrong: shown in the table.
_DETAIL_CHARS = 60


@dataclass(frozen=True)
class DeviceRow:
    """One line of the fleet table."""

    device_id: str
    online: bool | None  # None: no status document seen yet
    groups: tuple[str, ...]
    models: tuple[str, ...]  # "name@version"
    fps: float | None
    p99_ms: float | None  # worst model's end-to-end p99 latency
    ota: str | None  # e.g. "centerface@1.1 confirmed"
    last_seen: float  # newest `ts` the device put in a message (device clock)


@dataclass(frozen=True)
class DeviceRecord:
    """The latest wire documents of one device (copies: safe to keep and change)."""

    device_id: str
    status: dict[str, Any] | None
    telemetry: dict[str, Any] | None
    progress: MappingProxyType[str, dict[str, Any]]  # update id -> its last progress
    last_seen: float


@dataclass
class _Device:
    status: dict[str, Any] | None = None
    # The last status the device sent itself: a Last Will names no models (docs/mqtt.md
    # §2), so what an offline device served is the last thing it said.
    reported: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_seen: float = 0.0


def _ts(document: dict[str, Any]) -> float | None:
    value = document.get("ts")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _not_older(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    # The outbox is at-least-once: a re-sent (older) copy must not replace what is newer.
    if old is None:
        return True
    new_ts, old_ts = _ts(new), _ts(old)
    return new_ts is None or old_ts is None or new_ts >= old_ts


class FleetState:
    """Per-device records, fed by `apply()` from paho's thread, read from any thread."""

    def __init__(self) -> None:
        # Re-entrant, so wait_until's predicate may call progress(), rows() ...
        self._cond = threading.Condition(threading.RLock())
        self._devices: dict[str, _Device] = {}
        self._progress_listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._telemetry_listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def on_progress(self, listener: Callable[[str, dict[str, Any]], None]
                    ) -> Callable[[], None]:
        """Call `listener(device_id, document)` for every new OTA progress message, in
        arrival order (from paho's thread): `push` prints each step, not just the latest.
        Returns the function that removes the listener again."""
        self._progress_listeners.append(listener)
        return lambda: self._progress_listeners.remove(listener)

    def on_telemetry(self, listener: Callable[[str, dict[str, Any]], None]
                     ) -> Callable[[], None]:
        """Call `listener(device_id, document)` for every telemetry message (from paho's
        thread): the telemetry gate of `sightline push` keeps its windows this way."""
        self._telemetry_listeners.append(listener)
        return lambda: self._telemetry_listeners.remove(listener)

    def apply(self, topic: str, payload: bytes, received_at: float | None = None) -> None:
        """Fold one message in; foreign topics and non-JSON payloads are ignored."""
        try:
            parsed = parse_topic(topic)
        except TopicError:
            log.debug("ignoring message on foreign topic %r", topic)
            return
        if parsed.scope != "device" or parsed.channel not in (
                Channel.STATUS, Channel.TELEMETRY, Channel.OTA_PROGRESS):
            log.debug("ignoring %s message on %s", parsed.channel.value, topic)
            return
        device_id = parsed.target
        if parsed.channel is Channel.STATUS and not payload:
            # An empty retained message deletes the status: the device was retired.
            with self._cond:
                self._devices.pop(device_id, None)
                self._cond.notify_all()
            return
        try:
            document = json.loads(payload)
        except (UnicodeDecodeError, ValueError):
            log.debug("ignoring non-JSON payload on %s", topic)
            return
        if not isinstance(document, dict):
            log.debug("ignoring non-object JSON on %s", topic)
            return
        update_id = document.get("update_id")
        if parsed.channel is Channel.OTA_PROGRESS and not isinstance(update_id, str):
            log.debug("ignoring OTA progress without an update_id on %s", topic)
            return
        seen = _ts(document) or (received_at if received_at is not None else time.time())
        stored = False
        with self._cond:
            device = self._devices.setdefault(device_id, _Device())
            if parsed.channel is Channel.STATUS:
                # Latest arrival wins, not newest ts: the Last Will carries the time of
                # the connect, older than the "online" it replaces.
                device.status = document
                if "models" in document:
                    device.reported = document
            elif parsed.channel is Channel.TELEMETRY:
                if _not_older(document, device.telemetry):
                    device.telemetry = document
            elif _not_older(document, device.progress.get(update_id)):
                device.progress[update_id] = document
                stored = True
            device.last_seen = max(device.last_seen, seen)
            self._cond.notify_all()
        if stored:  # a replayed older step is not news
            for listener in list(self._progress_listeners):
                listener(device_id, document)
        if parsed.channel is Channel.TELEMETRY:
            for listener in list(self._telemetry_listeners):
                listener(device_id, document)

    def rows(self) -> list[DeviceRow]:
        with self._cond:
            return [_row(device_id, self._devices[device_id])
                    for device_id in sorted(self._devices)]

    def device(self, device_id: str) -> DeviceRecord | None:
        with self._cond:
            device = self._devices.get(device_id)
            if device is None:
                return None
            return DeviceRecord(device_id, copy.deepcopy(device.status),
                                copy.deepcopy(device.telemetry),
                                MappingProxyType(copy.deepcopy(device.progress)),
                                device.last_seen)

    def progress(self, device_id: str, update_id: str) -> dict[str, Any] | None:
        """The last OTA progress document `device_id` sent for `update_id`."""
        with self._cond:
            device = self._devices.get(device_id)
            document = device.progress.get(update_id) if device else None
            return copy.deepcopy(document)

    def all_progress(self, update_id: str) -> dict[str, dict[str, Any]]:
        """device id -> its last progress document for `update_id` (devices that sent one)."""
        with self._cond:
            return {device_id: copy.deepcopy(device.progress[update_id])
                    for device_id, device in sorted(self._devices.items())
                    if update_id in device.progress}

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Block until `predicate()` is true (checked after every message) or timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout_s)


def _row(device_id: str, device: _Device) -> DeviceRow:
    status = device.status or {}
    telemetry = device.telemetry or {}
    state = status.get("state")
    groups = status.get("groups")
    # A Last Will: models and OTA as last reported while connected; none when this watcher
    # started after the Will (then no version is shown, rather than a guessed one).
    will = state == "offline" and "models" not in status
    reported = device.reported or {} if will else status
    return DeviceRow(
        device_id=device_id,
        online=True if state == "online" else False if state == "offline" else None,
        groups=tuple(g for g in groups if isinstance(g, str)) if isinstance(groups, list)
        else (),
        models=_models(reported, {} if will else telemetry),
        fps=_number(telemetry.get("fps")),
        p99_ms=_p99(telemetry),
        ota=_ota(reported.get("ota"), device.progress),
        last_seen=device.last_seen,
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _models(status: dict[str, Any], telemetry: dict[str, Any]) -> tuple[str, ...]:
    models = status.get("models")
    if isinstance(models, dict):  # {"centerface": {"version": "1.1", ...}}
        names = []
        for name, info in models.items():
            version = info.get("version") if isinstance(info, dict) else info
            names.append(f"{name}@{version}" if isinstance(version, str) else str(name))
        return tuple(sorted(names))
    if isinstance(models, list):  # ["centerface@1.2.0"], as docs/mqtt.md shows
        return tuple(sorted(m for m in models if isinstance(m, str)))
    served = telemetry.get("models")  # no status models: what telemetry says is running
    if isinstance(served, list):
        return tuple(sorted(f"{m['name']}@{m.get('version', '?')}" for m in served
                            if isinstance(m, dict) and isinstance(m.get("name"), str)))
    return ()


def _p99(telemetry: dict[str, Any]) -> float | None:
    values = []
    models = telemetry.get("models")
    for model in models if isinstance(models, list) else ():
        try:
            value = _number(model["latency_ms"]["total"]["p99"])
        except (KeyError, TypeError):
            continue
        if value is not None:
            values.append(value)
    return max(values) if values else None


def _ota(status_ota: Any, progress: dict[str, dict[str, Any]]) -> str | None:
    candidates = [doc for doc in (status_ota, *progress.values()) if isinstance(doc, dict)]
    if not candidates:
        return None
    # Newest by ts; on a tie the later candidate (progress, which says more) wins.
    newest = max(enumerate(candidates),
                 key=lambda item: (_ts(item[1]) or 0.0, item[0]))[1]
    model, version = newest.get("model"), newest.get("version")
    label = (f"{model}@{version}" if isinstance(model, str) and isinstance(version, str)
             else str(newest.get("update_id", "?")))
    state = str(newest.get("state", "?"))
    text = f"{label} {state}"
    percent = _number(newest.get("percent"))
    if state == "downloading" and percent is not None:
        text += f" {percent:.0f}%"
    detail = newest.get("detail")
    if state in UNSUCCESSFUL and isinstance(detail, str) and detail:
        if len(detail) > _DETAIL_CHARS:
            detail = detail[:_DETAIL_CHARS - 1] + "…"
        text += f": {detail}"
    return text


class FleetWatcher:
    """Subscribes to every device's status, telemetry and OTA progress and feeds a
    FleetState. Retained statuses arrive right after connecting, so devices that went
    quiet long ago are listed too. Use as a context manager."""

    def __init__(self, config: OperatorConfig, state: FleetState | None = None) -> None:
        self.config = config
        self.state = state if state is not None else FleetState()
        self._client: mqtt.Client | None = None

    def start(self, timeout_s: float = 10) -> None:
        if self._client is not None:
            return
        client_id = f"{self.config.client_id_prefix}-fleet-{uuid.uuid4().hex[:8]}"
        self._client = connect(self.config, client_id, on_message=self._on_message,
                               subscribe=FLEET_FILTERS, timeout_s=timeout_s)

    @property
    def client(self) -> mqtt.Client:
        """The connected session (start() first); `sightline push` publishes on it too."""
        if self._client is None:
            raise RuntimeError("FleetWatcher.start() was not called")
        return self._client

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            disconnect(client)

    def __enter__(self) -> FleetWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        self.state.apply(message.topic, bytes(message.payload), time.time())


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def render_fleet(rows: list[DeviceRow], now: float | None = None) -> Table:
    """The fleet as a rich table, one row per device."""
    now = time.time() if now is None else now
    online = sum(1 for row in rows if row.online)
    table = Table(title="Sightline fleet", caption=f"{len(rows)} devices, {online} online")
    for name, justify in (("device", "left"), ("online", "left"), ("groups", "left"),
                          ("model", "left"), ("fps", "right"), ("p99 ms", "right"),
                          ("last OTA", "left"), ("seen", "right")):
        table.add_column(name, justify=justify)
    for row in rows:
        online_cell = (Text("online", style="green") if row.online
                       else Text("offline", style="red") if row.online is False
                       else Text("?", style="dim"))
        ota_style = "red" if row.ota and any(f" {s}" in row.ota for s in UNSUCCESSFUL) else ""
        table.add_row(
            row.device_id, online_cell, ", ".join(row.groups) or "-",
            ", ".join(row.models) or "-",
            f"{row.fps:.1f}" if row.fps is not None else "-",
            f"{row.p99_ms:.1f}" if row.p99_ms is not None else "-",
            Text(row.ota, style=ota_style) if row.ota else "-",
            _age(now - row.last_seen) if row.last_seen else "-",
        )
    return table


def watch_fleet(config: OperatorConfig, console: Console, *, refresh_s: float = 1.0,
                once_after_s: float | None = None) -> list[DeviceRow]:
    """Show the fleet table live until Ctrl-C; return the last rows.

    With `once_after_s`, collect for that long, print the table once and return the rows
    (for scripts and tests).
    """
    with FleetWatcher(config) as watcher:
        if once_after_s is not None:
            time.sleep(once_after_s)
            rows = watcher.state.rows()
            console.print(render_fleet(rows))
            return rows
        rows = watcher.state.rows()
        with Live(render_fleet(rows), console=console, auto_refresh=False) as live:
            try:
                while True:
                    # A fixed pace, not per message: "seen" ages even when all is quiet.
                    time.sleep(refresh_s)
                    rows = watcher.state.rows()
                    live.update(render_fleet(rows), refresh=True)
            except KeyboardInterrupt:
                pass
        return rows

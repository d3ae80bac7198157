"""What a `sightline serve` daemon does with the commands it receives, seen on a real
mosquitto: an accepted command is never lost across a restart, and every command it
will not run is answered with the check that refused it."""

from __future__ import annotations

import json
import signal
import time

import pytest

from cloud_sync.commands import TERMINAL, MqttChunks, UpdateCommand
from cloud_sync.push import make_update, publish_chunks
from cloud_sync.signing import sign
from cloud_sync.topics import device_topics
from tests.cloud_sync.ota_harness import MODEL, tiny_bundle
from tests.cloud_sync.test_ota_daemon import DEVICE, _version, device, operator  # noqa: F401

TOPIC = device_topics(DEVICE).ota_command


def _envelope(ops, command) -> bytes:
    return json.dumps(sign(command.model_dump(mode="json"), ops.key)).encode()


def _since(ops, start: int) -> list[dict]:
    """Progress documents the device sent after the first `start` messages of the test."""
    topic = device_topics(DEVICE).ota_progress
    return [json.loads(m.payload) for m in ops.observer.everything()[start:]
            if m.topic == topic]


def _wait_ended(ops, update_ids: set[str], start: int, timeout: float = 60.0) -> dict:
    """update id -> the terminal document each of `update_ids` sent after `start`."""
    def ended(_messages) -> bool:
        done = {d.get("update_id") for d in _since(ops, start) if d["state"] in TERMINAL}
        return update_ids <= done

    ops.observer.wait_for(ended, timeout)
    return {d["update_id"]: d for d in _since(ops, start)
            if d["state"] in TERMINAL and d.get("update_id") in update_ids}


def _wait_check(ops, check: str) -> dict:
    def refused(_messages) -> bool:
        return any(d.get("check") == check for d in _since(ops, 0))

    ops.observer.wait_for(refused, 30)
    return next(d for d in _since(ops, 0) if d.get("check") == check)


def _wait_queue_empty(short_tmp, timeout: float = 10.0) -> None:
    """The queue's journal is emptied just after the last command's final report."""
    deadline = time.monotonic() + timeout
    while files := list((short_tmp / "state" / "ota" / "queue").glob("*.json")):
        assert time.monotonic() < deadline, f"left in the queue's journal: {files}"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_commands_queued_behind_a_stalled_update_all_end_after_a_restart(
        device, operator, short_tmp, sig):  # noqa: F811
    daemon = device()
    v2 = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    stalled = make_update(v2, devices=[DEVICE], chunk_size=1024)
    operator.send(stalled)  # its chunks are not on the broker: it waits in downloading
    operator.wait_state(DEVICE, stalled.update_id, "downloading")
    other = operator.package(tiny_bundle(short_tmp / "o", "1.0", name="other"))
    v3 = operator.package(tiny_bundle(short_tmp / "v3", "3.0"))
    real = make_update(v3, devices=[DEVICE], chunk_size=4096)
    publish_chunks(operator.client, real, v3, operator.publish)
    commands = [make_update(other, devices=[DEVICE]) for _ in range(15)] + [real] + [
        make_update(other, devices=[DEVICE]) for _ in range(2)]
    envelopes = [_envelope(operator, c) for c in commands]
    for envelope in envelopes:
        operator.publish(operator.client, TOPIC, envelope)
    refused = [operator.wait_state(DEVICE, c.update_id, "rejected") for c in commands[16:]]
    assert [r["check"] for r in refused] == ["queue", "queue"]
    assert "16 commands are queued already (ota.max_queued_commands)" in refused[0]["detail"]
    queued = {c.update_id for c in commands[:16]}
    assert not queued & {d.get("update_id") for d in _since(operator, 0)}, "still waiting"

    # (a generous wait: on a loaded 2-core machine the first connect alone took 19 s once)
    stopped = daemon.stop(sig, timeout=60)
    assert stopped == (0 if sig == signal.SIGTERM else -signal.SIGKILL), daemon.log
    if sig == signal.SIGTERM:  # a clean stop is no alert for journald
        assert " ERROR " not in daemon.log, daemon.log
    # kill -9 leaves the running update's file too; the update journal owns it after that
    running = 1 if sig == signal.SIGKILL else 0
    assert len(list((short_tmp / "state" / "ota" / "queue").glob("*.json"))) == 16 + running
    restart = len(operator.observer.everything())
    daemon = device()
    publish_chunks(operator.client, stalled, v2, operator.publish)  # the stall is over
    ended = _wait_ended(operator, queued | {stalled.update_id}, restart)
    assert "16 OTA command(s) accepted before the restart are queued again" in daemon.log
    assert ended[stalled.update_id]["state"] == "confirmed", ended[stalled.update_id]
    assert ended[real.update_id]["state"] == "confirmed", ended[real.update_id]
    assert {ended[c.update_id]["check"] for c in commands[:15]} == {"model"}
    assert not [d for d in _since(operator, restart) if d.get("check") == "replay"]
    assert _version(daemon) == "3.0"

    # A command refused with `queue` was not remembered: the same bytes, sent again now
    # that there is room, are accepted (and run), not refused as a replay.
    again = len(operator.observer.everything())
    operator.publish(operator.client, TOPIC, envelopes[16])
    answer = _wait_ended(operator, {commands[16].update_id}, again)[commands[16].update_id]
    assert answer["check"] == "model", answer
    _wait_queue_empty(short_tmp)


def test_a_command_for_another_device_and_an_oversize_one_are_refused_on_the_wire(
        device, operator, short_tmp):  # noqa: F811
    daemon = device()
    v2 = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    elsewhere = make_update(v2, devices=["edge-99"], groups=["eu"])
    operator.publish(operator.client, TOPIC, _envelope(operator, elsewhere))
    misaddressed = _wait_check(operator, "address")
    assert misaddressed["check"] == "address" and "update_id" not in misaddressed
    assert misaddressed["misaddressed"]["update_id"] == elsewhere.update_id
    assert misaddressed["misaddressed"]["devices"] == ["edge-99"]
    assert "this device is edge-01 in groups ['lab']" in misaddressed["detail"]

    # Validly signed and schema-valid, 1.4 MB of chunk hashes: over the 1 MiB default.
    huge = UpdateCommand(update_id="tiny-2.0-huge", model=MODEL, version="2.0",
                         sha256="0" * 64, size=20_000 * 1024, devices=(DEVICE,),
                         delivery=MqttChunks(chunk_size=1024,
                                             chunk_sha256=("0" * 64,) * 20_000))
    envelope = _envelope(operator, huge)
    assert len(envelope) > 1024 * 1024
    operator.publish(operator.client, TOPIC, envelope)
    oversize = _wait_check(operator, "oversize")
    assert "ota.max_command_bytes (1048576); nothing in it was read" in oversize["detail"]
    assert "unverified" not in oversize and "update_id" not in oversize
    assert _version(daemon) == "1.0"
    assert "tiny-2.0-huge" not in json.dumps(operator.progress(DEVICE))

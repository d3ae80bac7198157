"""The outbox: FIFO, bounded (oldest telemetry first), counted, crash-safe, thread-safe."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest

from cloud_sync.outbox import MessageKind, Outbox, OutboxError, OutboxFull

T, P = MessageKind.TELEMETRY, MessageKind.PROGRESS
TOPIC = "sightline/v1/devices/d/telemetry"


def payloads(outbox: Outbox) -> list[bytes]:
    return [m.payload for m in outbox.peek(0, 10_000)]


def test_messages_come_out_in_the_order_they_went_in_until_removed(work_dir: Path):
    with Outbox(work_dir / "o.db") as outbox:
        ids = [outbox.put(T, TOPIC, f"m{i}".encode()) for i in range(5)]
        assert ids == sorted(ids)
        assert payloads(outbox) == [b"m0", b"m1", b"m2", b"m3", b"m4"]
        assert [m.payload for m in outbox.peek(ids[1], 2)] == [b"m2", b"m3"]
        outbox.remove(ids[:2] + [999_999])  # unknown ids (e.g. already dropped) are ignored
        assert payloads(outbox) == [b"m2", b"m3", b"m4"]
        assert len(outbox) == 3 and outbox.stats().bytes == 3 * (len(TOPIC) + 2)


def test_ids_are_never_reused_so_order_holds_across_a_reopen(work_dir: Path):
    with Outbox(work_dir / "o.db") as outbox:
        last = outbox.put(T, TOPIC, b"a")
        outbox.remove([last])
    with Outbox(work_dir / "o.db") as outbox:
        assert outbox.put(T, TOPIC, b"b") > last


def test_full_outbox_drops_oldest_telemetry_first_and_keeps_progress(work_dir: Path):
    with Outbox(work_dir / "o.db", max_messages=5) as outbox:
        outbox.put(P, TOPIC, b"p0")
        for i in range(4):
            outbox.put(T, TOPIC, f"t{i}".encode())
        outbox.put(P, TOPIC, b"p1")  # full: t0 goes
        outbox.put(T, TOPIC, b"t4")  # full: t1 goes
        assert payloads(outbox) == [b"p0", b"t2", b"t3", b"p1", b"t4"]
        assert outbox.stats().dropped_telemetry == 2


def test_byte_bound_drops_as_many_old_telemetry_messages_as_needed(work_dir: Path):
    size = len(TOPIC) + 100
    with Outbox(work_dir / "o.db", max_bytes=4 * size) as outbox:
        for i in range(4):
            outbox.put(T, TOPIC, bytes([i]) * 100)
        outbox.put(P, TOPIC, b"x" * 250)  # needs the room of three 100-byte messages
        assert [m.kind for m in outbox.peek()] == [T, P]
        assert outbox.stats().dropped_telemetry == 3
        assert outbox.stats().bytes <= 4 * size


def test_drop_counter_survives_a_reopen(work_dir: Path):
    with Outbox(work_dir / "o.db", max_messages=2) as outbox:
        for i in range(5):
            outbox.put(T, TOPIC, str(i).encode())
    with Outbox(work_dir / "o.db", max_messages=2) as outbox:
        assert outbox.stats().dropped_telemetry == 3
        assert payloads(outbox) == [b"3", b"4"]
        outbox.put(T, TOPIC, b"5")
        assert outbox.stats().dropped_telemetry == 4


def test_progress_that_cannot_fit_is_refused_not_silently_lost(work_dir: Path):
    with Outbox(work_dir / "o.db", max_messages=2) as outbox:
        outbox.put(P, TOPIC, b"p0")
        outbox.put(P, TOPIC, b"p1")
        with pytest.raises(OutboxFull, match="never dropped"):
            outbox.put(P, TOPIC, b"p2")
        # new telemetry is itself the oldest telemetry: dropped and counted
        assert outbox.put(T, TOPIC, b"t") is None
        assert outbox.stats().dropped_telemetry == 1
        assert payloads(outbox) == [b"p0", b"p1"]


def test_a_message_larger_than_the_whole_outbox_is_an_error(work_dir: Path):
    with Outbox(work_dir / "o.db", max_bytes=1000) as outbox, \
            pytest.raises(OutboxError, match="can never fit"):
        outbox.put(T, TOPIC, b"x" * 1000)


def test_rejected_messages_are_removed_and_counted(work_dir: Path):
    with Outbox(work_dir / "o.db") as outbox:
        ids = [outbox.put(T, TOPIC, b"x") for _ in range(3)]
        outbox.reject(ids[:2])
        assert len(outbox) == 1 and outbox.stats().rejected_by_broker == 2
    with Outbox(work_dir / "o.db") as outbox:
        assert outbox.stats().rejected_by_broker == 2


def test_second_outbox_on_the_same_file_is_refused(work_dir: Path):
    with Outbox(work_dir / "o.db"), pytest.raises(OutboxError, match="in use"):
        Outbox(work_dir / "o.db")


def test_file_is_wal_and_fully_synchronous(work_dir: Path):
    with Outbox(work_dir / "o.db") as outbox:
        outbox.put(T, TOPIC, b"x")
        assert outbox._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_concurrent_writers_and_an_acker_keep_the_outbox_consistent(work_dir: Path):
    with Outbox(work_dir / "o.db", max_messages=100_000) as outbox:
        stored: list[int] = []
        lock = threading.Lock()
        stop = threading.Event()

        def writer(n: int) -> None:
            for i in range(150):
                message_id = outbox.put(T, TOPIC, f"{n}-{i}".encode())
                with lock:
                    stored.append(message_id)

        def acker() -> None:
            while not stop.is_set():
                outbox.remove([m.id for m in outbox.peek(0, 7)])

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        ack_thread = threading.Thread(target=acker)
        ack_thread.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        ack_thread.join()
        remaining = outbox.peek(0, 100_000)
        assert len(set(stored)) == 600
        assert len(outbox) == len(remaining)
        assert outbox.stats().bytes == sum(len(TOPIC) + len(m.payload) for m in remaining)
        per_writer = {}
        for m in remaining:  # each writer's own messages stay in its order
            n, i = m.payload.decode().split("-")
            assert int(i) > per_writer.get(n, -1)
            per_writer[n] = int(i)


def test_every_stored_message_survives_sigkill_mid_publishing(work_dir: Path, child_factory):
    path = work_dir / "o.db"
    child = child_factory("outbox", str(path))
    child.read_until("ready")
    acknowledged: dict[int, int] = {}
    for _ in range(300):
        _, seq, message_id = child.read_until("stored").split()
        acknowledged[int(seq)] = int(message_id)
    child.signal(signal.SIGKILL)  # while it is still putting
    child.kill()
    # whatever got printed after our 300 reads was stored too
    with Outbox(path) as outbox:
        messages = outbox.peek(0, 1_000_000)
        assert outbox._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    seqs = [json.loads(m.payload)["seq"] for m in messages]
    assert seqs == list(range(len(seqs))), "stored in order, no gaps"
    assert set(acknowledged) <= set(seqs)
    assert {s: acknowledged[s] for s in acknowledged} == {
        json.loads(m.payload)["seq"]: m.id for m in messages if
        json.loads(m.payload)["seq"] in acknowledged}
    assert sum(m.kind is P for m in messages) == len([s for s in seqs if s % 10 == 0])

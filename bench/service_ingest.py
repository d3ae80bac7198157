"""Ingest rate of the fleet service: how many messages a second `sightline cloud serve`
records, with bench/fleet_sim.py's devices publishing. Not part of CI; the figures are
in docs/cloud-service.md.

    python bench/service_ingest.py --devices 200                     # SQLite file
    python bench/service_ingest.py --devices 200 --db postgresql://postgres@127.0.0.1/x

Three phases, each counted against a separate subscriber that sees every message:
  live     the devices publish telemetry every --interval s for --live s; what the
           service kept up with, and its CPU
  backlog  the service is stopped (SIGTERM: its session stays) while the devices publish
           for --backlog s, then started again: the time it takes to record the queue
           is its ingest capacity, with the devices quiet
  verify   every message the subscriber saw is in the database (digests match)

It starts its own mosquitto on a free loopback port (never 1883) and its own service
process, and stops both; run it from the repository root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fleet_sim import (  # noqa: E402
    SOCKETS_PER_LINK,
    Broker,
    SimDevice,
    build_bundles,
    hold_low_descriptors,
    in_parallel,
    release,
)
from cloud_sync.ota import OtaSettings  # noqa: E402
from cloud_sync.signing import TrustedKeys, generate_signing_key  # noqa: E402
from cloud_sync.topics import Channel, fleet_filter  # noqa: E402
from tests.cloud_sync.mosquitto import free_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Ledger:
    """A plain QoS 1 subscriber: the digest of every message the broker delivered."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.digests: set[str] = set()
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-ledger",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe(
            [(fleet_filter(ch), 1) for ch in (Channel.STATUS, Channel.TELEMETRY,
                                             Channel.OTA_PROGRESS)])
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        digest = hashlib.sha256(message.topic.encode() + b"\0" + message.payload).hexdigest()
        with self._lock:
            self.digests.add(digest)

    def count(self) -> int:
        with self._lock:
            return len(self.digests)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Service:
    def __init__(self, work: Path, db_url: str, port: int) -> None:
        self.work, self.db_url, self.port = work, db_url, port
        self.http = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.work / "service.log", "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "runtime.cli", "--log-level", "warning", "cloud",
                 "serve", "--db", self.db_url, "--broker", f"127.0.0.1:{self.port}",
                 "--http", f"127.0.0.1:{self.http}", "--client-id", "bench-cloud"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "recording into" not in (self.work / "service.log").read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit((self.work / "service.log").read_text())
            time.sleep(0.1)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


def recorded(db_url: str) -> set[str]:
    from sqlalchemy import select

    from cloud_sync.service.database import open_database
    from cloud_sync.service.models import Message

    engine, sessions = open_database(db_url, migrate_schema=False)
    try:
        with sessions() as session:
            return set(session.scalars(select(Message.digest)))
    finally:
        engine.dispose()


def stored_count(db_url: str) -> int:
    from sqlalchemy import func, select

    from cloud_sync.service.database import open_database
    from cloud_sync.service.models import Message

    engine, sessions = open_database(db_url, migrate_schema=False)
    try:
        with sessions() as session:
            return session.scalar(select(func.count()).select_from(Message))
    finally:
        engine.dispose()


def wait_recorded(db_url: str, expected: int, timeout_s: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if stored_count(db_url) >= expected:
            return time.monotonic() - start
        time.sleep(0.25)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--interval", type=float, default=1.0, help="telemetry seconds")
    parser.add_argument("--live", type=float, default=20.0)
    parser.add_argument("--backlog", type=float, default=20.0)
    parser.add_argument("--backlog-interval", type=float, default=0.2,
                        help="telemetry seconds while the service is down")
    parser.add_argument("--db", help="database URL (default: an SQLite file in the work dir)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "service_ingest.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="service-ingest-"))
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count()}
    db_url = args.db or f"sqlite:///{work / 'cloud.db'}"
    # max_inflight_messages: what the broker may have unacknowledged with one client; the
    # service asks for 1000 (Receive Maximum) and acks after each committed batch.
    broker = Broker(work / "broker", free_port())
    broker.config_path.write_text(broker.config_path.read_text()
                                  + "max_inflight_messages 1000\n")
    broker.start()
    service = Service(work, db_url, broker.port)
    devices: list[SimDevice] = []
    ledger = None
    try:
        ledger = Ledger(broker.port)
        service.start()
        seed, _ = build_bundles(work, 0)
        _, public = generate_signing_key(work / "keys", "bench")
        trusted = TrustedKeys.load([public])
        held = hold_low_descriptors(SOCKETS_PER_LINK * args.devices + 40)
        try:
            devices = [SimDevice(f"sim-{i:04d}", ("fleet",), work / "devices" / f"{i}",
                                 broker.port, seed, trusted, OtaSettings(), args.interval,
                                 rng_seed=i) for i in range(args.devices)]
        finally:
            release(held)
        for device in devices:
            device.start_link()
        assert all(d.link.wait_connected(60) for d in devices)
        for device in devices:
            device.telemetry.start()
            time.sleep(args.interval / len(devices))

        # live
        before, cpu0, t0 = stored_count(db_url), service.cpu_s(), time.monotonic()
        seen0 = ledger.count()
        time.sleep(args.live)
        wall = time.monotonic() - t0
        lag_s = wait_recorded(db_url, ledger.count(), 60)
        results["live"] = {
            "offered_msgs_per_s": round((ledger.count() - seen0) / wall, 1),
            "recorded_msgs_per_s": round((stored_count(db_url) - before) / wall, 1),
            "service_cpu_pct_of_core": round(100 * (service.cpu_s() - cpu0) / wall, 1),
            "caught_up_after_s": round(lag_s, 2) if lag_s is not None else None}
        print("live", results["live"], flush=True)

        # backlog: the service is away while the devices publish faster
        service.stop()
        for device in devices:
            device.telemetry.interval_s = args.backlog_interval
        time.sleep(args.backlog)
        in_parallel(lambda d: d.telemetry.stop(), devices)
        deadline = time.monotonic() + 60
        while any(d.link.stats().outbox.messages for d in devices) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        expected, before = ledger.count(), stored_count(db_url)
        service.start()
        cpu0 = service.cpu_s()
        drain_s = wait_recorded(db_url, expected, 600)
        backlog = expected - before
        results["backlog"] = {
            "messages": backlog, "drain_s": round(drain_s, 2) if drain_s else None,
            "recorded_msgs_per_s": round(backlog / drain_s, 1) if drain_s else None,
            "service_cpu_pct_of_core": round(100 * (service.cpu_s() - cpu0) / drain_s, 1)
            if drain_s else None}
        print("backlog", results["backlog"], flush=True)
    finally:
        in_parallel(lambda d: d.telemetry.stop(), devices)
        in_parallel(lambda d: d.updater.stop(), devices)
        in_parallel(lambda d: d.link.stop(), devices)
        time.sleep(1.0)
        if ledger is not None:
            wait_recorded(db_url, ledger.count(), 60)
        service.stop()
        if ledger is not None:
            seen, kept = ledger.digests, recorded(db_url)
            results["verify"] = {"delivered": len(seen), "recorded": len(kept),
                                 "missing": len(seen - kept), "extra": len(kept - seen)}
            print("verify", results["verify"], flush=True)
            ledger.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"figures written to {args.out}")
    return 0 if results.get("verify", {}).get("missing", 1) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Soak a real `sightline serve`: clients come, stream, vanish without goodbye, come back.

Starts the daemon (plain mode unless --curve) and --clients client slots. Each slot is a
client subprocess that streams the real astronaut photo (640x480; odd slots as bgr8, even
slots as JPEG, with pose and intrinsics) at camera rate through runtime.client.Client,
in sessions of random length that end by closing the socket abruptly with frames in
flight, then reconnecting. Every so often the supervisor SIGKILLs a slot's whole process
(the kernel closes its socket mid-stream) and starts a fresh one.

Every --interval seconds it samples the daemon's RSS (/proc/PID/status VmRSS), open fds
(/proc/PID/fd) and threads (/proc/PID/status Threads) into the CSV. The summary compares
the end of the run with the end of the warm-up, which is the first 10% of the run.
Targets: RSS drift < 5% after warm-up; no growth in fds or threads.

    python bench/soak_daemon.py                          # 30 minutes, 4 clients
    python bench/soak_daemon.py --minutes 3 --csv soak.csv --json soak.json   # smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from daemon_process import DaemonProcess, astronaut_frame, server_settings

from runtime.client import Client

WARM_UP_FRACTION = 0.10
# Per-slot counters in shared memory: written by the slot's process (or the supervisor,
# for kills), read by the sampler; they survive a SIGKILLed process.
FIELDS = ("sessions", "connect_failures", "abrupt_closes", "kills", "sent", "not_sent",
          "results", "dropped", "errors", "lost")
F = {name: i for i, name in enumerate(FIELDS)}
POSE = [1.0, 0.0, 0.0, 0.1, 0.0, 1.0, 0.0, 1.6, 0.0, 0.0, 1.0, -0.3, 0.0, 0.0, 0.0, 1.0]
INTRINSICS = [500.0, 500.0, 320.0, 240.0]


def client_process(slot: int, endpoint: str, seed: int, fps: float, session_s: tuple,
                   keys: dict, counters) -> None:
    """Sessions of random length, each ending in an abrupt close, until killed."""
    rng = random.Random(seed)
    frame = astronaut_frame()
    jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
    use_jpeg = slot % 2 == 1
    period = 1.0 / fps
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we die
    while True:
        client = Client(endpoint, max_in_flight=2, reply_timeout=2.0, **keys)
        if not client.wait_connected(10):
            counters[F["connect_failures"]] += 1
            client.close()
            continue
        counters[F["sessions"]] += 1
        end = time.monotonic() + rng.uniform(*session_s)
        next_send = time.monotonic()
        while time.monotonic() < end:
            delay = next_send - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_send += period
            ts = time.time()
            if use_jpeg:
                seq = client.send_jpeg(jpeg, 640, 480, capture_ts=ts, pose=POSE,
                                       intrinsics=INTRINSICS)
            else:
                seq = client.send(frame, capture_ts=ts, pose=POSE, intrinsics=INTRINSICS)
            counters[F["sent" if seq is not None else "not_sent"]] += 1
            for reply in client.replies(timeout=0):
                if reply.kind == "result":
                    counters[F["results"]] += 1
                elif reply.kind in ("dropped", "lost"):
                    counters[F[reply.kind]] += 1
                elif reply.kind == "error":
                    counters[F["errors"]] += 1
        # Vanish without a goodbye: close the socket (linger 0) with frames in flight.
        counters[F["abrupt_closes"]] += 1
        client.close()
        time.sleep(rng.uniform(0.0, 1.0))


class Slot:
    """One client slot: a subprocess that the supervisor kills and restarts now and then."""

    def __init__(self, index: int, args: argparse.Namespace, endpoint: str, keys: dict,
                 context) -> None:
        self.index = index
        self.args = args
        self.endpoint = endpoint
        self.keys = keys
        self.context = context
        self.counters = context.Array("q", len(FIELDS), lock=False)
        self.rng = random.Random(args.seed * 7919 + index)
        self.process = None
        self.restarts = 0

    def start(self) -> None:
        self.process = self.context.Process(
            target=client_process, name=f"soak-client-{self.index}",
            args=(self.index, self.endpoint, self.rng.randrange(2**32), self.args.fps,
                  tuple(self.args.session_s), self.keys, self.counters))
        self.process.start()

    def supervise(self, stop: threading.Event) -> None:
        self.start()
        while not stop.is_set():
            lifetime = self.rng.uniform(*self.args.lifetime_s)
            if stop.wait(lifetime):
                break
            self.process.kill()  # SIGKILL: no close, no goodbye, sockets torn down by the kernel
            self.process.join()
            self.counters[F["kills"]] += 1
            self.restarts += 1
            self.start()
        self.process.kill()
        self.process.join()

    def count(self, name: str) -> int:
        return self.counters[F[name]]


def final_frame_check(daemon: DaemonProcess, frame: np.ndarray) -> str:
    with Client(daemon.endpoint, max_in_flight=1, **daemon.client_keys) as client:
        if not client.wait_connected(10):
            return "not connected"
        seq = client.send(frame)
        while True:
            reply = client.recv(timeout=5)
            if reply is None:
                return "no reply"
            if reply.seq == seq:
                return (f"result, {len(reply.detections)} detection(s)" if reply.ok
                        else reply.error or reply.kind)


def summarise(rows: list[dict], duration_s: float) -> dict:
    warm_end = duration_s * WARM_UP_FRACTION
    warm = [r for r in rows if r["elapsed_s"] <= warm_end]
    post = [r for r in rows if r["elapsed_s"] >= warm_end]
    if not warm or not post:
        return {}
    base, end = post[0], rows[-1]
    t = np.array([r["elapsed_s"] for r in post])
    rss = np.array([r["rss_mib"] for r in post])
    slope = float(np.polyfit(t, rss, 1)[0] * 3600) if len(post) >= 3 else None
    return {
        "warm_up": f"first {WARM_UP_FRACTION:.0%} of the run ({warm_end:.0f} s)",
        "rss_after_warm_up_mib": base["rss_mib"], "rss_at_warm_up_s": base["elapsed_s"],
        "rss_end_mib": end["rss_mib"],
        "rss_drift_percent": 100 * (end["rss_mib"] - base["rss_mib"]) / base["rss_mib"],
        "rss_max_after_warm_up_mib": float(rss.max()),
        "rss_max_drift_percent": 100 * (float(rss.max()) - base["rss_mib"]) / base["rss_mib"],
        "rss_slope_mib_per_hour": slope,
        "fds_warm_up_max": max(r["fds"] for r in warm),
        "fds_max_after_warm_up": max(r["fds"] for r in post), "fds_end": end["fds"],
        "threads_warm_up_max": max(r["threads"] for r in warm),
        "threads_max_after_warm_up": max(r["threads"] for r in post),
        "threads_end": end["threads"],
    }


def run(args: argparse.Namespace) -> dict:
    duration = args.minutes * 60.0
    limits = server_settings(args.config)
    context = mp.get_context("spawn")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sl-soak-") as tmp:
        endpoint = args.bind or f"ipc://{tmp}/sightline.sock"
        daemon = DaemonProcess(endpoint, Path(tmp), curve=args.curve, config=args.config)
        print(f"starting sightline serve on {endpoint}, {daemon.mode}", flush=True)
        # Under CURVE each simulated headset has its own enrolled key: one key would be
        # one headset, served on its newest connection only.
        keys = [daemon.enrol_headset(f"soak-{i}") if daemon.curve else {}
                for i in range(args.clients)]
        daemon.start()
        slots = [Slot(i, args, endpoint, keys[i], context) for i in range(args.clients)]
        stop = threading.Event()
        supervisors = [threading.Thread(target=s.supervise, args=(stop,),
                                        name=f"supervisor-{s.index}") for s in slots]
        print(f"soaking for {args.minutes:g} min with {args.clients} clients at "
              f"{args.fps:g} fps; sampling every {args.interval:g} s", flush=True)
        started = time.monotonic()
        for supervisor in supervisors:
            supervisor.start()
        csv_file = open(args.csv, "w", newline="") if args.csv else None  # noqa: SIM115
        writer = None
        died_at = None
        try:
            while True:
                elapsed = time.monotonic() - started
                if not daemon.alive():
                    died_at = elapsed
                    break
                sample = daemon.sample()
                total = {name: sum(s.count(name) for s in slots) for name in FIELDS}
                row = {"elapsed_s": round(elapsed, 1),
                       "rss_mib": round(sample.rss_kib / 1024, 2),
                       "peak_rss_mib": round(sample.peak_rss_kib / 1024, 2),
                       "fds": sample.fds, "threads": sample.threads,
                       "cpu_s": round(sample.cpu_s, 1),
                       "frames_served": total["results"],
                       "sessions": total["sessions"], "kills": total["kills"],
                       "dropped": total["dropped"], "lost": total["lost"],
                       "errors": total["errors"]}
                rows.append(row)
                if csv_file is not None:
                    if writer is None:
                        writer = csv.DictWriter(csv_file, fieldnames=list(row))
                        writer.writeheader()
                    writer.writerow(row)
                    csv_file.flush()
                print(f"  {elapsed:6.0f} s  rss {row['rss_mib']:7.1f} MiB  fds {row['fds']:3}  "
                      f"threads {row['threads']:3}  served {row['frames_served']:>7}  "
                      f"sessions {row['sessions']:>4}  kills {row['kills']:>3}", flush=True)
                if elapsed >= duration:
                    break
                time.sleep(min(args.interval, max(0.0, duration - elapsed)))
        finally:
            stop.set()
            for supervisor in supervisors:
                supervisor.join()
            if csv_file is not None:
                csv_file.close()
        alive = daemon.alive()
        time.sleep(1.0)
        pong = daemon.ping(5) if alive else None
        frame_check = final_frame_check(daemon, astronaut_frame()) if alive else "daemon dead"
        exit_code = daemon.stop()
        problems = daemon.log_problems()
    totals = {name: sum(s.count(name) for s in slots) for name in FIELDS}
    return {
        "mode": daemon.mode, "endpoint_kind": endpoint.split("://")[0],
        "config": str(args.config) if args.config else None,
        "client_timeout_s": limits.client_timeout_s, "max_clients": limits.max_clients,
        "minutes": args.minutes, "clients": args.clients, "fps": args.fps,
        "interval_s": args.interval, "session_s": args.session_s,
        "lifetime_s": args.lifetime_s, "seed": args.seed,
        "samples": len(rows), "daemon_died_at_s": died_at,
        "frames_served": totals["results"],
        "client_reconnects": totals["sessions"] - args.clients,
        "client_totals": totals,
        **summarise(rows, duration),
        "daemon_alive_at_end": alive, "ping_at_end": pong is not None,
        "real_frame_at_end": frame_check, "exit_code_on_sigterm": exit_code,
        "daemon_log_problems": problems,
    }


def print_summary(r: dict) -> None:
    print()
    print(f"Sightline daemon soak — {r['mode']}, {r['endpoint_kind']} endpoint, "
          f"config: {r['config'] or 'defaults'}")
    print(f"{r['minutes']:g} min, {r['clients']} clients at {r['fps']:g} fps, "
          f"{r['samples']} samples every {r['interval_s']:g} s")
    t = r["client_totals"]
    print(f"frames served (results): {r['frames_served']:,} of {t['sent']:,} sent "
          f"(dropped {t['dropped']:,}, lost {t['lost']:,}, errors {t['errors']:,}, "
          f"not sent {t['not_sent']:,})")
    print(f"client reconnects: {r['client_reconnects']:,} ({t['abrupt_closes']:,} abrupt "
          f"socket closes, {t['kills']:,} client processes SIGKILLed, "
          f"{t['connect_failures']:,} failed connects)")
    if r.get("warm_up"):
        ok = r["rss_drift_percent"] < 5.0
        print(f"warm-up: {r['warm_up']}")
        print(f"RSS after warm-up {r['rss_after_warm_up_mib']:.1f} MiB (at "
              f"{r['rss_at_warm_up_s']:.0f} s), at end {r['rss_end_mib']:.1f} MiB: drift "
              f"{r['rss_drift_percent']:+.2f}% ({'PASS' if ok else 'FAIL'}, target < 5%); "
              f"max after warm-up {r['rss_max_after_warm_up_mib']:.1f} MiB "
              f"({r['rss_max_drift_percent']:+.2f}%)"
              + (f"; trend {r['rss_slope_mib_per_hour']:+.1f} MiB/h"
                 if r["rss_slope_mib_per_hour"] is not None else ""))
        for what in ("fds", "threads"):
            grew = r[f"{what}_max_after_warm_up"] > r[f"{what}_warm_up_max"]
            print(f"{what}: warm-up max {r[f'{what}_warm_up_max']}, max after warm-up "
                  f"{r[f'{what}_max_after_warm_up']}, end {r[f'{what}_end']} "
                  f"({'GREW' if grew else 'no growth'})")
    died = r["daemon_died_at_s"]
    print(f"daemon: {'no crash' if died is None else f'DIED at {died:.0f} s'}; alive at end "
          f"{r['daemon_alive_at_end']}, ping {r['ping_at_end']}, real frame from a "
          f"fresh connection: {r['real_frame_at_end']}; exit code on SIGTERM "
          f"{r['exit_code_on_sigterm']}; log: {r['daemon_log_problems']['tracebacks']} "
          f"traceback(s), {r['daemon_log_problems']['error_lines']} ERROR line(s)")


def pair(text: str) -> tuple[float, float]:
    low, high = (float(v) for v in text.split(","))
    return low, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--fps", type=float, default=30.0, help="frames/s per client")
    parser.add_argument("--session-s", type=pair, default=(3.0, 30.0), metavar="MIN,MAX",
                        help="a session's length before an abrupt close (default 3,30)")
    parser.add_argument("--lifetime-s", type=pair, default=(15.0, 90.0), metavar="MIN,MAX",
                        help="a client process's life before it is SIGKILLed (default 15,90)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--config", type=Path, help="daemon TOML config, passed to serve")
    parser.add_argument("--curve", action="store_true", help="CURVE daemon (throwaway keys)")
    parser.add_argument("--bind", help="daemon endpoint (default: a fresh ipc:// socket)")
    parser.add_argument("--csv", type=Path, help="write the samples here")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args()
    result = run(args)
    print_summary(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.csv:
        print(f"samples in {args.csv}")
    failed = (result["daemon_died_at_s"] is not None or not result.get("warm_up")
              or result["rss_drift_percent"] >= 5.0
              or result["fds_max_after_warm_up"] > result["fds_warm_up_max"]
              or result["threads_max_after_warm_up"] > result["threads_warm_up_max"])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

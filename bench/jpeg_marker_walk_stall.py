"""Reproduction: a `jpeg` frame of SOI + 0xFF fill bytes stalled the model pipeline.

runtime/daemon/decode.py `jpeg_size` walked JPEG markers in pure Python, one byte per loop turn
over fill bytes (0xFF 0xFF ...), RST markers or 2-byte APPn segments, before any size
check. A payload of up to max_frame_bytes (32 MiB) of such bytes cost the model's
prepare thread seconds of CPU, during which no other client's frame was decoded: their
frames expired (dropped) or timed out (lost). The walk is now bounded (MAX_MARKER_STEPS);
on fixed code the hostile frames are answered DECODE_FAILED within milliseconds and the
well-behaved client sees no change. Before the fix, on the development machine: a 32 MiB
frame every 2 s was answered after 3.2 s and cost the client 3 lost and 2 dropped frames
in 10 s; a 2 MiB frame every 0.1 s left it 13 results and 18 drops in 10 s (p50 239 ms).

Starts `sightline serve --plain`, streams the astronaut frame from a well-behaved client
(max_in_flight=1, 30 fps), then has a second connection send one hostile frame every
--every-s seconds for --seconds, and prints what the well-behaved client got.

    python bench/jpeg_marker_walk_stall.py                 # 32 MiB - 2 of 0xFF, every 2 s
    python bench/jpeg_marker_walk_stall.py --size-mib 1 --every-s 0.25
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import zmq
from daemon_process import DaemonProcess, astronaut_frame

from runtime.client import Client


def stream(client: Client, frame: np.ndarray, seconds: float) -> tuple[Counter, list[float]]:
    kinds: Counter = Counter()
    round_trips: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seq = client.send(frame)
        reply = None
        while seq is not None:
            reply = client.recv(timeout=5)
            if reply is None or reply.seq == seq:
                break
        kinds[reply.kind if reply else "no_reply"] += 1
        if reply is not None and reply.ok:
            round_trips.append(reply.round_trip_s * 1e3)
        time.sleep(1 / 30)
    return kinds, round_trips


def show(label: str, kinds: Counter, round_trips: list[float]) -> None:
    p50 = f"{np.percentile(round_trips, 50):.0f} ms" if round_trips else "-"
    print(f"{label:<34} replies {dict(kinds)}  result p50 {p50}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=32.0,
                        help="hostile payload size (capped at 32 MiB - 2, the default limit)")
    parser.add_argument("--every-s", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    size = min(int(args.size_mib * (1 << 20)), (32 << 20) - 2)
    body = b"\xff\xd8" + b"\xff" * size
    with tempfile.TemporaryDirectory(prefix="sl-stall-") as tmp:
        daemon = DaemonProcess(f"ipc://{tmp}/sightline.sock", Path(tmp))
        daemon.start()
        frame = astronaut_frame()
        with Client(daemon.endpoint, max_in_flight=1) as client:
            client.wait_connected(10)
            stream(client, frame, 1.0)  # warm-up
            show("alone", *stream(client, frame, 3.0))
            answered: list[str] = []
            stop = threading.Event()

            def attack() -> None:
                socket = zmq.Context.instance().socket(zmq.DEALER)
                socket.setsockopt(zmq.LINGER, 0)
                socket.connect(daemon.endpoint)
                sent: dict[int, float] = {}
                seq = 0
                next_at = time.monotonic()
                while not stop.is_set():
                    if time.monotonic() >= next_at:
                        seq += 1
                        header = {"v": 1, "seq": seq, "w": 640, "h": 480, "enc": "jpeg"}
                        socket.send_multipart([msgpack.packb(header), body], copy=False)
                        sent[seq] = time.monotonic()
                        next_at += args.every_s
                    if socket.poll(20):
                        reply = msgpack.unpackb(socket.recv())
                        after = time.monotonic() - sent.pop(reply["seq"])
                        answered.append(f"{reply.get('code') or reply.get('reason')} "
                                        f"{after:.2f} s")
                socket.close()

            attacker = threading.Thread(target=attack, name="attacker")
            attacker.start()
            kinds, round_trips = stream(client, frame, args.seconds)
            stop.set()
            attacker.join()
            show(f"with a {size / (1 << 20):.1f} MiB frame every {args.every_s:g} s",
                 kinds, round_trips)
            print(f"{'':<34} hostile frames answered: {', '.join(answered[:12])}"
                  + (f" ... ({len(answered)} in all)" if len(answered) > 12 else ""))
            time.sleep(4)
            show("after", *stream(client, frame, 3.0))
        print(f"daemon alive: {daemon.alive()}, ping: {daemon.ping() is not None}, "
              f"exit on SIGTERM: {daemon.stop()}")


if __name__ == "__main__":
    main()

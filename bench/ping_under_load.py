"""Ping round trip while a ~35 ms model is busy, against the same daemon idle (same run).

docs/protocol.md §4.5 says a ping is answered at once, without waiting behind frames. This
starts a real `sightline serve` (plain, ipc) serving a raw model of about 35 ms per frame
(tests/onnx_models.slow_conv_model, two 64-channel 3x3 convolutions at 128x128), measures
`--pings` ping round trips on an idle daemon, then again while a second connection keeps
one frame always in flight (the model busy all the time), and prints median / p99 / max
of each and their ratio.

    .venv/bin/python bench/ping_under_load.py [--pings 400] [--inline on|auto|off]
        [--daemon-code DIR]   (run the daemon from another checkout, for a before/after)
        [--threads N]         (the daemon's inference threads: leave a core to the I/O)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.onnx_models import fixed_raw_bundle, slow_conv_model  # noqa: E402

FRAME = np.zeros((128, 128, 3), np.uint8)


def _dealer(endpoint: str) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    return socket


def _pings(endpoint: str, count: int) -> list[float]:
    socket = _dealer(endpoint)
    trips = []
    try:
        for seq in range(count + 5):
            time.sleep(random.uniform(0.002, 0.012))  # land anywhere in an inference
            started = time.perf_counter()
            socket.send(msgpack.packb({"v": 1, "type": "ping", "seq": seq}))
            while True:
                if not socket.poll(5000):
                    raise RuntimeError("no pong within 5 s")
                if msgpack.unpackb(socket.recv())["seq"] == seq:
                    break
            if seq >= 5:  # the first ones pay for the connection
                trips.append(time.perf_counter() - started)
    finally:
        socket.close()
    return trips


def _keep_busy(endpoint: str, stop: threading.Event, served: list[float]) -> None:
    """One frame always in flight: the model never idles."""
    socket = _dealer(endpoint)
    header = {"v": 1, "w": 128, "h": 128, "enc": "bgr8"}
    seq = 0
    try:
        while not stop.is_set():
            seq += 1
            socket.send_multipart([msgpack.packb({**header, "seq": seq}), FRAME.tobytes()])
            while socket.poll(5000):
                reply = msgpack.unpackb(socket.recv())
                if reply["seq"] == seq:
                    t = reply.get("t", {})
                    if "inferred" in t:
                        served.append(t["inferred"] - t["started"])
                    break
    finally:
        socket.close()


def _summary(label: str, trips: list[float]) -> float:
    ms = sorted(t * 1000 for t in trips)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(f"{label:<26} n={len(ms):4d}  median {statistics.median(ms):7.3f} ms  "
          f"p99 {p99:7.3f} ms  max {ms[-1]:7.3f} ms")
    return p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=400)
    parser.add_argument("--inline", choices=("on", "auto", "off"), default="auto")
    parser.add_argument("--daemon-code", type=Path, help="checkout to run the daemon from")
    parser.add_argument("--threads", type=int, help="the daemon's inference threads")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sl-ping-"))
    bundle = fixed_raw_bundle(tmp / "slow", slow_conv_model(layers=2), "slow", "x", 128, 128)
    config = tmp / "c.toml"
    config.write_text(f'[server]\ninline_inference = "{args.inline}"\ndeadline_ms = 2000.0\n')
    endpoint = f"ipc://{tmp}/s.sock"
    log = (tmp / "serve.log").open("w")  # noqa: SIM115 (closed after the daemon stops)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--plain", "--bind", endpoint,
         "--control", f"ipc://{tmp}/c.sock", "--model", str(bundle.directory),
         "--config", str(config),
         *(["--threads", str(args.threads)] if args.threads is not None else [])],
        cwd=args.daemon_code or Path(__file__).resolve().parents[1], stdout=log,
        stderr=subprocess.STDOUT)
    try:
        _pings(endpoint, 5)  # waits for the daemon to be up (warm-up included)
        print(f"daemon code: {args.daemon_code or 'this checkout'}; inline_inference = "
              f"{args.inline}; load average before: {os.getloadavg()[0]:.2f}")
        idle = _summary("ping, daemon idle", _pings(endpoint, args.pings))
        stop, served = threading.Event(), []
        busy_thread = threading.Thread(target=_keep_busy, args=(endpoint, stop, served),
                                       name="keep-busy")
        busy_thread.start()
        time.sleep(0.5)
        try:
            busy = _summary("ping, model busy", _pings(endpoint, args.pings))
        finally:
            stop.set()
            busy_thread.join()
        inference = statistics.median(served) * 1000 if served else float("nan")
        print(f"model: median inference {inference:.1f} ms over {len(served)} frames "
              f"(started -> inferred); p99 busy / idle = {busy / idle:.2f}; "
              f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        daemon.terminate()
        daemon.wait(15)
        log.close()


if __name__ == "__main__":
    main()

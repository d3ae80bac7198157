"""Where the time outside the daemon goes: the Python client SDK vs a bare DEALER socket.

Starts `sightline serve` on an ipc endpoint, then alternates one frame through a plain
DEALER socket and one through `runtime.client.Client`, 640x480 BGR, and prints the
median time each spends outside the daemon (round trip minus the daemon's own
received -> sent span), plus a bare 900 KB ROUTER/DEALER echo for the transport alone.

    python bench/client_overhead.py [--samples 300]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time

import cv2
import numpy as np
import zmq

from runtime.client import Client, query_info
from runtime.models.assets import ASTRONAUT_PNG, fetch_asset
from runtime.protocol import decode_reply, encode_request


def echo_round_trips(payload: bytes, samples: int, endpoint: str) -> list[float]:
    context = zmq.Context.instance()
    stop = threading.Event()

    def echo() -> None:
        router = context.socket(zmq.ROUTER)
        router.bind(endpoint)
        while not stop.is_set():
            if router.poll(100):
                parts = router.recv_multipart(copy=False)
                router.send_multipart([parts[0], b"ok"])
        router.close(linger=0)

    thread = threading.Thread(target=echo, name="echo")
    thread.start()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(endpoint)
    time.sleep(0.2)
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        dealer.send_multipart([b"h", payload], copy=False)
        dealer.recv()
        times.append((time.perf_counter() - start) * 1e3)
    dealer.close(linger=0)
    stop.set()
    thread.join()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    frame = cv2.resize(cv2.imread(str(fetch_asset(ASTRONAUT_PNG))), (640, 480))
    with tempfile.TemporaryDirectory(prefix="sl-overhead-") as tmp:
        endpoint = f"ipc://{tmp}/d.sock"
        daemon = subprocess.Popen([sys.executable, "-m", "runtime.cli", "--log-level", "warning",
                                   "serve", "--plain", "--bind", endpoint,
                                   "--control", f"ipc://{tmp}/control.sock"],
                                  stdout=subprocess.DEVNULL)
        try:
            while query_info(endpoint, 0.5) is None:
                time.sleep(0.1)
            dealer = zmq.Context.instance().socket(zmq.DEALER)
            dealer.connect(endpoint)
            client = Client(endpoint, max_in_flight=1)
            client.wait_connected(10)
            outside = {"bare DEALER": [], "Client SDK": []}
            for seq in range(args.samples + 20):
                start = time.perf_counter()
                dealer.send_multipart([encode_request(
                    {"seq": seq, "w": 640, "h": 480, "enc": "bgr8"}), frame], copy=False)
                stamps = decode_reply(dealer.recv())["t"]
                rt = time.perf_counter() - start
                outside["bare DEALER"].append((rt - (stamps["sent"] - stamps["received"])) * 1e3)
                start = time.perf_counter()
                client.send(frame)
                reply = client.recv(10)
                rt = time.perf_counter() - start
                stamps = reply.stamps
                outside["Client SDK"].append((rt - (stamps["sent"] - stamps["received"])) * 1e3)
            client.close()
            dealer.close(linger=0)
        finally:
            daemon.terminate()
            daemon.wait(15)
        echo = echo_round_trips(frame.tobytes(), args.samples, f"ipc://{tmp}/echo.sock")
    print(f"{'path':<36}{'p50 ms':>8}{'p99 ms':>8}")
    for name, values in outside.items():
        values = values[20:]  # warm-up
        print(f"{name + ' (outside the daemon)':<36}{np.median(values):8.2f}"
              f"{np.percentile(values, 99):8.2f}")
    print(f"{'900 KB ipc echo (transport only)':<36}{np.median(echo):8.2f}"
          f"{np.percentile(echo, 99):8.2f}")


if __name__ == "__main__":
    main()

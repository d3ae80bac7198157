"""Does spatial work slow the model down? Model fps and p99 with and without depth frames.

One `sightline serve` process (plain, ipc). Two clients keep 2 frames in flight each for
`--seconds` per window; windows alternate, `--rounds` times:
- 2D: both clients send the 640x480 astronaut frame without depth;
- depth: client B sends the synthetic RGB-D astronaut with `planes` and `spatial`, its
  camera pose jumping 30 cm every frame so the planes are recomputed for every frame
  (the worst case: the plane cache would normally reuse them).
Reported per window kind (medians over rounds): client A's results/s and p99, B's, and
the engine's rate (distinct engine calls per second, from the reply stamps).

    python bench/spatial_offload.py [--seconds 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from exporters.zoo import default_bundle
from runtime.client import Client, Reply, query_info
from runtime.tools.depth_scene import astronaut_rgbd


def stream(endpoint: str, frames: list, seconds: float, depth: bool) -> dict:
    """Results/s, p99 ms and the engine calls' start stamps for one client."""
    latencies: list[float] = []
    started: set[float] = set()
    stop = threading.Event()
    turn = [0]

    def send(client: Client) -> None:
        frame = frames[turn[0] % len(frames)]
        turn[0] += 1
        if not depth:
            client.send(frame.color)
            return
        pose = np.eye(4)
        pose[0, 3] = 0.3 * (turn[0] % 2)  # 30 cm jumps: planes recomputed every frame
        client.send(frame.color, depth=frame.depth, intrinsics=frame.intrinsics.to_wire(),
                    pose=pose.ravel().tolist(), spatial=True, planes=True)

    def on_reply(reply: Reply) -> None:
        if reply.ok:
            latencies.append(reply.round_trip_s * 1e3)
            started.add(reply.stamps.get("started", 0.0))
        if not stop.is_set():
            send(client)

    client = Client(endpoint, max_in_flight=2, on_reply=on_reply)
    try:
        client.wait_connected(10)
        begin = time.perf_counter()
        send(client)
        send(client)
        time.sleep(seconds)
        stop.set()
        elapsed = time.perf_counter() - begin
    finally:
        client.close()
    p99 = float(np.percentile(latencies, 99)) if latencies else float("nan")
    return {"fps": len(latencies) / elapsed, "p99": p99, "started": started,
            "elapsed": elapsed}


def window(endpoint: str, frames: list, seconds: float, depth: bool) -> dict:
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda k=k, d=d: results.__setitem__(
        k, stream(endpoint, frames, seconds, d))) for k, d in (("A", False), ("B", depth))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    calls = len(results["A"]["started"] | results["B"]["started"])
    return {"A fps": results["A"]["fps"], "A p99": results["A"]["p99"],
            "B fps": results["B"]["fps"], "B p99": results["B"]["p99"],
            "engine calls/s": calls / results["A"]["elapsed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bundle = default_bundle(show_progress=False)
    frames = list(astronaut_rgbd(8))
    with tempfile.TemporaryDirectory(prefix="sl-spatial-") as tmp:
        endpoint = f"ipc://{tmp}/d.sock"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "--log-level", "warning", "serve", "--plain",
             "--bind", endpoint, "--model", str(bundle.directory), "--control",
             f"ipc://{tmp}/c.sock"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while query_info(endpoint, 0.5) is None:
                time.sleep(0.2)
            rows: dict[str, list[dict]] = {"2D": [], "depth": []}
            for _ in range(args.rounds):
                for kind in rows:
                    rows[kind].append(window(endpoint, frames, args.seconds, kind == "depth"))
        finally:
            daemon.terminate()
            daemon.wait(15)
    keys = list(rows["2D"][0])
    print(f"{'window':8s}" + "".join(f"{k:>16s}" for k in keys))
    medians = {kind: {k: float(np.median([r[k] for r in runs])) for k in keys}
               for kind, runs in rows.items()}
    for kind, figures in medians.items():
        print(f"{kind:8s}" + "".join(f"{figures[k]:16.2f}" for k in keys))
    ratio = medians["depth"]["engine calls/s"] / medians["2D"]["engine calls/s"]
    print(f"engine calls/s with depth / without: {ratio:.3f}; client A (2D in both) fps "
          f"ratio {medians['depth']['A fps'] / medians['2D']['A fps']:.3f}, p99 ratio "
          f"{medians['depth']['A p99'] / medians['2D']['A p99']:.3f}")


if __name__ == "__main__":
    main()

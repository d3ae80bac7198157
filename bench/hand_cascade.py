"""The hand cascade (palm detection -> hand landmarks) with and without ROI tracking, on the
same steady sequence of the synthetic hand, through a real `sightline serve` process.

Per mode: how often the palm detector ran, how many landmark runs, results/s with one
frame in flight (send, wait, send), and the client's round trip p50/p99. Modes alternate
`--rounds` times; the figures are medians over rounds.

    python bench/hand_cascade.py [--frames 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from exporters.zoo import tflite_bundle
from runtime.client import Client, query_info
from runtime.tools.demo_presets import HAND_CASCADE
from runtime.tools.hand_scene import draw_hand

ROI_KEYS = ("track_roi", "roi_margin", "roi_shift_y", "roi_rotate_from")


def config_text(palm: Path, hand: Path, roi: bool) -> str:
    lines = [f'models = ["{palm}"]', "[[cascades]]", 'on = "palm-detection"',
             f'run = "{hand}"']
    for key, value in HAND_CASCADE.model_dump().items():
        if key in ("on", "run") or value is None or (key in ROI_KEYS and not roi):
            continue
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value) if not isinstance(value, str) else f'"{value}"'


def run_mode(tmp: Path, palm: Path, hand: Path, roi: bool, frames: list) -> dict:
    config = tmp / f"hand-{roi}.toml"
    config.write_text(config_text(palm, hand, roi))
    endpoint = f"ipc://{tmp}/hand-{roi}.sock"
    process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--plain",
                                "--bind", endpoint, "--control", f"ipc://{tmp}/c-{roi}.sock",
                                "--config", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while query_info(endpoint, timeout=0.5) is None:
            if process.poll() is not None:
                raise SystemExit(f"sightline serve exited with {process.returncode}")
        trips, detector, landmarks = [], 0, 0
        with Client(endpoint) as client:
            client.wait_connected(10)
            start = time.perf_counter()
            for i, image in enumerate(frames):
                client.send(image, capture_ts=i / 30)
                reply = client.recv(timeout=10)
                assert reply is not None and reply.ok, reply
                trips.append(reply.round_trip_s * 1e3)
                detector += not reply.detector_skipped
                landmarks += sum(len(d.children) for d in reply.detections)
            elapsed = time.perf_counter() - start
        return {"detector runs": detector, "landmark results": landmarks,
                "results/s": len(frames) / elapsed,
                "round trip p50 ms": float(np.percentile(trips, 50)),
                "round trip p99 ms": float(np.percentile(trips, 99))}
    finally:
        process.terminate()
        process.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    palm = tflite_bundle("palm-detection").directory
    hand = tflite_bundle("hand-landmarks").directory
    image, _ = draw_hand()
    frames = [image] * args.frames
    runs: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="sl-") as tmp:
        for _ in range(args.rounds):
            for roi in (False, True):
                runs[roi].append(run_mode(Path(tmp), palm, hand, roi, frames))
    print(f"{args.frames} frames of the steady synthetic hand, medians of {args.rounds} rounds")
    keys = list(runs[True][0])
    print(f"{'mode':<28}" + "".join(f"{k:>20}" for k in keys))
    for roi, label in ((False, "palm detector every frame"), (True, "ROI tracking")):
        medians = [statistics.median(r[k] for r in runs[roi]) for k in keys]
        print(f"{label:<28}" + "".join(f"{v:>20.1f}" for v in medians))
    base = statistics.median(r["results/s"] for r in runs[False])
    tracked = statistics.median(r["results/s"] for r in runs[True])
    print(f"results/s ratio, ROI tracking / every frame: {tracked / base:.2f}")


if __name__ == "__main__":
    main()

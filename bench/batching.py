"""Dynamic batching across clients: throughput and p99, batched vs unbatched, 1/2/4 clients.

Two `sightline serve` processes per model (plain, ipc): one with `server.max_batch = 4`,
one with `max_batch = 1`. For 1, 2 and 4 clients each keeping 2 frames in flight, windows
alternate between the two daemons, `--rounds` times; medians are reported. Models: a
small classifier built here (conv -> global pool, 224x224 input, dynamic batch) and the
default CenterFace model.

    python bench/batching.py [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from exporters.zoo import default_bundle
from runtime.client import query_info
from runtime.models.assets import ASTRONAUT_PNG, fetch_asset
from runtime.models.bundle import (
    Bundle,
    InputSpec,
    Manifest,
    OnnxFile,
    Preprocess,
    SizePolicy,
    write_bundle,
)
from runtime.tools.bench_rates import server_rate
from tests.onnx_models import conv_pool_model

CLIENT_COUNTS = (1, 2, 4)


def classifier_bundle(directory: Path) -> Bundle:
    data = conv_pool_model(batch="batch", height=224, width=224).SerializeToString()
    manifest = Manifest(
        name="classifier", version="1", task="raw",
        input=InputSpec(name="image", size=SizePolicy(mode="fixed", width=224, height=224)),
        preprocess=Preprocess(color="rgb", scale=1 / 255, resize="stretch"),
        onnx=OnnxFile(sha256=hashlib.sha256(data).hexdigest()))
    return write_bundle(directory, manifest, data)


def start(tmp: Path, name: str, bundle: Bundle, max_batch: int) -> tuple[subprocess.Popen, str]:
    config = tmp / f"{name}.toml"
    config.write_text(f"[server]\nmax_batch = {max_batch}\n")
    endpoint = f"ipc://{tmp}/{name}.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "--log-level", "warning", "serve", "--plain",
         "--config", str(config), "--bind", endpoint, "--model", str(bundle.directory),
         "--control", f"ipc://{tmp}/{name}-control.sock"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while query_info(endpoint, 0.5) is None:
        if process.poll() is not None:
            raise SystemExit(f"the {name} daemon exited with {process.returncode}")
        time.sleep(0.2)
    return process, endpoint


def measure(bundle: Bundle, frame: np.ndarray, tmp: Path, seconds: float, rounds: int) -> None:
    daemons = {"batched": start(tmp, f"{bundle.name}-b4", bundle, 4),
               "unbatched": start(tmp, f"{bundle.name}-b1", bundle, 1)}
    try:
        figures: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for _ in range(rounds):
            for count in CLIENT_COUNTS:
                for mode, (_, endpoint) in daemons.items():
                    latencies: list[float] = []
                    rate = server_rate(endpoint, {}, frame, count, seconds,
                                       latencies=latencies)
                    figures.setdefault((mode, count), []).append(
                        (rate, float(np.percentile(latencies, 99))))
    finally:
        for process, _ in daemons.values():
            process.terminate()
            process.wait(15)
    print(f"\n{bundle.name}: results/s and p99 ms (medians of {rounds} interleaved rounds)")
    print(f"{'clients':>8s} {'unbatched fps':>14s} {'p99':>8s} {'batched fps':>12s} "
          f"{'p99':>8s} {'fps ratio':>10s}")
    for count in CLIENT_COUNTS:
        plain = np.median(figures[("unbatched", count)], axis=0)
        batched = np.median(figures[("batched", count)], axis=0)
        print(f"{count:8d} {plain[0]:14.1f} {plain[1]:8.1f} {batched[0]:12.1f} "
              f"{batched[1]:8.1f} {batched[0] / plain[0]:10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-default-model", action="store_true")
    args = parser.parse_args()
    frame = np.ascontiguousarray(
        cv2.resize(cv2.imread(str(fetch_asset(ASTRONAUT_PNG))), (640, 480)))
    with tempfile.TemporaryDirectory(prefix="sl-batch-") as tmp:
        measure(classifier_bundle(Path(tmp) / "classifier"), frame, Path(tmp), args.seconds,
                args.rounds)
        if not args.skip_default_model:
            measure(default_bundle(show_progress=False), frame, Path(tmp), args.seconds,
                    args.rounds)


if __name__ == "__main__":
    main()

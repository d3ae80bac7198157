"""What the spatial layer costs per frame: anchors, cached planes, tracking and smoothing.

One 640x480 depth frame (uint16 mm, registered to a 1280x960 colour frame) of the
synthetic room the tests use, with 5 detections. Prints p50/p99 over many runs of:
anchors for the 5 detections with the planes cached (with and without Open3D oriented
boxes), tracking + One Euro smoothing of the 5, and a full plane recompute. Figures only;
nothing is asserted.

    python bench/spatial_bench.py [--runs 2000] [--recomputes 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def percentiles(samples_ms: list[float]) -> str:
    p50, p99 = np.percentile(samples_ms, (50, 99))
    return f"p50 {p50:8.3f} ms   p99 {p99:8.3f} ms   (n={len(samples_ms)})"


def timed(fn: Callable[[], object], runs: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--recomputes", type=int, default=30)
    args = parser.parse_args()

    # The scene renderer lives with the tests; bench scripts run from a checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from runtime.results import Detection
    from runtime.spatial.anchors import AnchorParams, compute_anchors
    from runtime.spatial.camera import DepthFrame
    from runtime.spatial.open3d_loader import load_open3d
    from runtime.spatial.planes import PlaneCache, PlaneIds, PlaneParams, detect_planes
    from runtime.spatial.tracking import Tracker
    from tests.runtime.spatial import scenes

    start = time.perf_counter()
    load_open3d()
    print(f"import open3d (once per process):      {(time.perf_counter() - start) * 1e3:8.1f} ms")

    rng = np.random.default_rng(0)
    exact, _ = scenes.render(scenes.HOME)
    depth = scenes.millimetres(scenes.sensor(exact, rng))
    frame = DepthFrame(depth, scenes.COLOR_K, scenes.COLOR_SIZE, scenes.HOME)
    detections = [
        scenes.detection_of(scenes.FACE, scenes.HOME, landmarks=True),
        scenes.detection_of(scenes.POSTER, scenes.HOME),
        Detection(box=(200.0, 150.0, 330.0, 280.0), score=0.8, label="object"),  # wall
        Detection(box=(500.0, 700.0, 700.0, 900.0), score=0.8, label="object"),  # floor
        Detection(box=(900.0, 600.0, 1000.0, 700.0), score=0.8, label="object"),  # floor
    ]
    print(f"depth {depth.shape[1]}x{depth.shape[0]} {depth.dtype}, colour "
          f"{scenes.COLOR_SIZE[0]}x{scenes.COLOR_SIZE[1]}, {len(detections)} detections")

    cache = PlaneCache()
    first = cache.update(frame)
    print(f"first plane computation:               {first.compute_ms:8.1f} ms "
          f"({len(first.planes)} planes)")

    with_obb, without_obb = AnchorParams(), AnchorParams(oriented_boxes=False)

    def frame_with_obb() -> None:
        cache.update(frame)
        compute_anchors(frame, detections, with_obb)

    def frame_without_obb() -> None:
        cache.update(frame)
        compute_anchors(frame, detections, without_obb)

    print("anchors x5 + cached planes, with OBB:  ", percentiles(timed(frame_with_obb, args.runs)))
    print("anchors x5 + cached planes, no OBB:    ",
          percentiles(timed(frame_without_obb, args.runs)))

    anchors = compute_anchors(frame, detections, without_obb)
    # Inputs made up front so only the tracker is timed: the 5 boxes and their landmarks
    # sway 2 px a frame back and forth with 1 px of jitter, each with its anchor.
    sequence = []
    for step in range(240):
        shift = 2.0 * (step % 120 if step % 240 < 120 else 120 - step % 120)
        sequence.append([
            Detection(box=tuple(np.add(d.box, shift + rng.normal(0, 1.0, 4)).tolist()),
                      score=d.score, label=d.label,
                      landmarks=tuple((x + shift, y + shift) for x, y in d.landmarks))
            for d in detections
        ])
    tracker = Tracker()
    clock = [0]

    def track() -> None:
        clock[0] += 1
        tracker.update(sequence[clock[0] % len(sequence)], clock[0] / 30.0, anchors)

    print("tracking + smoothing x5:               ", percentiles(timed(track, args.runs)))
    track()
    ids = [t.track_id for t in tracker.update(sequence[(clock[0] + 1) % len(sequence)],
                                              (clock[0] + 1) / 30.0, anchors)]
    print(f"  track ids after {clock[0] + 1} frames: {ids}")

    ids = PlaneIds()
    params = PlaneParams()
    print("plane recompute (detect + ids):        ",
          percentiles(timed(lambda: ids.assign(detect_planes(frame, params)),
                            args.recomputes, warmup=3)))


if __name__ == "__main__":
    main()

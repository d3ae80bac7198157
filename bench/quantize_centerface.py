"""FP32 vs FP16 vs INT8 CenterFace on this machine, 640x480 frames, through `sightline quantize`.

Writes the demo's astronaut pan-and-zoom (640x480 BGR frames): even frames calibrate,
odd frames check. Then runs, and echoes, for each precision:

    sightline quantize centerface --precision P --calib DIR/calib --eval DIR/eval \\
                      --runs 300 --out DIR/centerface-P

and prints one table from the two reports. Each report times FP32 and its variant
alternately in the same loop, so compare ratios across the two runs, not raw milliseconds.

    python bench/quantize_centerface.py [--runs 300] [--frames 48] [--dir quantize-bench]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
from rich.console import Console
from rich.table import Table

from exporters.quantize import REPORT_NAME
from runtime.tools.demo_frames import astronaut_sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--dir", type=Path, default=Path("quantize-bench"))
    args = parser.parse_args()

    calib, check = args.dir / "calib", args.dir / "eval"
    for folder in (calib, check):
        folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(astronaut_sequence(args.frames)):
        cv2.imwrite(str((calib if i % 2 == 0 else check) / f"frame{i:03d}.png"), frame)

    reports = {}
    for precision in ("fp16", "int8"):
        out = args.dir / f"centerface-{precision}"
        command = ["sightline", "quantize", "centerface", "--precision", precision,
                   "--calib", str(calib), "--eval", str(check), "--runs", str(args.runs),
                   "--out", str(out)]
        print("$", shlex.join(command), flush=True)
        subprocess.run([sys.executable, "-m", "runtime.cli", *command[1:]], check=True)
        reports[precision] = json.loads((out / REPORT_NAME).read_text())

    table = Table(title=f"CenterFace, 640x480, {args.runs} interleaved runs per pair, "
                        f"{reports['int8']['provider']}", title_justify="left")
    for column in ("variant", "fp32 p50 ms", "variant p50 ms", "p50 ratio", "fp32 p99 ms",
                   "variant p99 ms", "recall", "precision", "mean IoU", "MB"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for precision, report in reports.items():
        lat, boxes = report["latency"], report["boxes"]
        table.add_row(precision, f"{lat['fp32_p50_ms']:.2f}", f"{lat['variant_p50_ms']:.2f}",
                      f"{lat['ratio_p50']:.2f}", f"{lat['fp32_p99_ms']:.2f}",
                      f"{lat['variant_p99_ms']:.2f}", f"{boxes['recall']:.3f}",
                      f"{boxes['precision']:.3f}", f"{boxes['mean_iou']:.3f}",
                      f"{report['variant']['bytes'] / 1e6:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()

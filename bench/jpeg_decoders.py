"""Which JPEG decoder the daemon should use: OpenCV, simplejpeg and PyTurboJPEG, at full size
and with libjpeg-turbo's DCT scaling (1/2, 1/4), on the astronaut photo at quality 85.

Interleaved: each sample decodes the same JPEG once with every decoder in turn (the order
rotating), so all see the same machine load. Prints p50 and p99 per decoder and size, the
ratio to OpenCV's full-size decode in the same run, and each output's mean difference from
OpenCV's at the same scale (they all wrap libjpeg-turbo: it should be ~0).

    python bench/jpeg_decoders.py --samples 400

PyTurboJPEG loads the system libturbojpeg (`apt-get install libturbojpeg0`; PyTurboJPEG
2.x needs libjpeg-turbo >= 3.0, Debian 12 has 2.1: use 'PyTurboJPEG<2' there); it is left
out, with the reason, when it cannot load.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import cv2
import numpy as np

from runtime.models.assets import ASTRONAUT_PNG, fetch_asset

SIZES = ((640, 480), (1280, 720))
DENOMINATORS = (1, 2, 4)
_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}
Decoder = Callable[[bytes], np.ndarray]


def decoders(width: int, height: int, d: int) -> tuple[dict[str, Decoder], list[str]]:
    """name -> decode(jpeg) at scale 1/d; and why any decoder is missing."""
    flags = _REDUCED[d] | cv2.IMREAD_IGNORE_ORIENTATION
    found: dict[str, Decoder] = {
        "cv2.imdecode": lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), flags)}
    missing = []
    out_w, out_h = -(-width // d), -(-height // d)
    try:
        import simplejpeg

        buffer = np.empty((out_h, out_w, 3), np.uint8)
        found["simplejpeg"] = lambda data: simplejpeg.decode_jpeg(
            data, colorspace="BGR", min_width=out_w, min_height=out_h)
        found["simplejpeg, reused buffer"] = lambda data: simplejpeg.decode_jpeg(
            data, colorspace="BGR", min_width=out_w, min_height=out_h, buffer=buffer)
    except ImportError as exc:
        missing.append(f"simplejpeg: {exc}")
    try:
        from turbojpeg import TJPF_BGR, TurboJPEG

        turbo = TurboJPEG()
        dst = np.empty((out_h, out_w, 3), np.uint8)
        factor = (1, d)
        found["PyTurboJPEG"] = lambda data: turbo.decode(data, pixel_format=TJPF_BGR,
                                                         scaling_factor=factor)
        found["PyTurboJPEG, reused dst"] = lambda data: turbo.decode(
            data, pixel_format=TJPF_BGR, scaling_factor=factor, dst=dst)
    except (ImportError, OSError, RuntimeError) as exc:
        missing.append(f"PyTurboJPEG: {exc}".splitlines()[0])
    return found, missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400, help="decodes per decoder and case")
    parser.add_argument("--quality", type=int, default=85)
    args = parser.parse_args()
    photo = cv2.imread(str(fetch_asset(ASTRONAUT_PNG)))
    missing: list[str] = []
    print(f"{'case':<22} {'decoder':<26} {'p50 ms':>7} {'p99 ms':>7} {'vs cv2 full':>11} "
          f"{'mean |diff|':>11}")
    for width, height in SIZES:
        frame = cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, args.quality])
        assert ok
        data = encoded.tobytes()
        cases = {d: decoders(width, height, d) for d in DENOMINATORS}
        missing = cases[1][1]
        series = {(d, name): [] for d, (found, _) in cases.items() for name in found}
        calls = [(key, cases[key[0]][0][key[1]]) for key in series]
        for _, decode in calls:  # warm-up, and the outputs to compare
            decode(data)
        for i in range(args.samples):
            shift = i % len(calls)
            for key, decode in calls[shift:] + calls[:shift]:
                start = time.perf_counter()
                decode(data)
                series[key].append((time.perf_counter() - start) * 1e3)
        full = float(np.median(series[(1, "cv2.imdecode")]))
        for (d, name), values in series.items():
            reference = cases[d][0]["cv2.imdecode"](data).astype(np.int16)
            image = cases[d][0][name](data)
            diff = (f"{np.abs(image.astype(np.int16) - reference).mean():.3f}"
                    if image.shape == reference.shape else f"shape {image.shape}")
            p50, p99 = np.percentile(values, [50, 99])
            case = f"{width}x{height} ({len(data) // 1024} KB) 1/{d}"
            print(f"{case:<22} {name:<26} {p50:7.3f} {p99:7.3f} {full / p50:10.2f}x {diff:>11}")
    for line in missing:
        print(f"not measured: {line}")


if __name__ == "__main__":
    main()

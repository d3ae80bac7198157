"""Where should a frame be resized on a CPU engine? OpenCV on the host vs ONNX Runtime's
CPU Resize kernel in the fused graph, interleaved, same frame, same run.

    python bench/resize_kernels.py [--samples 200] [--threads 2]

Prints p50/p99 per path and the ratio to OpenCV. runtime/fusion/open.py resizes on the host
for CPU engines and in the graph for GPU ones because of what this measures.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _resize_session(threads: int, nchw_float: bool, size: tuple[int, int]):
    width, height = size
    nodes, sizes = [], [1, height, width, 3]
    x = "frame"
    if nchw_float:
        nodes += [helper.make_node("Transpose", [x], ["t"], perm=[0, 3, 1, 2]),
                  helper.make_node("Cast", ["t"], ["c"], to=TensorProto.FLOAT)]
        x, sizes = "c", [1, 3, height, width]
    nodes.append(helper.make_node("Resize", [x, "", "", "sizes"], ["out"], mode="linear",
                                  coordinate_transformation_mode="half_pixel"))
    graph = helper.make_graph(
        nodes, "resize",
        [helper.make_tensor_value_info("frame", TensorProto.UINT8, ["n", "h", "w", "c"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT if nchw_float
                                       else TensorProto.UINT8, ["a", "b", "c", "d"])],
        initializer=[numpy_helper.from_array(np.array(sizes, np.int64), "sizes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return lambda frame: session.run(None, {"frame": frame[None]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for src, dst in (((1280, 720), (640, 360)), ((640, 480), (512, 384))):
        frame = cv2.GaussianBlur(rng.integers(0, 256, (src[1], src[0], 3), np.uint8),
                                 (0, 0), 2)
        paths = {"cv2.resize (host, uint8)": lambda f, d=dst: cv2.resize(f, d),
                 "ORT Resize uint8 NHWC": _resize_session(args.threads, False, dst),
                 "ORT Resize float NCHW": _resize_session(args.threads, True, dst)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(5):
            for fn in paths.values():
                fn(frame)
        for _ in range(args.samples):
            for name, fn in paths.items():
                start = time.perf_counter()
                fn(frame)
                times[name].append((time.perf_counter() - start) * 1e3)
        base = float(np.median(times["cv2.resize (host, uint8)"]))
        print(f"{src[0]}x{src[1]} -> {dst[0]}x{dst[1]}, {args.samples} interleaved samples, "
              f"{args.threads} ORT threads")
        for name, series in times.items():
            p50, p99 = np.percentile(series, [50, 99])
            print(f"  {name:28s} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  x{p50 / base:5.1f}")


if __name__ == "__main__":
    main()

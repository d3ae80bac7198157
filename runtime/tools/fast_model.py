"""The bench's fast stand-in engine: a small real ONNX model that infers in well under a
millisecond on a CPU, so `sightline bench --model fast` shows what the daemon costs around
an engine as quick as a GPU's (a TensorRT engine runs in 1-5 ms; CenterFace on this CPU
takes 18). An 8x8 average pool and a 1x1 convolution: cheap, but it reads every pixel.

Only the ONNX bytes are made here; `sightline bench` imports them as a bundle with the
importer (`sightline import fast.onnx --task raw --fixed-size 640x480`), which runtime
itself may not import.
"""

from __future__ import annotations

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAME = "features"
OPSET = 17


def fast_model_bytes(width: int = 640, height: int = 480, features: int = 4) -> bytes:
    """A 1x3xHxW float32 -> 1 x features x H/8 x W/8 model, with fixed seeded weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(19).standard_normal((features, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("AveragePool", [INPUT_NAME], ["pooled"], kernel_shape=[8, 8],
                          strides=[8, 8]),
         helper.make_node("Conv", ["pooled", "weights", "bias"], [OUTPUT_NAME])],
        "sightline_bench_fast",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                       [1, features, height // 8, width // 8])],
        [numpy_helper.from_array(weights, "weights"),
         numpy_helper.from_array(np.zeros(features, np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="sightline bench")
    model.ir_version = 8  # readable by every ONNX Runtime the project supports
    onnx.checker.check_model(model)
    return model.SerializeToString()

"""The bundle's preprocessing as ONNX operators in front of the model: uint8 frame in.

Two flavours, chosen per engine. `resize_in_graph`: the frame arrives at its own size and
the letterbox/stretch resize, pad, colour order, scale/mean/std and layout all run in the
engine (a GPU does the arithmetic and the host copies a quarter of the float bytes).
Host-resize: the frame arrives already at the model's input size (OpenCV resizes and pads
uint8 on the host only when the sizes differ: ONNX Runtime's CPU Resize kernel measured
7-20x slower than cv2.resize here, see docs/performance.md), and the engine does the rest.
Either way the Python Preprocessor (runtime/models/preprocess.py) is the reference.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from runtime.fusion.graph import GraphWriter
from runtime.models.bundle import Manifest
from runtime.models.engine_cache import FUSED_FRAME

# uint8 [N, H, W, C]: the decoded frame, as it came (the TensorRT profile names it too)
FRAME = FUSED_FRAME
CHANNELS = "sightline_channels"  # int64 [C_model]: source channel for each model channel
SIZES = "sightline_sizes"  # int64 [4]: the resized (inner) image, in the model's layout
PADS = "sightline_pads"  # int64 [8]: ONNX Pad's begin/end pads, in the model's layout


def model_channels(manifest: Manifest) -> int:
    return 1 if manifest.preprocess.color == "gray" else 3


def gain_bias(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """value = pixel * gain + bias per channel, folded exactly as the Preprocessor folds it."""
    pre = manifest.preprocess
    std = np.asarray(pre.std, dtype=np.float32)
    gain = (pre.scale / std).astype(np.float32)
    bias = (-np.asarray(pre.mean, dtype=np.float32) / std).astype(np.float32)
    return gain, bias


def build_prefix(w: GraphWriter, manifest: Manifest, *, resize_in_graph: bool,
                 cast_first: bool = False,
                 affine: tuple[np.ndarray, np.ndarray] | None = None) -> list:
    """Append the preprocessing nodes to `w`; their last output is the model's input name.
    Returns the new graph inputs (value infos). `cast_first`: convert to float before any
    other operator (native TensorRT runs few layers on uint8); otherwise the transpose
    and channel gather move uint8, a quarter of the bytes. `affine`: the (gain, bias) left
    to apply here (default: the manifest's; compose folds what it can into the model)."""
    cast_first = cast_first or resize_in_graph
    nchw = manifest.input.layout == "NCHW"
    channel_axis = 1 if nchw else 3
    inputs = [helper.make_tensor_value_info(FRAME, TensorProto.UINT8,
                                            ["frame_n", "frame_h", "frame_w", "frame_c"]),
              helper.make_tensor_value_info(CHANNELS, TensorProto.INT64,
                                            [model_channels(manifest)])]
    x = FRAME
    if cast_first:  # Resize interpolates in float, too
        x = w.op("Cast", x, to=TensorProto.FLOAT)
    if nchw:  # still uint8 on the host-resize flavour: a quarter of the bytes to move
        x = w.op("Transpose", x, perm=[0, 3, 1, 2])
    x = w.op("Gather", x, CHANNELS, axis=channel_axis)
    if resize_in_graph:
        inputs += [helper.make_tensor_value_info(SIZES, TensorProto.INT64, [4]),
                   helper.make_tensor_value_info(PADS, TensorProto.INT64, [8])]
        # half_pixel linear without antialiasing is what cv2.INTER_LINEAR computes.
        x = w.op("Resize", x, "", "", SIZES, mode="linear",
                 coordinate_transformation_mode="half_pixel")
        pad_value = w.const(float(manifest.preprocess.pad_value), hint="pad_value")
        x = w.op("Pad", x, PADS, pad_value, mode="constant")
    elif not cast_first:
        x = w.op("Cast", x, to=TensorProto.FLOAT)
    gain, bias = affine if affine is not None else gain_bias(manifest)
    shape = (1, -1, 1, 1) if nchw else (1, 1, 1, -1)
    steps = []
    if not np.all(gain == 1.0):
        steps.append(("Mul", gain))
    if not np.all(bias == 0.0):
        steps.append(("Add", bias))
    if not steps:
        w.op("Identity", x, outputs=[manifest.input.name])
        return inputs
    for i, (op_type, value) in enumerate(steps):
        const = w.const(value.reshape(shape), hint=op_type.lower())
        last = i == len(steps) - 1
        x = w.op(op_type, x, const, outputs=[manifest.input.name] if last else 1)
    return inputs

"""Small ONNX models built with onnx.helper, shared by the import, engine and task tests.

Each builder returns an `onnx.ModelProto` that the real ONNX Runtime can run, some of
them carrying on purpose the defects real exported files have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
# Pinned rather than onnx.IR_VERSION so a newer onnx package cannot outrun the installed ORT.
IR_VERSION = 8
CONV_OUT_CHANNELS = 4


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _model(graph: onnx.GraphProto, opset: int = OPSET, ir_version: int = IR_VERSION,
           extra_opsets: tuple[tuple[str, int], ...] = ()) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(domain, version) for domain, version in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="sightline-tests")
    model.ir_version = ir_version
    return model


def conv_weights(in_channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The fixed weights `conv_relu_model` uses, so tests can compute its output themselves."""
    rng = np.random.default_rng(42)
    weight = rng.uniform(-1, 1, (CONV_OUT_CHANNELS, in_channels, 3, 3)).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, CONV_OUT_CHANNELS).astype(np.float32)
    return weight, bias


def conv_relu_model(
    *,
    batch: int | str = 1,
    height: int | str = "height",
    width: int | str = "width",
    channels: int = 3,
    layout: str = "NCHW",
    ir_version: int = IR_VERSION,
    opset: int = OPSET,
    initializers_as_inputs: bool = False,
    unused_initializer: bool = False,
    value_info: bool = False,
) -> onnx.ModelProto:
    """image -> Conv(3x3, stride 1, pad 1) -> Relu -> features [N, 4, H, W].

    `initializers_as_inputs` lists the weights in graph.input too (the IR < 4 habit),
    `unused_initializer` adds a tensor no node reads (BatchNorm's num_batches_tracked),
    `value_info` records the intermediate shape the way a careful exporter would.
    NHWC models transpose to NCHW first, as TensorFlow exports do.
    """
    weight, bias = conv_weights(channels)
    if layout == "NCHW":
        image_shape = [batch, channels, height, width]
        nodes = [helper.make_node("Conv", ["image", "W", "B"], ["conv"], pads=[1, 1, 1, 1])]
    else:
        image_shape = [batch, height, width, channels]
        nodes = [
            helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["nchw", "W", "B"], ["conv"], pads=[1, 1, 1, 1]),
        ]
    nodes.append(helper.make_node("Relu", ["conv"], ["features"]))
    initializers = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
    if unused_initializer:
        initializers.append(numpy_helper.from_array(np.array(7, dtype=np.int64),
                                                    "bn.num_batches_tracked"))
    feature_shape = [batch, CONV_OUT_CHANNELS, height, width]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, image_shape)]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                   for i in initializers]
    graph = helper.make_graph(
        nodes, "conv_relu", inputs,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, feature_shape)],
        initializer=initializers,
        value_info=([helper.make_tensor_value_info("conv", TensorProto.FLOAT, feature_shape)]
                    if value_info else []),
    )
    return _model(graph, opset=opset, ir_version=ir_version)


def conv_reference(image_nchw: np.ndarray, relu: bool = True) -> np.ndarray:
    """What `conv_relu_model` computes (its Conv alone with relu=False), written out in numpy."""
    weight, bias = conv_weights(image_nchw.shape[1])
    _, _, height, width = image_nchw.shape
    padded = np.pad(image_nchw.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((image_nchw.shape[0], CONV_OUT_CHANNELS, height, width))
    for dy in range(3):
        for dx in range(3):
            window = padded[:, :, dy:dy + height, dx:dx + width]
            out += np.einsum("nchw,oc->nohw", window, weight[:, :, dy, dx].astype(np.float64))
    out += bias[None, :, None, None]
    return (np.maximum(out, 0) if relu else out).astype(np.float32)


def conv_pool_model(*, batch: int | str = 10, height: int | str = 32,
                    width: int | str = 32) -> onnx.ModelProto:
    """image -> Conv -> GlobalAveragePool -> Flatten -> logits [N, 4]: a classifier head."""
    weight, bias = conv_weights()
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "W", "B"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["logits"]),
        ],
        "conv_pool",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, height, width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CONV_OUT_CHANNELS])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    return _model(graph)


def constant_output_model(values: np.ndarray, *, output: str = "output0",
                          input_shape: tuple[int | str, ...] = (1, 3, "height", "width"),
                          ) -> onnx.ModelProto:
    """Output = values + 0 * mean(image): a fixed prediction that still depends on the input.

    The dependency keeps ONNX Runtime from treating the graph as input-free and lets the
    tests feed real preprocessed frames through a real session.
    """
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0),
            helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
            helper.make_node("Add", ["prediction", "nothing"], [output]),
        ],
        "constant_output",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, list(values.shape))],
        initializer=[
            numpy_helper.from_array(values.astype(np.float32), "prediction"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ],
    )
    return _model(graph)


def affine_argmax_model() -> onnx.ModelProto:
    """x [batch, 3, h, w] -> scaled = 2x + 1 (float), best = argmax over channels (int64)."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["doubled"]),
            helper.make_node("Add", ["doubled", "one"], ["scaled"]),
            helper.make_node("ArgMax", ["x"], ["best"], axis=1, keepdims=0),
        ],
        "affine_argmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", 3, "h", "w"]),
            helper.make_tensor_value_info("best", TensorProto.INT64, ["batch", "h", "w"]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        ],
    )
    return _model(graph)


def two_input_model() -> onnx.ModelProto:
    """An image plus a second real input (e.g. a prompt embedding): not an image model."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["image", "bias"], ["out"])],
        "two_inputs",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 3, 32, 32]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 32, 32])],
    )
    return _model(graph)


def sequence_input_model() -> onnx.ModelProto:
    """A 3-D [batch, tokens, features] input: not an image."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["tokens"], ["out"])],
        "sequence",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, 16, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, 8])],
    )
    return _model(graph)


def custom_op_model() -> onnx.ModelProto:
    """A valid graph whose only op lives in a custom domain no ORT build implements."""
    graph = helper.make_graph(
        [helper.make_node("FancyUpsample", ["image"], ["out"], domain="com.example.vendor")],
        "custom_op",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 64, 64])],
    )
    return _model(graph, extra_opsets=(("com.example.vendor", 1),))


def branch_on_initializer_model() -> onnx.ModelProto:
    """image -> If(flag) whose branches read outer-scope initializers only a subgraph uses.

    Detection exports with built-in post-processing carry If/Loop nodes like this; the
    weights their branches read appear in no top-level node's inputs.
    """
    then_graph = helper.make_graph(
        [helper.make_node("Mul", ["image", "then_gain"], ["then_out"])], "then_branch", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph(
        [helper.make_node("Mul", ["image", "else_gain"], ["else_out"])], "else_branch", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["out"], then_branch=then_graph,
                          else_branch=else_graph)],
        "branch",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, "height", "width"])],
        initializer=[
            numpy_helper.from_array(np.array(True), "flag"),
            numpy_helper.from_array(np.array(3.0, dtype=np.float32), "then_gain"),
            numpy_helper.from_array(np.array(5.0, dtype=np.float32), "else_gain"),
        ],
    )
    return _model(graph)


def probability_map_model(stride: int = 2) -> onnx.ModelProto:
    """image [1, 3, height, width] (dynamic) -> prob [1, 1, height/stride, width/stride]: the
    channel mean, average-pooled by `stride`.

    A stand-in for a third-party text detector's probability map that reproduces its input,
    so a square drawn on a frame can be found again in the output and mapped back.
    """
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["gray"], axes=[1], keepdims=1),
            helper.make_node("AveragePool", ["gray"], ["prob"], kernel_shape=[stride, stride],
                             strides=[stride, stride]),
        ],
        "probability_map",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1, "ph", "pw"])],
    )
    return _model(graph)


def fixed_raw_bundle(directory: Path, model: onnx.ModelProto, name: str, input_name: str,
                     width: int, height: int):
    """`model` as a raw-task bundle with a fixed input size (stretched RGB, /255)."""
    import hashlib

    from runtime.models.bundle import (
        InputSpec,
        Manifest,
        OnnxFile,
        Preprocess,
        SizePolicy,
        write_bundle,
    )

    data = model.SerializeToString()
    manifest = Manifest(
        name=name, version="1", task="raw",
        input=InputSpec(name=input_name, layout="NCHW",
                        size=SizePolicy(mode="fixed", width=width, height=height)),
        preprocess=Preprocess(color="rgb", scale=1 / 255, resize="stretch"),
        onnx=OnnxFile(sha256=hashlib.sha256(data).hexdigest()))
    return write_bundle(directory, manifest, data)



def slow_conv_model(*, layers: int = 4, channels: int = 64, size: int = 128) -> onnx.ModelProto:
    """x [1, 3, size, size] -> `layers` 3x3 convolutions of `channels` -> mean per channel
    [1, channels]: a model that keeps the CPU busy for a while (about 2 * layers *
    size^2 * channels^2 * 9 FLOPs) and replies with a small tensor, for tests and benches
    of what happens while a model is busy."""
    rng = np.random.default_rng(7)
    nodes, initializers, previous, in_channels = [], [], "x", 3
    for i in range(layers):
        weight = rng.uniform(-0.1, 0.1, (channels, in_channels, 3, 3)).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"W{i}"))
        nodes.append(helper.make_node("Conv", [previous, f"W{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        previous, in_channels = f"c{i}", channels
    nodes.append(helper.make_node("ReduceMean", [previous], ["mean"], axes=[2, 3], keepdims=0))
    graph = helper.make_graph(
        nodes, "slow_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, channels])],
        initializer=initializers)
    return _model(graph)

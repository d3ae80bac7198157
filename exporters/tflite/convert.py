"""Walk the TFLite graph in order, run each operator's handler, and assemble the ONNX model.

Every operator is checked for a handler before any is translated, so an unsupported model
is refused with the full list of what is missing, not the first gap found.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

import exporters.tflite.ops_math  # noqa: F401 (the handler modules register themselves)
import exporters.tflite.ops_nn  # noqa: F401
from exporters.tflite.ops_shape import densify, dequantize
from exporters.tflite.reader import Graph, read_graph
from exporters.tflite.registry import HANDLERS, GraphBuilder, OpContext
from runtime.errors import BundleError

OPSET = 17


def convert_tflite(path: Path) -> onnx.ModelProto:
    """The ONNX model computing what the .tflite model at `path` computes (NHWC in and out)."""
    graph = read_graph(path)
    missing = sorted({op.name for op in graph.operators if op.name not in HANDLERS})
    if missing:
        raise BundleError(f"{Path(path).name} uses TFLite operator{'s' * (len(missing) > 1)} "
                          f"{', '.join(missing)} that the importer cannot translate yet")
    builder = GraphBuilder(graph)
    builder.constants.update(_constants(graph))
    for op in graph.operators:
        HANDLERS[op.name](OpContext(builder, op))
    inputs = [_value_info(graph, i, builder.names[i]) for i in graph.inputs]
    outputs = []
    for i in graph.outputs:
        if i in builder.constants:  # an output no operator computes: keep it an output
            builder.node("Identity", [builder.tensor_name(i)], [builder.names[i]])
        outputs.append(_value_info(graph, i, builder.names[i]))
    onnx_graph = helper.make_graph(builder.nodes, Path(path).stem, inputs, outputs,
                                   builder.initializers)
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="sightline-tflite")
    model.ir_version = 8  # opset 17's IR: ONNX Runtime releases of the last two years load it
    return model


def _constants(graph: Graph) -> dict[int, np.ndarray]:
    """Stored values as the handlers use them: dense, and float32 where they were stored as
    float16 or as quantised integers (weight-only quantisation: activations are float)."""
    constants = {}
    for tensor in graph.tensors:
        if tensor.data is None:
            continue
        values = densify(tensor, tensor.data) if tensor.sparsity is not None else tensor.data
        if values.dtype == np.float16 or (tensor.quantization is not None
                                          and values.dtype.kind in "iu"
                                          and values.dtype != np.int32):
            values = dequantize(tensor, values)
        constants[tensor.index] = values
    return constants


def _value_info(graph: Graph, index: int, name: str) -> onnx.ValueInfoProto:
    tensor = graph.tensors[index]
    if tensor.dtype != np.float32:
        raise BundleError(f"model input/output {tensor.name!r} is {tensor.dtype}; only float32 "
                          "inputs and outputs are supported (quantised models are not)")
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(tensor.shape))

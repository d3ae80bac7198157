"""One handler per TFLite operator, registered by name; the context a handler builds with.

A handler reads its operator's inputs and options through `OpContext` and adds ONNX nodes
(and initializers) that compute the operator's outputs, in TFLite's NHWC layout.
Constants stay numpy arrays until a node needs them, so a handler can fold them
(transpose a filter, dequantise it) instead of adding nodes that run every frame.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.tflite.reader import Graph, Operator, Tensor
from runtime.errors import BundleError

Handler = Callable[["OpContext"], None]
HANDLERS: dict[str, Handler] = {}


def handles(*names: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of the named TFLite operators."""
    def register(function: Handler) -> Handler:
        for name in names:
            HANDLERS[name] = function
        return function

    return register


def handler_for(op: Operator) -> Handler:
    handler = HANDLERS.get(op.name)
    if handler is None:
        raise BundleError(f"the TFLite operator {op.name} (operator #{op.index}) has no ONNX "
                          f"translation yet; supported: {', '.join(sorted(HANDLERS))}")
    return handler


# TFLite ActivationFunctionType -> what follows the operator
_ACTIVATIONS = {0: None, 1: ("Relu", None), 2: ("Clip", (-1.0, 1.0)), 3: ("Clip", (0.0, 6.0)),
                4: ("Tanh", None)}


class GraphBuilder:
    """The ONNX graph under construction, shared by every operator's context."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.constants: dict[int, np.ndarray] = {}  # tensor index -> float/int values
        self._emitted: set[int] = set()
        self._count = 0
        io = set(graph.inputs) | set(graph.outputs)
        self.names = {t.index: (t.name if t.index in io else f"t{t.index}")
                      for t in graph.tensors}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}__{self._count}"

    def initializer(self, values: np.ndarray, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
        return name

    def node(self, op_type: str, inputs: list[str], outputs: list[str] | None = None,
             **attributes) -> str:
        outputs = outputs or [self.fresh(op_type.lower())]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attributes))
        return outputs[0]

    def tensor_name(self, index: int) -> str:
        """The ONNX name of a TFLite tensor; a constant becomes an initializer on first use."""
        if index not in self.constants:
            return self.names[index]
        # A graph output that is a constant keeps its own name for the Identity giving it.
        name = self.names[index] + ("__value" if index in self.graph.outputs else "")
        if index not in self._emitted:
            self._emitted.add(index)
            self.initializers.append(numpy_helper.from_array(
                np.ascontiguousarray(self.constants[index]), name))
        return name


class OpContext:
    """What a handler sees of one operator."""

    def __init__(self, builder: GraphBuilder, op: Operator) -> None:
        self.builder = builder
        self.op = op
        self.options = op.options

    def tensor(self, i: int) -> Tensor:
        return self.builder.graph.tensors[self.op.inputs[i]]

    def has_input(self, i: int) -> bool:
        return i < len(self.op.inputs) and self.op.inputs[i] >= 0

    def input(self, i: int) -> str:
        return self.builder.tensor_name(self.op.inputs[i])

    def constant(self, i: int) -> np.ndarray:
        """Input i's values; the operator needs them known when the model is converted."""
        index = self.op.inputs[i]
        if index not in self.builder.constants:
            raise BundleError(f"{self.op.name} (operator #{self.op.index}) needs input {i} "
                              f"({self.tensor(i).name!r}) to be a constant; it is computed at "
                              "run time, which the importer does not handle")
        return self.builder.constants[index]

    def is_constant(self, i: int) -> bool:
        return self.op.inputs[i] in self.builder.constants

    def output(self, i: int = 0) -> str:
        return self.builder.names[self.op.outputs[i]]

    def output_tensor(self, i: int = 0) -> Tensor:
        return self.builder.graph.tensors[self.op.outputs[i]]

    def set_constant(self, values: np.ndarray, i: int = 0) -> None:
        """Fold: output i is known now (a dequantised weight); no node computes it."""
        self.builder.constants[self.op.outputs[i]] = values

    def node(self, op_type: str, inputs: list[str], outputs: list[str] | None = None,
             **attributes) -> str:
        return self.builder.node(op_type, inputs, outputs, **attributes)

    def initializer(self, values: np.ndarray, hint: str = "const") -> str:
        return self.builder.initializer(values, hint)

    def finish(self, op_type: str, inputs: list[str], activation: int = 0,
               **attributes) -> None:
        """Add the node computing output 0, followed by its fused activation if any."""
        fused = _ACTIVATIONS.get(activation, "unknown")
        if fused == "unknown":
            raise BundleError(f"{self.op.name} (operator #{self.op.index}) has fused activation "
                              f"{activation}, which the importer does not handle")
        if fused is None:
            self.node(op_type, inputs, [self.output()], **attributes)
            return
        raw = self.node(op_type, inputs, **attributes)
        self.activate(raw, fused, self.output())

    def activate(self, value: str, fused: tuple, out: str) -> str:
        kind, bounds = fused
        if bounds is None:
            return self.node(kind, [value], [out])
        low = self.initializer(np.float32(bounds[0]), "min")
        high = self.initializer(np.float32(bounds[1]), "max")
        return self.node("Clip", [value, low, high], [out])

    def to_nchw(self, value: str) -> str:
        return self.node("Transpose", [value], perm=[0, 3, 1, 2])

    def finish_nchw(self, op_type: str, inputs: list[str], activation: int = 0,
                    **attributes) -> None:
        """A spatial operator: run it in NCHW between transposes, output back in NHWC."""
        fused = _ACTIVATIONS.get(activation, "unknown")
        if fused == "unknown":
            raise BundleError(f"{self.op.name} (operator #{self.op.index}) has fused activation "
                              f"{activation}, which the importer does not handle")
        value = self.node(op_type, inputs, **attributes)
        if fused is not None:
            value = self.activate(value, fused, self.builder.fresh("act"))
        self.node("Transpose", [value], [self.output()], perm=[0, 2, 3, 1])

"""A small ONNX graph writer for the operators fusion prepends and appends.

Names are prefixed so they can never collide with the model's own tensors; constants
become initializers. Only what the prefix and suffix builders need, nothing general.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PREFIX = "sightline_"


class GraphWriter:
    """Collects nodes and initializers; `op()` returns the output name (or names)."""

    def __init__(self, tag: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._tag = tag
        self._ids = itertools.count()

    def name(self, hint: str) -> str:
        return f"{PREFIX}{self._tag}_{hint}_{next(self._ids)}"

    def const(self, value, dtype=np.float32, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1,
           hint: str | None = None, **attrs) -> str | list[str]:
        names = (outputs if isinstance(outputs, list)
                 else [self.name(hint or op_type.lower()) for _ in range(outputs)])
        self.nodes.append(helper.make_node(op_type, list(inputs), names,
                                           name=self.name(f"node_{op_type.lower()}"), **attrs))
        return names[0] if len(names) == 1 else names


ONNX_DTYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int64): TensorProto.INT64,
}

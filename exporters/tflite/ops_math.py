"""Element-wise arithmetic, activations and reductions. All layout-free: TFLite and ONNX
broadcast the same way (trailing axes), so tensors stay NHWC and no transpose is needed.
"""

from __future__ import annotations

import numpy as np

from exporters.tflite.registry import OpContext, handles

_BINARY = {"ADD": "Add", "SUB": "Sub", "MUL": "Mul", "DIV": "Div", "MAXIMUM": "Max",
           "MINIMUM": "Min", "POW": "Pow", "SQUARED_DIFFERENCE": None}
_UNARY = {"RELU": "Relu", "LOGISTIC": "Sigmoid", "TANH": "Tanh", "HARD_SWISH": "HardSwish",
          "EXP": "Exp", "ABS": "Abs", "SQRT": "Sqrt", "RSQRT": None, "NEG": "Neg",
          "LOG": "Log", "FLOOR": "Floor"}


@handles(*_BINARY)
def binary(ctx: OpContext) -> None:
    a, b = ctx.input(0), ctx.input(1)
    activation = getattr(ctx.options, "FusedActivationFunction", lambda: 0)()
    if ctx.op.name == "SQUARED_DIFFERENCE":
        difference = ctx.node("Sub", [a, b])
        ctx.finish("Mul", [difference, difference])
        return
    ctx.finish(_BINARY[ctx.op.name], [a, b], activation)


@handles(*_UNARY)
def unary(ctx: OpContext) -> None:
    if ctx.op.name == "RSQRT":
        ctx.finish("Reciprocal", [ctx.node("Sqrt", [ctx.input(0)])])
        return
    ctx.finish(_UNARY[ctx.op.name], [ctx.input(0)])


@handles("RELU6", "RELU_N1_TO_1", "RELU_0_TO_1")
def clipped_relu(ctx: OpContext) -> None:
    low, high = {"RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0),
                 "RELU_0_TO_1": (0.0, 1.0)}[ctx.op.name]
    ctx.finish("Clip", [ctx.input(0), ctx.initializer(np.float32(low), "min"),
                        ctx.initializer(np.float32(high), "max")])


@handles("LEAKY_RELU")
def leaky_relu(ctx: OpContext) -> None:
    ctx.finish("LeakyRelu", [ctx.input(0)], alpha=float(ctx.options.Alpha()))


@handles("PRELU")
def prelu(ctx: OpContext) -> None:
    # alpha broadcasts over the trailing (channel) axis, as ONNX PRelu's does
    ctx.finish("PRelu", [ctx.input(0), ctx.input(1)])


@handles("SOFTMAX")
def softmax(ctx: OpContext) -> None:
    beta = float(ctx.options.Beta()) if ctx.options is not None else 1.0
    value = ctx.input(0)
    if beta != 1.0:
        value = ctx.node("Mul", [value, ctx.initializer(np.float32(beta), "beta")])
    ctx.finish("Softmax", [value], axis=-1)


@handles("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN")
def reduce(ctx: OpContext) -> None:
    op_type = {"MEAN": "ReduceMean", "SUM": "ReduceSum", "REDUCE_MAX": "ReduceMax",
               "REDUCE_MIN": "ReduceMin"}[ctx.op.name]
    rank = len(ctx.tensor(0).shape)
    axes = sorted({int(a) % rank for a in np.atleast_1d(ctx.constant(1))})
    keep = int(bool(ctx.options.KeepDims())) if ctx.options is not None else 0
    if op_type == "ReduceSum":  # opset 13+: axes is an input for ReduceSum only
        ctx.finish(op_type, [ctx.input(0), ctx.initializer(np.array(axes, np.int64))],
                   keepdims=keep)
    else:
        ctx.finish(op_type, [ctx.input(0)], axes=axes, keepdims=keep)

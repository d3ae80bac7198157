"""Operators that move or convert values without arithmetic on them: reshape, concatenate,
pad, transpose, resize, slice, and the weight decoders (DEQUANTIZE, DENSIFY) that are
folded into constants when converting.
"""

from __future__ import annotations

import numpy as np

from exporters.tflite.reader import Tensor
from exporters.tflite.registry import OpContext, handles
from runtime.errors import BundleError


def dequantize(tensor: Tensor, values: np.ndarray) -> np.ndarray:
    """float32 values of a stored constant: float16 widened, int8/uint8 scaled back."""
    if values.dtype == np.float16:
        return values.astype(np.float32)
    quant = tensor.quantization
    if quant is None or values.dtype.kind not in "iu":
        return values
    shape = [1] * values.ndim
    if quant.scale.size > 1:
        shape[quant.axis] = quant.scale.size
    scale = quant.scale.reshape(shape)
    zero = quant.zero_point.reshape(shape) if quant.zero_point.size > 1 else quant.zero_point
    return ((values.astype(np.float32) - zero.astype(np.float32)) * scale).astype(np.float32)


def densify(tensor: Tensor, values: np.ndarray) -> np.ndarray:
    """The dense array a sparse constant stands for (TFLite's sparsity format: dimensions
    walked in traversal order, each dense or CSR, with optional blocks)."""
    sparsity = tensor.sparsity
    assert sparsity is not None
    rank = len(tensor.shape)
    order, block_map = sparsity.traversal_order, sparsity.block_map
    # block sizes: the dense sizes of the levels past the original rank
    block_sizes = [sparsity.levels[order.index(rank + b)][1] for b in range(len(block_map))]
    dense = np.zeros(tensor.shape, dtype=values.dtype)
    coords = [0] * len(order)

    def walk(level: int, parent: int) -> None:
        kind, size, segments, indices = sparsity.levels[level]
        if level == len(order):
            return
        if kind == "dense":
            children = ((parent * size + i, i) for i in range(size))
        else:
            children = ((j, int(indices[j])) for j in range(segments[parent], segments[parent + 1]))
        for position, coordinate in children:
            coords[order[level]] = coordinate
            if level == len(order) - 1:
                index = list(coords[:rank])
                for b, dim in enumerate(block_map):
                    index[dim] = index[dim] * block_sizes[b] + coords[rank + b]
                dense[tuple(index)] = values[position]
            else:
                walk(level + 1, position)

    walk(0, 0)
    return dense


@handles("DEQUANTIZE")
def dequantize_op(ctx: OpContext) -> None:
    tensor = ctx.tensor(0)
    if ctx.is_constant(0):  # a stored weight: already widened when read (convert.py)
        ctx.set_constant(ctx.constant(0))
        return
    if tensor.dtype != np.float16:
        raise BundleError(f"DEQUANTIZE (operator #{ctx.op.index}) of a computed "
                          f"{tensor.dtype} tensor: quantised activations are not supported")
    ctx.finish("Cast", [ctx.input(0)], to=1)


@handles("DENSIFY")
def densify_op(ctx: OpContext) -> None:
    ctx.set_constant(ctx.constant(0))  # constants are made dense when read (convert.py)


@handles("RESHAPE")
def reshape(ctx: OpContext) -> None:
    shape = [int(v) for v in ctx.output_tensor().shape]
    if shape and shape[0] == 1 and -1 not in shape[1:]:
        shape[0] = -1  # the batch dim stays free
    ctx.finish("Reshape", [ctx.input(0), ctx.initializer(np.array(shape, np.int64), "shape")])


@handles("SQUEEZE", "EXPAND_DIMS")
def squeeze(ctx: OpContext) -> None:
    shape = [-1, *ctx.output_tensor().shape[1:]] if ctx.output_tensor().shape else []
    ctx.finish("Reshape", [ctx.input(0), ctx.initializer(np.array(shape, np.int64), "shape")])


@handles("CONCATENATION")
def concatenation(ctx: OpContext) -> None:
    o = ctx.options
    inputs = [ctx.input(i) for i in range(len(ctx.op.inputs))]
    ctx.finish("Concat", inputs, o.FusedActivationFunction(), axis=int(o.Axis()))


@handles("PAD", "PADV2")
def pad(ctx: OpContext) -> None:
    paddings = ctx.constant(1).astype(np.int64)  # [rank, 2]: before, after
    inputs = [ctx.input(0), ctx.initializer(np.concatenate([paddings[:, 0], paddings[:, 1]]),
                                            "pads")]
    if ctx.op.name == "PADV2" and ctx.has_input(2):
        inputs.append(ctx.input(2))
    ctx.finish("Pad", inputs, mode="constant")


@handles("TRANSPOSE")
def transpose(ctx: OpContext) -> None:
    ctx.finish("Transpose", [ctx.input(0)], perm=[int(v) for v in ctx.constant(1)])


@handles("RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR")
def resize(ctx: OpContext) -> None:
    o = ctx.options
    batch, height, width, channels = ctx.output_tensor().shape
    if o.AlignCorners():
        mode = "align_corners"
    elif o.HalfPixelCenters():
        mode = "half_pixel" if ctx.op.name == "RESIZE_BILINEAR" else "tf_half_pixel_for_nn"
    else:
        mode = "asymmetric"
    sizes = ctx.initializer(np.array([batch, channels, height, width], np.int64), "sizes")
    linear = ctx.op.name == "RESIZE_BILINEAR"
    extra = {} if linear else {"nearest_mode": "round_prefer_ceil" if o.AlignCorners()
                                else "floor"}
    ctx.finish_nchw("Resize", [ctx.to_nchw(ctx.input(0)), "", "", sizes],
                    mode="linear" if linear else "nearest",
                    coordinate_transformation_mode=mode, **extra)


@handles("STRIDED_SLICE")
def strided_slice(ctx: OpContext) -> None:
    o = ctx.options
    if o.EllipsisMask() or o.NewAxisMask() or o.ShrinkAxisMask():
        raise BundleError(f"STRIDED_SLICE (operator #{ctx.op.index}) with ellipsis, new-axis "
                          "or shrink masks is not supported")
    begin, end, steps = (ctx.constant(i).astype(np.int64) for i in (1, 2, 3))
    big = np.iinfo(np.int64).max
    for axis in range(len(begin)):
        if o.BeginMask() >> axis & 1:
            begin[axis] = 0 if steps[axis] > 0 else big
        if o.EndMask() >> axis & 1:
            end[axis] = big if steps[axis] > 0 else -big
    axes = np.arange(len(begin), dtype=np.int64)
    ctx.finish("Slice", [ctx.input(0), ctx.initializer(begin, "starts"),
                         ctx.initializer(end, "ends"), ctx.initializer(axes, "axes"),
                         ctx.initializer(steps, "steps")])

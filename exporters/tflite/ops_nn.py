"""Spatial and dense layers: convolutions (plain, depthwise, MediaPipe's transposed one with
bias), pooling, fully connected. Filters are re-laid out for ONNX when converting, not at
run time; padding is made explicit from the static shapes (TFLite SAME puts the odd pixel
after, like ONNX SAME_UPPER, but spelling it out also covers the transposed convolution).
"""

from __future__ import annotations

import struct

import numpy as np

from exporters.tflite.registry import OpContext, handles
from runtime.errors import BundleError

SAME, VALID = 0, 1  # tflite.Padding


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TFLite's SAME padding of one axis: (before, after)."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _pads(ctx: OpContext, padding: int, kernel: tuple[int, int], strides: tuple[int, int],
          dilations: tuple[int, int] = (1, 1)) -> list[int]:
    if padding == VALID:
        return [0, 0, 0, 0]
    _, height, width, _ = ctx.tensor(0).shape
    top, bottom = same_pads(height, kernel[0], strides[0], dilations[0])
    left, right = same_pads(width, kernel[1], strides[1], dilations[1])
    return [top, left, bottom, right]


def _bias(ctx: OpContext, index: int) -> list[str]:
    return [ctx.input(index)] if ctx.has_input(index) else []


@handles("CONV_2D")
def conv_2d(ctx: OpContext) -> None:
    o = ctx.options
    weights = ctx.constant(1)  # [out, kh, kw, in]
    strides, dilations = (o.StrideH(), o.StrideW()), (o.DilationHFactor(), o.DilationWFactor())
    kernel = weights.shape[1:3]
    groups = ctx.tensor(0).shape[3] // weights.shape[3]
    w = ctx.initializer(weights.transpose(0, 3, 1, 2), "conv_w")
    ctx.finish_nchw("Conv", [ctx.to_nchw(ctx.input(0)), w, *_bias(ctx, 2)],
                    o.FusedActivationFunction(), kernel_shape=list(kernel),
                    strides=list(strides), dilations=list(dilations), group=groups,
                    pads=_pads(ctx, o.Padding(), kernel, strides, dilations))


@handles("DEPTHWISE_CONV_2D")
def depthwise_conv_2d(ctx: OpContext) -> None:
    o = ctx.options
    weights = ctx.constant(1)  # [1, kh, kw, in * multiplier]
    channels = ctx.tensor(0).shape[3]
    strides, dilations = (o.StrideH(), o.StrideW()), (o.DilationHFactor(), o.DilationWFactor())
    kernel = weights.shape[1:3]
    w = ctx.initializer(weights.transpose(3, 0, 1, 2), "dwconv_w")  # [in * m, 1, kh, kw]
    ctx.finish_nchw("Conv", [ctx.to_nchw(ctx.input(0)), w, *_bias(ctx, 2)],
                    o.FusedActivationFunction(), kernel_shape=list(kernel),
                    strides=list(strides), dilations=list(dilations), group=channels,
                    pads=_pads(ctx, o.Padding(), kernel, strides, dilations))


@handles("CUSTOM:Convolution2DTransposeBias")
def transpose_conv_bias(ctx: OpContext) -> None:
    """MediaPipe's custom op: inputs (x, filter [out, kh, kw, in], bias); its options are a
    raw TfLiteTransposeConvParams struct (padding enum, stride_w, stride_h as int32)."""
    if len(ctx.op.custom_options) < 12:
        raise BundleError("Convolution2DTransposeBias has no readable parameters "
                          f"({len(ctx.op.custom_options)} bytes, expected 12)")
    padding, stride_w, stride_h = struct.unpack_from("<iii", ctx.op.custom_options)
    _transpose_conv(ctx, ctx.constant(1), 0, 2, padding == 2, (stride_h, stride_w))


@handles("TRANSPOSE_CONV")
def transpose_conv(ctx: OpContext) -> None:
    """Builtin: inputs (output shape, filter [out, kh, kw, in], x, optional bias)."""
    o = ctx.options
    _transpose_conv(ctx, ctx.constant(1), 2, 3, o.Padding() == VALID,
                    (o.StrideH(), o.StrideW()))


def _transpose_conv(ctx: OpContext, weights: np.ndarray, x: int, bias: int, valid: bool,
                    strides: tuple[int, int]) -> None:
    _, in_h, in_w, _ = ctx.tensor(x).shape
    _, out_h, out_w, _ = ctx.output_tensor().shape
    kernel = weights.shape[1:3]
    pads = [0, 0, 0, 0]
    if not valid:  # SAME: crop the full output (in-1)*stride + k down to the declared size
        total_h = max((in_h - 1) * strides[0] + kernel[0] - out_h, 0)
        total_w = max((in_w - 1) * strides[1] + kernel[1] - out_w, 0)
        pads = [total_h // 2, total_w // 2, total_h - total_h // 2, total_w - total_w // 2]
    w = ctx.initializer(weights.transpose(3, 0, 1, 2), "deconv_w")  # [in, out, kh, kw]
    inputs = [ctx.to_nchw(ctx.input(x)), w]
    if ctx.has_input(bias):
        inputs.append(ctx.input(bias))
    ctx.finish_nchw("ConvTranspose", inputs, kernel_shape=list(kernel), strides=list(strides),
                    pads=pads)


@handles("MAX_POOL_2D", "AVERAGE_POOL_2D")
def pool_2d(ctx: OpContext) -> None:
    o = ctx.options
    kernel, strides = (o.FilterHeight(), o.FilterWidth()), (o.StrideH(), o.StrideW())
    op_type = "MaxPool" if ctx.op.name == "MAX_POOL_2D" else "AveragePool"
    # AveragePool: TFLite divides by the pixels inside the image, as count_include_pad=0 does.
    ctx.finish_nchw(op_type, [ctx.to_nchw(ctx.input(0))], o.FusedActivationFunction(),
                    kernel_shape=list(kernel), strides=list(strides),
                    pads=_pads(ctx, o.Padding(), kernel, strides))


@handles("FULLY_CONNECTED")
def fully_connected(ctx: OpContext) -> None:
    o = ctx.options
    weights = ctx.constant(1)  # [out, in]
    flat = ctx.node("Reshape", [ctx.input(0),
                                ctx.initializer(np.array([-1, weights.shape[1]], np.int64))])
    inputs = [flat, ctx.initializer(weights, "fc_w")] + _bias(ctx, 2)
    out_shape = ctx.output_tensor().shape
    if o.KeepNumDims() and len(out_shape) != 2:
        value = ctx.node("Gemm", inputs, transB=1)
        ctx.finish("Reshape", [value, ctx.initializer(
            np.array([-1, *out_shape[1:]], np.int64))], o.FusedActivationFunction())
    else:
        ctx.finish("Gemm", inputs, o.FusedActivationFunction(), transB=1)

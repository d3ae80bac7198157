"""Each TFLite operator handler against LiteRT itself, on a one-operator model whose
dimensions all differ (a swapped axis cannot pass), plus the importer's refusals."""

from __future__ import annotations

import struct

import numpy as np
import pytest

pytest.importorskip("tflite")
litert = pytest.importorskip("ai_edge_litert.interpreter")

import onnxruntime as ort  # noqa: E402

from exporters.tflite import convert_tflite  # noqa: E402
from runtime.errors import BundleError  # noqa: E402
from tests.exporters.tflite_models import Const, options, single_op, sparse_csr  # noqa: E402

RNG = np.random.default_rng(7)
X = (1, 9, 11, 5)  # batch, height, width, channels: all different


def weights(*shape: int) -> np.ndarray:
    return RNG.normal(0, 0.5, shape).astype(np.float32)


def run_both(tmp_path, model: bytes, feeds: list[np.ndarray]):
    path = tmp_path / "op.tflite"
    path.write_bytes(model)
    # The builtin kernels (no XNNPACK delegate): the reference, and they run every case.
    interpreter = litert.Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    for detail, value in zip(interpreter.get_input_details(), feeds, strict=True):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    expected = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
    onnx_model = convert_tflite(path)
    session = ort.InferenceSession(onnx_model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    actual = session.run(None, {i.name: v for i, v in zip(session.get_inputs(), feeds,
                                                          strict=True)})
    return expected, actual


CASES = {
    "conv_same_stride2_relu6": ("CONV_2D", [X, weights(4, 3, 2, 5), weights(4)], (1, 5, 6, 4),
                                options("Conv2D", Padding=0, StrideW=2, StrideH=2,
                                        FusedActivationFunction=3, DilationWFactor=1,
                                        DilationHFactor=1)),
    "conv_valid_dilated": ("CONV_2D", [X, weights(4, 3, 2, 5), weights(4)], (1, 5, 9, 4),
                           options("Conv2D", Padding=1, StrideW=1, StrideH=1,
                                   DilationWFactor=2, DilationHFactor=2)),
    "depthwise_multiplier2": ("DEPTHWISE_CONV_2D", [X, weights(1, 3, 3, 10), weights(10)],
                              (1, 5, 6, 10),
                              options("DepthwiseConv2D", Padding=0, StrideW=2, StrideH=2,
                                      DepthMultiplier=2, DilationWFactor=1, DilationHFactor=1)),
    "transpose_conv": ("TRANSPOSE_CONV", [np.array([1, 18, 22, 3], np.int32),
                                          weights(3, 2, 2, 5), X], (1, 18, 22, 3),
                       options("TransposeConv", Padding=0, StrideW=2, StrideH=2)),
    "max_pool_same": ("MAX_POOL_2D", [X], (1, 5, 6, 5),
                      options("Pool2D", Padding=0, StrideW=2, StrideH=2, FilterWidth=3,
                              FilterHeight=2)),
    "average_pool_same_edges": ("AVERAGE_POOL_2D", [X], (1, 5, 6, 5),
                                options("Pool2D", Padding=0, StrideW=2, StrideH=2,
                                        FilterWidth=3, FilterHeight=3)),
    "add_broadcast_relu": ("ADD", [X, weights(5)], X,
                           options("Add", FusedActivationFunction=1)),
    "mul": ("MUL", [X, X], X, options("Mul")),
    "sub": ("SUB", [X, weights(11, 5)], X, options("Sub")),
    "prelu": ("PRELU", [X, weights(1, 1, 5)], X, None),
    "hard_swish": ("HARD_SWISH", [X], X, None),
    "logistic": ("LOGISTIC", [X], X, None),
    "relu": ("RELU", [X], X, None),
    "relu6": ("RELU6", [X], X, None),
    "tanh": ("TANH", [X], X, None),
    "softmax_beta": ("SOFTMAX", [(3, 7)], (3, 7), options("Softmax", Beta=0.5)),
    "mean_spatial": ("MEAN", [X, np.array([1, 2], np.int32)], (1, 1, 1, 5),
                     options("Reducer", KeepDims=True)),
    "pad": ("PAD", [X, np.array([[0, 0], [1, 2], [0, 3], [0, 1]], np.int32)], (1, 12, 14, 6),
            None),
    "reshape": ("RESHAPE", [X, np.array([1, 99, 5], np.int32)], (1, 99, 5), None),
    "concat_channels": ("CONCATENATION", [X, X], (1, 9, 11, 10),
                        options("Concatenation", Axis=3)),
    "resize_bilinear_half_pixel": ("RESIZE_BILINEAR", [X, np.array([14, 25], np.int32)],
                                   (1, 14, 25, 5),
                                   options("ResizeBilinear", HalfPixelCenters=True)),
    "resize_bilinear_align_corners": ("RESIZE_BILINEAR", [X, np.array([17, 21], np.int32)],
                                      (1, 17, 21, 5),
                                      options("ResizeBilinear", AlignCorners=True)),
    "fully_connected": ("FULLY_CONNECTED", [(2, 13), weights(6, 13), weights(6)], (2, 6),
                        options("FullyConnected", FusedActivationFunction=1)),
    "dequantize_fp16_weight": ("DEQUANTIZE", [weights(3, 4).astype(np.float16)], (3, 4), None),
    "densify_sparse_weight": ("DENSIFY",
                              [sparse_csr(np.where(RNG.uniform(size=(6, 7)) > 0.6,
                                                   weights(6, 7), 0).astype(np.float32))],
                              (6, 7), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_matches_litert(tmp_path, case):
    op, inputs, out_shape, opts = CASES[case]
    model = single_op(op, inputs, out_shape, opts=opts)
    feeds = [RNG.normal(0, 2, item).astype(np.float32) for item in inputs
             if isinstance(item, tuple)]
    expected, actual = run_both(tmp_path, model, feeds)
    assert actual[0].shape == expected[0].shape
    np.testing.assert_allclose(actual[0], expected[0], atol=1e-5, rtol=1e-5)


def test_int8_weights_are_dequantised_per_channel(tmp_path):
    """Weight-only int8: LiteRT's hybrid kernel also quantises the activations on the fly,
    so it is only close to the exact float result the ONNX model computes."""
    real = weights(4, 3, 3, 5)
    scale = np.abs(real).reshape(4, -1).max(axis=1) / 127
    q = np.round(real / scale[:, None, None, None]).astype(np.int8)
    model = single_op("CONV_2D", [X, Const(q, scale=scale, axis=0), weights(4)], (1, 9, 11, 4),
                      opts=options("Conv2D", Padding=0, StrideW=1, StrideH=1,
                                   DilationWFactor=1, DilationHFactor=1))
    feed = RNG.normal(0, 1, X).astype(np.float32)
    expected, actual = run_both(tmp_path, model, [feed])
    np.testing.assert_allclose(actual[0], expected[0], atol=0.02 * np.abs(expected[0]).max())
    # and exactly the float convolution of the dequantised weights
    dequantised = q.astype(np.float32) * scale[:, None, None, None]
    float_model = single_op("CONV_2D", [X, dequantised, weights(4) * 0], (1, 9, 11, 4),
                            opts=options("Conv2D", Padding=0, StrideW=1, StrideH=1,
                                         DilationWFactor=1, DilationHFactor=1))
    reference, _ = run_both(tmp_path, float_model, [feed])
    path = tmp_path / "int8.tflite"
    path.write_bytes(single_op("CONV_2D", [X, Const(q, scale=scale, axis=0), weights(4) * 0],
                               (1, 9, 11, 4), opts=options("Conv2D", Padding=0, StrideW=1,
                                                           StrideH=1, DilationWFactor=1,
                                                           DilationHFactor=1)))
    session = ort.InferenceSession(convert_tflite(path).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"in0": feed})[0], reference[0], atol=1e-5)


def test_mediapipe_transpose_conv_bias_matches_builtin_transpose_conv(tmp_path):
    """LiteRT has no kernel for MediaPipe's custom op; the builtin TRANSPOSE_CONV with the
    bias added afterwards is the same computation."""
    w, bias = weights(3, 4, 4, 5), weights(3)
    custom = tmp_path / "custom.tflite"
    custom.write_bytes(single_op("CUSTOM:Convolution2DTransposeBias", [X, w, bias],
                                 (1, 18, 22, 3), custom_options=struct.pack("<iii", 1, 2, 2)))
    builtin = single_op("TRANSPOSE_CONV", [np.array([1, 18, 22, 3], np.int32), w, X],
                        (1, 18, 22, 3), opts=options("TransposeConv", Padding=0, StrideW=2,
                                                     StrideH=2))
    feed = RNG.normal(0, 1, X).astype(np.float32)
    expected, _ = run_both(tmp_path, builtin, [feed])
    session = ort.InferenceSession(convert_tflite(custom).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"in0": feed})[0], expected[0] + bias,
                               atol=1e-5)


def test_unknown_operator_is_refused_by_name(tmp_path):
    path = tmp_path / "cumsum.tflite"
    path.write_bytes(single_op("CUSTOM:MyFancyOp", [X], X))
    with pytest.raises(BundleError, match="CUSTOM:MyFancyOp"):
        convert_tflite(path)


def test_a_file_that_is_not_tflite_is_refused(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"\x08\x07not a flatbuffer at all")
    with pytest.raises(BundleError, match="not a TFLite model"):
        convert_tflite(path)

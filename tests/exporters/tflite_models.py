"""Tiny .tflite models written with the flatbuffer builders of the `tflite` package: one
operator each, every dimension a different size so a layout mistake shows.

`single_op(...)` returns the model's bytes; constants are numpy arrays (stored in the file),
activations are shapes (graph inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import flatbuffers
import numpy as np
import tflite

TYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int32): 2,
         np.dtype(np.int8): 9, np.dtype(np.int64): 4}


@dataclass
class Const:
    values: np.ndarray
    scale: np.ndarray | None = None  # int8 weights: per-channel scales along `axis`
    axis: int = 0
    sparse: tuple | None = None  # (traversal_order, levels), see sparse_csr()


def options(kind: str, **fields):
    """(BuiltinOptions type, a function writing the table) for e.g. options("Conv2D", ...)."""
    def write(builder):
        getattr(tflite, f"{kind}OptionsStart")(builder)
        for name, value in fields.items():
            getattr(tflite, f"{kind}OptionsAdd{name}")(builder, value)
        return getattr(tflite, f"{kind}OptionsEnd")(builder)

    return getattr(tflite.BuiltinOptions, f"{kind}Options"), write


def _vector(builder, start, values, kind: str):
    start(builder, len(values))
    for v in reversed(values):
        getattr(builder, f"Prepend{kind}")(v)
    return builder.EndVector()


def single_op(op: str, inputs: list, output_shape: tuple[int, ...], *, opts=None,
              custom_options: bytes = b"", extra_outputs: tuple = ()) -> bytes:
    """A model computing `op` on `inputs` (shapes become graph inputs, Const/arrays are
    constants) into one float32 output of `output_shape`."""
    b = flatbuffers.Builder(1024)
    buffers = [b""]  # buffer 0 is the empty one by convention
    tensors = []  # (name, shape, type, buffer, quant, sparsity) offsets built below
    graph_inputs = []
    for i, item in enumerate(inputs):
        if isinstance(item, tuple):
            graph_inputs.append(len(tensors))
            tensors.append((f"in{i}", item, 0, 0, None, None))
            continue
        const = item if isinstance(item, Const) else Const(np.asarray(item))
        stored = const.values
        buffers.append(stored.tobytes())
        tensors.append((f"c{i}", const.values.shape if const.sparse is None else
                        const.sparse[2], TYPES[stored.dtype], len(buffers) - 1, const, None))
    out_index = len(tensors)
    tensors.append(("out", output_shape, 0, 0, None, None))
    outs = [out_index]
    for j, shape in enumerate(extra_outputs):
        outs.append(len(tensors))
        tensors.append((f"out{j + 1}", shape, 0, 0, None, None))

    buffer_offsets = []
    for data in buffers:
        data_off = b.CreateByteVector(data) if data else None
        tflite.BufferStart(b)
        if data_off is not None:
            tflite.BufferAddData(b, data_off)
        buffer_offsets.append(tflite.BufferEnd(b))
    tensor_offsets = []
    for name, shape, kind, buffer, const, _ in tensors:
        name_off = b.CreateString(name)
        shape_off = _vector(b, tflite.TensorStartShapeVector, [int(s) for s in shape], "Int32")
        quant_off = sparse_off = None
        if const is not None and const.scale is not None:
            scale = _vector(b, tflite.QuantizationParametersStartScaleVector,
                            [float(s) for s in const.scale], "Float32")
            zero = _vector(b, tflite.QuantizationParametersStartZeroPointVector,
                           [0] * len(const.scale), "Int64")
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, scale)
            tflite.QuantizationParametersAddZeroPoint(b, zero)
            tflite.QuantizationParametersAddQuantizedDimension(b, const.axis)
            quant_off = tflite.QuantizationParametersEnd(b)
        if const is not None and const.sparse is not None:
            sparse_off = _sparsity(b, const.sparse)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape_off)
        tflite.TensorAddType(b, kind)
        tflite.TensorAddBuffer(b, buffer)
        tflite.TensorAddName(b, name_off)
        if quant_off is not None:
            tflite.TensorAddQuantization(b, quant_off)
        if sparse_off is not None:
            tflite.TensorAddSparsity(b, sparse_off)
        tensor_offsets.append(tflite.TensorEnd(b))

    custom = op.startswith("CUSTOM:")
    code = tflite.BuiltinOperator.CUSTOM if custom else getattr(tflite.BuiltinOperator, op)
    custom_code = b.CreateString(op.split(":", 1)[1]) if custom else None
    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
    tflite.OperatorCodeAddBuiltinCode(b, code)
    tflite.OperatorCodeAddVersion(b, 1)
    if custom_code is not None:
        tflite.OperatorCodeAddCustomCode(b, custom_code)
    code_off = tflite.OperatorCodeEnd(b)

    op_inputs = _vector(b, tflite.OperatorStartInputsVector, list(range(len(inputs))), "Int32")
    op_outputs = _vector(b, tflite.OperatorStartOutputsVector, outs, "Int32")
    opts_off = opts[1](b) if opts is not None else None
    custom_off = b.CreateByteVector(custom_options) if custom_options else None
    tflite.OperatorStart(b)
    tflite.OperatorAddOpcodeIndex(b, 0)
    tflite.OperatorAddInputs(b, op_inputs)
    tflite.OperatorAddOutputs(b, op_outputs)
    if opts_off is not None:
        tflite.OperatorAddBuiltinOptionsType(b, opts[0])
        tflite.OperatorAddBuiltinOptions(b, opts_off)
    if custom_off is not None:
        tflite.OperatorAddCustomOptions(b, custom_off)
    op_off = tflite.OperatorEnd(b)

    t_vec = _offsets(b, tflite.SubGraphStartTensorsVector, tensor_offsets)
    in_vec = _vector(b, tflite.SubGraphStartInputsVector, graph_inputs, "Int32")
    out_vec = _vector(b, tflite.SubGraphStartOutputsVector, outs, "Int32")
    op_vec = _offsets(b, tflite.SubGraphStartOperatorsVector, [op_off])
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, t_vec)
    tflite.SubGraphAddInputs(b, in_vec)
    tflite.SubGraphAddOutputs(b, out_vec)
    tflite.SubGraphAddOperators(b, op_vec)
    graph_off = tflite.SubGraphEnd(b)

    codes = _offsets(b, tflite.ModelStartOperatorCodesVector, [code_off])
    graphs = _offsets(b, tflite.ModelStartSubgraphsVector, [graph_off])
    bufs = _offsets(b, tflite.ModelStartBuffersVector, buffer_offsets)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, codes)
    tflite.ModelAddSubgraphs(b, graphs)
    tflite.ModelAddBuffers(b, bufs)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _offsets(builder, start, offsets):
    start(builder, len(offsets))
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def sparse_csr(dense: np.ndarray) -> Const:
    """A 2-D constant stored as TFLite CSR (row dim dense, column dim sparse)."""
    rows, cols = np.nonzero(dense)
    segments = np.searchsorted(rows, np.arange(dense.shape[0] + 1)).astype(np.int32)
    levels = (("dense", dense.shape[0]), ("csr", segments, cols.astype(np.int32)))
    return Const(dense[rows, cols].astype(np.float32), sparse=((0, 1), levels, dense.shape))


def _sparsity(b, sparse) -> int:
    order, levels, _ = sparse
    dims = []
    for level in levels:
        if level[0] == "dense":
            tflite.DimensionMetadataStart(b)
            tflite.DimensionMetadataAddFormat(b, tflite.DimensionType.DENSE)
            tflite.DimensionMetadataAddDenseSize(b, level[1])
            dims.append(tflite.DimensionMetadataEnd(b))
            continue
        vectors = []
        for values in level[1:]:
            data = _vector(b, tflite.Int32VectorStartValuesVector, [int(v) for v in values],
                           "Int32")
            tflite.Int32VectorStart(b)
            tflite.Int32VectorAddValues(b, data)
            vectors.append(tflite.Int32VectorEnd(b))
        tflite.DimensionMetadataStart(b)
        tflite.DimensionMetadataAddFormat(b, tflite.DimensionType.SPARSE_CSR)
        tflite.DimensionMetadataAddArraySegmentsType(b, tflite.SparseIndexVector.Int32Vector)
        tflite.DimensionMetadataAddArraySegments(b, vectors[0])
        tflite.DimensionMetadataAddArrayIndicesType(b, tflite.SparseIndexVector.Int32Vector)
        tflite.DimensionMetadataAddArrayIndices(b, vectors[1])
        dims.append(tflite.DimensionMetadataEnd(b))
    order_vec = _vector(b, tflite.SparsityParametersStartTraversalOrderVector, list(order),
                        "Int32")
    dim_vec = _offsets(b, tflite.SparsityParametersStartDimMetadataVector, dims)
    tflite.SparsityParametersStart(b)
    tflite.SparsityParametersAddTraversalOrder(b, order_vec)
    tflite.SparsityParametersAddDimMetadata(b, dim_vec)
    return tflite.SparsityParametersEnd(b)

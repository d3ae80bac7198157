"""The .tflite flatbuffer as plain data: tensors (shape, dtype, constant values, quantisation,
sparsity) and operators (name, inputs, outputs, options), read with the `tflite` package.

Reading only: what the values mean for ONNX is the handlers' business.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import BundleError

# TFLite TensorType -> numpy dtype (the types these models store; others are refused).
DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_,
          7: np.int16, 9: np.int8}


@dataclass(frozen=True)
class Quantization:
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


@dataclass(frozen=True)
class Sparsity:
    traversal_order: tuple[int, ...]
    block_map: tuple[int, ...]
    # per traversal level: ("dense", size, None, None) or ("csr", 0, segments, indices)
    levels: tuple[tuple[str, int, np.ndarray | None, np.ndarray | None], ...]


@dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    data: np.ndarray | None  # constant values (raw storage type), None for activations
    quantization: Quantization | None
    sparsity: Sparsity | None


@dataclass(frozen=True)
class Operator:
    index: int
    name: str  # BuiltinOperator name ("CONV_2D"), or "CUSTOM:<code>" for custom operators
    inputs: tuple[int, ...]  # tensor indices; -1 marks an omitted optional input
    outputs: tuple[int, ...]
    options: object | None  # the tflite.*Options table, None when the operator has none
    custom_options: bytes


@dataclass(frozen=True)
class Graph:
    tensors: tuple[Tensor, ...]
    operators: tuple[Operator, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


def _tflite():
    try:
        import tflite
    except ImportError:
        raise BundleError("importing a .tflite model needs the tflite package: "
                          "pip install 'sightline[tflite]'") from None
    return tflite


def read_graph(path: Path) -> Graph:
    """The first subgraph of the model at `path` (the only one these models have)."""
    tflite = _tflite()
    data = Path(path).read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise BundleError(f"{path} is not a TFLite model (no TFL3 flatbuffer identifier)")
    model = tflite.Model.GetRootAsModel(data, 0)
    if model.SubgraphsLength() != 1:
        raise BundleError(f"{path} has {model.SubgraphsLength()} subgraphs; only single-graph "
                          "models (no control flow) can be imported")
    graph = model.Subgraphs(0)
    tensors = tuple(_tensor(tflite, model, graph.Tensors(i), i)
                    for i in range(graph.TensorsLength()))
    builtin = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    operators = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        # Newer files keep codes above 127 in BuiltinCode, older ones in the deprecated byte.
        name = builtin.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "UNKNOWN")
        if name == "CUSTOM":
            name = "CUSTOM:" + (code.CustomCode() or b"").decode()
        custom = op.CustomOptionsAsNumpy() if not op.CustomOptionsIsNone() else b""
        operators.append(Operator(
            i, name, tuple(int(v) for v in op.InputsAsNumpy()),
            tuple(int(v) for v in op.OutputsAsNumpy()),
            _options(tflite, op), bytes(custom) if len(custom) else b""))
    return Graph(tensors, tuple(operators),
                 tuple(int(v) for v in graph.InputsAsNumpy()),
                 tuple(int(v) for v in graph.OutputsAsNumpy()))


def _tensor(tflite, model, tensor, index: int) -> Tensor:
    kind = tensor.Type()
    if kind not in DTYPES:
        raise BundleError(f"tensor {tensor.Name().decode()!r} has TFLite type {kind}, which "
                          "the importer does not handle")
    dtype = np.dtype(DTYPES[kind])
    shape = tuple(int(v) for v in tensor.ShapeAsNumpy()) if not tensor.ShapeIsNone() else ()
    buffer = model.Buffers(tensor.Buffer())
    data = None
    if buffer is not None and not buffer.DataIsNone() and buffer.DataLength():
        raw = buffer.DataAsNumpy().tobytes()
        data = np.frombuffer(raw, dtype=dtype).copy()
    quant = tensor.Quantization()
    quantization = None
    if quant is not None and not quant.ScaleIsNone() and quant.ScaleLength():
        quantization = Quantization(quant.ScaleAsNumpy().astype(np.float32),
                                    quant.ZeroPointAsNumpy().astype(np.int64)
                                    if not quant.ZeroPointIsNone()
                                    else np.zeros(quant.ScaleLength(), np.int64),
                                    int(quant.QuantizedDimension()))
    sparsity = _sparsity(tflite, tensor.Sparsity()) if tensor.Sparsity() is not None else None
    if data is not None and sparsity is None:
        data = data.reshape(shape)
    return Tensor(index, tensor.Name().decode(), shape, dtype, data, quantization, sparsity)


def _sparsity(tflite, sparsity) -> Sparsity:
    vectors = {1: tflite.Int32Vector, 2: tflite.Uint16Vector, 3: tflite.Uint8Vector}

    def values(kind: int, table) -> np.ndarray:
        vector = vectors[kind]()
        vector.Init(table.Bytes, table.Pos)
        return vector.ValuesAsNumpy().astype(np.int64)

    levels = []
    for i in range(sparsity.DimMetadataLength()):
        dim = sparsity.DimMetadata(i)
        if dim.Format() == tflite.DimensionType.DENSE:
            levels.append(("dense", int(dim.DenseSize()), None, None))
        else:
            levels.append(("csr", 0, values(dim.ArraySegmentsType(), dim.ArraySegments()),
                           values(dim.ArrayIndicesType(), dim.ArrayIndices())))
    return Sparsity(tuple(int(v) for v in sparsity.TraversalOrderAsNumpy()),
                    tuple(int(v) for v in sparsity.BlockMapAsNumpy())
                    if not sparsity.BlockMapIsNone() else (),
                    tuple(levels))


def _options(tflite, op):
    """The operator's options table as its typed class (tflite.Conv2DOptions ...)."""
    kind = op.BuiltinOptionsType()
    if kind == 0:
        return None
    names = {v: k for k, v in vars(tflite.BuiltinOptions).items() if not k.startswith("_")}
    cls = getattr(tflite, names[kind], None)
    table = op.BuiltinOptions()
    if cls is None or table is None:
        return None
    options = cls()
    options.Init(table.Bytes, table.Pos)
    return options

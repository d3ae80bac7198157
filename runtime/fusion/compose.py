"""Prefix + model + suffix as one ONNX model, and the two halves alone for checking.

The model is brought to at least opset 13 first (CenterFace ships opset 9, which has no
Resize with sizes, no Pad with tensor pads and no NonMaxSuppression); a model that ONNX's
version converter cannot lift is served with the Python steps instead.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from runtime.errors import SightlineError
from runtime.fusion.graph import GraphWriter
from runtime.fusion.prefix import build_prefix, gain_bias
from runtime.fusion.suffix import SUFFIXES
from runtime.models.bundle import Manifest

MIN_OPSET = 13
MAX_OPSET = 17  # ReduceMax/Split change signature at 18; the builders use neither past 17


class FusionUnavailable(SightlineError):
    """This bundle's steps cannot be expressed in its graph; the Python steps serve it."""


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def lifted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at an opset the fusion operators exist in."""
    opset = default_opset(model)
    if opset > MAX_OPSET:
        raise FusionUnavailable(f"the model uses opset {opset}; fusion is written for opsets "
                                f"{MIN_OPSET}-{MAX_OPSET}")
    if opset >= MIN_OPSET:
        return model
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors per missing adapter
        raise FusionUnavailable(f"the model's opset {opset} could not be converted to "
                                f"{MIN_OPSET}: {exc}") from None
    converted.ir_version = max(converted.ir_version, 7)
    return converted


def _value_info(model: onnx.ModelProto, name: str):
    return next(v for v in model.graph.input if v.name == name)


def compose(model: onnx.ModelProto, manifest: Manifest, *, resize_in_graph: bool,
            decode: bool, cast_first: bool = False) -> onnx.ModelProto:
    """The fused model: uint8 frame in; kept boxes out (decode) or the model's outputs."""
    model = lifted(model)
    graph = model.graph
    original = _value_info(model, manifest.input.name)
    if original.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise FusionUnavailable("the model input is not float32")
    affine = fold_affine(model, manifest)
    graph = model.graph
    w = GraphWriter("pre")
    new_inputs = build_prefix(w, manifest, resize_in_graph=resize_in_graph,
                              cast_first=cast_first, affine=affine)
    nodes = list(w.nodes) + list(graph.node)
    initializers = list(w.initializers) + list(graph.initializer)
    outputs = list(graph.output)
    if decode:
        s = GraphWriter("post")
        outputs = SUFFIXES[manifest.task](s, manifest)
        nodes += s.nodes
        initializers += s.initializers
    others = [i for i in graph.input if i.name != manifest.input.name]
    # The model's input becomes an internal tensor; its declared shape stays as value_info
    # so shape inference (and TensorRT's parser) still know its rank.
    value_info = list(graph.value_info) + [original]
    fused_graph = helper.make_graph(nodes, f"{graph.name or 'model'}_fused", new_inputs + others,
                                    outputs, initializer=initializers, value_info=value_info)
    fused = helper.make_model(fused_graph, opset_imports=list(model.opset_import),
                              producer_name="sightline-fusion")
    fused.ir_version = model.ir_version
    for entry in model.metadata_props:
        fused.metadata_props.append(entry)
    return fused


_AVERAGING = frozenset({"AveragePool", "GlobalAveragePool"})


def fold_affine(model: onnx.ModelProto, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Fold the per-channel pixel gain (scale/std) into the first convolutions' weights, and
    the bias (-mean/std) too where they do not pad (a padded border would see the bias as
    zero), when the model input feeds only such Convs (through average pools, for the
    gain). Edits `model` in place; returns the
    (gain, bias) still to apply in the prefix. Saves a float pass over the frame."""
    gain, bias = gain_bias(manifest)
    if (manifest.input.layout != "NCHW" or np.any(gain == 0.0)
            or (np.all(gain == 1.0) and np.all(bias == 0.0))):
        return gain, bias
    graph = model.graph
    name = manifest.input.name
    outputs = {o.name for o in graph.output}
    # Averaging commutes with a per-channel gain: look through average pools to the Convs.
    pooled = False
    while True:
        consumers = [n for n in graph.node if name in n.input]
        if (len(consumers) != 1 or consumers[0].op_type not in _AVERAGING
                or consumers[0].output[0] in outputs):
            break
        name, pooled = consumers[0].output[0], True
    weights = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for tensor in node.input:
            uses[tensor] = uses.get(tensor, 0) + 1
    def foldable(node) -> bool:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        return (node.op_type == "Conv" and node.input[0] == name and attrs.get("group", 1) == 1
                and w is not None and w.data_type == onnx.TensorProto.FLOAT
                and uses.get(node.input[1]) == 1
                and (len(node.input) < 3 or not node.input[2]
                     or (node.input[2] in weights and uses.get(node.input[2]) == 1)))
    if not consumers or not all(foldable(n) for n in consumers):
        return gain, bias
    def unpadded(node) -> bool:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        return auto == "VALID" or (auto == "NOTSET" and not any(attrs.get("pads", [])))
    # (the bias does not commute with a pool that pads, so it stays in the prefix after one)
    fold_bias = (not pooled and not np.all(bias == 0.0)
                 and all(unpadded(n) for n in consumers))
    for node in consumers:
        w_init = weights[node.input[1]]
        w = numpy_helper.to_array(w_init).astype(np.float32)
        if fold_bias:  # conv(g*x + b) = conv'(x) + sum over the kernel of W * b
            shift = (w * bias.reshape(1, -1, *([1] * (w.ndim - 2)))).reshape(len(w), -1).sum(1)
            if len(node.input) > 2 and node.input[2]:
                b_init = weights[node.input[2]]
                b = numpy_helper.to_array(b_init).astype(np.float32) + shift
                b_init.CopyFrom(numpy_helper.from_array(b.astype(np.float32), b_init.name))
            else:
                b_name = f"{node.input[1]}_sightline_bias"
                graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32),
                                                                 b_name))
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = b_name
        scaled = w * gain.reshape(1, -1, *([1] * (w.ndim - 2)))
        w_init.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), w_init.name))
    return np.ones_like(gain), (np.zeros_like(bias) if fold_bias else bias / gain)


def prefix_only(manifest: Manifest, *, resize_in_graph: bool,
                cast_first: bool = False) -> onnx.ModelProto:
    """Just the preprocessing, output = the model input tensor: checked against Python."""
    w = GraphWriter("pre")
    inputs = build_prefix(w, manifest, resize_in_graph=resize_in_graph, cast_first=cast_first)
    out = helper.make_tensor_value_info(manifest.input.name, onnx.TensorProto.FLOAT,
                                        ["n", "c", "h", "w"])
    return _standalone(w, inputs, [out], "prefix")


def suffix_only(model: onnx.ModelProto, manifest: Manifest) -> onnx.ModelProto:
    """Just the decoding, fed the model's input and outputs: checked against Python."""
    w = GraphWriter("post")
    outputs = SUFFIXES[manifest.task](w, manifest)
    used = {name for node in w.nodes for name in node.input}
    declared = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    inputs = [declared[name] for name in declared if name in used]
    return _standalone(w, inputs, outputs, "suffix")


def _standalone(w: GraphWriter, inputs: list, outputs: list, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(w.nodes, f"sightline_{name}", inputs, outputs,
                              initializer=w.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)],
                              producer_name="sightline-fusion")
    model.ir_version = 7
    return model

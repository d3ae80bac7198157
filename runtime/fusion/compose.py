"""Prefix + model + suffix as one ONNX model, and the two halves alone for checking.

The model is brought to at least opset 13 first (CenterFace ships opset 9, which has no
Resize with sizes, no Pad with tensor pads and no NonMaxSuppression); a model that ONNX's
version converter cannot lift is served with the Python steps instead.
"""

from __future__ import annotations

import onnx
from onnx import helper, version_converter

from runtime.errors import SightlineError
from runtime.fusion.graph import GraphWriter
from runtime.fusion.prefix import build_prefix
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
    w = GraphWriter("pre")
    new_inputs = build_prefix(w, manifest, resize_in_graph=resize_in_graph,
                              cast_first=cast_first)
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

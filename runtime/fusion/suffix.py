"""Box decoding as ONNX operators after the model: only the kept boxes leave the engine.

Score threshold and NonMaxSuppression (ONNX `NonMaxSuppression`, which ONNX Runtime and
TensorRT's INMSLayer both run) are appended for the `face` (CenterFace) and `detect`
(YOLOv8-style) tasks, following runtime/tasks/face.py and detect.py, which stay the
reference. Boxes come out in model-input pixels; the host maps the few kept rows to the
source frame (a handful of multiply-adds) and cuts each frame to its top-K.
"""

from __future__ import annotations

from onnx import TensorProto, helper

from runtime.fusion.graph import GraphWriter
from runtime.models.bundle import Manifest
from runtime.tasks.face import STRIDE

# the output names the host half reads (runtime/tasks/kept.py owns them)
from runtime.tasks.kept import BATCH, BOXES, CLASSES, LANDMARKS, SCORES


def _outputs(landmarks: bool) -> list:
    infos = [helper.make_tensor_value_info(BOXES, TensorProto.FLOAT, ["kept", 4]),
             helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["kept"]),
             helper.make_tensor_value_info(CLASSES, TensorProto.INT64, ["kept"]),
             helper.make_tensor_value_info(BATCH, TensorProto.INT64, ["kept"])]
    if landmarks:
        infos.append(helper.make_tensor_value_info(LANDMARKS, TensorProto.FLOAT,
                                                   ["kept", "points", 2]))
    return infos


def _nms(w: GraphWriter, boxes: str, scores: str, manifest: Manifest, *,
         center_point_box: int) -> str:
    t = manifest.thresholds
    return w.op("NonMaxSuppression", boxes, scores,
                w.const([t.max_detections], "int64", "top_k"),
                w.const([t.iou], hint="iou"), w.const([t.score], hint="score"),
                center_point_box=center_point_box)


def _column(w: GraphWriter, matrix: str, index: int) -> str:
    """matrix[:, index] as a 1-D tensor."""
    return w.op("Gather", matrix, w.const(index, "int64", "col"), axis=1)


def _input_size(w: GraphWriter, manifest: Manifest) -> tuple[str, str]:
    """(width, height) of the model input as float scalars, read from its shape."""
    shape = w.op("Shape", manifest.input.name)
    h_axis, w_axis = (2, 3) if manifest.input.layout == "NCHW" else (1, 2)
    def dim(axis: int) -> str:
        return w.op("Cast", w.op("Gather", shape, w.const(axis, "int64", "axis"), axis=0),
                    to=TensorProto.FLOAT)
    return dim(w_axis), dim(h_axis)


def build_face_suffix(w: GraphWriter, manifest: Manifest) -> list:
    """CenterFace maps -> kept boxes, scores and 5 landmarks."""
    roles = manifest.outputs
    heat, scale, offset, marks = (roles["heatmap"], roles["scale"], roles["offset"],
                                  roles["landmarks"])
    in_w, in_h = _input_size(w, manifest)
    zero = w.const(0.0, hint="zero")
    stride = w.const(float(STRIDE), hint="stride")
    half = w.const(0.5, hint="half")
    # Per-cell geometry over the whole map, flattened to [N * cells]: the model's maps are
    # small (a 160x120 grid at 640x480), so this is cheap next to the model itself.
    shape = w.op("Shape", heat)
    rows = w.op("Gather", shape, w.const(2, "int64"), axis=0)
    cols = w.op("Gather", shape, w.const(3, "int64"), axis=0)
    one = w.const(1, "int64")
    ys = w.op("Cast", w.op("Range", w.const(0, "int64"), rows, one), to=TensorProto.FLOAT)
    xs = w.op("Cast", w.op("Range", w.const(0, "int64"), cols, one), to=TensorProto.FLOAT)
    ys = w.op("Unsqueeze", ys, w.const([1], "int64"))  # [rows, 1]: broadcasts over columns

    def channel(tensor: str, index: int) -> str:  # [N, rows, cols]
        return w.op("Gather", tensor, w.const(index, "int64"), axis=1)

    box_h = w.op("Mul", w.op("Exp", channel(scale, 0)), stride)
    box_w = w.op("Mul", w.op("Exp", channel(scale, 1)), stride)
    cx = w.op("Mul", w.op("Add", w.op("Add", xs, channel(offset, 1)), half), stride)
    cy = w.op("Mul", w.op("Add", w.op("Add", ys, channel(offset, 0)), half), stride)
    x1 = w.op("Clip", w.op("Sub", cx, w.op("Mul", box_w, half)), zero, in_w)
    y1 = w.op("Clip", w.op("Sub", cy, w.op("Mul", box_h, half)), zero, in_h)
    x2 = w.op("Min", w.op("Add", x1, box_w), in_w)
    y2 = w.op("Min", w.op("Add", y1, box_h), in_h)
    batch = w.op("Gather", shape, w.const(0, "int64"), axis=0)
    flat = w.op("Concat", w.op("Unsqueeze", batch, w.const([0], "int64")),
                w.const([-1], "int64"), axis=0)  # [N, -1]

    def per_cell(tensor: str) -> str:  # [N, rows, cols] -> [N, cells, 1]
        return w.op("Unsqueeze", w.op("Reshape", tensor, flat), w.const([2], "int64"))

    corners = w.op("Concat", *(per_cell(v) for v in (x1, y1, x2, y2)), axis=2)  # [N, cells, 4]
    scores = w.op("Reshape", channel(heat, 0), w.op("Concat", w.op("Unsqueeze", batch,
                  w.const([0], "int64")), w.const([1, -1], "int64"), axis=0))  # [N, 1, cells]
    selected = _nms(w, corners, scores, manifest, center_point_box=0)  # [K, 3]
    kept_batch = _column(w, selected, 0)
    cells = w.op("Mul", rows, cols)
    flat_index = w.op("Add", w.op("Mul", kept_batch, cells), _column(w, selected, 2))
    minus_one = w.const([-1], "int64")
    w.op("Gather", w.op("Reshape", corners, w.const([-1, 4], "int64")), flat_index, axis=0,
         outputs=[BOXES])
    w.op("Gather", w.op("Reshape", scores, minus_one), flat_index, axis=0, outputs=[SCORES])
    w.op("Mul", _column(w, selected, 1), w.const(0, "int64"), outputs=[CLASSES])
    w.op("Identity", kept_batch, outputs=[BATCH])

    # Landmarks of the kept cells only: channels alternate (y, x) per point, in box-size
    # units from the box's top-left corner.
    points = w.op("Transpose", w.op("Reshape", marks, w.op("Concat", w.op("Unsqueeze", batch,
                  w.const([0], "int64")), w.const([10, -1], "int64"), axis=0)), perm=[0, 2, 1])
    kept_marks = w.op("Gather", w.op("Reshape", points, w.const([-1, 10], "int64")),
                      flat_index, axis=0)  # [K, 10]

    def kept(value: str) -> str:  # a per-cell map -> [K, 1]
        return w.op("Unsqueeze", w.op("Gather", w.op("Reshape", value, minus_one), flat_index,
                                      axis=0), w.const([1], "int64"))

    lm_x = w.op("Add", w.op("Mul", w.op("Gather", kept_marks, w.const([1, 3, 5, 7, 9], "int64"),
                                        axis=1), kept(box_w)), kept(x1))
    lm_y = w.op("Add", w.op("Mul", w.op("Gather", kept_marks, w.const([0, 2, 4, 6, 8], "int64"),
                                        axis=1), kept(box_h)), kept(y1))
    two = w.const([2], "int64")
    w.op("Concat", w.op("Unsqueeze", lm_x, two), w.op("Unsqueeze", lm_y, two), axis=2,
         outputs=[LANDMARKS])
    return _outputs(landmarks=True)


def build_detect_suffix(w: GraphWriter, manifest: Manifest) -> list:
    """[N, 4 + C, anchors] -> class-aware NMS over each anchor's best class -> kept boxes."""
    predictions = manifest.outputs["predictions"]
    four = w.const([4], "int64")
    axis1 = w.const([1], "int64")
    centre = w.op("Slice", predictions, w.const([0], "int64"), four, axis1)  # [N, 4, A]
    class_scores = w.op("Slice", predictions, four, w.const([2**62], "int64"), axis1)
    best = w.op("ArgMax", class_scores, axis=1, keepdims=0)  # [N, A]
    classes = w.op("Shape", class_scores)
    depth = w.op("Gather", classes, w.const([1], "int64"), axis=0)
    # Only each anchor's best class competes, as in the reference decoder (which takes the
    # argmax before NMS); OneHot keeps the first of equal scores, as argmax does.
    onehot = w.op("OneHot", best, depth, w.const([0.0, 1.0], hint="onehot"), axis=1)
    scores = w.op("Mul", class_scores, onehot)  # [N, C, A]
    boxes = w.op("Transpose", centre, perm=[0, 2, 1])  # [N, A, 4] cx, cy, w, h
    selected = _nms(w, boxes, scores, manifest, center_point_box=1)  # [K, 3]
    kept_batch = _column(w, selected, 0)
    kept_class = _column(w, selected, 1)
    anchor = _column(w, selected, 2)
    gather_nd = w.op("Concat", w.op("Unsqueeze", kept_batch, axis1),
                     w.op("Unsqueeze", anchor, axis1), axis=1)  # [K, 2]
    kept_boxes = w.op("GatherND", boxes, gather_nd)  # [K, 4]
    half = w.const(0.5, hint="half")
    cx, cy, bw, bh = (_column(w, kept_boxes, i) for i in range(4))
    hw, hh = w.op("Mul", bw, half), w.op("Mul", bh, half)
    corners = [w.op("Sub", cx, hw), w.op("Sub", cy, hh), w.op("Add", cx, hw), w.op("Add", cy, hh)]
    w.op("Concat", *(w.op("Unsqueeze", c, axis1) for c in corners), axis=1, outputs=[BOXES])
    triple = w.op("Concat", w.op("Unsqueeze", kept_batch, axis1),
                  w.op("Unsqueeze", kept_class, axis1), w.op("Unsqueeze", anchor, axis1), axis=1)
    w.op("GatherND", scores, triple, outputs=[SCORES])
    w.op("Identity", kept_class, outputs=[CLASSES])
    w.op("Identity", kept_batch, outputs=[BATCH])
    return _outputs(landmarks=False)


SUFFIXES = {"face": build_face_suffix, "detect": build_detect_suffix}

"""TFLite -> ONNX: read a .tflite flatbuffer and write the same computation as ONNX opset 17.

MediaPipe's models (hands, selfie segmentation, face detection) and many mobile classifiers
ship only as .tflite. This package translates them directly, one small handler per TFLite
operator (ops_*.py, registered in registry.py), so `sightline import model.tflite` can
bundle them for ONNX Runtime and TensorRT. It keeps TFLite's NHWC layout for every tensor
and wraps the spatial operators in transposes (ONNX Runtime cancels adjacent pairs), which
keeps the translation local to each operator. Weights stored as float16 or int8 are
dequantised to float32; sparse (DENSIFY) weights are made dense. An operator without a
handler is refused by name. Needs the `tflite` package: pip install 'sightline[tflite]'.
"""

from exporters.tflite.convert import convert_tflite

# Bumped when a translation changes: cached bundles made by an older one are re-made.
CONVERTER_VERSION = "1"

__all__ = ["CONVERTER_VERSION", "convert_tflite"]

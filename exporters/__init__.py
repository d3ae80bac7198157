"""Offline path from a trained model to a verified ONNX bundle, its precision variants and
TensorRT engines; and the built-in default model (zoo.py).

May import runtime (bundles, engines, the engine cache) and devices, never cloud_sync;
torch and tensorrt only inside the functions that need them.
"""

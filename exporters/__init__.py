"""Offline path from a trained model to a verified ONNX bundle (and, later, engines).

May import torch or tensorrt, but only inside the functions that need them.
"""

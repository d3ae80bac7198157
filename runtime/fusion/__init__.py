"""Fusion: the bundle's per-frame work as ONNX operators inside the engine.

The preprocessing (resize/letterbox, pad, colour order, scale/mean/std, layout) is
prepended to the model so frames enter the engine as uint8, and for the `face` and
`detect` tasks the score threshold and NMS are appended so only kept boxes leave it. The
Python Preprocessor and task decoders stay the reference and the fallback; every fused
graph is checked against them when it is opened (parity.py). Switched by
`engine.fused` ("auto" | "off").
"""

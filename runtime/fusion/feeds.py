"""Host half of a fused engine: a decoded frame -> the fused graph's feeds, no float work.

A raw frame goes in as a view of the message buffer. Only geometry is computed here (the
same FrameTransform the Python Preprocessor computes); where the engine leaves resizing to
the host (CPU engines), OpenCV resizes and pads in uint8 when the frame is not already the
model's input size. A colour frame for a gray model is converted here (one cvtColor).
"""

from __future__ import annotations

import numpy as np

from runtime.fusion.prefix import CHANNELS, FRAME, PADS, SIZES
from runtime.models.bundle import Manifest
from runtime.models.preprocess import (
    FrameTransform,
    SourceColor,
    convert_color,
    input_size,
    letterbox_geometry,
    resize_frame,
)

_ORDER = {"bgr": (2, 1, 0), "rgb": (0, 1, 2)}


def channel_map(source: SourceColor, want: SourceColor) -> np.ndarray:
    """For each model channel, which channel of the (possibly gray-converted) frame."""
    if want == "gray":
        return np.zeros(1, dtype=np.int64)
    if source == "gray":
        return np.zeros(3, dtype=np.int64)
    # position of R, G, B in the source, reordered into the model's order
    src = {name: i for i, name in enumerate("bgr" if source == "bgr" else "rgb")}
    return np.array([src[c] for c in want], dtype=np.int64)


class FusedFeeds:
    """Builds feeds for one fused engine; cheap and stateless apart from small caches."""

    def __init__(self, manifest: Manifest, *, resize_in_graph: bool) -> None:
        self._manifest = manifest
        self._resize_in_graph = resize_in_graph
        self._want = manifest.preprocess.color
        self._channels = {c: channel_map(c if self._want != "gray" else "gray", self._want)
                          for c in ("bgr", "rgb", "gray")}
        self._nchw = manifest.input.layout == "NCHW"

    def __call__(self, image: np.ndarray, color: SourceColor
                 ) -> tuple[dict[str, np.ndarray], FrameTransform]:
        src_h, src_w = image.shape[:2]
        pre = self._manifest.preprocess
        in_w, in_h = input_size(self._manifest.input, src_w, src_h)
        to_gray = self._want == "gray" and color != "gray"
        if self._resize_in_graph:
            if to_gray:
                image, color = convert_color(image, color, "gray"), "gray"
            new_w, new_h, pad_x, pad_y, transform = letterbox_geometry(pre, src_w, src_h,
                                                                       in_w, in_h)
            feeds = {FRAME: _nhwc(image), CHANNELS: self._channels[color],
                     SIZES: self._sizes(new_w, new_h),
                     PADS: self._pads(pad_x, pad_y, in_w - new_w - pad_x,
                                      in_h - new_h - pad_y)}
            return feeds, transform
        resized, transform = resize_frame(image, pre, src_w, src_h, in_w, in_h)
        if to_gray:  # after the resize, as the Preprocessor does: the same pixels exactly
            resized, color = convert_color(resized, color, "gray"), "gray"
        return {FRAME: _nhwc(resized), CHANNELS: self._channels[color]}, transform

    def _sizes(self, width: int, height: int) -> np.ndarray:
        channels = 1 if self._want == "gray" else 3
        dims = (1, channels, height, width) if self._nchw else (1, height, width, channels)
        return np.array(dims, dtype=np.int64)

    def _pads(self, left: int, top: int, right: int, bottom: int) -> np.ndarray:
        if self._nchw:
            return np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64)
        return np.array([0, top, left, 0, 0, bottom, right, 0], dtype=np.int64)


def _nhwc(image: np.ndarray) -> np.ndarray:
    """[1, H, W, C] view of an HxW or HxWxC image (no copy of a contiguous frame)."""
    if image.ndim == 2:
        return image[None, :, :, None]
    return image[None]

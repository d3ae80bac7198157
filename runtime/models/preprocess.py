"""Frame -> model input tensor, and the transform that maps model coordinates back.

Runs on the hot path: output tensors come from a small ring of preallocated buffers
(one being inferred, one being filled; more when frames are batched), so steady-state
frames allocate nothing large.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from runtime.models.bundle import InputSpec, Preprocess
from runtime.transform import FrameTransform  # re-exported: the tasks' and tests' import

# Source pixel orders the decoder can hand over.
SourceColor = str  # "bgr" | "rgb" | "gray"


def input_size(spec: InputSpec, width: int, height: int) -> tuple[int, int]:
    """(input_width, input_height) the model gets for a source frame of this size."""
    size = spec.size
    if size.mode == "fixed":
        return size.width, size.height  # type: ignore[return-value]
    if size.height is not None or size.width is not None:
        return _one_axis_fixed(size, width, height)
    shrink = min(size.max_width / width, size.max_height / height)
    if not size.upscale:
        shrink = min(1.0, shrink)
    m = size.multiple_of
    # Capped at the largest multiple within the maximum: `width * shrink` can land a hair
    # above an exact fit (1920.0000000000002) and would otherwise round up past it.
    cap_w, cap_h = max(m, size.max_width // m * m), max(m, size.max_height // m * m)
    return (min(cap_w, max(m, math.ceil(width * shrink / m) * m)),
            min(cap_h, max(m, math.ceil(height * shrink / m) * m)))


def _one_axis_fixed(size, width: int, height: int) -> tuple[int, int]:
    """One axis fixed, the other following the frame's aspect at that scale (up or down),
    rounded up to the multiple and capped at its maximum."""
    m = size.multiple_of
    if size.height is not None:
        cap = max(m, size.max_width // m * m)
        return min(cap, max(m, math.ceil(width * size.height / height / m) * m)), size.height
    cap = max(m, size.max_height // m * m)
    return size.width, min(cap, max(m, math.ceil(height * size.width / width / m) * m))


def letterbox_geometry(pre: Preprocess, src_w: int, src_h: int, in_w: int,
                       in_h: int) -> tuple[int, int, int, int, FrameTransform]:
    """(inner width, inner height, pad x, pad y, transform) of the resize to the model input."""
    if (src_w, src_h) == (in_w, in_h):
        return in_w, in_h, 0, 0, FrameTransform(1.0, 1.0, 0.0, 0.0, src_w, src_h, in_w, in_h)
    if pre.resize == "stretch":
        return in_w, in_h, 0, 0, FrameTransform(in_w / src_w, in_h / src_h, 0.0, 0.0,
                                                src_w, src_h, in_w, in_h)
    ratio = min(in_w / src_w, in_h / src_h)
    # At least one pixel: a 2x1000 frame must not ask OpenCV for a zero-width image.
    new_w, new_h = max(1, round(src_w * ratio)), max(1, round(src_h * ratio))
    pad_x, pad_y = (in_w - new_w) // 2, (in_h - new_h) // 2
    # The scales the image was actually resized by: `ratio` itself is off by the rounding
    # of new_w/new_h, which would misplace boxes by up to half a model pixel.
    return new_w, new_h, pad_x, pad_y, FrameTransform(new_w / src_w, new_h / src_h,
                                                      float(pad_x), float(pad_y),
                                                      src_w, src_h, in_w, in_h)


def resize_frame(image: np.ndarray, pre: Preprocess, src_w: int, src_h: int, in_w: int,
                 in_h: int) -> tuple[np.ndarray, FrameTransform]:
    """The uint8 frame resized (and letterbox-padded) to the model input, still uint8."""
    new_w, new_h, pad_x, pad_y, transform = letterbox_geometry(pre, src_w, src_h, in_w, in_h)
    if (src_w, src_h) == (in_w, in_h):
        return image, transform
    inner = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if (new_w, new_h) == (in_w, in_h):
        return inner, transform
    value = (pre.pad_value,) * (1 if inner.ndim == 2 else inner.shape[2])
    padded = cv2.copyMakeBorder(inner, pad_y, in_h - new_h - pad_y, pad_x,
                                in_w - new_w - pad_x, cv2.BORDER_CONSTANT, value=value)
    return padded, transform


class Preprocessor:
    """Builds model inputs for one bundle; not thread-safe (one per preprocessing thread)."""

    RING = 2  # buffers: one in the engine, one being filled

    def __init__(self, spec: InputSpec, preprocess: Preprocess, *, ring: int = RING) -> None:
        self._ring = max(1, ring)
        self._spec = spec
        self._pre = preprocess
        channels = 1 if preprocess.color == "gray" else 3
        std = np.asarray(preprocess.std, dtype=np.float32)
        # value = pixel * gain + bias, per channel, folded from scale/mean/std once.
        self._gain = (preprocess.scale / std).astype(np.float32)
        self._bias = (-np.asarray(preprocess.mean, dtype=np.float32) / std).astype(np.float32)
        self._identity = bool(np.all(self._gain == 1.0) and np.all(self._bias == 0.0))
        self._channels = channels
        self._buffers: dict[tuple[int, int], list[np.ndarray]] = {}
        self._turn = 0

    def _buffer(self, width: int, height: int) -> np.ndarray:
        ring = self._buffers.get((width, height))
        if ring is None:
            shape = ((1, self._channels, height, width) if self._spec.layout == "NCHW"
                     else (1, height, width, self._channels))
            ring = [np.empty(shape, dtype=np.float32) for _ in range(self._ring)]
            if len(self._buffers) > 8:  # clients with many frame sizes must not grow memory
                self._buffers.clear()
            self._buffers[(width, height)] = ring
        self._turn = (self._turn + 1) % self._ring
        return ring[self._turn]

    def __call__(self, image: np.ndarray, color: SourceColor) -> tuple[np.ndarray, FrameTransform]:
        src_h, src_w = image.shape[:2]
        in_w, in_h = input_size(self._spec, src_w, src_h)
        resized, transform = self._resize(image, src_w, src_h, in_w, in_h)
        resized = self._convert_color(resized, color)
        out = self._buffer(in_w, in_h)
        if self._spec.layout == "NCHW":
            if self._channels == 1:
                out[0, 0] = resized
            else:
                # cv2.split makes contiguous uint8 planes; the float cast is then a straight
                # copy. Measured ~30% faster than casting from the strided HxWxC view.
                for c, plane in enumerate(cv2.split(resized)):
                    out[0, c] = plane
        else:
            out[0] = resized.reshape(in_h, in_w, self._channels)
        if not self._identity:
            view = out[0] if self._spec.layout == "NCHW" else np.moveaxis(out[0], -1, 0)
            for c in range(self._channels):
                view[c] *= self._gain[c]
                view[c] += self._bias[c]
        return out, transform

    def _resize(self, image: np.ndarray, src_w: int, src_h: int, in_w: int, in_h: int):
        return resize_frame(image, self._pre, src_w, src_h, in_w, in_h)

    def _convert_color(self, image: np.ndarray, color: SourceColor) -> np.ndarray:
        return convert_color(image, color, self._pre.color)


def convert_color(image: np.ndarray, color: SourceColor, want: SourceColor) -> np.ndarray:
    """The image in the colour order the model wants (a view when it already is)."""
    if color == want:
        return image
    if want == "gray":
        code = cv2.COLOR_BGR2GRAY if color == "bgr" else cv2.COLOR_RGB2GRAY
    elif color == "gray":
        code = cv2.COLOR_GRAY2BGR if want == "bgr" else cv2.COLOR_GRAY2RGB
    else:
        code = cv2.COLOR_BGR2RGB  # same swap both ways
    return cv2.cvtColor(image, code)


def needed_scale(spec: InputSpec, preprocess: Preprocess, width: int, height: int) -> float:
    """The smallest factor a width x height frame may be shrunk by before preprocessing
    without losing anything the model would see: the resize to the model input shrinks it
    at least this much anyway. The JPEG decoder uses it to pick a DCT scale.

    Letterbox scales both axes by the smaller ratio, so the frame may shrink to it; stretch
    scales each axis on its own, so only to the larger one. Never above 1.0: a frame
    smaller than the input is upscaled, from its full size.
    """
    in_w, in_h = input_size(spec, width, height)
    ratios = (in_w / width, in_h / height)
    factor = min(ratios) if preprocess.resize == "letterbox" else max(ratios)
    return min(1.0, factor)

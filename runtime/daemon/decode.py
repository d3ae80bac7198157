"""Pixel payload -> image array, checked against the header's declared shape.

Raw frames are viewed in place (no copy); JPEG goes through OpenCV's decoder, but only
after its frame header shows the size the request declared, so a small payload cannot
make the daemon allocate a huge image.
"""

from __future__ import annotations

import cv2
import numpy as np

from runtime.errors import ProtocolError
from runtime.protocol import RAW_ENCODINGS, DepthSpec, ErrorCode, FrameHeader

# Start-of-frame markers SOF0..SOF15, less DHT (C4), JPG (C8) and DAC (CC), which share the range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers with no length field: TEM and the restart markers RST0..RST7.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_SOS, _EOI = 0xDA, 0xD9
# Stored pixels, as for raw frames: EXIF rotation would swap the size the header declares.
_JPEG_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def decode_pixels(header: FrameHeader, payload: memoryview | bytes) -> tuple[np.ndarray, str]:
    """Return (image HxW or HxWxC uint8, its colour order 'bgr' | 'rgb' | 'gray')."""
    if header.encoding == "jpeg":
        return _decode_jpeg(header, payload)
    channels, color = RAW_ENCODINGS[header.encoding]
    expected = header.width * header.height * channels
    if len(payload) != expected:
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD_SIZE,
            f"payload is {len(payload)} bytes but {header.width}x{header.height} "
            f"{header.encoding} needs {expected}",
        )
    flat = np.frombuffer(payload, dtype=np.uint8)
    shape = (header.height, header.width) if channels == 1 else (header.height, header.width, 3)
    return flat.reshape(shape), color


MAX_MARKER_STEPS = 1024


def jpeg_size(data: memoryview | bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame (SOFn) header, or None if there is none to read.

    Walks the marker segments before the first scan; APPn segments (EXIF thumbnails
    included) are skipped by their length, so only the main image's size is found.
    """
    view = memoryview(data).cast("B")
    if bytes(view[:2]) != b"\xff\xd8":
        return None
    i, end = 2, len(view)
    # Real encoders put a handful of segments before the frame header (APPn, DQT, DHT ...).
    # A hostile payload of fill bytes or empty segments would make this Python loop walk
    # megabytes one step at a time, stalling the model's prepare thread; stop early.
    for _ in range(MAX_MARKER_STEPS):
        if i + 4 > end:
            return None
        if view[i] != 0xFF:
            return None
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _STANDALONE_MARKERS:
            i += 2
            continue
        if marker in (_SOS, _EOI):
            return None
        if marker in _SOF_MARKERS:
            if i + 9 > end:
                return None
            height = int.from_bytes(view[i + 5:i + 7], "big")
            width = int.from_bytes(view[i + 7:i + 9], "big")
            return width, height
        length = int.from_bytes(view[i + 2:i + 4], "big")
        if length < 2:
            return None
        i += 2 + length
    return None  # too many steps: not a JPEG an encoder wrote


def _decode_jpeg(header: FrameHeader, payload: memoryview | bytes) -> tuple[np.ndarray, str]:
    size = jpeg_size(payload)
    if size is None:
        raise ProtocolError(ErrorCode.DECODE_FAILED,
                            "payload is not a JPEG image (no SOI marker or frame header)")
    if size != (header.width, header.height):
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD_SIZE,
            f"JPEG is {size[0]}x{size[1]} but the header declares {header.width}x{header.height}",
        )
    try:
        image = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), _JPEG_FLAGS)
    except cv2.error as exc:  # OpenCV asserts on some inputs instead of returning None
        raise ProtocolError(ErrorCode.DECODE_FAILED, f"JPEG decoding failed: {exc}") from None
    if image is None:
        raise ProtocolError(ErrorCode.DECODE_FAILED, "payload is not a decodable JPEG image")
    height, width = image.shape[:2]
    if (width, height) != (header.width, header.height):
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD_SIZE,
            f"JPEG is {width}x{height} but the header declares {header.width}x{header.height}",
        )
    return image, "bgr"


def decode_depth(spec: DepthSpec, payload: memoryview | bytes) -> np.ndarray:
    """Depth part -> HxW uint16 (millimetres) or float32 (metres) view, size-checked."""
    if len(payload) != spec.nbytes:
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD_SIZE,
            f"depth part is {len(payload)} bytes but {spec.width}x{spec.height} {spec.encoding} "
            f"needs {spec.nbytes}")
    dtype = np.dtype("<u2") if spec.encoding == "u16mm" else np.dtype("<f4")
    return np.frombuffer(payload, dtype=dtype).reshape(spec.height, spec.width)

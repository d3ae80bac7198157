"""Pixel payload -> image array, checked against the header's declared shape.

Raw frames are viewed in place (no copy); JPEG goes through OpenCV's decoder.
"""

from __future__ import annotations

import cv2
import numpy as np

from runtime.errors import ProtocolError
from runtime.protocol import RAW_ENCODINGS, ErrorCode, FrameHeader


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


def _decode_jpeg(header: FrameHeader, payload: memoryview | bytes) -> tuple[np.ndarray, str]:
    image = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ProtocolError(ErrorCode.DECODE_FAILED, "payload is not a decodable JPEG image")
    height, width = image.shape[:2]
    if (width, height) != (header.width, header.height):
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD_SIZE,
            f"JPEG is {width}x{height} but the header declares {header.width}x{header.height}",
        )
    return image, "bgr"

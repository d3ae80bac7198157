"""Pixel payload -> image array, checked against the header's declared shape.

Raw frames are viewed in place (no copy). JPEG goes through libjpeg-turbo (simplejpeg),
but only after its frame header shows the size the request declared, so a small payload
cannot make the daemon allocate a huge image; it decodes at the smallest DCT scale (1/2,
1/4, 1/8) the model still loses nothing at, into reused buffers when the caller keeps them.
"""

from __future__ import annotations

import numpy as np
import simplejpeg

from runtime.errors import ProtocolError
from runtime.protocol import RAW_ENCODINGS, DepthSpec, ErrorCode, FrameHeader

# Start-of-frame markers SOF0..SOF15, less DHT (C4), JPG (C8) and DAC (CC), which share the range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers with no length field: TEM and the restart markers RST0..RST7.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_SOS, _EOI = 0xDA, 0xD9
# DCT scales 1/d the daemon decodes at, smallest first. libjpeg-turbo also has n/8 for other
# n, which simplejpeg's docs say may decode slower (unmeasured here: the powers of two are
# what bench/jpeg_decoders.py measured, and what FrameTransform.for_source recognises).
_DENOMINATORS = (8, 4, 2)
# OpenCV's limit, which the daemon had before it decoded with libjpeg-turbo: a header this
# large is refused rather than allocated (the daemon's own size limits are far lower).
MAX_JPEG_PIXELS = 1 << 30


class DecodeBuffers:
    """A ring of output images JPEG decodes reuse, frame after frame.

    A fresh 1280x720 image costs its page faults on every frame (bench/jpeg_decoders.py:
    5.3 ms decode with a new array, 2.8 ms into a reused one). An image handed out stays
    valid until `ring` more frames of its size were decoded, so `ring` must cover every
    decoded frame still in use (being preprocessed, in the engine, awaiting its annotated
    reply). Not thread-safe: one per decoding thread.
    """

    def __init__(self, ring: int = 2) -> None:
        self._ring = max(1, ring)
        self._buffers: dict[tuple[int, int], list[np.ndarray]] = {}
        self._turn = 0

    def take(self, height: int, width: int) -> np.ndarray:
        """The next HxWx3 uint8 image of the ring for this size."""
        ring = self._buffers.get((height, width))
        if ring is None:
            if len(self._buffers) >= 8:  # clients with many frame sizes must not grow memory
                self._buffers.clear()
            ring = self._buffers[(height, width)] = [
                np.empty((height, width, 3), np.uint8) for _ in range(self._ring)]
        self._turn = (self._turn + 1) % self._ring
        return ring[self._turn]


def jpeg_denominator(min_scale: float) -> int:
    """d for the smallest DCT scale 1/d (1, 1/2, 1/4 or 1/8) that is still >= min_scale."""
    return next((d for d in _DENOMINATORS if 1.0 / d >= min_scale), 1)


def decode_pixels(header: FrameHeader, payload: memoryview | bytes, min_scale: float = 1.0, *,
                  buffers: DecodeBuffers | None = None) -> tuple[np.ndarray, str]:
    """Return (image HxW or HxWxC uint8, its colour order 'bgr' | 'rgb' | 'gray').

    A JPEG is decoded at the smallest DCT scale s >= `min_scale` (see needed_scale in
    runtime/models/preprocess.py): ceil(width * s) x ceil(height * s) pixels, whose
    transform `FrameTransform.for_source` puts back on the header's size. It goes into
    `buffers` when given, else a new array. Raw frames are views of the payload at full
    size whatever `min_scale` is.
    """
    if header.encoding == "jpeg":
        return _decode_jpeg(header, payload, jpeg_denominator(min_scale), buffers)
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


def _decode_jpeg(header: FrameHeader, payload: memoryview | bytes, denominator: int,
                 buffers: DecodeBuffers | None) -> tuple[np.ndarray, str]:
    size = jpeg_size(payload)
    if size is None:
        raise ProtocolError(ErrorCode.DECODE_FAILED,
                            "payload is not a JPEG image (no SOI marker or frame header)")
    if size != (header.width, header.height):
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD_SIZE,
            f"JPEG is {size[0]}x{size[1]} but the header declares {header.width}x{header.height}",
        )
    if header.width * header.height > MAX_JPEG_PIXELS:
        raise ProtocolError(ErrorCode.DECODE_FAILED,
                            f"JPEG of {header.width}x{header.height} is over the decoder's "
                            f"limit of {MAX_JPEG_PIXELS} pixels")
    width, height = -(-header.width // denominator), -(-header.height // denominator)
    out = buffers.take(height, width) if buffers is not None else None
    try:
        # Gray, CMYK/YCCK and progressive JPEGs all come out BGR, as OpenCV gave them;
        # libjpeg-turbo reads no EXIF, so orientation is ignored (pixels as stored).
        # strict: a truncated scan is an error, as it was with OpenCV, not a grey-filled image.
        image = simplejpeg.decode_jpeg(payload, colorspace="BGR", min_width=width,
                                       min_height=height, buffer=out, strict=True)
    except ValueError as exc:  # simplejpeg reports every libjpeg-turbo failure this way
        raise ProtocolError(ErrorCode.DECODE_FAILED, f"JPEG decoding failed: {exc}") from None
    if image.shape != (height, width, 3):  # the scan disagrees with the frame header read
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD_SIZE,
            f"JPEG decoded to {image.shape[1]}x{image.shape[0]} at scale 1/{denominator}, "
            f"expected {width}x{height} for the header's {header.width}x{header.height}",
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

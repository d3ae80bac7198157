"""Pixel payload decoding: raw frames are zero-copy views, JPEG is checked before it is decoded."""

from __future__ import annotations

import struct
import time

import cv2
import numpy as np
import pytest
import simplejpeg
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.daemon.decode import DecodeBuffers, decode_pixels, jpeg_denominator, jpeg_size
from runtime.errors import ProtocolError
from runtime.protocol import ENCODINGS, ErrorCode, FrameHeader

quick = settings(max_examples=150, deadline=None)


def header(width: int, height: int, encoding: str) -> FrameHeader:
    return FrameHeader(seq=1, capture_ts=0.0, width=width, height=height, encoding=encoding)


def error_code(head: FrameHeader, payload: bytes | memoryview) -> str:
    with pytest.raises(ProtocolError) as caught:
        decode_pixels(head, payload)
    return caught.value.code


def gradient(width: int, height: int) -> np.ndarray:
    """A BGR image whose pixels differ, so decoded geometry and channel order can be checked."""
    y, x = np.mgrid[0:height, 0:width]
    return np.dstack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                      np.full_like(x, 128)]).astype(np.uint8)


def jpeg(image: np.ndarray, *params: int) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95, *params])
    assert ok
    return data.tobytes()


def with_sof_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header claiming another size (a decompression bomb)."""
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


def with_exif_orientation(data: bytes, orientation: int) -> bytes:
    tiff = (b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1)
            + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00\x00\x00\x00")
    app1 = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


# -- raw encodings ---------------------------------------------------------------------------


@pytest.mark.parametrize(("encoding", "shape", "color"), [
    ("bgr8", (3, 5, 3), "bgr"), ("rgb8", (3, 5, 3), "rgb"), ("gray8", (3, 5), "gray"),
])
def test_raw_frame_is_a_zero_copy_view_of_the_payload(encoding, shape, color):
    payload = bytearray(range(int(np.prod(shape))))
    image, order = decode_pixels(header(5, 3, encoding), memoryview(payload))
    assert image.shape == shape and image.dtype == np.uint8 and order == color
    payload[0] = 200  # the view sees the payload's memory: nothing was copied
    assert image.flat[0] == 200


def test_raw_frame_is_row_major_with_interleaved_channels_and_no_row_padding():
    width, height = 5, 3
    payload = bytes(range(width * height * 3))
    image, _ = decode_pixels(header(width, height, "bgr8"), payload)
    for y, x, c in [(0, 0, 0), (0, 1, 2), (1, 0, 0), (2, 4, 1)]:
        assert image[y, x, c] == (y * width + x) * 3 + c


def test_raw_channel_order_is_passed_on_not_converted():
    payload = bytes([10, 20, 30]) * 4
    bgr, _ = decode_pixels(header(2, 2, "bgr8"), payload)
    rgb, _ = decode_pixels(header(2, 2, "rgb8"), payload)
    assert bgr[0, 0].tolist() == rgb[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize(("encoding", "size"), [
    ("bgr8", 5 * 3 * 3 - 1), ("bgr8", 5 * 3 * 3 + 1), ("bgr8", 0),
    ("bgr8", (5 * 3 + 1) * 3),  # a row stride of 16 pixels: padding is not allowed
    ("rgb8", 5 * 3), ("gray8", 5 * 3 * 3), ("gray8", 5 * 3 + 1),
])
def test_raw_payload_of_the_wrong_size_is_bad_payload_size(encoding, size):
    assert error_code(header(5, 3, encoding), bytes(size)) == ErrorCode.BAD_PAYLOAD_SIZE


# -- JPEG ------------------------------------------------------------------------------------


def test_jpeg_decodes_to_a_bgr_image_of_the_declared_size():
    source = gradient(64, 48)
    image, order = decode_pixels(header(64, 48, "jpeg"), jpeg(source))
    assert image.shape == (48, 64, 3) and order == "bgr"
    assert np.abs(image.astype(int) - source).mean() < 3


def test_grayscale_and_progressive_jpegs_decode_to_three_channels():
    gray = cv2.cvtColor(gradient(40, 30), cv2.COLOR_BGR2GRAY)
    image, _ = decode_pixels(header(40, 30, "jpeg"), jpeg(gray))
    assert image.shape == (30, 40, 3)
    image, _ = decode_pixels(header(40, 30, "jpeg"),
                             jpeg(gradient(40, 30), cv2.IMWRITE_JPEG_PROGRESSIVE, 1))
    assert image.shape == (30, 40, 3)


def test_jpeg_payload_may_be_a_memoryview_as_the_server_passes_it():
    image, _ = decode_pixels(header(16, 8, "jpeg"), memoryview(jpeg(gradient(16, 8))))
    assert image.shape == (8, 16, 3)


@pytest.mark.parametrize(("width", "height"), [(48, 64), (32, 24), (64, 47), (65, 48)])
def test_jpeg_whose_size_differs_from_the_header_is_bad_payload_size(width, height):
    assert error_code(header(width, height, "jpeg"), jpeg(gradient(64, 48))) == \
        ErrorCode.BAD_PAYLOAD_SIZE


@pytest.mark.parametrize("payload", [
    b"", b"\xff", b"\xff\xd8", b"\xff\xd8not a jpeg", b"GIF89a....", bytes(1000),
], ids=["empty", "one-byte", "soi-only", "soi-then-text", "gif-magic", "zeros"])
def test_payload_that_is_not_a_jpeg_is_decode_failed(payload):
    assert error_code(header(64, 48, "jpeg"), payload) == ErrorCode.DECODE_FAILED


def test_truncated_jpeg_with_a_matching_frame_header_is_decode_failed():
    data = jpeg(gradient(64, 48))
    sof_end = data.index(b"\xff\xc0") + 19
    assert error_code(header(64, 48, "jpeg"), data[:sof_end]) == ErrorCode.DECODE_FAILED


def test_png_sent_as_jpeg_is_decode_failed_although_opencv_could_read_it():
    ok, png = cv2.imencode(".png", gradient(64, 48))
    assert error_code(header(64, 48, "jpeg"), png.tobytes()) == ErrorCode.DECODE_FAILED


def test_jpeg_claiming_a_huge_size_is_rejected_before_any_pixel_is_decoded():
    bomb = with_sof_size(jpeg(gradient(16, 16)), 20_000, 20_000)  # 1.2 GB if decoded
    started = time.perf_counter()
    assert error_code(header(16, 16, "jpeg"), bomb) == ErrorCode.BAD_PAYLOAD_SIZE
    assert time.perf_counter() - started < 0.05


def test_jpeg_over_opencvs_pixel_limit_is_decode_failed_not_an_opencv_error():
    # The daemon's size limits stop this first; decode_pixels must still not raise cv2.error.
    bomb = with_sof_size(jpeg(gradient(16, 16)), 65_000, 65_000)
    assert error_code(header(65_000, 65_000, "jpeg"), bomb) == ErrorCode.DECODE_FAILED


def test_jpeg_exif_orientation_is_ignored_so_pixels_are_as_stored():
    rotated = with_exif_orientation(jpeg(gradient(64, 48)), 6)  # "rotate 90 degrees to view"
    image, _ = decode_pixels(header(64, 48, "jpeg"), rotated)
    assert image.shape == (48, 64, 3)
    assert error_code(header(48, 64, "jpeg"), rotated) == ErrorCode.BAD_PAYLOAD_SIZE


def test_jpeg_size_reads_the_main_frame_header_not_an_exif_thumbnail():
    data = jpeg(gradient(64, 48))
    thumbnail = jpeg(gradient(8, 6))
    app1 = b"Exif\x00\x00" + thumbnail  # a thumbnail's SOF inside an APP1 segment
    wrapped = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    assert jpeg_size(wrapped) == (64, 48)
    assert decode_pixels(header(64, 48, "jpeg"), wrapped)[0].shape == (48, 64, 3)


# -- property: whatever the payload, the only failure is a ProtocolError ----------------------


@quick
@given(
    encoding=st.sampled_from(ENCODINGS),
    width=st.integers(1, 24),
    height=st.integers(1, 24),
    payload=st.binary(max_size=2048)
    | st.builds(lambda rest: b"\xff\xd8" + rest, st.binary(max_size=256))
    | st.builds(lambda cut, rest: jpeg(gradient(8, 8))[:cut] + rest,
                st.integers(0, 700), st.binary(max_size=64)),
)
def test_random_payloads_never_raise_anything_but_protocol_error(encoding, width, height,
                                                                 payload):
    try:
        image, _ = decode_pixels(header(width, height, encoding), payload)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_PAYLOAD_SIZE, ErrorCode.DECODE_FAILED)
    else:
        assert image.shape[:2] == (height, width)


def test_jpeg_of_fill_bytes_is_rejected_without_walking_the_whole_payload():
    import time

    from runtime.daemon.decode import jpeg_size

    hostile = b"\xff\xd8" + b"\xff" * (8 * 1024 * 1024)  # 8 MiB of marker fill bytes
    start = time.perf_counter()
    assert jpeg_size(hostile) is None
    # a bounded walk: far under the seconds an unbounded Python loop took on this input
    assert time.perf_counter() - start < 0.5


# -- JPEG at the scale the model needs ----------------------------------------------------------


def photo_like(width: int, height: int) -> np.ndarray:
    """Smooth content with detail at every scale, so a scaled decode can be compared."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.dstack([127 + 100 * np.sin(x / 23.0 + c) * np.cos(y / 17.0 - c) for c in range(3)])
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("min_scale", "denominator"), [
    (1.0, 1), (0.6, 1), (0.5, 2), (0.3, 2), (0.25, 4), (0.2, 4), (0.125, 8), (0.01, 8), (0.0, 8),
    (3.0, 1),
])
def test_jpeg_decodes_at_the_smallest_dct_scale_still_at_least_min_scale(min_scale, denominator):
    image, order = decode_pixels(header(641, 479, "jpeg"), jpeg(photo_like(641, 479)), min_scale)
    # libjpeg-turbo rounds scaled sizes up: the decode is never smaller than asked for
    assert image.shape == (-(-479 // denominator), -(-641 // denominator), 3) and order == "bgr"
    assert jpeg_denominator(min_scale) == denominator


@pytest.mark.parametrize("denominator", [2, 4, 8])
def test_scaled_jpeg_decode_shows_the_full_decode_shrunk(denominator):
    source = photo_like(640, 480)
    scaled, _ = decode_pixels(header(640, 480, "jpeg"), jpeg(source), 1.0 / denominator)
    shrunk = cv2.resize(source, (640 // denominator, 480 // denominator),
                        interpolation=cv2.INTER_AREA)
    assert scaled.shape == shrunk.shape
    assert np.abs(scaled.astype(int) - shrunk).mean() < 3  # same content, same geometry


@quick
@given(width=st.integers(1, 48), height=st.integers(1, 48),
       min_scale=st.floats(0.0, 1.0), gray=st.booleans())
def test_every_size_decodes_at_every_scale_to_the_rounded_up_size(width, height, min_scale,
                                                                   gray):
    source = photo_like(width, height)
    data = jpeg(cv2.cvtColor(source, cv2.COLOR_BGR2GRAY) if gray else source)
    image, _ = decode_pixels(header(width, height, "jpeg"), data, min_scale)
    d = jpeg_denominator(min_scale)
    assert image.shape == (-(-height // d), -(-width // d), 3)


def test_raw_frames_are_full_size_views_whatever_min_scale_says():
    payload = bytearray(64 * 48 * 3)
    image, _ = decode_pixels(header(64, 48, "bgr8"), memoryview(payload), 0.125)
    assert image.shape == (48, 64, 3)
    payload[0] = 7
    assert image.flat[0] == 7


def test_jpeg_declaring_another_size_is_refused_before_a_scaled_decode_too():
    assert error_code_at(header(32, 24, "jpeg"), jpeg(gradient(64, 48)), 0.25) == \
        ErrorCode.BAD_PAYLOAD_SIZE


def error_code_at(head: FrameHeader, payload: bytes, min_scale: float) -> str:
    with pytest.raises(ProtocolError) as caught:
        decode_pixels(head, payload, min_scale)
    return caught.value.code


def test_decode_buffers_hand_out_a_ring_of_reused_images():
    buffers = DecodeBuffers(ring=2)
    frames = [photo_like(64, 48), gradient(64, 48), photo_like(64, 48)[::-1].copy()]
    images = [decode_pixels(header(64, 48, "jpeg"), jpeg(f), buffers=buffers)[0] for f in frames]
    assert not np.shares_memory(images[0], images[1])
    assert np.shares_memory(images[0], images[2])  # the third decode reused the first's buffer
    assert np.abs(images[1].astype(int) - frames[1]).mean() < 3
    assert np.abs(images[2].astype(int) - frames[2]).mean() < 3
    small, _ = decode_pixels(header(64, 48, "jpeg"), jpeg(frames[0]), 0.5, buffers=buffers)
    assert small.shape == (24, 32, 3)  # another size gets buffers of its own


def test_cmyk_jpeg_decodes_to_the_bgr_opencv_gave():
    y, x = np.mgrid[0:30, 0:41]
    cmyk = np.dstack([x * 6, y * 8, np.full_like(x, 60), np.full_like(x, 30)]).astype(np.uint8)
    data = simplejpeg.encode_jpeg(cmyk, quality=95, colorspace="CMYK")
    image, order = decode_pixels(header(41, 30, "jpeg"), data)
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert order == "bgr" and np.abs(image.astype(int) - expected).max() <= 1

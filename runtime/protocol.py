"""Sightline wire protocol v1: msgpack headers over ZeroMQ multipart messages.

Parsing is strict and cheap: every field is type-checked here, once, so the rest of the
daemon can trust a FrameHeader. `docs/protocol.md` is the normative description.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack

from runtime.errors import ProtocolError
from runtime.results import Detection, TaskResult, tensor_to_wire

PROTOCOL_VERSION = 1
# encoding -> (channels, colour order); "jpeg" is handled separately.
RAW_ENCODINGS = {"bgr8": (3, "bgr"), "rgb8": (3, "rgb"), "gray8": (1, "gray")}
ENCODINGS = (*RAW_ENCODINGS, "jpeg")
# The stamps every `result` carries, in order (§8); `spatial` and `annotated` only on request.
STAGES = ("received", "taken", "decoded", "preprocessed", "started", "inferred",
          "postprocessed", "sent")
MAX_HEADER_BYTES = 64 * 1024


class ErrorCode:
    MALFORMED = "MALFORMED"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    BAD_HEADER = "BAD_HEADER"
    BAD_PAYLOAD_SIZE = "BAD_PAYLOAD_SIZE"
    DECODE_FAILED = "DECODE_FAILED"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    TOO_MANY_CLIENTS = "TOO_MANY_CLIENTS"
    RATE_LIMITED = "RATE_LIMITED"
    NOT_ENROLLED = "NOT_ENROLLED"
    REPLACED = "REPLACED"  # a newer connection with the same headset key took over
    INTERNAL = "INTERNAL"


# depth encoding -> bytes per pixel: uint16 millimetres or float32 metres, little-endian
DEPTH_ENCODINGS = {"u16mm": 2, "f32m": 4}


@dataclass(frozen=True, slots=True)
class DepthSpec:
    width: int
    height: int
    encoding: str

    @property
    def nbytes(self) -> int:
        return self.width * self.height * DEPTH_ENCODINGS[self.encoding]


@dataclass(frozen=True, slots=True)
class FrameHeader:
    seq: int
    capture_ts: float
    width: int
    height: int
    encoding: str
    model: str | None = None
    pose: tuple[float, ...] | None = None
    intrinsics: tuple[float, ...] | None = None
    # v1 extensions (optional, ignored by nothing): a depth part and what to compute
    depth: DepthSpec | None = None
    spatial: bool = False  # track ids + smoothing, and 3D anchors when depth is given
    planes: bool = False  # scene planes from the depth frame
    annotate: bool = False  # reply carries the frame as JPEG with the overlays drawn

    @property
    def wants_spatial(self) -> bool:
        return self.spatial or self.planes


@dataclass(frozen=True, slots=True)
class PingHeader:
    seq: int


def _field(header: dict, key: str, kinds: type | tuple[type, ...], *, required: bool = True):
    value = header.get(key)
    if value is None:
        if required:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"header field {key!r} is missing")
        return None
    # bool is an int in Python; a true/false sequence number is still a client bug.
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header field {key!r} has the wrong type "
                                                  f"({type(value).__name__})")
    return value


def _floats(header: dict, key: str, count: int) -> tuple[float, ...] | None:
    value = _field(header, key, (list, tuple), required=False)
    if value is None:
        return None
    if len(value) != count or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header field {key!r} must be {count} numbers")
    return tuple(float(v) for v in value)


def parse_header(raw: bytes | memoryview) -> FrameHeader | PingHeader:
    """Decode and validate a request header; raise ProtocolError with a reply code if bad."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.MALFORMED, f"header is over {MAX_HEADER_BYTES} bytes")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(ErrorCode.MALFORMED, f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "header must be a msgpack map")
    # strict_map_key lets bin keys through as bytes; §3.1 wants str keys only
    if not all(type(key) is str for key in header):
        raise ProtocolError(ErrorCode.MALFORMED, "header keys must be msgpack str, not bin")
    version = header.get("v")
    # 1 == True == 1.0 in Python; only the integer 1 is protocol v1.
    if not isinstance(version, int) or isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported; "
            f"this daemon speaks v{PROTOCOL_VERSION}",
        )
    kind = header.get("type")
    if kind is None:  # nil counts as absent, as for every other optional field
        kind = "frame"
    seq = _field(header, "seq", int)
    if kind == "ping":
        return PingHeader(seq)
    if kind != "frame":
        raise ProtocolError(ErrorCode.BAD_HEADER, f"unknown message type {kind!r}")
    encoding = _field(header, "enc", str)
    if encoding not in ENCODINGS:
        raise ProtocolError(ErrorCode.BAD_HEADER,
                            f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    width, height = _field(header, "w", int), _field(header, "h", int)
    if width <= 0 or height <= 0:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"frame size {width}x{height} is not positive")
    return FrameHeader(
        seq=seq,
        capture_ts=float(_field(header, "ts", (int, float), required=False) or 0.0),
        width=width,
        height=height,
        encoding=encoding,
        model=_field(header, "model", str, required=False),
        pose=_floats(header, "pose", 16),
        intrinsics=_floats(header, "intrinsics", 4),
        depth=_depth(header),
        spatial=_flag(header, "spatial"),
        planes=_flag(header, "planes"),
        annotate=_flag(header, "annotate"),
    )


def _flag(header: dict, key: str) -> bool:
    value = header.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header field {key!r} must be true or false")
    return value


def _depth(header: dict) -> DepthSpec | None:
    spec = _field(header, "depth", dict, required=False)
    if spec is None:
        return None
    width, height = _field(spec, "w", int), _field(spec, "h", int)
    encoding = _field(spec, "enc", str)
    if encoding not in DEPTH_ENCODINGS:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"depth encoding {encoding!r} is not one of "
                                                  f"{', '.join(DEPTH_ENCODINGS)}")
    if width <= 0 or height <= 0:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"depth size {width}x{height} is not positive")
    return DepthSpec(width, height, encoding)


def peek_seq(raw: bytes | memoryview) -> int | None:
    """Best-effort sequence number from a header that failed validation, for the error reply."""
    # An oversized header is rejected unread; unpacking megabytes here would stall the I/O thread.
    if len(raw) > MAX_HEADER_BYTES:
        return None
    try:
        header = msgpack.unpackb(raw, raw=False)
        seq = header.get("seq") if isinstance(header, dict) else None
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    except Exception:
        return None


def _pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def encode_result(
    header: FrameHeader,
    model: str,
    model_version: str,
    result: TaskResult,
    stamps: dict[str, float],
    dropped: int,
    extra: dict[str, Any] | None = None,
) -> bytes:
    message: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "type": "result",
        "seq": header.seq,
        "ts": header.capture_ts,
        "model": model,
        "model_version": model_version,
        "w": header.width,
        "h": header.height,
        "detections": [d.to_wire() for d in result.detections],
        "dropped": dropped,
    }
    if result.tensors:
        message["tensors"] = {k: tensor_to_wire(v, in_source=k in result.in_source)
                              for k, v in result.tensors.items()}
    if result.classes:
        message["classes"] = [c.to_wire() for c in result.classes]
    if result.mask is not None:
        message["mask"] = result.mask.to_wire()
    if result.skeleton:
        message["skeleton"] = [list(pair) for pair in result.skeleton]
    if result.detector_skipped:
        message["detector_skipped"] = True
    if result.transform is not None:  # a v1 extension: clients ignore keys they do not know
        message["transform"] = result.transform.to_wire()
    if header.pose is not None:
        message["pose"] = list(header.pose)
    if header.intrinsics is not None:
        message["intrinsics"] = list(header.intrinsics)
    if extra:
        message.update(extra)
    stamps["sent"] = time.time()
    message["t"] = stamps
    return _pack(message)


def encode_error(seq: int | None, code: str, text: str) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "type": "error", "seq": seq, "code": code,
                  "message": text, "t": {"sent": time.time()}})


def encode_dropped(seq: int, reason: str, dropped: int) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "type": "dropped", "seq": seq, "reason": reason,
                  "dropped": dropped, "t": {"sent": time.time()}})


def encode_pong(seq: int, models: list[dict[str, Any]]) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "type": "pong", "seq": seq, "models": models,
                  "t": {"sent": time.time()}})


def encode_request(header: dict[str, Any]) -> bytes:
    """Client side: pack a request header (adds the protocol version)."""
    return _pack({"v": PROTOCOL_VERSION, **header})


def decode_reply(raw: bytes) -> dict[str, Any]:
    return msgpack.unpackb(raw, raw=False)


def detections_from_reply(reply: dict[str, Any]) -> tuple[Detection, ...]:
    return tuple(Detection.from_wire(d) for d in reply.get("detections", ()))

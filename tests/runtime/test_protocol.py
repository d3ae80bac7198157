"""Wire protocol v1: header validation, error codes and the reply encoders (docs/protocol.md)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.errors import ProtocolError
from runtime.protocol import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    STAGES,
    ErrorCode,
    FrameHeader,
    PingHeader,
    decode_reply,
    detections_from_reply,
    encode_dropped,
    encode_error,
    encode_pong,
    encode_request,
    encode_result,
    parse_header,
    peek_seq,
)
from runtime.results import Detection, TaskResult, tensor_from_wire

POSE = [float(i) for i in range(16)]
INTRINSICS = [500.0, 510.0, 320.0, 240.0]
FIELDS = ("v", "type", "seq", "ts", "w", "h", "enc", "model", "pose", "intrinsics")
# No deadline: the first example pays for imports and would be reported as flaky.
quick = settings(max_examples=100, deadline=None)


def pack(header: object) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _merged(header: dict, fields: dict) -> dict:
    header.update(fields)
    return {k: v for k, v in header.items() if v is not ...}


def frame(**fields: object) -> dict:
    """A valid frame header, with `fields` replacing (or, set to ..., removing) its keys."""
    return _merged({"v": 1, "type": "frame", "seq": 7, "ts": 1764000000.25, "w": 640, "h": 480,
                    "enc": "bgr8"}, fields)


def ping(**fields: object) -> dict:
    return _merged({"v": 1, "type": "ping", "seq": 1}, fields)


def error_code(raw: bytes) -> str:
    with pytest.raises(ProtocolError) as caught:
        parse_header(raw)
    return caught.value.code


# -- valid requests -------------------------------------------------------------------------


def test_full_frame_header_parses_every_field():
    header = parse_header(pack(frame(model="centerface", pose=POSE, intrinsics=INTRINSICS)))
    assert header == FrameHeader(seq=7, capture_ts=1764000000.25, width=640, height=480,
                                 encoding="bgr8", model="centerface", pose=tuple(POSE),
                                 intrinsics=tuple(INTRINSICS))


@pytest.mark.parametrize("encoding", ["bgr8", "rgb8", "gray8", "jpeg"])
def test_every_documented_encoding_is_accepted(encoding):
    assert parse_header(pack(frame(enc=encoding))).encoding == encoding


def test_minimal_frame_header_defaults_type_ts_and_optional_fields():
    header = parse_header(pack({"v": 1, "seq": 1, "w": 2, "h": 3, "enc": "gray8"}))
    assert header == FrameHeader(seq=1, capture_ts=0.0, width=2, height=3, encoding="gray8")


def test_optional_fields_sent_as_nil_count_as_absent():
    header = parse_header(pack(frame(type=None, ts=None, model=None, pose=None,
                                     intrinsics=None)))
    assert (header.capture_ts, header.model, header.pose, header.intrinsics) == (0.0, None,
                                                                                  None, None)


def test_integer_timestamp_pose_and_intrinsics_are_read_as_floats():
    header = parse_header(pack(frame(ts=17, pose=list(range(16)), intrinsics=[500, 500, 320, 240])))
    assert header.capture_ts == 17.0 and isinstance(header.capture_ts, float)
    assert all(isinstance(v, float) for v in header.pose + header.intrinsics)


def test_float32_timestamp_is_accepted_but_loses_whole_seconds():
    # Why the docs insist on float64 for ts: near 1.7e9, float32 steps are 128 s apart.
    raw = msgpack.Packer(use_single_float=True).pack(frame(ts=1764000050.0))
    assert abs(parse_header(raw).capture_ts - 1764000050.0) > 1.0


def test_ping_needs_only_version_type_and_seq():
    assert parse_header(pack(ping(seq=0))) == PingHeader(seq=0)


def test_unknown_request_keys_are_ignored():
    assert parse_header(pack(frame(future_field=[1, 2], x={"y": 1}))).seq == 7


def test_header_of_exactly_max_header_bytes_is_accepted():
    base = pack(frame(pad=""))
    pad = "x" * (MAX_HEADER_BYTES - len(base) - 2)  # str8 grows to str16: +2 header bytes
    raw = pack(frame(pad=pad))
    assert len(raw) == MAX_HEADER_BYTES
    assert parse_header(raw).seq == 7


def test_header_is_parsed_from_a_memoryview_as_the_server_passes_it():
    assert parse_header(memoryview(pack(frame()))).width == 640


def test_client_request_encoder_adds_the_version_the_daemon_expects():
    raw = encode_request({"type": "frame", "seq": 3, "w": 4, "h": 4, "enc": "rgb8"})
    assert msgpack.unpackb(raw)["v"] == PROTOCOL_VERSION
    assert parse_header(raw).seq == 3


# -- invalid requests: one code each ---------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\x87\xa1v", b"\x81\xa1v\x01\x00"],
                         ids=["empty", "never-used-byte", "truncated", "trailing-bytes"])
def test_header_that_is_not_msgpack_is_malformed(raw):
    assert error_code(raw) == ErrorCode.MALFORMED


@pytest.mark.parametrize("value", [[1, 7, 640, 480, "bgr8"], 1, "frame", None, b"\x01"],
                         ids=["array", "int", "str", "nil", "bin"])
def test_header_that_is_not_a_map_is_malformed(value):
    assert error_code(pack(value)) == ErrorCode.MALFORMED


def test_map_with_integer_keys_is_malformed():
    # What MessagePack-CSharp writes for [Key(0)]-style contracts: keys must be strings.
    assert error_code(pack({0: 1, 1: 7})) == ErrorCode.MALFORMED


def test_map_with_a_bin_key_is_malformed_even_beside_str_keys():
    raw = msgpack.packb({**frame(), b"enc": "bgr8"}, use_bin_type=True)
    assert error_code(raw) == ErrorCode.MALFORMED


def test_header_over_max_header_bytes_is_malformed_without_being_decoded():
    raw = pack(frame(pad="x" * MAX_HEADER_BYTES))
    assert error_code(raw) == ErrorCode.MALFORMED
    assert error_code(b"\xc1" * (MAX_HEADER_BYTES + 1)) == ErrorCode.MALFORMED  # size first


@pytest.mark.parametrize("version", [..., None, 0, 2, -1, "1", True, 1.0, [1]],
                         ids=["missing", "nil", "0", "2", "-1", "str", "bool", "float", "array"])
def test_missing_or_wrong_version_is_unsupported_version(version):
    assert error_code(pack(frame(v=version))) == ErrorCode.UNSUPPORTED_VERSION
    assert error_code(pack(ping(v=version))) == ErrorCode.UNSUPPORTED_VERSION


def test_missing_seq_is_bad_header_for_frames_and_pings():
    assert error_code(pack(frame(seq=...))) == ErrorCode.BAD_HEADER
    assert error_code(pack(ping(seq=...))) == ErrorCode.BAD_HEADER


@pytest.mark.parametrize("field", ["enc", "w", "h"])
def test_missing_frame_field_is_bad_header(field):
    assert error_code(pack(frame(**{field: ...}))) == ErrorCode.BAD_HEADER


@pytest.mark.parametrize(("field", "value"), [
    ("seq", "7"), ("seq", True), ("seq", 7.0),
    ("w", "640"), ("w", True), ("w", 640.0), ("h", False), ("h", [480]),
    ("enc", 3), ("enc", b"bgr8"),
    ("ts", "now"), ("ts", True), ("ts", [1.0]),
    ("model", 5), ("model", b"centerface"),
    ("pose", "identity"), ("pose", {"m00": 1.0}), ("intrinsics", 500.0),
])
def test_field_of_the_wrong_type_is_bad_header(field, value):
    assert error_code(pack(frame(**{field: value}))) == ErrorCode.BAD_HEADER


def test_bool_is_not_accepted_as_a_ping_seq():
    assert error_code(pack(ping(seq=False))) == ErrorCode.BAD_HEADER


@pytest.mark.parametrize("encoding", ["bgr", "BGR8", "yuv420", "png", "rgba8", ""])
def test_unknown_encoding_is_bad_header(encoding):
    assert error_code(pack(frame(enc=encoding))) == ErrorCode.BAD_HEADER


@pytest.mark.parametrize(("width", "height"), [(0, 480), (640, 0), (-640, 480), (640, -1)])
def test_non_positive_frame_size_is_bad_header(width, height):
    assert error_code(pack(frame(w=width, h=height))) == ErrorCode.BAD_HEADER


@pytest.mark.parametrize(("field", "value"), [
    ("pose", POSE[:15]), ("pose", [*POSE, 1.0]), ("pose", []),
    ("pose", [[1.0, 0.0, 0.0, 0.0]] * 4),  # nested 4x4 instead of 16 flat numbers
    ("pose", [*POSE[:15], "1"]), ("pose", [*POSE[:15], True]), ("pose", [*POSE[:15], None]),
    ("intrinsics", INTRINSICS[:3]), ("intrinsics", [*INTRINSICS, 0.0]),
    ("intrinsics", [500.0, 500.0, 320.0, False]),
])
def test_pose_and_intrinsics_need_exactly_16_and_4_numbers(field, value):
    assert error_code(pack(frame(**{field: value}))) == ErrorCode.BAD_HEADER


@pytest.mark.parametrize("kind", ["result", "pong", "Frame", "", 1, ["frame"]])
def test_unknown_message_type_is_bad_header(kind):
    assert error_code(pack(frame(type=kind))) == ErrorCode.BAD_HEADER


def test_version_is_checked_before_anything_else_in_the_map():
    assert error_code(pack({"v": 2, "type": "nonsense"})) == ErrorCode.UNSUPPORTED_VERSION


# -- peek_seq: the seq an error reply carries -----------------------------------------------


def test_peek_seq_finds_the_seq_of_a_header_that_failed_validation():
    raw = pack(frame(v=2, enc="yuv"))
    assert error_code(raw) == ErrorCode.UNSUPPORTED_VERSION
    assert peek_seq(raw) == 7
    assert peek_seq(memoryview(raw)) == 7


@pytest.mark.parametrize("raw", [
    b"", b"\xc1", pack([1, 2]), pack({"v": 1}), pack(frame(seq="7")), pack(frame(seq=True)),
    pack(frame(seq=7.0)), pack(frame(pad="x" * MAX_HEADER_BYTES)),
], ids=["empty", "garbage", "array", "no-seq", "str-seq", "bool-seq", "float-seq", "oversized"])
def test_peek_seq_gives_none_when_no_integer_seq_can_be_read_cheaply(raw):
    assert peek_seq(raw) is None


# -- replies ---------------------------------------------------------------------------------


def _stamps() -> dict[str, float]:
    return {"received": 100.0, "taken": 100.0005, "decoded": 100.001, "preprocessed": 100.004,
            "started": 100.005, "inferred": 100.03, "postprocessed": 100.031}


def test_result_reply_carries_every_documented_field():
    header = FrameHeader(seq=9, capture_ts=1764000000.25, width=640, height=480, encoding="bgr8",
                         pose=tuple(POSE), intrinsics=tuple(INTRINSICS))
    face = Detection(box=(228.8, 47.6, 334.8, 172.0), score=0.92, label="face",
                     landmarks=((256.6, 91.6), (308.7, 93.6), (281.7, 118.1), (257.8, 136.4),
                                (301.6, 137.9)))
    raw = encode_result(header, "centerface", "1.5.0", TaskResult(detections=(face,)),
                        _stamps(), dropped=3)
    reply = decode_reply(raw)
    assert reply["v"] == 1 and reply["type"] == "result" and reply["seq"] == 9
    assert reply["ts"] == 1764000000.25
    assert (reply["model"], reply["model_version"]) == ("centerface", "1.5.0")
    assert (reply["w"], reply["h"], reply["dropped"]) == (640, 480, 3)
    assert reply["pose"] == POSE and reply["intrinsics"] == INTRINSICS
    assert reply["detections"] == [{"box": [228.8, 47.6, 334.8, 172.0], "score": 0.92,
                                    "label": "face", "class_id": 0,
                                    "landmarks": [list(p) for p in face.landmarks]}]
    assert detections_from_reply(reply) == (face,)
    assert list(reply["t"]) == list(STAGES)
    assert reply["t"]["sent"] >= reply["t"]["postprocessed"]
    assert "tensors" not in reply


def test_result_reply_leaves_out_pose_intrinsics_landmarks_and_tensors_not_present():
    header = FrameHeader(seq=1, capture_ts=0.0, width=4, height=4, encoding="gray8")
    box = Detection(box=(0.0, 0.0, 4.0, 4.0), score=0.5, label="person", class_id=0)
    reply = decode_reply(encode_result(header, "m", "1", TaskResult(detections=(box,)),
                                       _stamps(), 0))
    assert not {"pose", "intrinsics", "tensors"} & set(reply)
    assert "landmarks" not in reply["detections"][0]


def test_result_reply_with_no_detections_has_an_empty_list():
    header = FrameHeader(seq=1, capture_ts=0.0, width=4, height=4, encoding="gray8")
    reply = decode_reply(encode_result(header, "m", "1", TaskResult(), _stamps(), 0))
    assert reply["detections"] == []


def test_raw_tensors_travel_as_dtype_shape_and_little_endian_bytes():
    heat = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    ids = np.array([[1, 2]], dtype=np.int64)
    transposed = np.arange(6, dtype=np.float16).reshape(2, 3).T  # not C-contiguous
    header = FrameHeader(seq=2, capture_ts=0.0, width=8, height=8, encoding="rgb8")
    raw = encode_result(header, "raw", "1", TaskResult(tensors={"heat": heat, "ids": ids,
                                                                "t": transposed}), _stamps(), 0)
    tensors = decode_reply(raw)["tensors"]
    assert tensors["heat"]["dtype"] == "<f4" and tensors["heat"]["shape"] == [1, 2, 3, 4]
    assert tensors["ids"]["dtype"] == "<i8" and tensors["t"]["dtype"] == "<f2"
    assert isinstance(tensors["heat"]["data"], bytes) and len(tensors["heat"]["data"]) == 96
    assert tensors["heat"]["data"][4:8] == np.float32(1).tobytes()  # C order, element 1 next
    assert np.array_equal(tensor_from_wire(tensors["heat"]), heat)
    assert np.array_equal(tensor_from_wire(tensors["ids"]), ids)
    assert np.array_equal(tensor_from_wire(tensors["t"]), transposed)
    # bin, not str: msgpack type 0xc4-0xc6 so C#/C++ readers get a byte array
    assert b"\xc4\x60" in raw


def test_error_reply_carries_seq_code_message_and_sent_stamp():
    reply = decode_reply(encode_error(5, ErrorCode.BAD_HEADER, "header field 'w' is missing"))
    assert reply == {"v": 1, "type": "error", "seq": 5, "code": "BAD_HEADER",
                     "message": "header field 'w' is missing", "t": {"sent": reply["t"]["sent"]}}
    assert isinstance(reply["t"]["sent"], float)


def test_error_reply_for_an_unreadable_header_has_nil_seq():
    reply = decode_reply(encode_error(None, ErrorCode.MALFORMED, "header must be a msgpack map"))
    assert reply["seq"] is None and reply["code"] == "MALFORMED"


def test_dropped_reply_carries_seq_reason_and_running_drop_count():
    reply = decode_reply(encode_dropped(11, "superseded", 4))
    assert reply == {"v": 1, "type": "dropped", "seq": 11, "reason": "superseded", "dropped": 4,
                     "t": {"sent": reply["t"]["sent"]}}


def test_pong_reply_lists_the_served_models():
    models = [{"name": "centerface", "version": "1.5.0", "task": "face",
               "provider": "CPUExecutionProvider", "labels": ["face"], "default": True}]
    reply = decode_reply(encode_pong(0, models))
    assert reply == {"v": 1, "type": "pong", "seq": 0, "models": models,
                     "t": {"sent": reply["t"]["sent"]}}


def test_every_error_code_is_its_own_name():
    codes = {k: v for k, v in vars(ErrorCode).items() if not k.startswith("_")}
    assert codes == {k: k for k in codes}
    assert set(codes) == {"MALFORMED", "UNSUPPORTED_VERSION", "BAD_HEADER", "BAD_PAYLOAD_SIZE",
                          "DECODE_FAILED", "FRAME_TOO_LARGE", "UNKNOWN_MODEL",
                          "TOO_MANY_CLIENTS", "RATE_LIMITED", "NOT_ENROLLED",
                          "REPLACED", "INTERNAL"}


# -- properties: whatever arrives, the only failure is a ProtocolError -------------------------

MSGPACK_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SCALARS = (st.none() | st.booleans() | MSGPACK_INT | st.floats() | st.text(max_size=12)
           | st.binary(max_size=12) | st.sampled_from(["frame", "ping", "bgr8", "jpeg"]))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=17) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(FIELDS) | st.text(max_size=8)


def _parse_or_protocol_error(raw: bytes) -> None:
    try:
        header = parse_header(raw)
    except ProtocolError as exc:
        assert exc.code in vars(ErrorCode).values()
    else:
        assert isinstance(header, FrameHeader | PingHeader)


@quick
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(raw):
    _parse_or_protocol_error(raw)
    peek_seq(raw)  # must not raise at all


@quick
@given(st.dictionaries(KEYS, VALUES, max_size=12))
def test_arbitrary_msgpack_maps_never_raise_anything_but_protocol_error(header):
    _parse_or_protocol_error(pack(header))


@quick
@given(st.dictionaries(KEYS.filter(lambda k: k != "v"), VALUES, max_size=12),
       st.sampled_from(["frame", "ping", ...]))
def test_arbitrary_v1_maps_never_raise_anything_but_protocol_error(header, kind):
    # With a valid version and type, validation reaches every per-field check.
    header = {**header, "v": 1}
    if kind is not ...:
        header["type"] = kind
    _parse_or_protocol_error(pack(header))


def test_raw_result_carries_the_transform_and_marks_tensors_resized_to_the_source():
    from runtime.transform import FrameTransform

    header = parse_header(pack(frame(w=630, h=470)))
    transform = FrameTransform(640 / 630, 477 / 470, 0.0, 1.0, 630, 470, 640, 480)
    result = TaskResult(tensors={"prob": np.zeros((1, 1, 470, 630), np.float32),
                                 "raw": np.zeros((1, 1, 240, 320), np.float32)},
                        transform=transform, in_source=frozenset({"prob"}))
    reply = decode_reply(encode_result(header, "m", "1", result, {}, 0))
    assert reply["transform"] == transform.to_wire()
    assert reply["tensors"]["prob"]["space"] == "source"
    assert "space" not in reply["tensors"]["raw"]


def test_detection_results_are_unchanged_by_the_raw_transform_extension():
    header = parse_header(pack(frame()))
    result = TaskResult(detections=(Detection((1.0, 2.0, 3.0, 4.0), 0.9, "face"),))
    reply = decode_reply(encode_result(header, "m", "1", result, {}, 0))
    assert "transform" not in reply and "tensors" not in reply

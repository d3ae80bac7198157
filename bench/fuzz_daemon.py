"""Fuzz a real `sightline serve` with hostile messages while a well-behaved headset streams.

Starts the daemon (plain mode unless --curve), then runs fuzzer processes, each with its
own DEALER sockets (a fresh socket every few hundred messages, and after every part big
enough to make libzmq drop the connection), throwing seeded random hostile multipart
messages: malformed msgpack, truncated headers, wrong types for every header field, huge
and negative sizes, wrong payload sizes, parts over the size limits, 0..6 parts, random
bytes, unknown versions/encodings/models/types, JPEG garbage, empty parts, and the v1
spatial extension (depth parts, spatial/planes/annotate flags). Fuzzers never wait for
replies; they drain them without blocking and count them by error code.

Meanwhile one well-behaved client (runtime.client.Client, max_in_flight=1) streams the
real astronaut photo at 640x480 BGR at camera rate and records each round trip.

Method: the run alternates windows of --window-s seconds, "alone" (fuzzers paused) and
"fuzz" (fuzzers running), starting and ending with an alone window, until --messages have
been sent. Frames sent in the first --settle-s of a window are not counted, so backlog
from the previous window does not leak across. Interleaving spreads machine noise (other
processes, thermal) evenly over both phases; the p99 ratio compares them.

    python bench/fuzz_daemon.py                            # 100,000 messages, default limits
    python bench/fuzz_daemon.py --config high-fps.toml     # e.g. server.max_fps_per_client
    python bench/fuzz_daemon.py --exclude jpeg_marker_walk --json fuzz.json

With the default per-client cap (server.max_fps_per_client = 120), most well-formed fuzz
frames are answered RATE_LIMITED before decoding; pass --config with a high cap to push
them through the decode path.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import msgpack
import numpy as np
import zmq
from daemon_process import DaemonProcess, ProcSample, astronaut_frame, server_settings

from runtime.client import Client, apply_curve, curve_options
from runtime.config import ServerSettings
from runtime.models.assets import ASTRONAUT_PNG, fetch_asset
from runtime.protocol import MAX_HEADER_BYTES

# Category -> relative weight in the mix. The size-limit categories are rare because each
# message moves 32+ MiB; the JPEG categories that cost the daemon real CPU are rare too.
WEIGHTS: dict[str, float] = {
    "random_bytes": 10,
    "malformed_msgpack": 12,
    "truncated_header": 8,
    "wrong_types": 16,
    "huge_dims": 5,
    "negative_sizes": 5,
    "wrong_payload_size": 8,
    "unknown_values": 10,
    "part_count": 8,
    "empty_frames": 5,
    "jpeg_garbage": 8,
    "jpeg_marker_walk": 0.5,
    "jpeg_bomb": 0.5,
    "extreme_shapes": 1,
    "header_too_big": 1.5,
    "req_delimiter": 1,
    "depth_and_spatial": 3,
    "payload_over_limit": 0.25,
    "oversize_part": 0.25,
}
HEADER_FIELDS = ("v", "type", "seq", "ts", "w", "h", "enc", "model", "pose", "intrinsics",
                 "depth", "spatial", "planes", "annotate")
# Values of every msgpack type, most of them wrong for any given field.
WRONG_VALUES = (
    None, True, False, 0, -1, 1.0, 1.5, -0.0, float("nan"), float("inf"), "", "1", "bgr8",
    b"\x01", b"bgr8", [], [1, 2], [1.0] * 16, [True] * 16, ["a"] * 4, [[1]] * 16, {},
    {"k": 1}, 2**64 - 1, -(2**63), 2**31, msgpack.ExtType(5, b"xx"), msgpack.Timestamp(0),
    "x" * 300,
)
MISSING = object()


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


class HostileMessages:
    """A seeded stream of hostile multipart messages.

    `next()` returns (category, variant, parts, seq): seq is the well-formed sequence
    number the message carries (None if it carries none), so replies can be attributed.
    """

    def __init__(self, rng: random.Random, limits: ServerSettings,
                 categories: dict[str, float]) -> None:
        self.rng = rng
        self.limits = limits
        self._names = list(categories)
        self._cum = list(np.cumsum([categories[n] for n in self._names]))
        self._seq = rng.randrange(2**40)
        nprng = np.random.default_rng(rng.randrange(2**32))
        self.noise = memoryview(nprng.integers(0, 256, 4 << 20, dtype=np.uint8).tobytes())
        image = astronaut_frame()
        self.jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
        self.png = Path(fetch_asset(ASTRONAUT_PNG, show_progress=False)).read_bytes()
        black = np.zeros((4096, 4096, 3), np.uint8)
        self.bomb = cv2.imencode(".jpg", black)[1].tobytes()
        self._big: memoryview | None = None

    # -- building blocks --------------------------------------------------------------
    def big(self, size: int) -> memoryview:
        """A zero-filled buffer of `size` bytes, shared (allocated once, up to the limit)."""
        need = self.limits.max_frame_bytes + MAX_HEADER_BYTES + (2 << 20)
        if self._big is None:
            self._big = memoryview(bytearray(need))
        return self._big[:size]

    def bytes_(self, n: int) -> memoryview:
        start = self.rng.randrange(len(self.noise) - n + 1)
        return self.noise[start:start + n]

    def seq(self) -> int:
        self._seq += 1
        return self._seq

    def header(self, seq: int, **fields) -> dict:
        base = {"v": 1, "type": "frame", "seq": seq, "ts": time.time(), "w": 640, "h": 480,
                "enc": "bgr8"}
        base.update(fields)
        return {k: v for k, v in base.items() if v is not MISSING}

    def small_size(self) -> tuple[int, int]:
        return self.rng.choice(((64, 48), (32, 32), (640, 480), (17, 3), (1, 1)))

    def next(self) -> tuple[str, str, list, int | None]:
        name = self._names[np.searchsorted(self._cum, self.rng.random() * self._cum[-1],
                                           side="right")]
        variant, parts, seq = getattr(self, f"_{name}")()
        if not parts:  # ZeroMQ cannot send a message of 0 parts: one empty part is the least
            parts = [b""]
        return name, variant, parts, seq

    # -- categories -------------------------------------------------------------------
    def _random_bytes(self):
        count = self.rng.randint(1, 3)
        return f"{count}_parts", [self.bytes_(self.rng.randint(0, 4096)) for _ in range(count)], \
            None

    def _malformed_msgpack(self):
        rng, s = self.rng, self.seq()
        good = pack(self.header(s))
        payload = self.bytes_(64 * 48 * 3)
        choices = {
            "never_used_byte": b"\xc1" + bytes(self.bytes_(rng.randint(0, 64))),
            "map_short_of_entries": b"\x87\xa1v\x01\xa3seq\x01",
            "fixmap_then_noise": bytes([0x80 | rng.randint(1, 15)]) + bytes(self.bytes_(32)),
            "invalid_utf8_key": b"\x82\xa1v\x01\xa3\xff\xfe\xfd\x01",
            "invalid_utf8_value": b"\x84\xa1v\x01\xa3seq" + pack(s) + b"\xa1w\x40"
                                  + b"\xa3enc\xa4\xff\xfe\xfd\xfc",
            "array_not_map": pack([1, s, 640, 480, "bgr8"]),
            "int_keys": pack({0: 1, 1: s, 2: 640}),
            "bin_keys": pack({b"v": 1, b"seq": s, b"w": 640, b"h": 480, b"enc": b"bgr8"}),
            "scalar_top_level": pack(rng.choice((1, "frame", None, 1.5, True))),
            "trailing_bytes": good + bytes(self.bytes_(rng.randint(1, 16))),
            "deep_nesting": b"\x83\xa1v\x01\xa3seq\x01\xa4pose" + b"\x91" * 5000 + b"\xc0",
            "map32_huge_count": b"\xdf\xff\xff\xff\xff\xa1v\x01",
            "str32_huge_length": b"\x81\xdb\xff\xff\xff\xffv",
            "array32_huge_count": b"\x82\xa1v\x01\xa4pose\xdd\xff\xff\xff\xff",
            "bad_timestamp_ext": b"\x82\xa1v\x01\xa2ts\xc7\x05\xff" + b"\x00" * 5,
            "nested_map_int_key": pack({"v": 1, "seq": s, "pose": {1: 2}}),
        }
        variant = rng.choice(list(choices))
        return variant, [choices[variant], payload], s

    def _truncated_header(self):
        s = self.seq()
        good = pack(self.header(s, pose=[0.0] * 16))
        cut = self.rng.randrange(len(good))
        return "cut", [good[:cut], self.bytes_(64 * 48 * 3)], s

    def _wrong_types(self):
        rng, s = self.rng, self.seq()
        ping = rng.random() < 0.15
        base = {"v": 1, "type": "ping", "seq": s} if ping else self.header(s, w=64, h=48)
        for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 4)):
            key = rng.choice(HEADER_FIELDS)
            value = rng.choice((*WRONG_VALUES, MISSING))
            if value is MISSING:
                base.pop(key, None)
            else:
                base[key] = value
        seq = base.get("seq") if base.get("seq") == s else None
        parts = [pack(base)] if ping else [pack(base), self.bytes_(64 * 48 * 3)]
        return ("ping" if ping else "frame"), parts, seq

    def _huge_dims(self):
        rng, s = self.rng, self.seq()
        huge = (self.limits.max_width + 1, 65535, 2**31 - 1, 2**31, 2**32, 2**63 - 1,
                2**64 - 1, 10**9)
        w = rng.choice((*huge, 640))
        h = rng.choice(huge) if w == 640 else rng.choice((*huge, 480, 1))
        seq = rng.choice((s, s, s, 2**64 - 1))
        return "w_h", [pack(self.header(seq, w=w, h=h)), self.bytes_(rng.randint(0, 4096))], seq

    def _negative_sizes(self):
        rng, s = self.rng, self.seq()
        negative = (0, -1, -640, -(2**31), -(2**63))
        variant = rng.choice(("w", "h", "both", "seq", "ts"))
        fields = {}
        if variant in ("w", "both"):
            fields["w"] = rng.choice(negative)
        if variant in ("h", "both"):
            fields["h"] = rng.choice(negative)
        seq = rng.choice(negative[1:]) if variant == "seq" else s
        if variant == "ts":
            fields["ts"] = rng.choice((-1.0, -1e300, -(2**63)))
            fields.update(w=64, h=48)  # a valid frame but for its negative capture time
            return variant, [pack(self.header(seq, **fields)),
                             self.bytes_(rng.choice((64 * 48 * 3, 5)))], seq
        return variant, [pack(self.header(seq, **fields)), self.bytes_(16)], seq

    def _wrong_payload_size(self):
        rng, s = self.rng, self.seq()
        enc = rng.choice(("bgr8", "rgb8", "gray8"))
        w, h = self.small_size()
        channels = 1 if enc == "gray8" else 3
        want = w * h * channels
        size = rng.choice((0, 1, want - 1, want + 1, w * h * (4 - channels), want * 2,
                           rng.randint(0, 2 * want + 2)))
        if size == want:
            size += 1
        return enc, [pack(self.header(s, w=w, h=h, enc=enc)), self.bytes_(size)], s

    def _unknown_values(self):
        rng, s = self.rng, self.seq()
        key = rng.choice(("v", "enc", "model", "type"))
        value = rng.choice({
            "v": (0, 2, 3, 255, -1, 2**32, 1.0, True, "1", MISSING),
            "enc": ("yuv420", "nv12", "BGR8", "bgra8", "png", "", "bgr8\x00", "jpeg ", "h264"),
            "model": ("nope", "centerface ", "CenterFace", "../../etc/passwd", "x" * 5000,
                      "\x00", "yolov8n"),
            "type": ("Frame", "PING", "pong", "result", "error", "", "frame\x00"),
        }[key])
        header = self.header(s, w=64, h=48, **{key: value})
        return key, [pack(header), self.bytes_(64 * 48 * 3)], s

    def _part_count(self):
        rng, s = self.rng, self.seq()
        count = rng.randint(0, 6)
        header = pack(self.header(s, w=64, h=48))
        # Part 2 never has the right size: a fully valid frame is load, not fuzz.
        parts = [header, self.bytes_(rng.randint(0, 1000))][:count]
        parts += [self.bytes_(rng.randint(0, 256)) for _ in range(count - len(parts))]
        return f"{count}_parts", parts, s if count else None

    def _empty_frames(self):
        rng, s = self.rng, self.seq()
        choices = {
            "one_empty_part": [b""],
            "two_empty_parts": [b"", b""],
            "empty_payload": [pack(self.header(s)), b""],
            "empty_header": [b"", self.bytes_(64 * 48 * 3)],
            "empty_map": [pack({}), b""],
            "zero_size_frame": [pack(self.header(s, w=0, h=0)), b""],
            "empty_jpeg": [pack(self.header(s, enc="jpeg")), b""],
        }
        variant = rng.choice(list(choices))
        return variant, choices[variant], s

    def _jpeg_garbage(self):
        rng, s = self.rng, self.seq()
        jpeg = self.jpeg
        sof = jpeg.find(b"\xff\xc0")
        sos = jpeg.find(b"\xff\xda")
        flipped = bytearray(jpeg)
        for _ in range(rng.randint(1, 50)):
            flipped[rng.randrange(sos + 20, len(jpeg) - 2)] = rng.randrange(256)
        choices = {
            "random_bytes": self.bytes_(rng.randint(0, 65536)),
            "soi_then_noise": b"\xff\xd8" + bytes(self.bytes_(rng.randint(0, 4096))),
            "truncated_real": jpeg[:rng.randrange(2, len(jpeg))],
            "corrupted_scan": bytes(flipped),
            "size_mismatch": jpeg,  # header declares another size below
            "png_as_jpeg": self.png,
            "sof_only": jpeg[:sof + 19],
            "segment_length_1": b"\xff\xd8\xff\xe0\x00\x01" + bytes(self.bytes_(64)),
            "segment_past_end": b"\xff\xd8\xff\xe1\xff\xff" + bytes(self.bytes_(64)),
            "sof_zero_size": jpeg[:sof + 5] + b"\x00\x00\x00\x00" + jpeg[sof + 9:],
            "eoi_first": b"\xff\xd8\xff\xd9" + jpeg[2:],
        }
        variant = rng.choice(list(choices))
        w, h = (641, 480) if variant == "size_mismatch" else (640, 480)
        return variant, [pack(self.header(s, w=w, h=h, enc="jpeg")), choices[variant]], s

    def _jpeg_marker_walk(self):
        """SOI then runs of fill bytes / restart markers / empty segments: no SOF to find."""
        rng, s = self.rng, self.seq()
        size = rng.choice((16 << 10, 64 << 10, 256 << 10, 1 << 20))
        unit = {"fill_ff": b"\xff", "rst_markers": b"\xff\xd0",
                "empty_app_segments": b"\xff\xe0\x00\x02"}
        variant = rng.choice(list(unit))
        body = b"\xff\xd8" + unit[variant] * (size // len(unit[variant]))
        return f"{variant}_{size >> 10}KiB", [pack(self.header(s, enc="jpeg")), body], s

    def _jpeg_bomb(self):
        """A 4096x4096 (the default maximum) JPEG cut short: libjpeg allocates, then fails."""
        rng, s = self.rng, self.seq()
        w = h = 4096
        cut = rng.randrange(len(self.bomb) // 8, len(self.bomb) - 2)
        return "truncated_4096", [pack(self.header(s, w=w, h=h, enc="jpeg")),
                                  self.bomb[:cut]], s

    def _extreme_shapes(self):
        rng, s = self.rng, self.seq()
        w, h, enc = rng.choice(((1, 1, "bgr8"), (1, 4096, "gray8"), (4096, 1, "gray8"),
                                (2, 1000, "rgb8"), (3, 3, "bgr8"), (4096, 2, "bgr8")))
        channels = 1 if enc == "gray8" else 3
        return f"{w}x{h}", [pack(self.header(s, w=w, h=h, enc=enc)),
                            self.bytes_(w * h * channels)], s

    def _header_too_big(self):
        rng, s = self.rng, self.seq()
        variant = rng.choice(("just_over", "at_limit", "one_mib"))
        target = {"just_over": MAX_HEADER_BYTES + 1, "at_limit": MAX_HEADER_BYTES,
                  "one_mib": 1 << 20}[variant]
        header = self.header(s, w=64, h=48, pad="")
        for _ in range(3):  # the str length prefix grows with the padding: converge on it
            raw = pack(header)
            if len(raw) == target:
                break
            header["pad"] = "x" * (len(header["pad"]) + target - len(raw))
        return variant, [raw, self.bytes_(64 * 48 * 3 + 1)], s

    def _req_delimiter(self):
        s = self.seq()
        return "empty_first_part", [b"", pack(self.header(s, w=64, h=48)),
                                    self.bytes_(64 * 48 * 3)], None

    def _depth_and_spatial(self):
        """The v1 spatial extension: a depth part (3rd) and spatial/planes/annotate flags.

        Small colour frames keep the engine's share small; the depth part and the spatial
        stage get the hostile values: wrong specs and sizes, NaN/inf/negative depth, a
        different aspect ratio, missing or degenerate intrinsics and poses.
        """
        rng, s = self.rng, self.seq()
        w, h = 64, 48
        colour = self.bytes_(w * h * 3)
        flags = {"spatial": rng.random() < 0.7, "planes": rng.random() < 0.7,
                 "annotate": rng.random() < 0.2}
        pose = [1.0, 0, 0, rng.uniform(-1, 1), 0, 1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 1.0]
        intrinsics = [50.0, 50.0, 32.0, 24.0]
        dw, dh, enc = rng.choice(((64, 48, "u16mm"), (64, 48, "f32m"), (320, 240, "u16mm"),
                                  (640, 480, "f32m"), (1280, 960, "u16mm")))
        bpp = 2 if enc == "u16mm" else 4
        variant = rng.choice((
            "bad_depth_spec", "missing_depth_part", "depth_size_mismatch", "huge_depth_dims",
            "depth_nan_inf", "depth_noise", "aspect_mismatch", "no_intrinsics",
            "degenerate_intrinsics", "degenerate_pose", "flags_without_depth", "extra_part"))
        spec = {"w": dw, "h": dh, "enc": enc}
        fields = dict(w=w, h=h, pose=pose, intrinsics=intrinsics, depth=spec, **flags)
        depth: bytes | memoryview = self.bytes_(dw * dh * bpp)
        extra: list = []
        if variant == "bad_depth_spec":
            key = rng.choice(("w", "h", "enc"))
            spec[key] = rng.choice((*WRONG_VALUES, "u8", "f16m", 0, -4, MISSING))
            if spec[key] is MISSING:
                del spec[key]
            if rng.random() < 0.3:
                fields["depth"] = rng.choice(([64, 48, "u16mm"], "u16mm", 1, b"x", {1: 2}))
        elif variant == "missing_depth_part":
            depth = None
        elif variant == "depth_size_mismatch":
            depth = self.bytes_(max(0, dw * dh * bpp + rng.choice((-1, 1, -dw * bpp))))
        elif variant == "huge_depth_dims":
            spec.update(w=rng.choice((2**31, 2**40, 65535)), h=rng.choice((2**31, 3, 65535)))
            depth = self.bytes_(rng.randint(0, 4096))
        elif variant == "depth_nan_inf":
            spec["enc"] = "f32m"
            values = np.array([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e38, 2.0, 1e-30], "<f4")
            depth = np.resize(values, dw * dh).astype("<f4").tobytes()
            spec.update(w=dw, h=dh)
        elif variant == "aspect_mismatch":
            spec.update(w=dw, h=max(1, dh // 3))
            depth = self.bytes_(spec["w"] * spec["h"] * bpp)
        elif variant == "no_intrinsics":
            del fields["intrinsics"]
        elif variant == "degenerate_intrinsics":
            fields["intrinsics"] = rng.choice(([0.0, 0.0, 0.0, 0.0], [-50.0, 50.0, 32.0, 24.0],
                                               [float("nan")] * 4, [1e308, 1e308, 0.0, 0.0]))
        elif variant == "degenerate_pose":
            fields["pose"] = rng.choice(([0.0] * 16, [float("inf")] * 16, [1e300] * 16,
                                         [2.0, 0, 0, 0, 0, 2.0, 0, 0, 0, 0, 2.0, 0, 0, 0, 0, 1]))
        elif variant == "flags_without_depth":
            del fields["depth"]
            depth = None
        elif variant == "extra_part":
            extra = [self.bytes_(rng.randint(0, 64))]
        parts = [pack(self.header(s, **fields)), colour]
        if depth is not None:
            parts.append(depth)
        return variant, parts + extra, s

    def _payload_over_limit(self):
        """Over max_frame_bytes but within libzmq's limit: a FRAME_TOO_LARGE reply."""
        s = self.seq()
        size = self.limits.max_frame_bytes + self.rng.randint(1, MAX_HEADER_BYTES)
        return "within_libzmq_limit", [pack(self.header(s, w=4096, h=4096)), self.big(size)], s

    def _oversize_part(self):
        """A part over max_frame_bytes + 64 KiB: libzmq drops the connection, no reply."""
        s = self.seq()
        size = self.limits.max_frame_bytes + MAX_HEADER_BYTES + self.rng.randint(1, 1 << 20)
        if self.rng.random() < 0.5:
            return "as_payload", [pack(self.header(s)), self.big(size)], s
        return "as_header", [self.big(size), b"\x00"], None


def reply_key(message: dict) -> str:
    kind = message.get("type")
    if kind == "error":
        return str(message.get("code"))
    if kind == "dropped":
        return f"dropped:{message.get('reason')}"
    return str(kind)


def fuzz_worker(index: int, endpoint: str, seed: int, quota: int, rate: float,
                categories: dict[str, float], limits: ServerSettings, client_keys: dict,
                go, stop, progress, results) -> None:
    """One fuzzer process: sends `quota` hostile messages on fresh DEALER sockets."""
    rng = random.Random(seed * 1_000_003 + index)
    messages = HostileMessages(rng, limits, categories)
    context = zmq.Context()
    curve = curve_options(client_keys.get("server_key"), client_keys.get("client_key"))
    sent = Counter()
    variants = Counter()
    replies = Counter()
    by_category: dict[str, Counter] = defaultdict(Counter)
    stats = Counter()
    pending: dict[int, str] = {}

    def fresh_socket() -> zmq.Socket:
        socket = context.socket(zmq.DEALER)
        # Linger so the last messages (an oversize part especially) still go out after close.
        socket.setsockopt(zmq.LINGER, 1000)
        socket.setsockopt(zmq.SNDTIMEO, 2000)
        # A short send queue: sends then keep pace with what the daemon actually reads.
        socket.setsockopt(zmq.SNDHWM, 16)
        apply_curve(socket, curve)
        socket.connect(endpoint)
        return socket

    def drain(socket: zmq.Socket) -> None:
        while True:
            try:
                raw = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = msgpack.unpackb(raw, raw=False)
                key = reply_key(message)
            except Exception:  # a reply we cannot read is itself a finding: count it
                key = "UNDECODABLE_REPLY"
                message = {}
            replies[key] += 1
            seq = message.get("seq") if isinstance(message, dict) else None
            category = pending.pop(seq, None) if isinstance(seq, int) else None
            by_category[category or "unattributed"][key] += 1

    socket = fresh_socket()
    stats["sockets"] = 1
    until_reconnect = rng.randint(50, 500)
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()
    count = 0
    start_cpu = time.process_time()
    while count < quota and not stop.is_set():
        if not go.is_set():
            drain(socket)
            go.wait(0.05)
            next_at = time.monotonic()
            continue
        category, variant, parts, seq = messages.next()
        try:
            socket.send_multipart(parts, copy=False)
        except zmq.Again:  # the daemon stopped reading this connection: try a fresh one
            stats["send_timeouts"] += 1
            socket.close()
            socket = fresh_socket()
            stats["sockets"] += 1
            continue
        count += 1
        sent[category] += 1
        variants[f"{category}/{variant}"] += 1
        if seq is not None:
            pending[seq] = category
        drain(socket)
        until_reconnect -= 1
        if category == "oversize_part" or until_reconnect <= 0:
            drain(socket)
            socket.close()
            pending.clear()  # replies to the old socket are gone with it
            socket = fresh_socket()
            stats["sockets"] += 1
            until_reconnect = rng.randint(50, 500)
        if count % 50 == 0:
            progress.value = count
        if interval:
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    progress.value = count
    # A last look for replies still on their way, without waiting on the daemon for long.
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        drain(socket)
        time.sleep(0.02)
    socket.close(linger=0)
    context.term()
    stats["cpu_ms"] = int((time.process_time() - start_cpu) * 1000)
    results.put({"index": index, "sent": dict(sent), "variants": dict(variants),
                 "replies": dict(replies),
                 "by_category": {k: dict(v) for k, v in by_category.items()},
                 "stats": dict(stats)})


ATTACKS = ("fuzz", "reconnect_storm", "handshake_flood")


def _small_frame(seq: int) -> list[bytes]:
    """A well-formed 64x48 frame: if admitted, the daemon infers it."""
    return [pack({"v": 1, "seq": seq, "w": 64, "h": 48, "enc": "bgr8"}),
            bytes(64 * 48 * 3)]


def connection_worker(index: int, attack: str, endpoint: str, quota: int, rate: float,
                      client_keys: dict, go, stop, progress, results) -> None:
    """One attacker process for the connection attacks; `quota` counts connections.

    reconnect_storm: one enrolled key (not the well-behaved headset's) opens a connection,
    sends a frame, waits up to 20 ms for its reply and closes, as fast as it can.
    handshake_flood: connections with fresh unknown keys (CURVE; in plain mode, fresh
    connections), 64 kept open at a time, each sending a frame it never gets answered.
    """
    context = zmq.Context()
    curve = curve_options(client_keys.get("server_key"), client_keys.get("client_key"))
    replies = Counter()
    stats = Counter()
    open_sockets: list[zmq.Socket] = []
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()
    count = 0
    start_cpu = time.process_time()

    def drain(socket: zmq.Socket) -> None:
        while True:
            try:
                raw = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                replies[reply_key(msgpack.unpackb(raw, raw=False))] += 1
            except Exception:
                replies["UNDECODABLE_REPLY"] += 1

    while count < quota and not stop.is_set():
        if not go.is_set():
            for socket in open_sockets:
                socket.close(linger=0)
            open_sockets.clear()
            go.wait(0.05)
            next_at = time.monotonic()
            continue
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 4)
        if attack == "reconnect_storm":
            apply_curve(socket, curve)
        elif curve is not None:  # handshake_flood under CURVE: a key nobody enrolled
            public, secret = zmq.curve_keypair()
            socket.curve_serverkey = curve[0]
            socket.curve_publickey, socket.curve_secretkey = public, secret
        socket.connect(endpoint)
        try:
            socket.send_multipart(_small_frame(count), zmq.NOBLOCK)
        except zmq.Again:
            stats["send_full"] += 1
        count += 1
        stats["connections"] += 1
        if attack == "reconnect_storm":
            if socket.poll(20):
                drain(socket)
            socket.close(linger=0)
        else:
            open_sockets.append(socket)
            for old in open_sockets:
                drain(old)
            if len(open_sockets) > 64:
                open_sockets.pop(0).close(linger=0)
        if count % 10 == 0:
            progress.value = count
        if interval:
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    progress.value = count
    for socket in open_sockets:
        drain(socket)
        socket.close(linger=0)
    context.term()
    stats["cpu_ms"] = int((time.process_time() - start_cpu) * 1000)
    results.put({"index": index, "sent": {attack: count}, "variants": {},
                 "replies": dict(replies), "by_category": {attack: dict(replies)},
                 "stats": dict(stats)})


class WellBehavedClient:
    """One headset: max_in_flight=1, real frames at camera rate, every round trip kept."""

    def __init__(self, endpoint: str, frame: np.ndarray, fps: float, keys: dict) -> None:
        self.frame = frame
        self.period = 1.0 / fps
        self.client = Client(endpoint, max_in_flight=1, reply_timeout=2.0, **keys)
        if not self.client.wait_connected(10):
            raise RuntimeError(f"the well-behaved client could not connect to {endpoint}")
        self.kinds: dict[str, Counter] = defaultdict(Counter)
        self.samples: list[tuple[str, int, float]] = []  # (phase, window, round trip ms)

    def round_trips_ms(self, phase: str, parity: int | None = None) -> list[float]:
        """Samples of one phase; `parity` keeps every other window of it (0 or 1)."""
        windows = sorted({w for p, w, _ in self.samples if p == phase})
        keep = set(windows if parity is None else windows[parity::2])
        return [ms for p, w, ms in self.samples if p == phase and w in keep]

    def stream(self, phase: str, seconds: float, settle_s: float, until=None,
               window: int = -1) -> None:
        """Stream for `seconds` (or until `until()` is true); keep samples after settle_s."""
        start = time.monotonic()
        next_send = start
        while time.monotonic() < start + seconds and not (until and until()):
            delay = next_send - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            counted = time.monotonic() - start >= settle_s
            seq = self.client.send(self.frame)
            next_send = time.monotonic() + self.period
            if seq is None:
                self.kinds[phase]["not_sent"] += 1
                continue
            reply = self._reply_for(seq)
            kind = reply.kind if reply is not None else "no_reply"
            if kind == "error":
                kind = f"error:{reply.message.get('code')}"
            if counted:
                self.kinds[phase][kind] += 1
                if reply is not None and reply.ok:
                    self.samples.append((phase, window, reply.round_trip_s * 1e3))

    def _reply_for(self, seq: int):
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            reply = self.client.recv(timeout=deadline - time.monotonic())
            if reply is not None and reply.seq == seq:
                return reply
        return None

    def close(self) -> None:
        self.client.close()


def percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    array = np.asarray(values)
    return {"n": len(values), "p50_ms": float(np.percentile(array, 50)),
            "p99_ms": float(np.percentile(array, 99)), "max_ms": float(array.max())}


def new_client_frame(daemon: DaemonProcess, frame: np.ndarray) -> tuple[str, object]:
    """One frame from a brand-new connection (a headset arriving now): its outcome."""
    # Its own key under CURVE: with the bystander's, it would replace the bystander.
    keys = daemon.newcomer_keys if daemon.curve else daemon.client_keys
    with Client(daemon.endpoint, max_in_flight=1, **keys) as client:
        if not client.wait_connected(10):
            return "not connected", None
        seq = client.send(frame)
        while seq is not None:
            reply = client.recv(timeout=5)
            if reply is None:
                return "no reply", None
            if reply.seq == seq:
                kind = reply.kind if reply.kind != "error" else reply.message.get("code")
                return str(kind), reply
        return "not sent", None


def final_frame_check(daemon: DaemonProcess, frame: np.ndarray,
                      limits: ServerSettings) -> dict:
    """A fresh connection sends one real frame; retried once after client_timeout_s if the
    client table is full (fuzzer connections are forgotten only after that timeout)."""
    outcome: dict = {}
    for attempt in (1, 2):
        kind, reply = new_client_frame(daemon, frame)
        outcome[f"attempt_{attempt}"] = (
            f"result, {len(reply.detections)} detection(s)" if kind == "result" else kind)
        if reply is not None and reply.ok:
            outcome["ok"] = len(reply.detections) >= 1
            return outcome
        if reply is None or reply.message.get("code") != "TOO_MANY_CLIENTS" or attempt == 2:
            break
        time.sleep(limits.client_timeout_s + 2)
    outcome["ok"] = False
    return outcome


def run(args: argparse.Namespace) -> dict:
    categories = {name: weight for name, weight in WEIGHTS.items()
                  if name not in args.exclude and (not args.only or name in args.only)}
    if not categories:
        raise SystemExit("no categories left to fuzz with")
    limits = server_settings(args.config)
    frame = astronaut_frame()
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="sl-fuzz-") as tmp:
        endpoint = args.bind or f"ipc://{tmp}/sightline.sock"
        daemon = DaemonProcess(endpoint, Path(tmp), curve=args.curve, config=args.config)
        print(f"starting sightline serve on {endpoint}, {daemon.mode}", flush=True)
        daemon.start()
        ready = daemon.sample()
        go, stop = context.Event(), context.Event()
        results = context.Queue()
        quota = math.ceil(args.messages / args.fuzzers)
        progress = [context.Value("q", 0) for _ in range(args.fuzzers)]
        # Under CURVE the attackers use an enrolled key of their own (the bystander's would
        # be taken over by the newest connection) or, for the flood, unknown keys.
        attack_keys = daemon.stranger_keys if args.attack == "handshake_flood" \
            else daemon.attacker_keys
        if args.attack == "fuzz":
            workers = [context.Process(
                target=fuzz_worker, name=f"fuzzer-{i}",
                args=(i, endpoint, args.seed, quota, args.rate / args.fuzzers, categories,
                      limits, attack_keys, go, stop, progress[i], results))
                for i in range(args.fuzzers)]
        else:
            workers = [context.Process(
                target=connection_worker, name=f"{args.attack}-{i}",
                args=(i, args.attack, endpoint, quota, args.rate / args.fuzzers, attack_keys,
                      go, stop, progress[i], results))
                for i in range(args.fuzzers)]
        for worker in workers:
            worker.start()
        headset = WellBehavedClient(endpoint, frame, args.fps, daemon.client_keys)
        headset.stream("warm-up", 2.0, settle_s=2.0)  # first frames pay one-off costs
        before = daemon.sample()
        total_sent = lambda: sum(p.value for p in progress)  # noqa: E731
        all_sent = lambda: (total_sent() >= quota * args.fuzzers  # noqa: E731
                            or not any(w.is_alive() for w in workers))
        cpu: dict[str, float] = Counter()
        seconds: dict[str, float] = Counter()
        windows = 0
        fuzz_started = time.monotonic()
        print(f"fuzzing: {args.fuzzers} fuzzer process(es), {quota * args.fuzzers} messages, "
              f"rate {'unlimited' if args.rate <= 0 else f'{args.rate:g}/s'}; "
              f"{args.window_s:g} s alone/fuzz windows", flush=True)
        crashed_at = None
        phase = "alone"
        probes: dict[str, Counter] = defaultdict(Counter)
        timeline: list[dict] = []  # the daemon after each window

        def probe_new_headset(phase: str) -> None:
            """Mid-window, a headset that connects only now sends one frame."""
            time.sleep(args.window_s / 2)
            if phase == "fuzz" and all_sent():
                return  # the fuzz window already ended early
            probes[phase][new_client_frame(daemon, frame)[0]] += 1
        while True:
            if not daemon.alive():
                crashed_at = time.monotonic() - fuzz_started
                break
            (go.set if phase == "fuzz" else go.clear)()
            a, t0 = daemon.sample(), time.monotonic()
            probe = threading.Thread(target=probe_new_headset, args=(phase,),
                                     name="new-headset-probe", daemon=True)
            probe.start()
            headset.stream(phase, args.window_s, args.settle_s,
                           until=all_sent if phase == "fuzz" else None, window=windows)
            probe.join(20)
            if not daemon.alive():
                crashed_at = time.monotonic() - fuzz_started
                break
            b = daemon.sample()
            cpu[phase] += b.cpu_s - a.cpu_s
            seconds[phase] += time.monotonic() - t0
            windows += 1
            if phase == "alone" and windows > 1 and all_sent():
                break
            timeline.append({"t_s": round(time.monotonic() - fuzz_started, 1), "phase": phase,
                             "sent": total_sent(), "rss_mib": round(b.rss_kib / 1024, 1),
                             "fds": b.fds, "threads": b.threads})
            print(f"  {time.monotonic() - fuzz_started:6.0f} s  {total_sent():>8} sent  "
                  f"rss {b.rss_kib / 1024:.0f} MiB", flush=True)
            phase = "alone" if phase == "fuzz" else "fuzz"
        fuzz_elapsed = time.monotonic() - fuzz_started
        go.set()  # let paused fuzzers see the stop
        stop.set()
        worker_results = []
        for _ in workers:
            try:
                worker_results.append(results.get(timeout=30))
            except Exception:
                break
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
        headset.close()
        alive = daemon.alive()
        try:
            status = daemon.status() if alive else None
        except Exception as exc:  # a status that fails is a finding, not a harness crash
            status = {"error": str(exc)}
        after = daemon.sample() if alive else None
        pong = daemon.ping(5) if alive else None
        frame_check = final_frame_check(daemon, frame, limits) if alive else {"ok": False}
        exit_code = daemon.stop()
        problems = daemon.log_problems()
        log_tail = daemon.log_path.read_text(errors="replace")[-4000:]

    sent, variants, replies = Counter(), Counter(), Counter()
    by_category: dict[str, Counter] = defaultdict(Counter)
    stats = Counter()
    for result in worker_results:
        sent.update(result["sent"])
        variants.update(result["variants"])
        replies.update(result["replies"])
        stats.update(result["stats"])
        for category, codes in result["by_category"].items():
            by_category[category].update(codes)
    alone = percentiles(headset.round_trips_ms("alone"))
    fuzz = percentiles(headset.round_trips_ms("fuzz"))
    # The noise floor: the same comparison between two halves of the alone windows.
    alone_a = percentiles(headset.round_trips_ms("alone", 0))
    alone_b = percentiles(headset.round_trips_ms("alone", 1))

    def as_dict(sample: ProcSample | None) -> dict | None:
        return None if sample is None else {
            "rss_mib": sample.rss_kib / 1024, "peak_rss_mib": sample.peak_rss_kib / 1024,
            "fds": sample.fds, "threads": sample.threads}

    return {
        "attack": args.attack,
        "load_average": list(os.getloadavg()),
        "attacker_results": replies.get("result", 0),
        "daemon_status_at_end": status,
        "mode": daemon.mode,
        "endpoint_kind": endpoint.split("://")[0],
        "config": str(args.config) if args.config else None,
        "max_fps_per_client": limits.max_fps_per_client,
        "max_frame_bytes": limits.max_frame_bytes,
        "seed": args.seed, "fuzzers": args.fuzzers,
        "rate_limit_per_s": args.rate if args.rate > 0 else None,
        "categories": categories,
        "window_s": args.window_s, "settle_s": args.settle_s, "client_fps": args.fps,
        "messages_sent": sum(sent.values()), "sent_by_category": dict(sent),
        "sent_by_variant": dict(sorted(variants.items())),
        "replies_by_code": dict(replies.most_common()),
        "replies_by_category": {k: dict(v.most_common()) for k, v in sorted(by_category.items())},
        "fuzzer_stats": dict(stats),
        "fuzz_elapsed_s": fuzz_elapsed,
        "fuzz_phase_s": seconds.get("fuzz", 0.0),
        "messages_per_fuzz_second": (sum(sent.values()) / seconds["fuzz"]
                                     if seconds.get("fuzz") else None),
        "daemon_cpu_percent": {p: 100 * cpu[p] / seconds[p] for p in seconds if seconds[p]},
        "client_alone": alone, "client_fuzz": fuzz,
        "p50_ratio": (fuzz["p50_ms"] / alone["p50_ms"]) if fuzz["n"] and alone["n"] else None,
        "p99_ratio": (fuzz["p99_ms"] / alone["p99_ms"]) if fuzz["n"] and alone["n"] else None,
        "alone_even_windows": alone_a, "alone_odd_windows": alone_b,
        "p99_ratio_alone_odd_vs_even": (alone_b["p99_ms"] / alone_a["p99_ms"])
        if alone_a["n"] and alone_b["n"] else None,
        "client_replies": {k: dict(v) for k, v in headset.kinds.items()},
        "new_headset_probes": {k: dict(v) for k, v in probes.items()},
        "daemon_crashes": 0 if crashed_at is None else 1,
        "crashed_after_s": crashed_at,
        "daemon_alive_at_end": alive,
        "ping_at_end": pong is not None,
        "real_frame_at_end": frame_check,
        "exit_code_on_sigterm": exit_code,
        "daemon_log_problems": problems,
        "daemon_log_tail": log_tail if (problems["tracebacks"] or not alive) else "",
        "daemon_after_each_window": timeline,
        "daemon_ready": as_dict(ready), "daemon_before_fuzz": as_dict(before),
        "daemon_after_fuzz": as_dict(after),
    }


def print_summary(r: dict) -> None:
    print()
    print(f"Sightline daemon fuzz — {r['mode']}, {r['endpoint_kind']} endpoint, "
          f"config: {r['config'] or 'defaults'} (max_fps_per_client {r['max_fps_per_client']:g})")
    print(f"attack: {r['attack']}; load average at the end {r['load_average']}")
    print(f"seed {r['seed']}, {r['fuzzers']} fuzzer process(es), "
          f"{r['messages_sent']:,} messages in {r['fuzz_phase_s']:.0f} s of fuzz windows "
          f"({r['messages_per_fuzz_second'] or 0:,.0f}/s; whole run {r['fuzz_elapsed_s']:.0f} s)")
    print("\nmessages sent, by category:")
    for name, count in sorted(r["sent_by_category"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<20} {count:>8,}")
    fuzz_cpu = r["fuzzer_stats"].get("cpu_ms", 0) / 1000
    print(f"  fuzzer sockets opened: {r['fuzzer_stats'].get('sockets', 0):,}, "
          f"send timeouts: {r['fuzzer_stats'].get('send_timeouts', 0):,}; fuzzers' own CPU "
          f"{fuzz_cpu:.0f} s ({100 * fuzz_cpu / max(r['fuzz_phase_s'], 1e-9):.0f}% of a core "
          "during fuzz windows, on the same cores as the daemon)")
    print("\nreplies received by the fuzzers, by code / type:")
    for code, count in r["replies_by_code"].items():
        print(f"  {code:<20} {count:>8,}")
    print(f"\nframes the attackers got inferred (result replies): {r['attacker_results']:,}")
    status = r.get("daemon_status_at_end") or {}
    if status.get("handshakes"):
        print(f"daemon's handshake gate: {status['handshakes']}")
    for h in status.get("headsets", []):
        print(f"  headset {h['name']}: frames {h['frames']}, dropped {h['dropped']}, "
              f"rate-limited {h['rate_limited']}, connections {h['connections']}, "
              f"replaced {h['replaced']}")
    print("\nwell-behaved client (640x480 BGR astronaut, max_in_flight=1, "
          f"{r['client_fps']:g} fps, interleaved {r['window_s']:g} s windows):")
    for phase in ("alone", "fuzz"):
        stats = r[f"client_{phase}"]
        if stats["n"]:
            print(f"  {phase:<6} n={stats['n']:>5}  p50 {stats['p50_ms']:7.2f} ms  "
                  f"p99 {stats['p99_ms']:7.2f} ms  max {stats['max_ms']:7.1f} ms  "
                  f"daemon CPU {r['daemon_cpu_percent'].get(phase, 0):.0f}%")
        other = {k: v for k, v in r["client_replies"].get(phase, {}).items() if k != "result"}
        if other:
            print(f"         non-result replies: {other}")
    if r["p99_ratio"] is not None:
        verdict = "within" if r["p99_ratio"] <= 1.10 else "NOT within"
        print(f"  p99 fuzz/alone = {r['p99_ratio']:.3f} ({verdict} the 10% target); "
              f"p50 ratio {r['p50_ratio']:.3f}")
    for phase, outcomes in r["new_headset_probes"].items():
        print(f"  a new connection's first frame, mid-{phase} window: {outcomes}")
    if r["p99_ratio_alone_odd_vs_even"] is not None:
        print(f"  noise floor: p99 of alone windows 2,4,.. vs 1,3,.. = "
              f"{r['p99_ratio_alone_odd_vs_even']:.3f} ({r['alone_odd_windows']['p99_ms']:.1f} vs "
              f"{r['alone_even_windows']['p99_ms']:.1f} ms)")
    print("\ndaemon:")
    print(f"  crashes: {r['daemon_crashes']}"
          + (f" (died {r['crashed_after_s']:.0f} s into the fuzz)" if r["daemon_crashes"] else ""))
    print(f"  alive at end: {r['daemon_alive_at_end']}, answers ping: {r['ping_at_end']}, "
          f"real frame from a fresh connection: {r['real_frame_at_end']}")
    print(f"  exit code on SIGTERM: {r['exit_code_on_sigterm']}; log: "
          f"{r['daemon_log_problems']['tracebacks']} traceback(s), "
          f"{r['daemon_log_problems']['error_lines']} ERROR line(s)")
    for label in ("daemon_ready", "daemon_before_fuzz", "daemon_after_fuzz"):
        s = r[label]
        if s:
            print(f"  {label[7:]:<12} RSS {s['rss_mib']:7.1f} MiB  (peak {s['peak_rss_mib']:.1f})"
                  f"  fds {s['fds']}  threads {s['threads']}")
    fuzz_windows = [w for w in r["daemon_after_each_window"] if w["phase"] == "fuzz"]
    if len(fuzz_windows) >= 2:
        first, last = fuzz_windows[0], fuzz_windows[-1]
        print(f"  RSS after the first fuzz window ({first['sent']:,} sent) {first['rss_mib']:.1f}"
              f" MiB, after the last ({last['sent']:,} sent) {last['rss_mib']:.1f} MiB "
              "(the difference is growth that goes on with the messages, not first-use)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000,
                        help="hostile messages (fuzz) or connections (the connection "
                             "attacks) to send in all (default 100000)")
    parser.add_argument("--attack", choices=ATTACKS, default="fuzz",
                        help="fuzz: hostile messages (--only/--exclude categories); "
                             "reconnect_storm: one enrolled key reconnecting flat out; "
                             "handshake_flood: connections with unknown keys")
    parser.add_argument("--fuzzers", type=int, default=2, help="fuzzer processes")
    parser.add_argument("--rate", type=float, default=0,
                        help="total messages/s over all fuzzers (0: as fast as sends go)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--config", type=Path, help="daemon TOML config, passed to serve")
    parser.add_argument("--curve", action="store_true",
                        help="CURVE daemon (throwaway keys); fuzzers use the enrolled key")
    parser.add_argument("--bind", help="daemon endpoint (default: a fresh ipc:// socket)")
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--fps", type=float, default=30.0, help="well-behaved client rate")
    parser.add_argument("--exclude", nargs="*", default=[], choices=list(WEIGHTS),
                        metavar="CATEGORY", help=f"leave out categories: {', '.join(WEIGHTS)}")
    parser.add_argument("--only", nargs="*", default=[], choices=list(WEIGHTS),
                        metavar="CATEGORY", help="fuzz with these categories only")
    parser.add_argument("--json", type=Path, help="write the full results here")
    args = parser.parse_args()
    result = run(args)
    print_summary(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"\nwrote {args.json}")
    if result["daemon_crashes"] or not result["real_frame_at_end"].get("ok"):
        sys.exit(1)


if __name__ == "__main__":
    main()

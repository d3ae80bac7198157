"""`sightline conformance ENDPOINT`: drive a running daemon through what docs/protocol.md
promises a client, and say per section whether the daemon keeps it.

It speaks the wire protocol the way a client in another language would (a DEALER, msgpack
maps, no Sightline SDK), so a doc change without a daemon change, or the reverse, fails
here. It uses a handful of connections (CURVE admits a few handshakes per second per key)
and ends with the bad-request budget, which leaves the headset rate-limited for a few
seconds. What it cannot provoke from outside (TOO_MANY_CLIENTS, NOT_ENROLLED, INTERNAL)
it lists as not checked.
"""

from __future__ import annotations

import itertools
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq

from runtime.client import apply_curve, curve_options

W, H = 64, 48
PIXELS = bytes(W * H * 3)
STAMPS = ("received", "taken", "decoded", "preprocessed", "started", "inferred",
          "postprocessed", "sent")  # §8, in order
NOT_CHECKED = ("TOO_MANY_CLIENTS (needs max_clients connections)",
               "NOT_ENROLLED (needs a revocation)", "INTERNAL (needs a daemon bug)")


class Failed(AssertionError):
    """One statement of the doc the daemon did not keep."""


def expect(condition: bool, statement: str) -> None:
    if not condition:
        raise Failed(statement)


@dataclass
class Section:
    title: str
    checks: int = 0
    failures: list[str] = field(default_factory=list)


class Wire:
    """One DEALER connection: send parts, read replies as msgpack maps."""

    def __init__(self, context: zmq.Context, endpoint: str, curve, timeout_s: float) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        apply_curve(self.socket, curve)
        self.socket.connect(endpoint)
        self.timeout_ms = int(timeout_s * 1000)

    def send(self, *parts: bytes) -> None:
        self.socket.send_multipart(list(parts))

    def recv(self, timeout_ms: int | None = None) -> dict | None:
        if not self.socket.poll(self.timeout_ms if timeout_ms is None else timeout_ms):
            return None
        parts = self.socket.recv_multipart()
        expect(len(parts) == 1, f"§3: a reply is exactly one part (got {len(parts)})")
        reply = msgpack.unpackb(parts[0], raw=False)
        expect(isinstance(reply, dict) and reply.get("v") == 1 and "type" in reply
               and isinstance(reply.get("t"), dict) and "sent" in reply["t"],
               f"§5: every reply has v = 1, type, seq and t.sent (got {reply!r:.200})")
        return reply

    def exchange(self, *parts: bytes) -> dict:
        self.send(*parts)
        reply = self.recv()
        expect(reply is not None, "§6.3: every request gets a reply")
        return reply

    def drain(self, quiet_ms: int = 700) -> list[dict]:
        replies = []
        while (reply := self.recv(quiet_ms)) is not None:
            replies.append(reply)
        return replies

    def close(self) -> None:
        self.socket.close()


def header(seq: int | None, **fields) -> bytes:
    base = {"v": 1, "seq": seq, "w": W, "h": H, "enc": "bgr8", **fields}
    return msgpack.packb({k: v for k, v in base.items() if v is not None})


def _with_float32_ts(fields: dict, ts: float) -> bytes:
    """`fields` plus a float32 `ts`, packed by hand: msgpack-python writes float64."""
    body = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in fields.items())
    body += msgpack.packb("ts") + b"\xca" + struct.pack(">f", ts)
    return bytes([0x80 | (len(fields) + 1)]) + body


def ping(seq: int) -> bytes:
    return msgpack.packb({"v": 1, "type": "ping", "seq": seq})


class Conformance:
    def __init__(self, endpoint: str, *, server_key=None, client_key=None,
                 timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint
        self.curve = curve_options(server_key, client_key)
        self.timeout_s = timeout_s
        self.context = zmq.Context.instance()
        self.seqs = itertools.count(secrets.randbelow(2**31) + 1)  # §4.3: start at random
        self.sections: list[Section] = []

    @contextmanager
    def wire(self) -> Iterator[Wire]:
        wire = Wire(self.context, self.endpoint, self.curve, self.timeout_s)
        try:
            yield wire
        finally:
            wire.close()

    def run(self, report: Callable[[Section], None] = lambda s: None) -> bool:
        with self.wire() as main:
            for title, check in self._sections(main):
                section = Section(title)
                try:
                    check(main, section)
                except Failed as exc:
                    section.failures.append(str(exc))
                except Exception as exc:  # a crash in one section must not hide the others
                    section.failures.append(f"{type(exc).__name__}: {exc}")
                main.drain(100)  # whatever a failed section left behind
                self.sections.append(section)
                report(section)
        return all(not s.failures for s in self.sections)

    def _sections(self, main: Wire):
        yield "§4.5 ping", self.check_ping
        yield "§3 framing", self.check_framing
        yield "§3.1 msgpack rules", self.check_msgpack
        yield "§7.2 error codes", self.check_error_codes
        yield "§5.1/§8 result and stamps", self.check_stamps
        yield "§6.2 newest wins, §6.3 one reply per frame", self.check_newest_wins
        yield "§5.3/§6.2 dropped counts", self.check_counters
        if self.curve is not None:
            yield "§7.4 replacement", self.check_replacement
        yield "§7.2 bad-request budget", self.check_budget

    # -- the sections ---------------------------------------------------------------------
    def check_ping(self, main: Wire, section: Section) -> None:
        seq = next(self.seqs)
        reply = main.exchange(ping(seq))
        section.checks += 1
        expect(reply["type"] == "pong" and reply["seq"] == seq, f"§5.4: a ping gets a pong "
               f"with its seq (got {reply.get('type')} {reply.get('code', '')})")
        section.checks += 1
        models = reply.get("models")
        expect(isinstance(models, list) and models and all(
            {"name", "version", "task", "precision", "provider", "labels", "default"} <= set(m)
            for m in models), "§5.4: each model map has name, version, task, precision, "
                              "provider, labels, default")
        section.checks += 1
        expect(sum(bool(m["default"]) for m in models) == 1, "§5.4: one model is the default")
        section.checks += 1
        extra = main.exchange(ping(seq + 1), b"ignored")
        expect(extra["type"] == "pong", "§3: a ping's extra parts are ignored")

    def check_framing(self, main: Wire, section: Section) -> None:
        cases = [
            ("a 2-part frame is served", [header(next(self.seqs)), PIXELS], None),
            ("a 1-part frame is MALFORMED", [header(next(self.seqs))], "MALFORMED"),
            ("a 3-part frame without depth is MALFORMED",
             [header(next(self.seqs)), PIXELS, b"x"], "MALFORMED"),
            ("a 4-part frame is MALFORMED", [header(next(self.seqs)), PIXELS, b"x", b"y"],
             "MALFORMED"),
            ("a 2-part frame with depth is MALFORMED",
             [header(next(self.seqs), depth={"w": 8, "h": 6, "enc": "u16mm"}), PIXELS],
             "MALFORMED"),
        ]
        for statement, parts, code in cases:
            section.checks += 1
            reply = main.exchange(*parts)
            got = reply.get("code", reply["type"])
            if code is None:
                expect(reply["type"] in ("result", "dropped"), f"§3: {statement} (got {got})")
            else:
                expect(got == code, f"§3: {statement} (got {got})")

    def check_msgpack(self, main: Wire, section: Section) -> None:
        seq = next(self.seqs)
        good = {"v": 1, "seq": seq, "w": W, "h": H, "enc": "bgr8"}
        cases = [
            ("an array header is MALFORMED", msgpack.packb([1, seq]), "MALFORMED"),
            ("integer keys are MALFORMED", msgpack.packb({0: 1, 1: seq}), "MALFORMED"),
            ("a bin key is MALFORMED", msgpack.packb({**good, b"x": 1}), "MALFORMED"),
            ("a bin string value is BAD_HEADER",
             msgpack.packb({**good, "enc": b"bgr8"}, use_bin_type=True), "BAD_HEADER"),
            ("true for a number is BAD_HEADER", msgpack.packb({**good, "w": True}),
             "BAD_HEADER"),
            ("1 for a flag is BAD_HEADER", msgpack.packb({**good, "spatial": 1}), "BAD_HEADER"),
            ("nil for an optional field means absent", msgpack.packb({**good, "model": None}),
             None),
            ("an integer ts is accepted", msgpack.packb({**good, "ts": 1700000000}), None),
            ("a float32 ts is accepted", _with_float32_ts(good, 1.7e9), None),
            ("a header over 64 KiB is MALFORMED",
             msgpack.packb({**good, "pad": "x" * 65536}), "MALFORMED"),
        ]
        for statement, raw, code in cases:
            section.checks += 1
            reply = main.exchange(raw, PIXELS)
            got = reply.get("code", reply["type"])
            if code is None:
                expect(reply["type"] in ("result", "dropped"), f"§3.1: {statement} (got {got})")
            else:
                expect(got == code, f"§3.1: {statement} (got {got})")
            if statement.startswith("an integer ts") and reply["type"] == "result":
                section.checks += 1
                expect(reply["ts"] == 1700000000.0 and isinstance(reply["ts"], float),
                       "§4.1: an integer ts is echoed as float64")

    def check_error_codes(self, main: Wire, section: Section) -> None:
        s = self.seqs
        cases = [
            ("MALFORMED", [b"\xc1garbage", PIXELS]),
            ("UNSUPPORTED_VERSION", [header(next(s), v=2), PIXELS]),
            ("UNSUPPORTED_VERSION", [header(next(s), v=1.0), PIXELS]),
            ("BAD_HEADER", [header(None), PIXELS]),
            ("BAD_HEADER", [header(next(s), enc="yuv420"), PIXELS]),
            ("BAD_HEADER", [header(next(s), type="frobnicate"), PIXELS]),
            ("BAD_PAYLOAD_SIZE", [header(next(s)), PIXELS[:-1]]),
            ("DECODE_FAILED", [header(next(s), enc="jpeg"), b"\xff\xd8 not a jpeg"]),
            ("FRAME_TOO_LARGE", [header(next(s), w=1 << 20, h=1 << 20), PIXELS]),
            ("UNKNOWN_MODEL", [header(next(s), model="no-such-model-" + secrets.token_hex(4)),
                               PIXELS]),
        ]
        for code, parts in cases:
            section.checks += 1
            reply = main.exchange(*parts)
            expect(reply["type"] == "error" and reply.get("code") == code,
                   f"§7.2: {code} (got {reply.get('code', reply['type'])})")
            expect(isinstance(reply.get("message"), str), "§5.2: an error has a message")
            seq = msgpack.unpackb(parts[0], raw=False).get("seq") if code != "MALFORMED" \
                else None
            expect(reply["seq"] == seq, f"§5.2: {code} echoes the seq when readable "
                                        f"(sent {seq}, got {reply['seq']})")

    def check_stamps(self, main: Wire, section: Section) -> None:
        seq = next(self.seqs)
        sent = time.time()
        reply = main.exchange(header(seq, ts=sent), PIXELS)
        round_trip = time.time() - sent
        section.checks += 1
        expect(reply["type"] == "result", f"a plain frame gets a result (got {reply})")
        for key in ("ts", "model", "model_version", "w", "h", "detections", "dropped"):
            section.checks += 1
            expect(key in reply, f"§5.1: a result has {key!r}")
        section.checks += 1
        expect(reply["ts"] == sent, "§4.2: ts is echoed unchanged")
        stamps = reply["t"]
        section.checks += 1
        missing = [s for s in STAMPS if s not in stamps]
        expect(not missing, f"§8: a result carries the {len(STAMPS)} stamps (missing {missing})")
        values = [stamps[s] for s in STAMPS]
        section.checks += 1
        expect(values == sorted(values), f"§8: the stamps are non-decreasing in order "
                                         f"({dict(zip(STAMPS, values, strict=True))})")
        section.checks += 1
        expect(all(isinstance(v, float) for v in values), "§4.2: stamps are float64")
        section.checks += 1
        inside = stamps["sent"] - stamps["received"]
        expect(inside <= round_trip, f"§8: time inside the daemon ({inside * 1000:.2f} ms) "
                                     f"is within the round trip ({round_trip * 1000:.2f} ms)")

    def check_newest_wins(self, main: Wire, section: Section) -> None:
        seqs = [next(self.seqs) for _ in range(8)]
        for seq in seqs:  # back to back: all but a few wait in the slot and are superseded
            main.send(header(seq), PIXELS)
        replies = main.drain()
        by_seq: dict[int, list[dict]] = {}
        for reply in replies:
            by_seq.setdefault(reply["seq"], []).append(reply)
        section.checks += 1
        expect(sorted(by_seq) == seqs and all(len(r) == 1 for r in by_seq.values()),
               f"§6.3: exactly one reply per frame (got {[r['seq'] for r in replies]})")
        section.checks += 1
        expect(by_seq[seqs[-1]][0]["type"] == "result", "§6.2: the newest frame is served")
        section.checks += 1
        dropped = [r for r in replies if r["type"] == "dropped"]
        expect(dropped and all(r["reason"] in ("superseded", "expired") for r in dropped),
               "§6.2: frames waiting behind a newer one are dropped, superseded")

    def check_counters(self, main: Wire, section: Section) -> None:
        def burst(wire: Wire) -> list[dict]:
            for _ in range(6):
                wire.send(header(next(self.seqs)), PIXELS)
            return [r for r in wire.drain() if r["type"] in ("dropped", "result")]

        first = burst(main)
        drops = [r["dropped"] for r in first if r["type"] == "dropped"]
        section.checks += 1
        expect(drops == sorted(set(drops)), f"§5.3: dropped replies carry one running "
                                            f"count, including each one ({drops})")
        section.checks += 1
        expect(first[-1]["type"] == "result" and first[-1]["dropped"] == max(drops, default=0),
               f"§5.1/§6.2: the newest frame's result carries the same count "
               f"({[(r['type'], r['dropped']) for r in first]})")
        with self.wire() as again:  # a reconnect
            second = burst(again)
        before = max(drops, default=0) if self.curve is not None else 0
        final = before + sum(r["type"] == "dropped" for r in second)
        section.checks += 1
        expect(second and second[-1]["type"] == "result" and second[-1]["dropped"] == final,
               "§7.4: the count is the headset's: under CURVE it goes on across a reconnect, "
               f"in plain mode a new connection is a new headset counting from 0 (before "
               f"{drops}, after {[(r['type'], r['dropped']) for r in second]})")

    def check_replacement(self, main: Wire, section: Section) -> None:
        with self.wire() as old, self.wire() as new:
            base = next(self.seqs)
            reply = old.exchange(header(base), PIXELS)
            expect(reply["type"] in ("result", "dropped"), "the headset is served on `old`")
            old_seqs, new_seqs = {base + 1, base + 2}, {base + 11, base + 12}
            for seq in sorted(old_seqs):
                old.send(header(seq), PIXELS)
            for seq in sorted(new_seqs):
                new.send(header(seq), PIXELS)
            got_old, got_new = old.drain(), new.drain()
            section.checks += 1
            expect({r["seq"] for r in got_new} <= new_seqs, "§7.4: replies to the replaced "
                   f"connection's frames never reach its successor (new got "
                   f"{sorted(r['seq'] for r in got_new)})")
            section.checks += 1
            expect({r["seq"] for r in got_old} <= old_seqs | {None}, "§7.4: a connection "
                   "only gets replies to its own frames")
            section.checks += 1
            expect(any(r.get("code") == "REPLACED" and r["seq"] is None for r in got_old),
                   "§7.2: the replaced connection is told REPLACED, seq nil")
            section.checks += 1
            again = old.exchange(ping(base + 3))
            expect(again.get("code") == "REPLACED", "§7.2: then REPLACED for each request on "
                   f"it, pings too (got {again.get('code', again['type'])})")
            section.checks += 1
            expect(new.exchange(ping(base + 13))["type"] == "pong", "the newer one is served")
        # `main` has been replaced as well: it answers REPLACED from now on
        section.checks += 1
        expect(main.exchange(ping(base + 20)).get("code") == "REPLACED",
               "§7.4: every older connection of the headset is replaced")

    def check_budget(self, main: Wire, section: Section) -> None:
        with self.wire() as wire:
            for _ in range(120):
                wire.send(header(next(self.seqs), enc="yuv420"), PIXELS)
            seq = next(self.seqs)
            wire.send(header(seq), PIXELS)  # at once: the bucket refills continuously
            replies = wire.drain()
        section.checks += 1
        expect(sum(r.get("code") == "BAD_HEADER" for r in replies) == 120,
               "every bad request is answered BAD_HEADER")
        (last,) = [r for r in replies if r["seq"] == seq] or [{}]
        section.checks += 1
        expect(last.get("code") == "RATE_LIMITED", "§7.2: over the bad-request budget "
               "(from a connection's first message) a good frame is RATE_LIMITED "
               f"(got {last.get('code', last.get('type'))})")


def run_conformance(endpoint: str, *, server_key: Path | str | None = None,
                    client_key: Path | str | None = None, timeout_s: float = 5.0,
                    report: Callable[[Section], None] = lambda s: None) -> list[Section]:
    checker = Conformance(endpoint, server_key=server_key, client_key=client_key,
                          timeout_s=timeout_s)
    checker.run(report)
    return checker.sections

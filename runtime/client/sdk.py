"""Python client SDK for headsets and tools: stream frames, get overlays back.

`send` never blocks: a frame that cannot go out at once (window full, daemon away) is
reported as not sent, because for AR the next frame is better than a late one. A
background I/O thread owns the DEALER socket; replies arrive by callback or iterator.
With `io_thread=False` the calling thread owns it instead (send and recv do the socket
I/O themselves): no thread hand-overs, as cheap as a bare DEALER, for one thread only.
ZeroMQ reconnects by itself after a daemon restart; frames lost with the old daemon
are reported as "lost" after `reply_timeout`, freeing the in-flight window.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from runtime.client.reply import ClientCounters, Reply
from runtime.curve_keys import load_public_key, make_curve_client
from runtime.protocol import decode_reply, encode_request

log = logging.getLogger(__name__)
_instance = itertools.count()
ENCODING_FOR_CHANNELS = {1: "gray8", 3: "bgr8"}


class Client:
    """Streams frames to a Sightline daemon. Thread-safe `send`; replies in one I/O thread
    (or, with `io_thread=False`, everything in the one thread that uses the client)."""

    def __init__(
        self,
        endpoint: str,
        *,
        model: str | None = None,
        max_in_flight: int = 2,
        reply_timeout: float = 2.0,
        on_reply: Callable[[Reply], None] | None = None,
        context: zmq.Context | None = None,
        max_queued_replies: int = 256,
        server_key: bytes | str | Path | None = None,
        client_key: str | Path | None = None,
        io_thread: bool = True,
    ) -> None:
        """`server_key`: the daemon's public key (Z85 bytes, or its .key file) and
        `client_key`: this headset's .key_secret file, for a CURVE daemon. The daemon is
        verified by its key: a daemon without the matching secret cannot complete the
        handshake, so nothing is sent to an impostor (no trust on first use).
        `io_thread=False`: no background thread; `recv` and `wait_connected` do the
        socket I/O, so replies only arrive while the caller is in them, and the client
        must be used from one thread. Saves two thread hand-overs per frame each way.
        """
        if on_reply is not None and not io_thread:
            raise ValueError("on_reply needs the I/O thread: replies arrive while the "
                             "caller does other things (drop io_thread=False)")
        self.endpoint = endpoint
        self._curve = curve_options(server_key, client_key)
        self.model = model
        self.max_in_flight = max_in_flight
        self.reply_timeout = reply_timeout
        self.counters = ClientCounters()
        self._on_reply = on_reply
        self._replies: queue.Queue[Reply] = queue.Queue(maxsize=max_queued_replies)
        self._context = context or zmq.Context.instance()
        # A random first seq (§4.3): a reply meant for an earlier connection of this
        # headset, should one ever arrive, then matches no frame in flight.
        self._seq = itertools.count(secrets.randbelow(2**31) + 1)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._pending: dict[int, float] = {}  # seq -> client time sent (direct mode)
        self._direct: tuple[zmq.Socket, zmq.Socket, zmq.Poller] | None = None
        if not io_thread:
            dealer, monitor = self._open_dealer()
            poller = zmq.Poller()
            poller.register(dealer, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            self._direct = (dealer, monitor, poller)
            return
        inbox = f"inproc://sightline-client-{next(_instance)}"
        self._outbox = self._context.socket(zmq.PUSH)  # used under self._lock
        self._outbox.setsockopt(zmq.LINGER, 0)
        self._outbox.bind(inbox)
        self._thread = threading.Thread(target=self._io_loop, args=(inbox,),
                                        name="sightline-client-io", daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait()

    # -- user side ----------------------------------------------------------------------
    def send(self, image: np.ndarray, *, encoding: str | None = None,
             capture_ts: float | None = None, pose: Sequence[float] | None = None,
             intrinsics: Sequence[float] | None = None, model: str | None = None,
             depth: np.ndarray | None = None, spatial: bool = False, planes: bool = False,
             annotate: bool = False) -> int | None:
        """Send a raw HxWx3 (BGR unless `encoding` says rgb8) or HxW gray frame.

        Returns the frame's sequence number, or None if it was not sent because the
        in-flight window is full. The arrays must not be modified until the reply arrives
        (they are sent without a copy).

        Spatial requests: `depth` (HxW uint16 millimetres or float32 metres, registered to
        the colour frame, any resolution of the same aspect) with `intrinsics` [fx, fy, cx,
        cy] of the colour camera and `pose` (camera-to-world 4x4, row-major); `spatial`
        asks for track ids and 3D anchors, `planes` for scene planes, `annotate` for the
        frame back as JPEG with the overlays drawn.
        """
        image = np.ascontiguousarray(image, dtype=np.uint8)
        channels = 1 if image.ndim == 2 else image.shape[2]
        encoding = encoding or ENCODING_FOR_CHANNELS.get(channels)
        if encoding is None:
            raise ValueError(f"cannot send a {image.shape} array: expected HxW or HxWx3 uint8")
        height, width = image.shape[:2]
        extra: dict[str, Any] = {}
        parts: list = [image]
        if depth is not None:
            depth = np.ascontiguousarray(depth)
            if depth.ndim != 2 or depth.dtype not in (np.uint16, np.float32):
                raise ValueError("depth must be HxW uint16 (mm) or float32 (m)")
            extra["depth"] = {"w": depth.shape[1], "h": depth.shape[0],
                              "enc": "u16mm" if depth.dtype == np.uint16 else "f32m"}
            parts.append(depth.astype(depth.dtype.newbyteorder("<"), copy=False))
        for flag, value in (("spatial", spatial), ("planes", planes), ("annotate", annotate)):
            if value:
                extra[flag] = True
        return self._send(parts, width, height, encoding, capture_ts, pose, intrinsics, model,
                          extra)

    def send_jpeg(self, jpeg: bytes, width: int, height: int, *, capture_ts: float | None = None,
                  pose: Sequence[float] | None = None,
                  intrinsics: Sequence[float] | None = None,
                  model: str | None = None) -> int | None:
        return self._send([jpeg], width, height, "jpeg", capture_ts, pose, intrinsics, model)

    def _send(self, payload: list, width, height, encoding, capture_ts, pose, intrinsics,
              model, extra: dict | None = None) -> int | None:
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                self.counters.not_sent += 1
                return None
            self._in_flight += 1
            seq = next(self._seq)
            header: dict[str, Any] = {"type": "frame", "seq": seq, "w": width, "h": height,
                                      "enc": encoding,
                                      "ts": time.time() if capture_ts is None else capture_ts}
            if model or self.model:
                header["model"] = model or self.model
            if pose is not None:
                header["pose"] = [float(v) for v in pose]
            if intrinsics is not None:
                header["intrinsics"] = [float(v) for v in intrinsics]
            header.update(extra or {})
            if self._direct is not None:
                self._send_direct(seq, [encode_request(header), *payload])
                return seq
            # seq travels beside the header so the I/O thread need not decode it again
            self._outbox.send_multipart([seq.to_bytes(8, "little"), encode_request(header),
                                         *payload], copy=False)
            return seq

    def _send_direct(self, seq: int, parts: list) -> None:
        sent_at = time.time()  # before: the daemon may read it before send returns
        try:
            self._direct[0].send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._in_flight -= 1  # under self._lock already
            self.counters.not_sent += 1
            self._deliver(Reply("not_sent", seq, {"reason": "no daemon connected"}))
            return
        self.counters.sent += 1
        self._pending[seq] = sent_at

    def recv(self, timeout: float | None = None) -> Reply | None:
        """The next reply (iterator mode), or None after `timeout` seconds."""
        if self._direct is not None:
            self._pump_until(lambda: not self._replies.empty(), timeout)
        try:
            return self._replies.get(timeout=None if self._direct else timeout)
        except queue.Empty:
            return None

    def _pump_until(self, done: Callable[[], bool], timeout: float | None) -> None:
        """Direct mode: read replies and connection events until `done()` or timeout."""
        dealer, monitor, poller = self._direct
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            wait = self.reply_timeout if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                return
            events = dict(poller.poll(max(1, int(min(wait, self.reply_timeout) * 1000))))
            if dealer in events:
                self._read_replies(dealer, self._pending)
            if monitor in events:
                self._track_connection(monitor)
            self._expire(self._pending)

    def replies(self, timeout: float | None = None) -> Iterator[Reply]:
        """Yield replies until none arrives for `timeout` seconds (forever if None)."""
        while True:
            reply = self.recv(timeout)
            if reply is None:
                return
            yield reply

    def __iter__(self) -> Iterator[Reply]:
        return self.replies()

    @property
    def connected(self) -> bool:
        """True while a daemon is connected (frames sent now can reach it)."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until a daemon is connected; frames sent before that are not sent."""
        if self._direct is not None:
            self._pump_until(self._connected.is_set, timeout)
        return self._connected.wait(0 if self._direct else timeout)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def close(self) -> None:
        self._stop.set()
        if self._direct is not None:
            dealer, monitor, _ = self._direct
            dealer.disable_monitor()
            monitor.close()
            dealer.close()
            return
        self._thread.join()
        with self._lock:
            self._outbox.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- I/O thread -----------------------------------------------------------------------
    def _io_loop(self, inbox_endpoint: str) -> None:
        inbox = self._context.socket(zmq.PULL)
        inbox.setsockopt(zmq.LINGER, 0)
        inbox.connect(inbox_endpoint)
        dealer, monitor = self._open_dealer()
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        pending: dict[int, float] = {}  # seq -> client time sent
        self._ready.set()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(50))
                if inbox in events:
                    self._forward_frames(inbox, dealer, pending)
                if dealer in events:
                    self._read_replies(dealer, pending)
                if monitor in events:
                    self._track_connection(monitor)
                self._expire(pending)
        finally:
            dealer.disable_monitor()
            monitor.close()
            inbox.close()
            dealer.close()

    def _open_dealer(self) -> tuple[zmq.Socket, zmq.Socket]:
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a daemon that is not there: the frame is stale by then anyway.
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        apply_curve(dealer, self._curve)
        monitor = dealer.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        dealer.connect(self.endpoint)
        return dealer, monitor

    def _track_connection(self, monitor: zmq.Socket) -> None:
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected.set()
            elif event == zmq.EVENT_DISCONNECTED:
                self._connected.clear()

    def _forward_frames(self, inbox: zmq.Socket, dealer: zmq.Socket,
                        pending: dict[int, float]) -> None:
        while True:
            try:
                parts = inbox.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            seq = int.from_bytes(parts[0].bytes, "little")
            try:
                dealer.send_multipart(parts[1:], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._release(1)
                self.counters.not_sent += 1
                self._deliver(Reply("not_sent", seq, {"reason": "no daemon connected"}))
                continue
            self.counters.sent += 1
            pending[seq] = time.time()

    def _read_replies(self, dealer: zmq.Socket, pending: dict[int, float]) -> None:
        while True:
            try:
                raw = dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = decode_reply(raw)
                kind = message["type"]
                seq = message.get("seq")
            except Exception as exc:
                log.warning("ignoring an undecodable reply: %s", exc)
                continue
            sent_at = pending.pop(seq, None)
            if sent_at is not None:
                self._release(1)
            if kind == "result":
                self.counters.results += 1
            elif kind == "error":
                self.counters.errors += 1
            elif kind == "dropped":
                self.counters.dropped += 1
            self._deliver(Reply(kind, seq, message, sent_at))

    def _expire(self, pending: dict[int, float]) -> None:
        if not pending:
            return
        horizon = time.time() - self.reply_timeout
        for seq in [s for s, sent in pending.items() if sent < horizon]:
            sent_at = pending.pop(seq)
            self._release(1)
            self.counters.lost += 1
            self._deliver(Reply("lost", seq, {"reason": "no reply in time"}, sent_at))

    def _release(self, count: int) -> None:
        with self._lock:
            self._in_flight -= count

    def _deliver(self, reply: Reply) -> None:
        if self._on_reply is not None:
            self._on_reply(reply)
            return
        try:
            self._replies.put_nowait(reply)
        except queue.Full:  # a reader that fell behind loses the oldest reply, not the newest
            with contextlib.suppress(queue.Empty):
                self._replies.get_nowait()
            self._replies.put_nowait(reply)


def curve_options(server_key: bytes | str | Path | None,
                  client_key: str | Path | None) -> tuple[bytes, Path] | None:
    """Validate the CURVE pair a client needs: both or neither."""
    if server_key is None and client_key is None:
        return None
    if server_key is None or client_key is None:
        raise ValueError("a CURVE daemon needs both server_key (its public key) and "
                         "client_key (this headset's .key_secret file)")
    if isinstance(server_key, Path) or (isinstance(server_key, str) and len(server_key) != 40):
        server_key = load_public_key(Path(server_key))
    elif isinstance(server_key, str):
        server_key = server_key.encode()
    return server_key, Path(client_key)


def apply_curve(socket: zmq.Socket, curve: tuple[bytes, Path] | None) -> None:
    if curve is not None:
        make_curve_client(socket, curve[0], curve[1])


def ping_round_trips(endpoint: str, count: int, timeout: float = 2.0,
                     server_key: bytes | str | Path | None = None,
                     client_key: str | Path | None = None,
                     ) -> tuple[dict[str, Any] | None, list[float]]:
    """The first pong (served models; None if the daemon did not answer), then the round
    trips in seconds of `count` more pings, one at a time on the same connection, so the
    connection and handshake are not in them. A ping that is not answered within `timeout`
    ends the run: the list is then shorter than `count`."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    apply_curve(socket, curve_options(server_key, client_key))
    seqs = itertools.count(secrets.randbelow(2**31) + 1)
    try:
        socket.connect(endpoint)
        first, trips = None, []
        for i in range(count + 1):
            seq = next(seqs)
            started = time.perf_counter()
            socket.send(encode_request({"type": "ping", "seq": seq}))
            while socket.poll(int(timeout * 1000)):
                reply = decode_reply(socket.recv())
                if reply.get("seq") == seq:
                    break
            else:
                return first, trips
            if i == 0:
                first = reply
            else:
                trips.append(time.perf_counter() - started)
        return first, trips
    finally:
        socket.close()


def query_info(endpoint: str, timeout: float = 2.0, context: zmq.Context | None = None,
               server_key: bytes | str | Path | None = None,
               client_key: str | Path | None = None) -> dict[str, Any] | None:
    """Ping a daemon; return its pong (served models) or None if it does not answer."""
    context = context or zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    apply_curve(socket, curve_options(server_key, client_key))
    try:
        socket.connect(endpoint)
        socket.send(encode_request({"type": "ping", "seq": 0}))
        if socket.poll(int(timeout * 1000)):
            return decode_reply(socket.recv())
        return None
    finally:
        socket.close()

"""The daemon's socket side: one ROUTER socket (tcp and ipc endpoints), many clients.

The I/O thread owns the ROUTER socket. It validates headers, answers bad input at once
with an error reply, and hands good frames to the model's pipeline, where the newest
frame per client wins. Pipelines send replies back through an inproc PULL socket that
this thread forwards, so no other thread touches the ROUTER socket. A reply goes to the
connection that sent its frame, never to a connection that replaced it (§7.4).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from runtime.config import ServeConfig
from runtime.curve_keys import DAEMON_KEY_NAME, HEADSETS_DIR, make_curve_server
from runtime.daemon.admission import ConnectionMonitor, HandshakeAdmission, RateLimiter
from runtime.daemon.identity import Headset, Identities
from runtime.daemon.latest import DropCounts
from runtime.daemon.pipeline import FrameJob, ModelPipeline, prepares_ahead
from runtime.daemon.security import HeadsetAuthenticator
from runtime.daemon.service import Watchdog
from runtime.engines import EngineBuilder
from runtime.errors import ConfigError, ProtocolError
from runtime.fusion.open import open_serving_engine
from runtime.models.bundle import Bundle
from runtime.protocol import (
    MAX_HEADER_BYTES,
    ErrorCode,
    FrameHeader,
    encode_dropped,
    encode_error,
    encode_pong,
    parse_header,
    peek_seq,
)

log = logging.getLogger(__name__)
_instance = itertools.count()
POLL_MS = 100
# Error replies that are the client's fault; bad_requests_per_s counts these only.
CLIENT_FAULTS = frozenset({ErrorCode.MALFORMED, ErrorCode.UNSUPPORTED_VERSION,
                           ErrorCode.BAD_HEADER, ErrorCode.FRAME_TOO_LARGE,
                           ErrorCode.UNKNOWN_MODEL})


def _user_id(frame: zmq.Frame) -> str | None:
    """The CURVE public key (Z85) ZAP accepted for this message's connection, if any."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:  # no such property: the message did not come through a handshake
        return None


__all__ = ["RateLimiter", "Server", "ServerCounters"]


def _pipeline_options(settings, engine, models: int) -> dict:
    """Batching, prepare-ahead and inline inference for one model, "auto" resolved for its
    engine: inline only for a daemon serving one model on a CPU-bound engine."""
    on_gpu = prepares_ahead(engine)
    max_batch = settings.max_batch if settings.max_batch != "auto" else (4 if on_gpu else 1)
    prepare = {"auto": None, "on": True, "off": False}[settings.prepare_ahead]
    # auto: decided after warm-up (None), and only where one CPU-bound model is served
    inline = {"auto": None if models == 1 and not on_gpu and prepare is not True else False,
              "on": True, "off": False}[settings.inline_inference]
    return {"max_batch": max_batch, "batch_wait_s": settings.batch_wait_ms / 1000.0,
            "prepare_ahead": prepare, "inline": inline}


@dataclass
class ServerCounters:
    frames: int = 0
    superseded: int = 0
    errors: Counter = field(default_factory=Counter)


class Server:
    def __init__(self, config: ServeConfig, bundles: list[Bundle],
                 context: zmq.Context | None = None,
                 engine_builder: EngineBuilder | None = None,
                 cascade_bundles: dict[str, Bundle] | None = None) -> None:
        """`engine_builder`: how to build a missing TensorRT engine (None: never build);
        `cascade_bundles`: each [[cascades]] `run` reference, resolved to its bundle."""
        if not bundles:
            raise ValueError("a server needs at least one bundle")
        self.config = config
        self.engine_builder = engine_builder
        self.counters = ServerCounters()
        self._context = context or zmq.Context.instance()
        self._reply_endpoint = f"inproc://sightline-replies-{next(_instance)}"
        settings = config.server
        self._deadline_s = settings.deadline_ms / 1000.0
        self._pipelines: dict[str, ModelPipeline] = {}
        self._drops = DropCounts()  # one dropped count per headset, over every model
        # Since when a message may have waited unread in the socket (an inline inference, or
        # a read batch that stopped before the socket was empty); None: the I/O thread has
        # been polling since the socket was last found empty. See _read_requests.
        self._unseen_since: float | None = None
        for bundle in bundles:
            if bundle.name in self._pipelines:
                raise ConfigError(f"two models are named {bundle.name!r}; a daemon serves each "
                                  "name once (re-import one with another --name)")
            engine = open_serving_engine(bundle, config.engine, engine_builder)
            self._pipelines[bundle.name] = ModelPipeline(
                bundle, engine, self._context, self._reply_endpoint, self._deadline_s,
                drops=self._drops, **_pipeline_options(settings, engine, len(bundles)))
        from runtime.daemon.cascade import attach_cascades

        self._cascade_engines = attach_cascades(
            config.cascades, self._pipelines, cascade_bundles or {},
            lambda bundle: open_serving_engine(bundle, config.engine, engine_builder))
        self._inline: list[ModelPipeline] = []  # known once the pipelines have started
        self.default_model = bundles[0].name
        # Under CURVE a headset is its enrolled key; in plain mode, its connection.
        self.identities = Identities(by_key=config.security.mode == "curve",
                                     max_clients=settings.max_clients,
                                     max_fps=settings.max_fps_per_client,
                                     bad_per_s=settings.bad_requests_per_s,
                                     bad_burst=settings.bad_request_burst)
        self.admission: HandshakeAdmission | None = None
        self.monitor: ConnectionMonitor | None = None
        self._authenticator: HeadsetAuthenticator | None = None
        self._router: zmq.Socket | None = None
        self._replies: zmq.Socket | None = None
        self.endpoints: list[str] = []

    @property
    def pipelines(self) -> dict[str, ModelPipeline]:
        return self._pipelines

    def bind(self) -> list[str]:
        """Bind all endpoints and start the pipelines; returns the endpoints as bound."""
        settings = self.config.server
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, settings.max_frame_bytes + MAX_HEADER_BYTES)
        # A few frames per client may queue before the I/O thread reads them; the newest-wins
        # slots then bound memory regardless of client send rate.
        router.setsockopt(zmq.RCVHWM, 8)
        router.setsockopt(zmq.SNDHWM, settings.reply_hwm)
        self._secure(router)
        self.monitor = ConnectionMonitor(router, self.admission)
        self._replies = self._context.socket(zmq.PULL)
        self._replies.setsockopt(zmq.LINGER, 0)
        self._replies.bind(self._reply_endpoint)
        try:
            for endpoint in settings.endpoints:
                router.bind(endpoint)
                self.endpoints.append(router.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError as exc:
            self.monitor.close()
            router.close()
            self._replies.close()
            if self._authenticator is not None:
                self._authenticator.stop()
            raise OSError(f"cannot bind {endpoint}: {exc}") from exc
        self._router = router
        for pipeline in self._pipelines.values():
            pipeline.start()
        self._inline = [p for p in self._pipelines.values() if p.inline]
        return self.endpoints

    def _secure(self, router: zmq.Socket) -> None:
        security = self.config.security
        if security.mode == "plain":
            log.warning("PLAIN MODE: the headset link is neither encrypted nor authenticated; "
                        "any process that reaches %s can stream frames. Development only.",
                        ", ".join(self.config.server.endpoints))
            return
        inproc = [e for e in self.config.server.endpoints if e.startswith("inproc://")]
        if inproc:
            router.close()
            raise ConfigError(f"{inproc[0]}: inproc endpoints have no CURVE handshake, so they "
                              'exist in plain mode only (security.mode = "plain")')
        keys = security.resolved_keys_dir()
        secret = keys / f"{DAEMON_KEY_NAME}.key_secret"
        if not secret.is_file():
            router.close()
            raise ConfigError(
                f"no daemon key at {secret}: create one with `sightline keys daemon` (and "
                "enrol headsets with `sightline keys headset NAME`), or set security.mode = "
                '"plain" / pass --plain for development')
        make_curve_server(router, secret)
        router.setsockopt(zmq.HANDSHAKE_IVL, int(security.handshake_timeout_s * 1000))
        self.admission = HandshakeAdmission(
            per_key_rate=security.handshakes_per_s_per_key,
            per_address_rate=security.handshakes_per_s_per_address,
            burst=security.handshake_burst,
            max_per_address=security.max_connections_per_address)
        self._authenticator = HeadsetAuthenticator(self._context, keys / HEADSETS_DIR,
                                                   self.admission)
        self._authenticator.start()

    @property
    def client_count(self) -> int:
        return self.identities.active  # read by the control thread; an int is atomic

    def healthy(self) -> bool:
        return all(p.healthy() for p in self._pipelines.values())

    def serve(self, stop: threading.Event, watchdog: Watchdog | None = None,
              before_close: Callable[[], None] | None = None) -> None:
        """Run the I/O loop until `stop` is set, then shut everything down cleanly.

        With a systemd watchdog, it is pinged from this loop only while every pipeline
        thread is alive and turning, so a hung daemon gets restarted. `before_close` runs
        after the loop and before the pipelines stop: what watches the pipelines (the OTA
        probation) must be gone before they go quiet.
        """
        if self._router is None:
            self.bind()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        poller.register(self.monitor.socket, zmq.POLLIN)
        next_sweep = time.monotonic() + 1.0
        try:
            while not stop.is_set():
                # Never block while a message may wait unseen: its `received` would then
                # take in the time this poll blocked for.
                waiting = self._unseen_since is not None or any(p.waiting() for p in self._inline)
                events = dict(poller.poll(0 if waiting else POLL_MS))
                if self._replies in events:
                    self._forward_replies()
                if self._router in events:
                    self._read_requests()
                else:
                    self._unseen_since = None  # the socket had nothing: nothing waited
                for pipeline in self._inline:  # after reading: the newest frames win
                    started = time.time()
                    if pipeline.run_inline(self._reply_to_route) and self._unseen_since is None:
                        self._unseen_since = started
                if self.monitor.socket in events:
                    self.monitor.handle()
                if time.monotonic() >= next_sweep:
                    self._forget_idle_clients()
                    # revocations apply without a restart
                    if self._authenticator is not None and self._authenticator.refresh():
                        self._forget(self.identities.revoked(
                            set(self._authenticator.names.values())))
                    next_sweep = time.monotonic() + 1.0
                if watchdog is not None and self.healthy():
                    watchdog.ping_if_due()
        finally:
            try:
                if before_close is not None:
                    before_close()
            finally:
                self.close()

    def close(self) -> None:
        for pipeline in self._pipelines.values():
            pipeline.stop()
        for engine in self._cascade_engines:  # after the pipelines: none is inferring now
            engine.close()
        self._cascade_engines = []
        if self.monitor is not None and self._router is not None:
            self._router.disable_monitor()
            self.monitor.close()
        for socket in (self._router, self._replies):
            if socket is not None:
                socket.close()
        self._router = self._replies = None
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    # -- I/O thread internals -------------------------------------------------------
    def _forward_replies(self) -> None:
        for _ in range(256):  # bounded batch, so requests are never starved
            try:
                key, reply = self._replies.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._reply_to_route(key, reply)

    def _reply_to_route(self, route: bytes, reply: bytes) -> None:
        """A pipeline's reply, to the connection that sent the frame (a replaced one
        included: it never reaches the successor, whose seqs may collide)."""
        if self.identities.by_key and not self.identities.delivers(route):
            return  # revoked or idle since: nobody to answer
        self._router.send_multipart([route, reply])

    def _read_requests(self) -> None:
        """Read and answer what waits in the socket. `received` is when the message was
        read, or, where it may have waited unread (behind an inline inference or a full
        read batch), the moment it may have started waiting: queue time in the socket is
        the daemon's, never network (docs/protocol.md §8)."""
        unseen_since, batch_started = self._unseen_since, time.time()
        for _ in range(256):
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._unseen_since = None  # found empty: nothing waits unseen now
                return
            received = time.time() if unseen_since is None else unseen_since
            client = parts[0].bytes
            try:
                self._handle(parts[0], client, parts[1:], received)
            except ProtocolError as exc:
                self.counters.errors[exc.code] += 1
                if exc.code in CLIENT_FAULTS:  # a failing headset loses its turn
                    self.identities.note_failure(client, self._enrolled_name(parts[0]))
                seq = peek_seq(parts[1].buffer) if len(parts) > 1 else None
                self._send(client, encode_error(seq, exc.code, exc.message))
        if self._unseen_since is None:  # stopped short: what is left waited from now on
            self._unseen_since = batch_started

    def _handle(self, identity: zmq.Frame, client: bytes, parts: list[zmq.Frame],
                received: float) -> None:
        if not parts:
            raise ProtocolError(ErrorCode.MALFORMED, "message has no header part")
        enrolled = None
        if self._authenticator is not None:
            enrolled = self._authenticator.names.get(_user_id(identity))
            if enrolled is None:
                raise ProtocolError(ErrorCode.NOT_ENROLLED,
                                    "this headset's key is no longer enrolled (revoked)")
        self.identities.check_route(client)
        header = parse_header(parts[0].buffer)
        if not isinstance(header, FrameHeader):  # a ping holds no client slot
            self._send(client, encode_pong(header.seq, self._model_info()))
            return
        expected = 3 if header.depth is not None else 2
        if len(parts) != expected:
            raise ProtocolError(ErrorCode.MALFORMED,
                                f"a frame message has {expected} parts (header, pixels"
                                f"{', depth' if expected == 3 else ''}), got {len(parts)}")
        self._check_limits(header, parts[1])
        if header.depth is not None:
            self._check_limits(header, parts[2])
        name = header.model or self.default_model
        pipeline = self._pipelines.get(name)
        if pipeline is None:
            raise ProtocolError(ErrorCode.UNKNOWN_MODEL,
                                f"model {name!r} is not served here; serving: "
                                f"{', '.join(self._pipelines)}")
        # A slot is taken only by a frame that passed every check above: a connection that
        # sends a bare header (or garbage) cannot hold one and lock real headsets out.
        headset, replaced = self.identities.admit(client, enrolled)
        if replaced is not None:  # newest wins; the old connection is told why
            self._send(replaced, encode_error(None, ErrorCode.REPLACED,
                                              "a newer connection with this headset's key "
                                              f"({headset.name}) took over; close this one"))
        if headset.failures.empty():
            headset.rate_limited += 1
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"over {self.config.server.bad_requests_per_s:g} bad requests/s;"
                                " frames ignored until fewer fail")
        if not headset.limiter.allow():
            headset.rate_limited += 1
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"over {self.config.server.max_fps_per_client:g} frames/s; "
                                "frame ignored")
        headset.frames += 1
        self.counters.frames += 1
        job = FrameJob(header, parts[1].buffer, received, keepalive=parts[1:],
                       depth=parts[2].buffer if header.depth is not None else None,
                       route=client)
        superseded = pipeline.submit(headset.key, job)
        if superseded is not None:  # told on the connection that sent it (§7.4)
            self.counters.superseded += 1
            self._send(superseded.route, encode_dropped(superseded.header.seq, "superseded",
                                                        self.dropped(headset)))

    def _enrolled_name(self, identity: zmq.Frame) -> str | None:
        if self._authenticator is None:
            return None
        return self._authenticator.names.get(_user_id(identity))

    def _check_limits(self, header: FrameHeader, payload: zmq.Frame) -> None:
        settings = self.config.server
        if header.width > settings.max_width or header.height > settings.max_height:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                                f"frame {header.width}x{header.height} exceeds the daemon's limit "
                                f"of {settings.max_width}x{settings.max_height}")
        if len(payload) > settings.max_frame_bytes:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                                f"payload of {len(payload)} bytes exceeds the daemon's limit of "
                                f"{settings.max_frame_bytes}")

    def _send(self, client: bytes, reply: bytes) -> None:
        # ROUTER drops (never blocks) when a client's queue is full or it is gone.
        self._router.send_multipart([client, reply])

    def _forget_idle_clients(self) -> None:
        self._forget(self.identities.idle(self.config.server.client_timeout_s))

    def _forget(self, headsets: list[Headset]) -> None:
        for headset in headsets:
            for pipeline in self._pipelines.values():
                pipeline.forget(headset.key)  # its newest-frame slot, tracker and plane cache
            if self.identities.find(headset.key) is None:  # forgotten, not only idle
                self._drops.forget(headset.key)

    def dropped(self, headset: Headset) -> int:
        """Frames of this headset dropped (superseded or expired), over every model: the
        one count its `dropped` and `result` replies carry (§6.2)."""
        return self._drops.get(headset.key)

    def _model_info(self) -> list[dict]:
        return [
            {"name": name, "version": p.bundle.version, "task": p.bundle.manifest.task,
             "precision": p.bundle.manifest.precision,
             "provider": p.engine.provider, "labels": list(p.bundle.manifest.labels),
             "default": name == self.default_model}
            for name, p in self._pipelines.items()
        ]

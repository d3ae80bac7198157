"""One model's frame pipeline: newest frames in, replies out, the engine never waiting.

Who runs what, per model (threads are named after the model):
- infer: takes the newest waiting frame of each client (up to `max_batch` of them, run as
  one engine call where the model has a batch dimension), decodes the outputs and hands
  the encoded reply to the socket-owning I/O thread over an inproc PUSH socket (ZeroMQ
  sockets are not thread-safe: each thread owns its own). Inline (one model on a CPU
  engine that infers in under INLINE_MAX_S), the I/O thread does this itself and replies
  directly: see run_inline. Every reply goes to the connection that sent the frame.
- prepare (only with `prepare_ahead`): decodes and preprocesses the next frames while the
  engine runs. That pays off where inference leaves the CPU free (a GPU); on a CPU-bound
  engine it only adds a thread hand-over, so by default the infer thread prepares itself.
- spatial: tracking, anchors, planes and annotation for frames that ask for them, so a
  plane recompute (15-20 ms) never delays the model's next inference.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import zmq

from runtime.daemon.health import STALL_S, PipelineState
from runtime.daemon.inference import (
    FrameJob,
    LoadedModel,
    Prepared,
    annotate,
    batch_capacity,
    batches,
    infer,
    prepare,
)
from runtime.daemon.latest import DropCounts, LatestSlots
from runtime.engines import Engine
from runtime.errors import ProtocolError, SightlineError
from runtime.models.bundle import Bundle
from runtime.protocol import ErrorCode, encode_dropped, encode_error, encode_result
from runtime.results import TaskResult

__all__ = ["FrameJob", "LoadedModel", "ModelPipeline", "PipelineCounters"]

log = logging.getLogger(__name__)
POLL_S = 0.1
# Inline inference only for a model quicker than this: a ping (or another headset's frame)
# that arrives during an inline inference waits, unread, until it ends (docs/protocol.md
# §4.5: pings are answered at once).
INLINE_MAX_S = 0.001
Send = Callable[[bytes, bytes], None]  # (connection routing id or slot key, encoded reply)


def _to(client: bytes, job: FrameJob) -> bytes:
    """Where a frame's replies go: the connection that sent it, never a successor."""
    return job.route if job.route is not None else client


class PipelineCounters:
    """Frame outcomes, bumped by the pipeline threads (hence the lock), read by reporting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results = self.expired = self.errors = 0

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


def prepares_ahead(engine: Engine) -> bool:
    """Whether preparing the next frame during inference helps: when the engine runs on a
    GPU, yes; when it runs on the CPU cores the preparing would run on, no."""
    return "CPU" not in engine.provider.upper()


class ModelPipeline:
    def __init__(self, bundle: Bundle, engine: Engine, context: zmq.Context, reply_endpoint: str,
                 deadline_s: float, *, max_batch: int = 1, batch_wait_s: float = 0.0,
                 prepare_ahead: bool | None = None, inline: bool | None = False,
                 drops: DropCounts | None = None) -> None:
        """`inline`: no infer thread, the owner of the socket calls run_inline(); None or
        True: inline only if the warmed-up model infers in under INLINE_MAX_S (a message
        that arrives during an inline inference waits in the socket, unseen, until it ends:
        pings must not wait behind a model). `drops`: the daemon's dropped counts, shared
        by all its models (one count per headset)."""
        capacity = batch_capacity(engine)
        self.max_batch = max(1, min(max_batch, capacity or max_batch))
        self._batch_wait_s = batch_wait_s
        self._prepare_ahead = prepares_ahead(engine) if prepare_ahead is None else prepare_ahead
        self.inline = inline
        self._buffers = 2 * self.max_batch
        self._model = LoadedModel.of(bundle, engine, buffers=self._buffers)
        self._retired: list[LoadedModel] = []  # swapped out; closed once no frame uses them
        self._swap_lock = threading.Lock()
        self.counters = PipelineCounters()
        self._context = context
        self._reply_endpoint = reply_endpoint
        self._deadline_s = deadline_s
        drops = drops if drops is not None else DropCounts()
        self._slots: LatestSlots[FrameJob] = LatestSlots(drops)
        # Frames whose 2D result is done and that wait for the spatial thread (newest wins).
        self._spatial_slots: LatestSlots[tuple[Prepared, TaskResult]] = LatestSlots(drops)
        self.metrics = None  # runtime.daemon.metrics.Metrics when the daemon exports metrics
        self.cascade = None  # runtime.daemon.cascade.Cascade when [[cascades]] names this model
        self._metrics_lock = threading.Lock()  # the infer and spatial threads both observe
        self._spatial = None  # SpatialStage, made at start-up
        self._spatial_lock = threading.Lock()
        # Capacity 1 hand-over: at most one batch prepared ahead of the one in the engine.
        self._ready: queue.Queue[list[Prepared]] = queue.Queue(maxsize=1)
        self._free = threading.Semaphore(1)
        self._stop = threading.Event()
        # Each loop stamps its beat every turn (at least every POLL_S); see healthy().
        self._beats = {"infer": time.monotonic(), "spatial": time.monotonic()}
        self._threads: list[threading.Thread] = []  # made by start(), once inline is known

    def _make_threads(self) -> None:
        loops: dict[str, Callable[[], None]] = {"spatial": self._spatial_loop}
        if not self.inline:
            loops["infer"] = self._infer_loop
            if self._prepare_ahead:
                loops["prepare"] = self._prepare_loop
        self._beats = {role: time.monotonic() for role in (*loops, "infer")}
        name = self._model.bundle.name
        self._threads = [threading.Thread(target=loop, name=f"sightline-{role}-{name}")
                         for role, loop in loops.items()]

    @property
    def bundle(self) -> Bundle:
        return self._model.bundle

    @property
    def engine(self) -> Engine:
        return self._model.engine

    def swap(self, bundle: Bundle, engine: Engine) -> None:
        """Serve `bundle` with `engine` (opened and warmed up by the caller) from the next
        frame on. Frames already prepared finish on the old model, which is closed after
        them; no frame fails or waits because of the swap."""
        if bundle.name != self._model.bundle.name:
            raise SightlineError(f"cannot swap {bundle.name} into the {self.bundle.name} pipeline")
        new = LoadedModel.of(bundle, engine, buffers=self._buffers)
        with self._swap_lock:
            old, self._model = self._model, new  # one reference store: atomic for readers
            self._retired.append(old)

    def _close_retired(self, current: LoadedModel | None) -> None:
        """Close swapped-out models once a frame of `current` shows none is still in use
        (frames are prepared and inferred in order); None closes them all (shutdown)."""
        if not self._retired:  # every frame passes here: no lock unless a swap happened
            return
        with self._swap_lock:
            if not self._retired or (current is not None and current is not self._model):
                return
            retired, self._retired = self._retired, []
        for model in retired:
            model.engine.close()

    # -- called from the I/O thread ---------------------------------------------------
    def submit(self, client: bytes, job: FrameJob) -> FrameJob | None:
        """Queue a frame; returns the client's older waiting frame it superseded, if any."""
        return self._slots.put(client, job)

    def dropped(self, client: bytes) -> int:
        return self._slots.dropped(client)

    def waiting(self) -> int:
        return self._slots.waiting()

    def forget(self, client: bytes) -> None:
        self._slots.forget(client)
        self._spatial_slots.forget(client)
        if self.cascade is not None:
            self.cascade.forget(client)  # racy with the infer thread only for a gone client
        if self._spatial is not None:
            self._spatial.forget(client)  # racy with the spatial thread only for a gone client

    def state(self, stall_s: float = STALL_S) -> PipelineState:
        """Serving, stalled or stopped. An idle pipeline (no clients) is serving: every
        loop (inline: the I/O thread's) beats at least every POLL_S while it waits for
        frames, so only a stuck engine call or a dead thread goes stale. Once stop() is
        asked for, the answer is STOPPED whatever the threads do: shutting down says
        nothing about the model."""
        if self._stop.is_set():
            return PipelineState.STOPPED
        now = time.monotonic()
        if (all(t.is_alive() for t in self._threads)
                and now - min(self._beats.values()) < stall_s):
            return PipelineState.SERVING
        return PipelineState.STALLED

    def healthy(self, stall_s: float = STALL_S) -> bool:
        """Both threads alive and turning (a stuck engine call shows as a stale beat)."""
        return self.state(stall_s) is PipelineState.SERVING

    def start(self, warm_up_size: tuple[int, int] | None = (640, 480)) -> None:
        """Start the threads, after one inference on a blank frame of `warm_up_size`.

        ONNX Runtime's first runs allocate and tune (hundreds of ms here); a headset's first
        frames should not pay for that.
        """
        # Open3D takes about a second to import: pay it at start-up, not on the first frame
        # that asks for planes (that model would stall for the second).
        self._spatial_stage()
        if warm_up_size is not None:
            seconds = self._model.warm_up(warm_up_size, batch=self.max_batch)
            if self.inline is not False and seconds >= INLINE_MAX_S:
                if self.inline:  # asked for ("on"): say why it is not honoured
                    log.warning("model %s infers in %.1f ms: run on its own thread, not inline "
                                "(pings and other headsets would wait behind it)",
                                self._model.bundle.name, seconds * 1000)
                self.inline = False
            elif self.inline is None:
                self.inline = seconds < min(INLINE_MAX_S, self._deadline_s / 2)
        self.inline = bool(self.inline)
        self._make_threads()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        if not self._threads:  # never started
            self._model.engine.close()
            return
        self._slots.wake()
        self._spatial_slots.wake()
        for thread in self._threads:
            thread.join()
        self._close_retired(None)
        self._model.engine.close()

    # -- inline mode: the I/O thread runs the model ------------------------------------
    def run_inline(self, send: Send) -> bool:
        """Infer the frames waiting now, replying with `send`; False when none waited.

        For a daemon serving one model on a CPU-bound engine, the socket-owning thread
        running the model itself saves two thread hand-overs per frame (~0.25 ms here);
        frames that arrive meanwhile queue in the socket and the newest still wins."""
        self._beats["infer"] = time.monotonic()
        if not self._slots.waiting():
            return False
        for group in batches(self._prepare_batch(send, wait_s=0.0)):
            self._infer_group(group, send)
            self._close_retired(group[0].model)
        return True

    # -- pipeline threads ---------------------------------------------------------------
    def _reply_sender(self) -> tuple[Send, Callable[[], None]]:
        socket = self._context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self._reply_endpoint)
        return (lambda client, reply: socket.send_multipart([client, reply])), socket.close

    def _prepare_loop(self) -> None:
        send, close = self._reply_sender()
        try:
            while not self._stop.is_set():
                self._beats["prepare"] = time.monotonic()
                if not self._free.acquire(timeout=POLL_S):
                    continue
                prepared = self._prepare_batch(send)
                if not prepared:
                    self._free.release()
                    continue
                self._ready.put(prepared)
        finally:
            close()

    def _prepare_batch(self, send: Send, wait_s: float = POLL_S) -> list[Prepared]:
        """The newest frame of up to `max_batch` clients, decoded and preprocessed."""
        taken = self._slots.take(wait_s)
        if taken is None:
            return []
        jobs = [taken]
        if self.max_batch > 1:
            if self._batch_wait_s > 0 and not self._slots.waiting():
                time.sleep(self._batch_wait_s)  # only when asked to: it delays this frame
            jobs += self._slots.take_more(self.max_batch - 1)
        taken_at = time.time()
        model = self._model
        prepared = []
        for client, job in jobs:
            if self._expired(client, job, send):
                continue
            try:
                prepared.append(prepare(model, client, job, taken_at))
            except ProtocolError as exc:
                self.counters.add("errors")
                send(_to(client, job), encode_error(job.header.seq, exc.code, exc.message))
            except Exception as exc:  # a bug must cost one frame, never the model's thread
                log.exception("preprocessing failed on a frame for %s", model.bundle.name)
                self.counters.add("errors")
                send(_to(client, job), encode_error(job.header.seq, ErrorCode.INTERNAL,
                                                    f"preprocessing failed: {exc}"))
        return prepared

    def _expired(self, client: bytes, job: FrameJob, send: Send) -> bool:
        if time.time() - job.received <= self._deadline_s:
            return False
        self.counters.add("expired")
        total = self._slots.count_drop(client)
        send(_to(client, job), encode_dropped(job.header.seq, "expired", total))
        return True

    def _next_batch(self, send: Send) -> list[Prepared]:
        if not self._prepare_ahead:
            return self._prepare_batch(send)
        try:
            items = self._ready.get(timeout=POLL_S)
        except queue.Empty:
            return []
        self._free.release()  # the next batch may be prepared while this one is inferred
        # Checked again here: a prepared frame waits out the previous inference.
        return [item for item in items if not self._expired(item.client, item.job, send)]

    def _infer_loop(self) -> None:
        send, close = self._reply_sender()
        try:
            while not self._stop.is_set():
                self._beats["infer"] = time.monotonic()
                for group in batches(self._next_batch(send)):
                    self._infer_group(group, send)
                    self._close_retired(group[0].model)
        finally:
            close()

    def _infer_group(self, group: list[Prepared], send: Send) -> None:
        manifest = group[0].model.bundle.manifest
        try:
            # CASCADE HOOK: the cascade runs `infer` itself (or skips it: ROI tracking).
            results = infer(group) if self.cascade is None else self.cascade.infer(group, infer)
        except Exception as exc:  # the engine failed: every frame of the call gets told
            log.error("model %s failed on %d frame(s): %s", manifest.name, len(group), exc)
            for item in group:
                self.counters.add("errors")
                send(_to(item.client, item.job),
                     encode_error(item.job.header.seq, ErrorCode.INTERNAL, str(exc)))
            return
        for item, result in zip(group, results, strict=True):
            if isinstance(result, Exception):
                log.error("model %s: output decoding failed on a frame: %s", manifest.name,
                          result)
                self.counters.add("errors")
                send(_to(item.client, item.job),
                     encode_error(item.job.header.seq, ErrorCode.INTERNAL,
                                  f"output decoding failed: {result}"))
            elif item.job.header.wants_spatial or item.job.header.annotate:
                superseded = self._spatial_slots.put(item.client, (item, result))
                if superseded is not None:  # the spatial thread is behind: newest wins
                    old = superseded[0]
                    send(_to(old.client, old.job),  # counted by put(): one count per headset
                         encode_dropped(old.job.header.seq, "superseded",
                                        self._slots.dropped(old.client)))
            else:
                send(_to(item.client, item.job), self._reply(item, result, {}))

    def _reply(self, item: Prepared, result: TaskResult, extra: dict) -> bytes:
        manifest = item.model.bundle.manifest
        self.counters.add("results")
        reply = encode_result(item.job.header, manifest.name, manifest.version, result,
                              item.stamps, self._slots.dropped(item.client), extra)
        if self.metrics is not None:  # ~1 us; stamps now include "sent"
            with self._metrics_lock:
                self.metrics.observe_frame(manifest.name, item.stamps)
        return reply

    def _spatial_loop(self) -> None:
        send, close = self._reply_sender()
        try:
            while not self._stop.is_set():
                self._beats["spatial"] = time.monotonic()
                taken = self._spatial_slots.take(POLL_S)
                if taken is None:
                    continue
                client, (item, result) = taken
                try:
                    reply = self._reply(item, result, self._spatial_extra(item, result))
                except Exception as exc:  # a bug must cost one frame, never the thread
                    log.exception("spatial processing failed on a frame")
                    self.counters.add("errors")
                    reply = encode_error(item.job.header.seq, ErrorCode.INTERNAL,
                                         f"spatial processing failed: {exc}")
                send(_to(client, item.job), reply)
        finally:
            close()

    def _spatial_extra(self, item: Prepared, result: TaskResult) -> dict:
        header = item.job.header
        extra = {}
        if header.wants_spatial:
            extra = self._spatial_stage().process(item.client, header, result, item.depth)
            item.stamps["spatial"] = time.time()
        if header.annotate:
            extra["annotated_jpeg"] = annotate(item.image, header, result, extra)
            item.stamps["annotated"] = time.time()
        return extra

    def _spatial_stage(self):
        with self._spatial_lock:  # the start-up preload thread and the spatial thread
            if self._spatial is None:
                from runtime.daemon.spatial_stage import SpatialStage

                self._spatial = SpatialStage()
            return self._spatial

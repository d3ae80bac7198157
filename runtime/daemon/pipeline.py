"""One model's frame pipeline: decode+preprocess overlaps inference.

Two named threads per model. The prepare thread takes the newest waiting frame, decodes
and preprocesses it while the previous frame is in the engine; the infer thread runs the
engine, decodes outputs and hands the encoded reply to the socket-owning I/O thread over
an inproc PUSH socket (ZeroMQ sockets are not thread-safe: each thread owns its own).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import zmq

from runtime.daemon.decode import decode_depth, decode_pixels
from runtime.daemon.health import STALL_S, PipelineState
from runtime.daemon.latest import LatestSlots
from runtime.engines import Engine
from runtime.errors import ProtocolError, SightlineError
from runtime.models.bundle import Bundle
from runtime.models.preprocess import FrameTransform, Preprocessor
from runtime.protocol import ErrorCode, FrameHeader, encode_dropped, encode_error, encode_result
from runtime.tasks import make_decoder

log = logging.getLogger(__name__)
POLL_S = 0.1


@dataclass(slots=True)
class FrameJob:
    header: FrameHeader
    payload: memoryview | bytes
    received: float  # server wall clock, seconds
    keepalive: object = None  # the zmq.Frames backing the buffers, kept alive until done
    depth: memoryview | bytes | None = None


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """Everything per-model that a frame needs, swapped as one reference (hot swap)."""

    bundle: Bundle
    engine: Engine
    preprocess: Preprocessor
    decode_outputs: object
    input_name: str

    @classmethod
    def of(cls, bundle: Bundle, engine: Engine) -> LoadedModel:
        manifest = bundle.manifest
        return cls(bundle, engine, Preprocessor(manifest.input, manifest.preprocess),
                   make_decoder(manifest), manifest.input.name)

    def warm_up(self, size: tuple[int, int] = (640, 480), runs: int = 2) -> None:
        width, height = size
        tensor, _ = self.preprocess(np.zeros((height, width, 3), np.uint8), "bgr")
        for _ in range(runs):
            self.engine.infer({self.input_name: tensor})


@dataclass(slots=True)
class _Prepared:
    model: LoadedModel  # the model this frame was prepared for; it is inferred with it too
    client: bytes
    job: FrameJob
    tensor: np.ndarray
    transform: FrameTransform
    stamps: dict[str, float]
    image: np.ndarray  # decoded frame, for the annotated reply
    depth: np.ndarray | None


class PipelineCounters:
    """Frame outcomes, bumped by both pipeline threads (hence the lock), read by reporting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results = self.expired = self.errors = 0

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


class ModelPipeline:
    def __init__(self, bundle: Bundle, engine: Engine, context: zmq.Context, reply_endpoint: str,
                 deadline_s: float) -> None:
        self._model = LoadedModel.of(bundle, engine)
        self._retired: list[LoadedModel] = []  # swapped out; closed once no frame uses them
        self._swap_lock = threading.Lock()
        self.counters = PipelineCounters()
        self._context = context
        self._reply_endpoint = reply_endpoint
        self._deadline_s = deadline_s
        self._slots: LatestSlots[FrameJob] = LatestSlots()
        self.metrics = None  # runtime.daemon.metrics.Metrics when the daemon exports metrics
        self._spatial = None  # SpatialStage, made at start-up
        self._spatial_lock = threading.Lock()
        # Capacity 1 hand-over: at most one frame prepared ahead of the one in the engine.
        self._ready: queue.Queue[_Prepared] = queue.Queue(maxsize=1)
        self._free = threading.Semaphore(1)
        self._stop = threading.Event()
        # Each loop stamps its beat every turn (at least every POLL_S); see healthy().
        self._beats = {"prepare": time.monotonic(), "infer": time.monotonic()}
        name = bundle.name
        self._threads = [
            threading.Thread(target=self._prepare_loop, name=f"sightline-prepare-{name}"),
            threading.Thread(target=self._infer_loop, name=f"sightline-infer-{name}"),
        ]

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
        new = LoadedModel.of(bundle, engine)
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

    def forget(self, client: bytes) -> None:
        self._slots.forget(client)
        if self._spatial is not None:
            self._spatial.forget(client)  # racy with the infer thread only for a gone client

    def state(self, stall_s: float = STALL_S) -> PipelineState:
        """Serving, stalled or stopped. An idle pipeline (no clients) is serving: both
        loops beat at least every POLL_S while they wait for frames, so only a stuck
        engine call or a dead thread goes stale. Once stop() is asked for, the answer is
        STOPPED whatever the threads do: shutting down says nothing about the model."""
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
            self._model.warm_up(warm_up_size)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._slots.wake()
        for thread in self._threads:
            thread.join()
        self._close_retired(None)
        self._model.engine.close()

    # -- pipeline threads ---------------------------------------------------------------
    def _reply_socket(self) -> zmq.Socket:
        socket = self._context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self._reply_endpoint)
        return socket

    def _prepare_loop(self) -> None:
        replies = self._reply_socket()
        try:
            while not self._stop.is_set():
                self._beats["prepare"] = time.monotonic()
                if not self._free.acquire(timeout=POLL_S):
                    continue
                prepared = self._prepare_next(replies)
                if prepared is None:
                    self._free.release()
                    continue
                self._ready.put(prepared)
        finally:
            replies.close()

    def _prepare_next(self, replies: zmq.Socket) -> _Prepared | None:
        taken = self._slots.take(POLL_S)
        if taken is None:
            return None
        client, job = taken
        if self._expired(client, job, replies):
            return None
        model = self._model
        try:
            image, color = decode_pixels(job.header, job.payload)
            depth = (decode_depth(job.header.depth, job.depth)
                     if job.header.depth is not None else None)
            decoded = time.time()
            tensor, transform = model.preprocess(image, color)
        except ProtocolError as exc:
            self.counters.add("errors")
            replies.send_multipart([client, encode_error(job.header.seq, exc.code, exc.message)])
            return None
        except Exception as exc:  # a bug must cost one frame, never the model's thread
            log.exception("preprocessing failed on a frame for %s", model.bundle.name)
            self.counters.add("errors")
            replies.send_multipart([client, encode_error(
                job.header.seq, ErrorCode.INTERNAL, f"preprocessing failed: {exc}")])
            return None
        stamps = {"received": job.received, "decoded": decoded, "preprocessed": time.time()}
        return _Prepared(model, client, job, tensor, transform, stamps, image, depth)

    def _expired(self, client: bytes, job: FrameJob, replies: zmq.Socket) -> bool:
        if time.time() - job.received <= self._deadline_s:
            return False
        self.counters.add("expired")
        total = self._slots.count_drop(client)
        replies.send_multipart([client, encode_dropped(job.header.seq, "expired", total)])
        return True

    def _infer_loop(self) -> None:
        replies = self._reply_socket()
        try:
            while not self._stop.is_set():
                self._beats["infer"] = time.monotonic()
                try:
                    item = self._ready.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                manifest = item.model.bundle.manifest
                # The next frame may be prepared while this one is in the engine.
                self._free.release()
                # Checked again here: a prepared frame waits out the previous inference.
                if self._expired(item.client, item.job, replies):
                    continue
                try:
                    reply = self._run(item, manifest.name, manifest.version)
                    if self.metrics is not None:  # ~1 us; stamps now include "sent"
                        self.metrics.observe_frame(manifest.name, item.stamps)
                except SightlineError as exc:
                    log.error("model %s failed on a frame: %s", manifest.name, exc)
                    self.counters.add("errors")
                    reply = encode_error(item.job.header.seq, ErrorCode.INTERNAL, str(exc))
                except Exception as exc:  # a decoder bug must cost one frame, not the thread
                    log.exception("model %s failed on a frame", manifest.name)
                    self.counters.add("errors")
                    reply = encode_error(item.job.header.seq, ErrorCode.INTERNAL,
                                         f"output decoding failed: {exc}")
                replies.send_multipart([item.client, reply])
                self._close_retired(item.model)
        finally:
            replies.close()

    def _run(self, item: _Prepared, name: str, version: str) -> bytes:
        model = item.model
        outputs = model.engine.infer({model.input_name: item.tensor})
        item.stamps["inferred"] = time.time()
        result = model.decode_outputs(outputs, item.transform)
        item.stamps["postprocessed"] = time.time()
        header = item.job.header
        extra = {}
        if header.wants_spatial:
            extra = self._spatial_stage().process(item.client, header, result, item.depth)
            item.stamps["spatial"] = time.time()
        if header.annotate:
            extra["annotated_jpeg"] = annotate(item.image, header, result, extra)
            item.stamps["annotated"] = time.time()
        self.counters.add("results")
        return encode_result(header, name, version, result, item.stamps,
                             self._slots.dropped(item.client), extra)

    def _spatial_stage(self):
        with self._spatial_lock:  # the start-up preload thread and the infer thread
            if self._spatial is None:
                from runtime.daemon.spatial_stage import SpatialStage

                self._spatial = SpatialStage()
            return self._spatial


def annotate(image: np.ndarray, header: FrameHeader, result, extra: dict) -> bytes:
    """The frame as JPEG with what the reply carries drawn on it (thin clients, debug view)."""
    import cv2

    from runtime.overlay import draw_reply

    bgr = image if image.ndim == 2 or header.encoding != "rgb8" else image[:, :, ::-1]
    message = {"detections": [d.to_wire() for d in result.detections], **extra}
    if header.intrinsics is not None:
        message["intrinsics"] = list(header.intrinsics)
    if header.pose is not None:
        message["pose"] = list(header.pose)
    ok, jpeg = cv2.imencode(".jpg", draw_reply(bgr, message), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return jpeg.tobytes() if ok else b""

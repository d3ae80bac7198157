"""What happens to a frame inside its model's threads: prepare, infer (batched), decode.

Pure per-frame steps with no threads or sockets of their own; runtime/daemon/pipeline.py
decides which thread runs each. Batching stacks frames of the same input size from
different clients into one engine call and splits the outputs again, so each frame's
result is exactly what it would have been alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runtime.daemon.decode import DecodeBuffers, decode_depth, decode_pixels
from runtime.daemon.frame_paths import Feeds, FramePath, frame_path
from runtime.engines import Engine
from runtime.models.bundle import Bundle
from runtime.models.preprocess import FrameTransform, needed_scale
from runtime.protocol import FrameHeader
from runtime.results import TaskResult


@dataclass
class FrameJob:
    header: FrameHeader
    payload: memoryview | bytes
    received: float  # server wall clock, seconds
    keepalive: object = None  # the zmq.Frames backing the buffers, kept alive until done
    depth: memoryview | bytes | None = None
    # The connection that sent the frame: its replies go there and nowhere else (None: to
    # the slot key, for callers without connections). docs/protocol.md §7.4.
    route: bytes | None = None


def batch_capacity(engine: Engine) -> int | None:
    """How many frames one call may take: None for a dynamic batch dimension, 1 for a
    model exported with batch 1, N for a bundle variant built with a fixed batch of N."""
    if not engine.inputs:
        return 1
    first = engine.inputs[0].shape[0] if engine.inputs[0].shape else 1
    return first if isinstance(first, int) and first > 0 else None


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """Everything per-model that a frame needs, swapped as one reference (hot swap)."""

    bundle: Bundle
    engine: Engine
    frames: FramePath  # feeds in, results out: Python reference or fused engine
    jpeg_buffers: DecodeBuffers  # scaled JPEG decodes reuse these (one decoding thread)

    @classmethod
    def of(cls, bundle: Bundle, engine: Engine, *, buffers: int = 2) -> LoadedModel:
        """`buffers`: input tensors (and scaled JPEG decodes, which a fused engine reads
        in place) kept in a ring; it must cover every frame prepared but not yet through
        the engine (2 x max batch)."""
        return cls(bundle, engine, frame_path(bundle.manifest, engine, buffers=buffers),
                   DecodeBuffers(buffers))

    def warm_up(self, size: tuple[int, int] = (640, 480), runs: int = 2,
                batch: int = 1) -> float:
        """Run blank frames through the engine; returns the fastest run's seconds."""
        width, height = size
        feeds, _ = self.frames.feeds(np.zeros((height, width, 3), np.uint8), "bgr")
        feeds = {name: value.copy() for name, value in feeds.items()}
        fastest = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            self.engine.infer(feeds)
            fastest = min(fastest, time.perf_counter() - start)
        if batch > 1:  # the first batched call allocates for its shape: not on a headset
            self.engine.infer(self.frames.stack([feeds] * batch))
        return fastest


@dataclass(slots=True)
class Prepared:
    model: LoadedModel  # the model this frame was prepared for; it is inferred with it too
    client: bytes
    job: FrameJob
    feeds: Feeds
    transform: FrameTransform
    stamps: dict[str, float]
    image: np.ndarray  # decoded frame, for the annotated reply
    depth: np.ndarray | None


def decode_frame(model: LoadedModel, header: FrameHeader,
                 payload: memoryview | bytes) -> tuple[np.ndarray, str]:
    """The frame's pixels: a raw frame as a view, a JPEG at the smallest DCT scale the model
    still loses nothing at (annotated and spatial replies work on the frame's own pixels,
    so those decode at full size)."""
    if header.encoding == "jpeg" and not (header.annotate or header.wants_spatial):
        manifest = model.bundle.manifest
        scale = needed_scale(manifest.input, manifest.preprocess, header.width, header.height)
        return decode_pixels(header, payload, scale, buffers=model.jpeg_buffers)
    return decode_pixels(header, payload)


def frame_feeds(model: LoadedModel, header: FrameHeader,
                image: np.ndarray, color: str) -> tuple[dict, FrameTransform]:
    """Engine feeds for a decoded frame, with the transform to the header's pixels."""
    feeds, transform = model.frames.feeds(image, color)
    if image.shape[1] != header.width or image.shape[0] != header.height:
        transform = transform.for_source(header.width, header.height)
    return feeds, transform


def prepare(model: LoadedModel, client: bytes, job: FrameJob, taken_at: float) -> Prepared:
    """Decode and preprocess one frame; raises ProtocolError for a frame that cannot be."""
    header = job.header
    image, color = decode_frame(model, header, job.payload)
    depth = (decode_depth(header.depth, job.depth) if header.depth is not None else None)
    decoded = time.time()
    feeds, transform = frame_feeds(model, header, image, color)
    stamps = {"received": job.received, "taken": taken_at, "decoded": decoded,
              "preprocessed": time.time()}
    return Prepared(model, client, job, feeds, transform, stamps, image, depth)


def batches(items: list[Prepared]) -> list[list[Prepared]]:
    """Group frames that can share one engine call: same model object, same feed shapes."""
    if len(items) <= 1:  # the usual case: no grouping to do
        return [items] if items else []
    groups: dict[tuple, list[Prepared]] = {}
    for item in items:
        key = (id(item.model), item.model.frames.group_key(item.feeds))
        groups.setdefault(key, []).append(item)
    return list(groups.values())


def infer(group: list[Prepared]) -> list[TaskResult | Exception]:
    """Run one group through its engine (one call) and decode each frame's outputs.

    An engine failure raises (it fails the whole group); a decoder failure costs only its
    own frame and comes back in that frame's place."""
    model = group[0].model
    frames = model.frames
    started = time.time()
    feeds = group[0].feeds if len(group) == 1 else frames.stack([item.feeds for item in group])
    per_frame = frames.split(model.engine.infer(feeds), len(group))
    inferred = time.time()
    results = []
    for item, frame_outputs in zip(group, per_frame, strict=True):
        item.stamps["started"] = started
        item.stamps["inferred"] = inferred
        try:
            results.append(frames.decode(frame_outputs, item.transform))
        except Exception as exc:  # a decoder bug must cost one frame, not the batch
            results.append(exc)
        item.stamps["postprocessed"] = time.time()
    return results


def annotate(image: np.ndarray, header: FrameHeader, result: TaskResult, extra: dict) -> bytes:
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

"""How a model's frames are run: batched across clients, inline in the I/O thread, with
spatial work off the engine's thread. Real ONNX Runtime engines, real inproc ZeroMQ
sockets for the replies, real daemons where the socket matters."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest
import zmq

from runtime.config import ServeConfig, ServerSettings
from runtime.daemon import spatial_stage
from runtime.daemon.inference import FrameJob, batch_capacity
from runtime.daemon.pipeline import ModelPipeline
from runtime.daemon.server import Server
from runtime.engines import open_engine
from runtime.models.bundle import (
    Bundle,
    InputSpec,
    Manifest,
    OnnxFile,
    Preprocess,
    SizePolicy,
    write_bundle,
)
from runtime.protocol import FrameHeader, decode_reply
from tests.onnx_models import affine_argmax_model, conv_pool_model

CLIENTS = [f"client-{i}".encode() for i in range(4)]


def _bundle(directory, model, name: str, input_name: str) -> Bundle:
    data = model.SerializeToString()
    manifest = Manifest(
        name=name, version="1", task="raw",
        input=InputSpec(name=input_name, layout="NCHW",
                        size=SizePolicy(mode="fixed", width=32, height=24)),
        preprocess=Preprocess(color="rgb", scale=1 / 255, mean=(0.0, 0.0, 0.0),
                              std=(1.0, 1.0, 1.0), resize="stretch"),
        onnx=OnnxFile(sha256=hashlib.sha256(data).hexdigest()))
    return write_bundle(directory, manifest, data)


@pytest.fixture
def raw_bundle(tmp_path) -> Bundle:
    """A raw model with a dynamic batch dimension whose output depends on every pixel."""
    return _bundle(tmp_path / "affine", affine_argmax_model(), "affine", "x")


def _job(seq: int, image: np.ndarray, **flags) -> FrameJob:
    header = FrameHeader(seq=seq, width=image.shape[1], height=image.shape[0],
                         encoding="bgr8", capture_ts=time.time(), **flags)
    return FrameJob(header, image.tobytes(), time.time())


def _collect(socket: zmq.Socket, count: int, timeout_s: float = 20) -> list[tuple[bytes, dict]]:
    replies = []
    deadline = time.monotonic() + timeout_s
    while len(replies) < count and time.monotonic() < deadline:
        if socket.poll(100):
            client, raw = socket.recv_multipart()
            replies.append((client, decode_reply(raw)))
    return replies


@pytest.fixture
def reply_socket():
    context = zmq.Context.instance()
    endpoint = f"inproc://test-replies-{time.monotonic_ns()}"
    socket = context.socket(zmq.PULL)
    socket.bind(endpoint)
    yield context, endpoint, socket
    socket.close(linger=0)


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(count)]


def _alone(bundle: Bundle, image: np.ndarray, context, endpoint, socket) -> dict:
    pipeline = ModelPipeline(bundle, open_engine(bundle.onnx_path), context, endpoint, 10.0)
    pipeline.submit(b"alone", _job(1, image))
    pipeline.start(warm_up_size=None)
    try:
        (_, reply), = _collect(socket, 1)
    finally:
        pipeline.stop()
    return reply


def test_waiting_frames_of_several_clients_run_as_one_batch_with_unchanged_results(
        raw_bundle, reply_socket):
    context, endpoint, socket = reply_socket
    images = _images(3)
    pipeline = ModelPipeline(raw_bundle, open_engine(raw_bundle.onnx_path), context, endpoint,
                             10.0, max_batch=4)
    for index, image in enumerate(images):  # all waiting before the engine is free
        pipeline.submit(CLIENTS[index], _job(index + 1, image))
    pipeline.start(warm_up_size=None)
    try:
        replies = dict(_collect(socket, 3))
    finally:
        pipeline.stop()
    assert sorted(replies) == CLIENTS[:3]
    assert all(reply["type"] == "result" for reply in replies.values())
    # one engine call: the three frames share its start and end stamps
    assert len({reply["t"]["started"] for reply in replies.values()}) == 1
    assert len({reply["t"]["inferred"] for reply in replies.values()}) == 1
    for index, image in enumerate(images):
        batched = replies[CLIENTS[index]]["tensors"]
        alone = _alone(raw_bundle, image, context, endpoint, socket)["tensors"]
        assert batched.keys() == alone.keys()
        for name in alone:
            assert batched[name]["shape"][0] == 1  # each client gets its own frame's slice
            assert batched[name]["data"] == alone[name]["data"]


def test_without_batching_each_frame_gets_its_own_engine_call(raw_bundle, reply_socket):
    context, endpoint, socket = reply_socket
    pipeline = ModelPipeline(raw_bundle, open_engine(raw_bundle.onnx_path), context, endpoint,
                             10.0, max_batch=1)
    for index, image in enumerate(_images(3)):
        pipeline.submit(CLIENTS[index], _job(index + 1, image))
    pipeline.start(warm_up_size=None)
    try:
        replies = _collect(socket, 3)
    finally:
        pipeline.stop()
    assert len({reply["t"]["started"] for _, reply in replies}) == 3


def test_batch_capacity_follows_the_models_batch_dimension(tmp_path):
    dynamic = open_engine(_saved(affine_argmax_model(), tmp_path / "dynamic.onnx"))
    fixed = open_engine(_saved(conv_pool_model(batch=10), tmp_path / "fixed.onnx"))
    single = open_engine(_saved(conv_pool_model(batch=1), tmp_path / "single.onnx"))
    assert batch_capacity(dynamic) is None
    assert batch_capacity(fixed) == 10
    assert batch_capacity(single) == 1


def _saved(model, path):
    path.write_bytes(model.SerializeToString())
    return path


def test_max_batch_is_capped_by_a_fixed_batch_of_one(tmp_path, reply_socket):
    context, endpoint, _ = reply_socket
    bundle = _bundle(tmp_path / "single", conv_pool_model(batch=1, height=24, width=32),
                     "single", "image")
    engine = open_engine(bundle.onnx_path)
    assert ModelPipeline(bundle, engine, context, endpoint, 1.0, max_batch=8).max_batch == 1


def test_a_slow_spatial_stage_does_not_delay_another_clients_inference(
        raw_bundle, reply_socket, monkeypatch):
    context, endpoint, socket = reply_socket
    release = threading.Event()
    threads = []

    def slow_process(self, client, header, result, depth):
        threads.append(threading.current_thread().name)
        release.wait(10)  # a plane recompute that takes a long time
        return {}

    monkeypatch.setattr(spatial_stage.SpatialStage, "process", slow_process)
    pipeline = ModelPipeline(raw_bundle, open_engine(raw_bundle.onnx_path), context, endpoint,
                             10.0)
    pipeline.start(warm_up_size=None)
    image_a, image_b = _images(2)
    try:
        pipeline.submit(CLIENTS[0], _job(1, image_a, spatial=True))
        time.sleep(0.3)  # the spatial frame is inferred and now sits in the spatial stage
        pipeline.submit(CLIENTS[1], _job(1, image_b))
        first = _collect(socket, 1, timeout_s=5)
        release.set()
        second = _collect(socket, 1, timeout_s=10)
    finally:
        release.set()
        pipeline.stop()
    assert [client for client, _ in first] == [CLIENTS[1]]  # answered while spatial waited
    assert [client for client, _ in second] == [CLIENTS[0]]
    assert threads == ["sightline-spatial-affine"]


def test_a_newer_spatial_frame_supersedes_one_still_waiting_for_the_spatial_stage(
        raw_bundle, reply_socket, monkeypatch):
    context, endpoint, socket = reply_socket
    release = threading.Event()
    monkeypatch.setattr(spatial_stage.SpatialStage, "process",
                        lambda *args: release.wait(10) and {})
    pipeline = ModelPipeline(raw_bundle, open_engine(raw_bundle.onnx_path), context, endpoint,
                             10.0)
    pipeline.start(warm_up_size=None)
    try:
        for seq, image in enumerate(_images(3), start=1):  # 1 in the stage, 2 then 3 wait
            pipeline.submit(CLIENTS[0], _job(seq, image, spatial=True))
            time.sleep(0.3)
        release.set()
        replies = [reply for _, reply in _collect(socket, 3)]
    finally:
        release.set()
        pipeline.stop()
    kinds = {reply["seq"]: reply["type"] for reply in replies}
    assert kinds == {1: "result", 2: "dropped", 3: "result"}  # every frame gets one reply


def _server(bundles, **server) -> Server:
    return Server(ServeConfig(server=ServerSettings(endpoints=("inproc://unused",), **server),
                              security={"mode": "plain"}), bundles)


def test_one_cpu_model_runs_inline_in_the_io_thread(raw_bundle):
    server = _server([raw_bundle])
    try:
        server.bind()
        assert server.pipelines["affine"].inline
        names = {t.name for t in threading.enumerate()}
        assert "sightline-spatial-affine" in names and "sightline-infer-affine" not in names
    finally:
        server.close()


@pytest.mark.parametrize("server_settings", [{"inline_inference": "off"},
                                             {"deadline_ms": 0.001}])
def test_inline_is_off_when_asked_or_when_an_inference_is_not_well_inside_the_deadline(
        raw_bundle, server_settings):
    server = _server([raw_bundle], **server_settings)
    try:
        server.bind()
        assert not server.pipelines["affine"].inline
        assert "sightline-infer-affine" in {t.name for t in threading.enumerate()}
    finally:
        server.close()


def test_two_models_each_get_their_own_infer_thread(raw_bundle, tmp_path):
    renamed = _bundle(tmp_path / "second", affine_argmax_model(), "second", "x")
    server = _server([raw_bundle, renamed])
    try:
        server.bind()
        assert not any(p.inline for p in server.pipelines.values())
    finally:
        server.close()


def test_max_batch_below_one_is_a_config_error():
    with pytest.raises(ValueError, match="max_batch"):
        ServerSettings(max_batch=0)

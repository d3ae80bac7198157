"""OTA test parts: tiny real bundles (good, NaN, unloadable), and an operator that packages,
signs and publishes updates through a real broker and reads the devices' progress."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from cloud_sync.commands import UpdateCommand
from cloud_sync.push import make_update, package_bundle, publish_chunks, publish_command
from cloud_sync.signing import generate_signing_key, load_private_key
from cloud_sync.topics import device_topics
from runtime.models.bundle import Bundle, Manifest, write_bundle
from tests.onnx_models import conv_relu_model

MODEL = "tiny"


def nan_model() -> onnx.ModelProto:
    """image -> (image - image) / (image - image): NaN everywhere, but loads and runs."""
    nodes = [helper.make_node("Sub", ["image", "image"], ["zero"]),
             helper.make_node("Div", ["zero", "zero"], ["features"])]
    graph = helper.make_graph(
        nodes, "nan", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 3, 64, 64])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def tiny_bundle(directory: Path, version: str, onnx_bytes: bytes | None = None,
                name: str = MODEL) -> Bundle:
    """A raw-task bundle of a 3x3 conv (64x64 input); `onnx_bytes` replaces the model."""
    data = onnx_bytes if onnx_bytes is not None else conv_relu_model(
        height=64, width=64).SerializeToString()
    manifest = Manifest.model_validate({
        "name": name, "version": version, "task": "raw",
        "input": {"name": "image", "layout": "NCHW",
                  "size": {"mode": "fixed", "height": 64, "width": 64}},
        "preprocess": {"color": "rgb", "resize": "stretch"},
        "onnx": {"file": "model.onnx", "sha256": hashlib.sha256(data).hexdigest()},
    })
    return write_bundle(directory / f"{name}-{version}", manifest, data)


class Operator:
    """The cloud side of a test: a signing key and an MQTT client on the test's broker."""

    def __init__(self, work: Path, observer) -> None:
        self.work = work
        self.private_path, self.public_path = generate_signing_key(work / "signing", "ops")
        self.key = load_private_key(self.private_path)
        self.observer = observer
        self.client = observer.client

    def publish(self, client, topic: str, payload: bytes, retain: bool = False) -> None:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def package(self, bundle: Bundle | Path) -> Path:
        source = bundle.directory if isinstance(bundle, Bundle) else bundle
        work = self.work / f"pkg-{time.monotonic_ns()}"
        work.mkdir(parents=True)
        return package_bundle(source, work)

    def package_without_reference(self, bundle: Bundle) -> Path:
        """For models whose reference outputs cannot be computed (NaN): sample input only."""
        work = self.work / f"pkg-{time.monotonic_ns()}"
        work.mkdir(parents=True)
        return package_bundle(bundle.directory, work, with_reference=False)

    def send(self, command: UpdateCommand, archive: Path | None = None, key=None) -> None:
        if archive is not None:
            publish_chunks(self.client, command, archive, self.publish)
        publish_command(self.client, command, key or self.key, self.publish)

    def push(self, bundle: Bundle | Path, device: str, **options) -> UpdateCommand:
        archive = self.package(bundle)
        command = make_update(archive, devices=[device], chunk_size=options.pop("chunk_size",
                                                                                 4096), **options)
        self.send(command, archive)
        return command

    def progress(self, device: str, update_id: str | None = None) -> list[dict]:
        documents = [json.loads(m.payload) for m in
                     self.observer.on(device_topics(device).ota_progress)]
        return [d for d in documents if update_id is None or d.get("update_id") == update_id]

    def states(self, device: str, update_id: str | None = None) -> list[str]:
        return [d["state"] for d in self.progress(device, update_id)]

    def wait_state(self, device: str, update_id: str | None, *states: str,
                   timeout: float = 30.0) -> dict:
        topic = device_topics(device).ota_progress

        def arrived(messages) -> bool:
            return any(_matches(m, topic, update_id, states) for m in messages)

        messages = self.observer.wait_for(arrived, timeout)
        return next(json.loads(m.payload) for m in messages
                    if _matches(m, topic, update_id, states))


def _matches(message, topic: str, update_id: str | None, states) -> bool:
    if message.topic != topic:
        return False
    document = json.loads(message.payload)
    return (update_id is None or document.get("update_id") == update_id) \
        and document.get("state") in states


def frame_64() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def hang_on_white_model(iterations: int = 10**8) -> onnx.ModelProto:
    """image -> image, after a Loop of `iterations` turns when every pixel is white (1.0),
    none otherwise: validates and warms up in no time (random and black frames), then hangs
    in the engine, as a real model stuck on some input does, on the first white frame."""
    white = helper.make_tensor("white", TensorProto.FLOAT, [], [0.99])
    turns = helper.make_tensor("turns", TensorProto.INT64, [], [iterations])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["count_in", "one"], ["count_out"])],
        "spin",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("count_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("count_out", TensorProto.FLOAT, [])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    nodes = [
        helper.make_node("ReduceMin", ["image"], ["darkest"], keepdims=0),
        helper.make_node("Greater", ["darkest", "white"], ["is_white"]),
        helper.make_node("Cast", ["is_white"], ["is_white_i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["is_white_i", "turns"], ["trip"]),
        helper.make_node("Loop", ["trip", "go", "zero"], ["count"], body=body),
        helper.make_node("Mul", ["count", "zero"], ["nothing"]),
        helper.make_node("Add", ["image", "nothing"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes, "hang", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                      [1, 3, 64, 64])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 3, 64, 64])],
        [white, turns, helper.make_tensor("go", TensorProto.BOOL, [], [True]),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

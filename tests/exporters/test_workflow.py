"""The exporters issue as a new user walks it, on this machine: a PyTorch detector defined
in a file -> verified bundle -> FP16 and INT8 variants -> compared across the backends here
-> served by `sightline serve` (the FP16 variant when the config asks for it)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import cv2
import numpy as np

from runtime.client import Client, query_info
from tests.conftest import SIGHTLINE
from tests.exporters.test_torch_export import (
    DETECTOR_LABELS,
    MODELS,
    assert_squares_detected,
    squares_frame,
)


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run([*SIGHTLINE, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"sightline {' '.join(args)}:\n{done.stderr}\n{done.stdout}"
    return done


def test_export_quantize_compare_and_serve_a_variant(tmp_path: Path, daemon_factory):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(DETECTOR_LABELS) + "\n")
    bundle = tmp_path / "tiny"
    _run("export", f"{MODELS}:tiny_detector", "--task", "detect", "--labels", str(labels),
         "--input-size", "320x320", "--name", "tiny", "--out", str(bundle))

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # the scene the detector knows, with sensor noise
        noisy = squares_frame().astype(np.int16) + rng.integers(-8, 9, (480, 640, 3))
        cv2.imwrite(str(calib / f"{i}.png"), np.clip(noisy, 0, 255).astype(np.uint8))
    done = _run("quantize", str(bundle), "--precision", "fp16", "--calib", str(calib),
                "--runs", "5")
    assert (tmp_path / "tiny-fp16" / "quantization-report.json").is_file(), done.stdout
    # This toy detector's saturated logits do not survive INT8: the accuracy gate refuses it
    # rather than writing a variant that serve would prefer on an int8 device ...
    refused = subprocess.run([*SIGHTLINE, "quantize", str(bundle), "--precision", "int8",
                              "--calib", str(calib), "--runs", "5"], capture_output=True,
                             text=True, timeout=240)
    assert refused.returncode == 2 and "of FP32's detections" in refused.stderr
    assert not (tmp_path / "tiny-int8").exists()
    # ... and writes it when told to accept it, so it can still be compared.
    _run("quantize", str(bundle), "--precision", "int8", "--calib", str(calib), "--runs", "5",
         "--min-recall", "0")

    compared = _run("compare", str(bundle), "--repeats", "3").stdout
    for backend in ("onnxruntime CPU fp32", "onnxruntime CPU fp16", "onnxruntime CPU int8"):
        assert backend in compared

    config = tmp_path / "serve.toml"
    config.write_text('precision = "fp16"\n')
    daemon = daemon_factory("--model", str(bundle), "--config", str(config))
    (model,) = query_info(daemon.endpoint)["models"]
    assert model["name"] == "tiny" and model["precision"] == "fp16"
    with Client(daemon.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        deadline = time.monotonic() + 5
        while client.send(squares_frame()) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        reply = client.recv(15)
    assert reply is not None and reply.ok, reply
    assert_squares_detected(reply.detections, tolerance=1.0, min_score=0.95)  # fp16 rounding

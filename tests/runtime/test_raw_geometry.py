"""Raw outputs a client can use, through a real `sightline serve`: the reply's transform, the
SDK mapping a raw map back to source pixels, and the bundle option that has the daemon do it.

The model is a stand-in for a third-party text detector: a dynamic NCHW input and one
probability map at stride 2 that reproduces the input, so a white square drawn on a black
frame shows up in the map and can be located in source pixels.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from exporters.onnx_import import TASK_DEFAULTS, ImportOptions, import_onnx
from runtime.client import Client
from runtime.models.bundle import Bundle
from runtime.models.preprocess import Preprocessor
from tests.conftest import SIGHTLINE, Daemon, start_daemon
from tests.onnx_models import probability_map_model, save

SQUARE = (101, 203, 40)  # x, y of its top-left corner and its side, in source pixels
# Odd sizes that letterbox: 630x470 -> 640x480 input (1 row of padding above),
# 500x300 -> 512x320 (6 rows above, 7 below), 2400x1000 -> scaled down into 1920x800.
SIZES = [(630, 470), (500, 300), (2400, 1000)]


def frame_with_square(width: int, height: int) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    x, y, side = SQUARE
    image[y:y + side, x:x + side] = 255
    return image


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Daemon, Bundle, Path]]:
    """One daemon serving the map as the model makes it ("textdet", imported through the
    Python API) and resized back to the frame ("textdet-src", through `sightline import`)."""
    root = Path(tempfile.mkdtemp(prefix="sl-"))
    source = save(probability_map_model(), root / "textdet.onnx")
    black_border = TASK_DEFAULTS["raw"]["preprocess"].model_copy(update={"pad_value": 0})
    plain = import_onnx(source, ImportOptions(task="raw", name="textdet",
                                              preprocess=black_border), root / "textdet").bundle
    done = subprocess.run([*SIGHTLINE, "import", str(source), "--task", "raw", "--name",
                           "textdet-src", "--pad-value", "0", "--resize-to-source", "prob",
                           "--out", str(root / "textdet-src")],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    # a generous deadline: a 2400x1000 frame must not expire on a loaded 2-core CI machine
    daemon = start_daemon(root, "--model", str(plain.directory), "--model",
                          str(root / "textdet-src"), "--deadline-ms", "10000")
    try:
        yield daemon, plain, root / "textdet-src"
    finally:
        daemon.stop(9)
        shutil.rmtree(root, ignore_errors=True)


def ask(daemon: Daemon, image: np.ndarray, model: str):
    with Client(daemon.endpoint, max_in_flight=1, model=model) as client:
        assert client.wait_connected(10), "client never connected"
        deadline = time.monotonic() + 5
        while client.send(image) is None:
            assert time.monotonic() < deadline, "in-flight window never freed"
            time.sleep(0.005)
        reply = client.recv(20)
    assert reply is not None and reply.kind == "result", reply and reply.message
    return reply


def square_edges(mask: np.ndarray) -> tuple[float, float, float, float]:
    """x1, x2, y1, y2 of the True region as continuous edges (pixel j spans [j, j + 1))."""
    rows, cols = np.nonzero(mask)
    return cols.min(), cols.max() + 1.0, rows.min(), rows.max() + 1.0


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_raw_reply_carries_the_transform_of_its_letterboxed_frame(served, width, height):
    daemon, bundle, _ = served
    reply = ask(daemon, frame_with_square(width, height), "textdet")
    _, expected = Preprocessor(bundle.manifest.input, bundle.manifest.preprocess)(
        np.zeros((height, width, 3), np.uint8), "bgr")
    wire = reply.message["transform"]
    assert wire["input"] == [expected.input_width, expected.input_height]
    assert wire["scale"] == pytest.approx([expected.scale_x, expected.scale_y])
    assert wire["pad"] == pytest.approx([expected.pad_x, expected.pad_y])
    # the affine takes the model input's letterboxed content onto the whole source frame
    a, b, c, d, e, f = wire["to_source"]
    x1, y1 = expected.pad_x, expected.pad_y
    x2, y2 = x1 + width * expected.scale_x, y1 + height * expected.scale_y
    assert (a * x1 + b * y1 + c, d * x1 + e * y1 + f) == pytest.approx((0, 0), abs=1e-6)
    assert (a * x2 + b * y2 + c, d * x2 + e * y2 + f) == pytest.approx((width, height))
    # and the tensor is in that model-input geometry, at the model's stride of 2
    assert reply.tensors["prob"].shape == (1, 1, expected.input_height // 2,
                                           expected.input_width // 2)
    assert "space" not in reply.message["tensors"]["prob"]
    if (width, height) != (2400, 1000):
        assert expected.pad_y > 0, "the size should letterbox"


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_sdk_maps_a_square_found_in_the_raw_map_back_onto_its_source_pixels(served, width,
                                                                              height):
    daemon, _, _ = served
    reply = ask(daemon, frame_with_square(width, height), "textdet")
    prob = reply.tensors["prob"][0, 0]
    x, y, side = SQUARE
    # the square's edges in the map's own grid (cells more than half covered) ...
    gx1, gx2, gy1, gy2 = square_edges(prob > 0.5)
    (sx1, sx2), (sy1, sy2) = reply.point_to_source("prob", [gx1, gx2], [gy1, gy2])
    # ... land on the drawn square's edges in the frame, within a pixel (a map cell is
    # about 2 source pixels here, 2.5 for the scaled-down 2400x1000 frame)
    cell = 2 / min(reply.transform.scale_x, reply.transform.scale_y)
    assert np.allclose([sx1, sx2, sy1, sy2], [x, x + side, y, y + side], atol=cell / 2 + 1)
    # its centre of mass, the sub-pixel measure, within a pixel
    rows, cols = np.mgrid[0:prob.shape[0], 0:prob.shape[1]]
    weights = prob / prob.sum()
    cx, cy = reply.point_to_source("prob", (weights * (cols + 0.5)).sum(),
                                   (weights * (rows + 0.5)).sum())
    assert abs(cx - (x + side / 2)) < 1 and abs(cy - (y + side / 2)) < 1
    # the whole map, resized back by the SDK, has the square where it was drawn
    in_source = reply.tensor_to_source("prob")
    assert in_source.shape == (1, 1, height, width)
    assert np.allclose(square_edges(in_source[0, 0] > 0.5), [x, x + side, y, y + side], atol=1)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_bundle_asking_for_resize_to_source_gets_a_map_of_the_frames_size(served, width,
                                                                           height):
    daemon, _, directory = served
    reply = ask(daemon, frame_with_square(width, height), "textdet-src")
    wire = reply.message["tensors"]["prob"]
    assert wire["space"] == "source"
    prob = reply.tensors["prob"]
    assert prob.shape == (1, 1, height, width)
    x, y, side = SQUARE
    assert np.allclose(square_edges(prob[0, 0] > 0.5), [x, x + side, y, y + side], atol=1)
    assert "transform" in reply.message  # still there: it describes the model input
    # the SDK helpers take an already resized tensor as it is
    assert reply.tensor_to_source("prob").shape == (1, 1, height, width)
    assert tuple(map(float, reply.point_to_source("prob", 12.5, 7.5))) == (12.5, 7.5)
    assert '"resize_to_source"' in (directory / "manifest.json").read_text()

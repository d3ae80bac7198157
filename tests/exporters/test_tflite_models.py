"""The real MediaPipe and fer models, translated, against LiteRT running the original .tflite,
and `sightline import model.tflite` as a user runs it."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from runtime.models import assets
from tests.test_cli import run

litert = pytest.importorskip("ai_edge_litert.interpreter")

MODELS = {  # bundle name -> the pinned .tflite it was imported from
    "selfie-segmentation": assets.SELFIE_SEGMENTATION_TFLITE,
    "palm-detection": assets.PALM_DETECTION_TFLITE,
    "hand-landmarks": assets.HAND_LANDMARK_TFLITE,
    "face-detection-short": assets.FACE_DETECTION_TFLITE,
    "emotion": assets.EMOTION_TFLITE,
}


def litert_outputs(path, feed: np.ndarray) -> dict[str, np.ndarray]:
    interpreter = litert.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], feed)
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"])
            for d in interpreter.get_output_details()}


def photo_input(astronaut: np.ndarray, shape) -> np.ndarray:
    """The astronaut at the model's input size, in [0, 1] (grey for 1-channel inputs)."""
    _, height, width, channels = shape
    image = cv2.resize(astronaut, (width, height))[:, :, ::-1]
    if channels == 1:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)[..., None]
    return (image.astype(np.float32) / 255.0)[None]


@pytest.mark.parametrize("name", [n for n in MODELS if n != "emotion"])
def test_translated_mediapipe_model_matches_litert(tflite_bundles, astronaut, name):
    bundle = tflite_bundles[name]
    source = assets.fetch_asset(MODELS[name], show_progress=False)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    feed = photo_input(astronaut, [1, *shape[1:]])
    expected = litert_outputs(source, feed)
    actual = dict(zip([o.name for o in session.get_outputs()],
                      session.run(None, {session.get_inputs()[0].name: feed}), strict=True))
    assert set(actual) == set(expected)
    for output, reference in expected.items():
        scale = max(1.0, float(np.abs(reference).max()))  # box offsets run to ~190 px
        error = float(np.abs(actual[output] - reference).max())
        assert error <= 1e-4 * scale, (output, error, scale)


def test_emotion_model_int8_weights_match_litert_within_its_own_quantisation(
        tflite_bundles, astronaut):
    """fer's model stores int8 weights; LiteRT's hybrid kernels also quantise activations
    on the fly (its XNNPACK and reference kernels differ from each other by ~0.01), while the
    translation computes in float with the dequantised weights."""
    bundle = tflite_bundles["emotion"]
    source = assets.fetch_asset(MODELS["emotion"], show_progress=False)
    face = astronaut[82:175, 178:271]  # the face the face detector finds (test below)
    feed = (photo_input(face, (1, 64, 64, 1)) - 0.5) * 2
    expected = litert_outputs(source, feed)["Identity"]
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"x": feed})[0]
    assert np.abs(actual - expected).max() < 0.02
    assert actual.argmax() == expected.argmax() == 3  # happy
    assert actual[0, 3] >= 0.99


def test_import_of_a_tflite_file_records_its_source_and_runs(tmp_path):
    source = assets.fetch_asset(assets.SELFIE_SEGMENTATION_TFLITE, show_progress=False)
    copy = tmp_path / "selfie.tflite"
    copy.write_bytes(source.read_bytes())
    done = run("import", str(copy), "--task", "segment", "--out", str(tmp_path / "b"),
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["source"] == {"file": "selfie.tflite", "format": "tflite",
                                  "sha256": assets.SELFIE_SEGMENTATION_TFLITE.sha256}
    assert manifest["input"]["layout"] == "NHWC"
    assert manifest["input"]["size"]["mode"] == "fixed"
    assert (manifest["input"]["size"]["width"], manifest["input"]["size"]["height"]) == (256, 256)
    assert manifest["outputs"] == {"mask": "activation_10"}


def test_import_of_a_tflite_with_an_unknown_operator_names_it_in_one_line(tmp_path):
    from tests.exporters.tflite_models import single_op

    path = tmp_path / "odd.tflite"
    path.write_bytes(single_op("CUSTOM:MyFancyOp", [(1, 8, 8, 3)], (1, 8, 8, 3)))
    done = run("import", str(path), "--task", "raw", "--out", str(tmp_path / "b"))
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "CUSTOM:MyFancyOp" in line and "cannot translate" in line

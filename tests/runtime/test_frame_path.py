"""The per-frame path of a model: a JPEG decoded at the scale the model needs, fused or
Python steps, replies in the header's pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from runtime.daemon.inference import FrameJob, LoadedModel, infer, prepare
from runtime.engines import EngineSettings
from runtime.fusion.open import open_serving_engine
from runtime.models.bundle import Bundle, SizePolicy
from runtime.protocol import FrameHeader


@pytest.fixture(scope="module")
def fixed_centerface(centerface_bundle) -> Bundle:
    """CenterFace at a fixed 640x480 input, letterboxed: a 1280x720 frame is shrunk by 2."""
    manifest = centerface_bundle.manifest.model_copy(update={
        "input": centerface_bundle.manifest.input.model_copy(update={
            "size": SizePolicy(mode="fixed", width=640, height=480)}),
        "preprocess": centerface_bundle.manifest.preprocess.model_copy(
            update={"resize": "letterbox"})})
    return Bundle(centerface_bundle.directory, manifest)


def _jpeg_job(image: np.ndarray, **flags) -> FrameJob:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    header = FrameHeader(seq=1, capture_ts=0.0, width=image.shape[1], height=image.shape[0],
                         encoding="jpeg", **flags)
    return FrameJob(header, data.tobytes(), 0.0)


@pytest.mark.parametrize("fused", ["off", "auto"])
def test_a_jpeg_decodes_at_the_dct_scale_the_model_needs_and_replies_in_header_pixels(
        fixed_centerface, astronaut, fused):
    model = LoadedModel.of(fixed_centerface,
                           open_serving_engine(fixed_centerface, EngineSettings(fused=fused)))
    frame = cv2.resize(astronaut, (1280, 720))
    scaled = prepare(model, b"c", _jpeg_job(frame), 0.0)
    full = prepare(model, b"c", _jpeg_job(frame, annotate=True), 0.0)  # full-size decode
    assert scaled.image.shape == (360, 640, 3) and full.image.shape == (720, 1280, 3)
    assert scaled.transform.source_width == 1280 and scaled.transform.source_height == 720
    (a,), (b,) = (infer([p])[0].detections for p in (scaled, full))
    # the same face, in the 1280x720 frame's pixels, to within the DCT scaling's blur
    assert np.allclose(a.box, b.box, atol=4.0), (a.box, b.box)
    assert abs(a.score - b.score) < 0.05

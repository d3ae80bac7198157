"""Validation of a new model before it serves: finite, declared shapes, budget, references."""

from __future__ import annotations

import pytest

from runtime.engines import open_engine
from runtime.errors import UpdateRejected
from runtime.models.validation import sample_feeds, validate_engine, write_sample
from tests.cloud_sync.ota_harness import nan_model, tiny_bundle


def test_good_model_passes_and_reports_its_latency(tmp_path):
    bundle = tiny_bundle(tmp_path, "1.0")
    report = validate_engine(bundle, open_engine(bundle.onnx_path), latency_budget_ms=10_000)
    assert report.latency_ms > 0 and report.runs == 5


def test_nan_outputs_are_refused_with_the_count(tmp_path):
    bundle = tiny_bundle(tmp_path, "1.0", onnx_bytes=nan_model().SerializeToString())
    with pytest.raises(UpdateRejected, match=r"12288 of 12288 values NaN"):
        validate_engine(bundle, open_engine(bundle.onnx_path))


def test_budget_is_checked_on_the_median(tmp_path):
    bundle = tiny_bundle(tmp_path, "1.0")
    with pytest.raises(UpdateRejected, match="exceeds the budget"):
        validate_engine(bundle, open_engine(bundle.onnx_path), latency_budget_ms=1e-6)


def test_references_in_the_bundle_are_compared_within_tolerance(tmp_path):
    bundle = tiny_bundle(tmp_path, "1.0")
    engine = open_engine(bundle.onnx_path)
    inputs, _ = sample_feeds(bundle)
    outputs = engine.infer(inputs)
    write_sample(bundle, inputs, {k: v + 0.01 for k, v in outputs.items()})
    bundle.manifest = bundle.manifest.model_copy(update={"sample": "sample.npz"})
    assert validate_engine(bundle, engine, atol=0.02).max_abs_error == pytest.approx(0.01,
                                                                                  rel=1e-3)
    with pytest.raises(UpdateRejected, match="differs from its reference"):
        validate_engine(bundle, engine, atol=0.001)
    validate_engine(bundle, engine)  # no tolerance asked: references not compared


def test_outputs_the_task_cannot_decode_are_refused(tmp_path):
    """A 4-D feature map served as a YOLO-style detector would fail every frame."""
    bundle = tiny_bundle(tmp_path, "1.0")
    bundle.manifest = bundle.manifest.model_copy(update={"task": "detect",
                                                         "labels": ("a", "b")})
    with pytest.raises(UpdateRejected, match="'detect' task cannot decode"):
        validate_engine(bundle, open_engine(bundle.onnx_path))

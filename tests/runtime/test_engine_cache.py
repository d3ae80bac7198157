"""Engine cache and backend selection: everything about TensorRT engines that can be
checked without a GPU — profiles from bundle dims, cache keys, metadata match and mismatch."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from runtime.engines import EngineSettings, open_bundle_engine
from runtime.errors import EngineError, EngineMismatch
from runtime.models.bundle import InputSpec, Preprocess, SizePolicy
from runtime.models.engine_cache import (
    EngineCache,
    EngineKey,
    TargetDevice,
    check_engine_file,
    derive_profile,
)

ORIN = TargetDevice("Orin", "sm_87", "10.3.0")


def _key(**changes) -> EngineKey:
    key = EngineKey(onnx_sha256="a" * 64, precision="fp16",
                    profile=(("image", (1, 3, 32, 32), (1, 3, 480, 640), (1, 3, 1088, 1920)),),
                    target=ORIN)
    return replace(key, **changes)


def test_dynamic_profile_spans_one_tile_to_the_policy_maximum(centerface_bundle):
    ((name, lo, opt, hi),) = derive_profile(centerface_bundle.manifest)
    assert name == "input.1"
    assert lo == (1, 3, 32, 32)
    assert opt == (1, 3, 480, 640)  # a 640x480 frame needs no resize for CenterFace
    assert hi == (1, 3, 1088, 1920)


def test_profile_is_optimised_for_the_given_frame_size(centerface_bundle):
    ((_, _, opt, _),) = derive_profile(centerface_bundle.manifest, frame_size=(1280, 720))
    assert opt == (1, 3, 736, 1280)  # 720 rounds up to a multiple of 32


def test_fixed_size_profile_is_one_shape_and_layout_aware(centerface_bundle):
    manifest = centerface_bundle.manifest.model_copy(update={
        "input": InputSpec(name="x", layout="NHWC",
                           size=SizePolicy(mode="fixed", height=320, width=256)),
        "preprocess": Preprocess(color="gray", mean=(0.0,), std=(1.0,))})
    ((_, lo, opt, hi),) = derive_profile(manifest, max_batch=4)
    assert lo == opt == (1, 320, 256, 1)
    assert hi == (4, 320, 256, 1)


def test_cache_key_changes_with_every_field_it_depends_on():
    base = _key().digest()
    assert _key().digest() == base  # stable
    variants = [
        _key(onnx_sha256="b" * 64), _key(precision="int8"),
        _key(profile=(("image", (1, 3, 32, 32), (1, 3, 480, 640), (1, 3, 640, 640)),)),
        _key(target=replace(ORIN, compute_capability="sm_89")),
        _key(target=replace(ORIN, tensorrt_version="11.4.0")),
        _key(target=replace(ORIN, dla_core=0)),
    ]
    assert len({v.digest() for v in variants} | {base}) == len(variants) + 1


def test_stored_engine_is_found_again_with_its_metadata(tmp_path):
    cache = EngineCache(tmp_path)
    record = cache.store("net", _key(), b"PLAN", build_seconds=12.5)
    assert record.path.read_bytes() == b"PLAN"
    found = cache.find("net", _key())
    assert found is not None and found.key == _key() and found.build_seconds == 12.5
    metadata = json.loads((record.path.parent / "engine.json").read_text())
    assert metadata["key"]["target"]["compute_capability"] == "sm_87"
    assert metadata["key"]["target"]["tensorrt_version"] == "10.3.0"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_bundle_without_any_engine_is_reported_as_missing_not_mismatched(tmp_path):
    assert EngineCache(tmp_path).find("net", _key()) is None


def test_engine_for_another_gpu_and_tensorrt_is_refused_with_what_to_do(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store("net", _key(), b"PLAN", build_seconds=1)
    wanted = _key(target=TargetDevice("RTX 4090", "sm_89", "11.4.0"))
    with pytest.raises(EngineMismatch) as raised:
        cache.find("net", wanted)
    message = str(raised.value)
    assert "Orin (sm_87)" in message and "RTX 4090 (sm_89)" in message
    assert "TensorRT 10.3.0" in message and "TensorRT 11.4.0" in message
    assert "sightline compile" in message


def test_engine_built_from_an_older_onnx_is_refused(tmp_path):
    record = EngineCache(tmp_path).store("net", _key(), b"PLAN", build_seconds=1)
    with pytest.raises(EngineMismatch, match="different ONNX"):
        check_engine_file(record, _key(onnx_sha256="c" * 64))


def test_auto_backend_serves_with_onnxruntime_on_a_cpu_only_machine(centerface_bundle):
    engine = open_bundle_engine(centerface_bundle, EngineSettings())
    assert engine.provider == "CPUExecutionProvider"
    engine.close()


def test_asking_for_tensorrt_without_a_gpu_is_a_clear_error(centerface_bundle):
    from devices.platform import detect_platform

    if detect_platform().has_nvidia_gpu:
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError, match="no NVIDIA GPU"):
        open_bundle_engine(centerface_bundle, EngineSettings(backend="tensorrt"))

"""Bundles: manifest validation, directory round trip, sha256 check, (hostile) archives."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from runtime.errors import BundleError
from runtime.models import bundle as bundle_module
from runtime.models.bundle import (
    MANIFEST_NAME,
    Bundle,
    InputSpec,
    Manifest,
    OnnxFile,
    Preprocess,
    SizePolicy,
    Thresholds,
    pack_archive,
    read_manifest,
    write_bundle,
)
from tests.onnx_models import conv_relu_model

ONNX_BYTES = conv_relu_model().SerializeToString()


def manifest_dict(onnx_bytes: bytes = ONNX_BYTES) -> dict:
    """A valid manifest as the JSON a file would hold."""
    return {
        "name": "tiny-conv",
        "version": "2.1",
        "task": "detect",
        "input": {"name": "image", "layout": "NCHW",
                  "size": {"mode": "fixed", "height": 64, "width": 96}},
        "preprocess": {"color": "rgb", "scale": 1.0 / 255.0, "resize": "letterbox"},
        "outputs": {"predictions": "features"},
        "labels": ["person", "cup"],
        "thresholds": {"score": 0.3, "iou": 0.5, "max_detections": 10},
        "onnx": {"file": "model.onnx", "sha256": hashlib.sha256(onnx_bytes).hexdigest()},
    }


def make_manifest(**updates) -> Manifest:
    return Manifest.model_validate({**manifest_dict(), **updates})


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return write_bundle(tmp_path / "tiny-conv", make_manifest(), ONNX_BYTES)


# -- manifest validation ----------------------------------------------------------------


def test_valid_manifest_keeps_every_field():
    manifest = make_manifest()
    assert manifest.input.size == SizePolicy(mode="fixed", height=64, width=96)
    assert manifest.labels == ("person", "cup")
    assert manifest.thresholds == Thresholds(score=0.3, iou=0.5, max_detections=10)
    assert manifest.preprocess.mean == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("updates", "field"),
    [
        ({"name": "has space"}, "name"),
        ({"name": "../escape"}, "name"),
        ({"version": ""}, "version"),
        ({"task": "depth"}, "task"),
        ({"unexpected": 1}, "unexpected"),
        ({"onnx": {"file": "model.onnx", "sha256": "abc"}}, "sha256"),
        ({"onnx": {"file": "../model.onnx", "sha256": "0" * 64}}, "file"),
        ({"onnx": {"file": "/etc/model.onnx", "sha256": "0" * 64}}, "file"),
        ({"input": {"name": "image", "size": {"mode": "fixed", "height": 64}}}, "fixed"),
        ({"input": {"name": "image", "size": {"mode": "dynamic", "multiple_of": 0}}},
         "multiple_of"),
        ({"input": {"name": "image", "layout": "CHW", "size": {"mode": "dynamic"}}}, "layout"),
        ({"preprocess": {"color": "gray"}}, "mean\n.*expected 1, one per channel"),
        ({"preprocess": {"std": [1.0, 0.0, 1.0]}}, "non-zero"),
        ({"thresholds": {"score": 1.5}}, "score"),
        ({"thresholds": {"max_detections": 0}}, "max_detections"),
    ],
)
def test_invalid_manifest_is_rejected_naming_the_problem(updates, field):
    with pytest.raises(ValidationError, match=field):
        make_manifest(**updates)


def test_manifest_is_frozen():
    manifest = make_manifest()
    with pytest.raises(ValidationError):
        manifest.name = "other"  # type: ignore[misc]


def test_gray_preprocess_takes_one_mean_and_std():
    pre = Preprocess(color="gray", mean=(0.5,), std=(0.25,))
    assert pre.mean == (0.5,) and pre.std == (0.25,)


def test_invalid_manifest_file_gives_bundle_error_with_the_field(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest_dict(), "task": "depth"}))
    with pytest.raises(BundleError, match=r"invalid manifest(.|\n)*task"):
        read_manifest(tmp_path)


def test_manifest_that_is_not_json_gives_bundle_error(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_directory_without_manifest_is_not_a_bundle(tmp_path):
    (tmp_path / "model.onnx").write_bytes(ONNX_BYTES)
    with pytest.raises(BundleError, match=f"not a bundle: {MANIFEST_NAME} is missing"):
        Bundle.load(tmp_path)


def test_missing_path_gives_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="no bundle at"):
        Bundle.load(tmp_path / "nowhere")


# -- directories --------------------------------------------------------------------------


def test_written_bundle_loads_back_identical(bundle):
    loaded = Bundle.load(bundle.directory)
    assert loaded.manifest == bundle.manifest
    assert loaded.onnx_path.read_bytes() == ONNX_BYTES
    assert (loaded.name, loaded.version) == ("tiny-conv", "2.1")


def test_write_bundle_replaces_an_old_bundle_and_leaves_no_staging(bundle, tmp_path):
    other = conv_relu_model(unused_initializer=True).SerializeToString()
    manifest = Manifest.model_validate({**manifest_dict(other), "version": "3"})
    write_bundle(bundle.directory, manifest, other)
    loaded = Bundle.load(bundle.directory)
    assert loaded.version == "3" and loaded.onnx_path.read_bytes() == other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-conv"]


def test_write_bundle_can_be_told_not_to_replace_an_existing_bundle(bundle):
    other = conv_relu_model(unused_initializer=True).SerializeToString()
    manifest = Manifest.model_validate({**manifest_dict(other), "version": "3"})
    with pytest.raises(BundleError, match="already holds the bundle tiny-conv@2.1"):
        write_bundle(bundle.directory, manifest, other, replace=False)
    assert Bundle.load(bundle.directory).version == "2.1"


def test_write_bundle_never_replaces_a_directory_that_is_not_a_bundle(tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(BundleError, match="is not a bundle"):
        write_bundle(precious, make_manifest(), ONNX_BYTES)
    assert (precious / "todo.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_write_bundle_fills_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    assert Bundle.load(write_bundle(tmp_path / "empty", make_manifest(), ONNX_BYTES)
                       .directory).version == "2.1"


def test_replacing_a_bundle_exchanges_the_directories_in_one_step(bundle, monkeypatch):
    # Where renameat2 can exchange, the path never lacks a bundle: no fallback rename runs.
    renames = []
    real_replace = bundle_module.os.replace
    monkeypatch.setattr(bundle_module.os, "replace",
                        lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    other = conv_relu_model(unused_initializer=True).SerializeToString()
    write_bundle(bundle.directory, Manifest.model_validate({**manifest_dict(other),
                                                            "version": "4"}), other)
    assert Bundle.load(bundle.directory).version == "4"
    assert sorted(p.name for p in bundle.directory.parent.iterdir()) == ["tiny-conv"]
    if renames:
        pytest.skip("this filesystem cannot exchange directories; the two-rename fallback ran")


def test_manifest_without_resize_to_source_is_written_without_the_key(bundle):
    # Daemons older than the option refuse unknown manifest keys: bundles that do not use it
    # must stay readable by them.
    assert "resize_to_source" not in (bundle.directory / MANIFEST_NAME).read_text()
    raw = make_manifest(task="raw", outputs={}, resize_to_source=["features"])
    assert raw.model_dump()["resize_to_source"] == ("features",)


@pytest.mark.parametrize(("updates", "match"), [
    ({"resize_to_source": ["features"]}, "only raw outputs are resized back"),
    ({"task": "raw", "outputs": {"map": "features"}, "resize_to_source": ["other"]},
     r"expected names among the outputs the bundle returns \(\['features'\]\)"),
])
def test_resize_to_source_is_refused_where_it_cannot_apply(updates, match):
    with pytest.raises(ValidationError, match=match):
        make_manifest(**updates)


def test_write_bundle_refuses_bytes_that_do_not_match_the_manifest(tmp_path):
    with pytest.raises(BundleError, match="sha256 does not match"):
        write_bundle(tmp_path / "b", make_manifest(), ONNX_BYTES + b"\0")
    assert not (tmp_path / "b").exists()


def test_modified_onnx_file_fails_the_sha256_check_with_advice(bundle):
    data = bytearray(ONNX_BYTES)
    data[-1] ^= 0xFF
    bundle.onnx_path.write_bytes(bytes(data))
    with pytest.raises(BundleError) as caught:
        Bundle.load(bundle.directory)
    message = str(caught.value)
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert bundle.manifest.onnx.sha256 in message
    assert "re-create or re-download" in message


def test_missing_onnx_file_is_named(bundle):
    bundle.onnx_path.unlink()
    with pytest.raises(BundleError, match="'model.onnx', which is missing"):
        Bundle.load(bundle.directory)


def test_manifest_cannot_make_write_bundle_write_outside_the_bundle(tmp_path):
    data = manifest_dict()
    data["onnx"]["file"] = "../outside.onnx"
    with pytest.raises(ValidationError):
        Manifest.model_validate(data)


# -- archives -----------------------------------------------------------------------------


def test_archive_round_trip_gives_the_same_bundle(bundle, tmp_path):
    archive = pack_archive(bundle, tmp_path / "tiny-conv-2.1.sightline")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [MANIFEST_NAME, "model.onnx"]
    root = tmp_path / "unpacked"
    loaded = Bundle.load(archive, unpack_root=root)
    assert loaded.manifest == bundle.manifest
    assert loaded.onnx_path.read_bytes() == ONNX_BYTES
    # Unpacked once, into a directory named by the archive's sha256, reused after.
    assert loaded.directory == root / bundle_module.sha256_file(archive)
    assert Bundle.load(archive, unpack_root=root).directory == loaded.directory
    assert [p.name for p in root.iterdir()] == [loaded.directory.name]
    assert not list(tmp_path.glob("*.part"))


def _archive(path: Path, *members: tarfile.TarInfo, with_manifest: bool = True) -> Path:
    """A gzip tar holding a valid bundle's two files (optionally) plus hostile members."""
    with tarfile.open(path, "w:gz") as tar:
        if with_manifest:
            for name, data in ((MANIFEST_NAME, json.dumps(manifest_dict()).encode()),
                               ("model.onnx", ONNX_BYTES)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for member in members:
            payload = b"pwned" if member.isfile() else b""
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload) if payload else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member("../escaped.txt"),
        _member("../../escaped.txt"),
        _member("/tmp/sightline-absolute-escape.txt"),
        _member("sub/model.onnx"),
        _member("..\\escaped.txt"),
        _member("link", tarfile.SYMTYPE, "/etc/passwd"),
        _member("hardlink", tarfile.LNKTYPE, MANIFEST_NAME),
        _member("folder", tarfile.DIRTYPE),
        _member("fifo", tarfile.FIFOTYPE),
    ],
    ids=["parent", "grandparent", "absolute", "subdir", "backslash", "symlink", "hardlink",
         "directory", "fifo"],
)
def test_hostile_archive_member_is_refused_and_nothing_is_written(tmp_path, member):
    archive = _archive(tmp_path / "evil.sightline", member)
    root = tmp_path / "cache" / "bundles"
    with pytest.raises(BundleError, match=r"refusing archive member .*plain files"):
        Bundle.load(archive, unpack_root=root)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "cache" / "escaped.txt").exists()
    assert not Path("/tmp/sightline-absolute-escape.txt").exists()
    assert list(root.iterdir()) == []  # staging removed, nothing cached


def test_archive_over_the_size_limit_is_refused(bundle, tmp_path, monkeypatch):
    archive = pack_archive(bundle, tmp_path / "big.sightline")
    monkeypatch.setattr(bundle_module, "MAX_UNPACKED_BYTES", len(ONNX_BYTES) // 2)
    with pytest.raises(BundleError, match="unpacks to more than"):
        Bundle.load(archive, unpack_root=tmp_path / "root")


def test_file_that_is_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "model.sightline"
    path.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(BundleError, match="neither a bundle directory nor a bundle archive"):
        Bundle.load(path, unpack_root=tmp_path / "root")


def test_truncated_archive_gives_bundle_error(bundle, tmp_path):
    archive = pack_archive(bundle, tmp_path / "whole.sightline")
    truncated = tmp_path / "cut.sightline"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    root = tmp_path / "root"
    with pytest.raises(BundleError, match="damaged"):
        Bundle.load(truncated, unpack_root=root)
    assert list(root.iterdir()) == []


def test_archive_without_manifest_is_refused_every_time(tmp_path):
    archive = _archive(tmp_path / "bare.sightline", _member("model.onnx"), with_manifest=False)
    root = tmp_path / "root"
    for _ in range(2):  # the first refusal must not leave a half bundle behind
        with pytest.raises(BundleError, match=f"holds no {MANIFEST_NAME}"):
            Bundle.load(archive, unpack_root=root)
    assert list(root.iterdir()) == []


def test_archive_with_a_corrupted_model_fails_the_sha256_check(tmp_path):
    with tarfile.open(tmp_path / "bad.sightline", "w:gz") as tar:
        for name, data in ((MANIFEST_NAME, json.dumps(manifest_dict()).encode()),
                           ("model.onnx", ONNX_BYTES[:-1])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match="does not match the manifest"):
        Bundle.load(tmp_path / "bad.sightline", unpack_root=tmp_path / "root")


def test_onnx_file_spec_defaults_to_model_onnx():
    assert OnnxFile(sha256="a" * 64).file == "model.onnx"
    assert InputSpec(name="x", size=SizePolicy(mode="dynamic")).layout == "NCHW"

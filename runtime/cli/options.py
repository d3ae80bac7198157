"""Option parsing the command modules share: sizes, number lists, the bundle flags."""

from __future__ import annotations

from pathlib import Path

import click


class ShownDefault(click.Option):
    """An option whose help shows a default that is not a plain value: each task's (read
    from exporters.onnx_import.TASK_DEFAULTS only when the help is drawn, so listing the
    commands imports nothing heavy), or a phrase like "dynamic spatial dims"."""

    def __init__(self, *args, default_text=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.default_text = default_text  # str, or a callable giving it

    def get_help_record(self, ctx: click.Context):
        record = super().get_help_record(ctx)
        if record is None or self.default_text is None:
            return record
        text = self.default_text() if callable(self.default_text) else self.default_text
        decls, help_text = record
        # click puts extras in one trailing bracket ("[0<=x<=255]"): the default goes first.
        if help_text.endswith("]") and "  [" in help_text:
            head, _, extras = help_text.rpartition("  [")
            return decls, f"{head}  [default: {text}; {extras}"
        return decls, f"{help_text}  [default: {text}]".strip()


def task_default(field: str):
    return lambda: task_default_text(field)


def task_default_text(field: str) -> str:
    """"face: 1; detect, raw: 1/255": each task's default for one field, equal ones merged."""
    from exporters.onnx_import import TASK_DEFAULTS

    by_value: dict[str, list[str]] = {}
    for task, defaults in TASK_DEFAULTS.items():
        value = defaults
        for part in field.split("."):
            value = getattr(value, part) if not isinstance(value, dict) else value[part]
        text = _shown(field, value)
        if field == "labels" and task == "detect" and not value:
            text = "class0, class1, ... (one per class the model outputs)"
        by_value.setdefault(text, []).append(task)
    if len(by_value) == 1:
        return next(iter(by_value))
    return "; ".join(f"{', '.join(tasks)}: {text}" for text, tasks in by_value.items())


def _shown(field: str, value) -> str:
    if isinstance(value, float):
        return "1/255" if abs(value - 1 / 255) < 1e-12 else f"{value:g}"
    if isinstance(value, tuple):
        if field == "labels":
            return ",".join(value) if value else "none"
        gray = "0" if field.endswith("mean") else "1"
        return ",".join(f"{v:g}" for v in value) + f" (gray: {gray})"
    return str(value)


# (param decls, click kwargs, TASK_DEFAULTS field the default comes from)
_BUNDLE_FLAGS = (
    (("--color",), dict(type=click.Choice(["rgb", "bgr", "gray"]),
                        help="Model's channel order."), "preprocess.color"),
    (("--scale",), dict(type=float, help="Pixel multiplier (e.g. 0.00392 for /255)."),
     "preprocess.scale"),
    (("--mean",), dict(help="Per-channel mean after scaling, comma-separated."),
     "preprocess.mean"),
    (("--std",), dict(help="Per-channel std after scaling, comma-separated."), "preprocess.std"),
    (("--resize",), dict(type=click.Choice(["stretch", "letterbox"])), "preprocess.resize"),
    (("--labels",), dict(type=click.Path(exists=True, dir_okay=False, path_type=Path),
                         help="Text file, one class label per line."), "labels"),
    (("--score",), dict(type=float, help="Score threshold."), "thresholds.score"),
    (("--iou",), dict(type=float, help="NMS IoU threshold."), "thresholds.iou"),
    (("--output", "outputs"), dict(multiple=True, metavar="ROLE=NAME",
                                   help="Map a decoder role to an output tensor (e.g. "
                                        "heatmap=537)."), None),
)
# Flags only `import` has (export's help is unchanged).
IMPORT_FLAGS = (
    click.option("--pad-value", type=click.IntRange(0, 255), cls=ShownDefault,
                 default_text=task_default("preprocess.pad_value"),
                 help="Letterbox border value, a pixel value 0-255 before scaling."),
    click.option("--resize-to-source", "resize_to_source", multiple=True, metavar="OUTPUT",
                 cls=ShownDefault,
                 default_text="none, tensors come in model-input geometry",
                 help="Raw task: the daemon crops this (..., H, W) output to the letterboxed "
                      "content and resizes it to the frame's size; repeat for several."),
    click.option("--force", is_flag=True,
                 help="Replace a bundle already at --out (swapped in atomically)."),
)


def bundle_flags(command=None, *, show_defaults: bool = False):
    """The preprocessing/decoding flags `import` and `export` share (bundles._bundle_options);
    `show_defaults` adds each task's default to the help (import)."""
    def apply(command):
        for decls, kwargs, field in reversed(_BUNDLE_FLAGS):
            if show_defaults:
                kwargs = dict(kwargs, cls=ShownDefault, default_text=(
                    task_default(field) if field is not None else
                    "face: by channel count; detect: the only output; raw: every output"))
            command = click.option(*decls, **kwargs)(command)
        return command

    return apply(command) if command is not None else apply


def import_flags(command):
    for option in reversed(IMPORT_FLAGS):
        command = option(command)
    return command


def bundle_output_flags(name_default: str):
    """--task, --name, --version, --out, --archive: what a new bundle is and where it goes."""
    flags = (
        click.option("--task", required=True, type=click.Choice(
            ["face", "detect", "raw", "classify", "segment", "landmarks", "ssd"]),
                     help="How outputs are decoded (docs/protocol.md §5)."),
        click.option("--name", help=f"Bundle name (default: {name_default})."),
        click.option("--version", "version", default="1", show_default=True),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                     help="Bundle directory to write (default: ./NAME)."),
        click.option("--archive", is_flag=True,
                     help="Also write NAME-VERSION.sightline for shipping."),
    )

    def apply(command):
        for option in reversed(flags):
            command = option(command)
        return command

    return apply


def dynamic_size_flags(command):
    """--multiple-of and --max-size: the limits of a dynamic input size."""
    command = click.option("--max-size", metavar="WxH", default="1920x1088", show_default=True,
                           help="Dynamic size: larger frames are scaled down to fit.")(command)
    return click.option("--multiple-of", type=int, default=32, show_default=True,
                        help="Dynamic size: input dims are rounded up to this.")(command)


def parse_size(text: str, option: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
        return width, height
    except ValueError:
        raise click.BadParameter(f"expected WxH like 640x480, got {text!r}",
                                 param_hint=option) from None


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}",
                                 param_hint=option) from None


"""Option parsing the command modules share: sizes, number lists, the bundle flags."""

from __future__ import annotations

from pathlib import Path

import click

BUNDLE_FLAGS = (
    click.option("--color", type=click.Choice(["rgb", "bgr", "gray"]),
                 help="Model's channel order."),
    click.option("--scale", type=float, help="Pixel multiplier (e.g. 0.00392 for /255)."),
    click.option("--mean", help="Per-channel mean after scaling, comma-separated."),
    click.option("--std", help="Per-channel std after scaling, comma-separated."),
    click.option("--resize", type=click.Choice(["stretch", "letterbox"])),
    click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="Text file, one class label per line."),
    click.option("--score", type=float, help="Score threshold."),
    click.option("--iou", type=float, help="NMS IoU threshold."),
    click.option("--output", "outputs", multiple=True, metavar="ROLE=NAME",
                 help="Map a decoder role to an output tensor (e.g. heatmap=537)."),
)


def bundle_flags(command):
    """The preprocessing/decoding flags `import` and `export` share (bundles._bundle_options)."""
    for option in reversed(BUNDLE_FLAGS):
        command = option(command)
    return command


def bundle_output_flags(name_default: str):
    """--task, --name, --version, --out, --archive: what a new bundle is and where it goes."""
    flags = (
        click.option("--task", required=True, type=click.Choice(["face", "detect", "raw"]),
                     help="How outputs are decoded."),
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


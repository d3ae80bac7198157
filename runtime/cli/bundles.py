"""Bundle commands: `import` (ONNX file), `export` (PyTorch), `info`, `fetch`."""

from __future__ import annotations

from pathlib import Path

import click

from runtime.cli.console import err_console
from runtime.cli.options import (
    ShownDefault,
    bundle_flags,
    bundle_output_flags,
    dynamic_size_flags,
    import_flags,
    parse_floats,
    parse_size,
)
from runtime.errors import BundleError, ConfigError, describe_validation


@click.command("import")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@bundle_output_flags("the file's stem")
@click.option("--fixed-size", metavar="WxH", cls=ShownDefault, default_text="dynamic spatial dims",
              help="Keep a fixed input size (e.g. 640x640) instead of dynamic spatial dims.")
@dynamic_size_flags
@click.option("--fixed-height", type=click.IntRange(min=1), metavar="H",
              help="Dynamic size with this fixed height; the width follows the frame's aspect "
                   "(a multiple of --multiple-of, up to --max-size's width).")
@click.option("--fixed-width", type=click.IntRange(min=1), metavar="W",
              help="Dynamic size with this fixed width; the height follows the frame's aspect.")
@click.option("--upscale", is_flag=True,
              help="Dynamic size: scale frames smaller than --max-size up to it (small crops).")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), cls=ShownDefault,
              default_text="what the input's shape shows (NHWC for .tflite)")
@click.option("--skeleton", metavar="A-B,...",
              help="Task landmarks: point pairs the overlay joins, e.g. 0-1,1-2,2-3.")
@bundle_flags(show_defaults=True)
@import_flags
def import_model(model, task, name, version, out, archive, fixed_size, multiple_of, max_size,
                 fixed_height, fixed_width, upscale, layout, skeleton, color, scale, mean, std,
                 resize, labels, score, iou, outputs, pad_value, resize_to_source,
                 force) -> None:
    """Make a verified bundle from a third-party ONNX or TFLite file, repairing common
    defects (a .tflite model is translated to ONNX first and keeps its fixed input size).

    Defaults that depend on --task are shown per task. An existing bundle at --out is
    replaced only with --force.
    """
    from exporters.onnx_import import import_onnx
    from runtime.models.bundle import SizePolicy, existing_bundle

    name = name or model.stem
    out = out or Path(name)
    existing = existing_bundle(out)  # before the slow part: say it now, not after a minute
    if existing is not None and not force:
        raise BundleError(f"--out {out} already holds the bundle {existing}; add --force to "
                          "replace it (a daemon serving it keeps its loaded copy until it "
                          "restarts or is updated)")
    if fixed_size and (fixed_height or fixed_width):
        raise click.BadParameter("give either --fixed-size or one of --fixed-height and "
                                 "--fixed-width", param_hint="--fixed-size")
    if fixed_height and fixed_width:
        raise click.BadParameter("fixing both axes is --fixed-size WxH",
                                 param_hint="--fixed-height")
    tflite_default = (model.suffix.lower() == ".tflite" and not fixed_size
                      and not (fixed_height or fixed_width or upscale))
    if fixed_size:
        width, height = parse_size(fixed_size, "--fixed-size")
        size = SizePolicy(mode="fixed", width=width, height=height)
    elif tflite_default or (_only_defaults(multiple_of, max_size)
                            and not (fixed_height or fixed_width or upscale)):
        size = None  # the file's own size: fixed for .tflite, an axis fixed in it stays so
    else:
        max_w, max_h = parse_size(max_size, "--max-size")
        size = SizePolicy(mode="dynamic", multiple_of=multiple_of, max_width=max_w,
                          max_height=max_h, height=fixed_height, width=fixed_width,
                          upscale=upscale)
    options = _bundle_options(task, name, version, not (fixed_size or tflite_default), size,
                              color, scale, mean, std, resize, labels, score, iou, outputs,
                              layout=layout, pad_value=pad_value,
                              resize_to_source=resize_to_source)
    options.skeleton = _skeleton(skeleton)
    with err_console.status(f"importing {model.name}: repairing, checking, test-running ..."):
        result = import_onnx(model, options, out, replace=force)
    for repair in result.repairs:
        click.echo(f"  repaired: {repair}")
    bundle = result.bundle
    click.echo(f"bundle {bundle.name}@{bundle.version} ({task}) written to {bundle.directory}")
    if archive:
        _write_archive(bundle)


def _only_defaults(multiple_of: int, max_size: str) -> bool:
    return multiple_of == 32 and max_size.lower() == "1920x1088"


def _skeleton(text: str | None) -> tuple[tuple[int, int], ...]:
    if not text:
        return ()
    try:
        return tuple((int(a), int(b)) for a, b in (pair.split("-") for pair in text.split(",")))
    except ValueError:
        raise click.BadParameter(f"expected pairs like 0-1,1-2, got {text!r}",
                                 param_hint="--skeleton") from None


# Manifest fields -> the flags that set them, so a validation error names what was typed.
FLAG_NAMES = {"color": "--color", "scale": "--scale", "mean": "--mean", "std": "--std",
              "resize": "--resize", "pad_value": "--pad-value", "score": "--score",
              "iou": "--iou", "name": "--name", "version": "--version",
              "resize_to_source": "--resize-to-source"}


def _bundle_options(task, name, version, dynamic, size, color, scale, mean, std, resize,
                    labels, score, iou, outputs, layout=None, pad_value=None,
                    resize_to_source=()):
    """ImportOptions from the bundle flags `import` and `export` share."""
    from exporters.onnx_import import TASK_DEFAULTS, ImportOptions

    defaults = TASK_DEFAULTS[task]
    pre_updates = {k: v for k, v in dict(
        color=color, scale=scale, resize=resize, pad_value=pad_value,
        mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std")).items() if v is not None}
    if color == "gray":
        pre_updates.setdefault("mean", (0.0,))
        pre_updates.setdefault("std", (1.0,))
    th_updates = {k: v for k, v in dict(score=score, iou=iou).items() if v is not None}
    try:
        role_map = dict(o.split("=", 1) for o in outputs)
    except ValueError:
        raise click.BadParameter("use ROLE=NAME", param_hint="--output") from None
    label_list = None
    if labels:
        label_list = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
    return ImportOptions(
        task=task, name=name, version=version, dynamic=dynamic, size=size, layout=layout,
        preprocess=_validated(defaults["preprocess"], pre_updates),
        thresholds=_validated(defaults["thresholds"], th_updates),
        labels=label_list, outputs=role_map, resize_to_source=tuple(resize_to_source))


def _validated(model, updates):
    from pydantic import ValidationError

    try:
        return model.model_validate({**model.model_dump(), **updates})
    except ValidationError as exc:
        raise ConfigError(describe_validation(exc, FLAG_NAMES, type(model))) from None


@click.command()
@click.argument("bundle")
def info(bundle: str) -> None:
    """Verify a bundle (directory, archive or 'centerface') and print its manifest."""
    from exporters.zoo import resolve_bundle

    loaded = resolve_bundle(bundle)
    click.echo(f"# {loaded.directory} (sha256 verified)")
    click.echo(loaded.manifest.model_dump_json(indent=2))


@click.command()
def fetch() -> None:
    """Download (once) and verify the default CenterFace model; print its bundle path."""
    from exporters.zoo import default_bundle

    click.echo(default_bundle().directory)


@click.command("export")
@click.argument("model")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="State dict (torch.save(model.state_dict())) for a factory-built model.")
@bundle_output_flags("the factory's name or the file's stem")
@click.option("--input-size", default="640x640", show_default=True, metavar="WxH",
              help="Input size to trace and verify at (3 channels, NCHW).")
@click.option("--static", is_flag=True,
              help="Freeze the spatial dims at --input-size (the batch dim stays free).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option("--simplify", is_flag=True,
              help="Simplify the graph (onnxsim, else ONNX Runtime's basic optimisation); "
                   "the result is verified too.")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="Verification: absolute tolerance.")
@click.option("--rtol", type=float, default=1e-3, show_default=True,
              help="Verification: relative tolerance (|onnx - torch| <= atol + rtol*|torch|).")
@click.option("--samples", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory of images to verify with (first 8; default: the astronaut photo).")
@dynamic_size_flags
@bundle_flags()
def export_model(model, weights, task, name, version, out, archive, input_size, static, opset,
                 simplify, atol, rtol, samples, multiple_of, max_size, color, scale, mean, std,
                 resize, labels, score, iou, outputs) -> None:
    """Export a PyTorch model to a verified bundle.

    \b
    MODEL is package.module:factory, path/to/file.py:factory (a callable returning a
    torch.nn.Module, or the module itself), or a TorchScript file (.pt, .ts).
    Needs the export extra: pip install 'sightline[export]'.
    """
    import time

    from exporters.torch_export import (
        ExportOptions,
        VerificationError,
        default_name,
        export_torch,
        verification_table,
    )
    from runtime.models.bundle import SizePolicy

    name = name or default_name(model)
    width, height = parse_size(input_size, "--input-size")
    size = None
    if not static:
        max_w, max_h = parse_size(max_size, "--max-size")
        size = SizePolicy(mode="dynamic", multiple_of=multiple_of, max_width=max_w,
                          max_height=max_h)
    options = ExportOptions(
        model=model,
        weights=weights,
        input_size=(width, height),
        dynamic=not static,
        opset=opset,
        simplify=simplify,
        atol=atol,
        rtol=rtol,
        samples=samples,
        bundle=_bundle_options(task, name, version, not static, size, color, scale, mean, std,
                               resize, labels, score, iou, outputs),
    )
    running: list[tuple[str, float]] = []  # the step under way and when it started

    with err_console.status(f"exporting {model} ...") as status:
        def on_step(step: str) -> None:
            if running:
                previous, started = running.pop()
                err_console.print(f"  [green]ok[/] {previous} "
                                  f"({time.perf_counter() - started:.1f} s)", highlight=False)
            if step:
                running.append((step, time.perf_counter()))
                status.update(f"{step} ...")

        try:
            result = export_torch(options, out or Path(name), on_step=on_step)
        except VerificationError as exc:
            err_console.print(verification_table(exc.verification))
            raise
    # Without --simplify the bundled graph is the exported one plus metadata: one table.
    for verification in result.verifications[0 if simplify else -1:]:
        err_console.print(verification_table(verification))
    for repair in result.repairs:
        click.echo(f"  repaired: {repair}")
    bundle = result.bundle
    total = sum(seconds for _, seconds in result.timings)
    click.echo(f"bundle {bundle.name}@{bundle.version} ({task}) written to {bundle.directory} "
               f"in {total:.1f} s ({result.exporter}"
               f"{', ' + result.simplifier if result.simplifier else ''})")
    if archive:
        _write_archive(bundle)


def _write_archive(bundle) -> None:
    from runtime.models.bundle import pack_archive

    name = f"{bundle.name}-{bundle.version}.sightline"
    path = pack_archive(bundle, bundle.directory.parent / name)
    click.echo(f"archive written to {path}")

"""Precision variants and engines: `quantize`, `compile` (TensorRT) and `compare`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from runtime.cli.console import err_console
from runtime.cli.options import parse_size
from runtime.errors import SightlineError


@click.command()
@click.argument("bundle")
@click.option("--precision", required=True, type=click.Choice(["fp16", "int8"]),
              help="fp16: mixed precision with float32 I/O; int8: symmetric Q/DQ, calibrated.")
@click.option("--calib", "calib_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder of .jpg/.png frames like the ones the model will see: INT8 "
                   "calibration data, and the check images unless --eval is given.")
@click.option("--eval", "eval_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of .jpg/.png frames to check the variant on, instead of --calib.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Variant bundle directory (default: beside the bundle directory, suffixed "
                   "-fp16 / -int8, where `serve` and `compare` look for variants).")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Latency samples per model, FP32 and variant interleaved.")
@click.option("--min-recall", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Detectors: refuse a variant that finds fewer of FP32's detections.")
def quantize(bundle, precision, calib_dir, eval_dir, out, runs, min_recall) -> None:
    """Write an FP16 or INT8 variant of a bundle and check it against FP32.

    The variant is a new bundle (same name and version, manifest precision set) whose graph
    carries its precision (casts or Q/DQ nodes), for ONNX Runtime and strongly typed
    TensorRT engines. Accuracy and speed against FP32, measured with ONNX Runtime on this
    machine, are printed and written to quantization-report.json in the variant.
    """
    from exporters.quantize import REPORT_NAME, quantize_bundle, report_tables
    from exporters.zoo import resolve_bundle
    from runtime.models.bundle import variant_path

    source = resolve_bundle(bundle)
    out = out or variant_path(source, precision)
    result = quantize_bundle(source, precision, calib_dir, out, eval_dir=eval_dir, runs=runs,
                             min_recall=min_recall, console=err_console)
    console = Console()
    for table in report_tables(result.report):
        console.print(table)
    click.echo(f"{precision} variant of {source.name}@{source.version} written to "
               f"{result.bundle.directory} (report: {REPORT_NAME})")


@click.command("compile")
@click.argument("bundle")
@click.option("--dla", "dla_core", type=int, help="Build for this DLA core (Jetson), GPU fallback.")
@click.option("--workspace", "workspace_mb", type=int,
              help="TensorRT builder workspace, MB (default: the device profile's).")
@click.option("--frame-size", default="640x480", show_default=True, metavar="WxH",
              help="Frame size the dynamic-shape profile is optimised for.")
@click.option("--force", is_flag=True, help="Rebuild even if the engine cache has it.")
def compile_command(bundle: str, dla_core, workspace_mb, frame_size, force) -> None:
    """Compile a bundle's ONNX to a TensorRT engine for this GPU (cached per device)."""
    from devices.platform import detect_platform
    from devices.profiles import profile_for
    from exporters.tensorrt_build import CompileOptions, compile_bundle
    from exporters.zoo import resolve_bundle
    from runtime.models.assets import cache_dir
    from runtime.models.engine_cache import EngineCache

    profile = profile_for(detect_platform())
    if dla_core is not None and dla_core >= profile.dla_cores:
        raise SightlineError(f"--dla {dla_core}: this device ({profile.name}) has "
                             f"{profile.dla_cores} DLA core(s)")
    loaded = resolve_bundle(bundle)
    options = CompileOptions(workspace_mb=workspace_mb or profile.workspace_mb or 1024,
                             dla_core=dla_core,
                             frame_size=parse_size(frame_size, "--frame-size"), force=force)
    record = compile_bundle(loaded, EngineCache(cache_dir() / "engines"), options,
                            console=err_console)
    target = record.key.target
    click.echo(f"engine for {loaded.name}@{loaded.version} ({record.key.precision}) on "
               f"{target.gpu_name} {target.compute_capability}, TensorRT "
               f"{target.tensorrt_version}: {record.path}")


@click.command()
@click.argument("bundle")
@click.option("--variant", "variants", multiple=True, metavar="BUNDLE",
              help="Extra bundle variants (default: BUNDLE-fp16 and BUNDLE-int8 beside it).")
@click.option("--inputs", type=int, default=4, show_default=True)
@click.option("--repeats", type=int, default=20, show_default=True)
def compare(bundle: str, variants, inputs: int, repeats: int) -> None:
    """Run a bundle and its variants through every backend here; errors and latency."""
    from exporters.zoo import resolve_bundle
    from runtime.models.bundle import Bundle
    from runtime.tools.compare import compare as run_compare
    from runtime.tools.compare import find_variants

    loaded = resolve_bundle(bundle)
    extra = [Bundle.load(v) for v in variants] if variants else find_variants(loaded)
    run_compare(loaded, extra, inputs=inputs, repeats=repeats)


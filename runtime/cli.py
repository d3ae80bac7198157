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
    from runtime.journal import configure_logging

    configure_logging(log_level)  # structured journald records under systemd, else stderr


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
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False),
              help="Key directory: daemon.key_secret and headsets/ (see `sightline keys`).")
@click.option("--plain", is_flag=True,
              help="DEVELOPMENT ONLY: no encryption, no authentication (any process may connect).")
@click.option("--metrics", "metrics_listen", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464).")
@click.option("--control", metavar="ENDPOINT",
              help="Control socket for `sightline status` (default: under $XDG_RUNTIME_DIR "
                   "or /run/sightline).")
@click.option("--broker", metavar="HOST:PORT",
              help="Connect to the fleet's MQTT broker (telemetry, status, OTA updates); "
                   "the [cloud] config table has TLS and the rest.")
@click.option("--device-id", help="This device's id on the broker (with --broker).")
@click.option("--group", "groups", multiple=True,
              help="Fleet group this device belongs to (OTA to a group); repeat for several.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Model store, OTA journal and MQTT outbox (with --broker).")
@click.option("--trusted-key", "trusted_keys", multiple=True,
              type=click.Path(exists=True, path_type=Path),
              help="Operator public key (.ed25519.pub) or directory of them that OTA "
                   "updates must be signed with; repeat for several.")
def serve(config_path, endpoints, models, providers, threads, deadline_ms, keys_dir,
          plain, metrics_listen, control, broker, device_id, groups, state_dir,
          trusted_keys) -> None:
    """Run the frame daemon until SIGINT/SIGTERM.

    The headset link is encrypted and authenticated with CurveZMQ: only headsets enrolled
    with `sightline keys headset NAME` may connect.
    """
    from runtime.bundle import preferred_variant
    from runtime.config import apply_device_profile, load_config
    from runtime.control import ControlServer, default_control_endpoint
    from runtime.model_zoo import resolve_bundle
    from runtime.server import Server
    from runtime.service import Watchdog, notify_ready, notify_stopping
    from runtime.status import DaemonStatus

    config = load_config(config_path, {
        "server.endpoints": list(endpoints) or None,
        "models": list(models) or None,
        "engine.providers": providers.split(",") if providers else None,
        "engine.intra_op_threads": threads,
        "server.deadline_ms": deadline_ms,
        "security.keys_dir": keys_dir,
        "security.mode": "plain" if plain else None,
        "server.metrics_listen": metrics_listen,
    })
    config = _with_cloud_flags(config, broker, device_id, groups, state_dir, trusted_keys)
    config, profile = apply_device_profile(config)
    logging.info("device profile %s: prefers %s, backends %s", profile.name, config.precision,
                 "/".join(profile.backends))
    bundles = [preferred_variant(resolve_bundle(ref), config.precision) for ref in config.models]
    cloud = None
    if config.cloud is not None:
        from cloud_sync.agent import CloudSettings
        from runtime.model_store import ModelStore

        cloud = CloudSettings.parse(config.cloud)
        cloud.link_config()  # config errors now, before anything starts
        store = ModelStore(cloud.models_dir, keep_versions=cloud.ota.keep_versions,
                           max_boots=cloud.ota.max_boots)
        boot_events = store.on_boot()  # may roll back a crash-looping update before loading
        # The store's active version wins over the configured bundle once it has one.
        bundles = [store.seed(bundle) for bundle in bundles]
    server = Server(config, bundles)
    try:
        bound = server.bind()
    except OSError as exc:
        server.close()
        raise SightlineError(f"{exc}; is another daemon running there?") from None
    control_endpoint = control or default_control_endpoint()
    status = DaemonStatus(server, control_endpoint)
    control_server = ControlServer(control_endpoint, status)
    try:
        control_server.start()
    except SightlineError:
        server.close()
        raise
    metrics, prometheus = _start_metrics(server, status, config.server.metrics_listen,
                                         always=cloud is not None)
    agent = None
    if cloud is not None:
        from cloud_sync.agent import CloudAgent
        from runtime.model_host import ServerModelHost

        agent = CloudAgent(cloud, store, ServerModelHost(server, config.engine),
                           metrics.collect_snapshot).start(boot_events)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        notify_stopping()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    for name, pipeline in server.pipelines.items():
        logging.info("serving %s@%s (%s, %s)", name, pipeline.bundle.version,
                     pipeline.bundle.manifest.task, pipeline.engine.provider)
    logging.info("listening on %s; control socket %s", ", ".join(bound), control_endpoint)
    print(f"sightline ready on {' '.join(bound)}", flush=True)
    notify_ready(f"serving {', '.join(server.pipelines)} on {' '.join(bound)}")
    try:
        server.serve(stop, watchdog=Watchdog.from_environ())
    finally:
        if agent is not None:
            agent.stop()
        control_server.stop()
        if prometheus is not None:
            prometheus[0].shutdown()
            prometheus[0].server_close()
            prometheus[1].join()
    logging.info("stopped cleanly")


def _with_cloud_flags(config, broker, device_id, groups, state_dir, trusted_keys):
    """The config with the --broker/--device-id/... flags merged into its [cloud] table."""
    if not any((broker, device_id, groups, state_dir, trusted_keys)):
        return config
    cloud = dict(config.cloud or {})
    link = dict(cloud.get("link", {}))
    if broker:
        host, _, port = broker.rpartition(":")
        if not host or not port.isdigit():
            raise SightlineError(f"--broker {broker!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
        link.update(host=host, port=int(port))
    if device_id:
        link["device_id"] = device_id
    if groups:
        link["groups"] = list(groups)
    if state_dir:
        cloud["state_dir"] = str(state_dir)
    if trusted_keys:
        cloud["trusted_keys"] = [str(k) for k in trusted_keys]
    cloud["link"] = link
    missing = [flag for flag, key, table in (("--broker", "host", link),
                                             ("--device-id", "device_id", link),
                                             ("--state-dir", "state_dir", cloud))
               if key not in table]
    if missing:
        raise SightlineError(f"the cloud link also needs {', '.join(missing)} (or the same "
                             "keys in the config's [cloud] table)")
    return config.model_copy(update={"cloud": cloud})


def _start_tegrastats():
    """Jetson GPU/EMC/power figures from `tegrastats`; None elsewhere or when it cannot run."""
    from devices.platform import detect_platform
    from devices.tegrastats import TegrastatsReader

    if not detect_platform().is_jetson:
        return None
    try:
        return TegrastatsReader().start()
    except OSError as exc:
        logging.warning("tegrastats not available (%s); no Jetson GPU figures", exc)
        return None


def _start_metrics(server, status, listen: str | None, always: bool = False):
    """Metrics fed by the pipelines (observe_frame) and the daemon status, and their
    Prometheus endpoint when `listen` is set; (None, None) when neither is wanted."""
    if not listen and not always:
        return None, None
    from devices.host import HostProbe
    from runtime.metrics import Metrics, serve_prometheus

    metrics = Metrics(status=status, host=HostProbe(), tegrastats=_start_tegrastats())
    for pipeline in server.pipelines.values():
        pipeline.metrics = metrics
    if not listen:
        return metrics, None
    host, port = listen.rsplit(":", 1)
    try:
        prometheus = serve_prometheus(metrics, host, int(port))
    except OSError as exc:
        server.close()
        raise SightlineError(f"cannot serve metrics on {listen}: {exc}") from None
    logging.info("Prometheus metrics on http://%s/metrics", listen)
    return metrics, prometheus


_BUNDLE_FLAGS = (
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


def _bundle_flags(command):
    """The preprocessing/decoding flags `import` and `export` share (see _bundle_options)."""
    for option in reversed(_BUNDLE_FLAGS):
        command = option(command)
    return command


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
@_bundle_flags
def import_model(model, task, name, version, out, archive, fixed_size, multiple_of, max_size,
                 layout, color, scale, mean, std, resize, labels, score, iou, outputs) -> None:
    """Make a verified bundle from a third-party ONNX file, repairing common defects."""
    from exporters.onnx_import import import_onnx
    from runtime.bundle import SizePolicy, pack_archive

    name = name or model.stem
    if fixed_size:
        width, height = _parse_size(fixed_size, "--fixed-size")
        size = SizePolicy(mode="fixed", width=width, height=height)
    else:
        max_w, max_h = _parse_size(max_size, "--max-size")
        size = SizePolicy(mode="dynamic", multiple_of=multiple_of, max_width=max_w,
                          max_height=max_h)
    options = _bundle_options(task, name, version, not fixed_size, size, color, scale, mean, std,
                              resize, labels, score, iou, outputs, layout=layout)
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


def _bundle_options(task, name, version, dynamic, size, color, scale, mean, std, resize,
                    labels, score, iou, outputs, layout="NCHW"):
    """ImportOptions from the bundle flags `import` and `export` share."""
    from exporters.onnx_import import TASK_DEFAULTS, ImportOptions

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
    label_list = None
    if labels:
        label_list = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
    return ImportOptions(
        task=task, name=name, version=version, dynamic=dynamic, size=size, layout=layout,
        preprocess=_validated(defaults["preprocess"], pre_updates),
        thresholds=_validated(defaults["thresholds"], th_updates),
        labels=label_list, outputs=role_map)


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
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False),
              help="The daemon's public key file (daemon.key), for a CURVE daemon.")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False),
              help="An enrolled headset's .key_secret file, for a CURVE daemon.")
def ping(endpoint: str, timeout: float, server_key, client_key) -> None:
    """Ask a running daemon which models it serves."""
    from runtime.client import query_info

    try:
        reply = query_info(endpoint, timeout, server_key=server_key, client_key=client_key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if reply is None:
        raise SightlineError(f"no daemon answered at {endpoint} within {timeout} s")
    for model in reply["models"]:
        default = " (default)" if model.get("default") else ""
        click.echo(f"{model['name']}@{model['version']}  {model['task']}  "
                   f"{model['provider']}{default}")


@main.command("stream")
@click.argument("endpoint", default="tcp://127.0.0.1:5555")
@click.option("--seconds", type=float, help="Stop after this long (default: until Ctrl-C).")
@click.option("--fps", type=float, default=30.0, show_default=True)
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False),
              help="The daemon's public key file (daemon.key), for a CURVE daemon.")
@click.option("--client-key", type=click.Path(exists=True, dir_okay=False),
              help="An enrolled headset's .key_secret file, for a CURVE daemon.")
def stream_command(endpoint, seconds, fps, server_key, client_key) -> None:
    """Act as a headset: stream frames to a daemon, print model version changes and any
    frame that did not get a result. Exit status 1 if any frame failed."""
    from runtime.headset_stream import stream

    def stop_on_term(*_: object) -> None:
        raise KeyboardInterrupt  # the summary is printed for SIGTERM too

    signal.signal(signal.SIGTERM, stop_on_term)
    try:
        summary = stream(endpoint, seconds=seconds, fps=fps, server_key=server_key,
                         client_key=client_key, on_event=click.echo)
    except ConnectionError as exc:
        raise SightlineError(str(exc)) from None
    failed = ", ".join(f"{k} {n}" for k, n in summary.not_results.items()) or "none"
    click.echo(f"{summary.sent} frames, {summary.results} results, failed: {failed}; "
               f"versions: {' -> '.join(summary.versions) or '-'}")
    sys.exit(1 if summary.failed else 0)


@main.command()
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
def demo(source, depth, rgbd_dir, frames, out_dir, model, fps) -> None:
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
    from runtime.demo import run_demo

    run_demo(source=source, frames=frames, out_dir=out_dir, model=model, fps=fps, depth=depth,
             rgbd=rgbd_dir)


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


@main.group()
def keys() -> None:
    """CurveZMQ keys for the headset link: the daemon's keypair and enrolled headsets.

    \b
    On the edge device:
      sightline keys daemon              make the daemon's keypair (once)
      sightline keys headset quest-01    make a headset keypair and enrol it
      sightline keys list                enrolled headsets
      sightline keys revoke quest-01     takes effect within a second, no restart
    Give the headset its .key_secret file and the daemon's public daemon.key.
    """


def _keys_dir(directory: str | None) -> Path:
    from runtime.security import keys_dir

    return Path(directory) if directory else keys_dir()


_keys_option = click.option("--keys", "keys_dir", type=click.Path(file_okay=False),
                            help="Key directory (default: $SIGHTLINE_KEYS_DIR or "
                                 "~/.config/sightline/keys).")


@keys.command("daemon")
@_keys_option
def keys_daemon(keys_dir) -> None:
    """Create the daemon's long-term keypair."""
    from runtime.security import DAEMON_KEY_NAME, create_keypair

    public, secret = create_keypair(_keys_dir(keys_dir), DAEMON_KEY_NAME)
    click.echo(f"daemon public key: {public}  (give this file to headsets)")
    click.echo(f"daemon secret key: {secret}  (stays on this device, mode 0600)")


@keys.command("headset")
@click.argument("name")
@_keys_option
@click.option("--out", type=click.Path(file_okay=False), help="Where to write the headset's "
              "keypair (default: KEYS/issued).")
@click.option("--no-enroll", is_flag=True, help="Only create the keypair.")
def keys_headset(name, keys_dir, out, no_enroll) -> None:
    """Create a headset keypair and enrol its public key."""
    from runtime.security import HEADSETS_DIR, create_keypair, enroll

    directory = _keys_dir(keys_dir)
    public, secret = create_keypair(Path(out) if out else directory / "issued", name)
    click.echo(f"headset secret key: {secret}  (install on the headset, keep private)")
    if not no_enroll:
        click.echo(f"enrolled: {enroll(public, directory / HEADSETS_DIR, name)}")


@keys.command("enroll")
@click.argument("certificate", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Name for the headset (default: the file's name).")
@_keys_option
def keys_enroll(certificate, name, keys_dir) -> None:
    """Allow a headset by its public certificate file (NAME.key)."""
    from runtime.security import HEADSETS_DIR, enroll

    click.echo(f"enrolled: {enroll(Path(certificate), _keys_dir(keys_dir) / HEADSETS_DIR, name)}")


@keys.command("revoke")
@click.argument("name")
@_keys_option
def keys_revoke(name, keys_dir) -> None:
    """Remove a headset from the allow-list; a running daemon applies it within a second."""
    from runtime.security import HEADSETS_DIR, revoke

    revoke(name, _keys_dir(keys_dir) / HEADSETS_DIR)
    click.echo(f"revoked {name}")


@keys.command("list")
@_keys_option
def keys_list(keys_dir) -> None:
    """List enrolled headsets and their public keys."""
    from runtime.security import HEADSETS_DIR, enrolled

    headsets = enrolled(_keys_dir(keys_dir) / HEADSETS_DIR)
    if not headsets:
        click.echo("no headsets enrolled")
    for name, public in headsets:
        click.echo(f"{name}  {public}")


@main.command("compile")
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
    from runtime.engine_cache import EngineCache
    from runtime.model_zoo import cache_dir, resolve_bundle

    profile = profile_for(detect_platform())
    if dla_core is not None and dla_core >= profile.dla_cores:
        raise SightlineError(f"--dla {dla_core}: this device ({profile.name}) has "
                             f"{profile.dla_cores} DLA core(s)")
    loaded = resolve_bundle(bundle)
    options = CompileOptions(workspace_mb=workspace_mb or profile.workspace_mb or 1024,
                             dla_core=dla_core,
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
    from runtime.bundle import Bundle
    from runtime.compare import compare as run_compare
    from runtime.compare import find_variants
    from runtime.model_zoo import resolve_bundle

    loaded = resolve_bundle(bundle)
    extra = [Bundle.load(v) for v in variants] if variants else find_variants(loaded)
    run_compare(loaded, extra, inputs=inputs, repeats=repeats)


@main.command("devices")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--profiles", "profiles_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file whose [profiles.<class>] tables override the profile defaults.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              hidden=True, help="Read /etc and /proc under this directory (captured files).")
def devices_command(as_json: bool, profiles_path: Path | None, root: Path) -> None:
    """Show this machine's Jetson/GPU/CPU and the device profile compile and serve use."""
    import json
    from dataclasses import asdict

    from devices.platform import detect_platform
    from devices.profiles import ProfileError, load_overrides, profile_for
    from runtime.errors import ConfigError

    platform = detect_platform(root)
    try:
        overrides = load_overrides(profiles_path) if profiles_path else None
        profile = profile_for(platform, overrides)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"kind": platform.kind, **asdict(platform),
                               "profile": profile.to_dict()}, indent=2))
        return
    _print_devices(platform, profile)


def _print_devices(platform, profile) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()

    def row(label: str, value: str, style: str = "") -> None:
        table.add_row(label, Text(value, style=style))  # Text: "[tensorrt]" is not markup

    row("kind", platform.kind)
    jetson = platform.jetson
    if jetson is not None:
        row("model", jetson.model)
        row("module", jetson.module + (" (Super)" if jetson.super_mode else ""))
        row("L4T / JetPack", f"{jetson.l4t or 'unknown'} / {jetson.jetpack or 'unknown'}")
        row("GPU", f"{jetson.gpu or 'unknown'} (integrated, {jetson.soc or '?'})")
        row("compute capability", jetson.compute_capability or "unknown")
        row("memory", f"{jetson.memory_mb} MiB, shared with the CPU"
            if jetson.memory_mb else "unknown")
        row("DLA cores", str(jetson.dla_cores))
    for gpu in platform.gpus:
        row(f"GPU {gpu.index}", f"{gpu.name}, {gpu.compute_capability}, {gpu.memory_mb} MiB")
    if platform.driver_version:
        row("driver", platform.driver_version)
    if platform.gpu_problem:
        row("GPUs", platform.gpu_problem, "yellow")
    row("usable CPUs", str(platform.cpu_count))
    row("", "")
    row("profile", profile.name)
    row("precision", profile.precision)
    row("backends", " > ".join(profile.backends))
    row("TensorRT workspace",
        f"{profile.workspace_mb} MB" if "tensorrt" in profile.backends else "-")
    row("DLA", f"{profile.dla_cores} core(s)" if profile.has_dla else "none")
    row("builds for", profile.compute_capability or "-")
    Console().print(table)


@main.command()
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
    from runtime.bundle import variant_path
    from runtime.model_zoo import resolve_bundle

    source = resolve_bundle(bundle)
    out = out or variant_path(source, precision)
    result = quantize_bundle(source, precision, calib_dir, out, eval_dir=eval_dir, runs=runs,
                             min_recall=min_recall, console=err_console)
    console = Console()
    for table in report_tables(result.report):
        console.print(table)
    click.echo(f"{precision} variant of {source.name}@{source.version} written to "
               f"{result.bundle.directory} (report: {REPORT_NAME})")


@main.command("export")
@click.argument("model")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="State dict (torch.save(model.state_dict())) for a factory-built model.")
@click.option("--task", required=True, type=click.Choice(["face", "detect", "raw"]),
              help="How outputs are decoded.")
@click.option("--name", help="Bundle name (default: the factory's name or the file's stem).")
@click.option("--version", "version", default="1", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Bundle directory to write (default: ./NAME).")
@click.option("--archive", is_flag=True, help="Also write NAME-VERSION.sightline for shipping.")
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
@click.option("--multiple-of", type=int, default=32, show_default=True,
              help="Dynamic size: input dims are rounded up to this.")
@click.option("--max-size", metavar="WxH", default="1920x1088", show_default=True,
              help="Dynamic size: larger frames are scaled down to fit.")
@_bundle_flags
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
    from runtime.bundle import SizePolicy, pack_archive

    name = name or default_name(model)
    width, height = _parse_size(input_size, "--input-size")
    size = None
    if not static:
        max_w, max_h = _parse_size(max_size, "--max-size")
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
        path = pack_archive(bundle, bundle.directory.parent /
                            f"{bundle.name}-{bundle.version}.sightline")
        click.echo(f"archive written to {path}")


@main.command()
@click.option("--control", "endpoint", metavar="ENDPOINT",
              help="The daemon's control socket: ipc:///path or a path (default: the first "
                   "that exists of $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/sightline, "
                   "/run/sightline, $TMPDIR/sightline-UID; each /control.sock).")
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
@click.option("--timeout", type=float, default=2.0, show_default=True)
def status(endpoint: str | None, as_json: bool, timeout: float) -> None:
    """Ask the running daemon (over its local control socket) how it is doing."""
    import json

    from runtime.control import (
        as_endpoint,
        find_control_endpoint,
        query_status,
        unreachable_reason,
    )
    from runtime.status import render_status

    endpoint = as_endpoint(endpoint) if endpoint else find_control_endpoint()
    reason = unreachable_reason(endpoint)
    report = None if reason else query_status(endpoint, timeout)
    if report is None:
        raise SightlineError(f"no daemon answered: {reason or f'silent for {timeout} s'}. Is "
                             f"`sightline serve` running? Its control socket is {endpoint}"
                             " (--control to look elsewhere)")
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        # Piped (grep, ssh without a tty): rich would assume 80 columns and cut the table.
        width = None if sys.stdout.isatty() else 200
        render_status(report, Console(soft_wrap=True, width=width))


@main.group()
def service() -> None:
    """Run sightline as a systemd service on this device."""


@service.command("install")
@click.option("--user", default="sightline", show_default=True,
              help="Unprivileged account the daemon runs as (created if missing).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/etc/sightline/sightline.toml"), show_default=True,
              help="Config file for the service (a default is written if missing).")
@click.option("--dry-run", is_flag=True, help="Print what it would do; change nothing.")
def service_install(user: str, config_path: Path, dry_run: bool) -> None:
    """Install the systemd service: unit, user, config, daemon key (root; see --dry-run)."""
    from runtime.service_install import apply_plan, format_plan, plan_install, require_root

    if not dry_run:
        require_root()
    plan = plan_install(user=user, config=config_path)
    if dry_run:
        click.echo(format_plan(plan, dry_run=True))
    else:
        click.echo("installing the sightline service:")
        for note in plan.notes:
            click.echo(f"  note: {note}")
        apply_plan(plan, echo=click.echo)
    click.echo("then start it now and at every boot with:" if dry_run
               else "installed. Start it now and at every boot with:")
    for step in plan.next_steps:
        click.echo(f"  {step}")



def _register_operator_commands() -> None:
    """The cloud operator's commands live in cloud_sync/cli.py (imports there are lazy)."""
    from cloud_sync.cli import fleet, keys_gen, push, rollback

    keys.add_command(keys_gen)
    for command in (push, rollback, fleet):
        main.add_command(command)


_register_operator_commands()


if __name__ == "__main__":
    main()

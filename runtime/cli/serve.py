"""`sightline serve` and `sightline status`: compose the daemon with what it needs.

The daemon (runtime.daemon) receives its bundles, engine builder and cloud agent from
here; it never imports exporters or cloud_sync itself.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click
from rich.console import Console

from runtime.errors import SightlineError


@click.command()
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
    from exporters.tensorrt_build import compile_bundle
    from exporters.zoo import resolve_bundle
    from runtime.config import apply_device_profile, load_config
    from runtime.daemon.control import ControlServer, default_control_endpoint
    from runtime.daemon.server import Server
    from runtime.daemon.service import Watchdog, notify_ready, notify_stopping
    from runtime.daemon.status import DaemonStatus
    from runtime.models.bundle import preferred_variant

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
        from runtime.models.store import ModelStore

        cloud = CloudSettings.parse(config.cloud)
        cloud.link_config()  # config errors now, before anything starts
        store = ModelStore(cloud.models_dir, keep_versions=cloud.ota.keep_versions,
                           max_boots=cloud.ota.max_boots)
        boot_events = store.on_boot()  # may roll back a crash-looping update before loading
        # The store's active version wins over the configured bundle once it has one.
        bundles = [store.seed(bundle) for bundle in bundles]
    cascade_bundles = {entry.run: resolve_bundle(entry.run) for entry in config.cascades}
    server = Server(config, bundles, engine_builder=compile_bundle,
                    cascade_bundles=cascade_bundles)
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
        from runtime.daemon.model_host import ServerModelHost

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
        # The agent stops before the pipelines: a pipeline shutting down must never look
        # like a model failing its probation.
        server.serve(stop, watchdog=Watchdog.from_environ(),
                     before_close=agent.stop if agent is not None else None)
    finally:
        if agent is not None:
            agent.stop()  # again, in case serve() failed before its shutdown (idempotent)
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
    from runtime.daemon.metrics import Metrics, serve_prometheus

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


@click.command()
@click.option("--control", "endpoint", metavar="ENDPOINT",
              help="The daemon's control socket: ipc:///path or a path (default: the first "
                   "that exists of $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/sightline, "
                   "/run/sightline, $TMPDIR/sightline-UID; each /control.sock).")
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
@click.option("--timeout", type=float, default=2.0, show_default=True)
def status(endpoint: str | None, as_json: bool, timeout: float) -> None:
    """Ask the running daemon (over its local control socket) how it is doing."""
    import json

    from runtime.daemon.control import (
        as_endpoint,
        find_control_endpoint,
        query_status,
        unreachable_reason,
    )
    from runtime.daemon.status import render_status

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


"""Operator commands: `sightline push`, `sightline rollback`, `sightline fleet`, and
`sightline keys gen` for the OTA signing key. Registered on the main CLI by runtime/cli/;
heavy imports stay inside the commands so `sightline --help` stays fast."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from runtime.cli.lazy_group import LazyGroup

DEFAULT_SIGNING_DIR = "~/.config/sightline/signing"


def _broker_options(command):
    options = [
        click.option("--broker", default="127.0.0.1:1883", show_default=True,
                     metavar="HOST:PORT", help="The fleet's MQTT broker."),
        click.option("--username", help="Broker user name."),
        click.option("--password", envvar="SIGHTLINE_MQTT_PASSWORD",
                     help="Broker password (or $SIGHTLINE_MQTT_PASSWORD)."),
        click.option("--tls-ca", type=click.Path(exists=True, path_type=Path),
                     help="CA certificate of the broker (turns TLS on)."),
        click.option("--tls-cert", type=click.Path(exists=True, path_type=Path),
                     help="Operator's client certificate."),
        click.option("--tls-key", type=click.Path(exists=True, path_type=Path),
                     help="Key of the client certificate."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _operator_config(broker, username, password, tls_ca, tls_cert, tls_key):
    from cloud_sync.operator import OperatorConfig
    from runtime.errors import SightlineError

    host, _, port = broker.rpartition(":")
    if not host or not port.isdigit():
        raise SightlineError(f"--broker {broker!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
    return OperatorConfig(host=host, port=int(port), username=username, password=password,
                          tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)


def _signing_key(path: Path | None):
    from cloud_sync.signing import PRIVATE_SUFFIX, load_private_key
    from runtime.errors import ConfigError

    if path is None:
        found = sorted(Path(DEFAULT_SIGNING_DIR).expanduser().glob(f"*{PRIVATE_SUFFIX}"))
        if len(found) != 1:
            raise ConfigError(f"give the signing key with --key ({len(found)} keys in "
                              f"{DEFAULT_SIGNING_DIR}; make one with `sightline keys gen NAME`)")
        path = found[0]
    return load_private_key(path)


def _collect(watcher, settle_s: float) -> None:
    """Give retained statuses a moment to arrive after subscribing."""
    import time

    deadline = time.monotonic() + settle_s
    last = -1
    while time.monotonic() < deadline:
        count = len(watcher.state.rows())
        if count == last and count > 0:
            return
        last = count
        time.sleep(0.3)


@click.command("gen")
@click.argument("name")
@click.option("--dir", "directory", default=DEFAULT_SIGNING_DIR, show_default=True,
              help="Where to write NAME.ed25519 (private) and NAME.ed25519.pub.")
def keys_gen(name: str, directory: str) -> None:
    """Make an Ed25519 key pair for signing OTA updates.

    \b
    Keep NAME.ed25519 with the operator (it signs `sightline push`); copy
    NAME.ed25519.pub to every device and list it in cloud.trusted_keys (or pass it
    with `sightline serve --trusted-key`).
    """
    from cloud_sync.signing import generate_signing_key, key_id, load_public_key

    private, public = generate_signing_key(Path(directory).expanduser(), name)
    click.echo(f"private key  {private}  (keep secret: it can update every device)")
    click.echo(f"public key   {public}  (key id {key_id(load_public_key(public))})")


@click.command()
@click.argument("bundle")
@click.option("--to", "targets", multiple=True, required=True, metavar="DEVICE|GROUP",
              help="A device id or group (device:ID / group:NAME when ambiguous); repeatable.")
@click.option("--key", "key_path", type=click.Path(exists=True, path_type=Path),
              help=f"Signing key (.ed25519). Default: the only one in {DEFAULT_SIGNING_DIR}.")
@click.option("--canary", "canaries", multiple=True, metavar="DEVICE|GROUP",
              help="Update these first; the rest only after they confirm and soak.")
@click.option("--soak", "soak_s", type=float, default=60.0, show_default=True,
              help="Seconds the canaries must stay healthy after confirming.")
@click.option("--url", help="Devices download the bundle from this http(s) URL (host the "
                            "archive there yourself) instead of MQTT chunks.")
@click.option("--chunk-size", type=int, default=256 * 1024, show_default=True,
              help="Bytes per retained MQTT chunk.")
@click.option("--budget-ms", type=float, help="Devices refuse the model if its median latency "
                                              "on the sample exceeds this.")
@click.option("--atol", type=float, default=1e-3, show_default=True,
              help="Devices compare outputs on the sample with this tolerance.")
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--no-reference", is_flag=True, help="Skip the reference-output comparison.")
@click.option("--timeout", "timeout_s", type=float, default=900.0, show_default=True,
              help="Give up on devices that have not finished by then.")
@click.option("--keep-chunks", is_flag=True,
              help="Leave the retained chunks on the broker (for devices offline now).")
@click.option("--allow-downgrade", is_flag=True,
              help="Let devices install a version older than the one they serve, or one "
                   "they already moved on from (refused otherwise).")
@click.option("--gate-window", "gate_window_s", type=float, metavar="SECONDS",
              help="Telemetry gate (needs --canary): compare each canary's telemetry over "
                   "SECONDS after confirming with its own SECONDS before and with the devices "
                   "not yet updated; halt and roll the canaries back when worse.")
@click.option("--gate-p99", "gate_p99", type=float, default=0.25, show_default=True,
              help="Gate margin: p99 round trip more than this share higher is worse.")
@click.option("--gate-fps", "gate_fps", type=float, default=0.20, show_default=True,
              help="Gate margin: fps more than this share lower is worse.")
@click.option("--gate-errors", "gate_errors", type=float, default=0.02, show_default=True,
              help="Gate margin: an error share this much higher (absolute) is worse.")
@click.option("--gate-drops", "gate_drops", type=float, default=0.05, show_default=True,
              help="Gate margin: a frame-drop share this much higher (absolute) is worse.")
@click.option("--gate-min-samples", type=int, default=6, show_default=True,
              help="Telemetry samples each window needs before the gate decides.")
@click.option("--db", "db_url", metavar="URL",
              help="Record the rollout, the gate's figures and the outcome in the fleet "
                   "service's database (as `sightline cloud serve --db`).")
@_broker_options
def push(bundle, targets, key_path, canaries, soak_s, url, chunk_size, budget_ms, atol, rtol,
         no_reference, timeout_s, keep_chunks, allow_downgrade, gate_window_s, gate_p99,
         gate_fps, gate_errors, gate_drops, gate_min_samples, db_url, **broker) -> None:
    """Sign a bundle update and roll it out, following every device's progress.

    BUNDLE is a bundle directory or .sightline archive (or 'centerface').

    \b
    Examples:
      sightline push bundles/centerface-1.6 --to edge-01
      sightline push face-1.6.sightline --to lab --canary edge-01 --soak 120
    Exit status 0 when every device confirmed the new version (or had it), 1 otherwise.
    """
    import shutil
    import tempfile

    from rich.console import Console

    from cloud_sync.commands import SUCCEEDED, Tolerance
    from cloud_sync.fleet import FleetWatcher
    from cloud_sync.operator import publish_bytes
    from cloud_sync.push import RolloutError, package_bundle, resolve_targets, rollout

    console = Console(width=None if sys.stdout.isatty() else 200)
    if gate_window_s is not None and not canaries:
        raise click.UsageError("--gate-window judges canaries: give --canary too")
    key = _signing_key(key_path)
    config = _operator_config(**broker)
    record = None
    if db_url:
        from cloud_sync.service.rollout_record import RolloutRecord

        record = RolloutRecord(db_url)
    work = Path(tempfile.mkdtemp(prefix="sightline-push-"))
    try:
        from exporters.zoo import resolve_bundle

        with console.status("packaging the bundle (sample input + reference outputs)"):
            source = resolve_bundle(bundle, show_progress=False).directory
            archive = package_bundle(source, work, with_reference=not no_reference)
        with FleetWatcher(config) as watcher:
            _collect(watcher, 2.0)
            resolved = resolve_targets(watcher.state, targets)
            canary_devices = (resolve_targets(watcher.state, canaries).members
                              if canaries else ())
            client = watcher.client  # one session publishes and follows progress
            gate = None
            if gate_window_s is not None:
                from cloud_sync.service.gate import GateSettings, TelemetryGate

                gate = TelemetryGate(watcher.state, GateSettings(
                    window_s=gate_window_s, min_samples=gate_min_samples,
                    p99_margin=gate_p99, fps_margin=gate_fps, error_margin=gate_errors,
                    drop_margin=gate_drops))

            def publish_fn(client, topic, payload, retain=False):
                publish_bytes(client, topic, payload, retain=retain, timeout_s=30)

            try:
                results = rollout(
                    client, watcher.state, archive, key, resolved, publish=publish_fn,
                    canaries=canary_devices, soak_s=soak_s, timeout_s=timeout_s, url=url,
                    chunk_size=chunk_size, latency_budget_ms=budget_ms,
                    tolerance=None if no_reference else Tolerance(atol=atol, rtol=rtol),
                    keep_chunks=keep_chunks, allow_downgrade=allow_downgrade,
                    on_event=lambda line: console.print(
                        line, highlight=False, markup=False), gate=gate, record=record)
            except RolloutError as exc:
                console.print(f"[bold red]rollout stopped:[/] {exc}")
                sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if record is not None:
            record.close()
    bad = {d: r for d, r in results.items() if r.get("state") not in SUCCEEDED}
    ok = len(results) - len(bad)
    console.print(f"{ok} of {len(results)} device(s) serve the new version"
                  + (f"; [red]{len(bad)} did not[/]: " + ", ".join(
                      f"{d} ({r.get('state', 'no answer')})" for d, r in bad.items())
                     if bad else ""))
    sys.exit(1 if bad else 0)


@click.command("rollback")
@click.argument("model")
@click.option("--to", "targets", multiple=True, required=True, metavar="DEVICE|GROUP",
              help="Devices or groups to roll back; repeatable.")
@click.option("--version", "to_version", help="Version to serve (default: the previous one).")
@click.option("--key", "key_path", type=click.Path(exists=True, path_type=Path),
              help="Signing key (.ed25519).")
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True)
@_broker_options
def rollback(model, targets, to_version, key_path, timeout_s, **broker) -> None:
    """Serve an earlier installed version of MODEL again, by signed command."""
    import secrets

    from rich.console import Console

    from cloud_sync.commands import RollbackCommand
    from cloud_sync.fleet import FleetWatcher
    from cloud_sync.operator import publish_bytes
    from cloud_sync.push import RolloutError, publish_command, resolve_targets, wait_for

    console = Console(width=None if sys.stdout.isatty() else 200)
    key = _signing_key(key_path)
    with FleetWatcher(_operator_config(**broker)) as watcher:
        _collect(watcher, 2.0)
        resolved = resolve_targets(watcher.state, targets)
        command = RollbackCommand(command_id=f"rollback-{model}-{secrets.token_hex(3)}",
                                  model=model, to_version=to_version,
                                  devices=resolved.devices, groups=resolved.groups)
        publish_command(watcher.client, command, key, lambda c, t, p, retain=False:
                        publish_bytes(c, t, p, retain=retain))
        try:
            states = wait_for(lambda: watcher.state.all_progress(command.command_id),
                              list(resolved.members), timeout_s)
        except RolloutError as exc:
            console.print(f"[red]{exc}[/]")
            sys.exit(1)
    for device, doc in sorted(states.items()):
        console.print(f"{device:<20} {doc.get('state')}: {doc.get('detail', '')}",
                      highlight=False, markup=False)
    sys.exit(0 if all(d.get("state") == "rolled_back" for d in states.values()) else 1)


@click.group(cls=LazyGroup, invoke_without_command=True, lazy={
    "history": "cloud_sync.service.cli:history", "rollouts": "cloud_sync.service.cli:rollouts"})
@click.option("--once", "once_after_s", type=float, metavar="SECONDS",
              help="Collect for SECONDS, print the table once and exit (for scripts).")
@_broker_options
@click.pass_context
def fleet(ctx, once_after_s, **broker) -> None:
    """Live table of the fleet: online, model and version, fps, p99 latency, last OTA.

    \b
    With a command, the fleet service's recorded history instead:
      sightline fleet history DEVICE     a device's versions and how each change ended
      sightline fleet rollouts [ID]      rollouts, their steps and telemetry-gate figures
    """
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    from cloud_sync.fleet import watch_fleet

    # piped (scripts, logs): full rows instead of a table squeezed into 80 columns
    console = Console(width=None if sys.stdout.isatty() else 200)
    watch_fleet(_operator_config(**broker), console, once_after_s=once_after_s)
